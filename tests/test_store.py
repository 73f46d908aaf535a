"""The SQLite store: durability settings, group commit, the writer, its cache, migrations.

The store contract on both backends (identities, carts, held rows, claims meeting facts) is
tests/test_store_backends.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import types

import pytest

from server import vendors
from server.events import Origin, normalise
from server.envelope import Problem
from server.store.base import SessionInfo
from server.store.sqlite import SQLiteStore, migrate, migrations
from server.store.sqlite_writer import configure
from server.vendors._base import VendorRequest

from support import item, migrated_config, settings_for


def event(raw: dict, sc: str | None = "SC-AAAA-0001", source: str = "browser") -> dict:
    origin = Origin(site_id="shop1", source=source, currency="USD", received_ms=1, sc=sc)
    return normalise(raw, "e", origin)


async def open_store(settings) -> SQLiteStore:
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    await store.open()
    return store


async def ingest(store: SQLiteStore, *events: dict):
    return await store.ingest("shop1", list(events), list(events), SessionInfo(user_agent="UA"))


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_wal_full_sync_and_migrations_recorded(tmp_path, writer) -> None:
    settings = settings_for(tmp_path)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, writer=writer)
    await store.open()
    await store.close()
    # Both writers set up their connection with configure(): WAL (kept in the file) and
    # synchronous=FULL (per connection).
    conn = configure(sqlite3.connect(tmp_path / "writer.db", isolation_level=None))
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL
    conn.close()
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        recorded = [r[0] for r in db.execute("SELECT name FROM schema_migrations ORDER BY version")]
        assert recorded[0] == "001_initial.sql"
        assert recorded == [name for _, name, _ in migrations()]
        assert migrate(db) == []  # idempotent


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_concurrent_requests_share_commits_and_all_land(tmp_path, writer) -> None:
    settings = settings_for(tmp_path)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, writer=writer)
    await store.open()
    try:
        batches = [[event({"event": "page_view", "event_id": f"e{i}-{j}"}, sc=f"SC-{i:04d}-XXXX")
                    for j in range(3)] for i in range(200)]
        results = await asyncio.gather(*(store.ingest("shop1", b, b, SessionInfo()) for b in batches))
        # Each request is answered with its own events, though the process writer splits
        # the waiting batches into transactions of TRANSACTION_JOBS.
        assert [[r.event_id for r in rows] for rows in results] == [
            [e["event_id"] for e in b] for b in batches]
        assert len({r.seq for rows in results for r in rows}) == 600
        assert store.commits < 200  # requests were grouped into fewer transactions
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 600
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 200


async def test_stored_json_is_text(tmp_path) -> None:
    """JSON goes to SQLite as UTF-8 bytes cast to TEXT: readers get str, not BLOBs."""
    store = await open_store(settings_for(tmp_path))
    try:
        await ingest(store, event({"event": "add_to_cart", "event_id": "a", "ecommerce": {
            "items": [item(item_name="Mug — blue")]}}))
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        assert db.execute("SELECT typeof(raw), typeof(data) FROM events").fetchone() == (
            "text", "text")
        kind, items = db.execute("SELECT typeof(cart_items), cart_items FROM sessions").fetchone()
    assert kind == "text" and json.loads(items)[0]["item_name"] == "Mug — blue"


def test_migrations_carry_a_database_from_before_003_over(tmp_path) -> None:
    db = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    db.execute("CREATE TABLE schema_migrations "
               "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL)")
    for version, name, sql in migrations()[:2]:  # a database made before 003
        db.executescript(sql)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
    db.execute("INSERT INTO sessions (site_id, sc, first_ms, last_ms) VALUES "
               "('shop1', 'SC-A', 0, 0), ('shop1', 'SC-B', 0, 0), ('shop1', 'SC-C', 0, 0)")
    for seq, sc in [(1, "SC-A"), (2, "SC-B"), (3, "SC-A"), (4, "SC-A"), (5, None)]:
        db.execute("INSERT INTO events (seq, site_id, event_id, name, source, sc, received_ms, "
                   "raw, data) VALUES (?, 'shop1', ?, 'page_view', 'browser', ?, 0, '{}', '{}')",
                   (seq, f"e{seq}", sc))
    db.execute("INSERT INTO carts VALUES ('shop1', 'SC-A', 'G-A', 'USD', '[{\"item_id\":\"1\"}]', 7), "
               "('shop1', 'SC-X', 'G-X', 'EUR', '[]', 9)")  # SC-X: a cart without a session row
    assert migrate(db)[:2] == ["003_session_bounds.sql", "004_cart_in_session.sql"]
    rows = db.execute("SELECT sc, first_seq, last_seq, cart_guid, cart_currency, cart_items, "
                      "cart_updated_ms FROM sessions ORDER BY sc").fetchall()
    assert rows == [("SC-A", 1, 4, "G-A", "USD", '[{"item_id":"1"}]', 7),
                    ("SC-B", 2, 2, None, None, None, None),
                    ("SC-C", None, None, None, None, None, None),
                    ("SC-X", None, None, "G-X", "EUR", "[]", 9)]
    gone = db.execute("SELECT name FROM sqlite_master WHERE name IN ('events_session', 'carts')")
    assert gone.fetchall() == []


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_browser_bodies_are_read_by_the_writer_and_a_refused_one_fails_alone(
        tmp_path, writer) -> None:
    """Bodies of one group commit: each is read on its own; a refused one gets its Problem."""
    from server.envelope import BrowserFacts, Problem

    settings = settings_for(tmp_path)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, writer=writer)
    await store.open()
    origin = settings.sites["shop1"].origins[0]

    def body(events: list, sc: str | None = "SC-AAAA-0001", site_id: str = "shop1") -> bytes:
        return json.dumps({"site_id": site_id, "sc": sc, "events": events}).encode()

    facts = BrowserFacts(origin, None, "UA", 1)
    try:
        answers = await asyncio.gather(
            store.ingest_browser(body([{"event": "page_view", "event_id": "good"}]), facts),
            store.ingest_browser(body([{"event": "page_view"}]), facts),
            store.ingest_browser(body([{"event": "page_view", "event_id": "x"}], site_id="nope"),
                                 facts),
            store.ingest_browser(b"{not json", facts),
            store.ingest_browser(body([{"event": "page_view", "event_id": "new-visitor"}],
                                      sc=None), facts._replace(cookie_sc="SC-COOKIE-0002")),
            store.ingest_browser(body([{"event": "page_view", "event_id": "y"}]),
                                 facts._replace(origin="https://evil.example")))
        assert store.commits < len(answers)  # they shared a group commit
    finally:
        await store.close()
    good, no_id, unknown_site, not_json, from_cookie, wrong_origin = answers
    assert good.sc == "SC-AAAA-0001" and [r.event_id for r in good.results] == ["good"]
    assert no_id == Problem(422, "invalid_event", "events[0].event_id", no_id.problem)
    assert (unknown_site.status, unknown_site.field) == (404, "site_id")
    assert (not_json.status, not_json.error) == (400, "invalid_json")
    assert from_cookie.sc == "SC-COOKIE-0002"
    assert (wrong_origin.status, wrong_origin.field) == (403, "origin")
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        assert sorted(r[0] for r in db.execute("SELECT event_id FROM events")) == [
            "good", "new-visitor"]


def test_a_transaction_of_the_writer_process_stops_at_the_batch_reaching_its_limit() -> None:
    from server.store.sqlite_writer import _take

    frames = [(1, ["a"] * 8), (2, ["b"] * 5), (3, ["c"] * 8), (4, ["d"] * 2)]  # (id, jobs)
    assert _take(frames, 16) == (frames[:3], frames[3:])  # 8 + 5 + 8: the third reaches 16
    assert _take(frames, 8) == (frames[:1], frames[1:])
    assert _take(frames, 100) == (frames, [])
    assert _take([(9, ["a"] * 40)], 16) == ([(9, ["a"] * 40)], [])  # a frame is never split


def test_the_writer_process_keeps_frames_in_order_and_a_bad_frame_fails_alone(tmp_path) -> None:
    """Frames sent a few at a time, some while a transaction commits: each is answered under
    its own id, a session's events are stored in the order sent, and a frame whose jobs
    can't be read fails alone."""
    import os
    import pickle
    import select
    import subprocess
    import sys
    import time

    from server.envelope import BrowserFacts
    from server.store.base import JobFailure
    from server.store.writer_process import _FRAME, encode_frame
    from support import ORIGIN, beacon

    settings = settings_for(tmp_path)
    path = str(tmp_path / "onetag.db")
    writer = subprocess.Popen([sys.executable, "-P", "-m", "server.store.sqlite_writer"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    replies: dict[int, object] = {}
    buffer = b""

    def read_replies(count: int) -> None:
        nonlocal buffer
        while len(replies) < count:
            assert select.select([writer.stdout], [], [], 30)[0], "the writer answered nothing"
            buffer += os.read(writer.stdout.fileno(), 1 << 16)
            while len(buffer) >= _FRAME.size:
                size, frame_id = _FRAME.unpack_from(buffer)
                if len(buffer) < _FRAME.size + size:
                    break
                replies[frame_id] = pickle.loads(buffer[_FRAME.size:_FRAME.size + size])[1]
                buffer = buffer[_FRAME.size + size:]

    facts = BrowserFacts(ORIGIN, None, "UA", 1)

    def cart_event(n: int) -> tuple[str, tuple]:
        body = beacon([{"event": "add_to_cart", "event_id": f"e{n:03d}",
                        "ecommerce": {"items": [item(f"SKU-{n}")]}}], sc="SC-READ-AHEAD-1")
        return ("ingest_browser", (body, facts, f"r{n}"))

    try:
        writer.stdin.write(encode_frame(0, (path, dict(settings.sites), 86_400_000, 0)))
        writer.stdin.flush()
        read_replies(1)
        assert replies.pop(0) == "ready"
        frames = {i: [cart_event(i * 4 + j) for j in range(4)] for i in range(1, 31)}
        frames[7] = ["not a job"]  # unpacks to no (op, args): this frame alone fails
        for i, jobs in frames.items():  # a few at a time: some come while one commits
            writer.stdin.write(encode_frame(i, jobs))
            writer.stdin.flush()
            if i % 3 == 0:
                time.sleep(0.002)
        read_replies(30)
    finally:
        writer.stdin.close()
        writer.wait(10)
    assert replies.pop(7) == JobFailure("writer", "unreadable frame")
    for i, answers in replies.items():
        assert [rows[0][0] for _, rows, *_ in answers] == [f"e{i * 4 + j:03d}" for j in range(4)]
    with sqlite3.connect(path) as db:
        stored = [row[0] for row in db.execute("SELECT event_id FROM events ORDER BY seq")]
        [(cart,)] = db.execute("SELECT cart_items FROM sessions")
    assert stored == [f"e{n:03d}" for n in range(4, 124) if not 28 <= n < 32]
    assert len(json.loads(cart)) == len(stored)


def _cart_lines(view: dict) -> list[tuple[str, int]]:
    return [(line["item_id"], line["quantity"]) for line in view["cart"]["items"]]


async def test_a_failed_request_leaves_no_trace_in_the_writers_session_cache(tmp_path) -> None:
    """The writer keeps sessions between batches; a request rolled back must not stay in them."""
    store = await open_store(settings_for(tmp_path))
    try:
        await ingest(store, event({"event": "add_to_cart", "event_id": "1",
                                   "ecommerce": {"items": [item("A")]}}))
        bad = event({"event": "add_to_cart", "event_id": "2", "ecommerce": {"items": [item("B")]}})
        bad["source"] = object()  # fails when its row is written, after its cart was applied
        good = event({"event": "add_to_cart", "event_id": "3", "ecommerce": {"items": [item("C")]}})
        outcome = await asyncio.gather(ingest(store, bad), ingest(store, good))
        assert isinstance(outcome[0], Problem) and isinstance(outcome[1], list)
        await ingest(store, event({"event": "add_to_cart", "event_id": "4",
                                   "ecommerce": {"items": [item("A")]}}))
        view = await store.session_view("shop1", "SC-AAAA-0001")
    finally:
        await store.close()
    assert _cart_lines(view) == [("A", 2), ("C", 1)]


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_second_writer_on_the_same_file_is_seen(tmp_path, writer) -> None:
    """Another connection's commit (a second server, a CLI) empties the session cache."""
    settings = settings_for(tmp_path)
    first = SQLiteStore(settings.server.sqlite_path, settings.sites, writer=writer)
    second = SQLiteStore(settings.server.sqlite_path, settings.sites, writer="thread")
    await first.open()
    await second.open()
    try:
        for store, sku, event_id in [(first, "A", "1"), (second, "B", "2"), (first, "A", "3")]:
            await ingest(store, event({"event": "add_to_cart", "event_id": event_id,
                                       "ecommerce": {"items": [item(sku)]}}))
        view = await first.session_view("shop1", "SC-AAAA-0001")
    finally:
        await first.close()
        await second.close()
    assert _cart_lines(view) == [("A", 2), ("B", 1)]
    assert view["session"]["last_seq"] == 3


@pytest.mark.parametrize("catch_up", [False, True])
def test_the_writer_catches_up_after_a_checkpoint_so_the_wal_starts_over(
        tmp_path, catch_up) -> None:
    """A passive pass leaves what was committed while it ran; SQLite starts the WAL over
    only when a write transaction begins with every frame copied. Without the writer's
    catch-up the WAL grows by every transaction under steady load; with it, it is reused."""
    import os

    from server.store.sqlite_writer import Checkpointer

    path = str(tmp_path / "wal.db")
    conn = configure(sqlite3.connect(path, isolation_level=None))
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (x BLOB)")

    def commit(rows: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t VALUES (zeroblob(3000))", [()] * rows)
        conn.execute("COMMIT")

    commit(20)
    # A commit lands while the checkpointer's pass runs: a reader's snapshot from before it
    # keeps the pass from copying it, as the pass's own start would.
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchall()
    commit(20)
    checkpointer = Checkpointer(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    checkpointer.passed.set()  # what the thread does after its pass
    reader.execute("COMMIT")
    if catch_up:
        checkpointer.catch_up(conn)
    size = os.path.getsize(path + "-wal")
    commit(5)
    if catch_up:  # started over: the next transaction's pages overwrite the file's first ones
        assert os.path.getsize(path + "-wal") == size
        assert not checkpointer.passed.is_set()
    else:
        assert os.path.getsize(path + "-wal") > size
    for c in (other, reader, conn):
        c.close()


def test_the_frame_reader_puts_together_frames_larger_than_one_read() -> None:
    """The writer reads its pipe READ_BYTES at a time: a frame of a 1 MiB body spans many
    reads, and the small frames around it still come out whole, in order, with their ids."""
    import os
    import threading

    from server.store.writer_process import READ_BYTES, FrameReader, encode_frame

    big = b"x" * (1024 * 1024 + 17)
    frames = [(1, [("ingest_browser", (b"{}",))]), (2, [("ingest_browser", (big,))]),
              (3, [("ping", ())])]
    data = b"".join(encode_frame(i, message) for i, message in frames)
    assert len(data) > 10 * READ_BYTES
    read_end, write_end = os.pipe()

    def write() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    reader, got = FrameReader(read_end), []
    while chunk := reader.next():
        got += chunk
    writer.join()
    os.close(read_end)
    assert got == frames


def test_the_session_cache_forgets_the_least_recently_used() -> None:
    from server.store.sqlite_ingest import SessionCache, _Session

    cache = SessionCache(limit=2)
    for sc in ("a", "b", "c"):
        cache.sessions[("shop1", sc)] = _Session(None, 0)
    cache.trim()
    assert list(cache.sessions) == [("shop1", "b"), ("shop1", "c")]


def _held_vendor() -> types.ModuleType:
    """A vendor that can only take product views for a known email."""
    module = types.ModuleType("heldvendor")
    module.NAME = "heldvendor"
    module.SETTINGS = ()
    module.DEFAULT_ROUTES = {"view_item": "server", "identify": "server"}

    def plan(event, ctx):
        email = (event.get("identity") or {}).get("email")
        if event["name"] == "identify":
            return [VendorRequest("POST", "http://v/customer", {"email": email}, f"c:{email}")]
        return [VendorRequest("POST", "http://v/view", {"email": email,
                              "sku": event["ecommerce"]["items"][0]["item_id"]},
                              f"v:{event['event_id']}", needs_email=True)]

    module.plan = plan
    module.auth_headers = lambda cfg: {}
    return module


@pytest.fixture
def held_vendor(monkeypatch):
    monkeypatch.setitem(vendors.VENDORS, "heldvendor", _held_vendor())


async def test_anonymous_activity_is_held_then_released_on_identify(tmp_path, held_vendor) -> None:
    settings = settings_for(tmp_path, heldvendor={})
    store = await open_store(settings)
    try:
        await ingest(store, event({"event": "view_item", "event_id": "v1", "ecommerce": {"items": [item("A")]}}))
        await ingest(store, event({"event": "view_item", "event_id": "v2", "ecommerce": {"items": [item("B")]}}))
        held = await store.list_deliveries(state="held")
        assert sorted(d["dedup_key"] for d in held) == ["v:v1", "v:v2"]
        await ingest(store, event({"event": "identify", "event_id": "i", "user": {"email": "a@b.co"}}))
        pending = await store.list_deliveries(state="pending")
    finally:
        await store.close()
    assert await_nothing_held(tmp_path)
    keys = [d["dedup_key"] for d in reversed(pending)]
    assert keys == ["c:a@b.co", "v:v1", "v:v2"]  # the customer first, then what waited, in order
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        bodies = [r[0] for r in db.execute("SELECT request FROM deliveries WHERE dedup_key LIKE 'v:%'")]
    assert all('"email":"a@b.co"' in body for body in bodies)


def await_nothing_held(tmp_path) -> bool:
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        return db.execute("SELECT count(*) FROM deliveries WHERE state = 'held'").fetchone()[0] == 0


async def test_held_rows_past_the_window_expire_instead(tmp_path, held_vendor) -> None:
    settings = settings_for(tmp_path, heldvendor={})
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, hold_ms=0)
    await store.open()
    try:
        await ingest(store, event({"event": "view_item", "event_id": "v1", "ecommerce": {"items": [item("A")]}}))
        await asyncio.sleep(0.01)
        await ingest(store, event({"event": "identify", "event_id": "i", "user": {"email": "a@b.co"}}))
        states = {d["dedup_key"]: d["state"] for d in await store.list_deliveries()}
    finally:
        await store.close()
    assert states == {"v:v1": "expired", "c:a@b.co": "pending"}


def purchase(order: str, source: str, loaded: list[str] | None = None) -> dict:
    raw = {"event": "purchase", "event_id": f"{source}-{order}", "user": {"email": "a@b.co"},
           "ecommerce": {"transaction_id": order, "value": 4.35, "items": [item("A", 4.35)]}}
    if loaded is not None:
        raw["loaded"] = loaded
    return event(raw, sc=None if source == "backend" else "SC-AAAA-0001", source=source)


async def test_an_order_from_backend_and_browser_reaches_a_fallback_vendor_once(tmp_path) -> None:
    """Rejoiner takes purchases in the page (sendConversion) and from the server only as a
    fallback: whichever copy of an order comes first, exactly one convert is sent or done.

    The browser's copy is a claim and the backend's a fact (docs/security.md): each has its
    own row under the key, and a claim cancels the fact only when it is the same order (id,
    email, value) and the vendor's library took it before the fact was tried."""
    settings = settings_for(tmp_path, rejoiner={"site_id": "ABC1234", "api_key": "k"})
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, browser_grace_ms=600_000)
    await store.open()
    try:
        # Backend first: its copy waits out the grace; the browser's copy then cancels it.
        await ingest(store, purchase("1001", "backend"))
        [due] = [d["next_attempt_ms"] for d in await store.list_deliveries(vendor="rejoiner")]
        assert due >= 1 + 600_000
        await ingest(store, purchase("1001", "browser", loaded=["rejoiner"]))
        # Browser first: recorded as the browser's; the backend copy adds nothing.
        await ingest(store, purchase("1002", "browser", loaded=["rejoiner"]))
        await ingest(store, purchase("1002", "backend"))
        # Already tried by the forwarder when the browser's copy arrives: too late to cancel.
        await ingest(store, purchase("1004", "backend"))
        claimed = await store.claim(now_ms=2**50, lease_ms=1000, limit=10, vendors=["rejoiner"])
        assert [d.dedup_key for d in claimed] == ["convert:1004"]
        await ingest(store, purchase("1004", "browser", loaded=["rejoiner"]))
        # The library failed in the page: this site's orders come from its backend, so the
        # browser's copy is not sent (ignored), and the backend's is.
        await ingest(store, purchase("1003", "browser", loaded=[]))
        await ingest(store, purchase("1003", "backend"))
        # A different order under the same id (another email, another value): the browser's
        # claim blocks nothing, the backend's fact is sent.
        forged = purchase("1005", "browser", loaded=["rejoiner"])
        forged["ecommerce"]["value_minor"] = 1
        await ingest(store, forged)
        await ingest(store, purchase("1005", "backend"))
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        rows = {(key, claim): (state, attempts) for key, claim, state, attempts in db.execute(
            "SELECT dedup_key, claim, state, attempts FROM deliveries WHERE vendor = 'rejoiner'")}
    assert rows == {("convert:1001", 0): ("browser", 0), ("convert:1001", 1): ("browser", 0),
                    ("convert:1002", 1): ("browser", 0), ("convert:1002", 0): ("browser", 0),
                    ("convert:1004", 0): ("pending", 1), ("convert:1004", 1): ("browser", 0),
                    ("convert:1003", 1): ("ignored", 0), ("convert:1003", 0): ("pending", 0),
                    ("convert:1005", 1): ("browser", 0), ("convert:1005", 0): ("pending", 0)}


def test_migration_006_keeps_rows_and_splits_ids_and_keys_by_kind_of_sender(tmp_path) -> None:
    db = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    db.execute("CREATE TABLE schema_migrations "
               "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL)")
    for version, name, sql in [m for m in migrations() if m[0] < 6]:
        for statement in sql.split(";\n"):
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
    for seq, source in [(1, "browser"), (2, "backend")]:
        db.execute("INSERT INTO events (seq, site_id, event_id, name, source, received_ms, raw, "
                   "data) VALUES (?, 'shop1', ?, 'purchase', ?, 0, '{}', '{}')",
                   (seq, f"e{seq}", source))
        db.execute("INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, state, "
                   "request, created_ms, updated_ms, retry_from_ms) VALUES ('shop1', 'rejoiner', ?, "
                   "?, 'v', 'delivered', '{}', 0, 0, 5)", (f"convert:{seq}", seq))
    # (later migrations follow these three)
    assert migrate(db)[:3] == ["006_sources.sql", "007_request_ids.sql", "008_attempts.sql"]
    assert db.execute("SELECT dedup_key, claim, retry_from_ms FROM deliveries ORDER BY id"
                      ).fetchall() == [("convert:1", 1, 5), ("convert:2", 0, 5)]
    # The same id from the other kind of sender is a new event; from the backend again,
    # refused; from a browser, refused in the same session only (migration 015).
    db.execute("INSERT INTO events (site_id, event_id, name, source, received_ms, raw, data) "
               "VALUES ('shop1', 'e1', 'purchase', 'backend', 0, '{}', '{}')")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO events (site_id, event_id, name, source, sc, received_ms, raw, "
                   "data) VALUES ('shop1', 'e2', 'page_view', 'backend', 'SC-1', 0, '{}', '{}')")
    for sc in ("SC-1", "SC-2"):
        db.execute("INSERT INTO events (site_id, event_id, name, source, sc, received_ms, raw, "
                   "data) VALUES ('shop1', 'e1', 'page_view', 'browser', ?, 0, '{}', '{}')", (sc,))
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO events (site_id, event_id, name, source, sc, received_ms, raw, "
                   "data) VALUES ('shop1', 'e1', 'page_view', 'verified browser', 'SC-1', 0, "
                   "'{}', '{}')")
    indexes = [row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events' "
        "AND sql NOT LIKE '%WHERE source = ''backend'' AND name = ''purchase''%' "
        "AND sql NOT LIKE '%WHERE sc IS NULL AND identity_id IS NULL%'")]
    # Still one index every event pays for (012's and 019's are partial: 019's holds only
    # events with neither a session nor an identity, backfilled history).
    assert indexes == ["events_id"]


async def test_a_schema_that_does_not_fit_the_code_is_a_503_never_a_422(tmp_path) -> None:
    """The database changed under a running writer (a column this code writes renamed, as
    a downgrade or a hand-made change leaves it): SQLite's "no such column" is the store
    failing, a 503 the browser keeps its events for and resends, never a 422 that has them
    dropped. Once the schema fits again the same events are taken."""
    from server.store.base import StoreUnavailable

    settings = settings_for(tmp_path)
    store = await open_store(settings)
    try:
        await ingest(store, event({"event": "page_view", "event_id": "before"}))
        with sqlite3.connect(tmp_path / "onetag.db") as db:
            db.execute("ALTER TABLE events RENAME COLUMN received_ms TO received_at")
        during = event({"event": "page_view", "event_id": "during"})
        with pytest.raises(StoreUnavailable, match="received_ms"):
            await ingest(store, during)
        with sqlite3.connect(tmp_path / "onetag.db") as db:
            db.execute("ALTER TABLE events RENAME COLUMN received_at TO received_ms")
        answer = await ingest(store, during)
        assert answer[0].event_id == "during" and not answer[0].duplicate
    finally:
        await store.close()


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_database_a_newer_onetag_migrated_is_refused_saying_so(tmp_path,
                                                                      writer) -> None:
    """An older onetag (a downgrade) opening a database a newer one migrated: it does not
    run against a schema it does not know, it says which migration and what to run."""
    settings = settings_for(tmp_path)
    store = await open_store(settings)
    await store.close()
    with sqlite3.connect(tmp_path / "onetag.db") as db:  # recorded with no declaration
        db.execute("INSERT INTO schema_migrations (version, name, applied_ms) "
                   "VALUES (999, '999_future.sql', 0)")
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, writer=writer)
    with pytest.raises(Exception, match="999_future.sql.*newer onetag"):
        await store.open()  # (the process writer's: WriterStartFailed, saying the same)
    with sqlite3.connect(tmp_path / "onetag.db") as db, pytest.raises(Exception,
                                                                       match="999_future.sql"):
        migrate(db)


def test_serve_and_migrate_refuse_a_database_a_newer_onetag_migrated(tmp_path, capsys,
                                                                      monkeypatch) -> None:
    """Said in one line (exit 2 and 1), never a traceback from the app's start."""
    from server import cli

    monkeypatch.chdir(tmp_path)
    config = migrated_config(tmp_path)
    with sqlite3.connect(tmp_path / "onetag.db") as db:  # declared: breaks
        db.execute("INSERT INTO schema_migrations VALUES (999, '999_future.sql', 0, 999)")
    capsys.readouterr()
    assert cli.main(["serve", "--config", str(config), "--port", "22101"]) == 2
    said = capsys.readouterr().err
    assert "999_future.sql" in said and "newer onetag" in said and "Traceback" not in said
    assert cli.main(["migrate", "--config", str(config)]) == 1
    assert "999_future.sql" in capsys.readouterr().err
