"""Issue 10: nothing a browser sends, and no fault of the writer, stops intake.

Fast checks of each bound and of the writer's supervision, in-process (the real app and a
real SQLite file; the process writer where the pipe matters). The same properties are
checked against a real ``onetag serve`` in tests/test_faults.py and, over generated input,
in tests/test_bad_input_props.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time

import pytest

from server import events as vocabulary
from server.envelope import Problem
from server.store.base import StoreUnavailable
from server.store.sqlite import SQLiteStore
from server.store.sqlite_writer import check_writable

from support import ORIGIN, beacon, item, running, settings_for

HEADERS = {"content-type": "text/plain", "origin": ORIGIN}


def page_view(event_id: str, **extra) -> dict:
    return {"event": "page_view", "event_id": event_id, **extra}


def stored_ids(tmp_path) -> list[str]:
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        return [row[0] for row in db.execute("SELECT event_id FROM events ORDER BY seq")]


def deep(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"x": value}
    return value


# Each bad input, the field its 422 must name, and a word of the problem.
BAD_EVENTS = [
    ({"page": {"title": "\ud800"}}, "events[0].page.title", "surrogate"),
    ({"ecommerce": {"items": [item(price=vocabulary.MAX_MONEY_MAJOR * 10)]},
      "event": "view_item"}, "events[0].ecommerce.items[0].price", "out of bounds"),
    ({"time": 10**17}, "events[0].time", "at most"),
    ({"time": 5}, "events[0].time", "at least"),
    ({"ecommerce": {"items": [item(quantity=vocabulary.MAX_QUANTITY + 1)]},
      "event": "add_to_cart"}, "events[0].ecommerce.items[0].quantity", "at most"),
    ({"props": deep(vocabulary.MAX_DEPTH + 1)}, "events[0].props", "nests too deep"),
    ({"props": {f"k{i}": i for i in range(vocabulary.MAX_KEYS + 1)}}, "events[0].props", "keys"),
    ({"props": "x" * (vocabulary.MAX_STRING_CHARS + 1)}, "events[0].props", "longer"),
    ({"event": "page_view\n"}, "events[0].event", "not a valid event name"),
    ({"event_id": "id-1\n"}, "events[0].event_id", "[A-Za-z0-9_.:-]{1,128}"),
    ({"event": "identify", "user": {"email": "a/b@example.com"}}, "events[0].user.email",
     "not an email"),
    ({"event": "identify", "user": {"email": "a\x00b@example.com"}}, "events[0].user.email",
     "NUL character"),  # refused in any string, before the email's own pattern
    ({"event": "identify", "user": {"email": "a b@example.com"}}, "events[0].user.email",
     "not an email"),
]


@pytest.mark.parametrize("bad, field, words", BAD_EVENTS, ids=[
    "surrogate", "price", "time-future", "time-past", "quantity", "depth", "keys", "string",
    "name-newline", "id-newline", "email-slash", "email-nul", "email-space"])
async def test_each_bound_is_a_422_naming_the_field_and_intake_goes_on(tmp_path, bad, field,
                                                                       words) -> None:
    async with running(settings_for(tmp_path)) as (_, client):
        refused = await client.post("/e", content=beacon([{**page_view("bad-1"), **bad}]),
                                    headers=HEADERS)
        good = await client.post("/e", content=beacon([page_view("good-1")]), headers=HEADERS)
    assert refused.status_code == 422, refused.text
    problem = refused.json()["errors"][0]
    assert problem["field"].startswith(field) and words in problem["problem"], problem
    assert good.status_code == 204
    assert stored_ids(tmp_path) == ["good-1"]


@pytest.mark.parametrize("text", [
    '{"event": "view_item", "ecommerce": {"items": [{"item_id": "A", "quantity": 1e300000}]}}',
    '{"event": "view_item", "ecommerce": {"items": [{"item_id": "A", "price": 1e-300000}]}}',
    '{"event": "page_view", "n": 1e5000}',
    '{"event": "page_view", "n": ' + "9" * 4400 + '}',
], ids=["quantity-1e300000", "price-1e-300000", "property-1e5000", "integer-4400-digits"])
async def test_numbers_out_of_bounds_are_refused_before_any_conversion(tmp_path, text) -> None:
    body = '{"site_id": "shop1", "events": [' + text[:-1] + ', "event_id": "n-1"}]}'
    async with running(settings_for(tmp_path)) as (_, client):
        started = time.monotonic()
        refused = await client.post("/e", content=body.encode(), headers=HEADERS)
        elapsed = time.monotonic() - started
    assert refused.status_code in (400, 422), refused.text
    assert refused.json()["errors"][0]["field"].startswith(("events[0]", "body"))
    assert elapsed < 5  # not a timing claim: 1e300000 used to take ~9 s in int(Decimal())


@pytest.mark.parametrize("body, status", [
    (b'{"site_id": "shop1", "events": [{"event": "page_view", "event_id": "a", '
     b'"page": {"title": "\xed\xa0\x80"}}]}', 400),  # a surrogate as raw bytes
    (b'{"site_id": "shop1", "events": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
    (b'{"site_id": "shop1", "events": [{"event": "page_view", "event_id": "a", "p": '
     + b'{"x": ' * 1000 + b"1" + b"}" * 1000 + b"}]}", (400, 422)),
    (b'{"site_id": "shop1", "events": [{"event": "page_view", "event_id": "a", "p": '
     + b'{"x": ' * 20 + b"1" + b"}" * 20 + b"}]}", 422),
], ids=["raw-surrogate", "nested-50000", "nested-1000", "nested-20"])
async def test_bodies_that_broke_the_writer_are_refused(tmp_path, body, status) -> None:
    async with running(settings_for(tmp_path)) as (_, client):
        refused = await client.post("/e", content=body, headers=HEADERS)
        good = await client.post("/e", content=beacon([page_view("good-1")]), headers=HEADERS)
    assert refused.status_code in (status if isinstance(status, tuple) else (status,)), refused.text
    assert set(refused.json()) == {"error", "message", "errors"}
    assert good.status_code == 204 and stored_ids(tmp_path) == ["good-1"]


async def test_a_backend_event_out_of_bounds_is_refused(tmp_path) -> None:
    text = ('{"event": "purchase", "transaction_id": "1", "user": {"email": "a@b.co"}, '
            '"ecommerce": {"items": [{"item_id": "A", "quantity": 1e5000}]}}')
    async with running(settings_for(tmp_path)) as (_, client):
        refused = await client.post("/api/v1/sites/shop1/events", content=text.encode(),
                                    headers={"authorization": "Bearer secret-key-0123456789",
                                             "content-type": "application/json"})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "body.ecommerce.items[0].quantity"


def test_sc_with_a_newline_is_replaced_not_echoed(tmp_path) -> None:
    from server.sessions import valid_sc

    assert valid_sc("ABCDEFGH\n") is None and valid_sc("abcdefgh") == "ABCDEFGH"


async def test_a_cart_over_its_line_limit_fails_alone(tmp_path) -> None:
    settings = settings_for(tmp_path, max_cart_lines=3)
    sc = "CART-LIMIT-0001"

    def add(event_id: str, *skus: str, sc: str = sc) -> bytes:
        return beacon([{"event": "add_to_cart", "event_id": event_id,
                        "ecommerce": {"items": [item(s) for s in skus]}}], sc=sc)

    async with running(settings) as (app, client):
        first = await client.post("/e", content=add("a1", "A", "B"), headers=HEADERS)
        # In one group commit: the request that would make 4 lines, and two others.
        answers = await asyncio.gather(
            client.post("/e", content=add("a2", "C", "D"), headers=HEADERS),
            client.post("/e", content=add("b1", "X", sc="OTHER-SESSION-1"), headers=HEADERS),
            client.post("/e", content=add("a3", "C"), headers=HEADERS))
        view = await app.state.store.session_view("shop1", sc)
    assert first.status_code == 204
    assert answers[0].status_code == 422, answers[0].text
    problem = answers[0].json()["errors"][0]
    assert problem["field"] == "events[0].ecommerce.items" and "limit is 3" in problem["problem"]
    assert [a.status_code for a in answers[1:]] == [204, 204]
    assert sorted(line["item_id"] for line in view["cart"]["items"]) == ["A", "B", "C"]
    assert "a2" not in stored_ids(tmp_path)


async def test_a_predicted_event_id_sent_first_blocks_no_other_visitor(tmp_path) -> None:
    """The attacker review's reproduction on ``POST /e``: a site without an api key
    (order_source browser); the attacker sends the id the shop's page will give its buyer's
    purchase, first, from its own sc. The buyer's purchase is stored and planned; the
    buyer's retry of the same beacon is one event still."""
    from server import config

    settings = config.parse({
        "server": {"database": f"sqlite:///{tmp_path}/onetag.db",
                   "public_url": "https://data.shop.example", "forward": False},
        "sites": [{"id": "open", "origins": [ORIGIN],
                   "rejoiner": {"site_id": "ABC1234", "api_key": "k"}}]}, env={})
    attacker = beacon([{"event": "page_view", "event_id": "purchase-5001"}], site_id="open",
                      sc="0C0C0C0C-0000-4000-8000-00000000000C")
    victim = beacon([
        {"event": "identify", "event_id": "vic-id-5001", "user": {"email": "buyer@example.com"}},
        {"event": "purchase", "event_id": "purchase-5001", "ecommerce": {
            "transaction_id": "5001", "currency": "USD", "value": 50,
            "items": [{"item_id": "A", "price": 50, "quantity": 1}]}}],
        site_id="open", sc="0D0D0D0D-0000-4000-8000-00000000000D")
    async with running(settings) as (_, client):
        answers = [await client.post("/e", content=body, headers=HEADERS)
                   for body in (attacker, victim, victim)]
    assert [a.status_code for a in answers] == [204, 204, 204]
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        events = db.execute("SELECT name, sc FROM events WHERE event_id = 'purchase-5001' "
                            "ORDER BY seq").fetchall()
        planned = db.execute("SELECT d.vendor, d.dedup_key, d.state FROM deliveries d JOIN "
                             "events e ON e.seq = d.event_seq WHERE e.name = 'purchase'"
                             ).fetchall()
    assert events == [("page_view", "0C0C0C0C-0000-4000-8000-00000000000C"),
                      ("purchase", "0D0D0D0D-0000-4000-8000-00000000000D")]
    assert planned == [("rejoiner", "convert:5001", "pending")]
    assert stored_ids(tmp_path).count("vic-id-5001") == 1


