"""The forwarder's own rules: what an answer means, when to come back, one shared client
with the secrets added at send time, bounded slots per vendor, per-visitor order, waking on
ingest, shutdown, held rows expiring. Against the real app and the fake vendors over HTTP."""

from __future__ import annotations

import dataclasses
import email.utils
import sqlite3
import types

import httpx
import pytest

from server import http_client
from server.forwarder import (DEAD, DELIVERED, PENDING, Forwarder, ForwarderOptions, Verdict,
                              _text_encoding, classify, retry_after_seconds)
from server.store.base import Delivery

from fakes.harness import (ALL, FAST, SECRETS, backend, browser, item, make_settings, purchase, rows,
                           serve, states, until)


# What an answer means ---------------------------------------------------------------------


@pytest.mark.parametrize("vendor, status, state", [
    ("rejoiner", 200, DELIVERED), ("esputnik", 204, DELIVERED), ("sendlane", 202, DELIVERED),
    ("rejoiner", 500, PENDING), ("remarkety", 502, PENDING), ("remarkety", 503, PENDING),
    ("sendlane", 408, PENDING), ("sendlane", 409, PENDING), ("sendlane", 429, PENDING),
    ("rejoiner", 400, DEAD), ("rejoiner", 401, DEAD), ("esputnik", 404, DEAD),
    # Remarkety: retry whenever the endpoint "does not respond with HTTP 200 status code"
    ("remarkety", 400, PENDING), ("remarkety", 401, PENDING), ("remarkety", 404, PENDING),
    ("remarkety", 422, PENDING), ("remarkety", 301, PENDING),
    ("sendlane", 422, DEAD),  # Sendlane: invalid data, sending it again changes nothing
    ("sendlane", 403, PENDING),  # Sendlane: "blocked due to many errors", temporary
    ("rejoiner", 403, DEAD),  # Rejoiner: failed authentication
    ("rejoiner", 301, DEAD), ("sendlane", 307, DEAD),  # redirects are not followed
])
def test_classify(vendor, status, state) -> None:
    verdict = classify(vendor, status, {}, '{"message": "why"}', now=1000.0)
    assert verdict.state == state
    if state != DELIVERED:
        assert str(status) in verdict.error
    if state == DEAD and 400 <= status < 500:
        assert '{"message": "why"}' in verdict.error  # the vendor's body is kept


@pytest.mark.parametrize("vendor, status, key", [
    ("remarkety", 401, "api_key"), ("rejoiner", 403, "api_key"), ("sendlane", 401, "api_token"),
    ("esputnik", 401, "api_key")])
def test_a_refused_key_names_the_setting_to_check(vendor, status, key) -> None:
    verdict = classify(vendor, status, {}, "no", now=0.0, site_id="shop1")
    assert verdict.error == (f"key rejected ({status}): check sites[shop1].{vendor}.{key}; "
                             f"HTTP {status}: no")
    # Sendlane's 403 may also be "blocked due to many errors": retried, and said so.
    blocked = classify("sendlane", 403, {}, "no", now=0.0, site_id="shop1")
    assert (blocked.state, blocked.error) == (PENDING, "key rejected (403), or a temporary "
                                              "block: check sites[shop1].sendlane.api_token; "
                                              "HTTP 403: no")
    assert classify(vendor, 400, {}, "no", now=0.0, site_id="shop1").error == "HTTP 400: no"


