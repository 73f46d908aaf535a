"""Wrong secrets are bounded per client address across every node on one database and
across restarts: the console's login, the metrics token, the sites' api keys, feed tokens
and the Remarkety coupon key. Each node used to count in its own memory, so N nodes (or a
restart) gave an attacker N times the guesses; the feed token and the coupon key had no
bound at all."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import httpx

from console_support import ADMIN_TOKEN, SECRETS, console_settings, login
from server.admin import auth
from support import running

API = "/api/v1/sites/shop1/events"
EVENT = {"event": "identify", "user": {"email": "a@b.co"}}
FEED = "/feeds/shop1/products.xml"
COUPONS = "/remarkety/shop1/discounts"


@contextlib.asynccontextmanager
async def two_nodes(settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two apps (two `onetag serve` nodes) on one database, one client each, from the
    same address."""
    async with running(settings) as (_, one), running(settings) as (_, two):
        yield one, two


async def test_the_store_keeps_wrong_guesses_for_every_node_and_prunes_them(backend, tmp_path):
    settings = backend.settings(tmp_path)
    store = await backend.open(settings)
    try:
        assert await store.guess_failures("login", "10.0.0.1", 0) == []
        assert await store.guess_failed("login", "10.0.0.1", 1_000, 60_000) == [1_000]
        assert await store.guess_failed("login", "10.0.0.2", 2_000, 60_000) == [2_000]
        assert await store.guess_failed("api_key", "10.0.0.1", 3_000, 60_000) == [3_000]
        other = await backend.open(settings)  # another node on the same database
        try:
            assert await other.guess_failed("login", "10.0.0.1", 4_000, 60_000) == [1_000, 4_000]
            assert await other.guess_failures("login", "10.0.0.1", 0) == [1_000, 4_000]
            assert await other.guess_failures("login", "10.0.0.1", 1_000) == [4_000]
        finally:
            await other.close()
        # A minute on: the next wrong guess prunes its bound's rows that left the window.
        assert await store.guess_failed("login", "10.0.0.3", 62_000, 60_000) == [62_000]
        assert await backend.rows("SELECT scope, address, at_ms FROM guess_failures "
                                  "ORDER BY at_ms") == [
            ("api_key", "10.0.0.1", 3_000), ("login", "10.0.0.1", 4_000),
            ("login", "10.0.0.3", 62_000)]
        await store.guesses_cleared("login", "10.0.0.1")
        assert await store.guess_failures("login", "10.0.0.1", 0) == []
        assert await store.guess_failures("api_key", "10.0.0.1", 0) == [3_000]
    finally:
        await store.close()


