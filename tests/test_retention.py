"""``[server] keep_events_days`` on both backends: the forwarder's retention pass prunes
finished deliveries (with their attempts), events no delivery row needs any more and
sessions (with their carts) older than the period, in bounded batches, through indexes;
off by default (server/store/retention.py, docs/config.md, "Retention").
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from typing import Any

import pytest

from server import config
from server import forwarder as forwarder_module
from server.forwarder import Forwarder, ForwarderOptions
from server.metrics import Metrics
from server.store import retention
from server.store.base import SessionInfo

from test_store_backends import event

DAY = 86_400_000
NOW = 1_800_000_000_000
OLD = NOW - 40 * DAY  # past a 30-day period
YOUNG = NOW - DAY


def keeping(settings: config.Settings, days: float) -> config.Settings:
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server,
                                                                    keep_events_days=days))


def forwarder(settings: config.Settings, store: Any) -> Forwarder:
    return Forwarder(settings, store, ForwarderOptions(), clock=lambda: NOW / 1000)


async def add_event(backend: Any, seq: int, received_ms: int, sc: str | None = None,
                    identity_id: int | None = None) -> None:
    await backend.rows(
        "INSERT INTO events (seq, site_id, event_id, name, source, sc, identity_id, "
        "received_ms, raw, data) VALUES (?, 'shop1', ?, 'page_view', 'browser', ?, ?, ?, "
        "'{}', '{}')", seq, f"e{seq}", sc, identity_id, received_ms)


async def add_delivery(backend: Any, id_: int, seq: int, state: str, created_ms: int,
                       updated_ms: int | None = None, attempts: int = 0) -> None:
    await backend.rows(
        "INSERT INTO deliveries (id, site_id, vendor, dedup_key, event_seq, visitor, state, "
        "request, created_ms, updated_ms) VALUES (?, 'shop1', 'sendlane', ?, ?, 'v', ?, "
        "'{\"method\": \"POST\", \"url\": \"https://api.example/x\", \"json\": {}}', ?, ?)",
        id_, f"k{id_}", seq, state, created_ms, created_ms if updated_ms is None else updated_ms)
    for n in range(attempts):
        await backend.rows(
            "INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request) "
            "VALUES (?, ?, ?, 5, '{}')", id_, n + 1, created_ms)


async def add_session(backend: Any, id_: int, sc: str, first_ms: int, last_ms: int,
                      identity_id: int | None = None) -> None:
    await backend.rows(
        "INSERT INTO sessions (id, site_id, sc, identity_id, first_ms, last_ms, cart_guid, "
        "cart_currency, cart_items, cart_updated_ms) VALUES (?, 'shop1', ?, ?, ?, ?, 'G', "
        "'USD', '[]', ?)", id_, sc, identity_id, first_ms, last_ms, last_ms)


async def add_visit(backend: Any, n: int, at: int, state: str, event_seq: int) -> None:
    """Event ``n``, delivery ``n`` (of event ``event_seq``) and session ``n``, all at ``at``."""
    await add_event(backend, n, at, sc=f"SC-{n}")
    await add_delivery(backend, n, event_seq, state, at, attempts=1)
    await add_session(backend, n, f"SC-{n}", at, at)


async def test_off_by_default_nothing_is_pruned(backend) -> None:
    """Existing users upgrade without losing anything: keep_events_days defaults to 0."""
    settings = backend.settings()
    assert settings.server.keep_events_days == 0
    store = await backend.open(settings)
    try:
        await add_visit(backend, 1, OLD, "delivered", 1)
        await add_visit(backend, 2, YOUNG, "pending", 2)
        fwd = forwarder(settings, store)
        assert await fwd.prune_history() == {}
        await fwd.prune()  # the scheduled pass (attempts past keep_attempts_days go)
    finally:
        await store.close()
    assert await backend.rows("SELECT count(*) FROM events") == [(2,)]
    assert await backend.rows("SELECT count(*) FROM deliveries") == [(2,)]
    assert await backend.rows("SELECT count(*) FROM sessions") == [(2,)]


async def test_old_events_go_with_their_finished_deliveries_and_open_ones_keep_theirs(
        backend, caplog) -> None:
    settings = keeping(backend.settings(), 30)
    store = await backend.open(settings)
    try:
        await backend.rows("INSERT INTO identities (id, site_id, email, created_ms, updated_ms) "
                           "VALUES (7, 'shop1', 'ann@example.com', ?, ?)", OLD, OLD)
        # seq: what its deliveries are
        await add_event(backend, 1, OLD, sc="SC-OLD", identity_id=7)  # delivered long ago
        await add_delivery(backend, 1, 1, "delivered", OLD, attempts=2)
        await add_event(backend, 2, OLD)  # pending: retrying (or in flight)
        await add_delivery(backend, 2, 2, "pending", OLD, attempts=1)
        await add_event(backend, 3, OLD)  # held: waits for the visitor's email
        await add_delivery(backend, 3, 3, "held", OLD)
        await add_event(backend, 4, OLD)  # dead: waits for the operator's replay
        await add_delivery(backend, 4, 4, "dead", OLD, attempts=1)
        await add_event(backend, 5, OLD)  # delivered yesterday, after a replay
        await add_delivery(backend, 5, 5, "delivered", OLD, updated_ms=YOUNG)
        await add_event(backend, 6, OLD)  # no delivery at all (a page view)
        await add_event(backend, 7, OLD)  # every other finished state
        for id_, state in ((7, "browser"), (8, "expired"), (9, "ignored")):
            await add_delivery(backend, id_, 7, state, OLD)
        await add_event(backend, 8, OLD)  # one finished, one pending: the event stays
        await add_delivery(backend, 10, 8, "delivered", OLD)
        await add_delivery(backend, 11, 8, "pending", OLD)
        await add_event(backend, 9, YOUNG, sc="SC-NEW")  # within the period
        await add_delivery(backend, 12, 9, "delivered", YOUNG)
        await add_delivery(backend, 13, 0, "delivered", OLD, attempts=1)  # product sync
        await add_delivery(backend, 14, 9, "pending", YOUNG)
        await add_session(backend, 1, "SC-OLD", OLD, OLD, identity_id=7)
        await add_session(backend, 2, "SC-BACK", OLD, YOUNG)  # first seen long ago, back now
        await add_session(backend, 3, "SC-NEW", YOUNG, YOUNG)
        metrics = Metrics(settings, store)
        fwd = Forwarder(settings, store, ForwarderOptions(), clock=lambda: NOW / 1000,
                        metrics=metrics)
        with caplog.at_level(logging.INFO, logger="onetag.forwarder"):
            pruned = await fwd.prune_history()
        assert pruned == {"deliveries": 6, "events": 3, "sessions": 1}
        assert {kind: metrics.registry.get_sample_value("onetag_retention_pruned_total",
                                                        {"kind": kind})
                for kind in pruned} == {"deliveries": 6, "events": 3, "sessions": 1}
        assert ("6 finished deliveries, 3 events and 1 sessions older than 30 days pruned "
                "(keep_events_days)") in caplog.text
        # A dead row's event is still there: the operator's replay sends it again.
        assert await store.replay(NOW, states=("dead",)) == 1
        assert await forwarder(settings, store).prune_history() == {
            "deliveries": 0, "events": 0, "sessions": 0}
    finally:
        await store.close()
    assert await backend.rows("SELECT seq FROM events ORDER BY seq") == [
        (2,), (3,), (4,), (5,), (8,), (9,)]
    assert await backend.rows("SELECT id FROM deliveries ORDER BY id") == [
        (2,), (3,), (4,), (5,), (11,), (12,), (14,)]
    assert await backend.rows("SELECT DISTINCT delivery_id FROM attempts ORDER BY 1") == [
        (2,), (4,)]
    assert await backend.rows("SELECT sc FROM sessions ORDER BY id") == [
        ("SC-BACK",), ("SC-NEW",)]
    # Identities are kept (docs/config.md, "Retention").
    assert await backend.rows("SELECT id FROM identities") == [(7,)]


async def test_a_pass_is_bounded_and_goes_on_past_kept_rows(backend, monkeypatch) -> None:
    """At most PRUNE_BATCHES batches of PRUNE_BATCH rows a pass, each its own transaction;
    events a delivery still needs, at the head of the walk, do not stop it: the walk goes on
    from where the last batch ended, and starts over once it reached the young rows."""
    monkeypatch.setattr(forwarder_module, "PRUNE_BATCH", 4)
    monkeypatch.setattr(forwarder_module, "PRUNE_BATCHES", 2)
    settings = keeping(backend.settings(), 30)
    store = await backend.open(settings)
    try:
        for seq in range(1, 6):  # a head of pending rows, kept
            await add_event(backend, seq, OLD + seq)
            await add_delivery(backend, seq, seq, "pending", OLD + seq)
        for seq in range(6, 21):
            await add_event(backend, seq, OLD + seq)
            await add_delivery(backend, seq, seq, "delivered", OLD + seq)
        await add_event(backend, 21, YOUNG)
        await add_delivery(backend, 21, 21, "pending", YOUNG)
        for id_ in range(1, 12):
            await add_session(backend, id_, f"SC-{id_}", OLD + id_, YOUNG if id_ == 1 else OLD)
        await add_session(backend, 12, "SC-12", YOUNG, YOUNG)
        # The store's batches: never more than the limit, and where the next one starts.
        assert await store.prune_deliveries(NOW - 30 * DAY, 3) == 3
        assert await store.prune_events(NOW - 30 * DAY, 0, 4) == (0, 4)  # 1-4 pending
        assert await store.prune_events(NOW - 30 * DAY, 4, 4) == (3, 8)
        assert await store.prune_events(NOW - 30 * DAY, 21, 4) == (0, None)
        fwd = forwarder(settings, store)
        # Events: 1-4 kept, then 5 kept and 9-11 free; the next pass goes on from 11.
        assert await fwd.prune_history() == {"deliveries": 8, "events": 3, "sessions": 7}
        assert await fwd.prune_history() == {"deliveries": 4, "events": 8, "sessions": 3}
        assert await fwd.prune_history() == {"deliveries": 0, "events": 1, "sessions": 0}
        assert await fwd.prune_history() == {"deliveries": 0, "events": 0, "sessions": 0}
    finally:
        await store.close()
    assert await backend.rows("SELECT seq FROM events ORDER BY seq") == [
        (1,), (2,), (3,), (4,), (5,), (21,)]
    assert await backend.rows("SELECT count(*) FROM deliveries") == [(6,)]
    assert await backend.rows("SELECT id FROM sessions ORDER BY id") == [(1,), (12,)]


async def test_a_pruned_session_comes_back_new_and_the_visitor_view_reads_what_is_left(
        backend) -> None:
    """A visitor whose session was pruned gets a new one on their next event (the SQLite
    writer's session cache forgets the deleted rows); the session view of a pruned visitor
    reads nothing, not an error."""
    store = await backend.open(keeping(backend.settings(), 30))
    try:
        await store.ingest("shop1", [e := event({"event": "page_view", "event_id": "a"},
                                                sc="SC-AAAA-0001")], [e],
                           SessionInfo(user_agent="UA"))
        await store.ingest("shop1", [e := event({"event": "page_view", "event_id": "o"},
                                                sc="SC-OTHER-0002")], [e],
                           SessionInfo(user_agent="UA"))  # the newest session is kept
        future = 10**15  # every session is "older" than this
        assert await store.prune_sessions(future, 0, 100) == (1, None)
        view = await store.session_view("shop1", "SC-AAAA-0001")
        assert view["session"] is None and view["cart"] is None
        await store.ingest("shop1", [e := event({"event": "page_view", "event_id": "b"},
                                                sc="SC-AAAA-0001")], [e],
                           SessionInfo(user_agent="UA"))
        view = await store.session_view("shop1", "SC-AAAA-0001")
        assert view["session"] is not None
        assert [ev["event_id"] for ev in view["events"]] == ["b"]
    finally:
        await store.close()
    assert await backend.rows("SELECT sc FROM sessions ORDER BY id") == [
        ("SC-OTHER-0002",), ("SC-AAAA-0001",)]


async def test_the_pruning_reads_are_index_scans(backend) -> None:
    """On a table of millions: the finished deliveries through deliveries_finished (SQLite
    migration 022, PostgreSQL 038), events and sessions by primary key, each event's
    deliveries through deliveries_event."""
    store = await backend.open(backend.settings())
    await store.close()
    statements = {
        "deliveries": retention.PICK_DELIVERIES,
        "events": retention.EVENTS.read(),
        "sessions": retention.SESSIONS.read(),
        "no_delivery": "SELECT seq FROM events WHERE seq IN ({after}, {limit}) AND "
                       + retention.NO_DELIVERY,
    }
    if backend.name == "sqlite":
        with sqlite3.connect(config.sqlite_path(backend.database)) as conn:
            plans = {name: " / ".join(row[3] for row in conn.execute(
                "EXPLAIN QUERY PLAN " + sql.format(before="?1", after="?1", limit="?2",
                                                   indexed=retention.SQLITE_INDEXED),
                (1, 2))) for name, sql in statements.items()}
        assert "USING INDEX deliveries_finished" in plans["deliveries"], plans
        assert "USING INTEGER PRIMARY KEY" in plans["events"], plans
        assert "USING INTEGER PRIMARY KEY" in plans["sessions"], plans
        assert "deliveries_event" in plans["no_delivery"], plans
    else:
        import asyncpg

        conn = await asyncpg.connect(backend.database)
        try:
            await conn.execute("SET enable_seqscan = off")
            plans = {}
            for name, sql in statements.items():
                text = sql.format(before="$1", after="$1", limit="$2", indexed="")
                plans[name] = "\n".join(
                    row[0] for row in await conn.fetch("EXPLAIN " + text, 1, 2))
        finally:
            await conn.close()
        assert "deliveries_finished" in plans["deliveries"], plans
        assert "events_pkey" in plans["events"], plans
        assert "sessions_pkey" in plans["sessions"], plans
        assert "deliveries_event" in plans["no_delivery"], plans
        assert all("Seq Scan" not in plan for plan in plans.values()), plans


@pytest.mark.parametrize("value", [0.5, 0.001, -1, 3651, float("nan"), "a year"])
def test_a_bad_period_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(config.ConfigError) as refused:
        config.parse({"server": {"keep_events_days": value}, "sites": [{"id": "s"}]}, env={})
    [problem] = refused.value.problems
    assert problem.where == "onetag.toml: server.keep_events_days" or \
        str(problem).startswith("onetag.toml: server.keep_events_days:"), problem
    for good in (0, 1, 365, 3650):
        settings = config.parse({"server": {"keep_events_days": good}, "sites": [{"id": "s"}]},
                                env={})
        assert settings.server.keep_events_days == good


async def test_the_console_reads_what_is_left_after_a_pass(backend, tmp_path) -> None:
    """The console's pages over a database the retention pass went through: a pruned event
    or delivery is a 404, not an error; the dead row and its event are still there, shown
    and replayable; search, reconciliation, vendors and live read what is left."""
    import time

    from console_support import console_settings, login
    from support import running

    now = int(time.time() * 1000)
    old, young = now - 40 * DAY, now - DAY
    settings = keeping(console_settings(tmp_path, database=backend.database), 30)
    store = await backend.open(settings)
    try:
        await backend.rows("INSERT INTO identities (id, site_id, email, created_ms, updated_ms) "
                           "VALUES (7, 'shop1', 'ann@example.com', ?, ?)", old, old)
        for seq, order, received in ((1, "A-OLD", old), (2, "A-DEAD", old), (4, "A-NEW", young)):
            await backend.rows(
                "INSERT INTO events (seq, site_id, event_id, name, source, received_ms, raw, "
                "data) VALUES (?, 'shop1', ?, 'purchase', 'backend', ?, '{}', ?)",
                seq, f"order-{order}", received,
                f'{{"name": "purchase", "ecommerce": {{"transaction_id": "{order}"}}, '
                f'"user": {{"email": "ann@example.com"}}}}')
        await add_event(backend, 3, old, sc="SC-OLD", identity_id=7)
        await add_session(backend, 1, "SC-OLD", old, old, identity_id=7)
        await add_session(backend, 2, "SC-NEW", young, young, identity_id=7)
        for id_, seq, key, state, created in ((1, 1, "order-placed:A-OLD", "delivered", old),
                                              (2, 2, "order-placed:A-DEAD", "dead", old),
                                              (3, 4, "order-placed:A-NEW", "delivered", young)):
            await backend.rows(
                "INSERT INTO deliveries (id, site_id, vendor, dedup_key, event_seq, visitor, "
                "state, request, last_error, created_ms, updated_ms) VALUES (?, 'shop1', "
                "'sendlane', ?, ?, 'sc:V', ?, '{}', ?, ?, ?)", id_, key, seq, state,
                "HTTP 500: boom" if state == "dead" else None, created, created)
        fwd = Forwarder(settings, store, ForwarderOptions())
        assert await fwd.prune_history() == {"deliveries": 1, "events": 2, "sessions": 1}
    finally:
        await store.close()
    async with running(settings) as (app, client):
        assert (await login(client)).status_code == 303
        assert (await client.get("/admin/events/1")).status_code == 404
        assert (await client.get("/admin/deliveries/1")).status_code == 404
        dead = await client.get("/admin/deliveries/2")
        assert dead.status_code == 200 and "A-DEAD" in dead.text
        assert (await client.get("/admin/events/2")).status_code == 200
        letters = await client.get("/admin/deadletters")
        assert letters.status_code == 200 and "HTTP 500: boom" in letters.text
        found = await client.get("/admin/search", params={"q": "ann@example.com"})
        assert found.status_code == 200 and "SC-NEW" in found.text and "SC-OLD" not in found.text
        for path in ("/admin/search?q=A-OLD", "/admin/reconcile?since=60d", "/admin/vendors",
                     "/admin/live"):
            page = await client.get(path)
            assert page.status_code == 200, (path, page.text[:500])
    assert await backend.rows("SELECT seq FROM events ORDER BY seq") == [(2,), (4,)]


async def test_a_status_change_after_its_order_was_pruned_is_planned_from_its_own_event(
        backend) -> None:
    """docs/config.md, "Retention": an order_status for an order whose rows the pass deleted is sent
    with what its own event says, as for an order onetag never saw (``KnownOrders`` finds no
    row; server/backfill.py reads them the same way)."""
    from test_order_updates import VENDORS, ingest as ingest_order, purchase, status

    settings = keeping(backend.settings(**VENDORS), 30)
    store = await backend.open(settings)
    try:
        await ingest_order(store, purchase())
        await backend.rows("UPDATE deliveries SET state = 'delivered', created_ms = ?, "
                           "updated_ms = ?", OLD, OLD)
        await backend.rows("UPDATE events SET received_ms = ?", OLD)
        await add_event(backend, 1000, NOW)  # newer rows: a table's newest is always kept
        await add_delivery(backend, 1000, 1000, "pending", NOW)
        wanted = [("shop1", "remarkety", "orders/create:1001")]
        assert (await store.known_orders(wanted)).found
        pruned = await forwarder(settings, store).prune_history()
        assert pruned["events"] == 1 and pruned["deliveries"] >= 2, pruned
        assert not (await store.known_orders(wanted)).found
        await ingest_order(store, status("fulfilled"))
    finally:
        await store.close()
    from server.jsontext import loads

    [(request,)] = await backend.rows(
        "SELECT request FROM deliveries WHERE vendor = 'remarkety'")
    body = loads(request)["json"]
    assert body["status"]["code"] == "fulfilled" and "line_items" not in body, body


async def test_postgresql_a_session_an_ingest_holds_is_young_again_when_the_delete_gets_it(
        backend) -> None:
    """Several nodes: a pass's delete that waits for an ingest's lock on an old session
    checks its last activity again once the ingest committed, and keeps it."""
    if backend.name != "postgresql":
        pytest.skip("one writer on SQLite: the pass and an ingest never overlap")
    import asyncio

    import asyncpg

    store = await backend.open(keeping(backend.settings(), 30))
    ingest = await asyncpg.connect(backend.database)
    try:
        await add_session(backend, 1, "SC-BACK", OLD, OLD)
        await add_session(backend, 2, "SC-GONE", OLD, OLD)
        await add_session(backend, 3, "SC-NEW", YOUNG, YOUNG)
        tx = ingest.transaction()
        await tx.start()
        await ingest.execute("SELECT 1 FROM sessions WHERE id = 1 FOR UPDATE")
        await ingest.execute("UPDATE sessions SET last_ms = $1 WHERE id = 1", NOW)
        pass_ = asyncio.create_task(store.prune_sessions(NOW - 30 * DAY, 0, 10))
        await asyncio.sleep(0.3)
        assert not pass_.done()  # waiting for the ingest's lock
        await tx.commit()
        assert await asyncio.wait_for(pass_, 10) == (1, None)
    finally:
        await ingest.close()
        await store.close()
    assert await backend.rows("SELECT sc FROM sessions ORDER BY id") == [("SC-BACK",),
                                                                         ("SC-NEW",)]


async def test_the_newest_row_of_a_table_is_kept_however_old(backend) -> None:
    """SQLite gives a deleted highest id to the next row (no AUTOINCREMENT): a delivery id,
    an event seq named in a replay record, a link or Live's cursor would then name another
    row. So the newest delivery, event and session stay until a newer one exists."""
    settings = keeping(backend.settings(), 30)
    store = await backend.open(settings)
    try:
        await add_visit(backend, 1, OLD, "delivered", 0)  # a product sync's row: no event
        fwd = forwarder(settings, store)
        assert await fwd.prune_history() == {"deliveries": 0, "events": 0, "sessions": 0}
        await add_visit(backend, 2, YOUNG, "pending", 2)
        assert await fwd.prune_history() == {"deliveries": 1, "events": 1, "sessions": 1}
    finally:
        await store.close()
    assert await backend.rows("SELECT seq FROM events") == [(2,)]
    assert await backend.rows("SELECT id FROM deliveries") == [(2,)]
    assert await backend.rows("SELECT id FROM sessions") == [(2,)]