def test_throttling_pauses_the_lane_and_keeps_the_vendors_time() -> None:
    throttled = classify("remarkety", 429, {"retry-after": "7"}, "", now=0.0)
    assert (throttled.state, throttled.retry_after_s, throttled.pause_lane) == (PENDING, 7.0, True)
    assert classify("remarkety", 429, {}, "", now=0.0).pause_lane  # no header: still a pause
    assert classify("remarkety", 503, {"retry-after": "3"}, "", now=0.0).pause_lane
    assert not classify("remarkety", 500, {"retry-after": "3"}, "", now=0.0).pause_lane


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = 1_800_000_000.0
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds(" 1.5 ", now) == 1.5
    assert retry_after_seconds(email.utils.formatdate(now + 90, usegmt=True), now) == 90.0
    assert retry_after_seconds(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0
    assert retry_after_seconds("-5", now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


def _forwarder(**options) -> Forwarder:
    settings = types.SimpleNamespace(server=types.SimpleNamespace(hold_days=7), sites={})
    options = dataclasses.replace(ForwarderOptions(), **options)
    return Forwarder(settings, store=None, options=options,
                     rng=lambda: 1.0)


def _delivery(attempts: int, created_ms: int = 0, retry_from_ms: int = 0) -> Delivery:
    return Delivery(id=1, site_id="shop1", vendor="sendlane", dedup_key="k", visitor="v",
                    request={}, attempts=attempts, created_ms=created_ms,
                    retry_from_ms=retry_from_ms)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    forwarder = _forwarder(backoff_base_s=2.0, backoff_cap_s=60.0, max_attempts=100,
                           retry_window_s=10**9)
    delays = [forwarder._outcome(_delivery(n), Verdict(PENDING, "HTTP 500"), 0.0).next_attempt_ms
              for n in range(1, 9)]
    assert delays == [2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]  # rng() = 1.0
    low = Forwarder(forwarder.settings, None, forwarder.options, rng=lambda: 0.0)
    assert low._outcome(_delivery(3), Verdict(PENDING, "x"), 0.0).next_attempt_ms == 4000  # half


def test_retry_after_wins_over_backoff_and_never_comes_early() -> None:
    forwarder = _forwarder(backoff_base_s=60.0)
    outcome = forwarder._outcome(_delivery(1), Verdict(PENDING, "HTTP 429", 5.0), 100.0)
    assert 105_000 <= outcome.next_attempt_ms <= 105_500


def test_attempt_limit_and_retry_window_make_a_row_dead() -> None:
    forwarder = _forwarder(max_attempts=4, retry_window_s=3600.0, backoff_base_s=1.0)
    assert forwarder._outcome(_delivery(3), Verdict(PENDING, "HTTP 500"), 0.0).state == PENDING
    dead = forwarder._outcome(_delivery(4), Verdict(PENDING, "HTTP 500: down"), 0.0)
    assert dead.state == DEAD and "gave up after 4 attempts" in dead.error and "down" in dead.error
    # Planned over an hour ago: the next try would fall outside the window.
    late = forwarder._outcome(_delivery(2, created_ms=0), Verdict(PENDING, "timeout"), 3600.0)
    assert late.state == DEAD and "retry window" in late.error
    # Replayed a minute ago: the window starts again at the replay.
    replayed = _delivery(2, created_ms=0, retry_from_ms=3_540_000)
    assert forwarder._outcome(replayed, Verdict(PENDING, "timeout"), 3600.0).state == PENDING


def test_options_from_the_environment() -> None:
    options = ForwarderOptions.from_env({"ONETAG_FORWARD_CONCURRENCY": "4",
                                         "ONETAG_FORWARD_LEASE_S": "2.5",
                                         "ONETAG_FORWARD_RATES": "sendlane=4, remarkety=10"})
    assert (options.concurrency, options.lease_s) == (4, 2.5)
    assert options.rates == {"sendlane": 4.0, "remarkety": 10.0}
    assert ForwarderOptions.from_env({}) == ForwarderOptions()
    assert ForwarderOptions.from_env({"ONETAG_FORWARD_RATES": "none"}).rates == {}
    with pytest.raises(ValueError, match="ONETAG_FORWARD_MAX_ATTEMPTS"):
        ForwarderOptions.from_env({"ONETAG_FORWARD_MAX_ATTEMPTS": "many"})
    timeout = ForwarderOptions(connect_timeout_s=1, read_timeout_s=2).timeout
    assert (timeout.connect, timeout.read) == (1, 2)


# Against the running app ------------------------------------------------------------------


async def test_secrets_are_added_at_send_time_and_never_stored(tmp_path, fake) -> None:
    settings = make_settings(tmp_path, fake)
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001", "jim@example.com",
                                       sc="JIM-0000-CHECKOUT"))  # eSputnik's cookies.sc
        await until(lambda: states(db) == {"delivered": 4}, what="4 deliveries",
                    describe=lambda: rows(db))
    seen = {r.vendor: r.headers for r in fake.delivered()}
    assert seen["rejoiner"]["authorization"] == "Rejoiner RJ-SECRET"
    assert seen["remarkety"]["x-token"] == "RM-SECRET"
    assert seen["esputnik"]["authorization"].startswith("Basic ")
    assert seen["sendlane"]["authorization"] == "Bearer SL-SECRET"
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    assert not [s for s in SECRETS.values() if s in dump]