async def test_a_backend_cart_refusal_names_the_field_as_the_body_was_sent(tmp_path) -> None:
    """A single-object backend body's problems name ``body.*``, an array's ``body[i].*``,
    an ``{"events": [...]}`` body's ``events[i].*``: the store's cart refusal too (it said
    ``events[0]`` for all three)."""
    add = {"event": "add_to_cart", "sc": "CART-LIMIT-0002",
           "ecommerce": {"items": [item(s) for s in "ABCD"]}}
    fields = []
    async with running(settings_for(tmp_path, max_cart_lines=3)) as (_, client):
        for body in (add, [add], {"events": [add]}):
            refused = await client.post("/api/v1/sites/shop1/events", json=body,
                                        headers={"authorization": "Bearer secret-key-0123456789"})
            assert refused.status_code == 422, refused.text
            fields.append(refused.json()["errors"][0]["field"])
    assert fields == ["body.ecommerce.items", "body[0].ecommerce.items",
                      "events[0].ecommerce.items"]


async def test_a_cart_over_its_byte_limit_is_refused(tmp_path) -> None:
    from server.store import sqlite_ingest

    sc = "CART-BYTES-0001"
    big = "n" * 4000
    async with running(settings_for(tmp_path)) as (_, client):
        answers = []
        for n in range(sqlite_ingest.MAX_CART_BYTES // (4 * 4000) + 2):
            items = [item(f"S{n}-{i}", item_name=big) for i in range(4)]
            answers.append(await client.post("/e", headers=HEADERS, content=beacon(
                [{"event": "add_to_cart", "event_id": f"b{n}", "ecommerce": {"items": items}}],
                sc=sc)))
    assert answers[0].status_code == 204 and answers[-1].status_code == 422
    assert "bytes; the limit is" in answers[-1].json()["errors"][0]["problem"]


def test_config_names_a_bad_cart_limit(tmp_path) -> None:
    from server import config

    with pytest.raises(config.ConfigError) as caught:
        settings_for(tmp_path, max_cart_lines=0)
    assert "sites[shop1].max_cart_lines" in str(caught.value)


# The writer ----------------------------------------------------------------------------------


async def open_process_store(tmp_path, **options) -> SQLiteStore:
    settings = settings_for(tmp_path)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, writer="process", **options)
    await store.open()
    return store


