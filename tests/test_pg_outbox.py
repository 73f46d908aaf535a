"""The outbox on PostgreSQL with several workers: no row claimed twice while leased, a
visitor's rows in order across workers, a dead worker's lease taken over, a late outcome
ignored, a vendor's pause honoured by every worker. Each test has a database of its own
(``pg_database``, tests/backends.py: skipped, saying why, when no PostgreSQL is reachable);
every "worker" is a pool of its own, as a separate process has."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Any

import pytest

from server.forwarder import Forwarder
from server.store.base import Attempt, Outcome
from server.store.deadletters import ReplayFilter
from server.store.postgres_outbox import PostgresOutbox, pg_condition

from fakes.harness import FAST, make_settings, until

NOW = 1_800_000_000_000
LEASE = 60_000


class Worker(PostgresOutbox):
    """The outbox half over a pool of its own: what one ``onetag worker`` process holds."""

    def __init__(self, pool: Any, sites: Any = None):
        self.pool = pool
        self.sites = sites or {}


@pytest.fixture
async def db(pg_database):
    import asyncpg

    url = pg_database
    pools = []

    async def worker(sites: Any = None) -> Worker:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        pools.append(pool)
        return Worker(pool, sites)

    admin = await asyncpg.connect(url)
    try:
        yield url, admin, worker
    finally:
        await admin.close()
        for pool in pools:
            await pool.close()


async def add_rows(conn: Any, rows: list[tuple[str, str]], *, vendor: str = "sendlane",
                   url: str = "http://127.0.0.1:9/none", site: str = "shop1",
                   due_ms: int = NOW - 1000, state: str = "pending") -> list[int]:
    """(visitor, dedup key) rows, pending and due, in this order; their ids."""
    ids = []
    for visitor, key in rows:
        seq = await conn.fetchval(
            "INSERT INTO events (site_id, event_id, name, source, sc, received_ms, raw, data) "
            "VALUES ($1, $2, 'purchase', 'backend', NULL, $3, '{}', '{}') RETURNING seq",
            site, f"{vendor}-{key}", NOW)
        ids.append(await conn.fetchval(
            "INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, state, "
            "request, next_attempt_ms, created_ms, updated_ms) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING id",
            site, vendor, key, seq, visitor, state,
            f'{{"method": "POST", "url": "{url}", "json": {{"key": "{key}"}}}}', due_ms,
            NOW - 5000))
    return ids


async def test_two_claimers_never_get_the_same_row(db) -> None:
    _, admin, worker = db
    a, b = await worker(), await worker()
    ids = await add_rows(admin, [(f"v{n}", f"k{n}") for n in range(300)])
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    async def run(name: str, store: Worker) -> None:
        while True:  # claim, never finish: every lease still runs, so nothing comes back
            rows = await store.claim(NOW, LEASE, 7, vendors=("sendlane",))
            if not rows:
                return
            claimed[name] += [row.id for row in rows]
            await asyncio.sleep(0)

    await asyncio.gather(run("a", a), run("b", b), run("a", a), run("b", b))
    together = claimed["a"] + claimed["b"]
    assert sorted(together) == sorted(ids)  # each row once, none lost
    assert claimed["a"] and claimed["b"]  # both really claimed
    tokens = await admin.fetch("SELECT DISTINCT claim_token FROM deliveries")
    assert len(tokens) == 300  # a token per claimed row, none shared


async def test_order_per_visitor_is_kept_across_two_workers(db) -> None:
    _, admin, worker = db
    a, b = await worker(), await worker()
    visitors = [f"v{n}" for n in range(6)]
    plan = [(visitor, f"{visitor}-{n}") for n in range(8) for visitor in visitors]
    random.Random(4).shuffle(plan)
    ids = await add_rows(admin, plan)
    by_id = dict(zip(ids, plan))
    in_flight: dict[str, int] = {}
    sent: dict[str, list[int]] = {v: [] for v in visitors}
    problems: list[str] = []

    async def run(store: Worker) -> None:
        idle = 0
        while idle < 20:
            rows = await store.claim(NOW, LEASE, 3, vendors=("sendlane",))
            if not rows:
                idle += 1
                await asyncio.sleep(0.005)
                continue
            idle = 0
            for row in rows:
                visitor = by_id[row.id][0]
                if visitor in in_flight:
                    problems.append(f"{visitor}: {row.id} claimed while {in_flight[visitor]} "
                                    "was in flight")
                in_flight[visitor] = row.id
            await asyncio.sleep(random.random() * 0.003)  # the "send"
            for row in rows:
                sent[by_id[row.id][0]].append(row.id)
                del in_flight[by_id[row.id][0]]
            await store.finish([Outcome(row.id, "delivered", lease=row.lease) for row in rows],
                               NOW)

    await asyncio.gather(run(a), run(b))
    assert problems == []
    for visitor in visitors:
        mine = [i for i, (v, _) in zip(ids, plan) if v == visitor]
        assert sent[visitor] == sorted(mine)  # in the order planned, each once
    assert await admin.fetchval("SELECT count(*) FROM deliveries WHERE state = 'delivered'") == 48


async def test_a_dead_workers_lease_is_taken_over(db) -> None:
    _, admin, worker = db
    dead, alive = await worker(), await worker()
    [row_id] = await add_rows(admin, [("v1", "k1")])
    [first] = await dead.claim(NOW, LEASE, 10, vendors=("sendlane",))
    await dead.pool.close()  # the worker is gone; its lease stays until it ends
    assert await alive.claim(NOW + LEASE - 1, LEASE, 10, vendors=("sendlane",)) == []
    [again] = await alive.claim(NOW + LEASE, LEASE, 10, vendors=("sendlane",))
    assert (again.id, again.attempts, first.attempts) == (row_id, 2, 1)
    assert again.lease != first.lease
    await alive.finish([Outcome(row_id, "delivered", lease=again.lease)], NOW + LEASE + 5)
    assert await admin.fetchval("SELECT state FROM deliveries WHERE id = $1", row_id) == "delivered"


async def test_a_late_outcome_does_not_overwrite_the_newer_one(db) -> None:
    _, admin, worker = db
    slow, fast = await worker(), await worker()
    [row_id] = await add_rows(admin, [("v1", "k1")])
    [old] = await slow.claim(NOW, LEASE, 10, vendors=("sendlane",))
    [new] = await fast.claim(NOW + LEASE, LEASE, 10, vendors=("sendlane",))  # taken over
    retry_at = NOW + LEASE + 30_000
    await fast.finish([Outcome(row_id, "pending", retry_at, "HTTP 500",
                               Attempt(2, NOW + LEASE, 10, {"url": "x"}, 500), lease=new.lease)],
                      NOW + LEASE + 20)
    # The first worker's send comes back at last: delivered, it says, but too late.
    await slow.finish([Outcome(row_id, "delivered", 0, None,
                               Attempt(1, NOW, 70_000, {"url": "x"}, 200), lease=old.lease)],
                      NOW + LEASE + 40)
    row = await admin.fetchrow("SELECT state, next_attempt_ms, last_error, claim_token "
                               "FROM deliveries WHERE id = $1", row_id)
    assert dict(row) == {"state": "pending", "next_attempt_ms": retry_at,
                         "last_error": "HTTP 500", "claim_token": new.lease}
    # Both attempts happened and both are kept.
    assert [a["status"] for a in await fast.attempts(row_id)] == [500, 200]
    # The newer claim's own outcome still lands.
    [third] = await fast.claim(retry_at, LEASE, 10, vendors=("sendlane",))
    await fast.finish([Outcome(row_id, "delivered", lease=third.lease)], retry_at + 5)
    assert await admin.fetchval("SELECT state FROM deliveries WHERE id = $1", row_id) == "delivered"


async def test_a_pause_one_worker_got_is_honoured_by_the_other(db, fake, tmp_path) -> None:
    _, admin, worker = db
    settings = make_settings(tmp_path, fake, only=("remarkety",))
    options = dataclasses.replace(FAST, concurrency=1)
    first_store, second_store = await worker(settings.sites), await worker(settings.sites)
    fake.fail("remarkety", 429, headers={"Retry-After": "2"})
    await add_rows(admin, [("v0", "k0")], vendor="remarkety", url=fake.url("remarkety"), due_ms=0)
    first = Forwarder(settings, first_store, options)
    await first.start()
    try:
        await until(lambda: fake.requests("remarkety"), what="the 429")
        await until(lambda: first.finished, what="the 429 recorded")
    finally:
        await first.stop()
    throttled = fake.requests("remarkety")[0]
    assert throttled.answer == "429"
    assert await second_store.paused_until("remarkety") >= (throttled.received + 2) * 1000
    # A worker that never saw the 429 starts now, with rows of other visitors due at once.
    await add_rows(admin, [(f"v{n}", f"k{n}") for n in range(1, 4)], vendor="remarkety",
                   url=fake.url("remarkety"), due_ms=0)
    second = Forwarder(settings, second_store, options)
    await second.start()
    try:
        await until(lambda: len(fake.delivered("remarkety")) == 4, what="all four delivered",
                    describe=fake.summary)
    finally:
        await second.stop()
    later = fake.requests("remarkety")[1:]
    assert len(later) == 4
    assert all(r.received >= throttled.received + 2 for r in later)


async def test_replay_makes_dead_rows_due_and_a_dry_run_changes_nothing(db) -> None:
    _, admin, worker = db
    store = await worker()
    ids = await add_rows(admin, [("v1", "k1"), ("v2", "k2")], state="dead")
    await admin.execute("UPDATE deliveries SET last_error = 'HTTP 500: 50%_off' WHERE id = $1",
                        ids[0])
    dry = await store.replay_rows(NOW, error="50%_", dry_run=True)
    assert [r["id"] for r in dry] == [ids[0]]
    # The error filter ignores case here as SQLite's LIKE does: one filter, the same rows.
    dry = await store.replay_rows(NOW, error="http 500: 50%_OFF", dry_run=True)
    assert [r["id"] for r in dry] == [ids[0]]
    assert await admin.fetchval("SELECT count(*) FROM deliveries WHERE state = 'dead'") == 2
    count, fingerprint = await store.replay_preview(NOW, ReplayFilter(("dead",)))
    assert count == 2
    changed = await store.replay_recorded(NOW, ReplayFilter(("dead",)), "cli:test",
                                          expect="not-that-set")
    assert changed["changed"] and len(changed["rows"]) == 2
    done = await store.replay_recorded(NOW, ReplayFilter(("dead",)), "cli:test",
                                       expect=fingerprint, shown=2)
    assert not done["changed"] and done["fingerprint"] == fingerprint
    assert await admin.fetchval("SELECT count(*) FROM deliveries WHERE state = 'pending' "
                                "AND attempts = 0 AND claim_token IS NULL") == 2
    assert await admin.fetchval("SELECT replayed FROM replays WHERE id = $1",
                                done["replay_id"]) == 2
    with pytest.raises(ValueError, match="states"):
        await store.replay_rows(NOW, states=("held",))


async def test_lists_stats_depth_and_pruning(db) -> None:
    _, admin, worker = db
    store = await worker()
    ids = await add_rows(admin, [("v1", "k1"), ("v1", "k2"), ("v2", "k3")])
    listed = {row["id"]: row for row in await store.list_deliveries(vendor="sendlane")}
    assert [listed[i]["waits_for"] for i in ids] == [None, ids[0], None]
    assert [r["id"] for r in await store.list_deliveries(ids=[ids[2]])] == [ids[2]]
    [stats] = await store.delivery_stats(NOW)
    assert (stats["vendor"], stats["pending"], stats["delivered"]) == ("sendlane", 3, 0)
    depth, oldest = await store.outbox_depth(NOW)
    assert depth == [("sendlane", "pending", 3)] and oldest == {"sendlane": 5.0}
    rows = await store.claim(NOW, LEASE, 10, vendors=("sendlane",))
    await store.finish([Outcome(r.id, "delivered", 0, None,
                                Attempt(1, NOW - 10_000 * n, 5, {"url": "x"}, 200), r.lease)
                        for n, r in enumerate(rows)], NOW)
    assert await store.prune_attempts(NOW - 5_000, 10) == 1
    assert await admin.fetchval("SELECT count(*) FROM attempts") == 1
    assert await admin.execute("UPDATE deliveries SET state = 'held', created_ms = 0 "
                               "WHERE id = $1", ids[1]) == "UPDATE 1"
    assert await store.expire_held(1, NOW) == 1


def test_replay_conditions_become_postgresql() -> None:
    assert pg_condition("(state = 'dead') AND vendor = ? AND id IN (?,?)", 2) == \
        "(state = 'dead') AND vendor = $2 AND id IN ($3,$4)"
    assert pg_condition("0", 1) == "false"
    assert pg_condition("(state = 'dead') AND 0 AND created_ms >= ?", 10) == \
        "(state = 'dead') AND false AND created_ms >= $10"


async def test_claim_function_runs_the_claim_statement_with_a_generic_plan(db) -> None:
    """Migration 022's ``onetag_claim`` is ``claim_sql``'s one-vendor statement (with its
    ``CLAIMABLE`` rule) word for word, and both functions keep a generic plan."""
    from server.store.postgres_outbox import CLAIM_ONE_VENDOR_STATEMENT

    _, admin, _ = db
    rows = {row["proname"]: row for row in await admin.fetch(
        "SELECT proname, prosrc, proconfig FROM pg_proc "
        "WHERE proname IN ('onetag_claim', 'onetag_finish')")}
    expected = CLAIM_ONE_VENDOR_STATEMENT
    for n, name in ((4, "lease_ms"), (3, "wanted"), (2, "for_vendor"), (1, "now_ms")):
        expected = expected.replace(f"${n}", name)
    assert " ".join(expected.split()) in " ".join(rows["onetag_claim"]["prosrc"].split())
    for name in ("onetag_claim", "onetag_finish"):
        assert rows[name]["proconfig"] == ["plan_cache_mode=force_generic_plan"]


async def test_a_claim_carries_outcomes_and_sees_them(db) -> None:
    """``finish_and_claim``: the outcomes are recorded (attempt kept, the late-outcome guard
    applied) and the claim, in the same call, already sees them: the visitor's next row
    comes with it."""
    _, admin, worker = db
    store = await worker()
    first, second, other = await add_rows(admin, [("v1", "k1"), ("v1", "k2"), ("v2", "k3")])
    claimed = await store.claim(NOW, LEASE, 10, vendors=("sendlane",))
    assert [d.id for d in claimed] == [first, other]
    lease = {d.id: d.lease for d in claimed}
    outcomes = [Outcome(first, "delivered", 0, None, Attempt(1, NOW, 5, {"url": "x"}, 200),
                        lease[first]),
                Outcome(other, "delivered", 0, None, None, lease[other] + 1000)]  # not its
    [next_row] = await store.finish_and_claim(outcomes, NOW + 10, LEASE, 10,
                                              vendors=("sendlane",))
    assert next_row.id == second and next_row.lease > lease[other]
    states = dict(await admin.fetch("SELECT id, state FROM deliveries"))
    assert states == {first: "delivered", second: "pending", other: "pending"}
    assert await admin.fetchval("SELECT count(*) FROM attempts WHERE delivery_id = $1",
                                first) == 1


async def until_waiting(admin: Any) -> None:
    """Until a session of the test's database waits for a lock (the finish under test)."""
    for _ in range(250):
        if await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the finish never waited for a lock")