async def test_connections_are_kept_alive_and_stale_ones_replaced(tmp_path, fake) -> None:
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        # One visitor's orders go one after another: one connection carries them all.
        await backend(client, *(purchase(f"{n}", "jim@example.com") for n in range(10)))
        await until(lambda: states(db) == {"delivered": 10}, what="10 delivered")
        assert fake.connections == 1
        # The vendor closes idle connections: the next requests still go through, first time.
        fake.close_after("sendlane", times=3)
        await backend(client, *(purchase(f"{n}", "jim@example.com") for n in range(10, 20)))
        await until(lambda: states(db) == {"delivered": 20}, what="20 delivered")
    assert [row["attempts"] for row in rows(db)] == [1] * 20
    assert fake.connections == 4 and len(fake.requests()) == 20


async def test_a_stale_connection_noticed_only_when_used_is_replaced(tmp_path, fake,
                                                                   monkeypatch) -> None:
    # The vendor's close arrives after the pool checked the idle connection: the send fails
    # on it, and goes once more on a fresh connection instead of counting as a failure.
    # (the pool sees an idle connection as usable even when its end has already arrived)
    monkeypatch.setattr(http_client.Connection, "is_available", lambda self: self._reusable)
    fake.close_after("sendlane", times=3)
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, *(purchase(f"{n}", "jim@example.com") for n in range(6)))
        await until(lambda: states(db) == {"delivered": 6}, what="6 delivered",
                    describe=lambda: rows(db))
    assert [row["attempts"] for row in rows(db)] == [1] * 6
    assert fake.connections == 4 and len(fake.delivered()) == 6


async def test_redirects_are_not_followed(tmp_path, fake) -> None:
    fake.fail("sendlane", 302, times=None, headers={"Location": fake.url("sendlane", "/moved")})
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001", "jim@example.com"))
        [row] = await until(lambda: rows(db, "state = 'dead'"), what="a dead row")
    assert "redirect" in row["last_error"] and "/moved" in row["last_error"]
    assert [r.path for r in fake.requests()] == ["/sendlane/tracking/order-placed"]


async def test_a_header_http_cannot_carry_is_dead_at_once_and_never_sent(tmp_path, fake,
                                                                       monkeypatch) -> None:
    """A credential with a line break (a key pasted with its newline) would split the
    request: refused before a byte leaves, dead at once (no retry mends it), the attempt
    recorded as not sent, and the message names the site's vendor section."""
    from server.vendors import sendlane
    monkeypatch.setattr(sendlane, "auth_headers",
                        lambda cfg: {"Authorization": "Bearer abc\nX-Evil: 1"})
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001", "jim@example.com"))
        [row] = await until(lambda: rows(db, "state = 'dead'"), what="a dead row")
    assert row["attempts"] == 1 and "sites[shop1].sendlane" in row["last_error"]
    assert "Bearer" not in row["last_error"]  # the credential itself is never echoed
    with sqlite3.connect(db) as conn:
        [(request,)] = conn.execute("SELECT request FROM attempts").fetchall()
    assert '"sent":false' in request.replace(" ", "")
    assert fake.requests() == []