async def until_ready(store: SQLiteStore, seconds: float = 20) -> int:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await store.ping()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def browser_body(event_id: str, sc: str) -> bytes:
    return beacon([page_view(event_id)], sc=sc)


def facts():
    from server.envelope import BrowserFacts

    return BrowserFacts(ORIGIN, None, "UA", int(time.time() * 1000))


async def test_the_writer_runs_onetags_code_whatever_the_directory_holds(tmp_path,
                                                                        monkeypatch) -> None:
    """``onetag serve`` run from a project with a ``server/`` package of its own (a common
    name): ``python -m`` would put that directory first on the writer's path and run the
    shop's module instead of onetag's writer."""
    shop = tmp_path / "shop"
    (shop / "server" / "store").mkdir(parents=True)
    for package in (shop / "server", shop / "server" / "store"):
        (package / "__init__.py").write_text("")
    (shop / "server" / "store" / "sqlite_writer.py").write_text(
        "import time\ntime.sleep(3600)  # the shop's own module, not a writer\n")
    monkeypatch.chdir(shop)
    store = await open_process_store(tmp_path)
    try:
        assert await until_ready(store) == store._writer.pid
        answer = await store.ingest_browser(browser_body("from-shop-dir", "SESSION-0001-X"), facts())
        assert answer.results[0].event_id == "from-shop-dir"
    finally:
        await store.close()