async def delivered_with_one_attempt_each(admin: Any, ids: list[int]) -> None:
    rows = await admin.fetch("SELECT id, state FROM deliveries ORDER BY id")
    assert [tuple(row) for row in rows] == [(row, "delivered") for row in ids]
    kept = await admin.fetch("SELECT delivery_id FROM attempts ORDER BY delivery_id")
    assert [row["delivery_id"] for row in kept] == ids


async def test_a_batch_with_a_late_outcome_and_an_erasure_do_not_deadlock(db) -> None:
    """A batch whose late outcome (a final row) is below a current one of the same person,
    against ``onetag person forget`` locking the person's deliveries in id order (store/
    person.py): the finish (migration 041) locks its batch's rows in one pass in id order,
    so it waits for the erasure instead of PostgreSQL aborting one of them (the forwarder
    then sent the whole batch, other customers' outcomes too, again after its lease)."""
    import asyncpg

    url, admin, worker = db
    late_id, current_id = await add_rows(admin, [("sc:a", "late"), ("sc:a", "current")])
    await admin.execute("UPDATE deliveries SET state = 'delivered' WHERE id = $1", late_id)
    await admin.execute("UPDATE deliveries SET claim_token = 99, lease_until = $2 "
                        "WHERE id = $1", current_id, NOW + LEASE)
    forwarder = await worker()
    attempt = Attempt(1, NOW, 5, {"method": "POST"}, 200, {"body": "ok"})
    outcomes = [Outcome(late_id, "delivered", attempt=attempt, lease=1),
                Outcome(current_id, "delivered", attempt=attempt, lease=99)]
    forget = await asyncpg.connect(url)
    try:
        erasing = forget.transaction()
        await erasing.start()
        await forget.execute("SELECT id FROM deliveries WHERE id = $1 FOR UPDATE", late_id)
        finishing = asyncio.create_task(forwarder.finish(outcomes, NOW))
        await until_waiting(admin)  # for the erasure's lock on the late row
        # The erasure's lock of the person's rows, in id order, as gather(lock=True).
        await asyncio.wait_for(forget.execute(
            "SELECT id FROM deliveries WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
            [late_id, current_id]), 5)
        assert not finishing.done()
        await erasing.commit()
        await asyncio.wait_for(finishing, 5)
    finally:
        await forget.close()
    await delivered_with_one_attempt_each(admin, [late_id, current_id])