async def test_onetag_forward_proxy_sends_every_vendor_request_through_it(tmp_path,
                                                                          fake) -> None:
    from test_http_client import Proxy  # a loopback proxy that answers plain http itself

    async with Proxy() as proxy:
        env = {"ONETAG_FORWARD_PROXY": f"http://127.0.0.1:{proxy.port}"}
        options = dataclasses.replace(FAST, proxy=ForwarderOptions.from_env(env).proxy)
        settings = make_settings(tmp_path, fake, only=("sendlane",))
        db = tmp_path / "onetag.db"
        async with serve(settings, options) as app, \
                httpx.AsyncClient(base_url=app.state.base_url) as client:
            await backend(client, purchase("1001", "jim@example.com"))
            await until(lambda: states(db) == {"delivered": 1}, what="delivered")
    assert fake.requests() == []  # the proxy answered: nothing went round it
    assert proxy.heads[0].startswith(
        f"POST {fake.url('sendlane', '/tracking/order-placed')} HTTP/1.1".encode())


def test_an_answer_the_client_cut_is_not_said_to_be_whole() -> None:
    """An answer cut at the client's bound says its length is unknown (more than was read),
    where one merely longer than what an attempt keeps says its whole length."""
    from server.forwarder import ANSWER_BODY_LIMIT, _Trace
    trace = _Trace(0.0)
    trace.answer(http_client.Answer(500, {}, b"x" * 65536, truncated=True), "x" * 65536)
    assert trace.answer_["truncated"] and trace.answer_["length_known"] is False
    trace.answer(http_client.Answer(500, {}, b"y" * 5000), "y" * 5000)
    assert trace.answer_["length"] == 5000 and "length_known" not in trace.answer_
    assert len(trace.answer_["body"]) == ANSWER_BODY_LIMIT


async def test_one_visitor_is_served_in_order_even_across_a_retry(tmp_path, fake) -> None:
    fake.fail("sendlane/tracking/event", 500)  # the visitor's first custom event fails once
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    db = tmp_path / "onetag.db"
    names = [f"step_{n}" for n in range(8)]
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await browser(client, {"event": "identify", "event_id": "id-1",
                               "user": {"email": "jim@example.com", "customer_id": "C-1"}})
        await browser(client, *({"event": name, "event_id": f"ev-{name}", "loaded": []}
                                for name in names))
        # Other visitors' orders flow beside it, through the same lane.
        await backend(client, *(purchase(f"{n}", f"other{n}@example.com") for n in range(6)))
        # The identify is a browser's claim: only its email is kept, and Sendlane's
        # customer-added needs the shop's customer id, so that row is ignored (not sent).
        await until(lambda: states(db) == {"delivered": 8 + 6, "ignored": 1},
                    what="all delivered", describe=lambda: states(db))
    sent = [(r.json["custom_event"], r.answer) for r in fake.requests("sendlane/tracking/event")]
    assert sent == [("step_0", "500")] + [(name, "200") for name in names]


async def test_in_flight_requests_are_bounded_per_vendor(tmp_path, fake) -> None:
    fake.hang("sendlane", times=None)
    options = dataclasses.replace(FAST, concurrency=3, read_timeout_s=120.0)
    settings = make_settings(tmp_path, fake, only=("sendlane", "rejoiner"))
    db = tmp_path / "onetag.db"
    async with serve(settings, options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, *(purchase(f"{n}", f"buyer{n}@example.com") for n in range(10)))
        # Rejoiner's ten are delivered (its lane looped many times meanwhile) ...
        await until(lambda: len(rows(db, "vendor = 'rejoiner' AND state = 'delivered'")) == 10,
                    what="rejoiner delivered", describe=lambda: states(db))
        await until(lambda: fake.in_flight.get("sendlane") == 3, what="3 sendlane in flight")
        # ... while Sendlane never had more than its 3 slots open.
        assert fake.max_in_flight["sendlane"] == 3
        fake.release()
        await until(lambda: states(db) == {"delivered": 20}, what="all delivered",
                    describe=lambda: states(db))
    assert fake.max_in_flight["sendlane"] == 3
    assert len(fake.delivered("sendlane")) == 10