async def test_console_logins_add_up_across_nodes(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with two_nodes(console_settings(tmp_path, database=backend.database)) as (one, two):
        for client in (one, one, one, two, two):
            assert (await login(client, token="guess")).status_code == 401
        for client in (one, two):  # both nodes refuse the address now, the right token too
            locked = await login(client, token=ADMIN_TOKEN)
            assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60


async def test_wrong_api_keys_add_up_across_nodes_and_outlive_a_restart(backend, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    settings = console_settings(tmp_path, database=backend.database)
    right = {"authorization": f"Bearer {SECRETS['site api_key']}"}
    async with two_nodes(settings) as (one, two):
        for n, client in enumerate((one, two, one, two)):
            wrong = await client.post(API, json=EVENT, headers={"authorization": f"Bearer g{n}"})
            assert wrong.status_code == 403
    async with running(settings) as (_, restarted):
        assert (await restarted.post(API, json=EVENT, headers={
            "authorization": "Bearer g4"})).status_code == 403
        locked = await restarted.post(API, json=EVENT, headers=right)
        assert locked.status_code == 429 and locked.json()["error"] == "too_many_requests"


async def test_wrong_metrics_tokens_add_up_across_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with two_nodes(console_settings(tmp_path)) as (one, two):
        for client in (one, two, one, two, one):
            wrong = await client.get("/metrics", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
        locked = await two.get("/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert locked.status_code == 429


async def test_wrong_feed_tokens_are_bounded_per_address(backend, tmp_path, monkeypatch):
    """A feed token could be guessed without limit (every wrong one a quick 403)."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    token = SECRETS["feed_token"]
    async with two_nodes(console_settings(tmp_path, database=backend.database)) as (one, two):
        for n, client in enumerate((one, two, one, two, one)):
            assert (await client.get(f"{FEED}?token=guess{n}")).status_code == 403
        for client in (one, two):
            locked = await client.get(f"{FEED}?token={token}")
            assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60
            assert locked.json()["errors"][0]["field"] == "token"
            assert token not in locked.text


async def test_wrong_coupon_keys_are_bounded_per_address(tmp_path, monkeypatch):
    """The Remarkety coupon key could be guessed without limit (every wrong one a quick
    403); a call without any key is not a guess."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    key = SECRETS["coupons remarkety_api_key"]
    async with two_nodes(console_settings(tmp_path)) as (one, two):
        for n, client in enumerate((one, two, one, two, one)):
            wrong = await client.post(f"{COUPONS}?remarkety_api_key=guess{n}", json={})
            assert wrong.status_code == 403
        assert (await one.post(COUPONS, json={})).status_code == 401
        locked = await two.post(f"{COUPONS}?remarkety_api_key={key}", json={})
        assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60
        body = locked.json()
        assert body["is_success"] is False
        assert body["error_message"].startswith("remarkety_api_key: too many wrong keys")


def test_the_throttle_takes_the_larger_count_of_its_own_and_the_shared_one():
    throttle = auth.LoginThrottle(max_failures=3, window_s=60, delay_s=0)
    throttle.failed("a", now=10)
    throttle.merge("a", [1.0, 5.0, 10.0], now=11)  # two more by other nodes
    assert throttle.retry_after("a", now=12) == 49
    throttle.merge("a", [10.0], now=13)  # a stale answer never lowers what is counted here
    assert throttle.retry_after("a", now=14) == 47
    throttle.merge("a", [0.0, 1.0, 2.0], now=61)  # all outside the window
    assert throttle.retry_after("a", now=61) == 0


async def test_concurrent_guesses_on_one_node_get_no_more_than_the_bound(tmp_path, monkeypatch):
    """The database is asked before the compare; the last look is the process's own count,
    with no wait between it and counting the wrong key, so a burst can't slip past."""
    import asyncio

    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (_, client):
        answers = await asyncio.gather(*(client.post(
            API, json=EVENT, headers={"authorization": f"Bearer g{n}"}) for n in range(20)))
    assert sorted(a.status_code for a in answers) == [403] * 5 + [429] * 15


# Guesses never take what events need (review: 4,000 wrong keys from distinct IPv6
# addresses, each one store write on the ingest queue, got half of another address's
# right-key posts 503) ----------------------------------------------------------------------

def _small_queue(settings: Any, writes: int) -> Any:
    import dataclasses

    return dataclasses.replace(settings, server=dataclasses.replace(
        settings.server, max_pending_writes=writes))


def _from(app: Any, client: httpx.AsyncClient, host: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 40000)),
                             base_url=client.base_url)


async def test_a_flood_of_one_off_wrong_keys_writes_nothing_and_takes_no_event_slot(
        backend, tmp_path, monkeypatch):
    """400 wrong keys at once, each from its own IPv6 /64, beside 20 right-key posts from
    the shop's backend, with room for only 50 writes in the queue: every right-key post is
    accepted, and a one-off wrong guess costs no write at all."""
    import asyncio

    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    settings = _small_queue(backend.settings(tmp_path), 50)
    right = {"authorization": "Bearer secret-key-0123456789"}
    async with running(settings) as (app, client):
        async with contextlib.AsyncExitStack() as stack:
            guessers = [await stack.enter_async_context(_from(app, client, f"2001:db8:{n:x}::1"))
                        for n in range(400)]
            shop = await stack.enter_async_context(_from(app, client, "10.0.0.7"))
            tasks = []
            for n, guesser in enumerate(guessers):
                tasks.append(guesser.post(API, json=EVENT, headers={
                    "authorization": f"Bearer wrong-key-{n}"}))
                if n % 20 == 10:
                    tasks.append(shop.post(API, json={**EVENT, "event_id": f"e{n}"},
                                           headers=right))
            answers = await asyncio.gather(*tasks)
        statuses = [a.status_code for a in answers]
        assert statuses.count(202) == 20, statuses
        assert statuses.count(403) == 400
    assert await backend.rows("SELECT count(*) FROM guess_failures") == [(0,)]


async def test_an_address_is_written_once_it_guesses_again(backend, tmp_path, monkeypatch):
    """One wrong guess is counted in the process only; the second from the same address
    writes both, so the other nodes see them."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(backend.settings(tmp_path)) as (app, client):
        wrong = {"authorization": "Bearer wrong-key-0000000000"}
        assert (await client.post(API, json=EVENT, headers=wrong)).status_code == 403
        assert await backend.rows("SELECT count(*) FROM guess_failures") == [(0,)]
        assert (await client.post(API, json=EVENT, headers=wrong)).status_code == 403
        assert await backend.rows("SELECT count(*) FROM guess_failures") == [(2,)]


async def test_guess_writes_never_count_against_the_ingest_queue(backend, tmp_path):
    """Guess writes queued with the events' must not make an event 503: they have a small
    budget of their own, and beyond it (or with the queue busy) they are refused, to be
    counted in the process only."""
    import asyncio

    from server.store.base import SessionInfo, StoreUnavailable

    settings = backend.settings(tmp_path)
    store = await backend.open(settings, max_pending_writes=4)
    try:
        event = {"event": "identify", "event_id": "e1", "user": {"email": "a@b.co"}}
        guesses = [store.guess_failed("api_key:shop1", f"10.0.0.{n}", 1_000, 60_000)
                   for n in range(10)]
        answers = await asyncio.gather(
            *guesses, store.ingest("shop1", [event], [event], SessionInfo(user_agent="UA")),
            return_exceptions=True)
        assert not isinstance(answers[-1], BaseException), answers[-1]
        for answer in answers[:-1]:
            assert isinstance(answer, (list, StoreUnavailable)), answer
    finally:
        await store.close()


def _count_calls(monkeypatch, store, name: str, calls: list) -> None:
    """Each call of the real ``store.<name>`` appended to ``calls`` (its arguments)."""
    original = getattr(store, name)

    async def counted(*args, **kwargs):
        calls.append(args)
        return await original(*args, **kwargs)
    monkeypatch.setattr(store, name, counted)


async def test_guess_writes_are_capped_per_second_and_counted_locally_beyond(tmp_path,
                                                                             monkeypatch):
    """Past the process's budget of guess writes a second, a guess is counted in the process
    (the address is still refused after five) and written at its next guess with room."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    monkeypatch.setattr(auth, "GUESS_WRITES_PER_S", 3)
    monkeypatch.setattr(auth.GuessBudget, "clock", staticmethod(lambda: 100.0))  # no refill
    written = []
    async with running(console_settings(tmp_path)) as (app, client):
        _count_calls(monkeypatch, app.state.store, "guess_failed", written)
        async with contextlib.AsyncExitStack() as stack:
            guessers = [await stack.enter_async_context(_from(app, client, f"10.0.1.{n}"))
                        for n in range(10)]
            for _ in range(5):
                for guesser in guessers:
                    assert (await guesser.post(API, json=EVENT, headers={
                        "authorization": "Bearer wrong-key-0000000000"})).status_code == 403
            for guesser in guessers:
                locked = await guesser.post(API, json=EVENT, headers={
                    "authorization": f"Bearer {SECRETS['site api_key']}"})
                assert locked.status_code == 429
    assert len(written) == 3


async def test_guess_reads_are_capped_per_second_and_answered_locally_beyond(
        backend, tmp_path, monkeypatch, caplog):
    """Review: every guess from an address not found clear within ``RECHECK_S`` read the
    store, so wrong keys from many distinct addresses cost one read a request (their writes
    were bounded). Past the process's budget of guess reads a second the process's own count
    answers: 30 one-off guessers read at most the budget, the shop's right key still gets
    in, one address is still refused after five wrong keys, and the log says so once."""
    import logging

    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    monkeypatch.setattr(auth, "GUESS_READS_PER_S", 5)
    monkeypatch.setattr(auth.GuessBudget, "clock", staticmethod(lambda: 100.0))  # no refill
    caplog.set_level(logging.WARNING, logger="onetag.auth")
    reads = []
    wrong = {"authorization": "Bearer wrong-key-0000000000"}
    right = {"authorization": "Bearer secret-key-0123456789"}
    async with running(backend.settings(tmp_path)) as (app, client):
        _count_calls(monkeypatch, app.state.store, "guess_failures", reads)
        async with contextlib.AsyncExitStack() as stack:
            guessers = [await stack.enter_async_context(_from(app, client, f"10.0.2.{n}"))
                        for n in range(30)]
            for guesser in guessers:
                assert (await guesser.post(API, json=EVENT, headers=wrong)).status_code == 403
            assert len(reads) == 5
            shop = await stack.enter_async_context(_from(app, client, "10.0.0.7"))
            assert (await shop.post(API, json=EVENT, headers=right)).status_code == 202
            one = guessers[0]
            for _ in range(4):
                assert (await one.post(API, json=EVENT, headers=wrong)).status_code == 403
            locked = await one.post(API, json=EVENT, headers=right)
            assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60
    assert len(reads) == 5
    said = [r for r in caplog.records if "reads a second" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


async def test_ipv6_addresses_are_counted_per_64(tmp_path, monkeypatch):
    """Every IPv6 /128 was its own address: one host has billions. A /64 is one address
    (as an IPv4 address is); another /64 is another."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (app, client):
        async with contextlib.AsyncExitStack() as stack:
            same = [await stack.enter_async_context(_from(app, client, f"2001:db8:1:2::{n:x}"))
                    for n in range(1, 7)]
            other = await stack.enter_async_context(_from(app, client, "2001:db8:1:3::1"))
            for guesser in same[:5]:
                assert (await guesser.post(API, json=EVENT, headers={
                    "authorization": "Bearer wrong-key-0000000000"})).status_code == 403
            right = {"authorization": f"Bearer {SECRETS['site api_key']}"}
            assert (await same[5].post(API, json=EVENT, headers=right)).status_code == 429
            assert (await other.post(API, json=EVENT, headers=right)).status_code == 202
    assert auth.guess_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert auth.guess_address("192.0.2.7") == "192.0.2.7"
    assert auth.guess_address("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert auth.guess_address("unknown") == "unknown"


async def test_wrong_keys_for_one_site_never_lock_another_sites_key(backend, tmp_path,
                                                                     monkeypatch):
    """One bound for every site's api key: five wrong keys for site b from a shared egress
    got site a's right key 429 from that address. Each site's secret is its own bound."""
    from server import config

    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    data = {"server": {"database": backend.database, "public_url": "https://d.example",
                       "forward": False},
            "sites": [{"id": "a", "origins": ["https://a.example"], "api_key": "site-a-key-0123456789",
                       "feed_token": "feed-a-token-0123456789"},
                      {"id": "b", "origins": ["https://b.example"], "api_key": "site-b-key-0123456789",
                       "feed_token": "feed-b-token-0123456789"}]}
    async with running(config.parse(data, env={})) as (_, client):
        for n in range(5):
            assert (await client.post("/api/v1/sites/b/events", json=EVENT, headers={
                "authorization": f"Bearer wrong-key-{n}"})).status_code == 403
            assert (await client.get(f"/feeds/b/products.xml?token=guess{n}")).status_code == 403
        assert (await client.post("/api/v1/sites/a/events", json=EVENT, headers={
            "authorization": "Bearer site-a-key-0123456789"})).status_code == 202
        assert (await client.get("/feeds/a/products.xml?token=feed-a-token-0123456789")
                ).status_code == 200
        assert (await client.post("/api/v1/sites/b/events", json=EVENT, headers={
            "authorization": "Bearer site-b-key-0123456789"})).status_code == 429
        assert (await client.get("/feeds/b/products.xml?token=feed-b-token-0123456789")
                ).status_code == 429


async def test_the_admin_token_is_one_bound_at_the_login_and_metrics(tmp_path, monkeypatch):
    """The admin token was guarded by two bounds (login, metrics), five a minute each, and a
    right /metrics scrape cleared its count: one secret, one bound, and a scrape clears
    nothing (a guesser sharing the scraper's address would be reset every scrape)."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    right = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with running(console_settings(tmp_path)) as (_, client):
        for _ in range(2):
            assert (await login(client, token="guess")).status_code == 401
        for _ in range(2):
            assert (await client.get("/metrics", headers={
                "authorization": "Bearer guess"})).status_code == 401
        assert (await client.get("/metrics", headers=right)).status_code == 200
        assert (await client.get("/metrics", headers={
            "authorization": "Bearer guess"})).status_code == 401
        assert (await client.get("/metrics", headers=right)).status_code == 429
        assert (await login(client, token=ADMIN_TOKEN)).status_code == 429


async def test_check_is_the_one_guess_every_handler_makes(monkeypatch):
    """``SharedThrottle.check``: a wrong secret (or none, or no expected one) is counted
    and answered late; a right one is not counted; over the bound the secret isn't
    compared and the wait is given. ``client_address`` names a request's client."""
    monkeypatch.setattr(auth.SharedThrottle, "delay_s", 0)
    throttle = auth.SharedThrottle(None, "test")
    assert await throttle.check("192.0.2.1", "right", "right", "s1") == auth.Guess(0, True)
    for given, expected in [("wrong", "right"), (None, "right"), ("", "right"),
                            ("x", None), ("x", "")]:
        assert await throttle.check("192.0.2.1", given, expected, "s1") == (0, False)
    wait = (await throttle.check("192.0.2.1", "right", "right", "s1")).wait
    assert wait > 0  # the right secret too, once over the bound
    assert await throttle.check("192.0.2.1", "right", "right", "s2") == (0, True)  # per site
    assert await throttle.check("192.0.2.2", "right", "right", "s1") == (0, True)
    assert auth.client_address(type("R", (), {"client": None})()) == "unknown"
    assert auth.client_address(type("R", (), {"client": type("C", (), {"host": "h"})()})()) == "h"