async def test_a_frame_that_cannot_be_sent_fails_only_its_own_request(tmp_path) -> None:
    store = await open_process_store(tmp_path)
    try:
        unpicklable = store._write("ingest", "shop1", [lambda: None], [b"{}"], None)
        good = [store.ingest_browser(browser_body(f"ok-{n}", f"SESSION-{n:04d}-X"), facts())
                for n in range(4)]
        answers = await asyncio.gather(unpicklable, *good)
    finally:
        await store.close()
    assert isinstance(answers[0], Problem) and answers[0].status == 422
    # Each request gets its own answer: its own sc, its own event.
    assert [a.sc for a in answers[1:]] == [f"SESSION-{n:04d}-X" for n in range(4)]
    assert [a.results[0].event_id for a in answers[1:]] == [f"ok-{n}" for n in range(4)]


async def test_a_killed_writer_is_replaced_and_its_requests_get_503(tmp_path) -> None:
    store = await open_process_store(tmp_path)
    try:
        first_pid = await store.ping()
        os.kill(first_pid, signal.SIGKILL)
        answers = await asyncio.gather(
            *(store.ingest_browser(browser_body(f"k-{n}", "KILLED-SESSION-1"), facts())
              for n in range(20)), return_exceptions=True)
        # Each was either committed, or refused as unavailable: never lost, never a 500.
        for answer in answers:
            assert not isinstance(answer, Exception) or isinstance(answer, StoreUnavailable), answer
        second_pid = await until_ready(store)
        assert second_pid != first_pid and store.restarts == 1
        after = await store.ingest_browser(browser_body("after", "KILLED-SESSION-1"), facts())
    finally:
        await store.close()
    committed = [a.results[0].event_id for a in answers if not isinstance(a, Exception)]
    assert set(committed) | {"after"} <= set(stored_ids(tmp_path))
    assert after.results[0].event_id == "after"


async def test_a_stopped_writer_is_killed_after_the_timeout_and_replaced(tmp_path) -> None:
    store = await open_process_store(tmp_path, writer_timeout_s=0.5)
    try:
        pid = await store.ping()
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await store.ingest_browser(browser_body("held", "STOPPED-SESSION"), facts())
            assert caught.value.kind == "writer" and "answered nothing" in caught.value.message
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert await until_ready(store) != pid
    finally:
        await store.close()


async def test_pending_writes_are_bounded(tmp_path) -> None:
    store = await open_process_store(tmp_path, max_pending_writes=3)
    try:
        answers = await asyncio.gather(
            *(store.ingest_browser(browser_body(f"q-{n}", "QUEUE-SESSION-1"), facts())
              for n in range(10)), return_exceptions=True)
    finally:
        await store.close()
    refused = [a for a in answers if isinstance(a, StoreUnavailable)]
    assert len(refused) == 7 and {a.kind for a in refused} == {"queue"}


async def test_the_forwarders_own_writes_do_not_count_against_max_pending_writes(
        tmp_path) -> None:
    """``max_pending_writes = 1`` (the least the config takes) bounds the requests' writes:
    the forwarder's claims, finishes, expiries and prunes (one per lane and task, bounded by
    the forwarder itself) used to count too, so a request beside them was refused 503 and
    the forwarder's own writes logged warnings."""
    from server import config

    assert config.NUMBERS["max_pending_writes"][1] == 1
    store = await open_process_store(tmp_path, max_pending_writes=1)
    try:
        now = int(time.time() * 1000)
        answers = await asyncio.gather(
            *(store.claim(now, 60_000, 10, [vendor]) for vendor in
              ("rejoiner", "remarkety", "esputnik", "sendlane")),
            store.expire_held(now - 1000, now), store.prune_attempts(now - 1000, 100),
            store.prune_coupon_calls(now - 1000, 100), store.finish([], now),
            store.ingest_browser(browser_body("one", "QUEUE-SESSION-2"), facts()),
            return_exceptions=True)
        assert not [a for a in answers if isinstance(a, BaseException)], answers
        # The requests' own writes are still bounded: one waits, the second is refused.
        two = await asyncio.gather(
            *(store.ingest_browser(browser_body(f"two-{n}", "QUEUE-SESSION-3"), facts())
              for n in range(2)), return_exceptions=True)
        assert [type(a).__name__ for a in two].count("StoreUnavailable") == 1
    finally:
        await store.close()