async def test_an_ingest_wakes_the_forwarder_at_once(tmp_path, fake) -> None:
    # Idle polling an hour apart: only the wake-up after the ingest can explain a delivery.
    options = dataclasses.replace(FAST, idle_poll_s=3600.0, expire_every_s=3600.0)
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    db = tmp_path / "onetag.db"
    async with serve(settings, options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        for n in range(3):
            await backend(client, purchase(f"{n}", "jim@example.com"))
            await until(lambda: len(rows(db, "state = 'delivered'")) == n + 1,
                        what=f"order {n} delivered", describe=lambda: rows(db))


async def test_shutdown_leaves_an_unfinished_send_leased_for_the_next_run(tmp_path, fake) -> None:
    fake.hang("sendlane")
    options = dataclasses.replace(FAST, lease_s=1.0, read_timeout_s=120.0, shutdown_grace_s=0.1)
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    db = tmp_path / "onetag.db"
    async with serve(settings, options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001", "jim@example.com"))
        await until(lambda: fake.requests(answer="hung"), what="the send to hang")
    [row] = rows(db)
    # Not failed, not retried: still pending under its lease, the one attempt counted.
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 1, None)
    assert row["next_attempt_ms"] > row["updated_ms"]
    # The next run takes it once the 1 s lease is over; its own lease is long, so a slow
    # machine's send can't outlast it and be claimed a third time.
    async with serve(settings, dataclasses.replace(options, lease_s=60.0)):
        await until(lambda: states(db) == {"delivered": 1}, what="delivery after restart",
                    describe=lambda: rows(db))
    bodies = [r.json for r in fake.requests()]
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same order id: Sendlane dedups


async def test_held_rows_expire_after_the_hold_window(tmp_path, fake) -> None:
    settings = make_settings(tmp_path, fake, only=("remarkety",), hold_days=0.5 / 86400)
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await browser(client, {"event": "add_to_cart", "event_id": "c1", "loaded": ALL,
                               "ecommerce": {"currency": "USD", "items": [item()]}})
        await until(lambda: states(db) == {"expired": 1}, what="the held cart to expire",
                    describe=lambda: rows(db))
    assert fake.requests() == []


async def test_a_vendor_removed_from_the_config_dead_letters_its_rows(tmp_path, fake) -> None:
    db = tmp_path / "onetag.db"
    stored_only = make_settings(tmp_path, fake, only=("sendlane", "rejoiner"), forward=False)
    async with serve(stored_only) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001", "jim@example.com"))
    assert states(db) == {"pending": 2}
    async with serve(make_settings(tmp_path, fake, only=("rejoiner",))):
        await until(lambda: states(db) == {"delivered": 1, "dead": 1}, what="both decided",
                    describe=lambda: rows(db))
    [dead] = rows(db, "state = 'dead'")
    assert dead["vendor"] == "sendlane" and "no sendlane section" in dead["last_error"]
    assert [r.vendor for r in fake.requests()] == ["rejoiner"]


@pytest.mark.parametrize("content_type", [
    None, "", "application/json", "application/json; charset=utf-8",
    "text/plain; charset=ISO-8859-1", 'text/html; charset="utf-16"', "text/html; charset=bogus"])
def test_an_answer_is_read_in_the_encoding_httpx_would_choose(content_type) -> None:
    """The forwarder reads an answer's text in an encoding worked out once per Content-Type
    (``_text_encoding``): the same as httpx works out for each answer."""
    body = "réponse: ok".encode("utf-16" if content_type and "16" in content_type else "latin-1")
    headers = {} if content_type is None else {"content-type": content_type}
    plain = httpx.Response(200, headers=headers, content=body)
    cached = httpx.Response(200, headers=headers, content=body)
    cached.encoding = _text_encoding(content_type)
    assert cached.text == plain.text


def test_the_start_line_names_the_vendors_sites_enable() -> None:
    """"forwarder started: esputnik, rejoiner, remarkety, sendlane" for a site with only
    Sendlane read as if all four were sent to; the lanes of the others stay (they
    dead-letter an old config's rows) but are not announced."""
    site = types.SimpleNamespace(vendors={"sendlane": object()})
    settings = types.SimpleNamespace(server=types.SimpleNamespace(hold_days=7),
                                     sites={"shop1": site})
    forwarder = Forwarder(settings, store=None, options=ForwarderOptions(concurrency=8))
    assert forwarder.started_message() == "forwarder started: sendlane, 8 in flight per vendor"
    assert len(forwarder.vendors) == 4
    assert _forwarder().started_message() == "forwarder started: no site enables a vendor"
