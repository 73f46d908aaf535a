"""Forwarding on both backends (the ``backend`` fixture: SQLite and PostgreSQL): the real
forwarder over the store interface, the fake vendors over HTTP. What the forwarder relies on
the store for: claims and leases, one row in flight per visitor and in order, outcomes and
attempts, a vendor's pause, dead rows made due again by a replay."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from server.events import Origin, normalise
from server.forwarder import Forwarder
from server.store import outbox_rules
from server.store.base import SessionInfo

from fakes.harness import FAST, purchase, vendor_sections


def backend_event(raw: dict) -> dict:
    origin = Origin(site_id="shop1", source="backend", currency="USD", received_ms=1)
    return normalise(raw, "events", origin)


async def ingest(store, *raws: dict) -> None:
    events = [backend_event(raw) for raw in raws]
    results = await store.ingest("shop1", events, list(raws), SessionInfo())
    assert isinstance(results, list), results


async def states(backend) -> Counter:
    return Counter(dict(await backend.rows("SELECT state, count(*) FROM deliveries "
                                           "GROUP BY state")))


async def run_until(backend, fake, store, condition, what, options=FAST, only=None):
    settings = backend.settings(**vendor_sections(fake, only))
    forwarder = Forwarder(settings, store, options)
    await forwarder.start()
    try:
        await until_async(condition, what, fake)
    finally:
        await forwarder.stop()


async def until_async(condition, what, fake, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; {fake.summary()}")
        await asyncio.sleep(0.05)


async def test_an_order_reaches_each_vendor_once_and_a_500_is_retried(backend, fake) -> None:
    settings = backend.settings(**vendor_sections(fake))
    store = await backend.open(settings)
    try:
        fake.fail("sendlane", 500)
        await ingest(store, purchase("1001", sc="JIM-0000-CHECKOUT"))  # eSputnik's cookies.sc
        planned = sum((await states(backend)).values())
        assert planned >= 3

        async def all_delivered() -> bool:
            return (await states(backend)) == Counter({"delivered": planned})

        await run_until(backend, fake, store, all_delivered, "every vendor's delivery")
        assert [r.answer for r in fake.requests("sendlane")] == ["500", "200"]
        assert len(fake.delivered()) == planned  # once each
        [(row_id, attempts)] = await backend.rows(
            "SELECT id, attempts FROM deliveries WHERE vendor = ?", "sendlane")
        assert attempts == 2
        assert [a["status"] for a in await store.attempts(row_id)] == [500, 200]
    finally:
        await store.close()


async def test_a_visitors_rows_go_one_at_a_time_in_order(backend, fake) -> None:
    store = await backend.open(backend.settings(**vendor_sections(fake, ("remarkety",))))
    try:
        orders = [str(2000 + n) for n in range(6)]
        for order in orders:  # one request each: six rows of one visitor, in this order
            await ingest(store, purchase(order, "same@example.com"))
        fake.fail("remarkety", 503, times=2)  # the first row retries; the others wait for it

        async def done() -> bool:
            return (await states(backend)) == Counter({"delivered": 6})

        await run_until(backend, fake, store, done, "six orders",
                        options=dataclasses.replace(FAST, concurrency=8), only=("remarkety",))
        firsts = []
        for request in fake.requests("remarkety"):
            text = request.body.decode()
            firsts.append(next(o for o in orders if o in text))
        # The two 503s were the first order's; nothing of the visitor went out beside it.
        assert firsts[:3] == [orders[0]] * 3
        assert firsts[2:] == orders
    finally:
        await store.close()


async def test_a_429_pauses_the_vendor_through_the_store(backend, fake) -> None:
    store = await backend.open(backend.settings(**vendor_sections(fake, ("remarkety",))))
    try:
        fake.fail("remarkety", 429, headers={"Retry-After": "2"})
        await ingest(store, purchase("3001", "a@example.com"), purchase("3002", "b@example.com"))

        async def done() -> bool:
            return (await states(backend)) == Counter({"delivered": 2})

        await run_until(backend, fake, store, done, "both orders",
                        options=dataclasses.replace(FAST, concurrency=1), only=("remarkety",))
        first, *rest = fake.requests("remarkety")
        assert first.answer == "429" and len(rest) == 2
        assert all(r.received >= first.received + 2 for r in rest)
        assert await store.paused_until("remarkety") >= (first.received + 2) * 1000
    finally:
        await store.close()


async def test_a_dead_row_is_replayed_and_then_delivered(backend, fake) -> None:
    store = await backend.open(backend.settings(**vendor_sections(fake, ("rejoiner",))))
    try:
        fake.fail("rejoiner", 400, body='{"error": "bad"}')
        await ingest(store, purchase("4001"))

        async def dead() -> bool:
            return (await states(backend)).get("dead", 0) >= 1

        await run_until(backend, fake, store, dead, "a dead row", only=("rejoiner",))
        made = await store.replay_rows(int(time.time() * 1000), vendor="rejoiner")
        assert len(made) >= 1 and {m["from_state"] for m in made} == {"dead"}

        async def delivered() -> bool:
            return not (await states(backend)).get("dead") and \
                not (await states(backend)).get("pending")

        await run_until(backend, fake, store, delivered, "the replayed row", only=("rejoiner",))
        assert (await states(backend)).get("delivered", 0) >= 1
    finally:
        await store.close()


_ROW = st.tuples(st.sampled_from(["v1", "v2", "v3"]), st.sampled_from(["sendlane", "esputnik"]),
                 st.sampled_from(["pending", "pending", "delivered", "dead"]),
                 st.integers(-3, 3))


@hsettings(max_examples=15, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_ROW, max_size=10), limit=st.integers(1, 5))
async def test_both_claims_take_what_the_rule_says(backend, rows, limit) -> None:
    """SQLite's claim and PostgreSQL's take exactly ``outbox_rules.claimable``'s rows: one
    rule (a visitor's earliest pending row only, due longest ago first), two spellings."""
    now = 1_800_000_000_000
    store = await backend.open(backend.settings())
    try:
        await backend.rows("DELETE FROM deliveries")
        await backend.rows("DELETE FROM events")
        stored = []
        for n, (visitor, vendor, state, due) in enumerate(rows):
            await backend.rows(
                "INSERT INTO events (seq, site_id, event_id, name, source, received_ms, raw, "
                "data) VALUES (?, 'shop1', ?, 'purchase', 'backend', 1, '{}', '{}')",
                n + 1, f"e{n}")
            await backend.rows(
                "INSERT INTO deliveries (id, site_id, vendor, dedup_key, event_seq, visitor, "
                "state, request, next_attempt_ms, created_ms, updated_ms) "
                "VALUES (?, 'shop1', ?, ?, ?, ?, ?, '{}', ?, 1, 1)",
                n + 1, vendor, f"k{n}", n + 1, visitor, state, now + due)
            stored.append(outbox_rules.Row(n + 1, "shop1", vendor, visitor, state, now + due))
        expected = outbox_rules.claimable(stored, now, limit, vendors=["sendlane"])
        got = await store.claim(now, 60_000, limit, vendors=("sendlane",))
        assert sorted(d.id for d in got) == sorted(expected)
    finally:
        await store.close()