async def test_a_finish_chosen_as_a_deadlock_s_victim_runs_once_more(db) -> None:
    """Another transaction locking the batch's rows against the id order (row 10, then 7,
    while the finish holds 7 and waits for 10): PostgreSQL aborts the finish (40P01), whose
    one statement is rolled back whole, and the store runs it once more: the outcome and
    its attempt are written once, and the forwarder does not drop the batch."""
    import asyncpg

    url, admin, worker = db
    first, second = await add_rows(admin, [("sc:a", "first"), ("sc:b", "second")])
    await admin.execute("UPDATE deliveries SET claim_token = id, lease_until = $1",
                        NOW + LEASE)
    forwarder = await worker()
    attempt = Attempt(1, NOW, 5, {"method": "POST"}, 200, {"body": "ok"})
    outcomes = [Outcome(row, "delivered", attempt=attempt, lease=row) for row in (first, second)]
    other = await asyncpg.connect(url)
    try:
        await other.execute("SET deadlock_timeout = '10s'")  # the finish detects it first
        locking = other.transaction()
        await locking.start()
        await other.execute("SELECT id FROM deliveries WHERE id = $1 FOR UPDATE", second)
        finishing = asyncio.create_task(forwarder.finish(outcomes, NOW))
        await until_waiting(admin)  # holding the first row, for the second
        await asyncio.wait_for(other.execute(
            "SELECT id FROM deliveries WHERE id = $1 FOR UPDATE", first), 10)
        await locking.commit()
        await asyncio.wait_for(finishing, 10)
    finally:
        await other.close()
    await delivered_with_one_attempt_each(admin, [first, second])