async def test_healthz_names_a_missing_writer(tmp_path) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (app, client):
        healthy = await client.get("/healthz")
        store = app.state.store
        store._writer_exited(store._writer)  # as if it had died: no writer until the restart
        store._restarting.cancel()
        sick = await client.get("/healthz")
    assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
    assert sick.status_code == 503 and sick.json()["problem"] == "writer"


async def test_a_body_that_never_ends_gets_408(tmp_path) -> None:
    settings = settings_for(tmp_path, )
    async with running(settings) as (app, _):
        from server.ingest import Ingest

        ingest = Ingest(settings, app.state.store)
        ingest.body_timeout_s = 0.2
        sent: list[dict] = []

        async def receive() -> dict:
            await asyncio.sleep(3600)
            return {}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/e",
                 "headers": [(b"content-type", b"text/plain")]}
        await ingest.browser_events(scope, receive, send)
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["errors"][0]["field"] == "body"


async def test_body_deadlines_time_out_only_the_slow_read() -> None:
    """One sweep serves every read: the slow one gets 408, the quick ones their bodies, and
    a cancel from outside (the server shutting down) is not taken for a timeout."""
    from server.ingest import BodyDeadlines, HTTPProblem

    deadlines = BodyDeadlines()

    async def never() -> dict:
        await asyncio.sleep(3600)
        return {}

    async def quick() -> dict:
        await asyncio.sleep(0.01)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    # Only the slow read has a short deadline: the others' are long enough that a loaded
    # machine's stall can't expire them before they finish or are cancelled.
    slow = asyncio.ensure_future(deadlines.receive(never, None, 0.2))
    fast = [await deadlines.receive(quick, "2", 30) for _ in range(3)]
    outside = asyncio.ensure_future(deadlines.receive(never, None, 30))
    await asyncio.sleep(0.05)
    outside.cancel()
    with pytest.raises(HTTPProblem) as refused:
        await slow
    with pytest.raises(asyncio.CancelledError):
        await outside
    assert fast == [b"{}"] * 3
    assert refused.value.status == 408 and refused.value.field == "body"
    assert not deadlines._deadlines and not deadlines._expired


def test_serve_refuses_a_database_it_cannot_write(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "Error" in check_writable(str(blocker / "onetag.db"))
    assert check_writable(str(tmp_path / "ok" / "onetag.db")) is None


def test_the_writers_session_cache_keeps_a_bounded_amount_of_carts(tmp_path) -> None:
    from server.envelope import BrowserFacts
    from server.store import sqlite_ingest
    from server.store.sqlite_writer import WriteOps, configure

    settings = settings_for(tmp_path)
    conn = configure(sqlite3.connect(tmp_path / "onetag.db", isolation_level=None))
    ops = WriteOps(conn, settings.sites, 86_400_000, 0)
    ops.cache.cart_bytes_limit = 20_000
    big = "n" * 3000
    for n in range(12):
        body = beacon([{"event": "add_to_cart", "event_id": f"c{n}", "ecommerce": {
            "items": [item(f"S{i}", item_name=big) for i in range(4)]}}], sc=f"CACHE-SESSION-{n:03d}")
        [answer] = ops.run([("ingest_browser", (body, BrowserFacts(ORIGIN, None, None, 0)))])
        assert not isinstance(answer, (Problem, Exception)), answer
    cache = ops.cache
    stored = sum(len(s.cart_items or b"") for s in cache.sessions.values())
    assert cache.cart_bytes == stored <= 20_000 and len(cache.sessions) < 12
    # A cart over PARSED_CART_BYTES is kept as its JSON only.
    assert all(s.cart is sqlite_ingest._UNREAD for s in cache.sessions.values()
               if len(s.cart_items or b"") > sqlite_ingest.PARSED_CART_BYTES)
    # ... and read again when the session's next cart event needs it.
    body = beacon([{"event": "add_to_cart", "event_id": "again",
                    "ecommerce": {"items": [item("S9")]}}], sc="CACHE-SESSION-011")
    ops.run([("ingest_browser", (body, BrowserFacts(ORIGIN, None, None, 0)))])
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        [(items,)] = db.execute("SELECT cart_items FROM sessions WHERE sc = 'CACHE-SESSION-011'")
    assert len(json.loads(items)) == 5
    conn.close()
