"""A shopper's data on both backends (server/store/person.py): ``Store.person`` finds
everything held about one person, ``Store.forget_person`` erases it in one transaction,
leaves everyone else's rows as they were, byte for byte, and nothing of the person is sent
after it (the real forwarder against the fake vendors)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, strategies as st

from server.events import Origin, normalise
from server.store import person
from server.store.base import Attempt, Outcome, SessionInfo

from fakes.harness import purchase, vendor_sections
from test_forward_backends import run_until

JANE, BOB = "jane@example.com", "bob@example.com"
J1, J2, B1 = "JANE-0000-0001", "JANE-0000-0002", "BOBB-0000-0001"
TABLES = {"identities": "id", "sessions": "id", "events": "seq", "deliveries": "id",
          "attempts": "id", "coupon_calls": "id"}


def browser(raw: dict, sc: str) -> dict:
    return normalise(raw, "e", Origin(site_id="shop1", source="browser", currency="USD",
                                      received_ms=1, sc=sc))


def backend_event(raw: dict) -> dict:
    return normalise(raw, "events", Origin(site_id="shop1", source="backend", currency="USD",
                                           received_ms=1))


async def ingest(store, *events: dict) -> None:
    results = await store.ingest("shop1", list(events), list(events), SessionInfo("UA/1"))
    assert isinstance(results, list), results


def cart(n: int) -> dict:
    return {"currency": "USD", "items": [{"item_id": f"SKU-{n}", "item_name": "Mug",
                                          "price": "9.50", "quantity": 1}]}


async def jane_and_bob(store) -> None:
    """Jane: two sessions bound to her identity, a cart, a backend order; Bob: his own."""
    await ingest(store, browser({"event": "page_view", "event_id": "j1"}, J1),
                 browser({"event": "identify", "event_id": "j2",
                          "user": {"email": "Jane@Example.com", "first_name": "Jane"}}, J1),
                 browser({"event": "add_to_cart", "event_id": "j3", "ecommerce": cart(1)}, J1))
    await ingest(store, browser({"event": "page_view", "event_id": "j4"}, J2),
                 browser({"event": "identify", "event_id": "j5", "user": {"email": JANE}}, J2))
    await ingest(store, backend_event({**purchase("1001", JANE), "user": {
        "email": JANE, "customer_id": "C-JANE"}}))
    await ingest(store, browser({"event": "identify", "event_id": "b1",
                                 "user": {"email": BOB, "first_name": "Bob"}}, B1),
                 browser({"event": "add_to_cart", "event_id": "b2", "ecommerce": cart(2)}, B1))
    await ingest(store, backend_event(purchase("2001", BOB)))


async def snapshot(backend) -> dict[str, dict[Any, dict]]:
    return {table: {row[key]: row for row in await backend.dicts(
        f"SELECT * FROM {table} ORDER BY {key}")} for table, key in TABLES.items()}


def mentions(rows: dict[Any, dict], *needles: str) -> list[dict]:
    return [row for row in rows.values()
            if any(needle.lower() in json.dumps(row, default=str).lower() for needle in needles)]


async def pending(backend) -> int:
    return (await backend.rows("SELECT count(*) FROM deliveries WHERE state = 'pending'"))[0][0]


async def test_export_then_forget_erases_jane_and_leaves_bob_byte_for_byte(backend, fake) -> None:
    settings = backend.settings(**vendor_sections(fake))
    store = await backend.open(settings)
    try:
        await jane_and_bob(store)

        async def none_pending() -> bool:
            return await pending(backend) == 0

        fake.fail("sendlane", 500)  # one attempt that failed, then the retry delivered
        await run_until(backend, fake, store, none_pending, "every delivery sent")
        sent_before = len(fake.requests())
        assert any(JANE in json.dumps(r.json) for r in fake.requests() if r.json)
        # One more of Jane's, not sent yet: it must never be.
        await ingest(store, backend_event(purchase("1002", JANE)))
        assert await pending(backend) > 0
        # A forwarder claims them; the erasure commits while they are in flight.
        claimed = await store.claim(int(time.time() * 1000), 30_000, 100)
        assert claimed and all(JANE in json.dumps(d.request) for d in claimed)
        before = await snapshot(backend)

        found = await store.person(person.selector("shop1", email=" JANE@example.com "))
        doc = person.export_document(found, 1)
        assert [row["email"] for row in doc["identities"]] == [JANE]
        assert doc["identities"][0]["customer_id"] == "C-JANE"
        assert sorted(s["sc"] for s in doc["sessions"]) == [J1, J2]
        assert {s["found_through"] for s in doc["sessions"]} == {
            f"bound to identity #{found.identities[0]['id']}"}
        assert [s["cart"]["items"][0]["item_id"] for s in doc["sessions"] if s["cart"]] == [
            "SKU-1"]
        assert sorted(e["event_id"] for e in doc["events"]) == [
            "j1", "j2", "j3", "j4", "j5", "order-1001", "order-1002"]
        assert all(e["raw"] and e["data"] for e in doc["events"])
        states = Counter(d["state"] for d in doc["deliveries"])
        assert states["delivered"] >= 1 and states["pending"] >= 1
        assert all(d["request"] for d in doc["deliveries"])
        tried = [a for d in doc["deliveries"] for a in d["attempts_kept"]]
        assert {a["status"] for a in tried} >= {200, 500}
        assert "sendlane" in doc["vendors"]["received"]
        assert {d.vendor for d in claimed} <= {*doc["vendors"]["received"],
                                               *doc["vendors"]["maybe_received"]}
        assert any("-> identity #" in link for link in doc["links"])
        assert not mentions({i: e for i, e in enumerate(doc["events"])}, BOB)
        assert json.loads(json.dumps(doc))  # one JSON document

        # A dry run changes nothing and counts what the erasure will.
        dry = await store.forget_person(found.selector, dry_run=True)
        assert dry["found"] and dry["would_change"] == found.counts()
        assert await snapshot(backend) == before

        report = await store.forget_person(found.selector, dry_run=False)
        assert report["changed"] == found.counts()
        assert report["vendors"] == doc["vendors"]
        after = await snapshot(backend)
        jane_keys = {"identities": {r["id"] for r in doc["identities"]},
                     "sessions": {r["id"] for r in doc["sessions"]},
                     "events": {r["seq"] for r in doc["events"]},
                     "deliveries": {r["id"] for r in doc["deliveries"]},
                     "attempts": {a["id"] for a in tried}, "coupon_calls": set()}
        kept = {d["id"] for d in doc["deliveries"] if d["state"] in person.SENT_STATES}
        assert kept and set(jane_keys["deliveries"]) - kept
        for table in TABLES:
            others = {k: v for k, v in before[table].items() if k not in jane_keys[table]}
            assert {k: v for k, v in after[table].items() if k not in jane_keys[table]} == \
                others, table
            assert not mentions(after[table], JANE, "C-JANE", J1, J2, "1001", "1002"), table
        # Every delivery row stays, anonymous (no id is given again): the sent ones with
        # their vendor, state and times; the others closed as ignored, saying why.
        assert set(after["deliveries"]) == set(before["deliveries"])
        for key in jane_keys["deliveries"]:
            row, was = after["deliveries"][key], before["deliveries"][key]
            assert (row["vendor"], row["delivered_ms"], row["attempts"]) == (
                was["vendor"], was["delivered_ms"], was["attempts"])
            assert row["state"] == (was["state"] if key in kept else "ignored")
            assert (row["visitor"], row["dedup_key"], row["event_seq"]) == (
                "erased", f"erased:{key}", 0)
            assert json.loads(row["request"]) == {"erased": True}
            assert row["last_error"] == (None if key in kept else person.CANCELLED)
        # The events are gone; SQLite keeps the table's highest seq as an empty row (it
        # would give that seq to the next event).
        left = [after["events"][k] for k in jane_keys["events"] if k in after["events"]]
        assert len(left) == (1 if backend.name == "sqlite" else 0)
        assert all((row["name"], row["sc"], row["identity_id"], row["raw"]) == (
            "erased", None, None, "{}") for row in left)
        # A forwarder's late outcome of a row claimed before the erasure changes nothing.
        await store.finish([Outcome(d.id, "delivered", lease=d.lease) for d in claimed],
                           int(time.time() * 1000))
        assert {row["state"] for row in await backend.dicts(
            "SELECT state FROM deliveries WHERE id IN (%s)" % ",".join(
                str(d.id) for d in claimed))} == {"ignored"}
        assert mentions(after["events"], BOB) and mentions(after["identities"], BOB)

        # Nothing of Jane's is sent after the erasure; Bob's next order still is.
        await ingest(store, backend_event(purchase("2002", BOB)))
        await run_until(backend, fake, store, none_pending, "Bob's order sent")
        later = fake.requests()[sent_before:]
        assert later and all(BOB in json.dumps(r.json) for r in later if r.json)
        assert not any(JANE in json.dumps(r.json) for r in later if r.json)

        # Idempotent: nothing is left to find.
        again = await store.forget_person(found.selector, dry_run=False)
        assert not again["found"] and all(not any(c.values()) for c in again["changed"].values())
    finally:
        await store.close()


async def test_an_anonymous_visitor_by_sc_and_a_customer_by_id(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        await ingest(store, browser({"event": "page_view", "event_id": "a1"}, "ANON-0000-0001"),
                     browser({"event": "add_to_cart", "event_id": "a2", "ecommerce": cart(3)},
                             "ANON-0000-0001"))
        await ingest(store, browser({"event": "page_view", "event_id": "o1"}, "OTHR-0000-0001"))
        await ingest(store, backend_event({"event": "identify", "event_id": "c1",
                                           "user": {"email": "cid@example.com",
                                                    "customer_id": "C-7"}}))
        anon = await store.person(person.selector("shop1", sc="ANON-0000-0001"))
        assert not anon.identities and [s["sc"] for s in anon.sessions] == ["ANON-0000-0001"]
        assert [e["event_id"] for e in anon.events] == ["a1", "a2"]
        assert anon.links[0] == "sc ANON-0000-0001 -> session #%d" % anon.sessions[0]["id"]
        customer = await store.person(person.selector("shop1", customer_id="C-7"))
        assert [i["email"] for i in customer.identities] == ["cid@example.com"]
        assert [e["event_id"] for e in customer.events] == ["c1"]
        assert customer.events[0]["found_through"] == "identity"
        nobody = await store.person(person.selector("shop1", email="nobody@example.com"))
        assert not nobody.found
        report = await store.forget_person(anon.selector, dry_run=False)
        assert report["changed"]["events"] == {"delete": 2}
        assert report["changed"]["deliveries"] == {"anonymise": 0, "cancel": 0}
        # A later event of the same sc starts a fresh session.
        await ingest(store, browser({"event": "page_view", "event_id": "a3"}, "ANON-0000-0001"))
        fresh = await store.person(anon.selector)
        assert [e["event_id"] for e in fresh.events] == ["a3"]
        assert fresh.sessions[0]["cart_items"] is None
    finally:
        await store.close()
    assert await backend.rows("SELECT event_id FROM events ORDER BY seq") == [
        ("o1",), ("c1",), ("a3",)]


@pytest.mark.parametrize("given, field", [
    ({}, "--email"), ({"email": "a@example.com", "sc": "ABCDEFGH"}, "--email and --sc"),
    ({"email": "not an email"}, "--email"), ({"sc": "short"}, "--sc"),
    ({"customer_id": " "}, "--customer-id"),
    ({"email": "ann\u202e@example.com"}, "--email")])  # an event's email never holds one
def test_a_selector_that_names_no_one_or_two_is_refused(given, field) -> None:
    with pytest.raises(ValueError, match=field):
        person.selector("shop1", **given)


@given(st.text(max_size=300), st.sampled_from(["email", "customer_id", "sc"]))
def test_any_selector_text_is_read_or_refused_with_a_value_error(text, kind) -> None:
    try:
        who = person.selector("shop1", **{kind: text})
    except ValueError as exc:
        assert str(exc).startswith(("--", "name the person"))
        return
    value = getattr(who, kind)
    assert value == value.strip() and value
    if kind == "email":  # read as events store it: the same selector when given again
        assert value == value.lower() and person.selector("shop1", email=value) == who


async def test_forget_while_the_persons_events_keep_arriving(backend) -> None:
    """Ingest of Jane's sessions and identity goes on while she is erased (PostgreSQL: the
    pool's transaction against the writer's, row locks and retries): every event left has
    its session and identity rows, none names a deleted identity."""
    import asyncio

    store = await backend.open(backend.settings())
    try:
        await jane_and_bob(store)

        async def arrivals() -> None:
            for i in range(30):
                sc = (J1, J2)[i % 2]
                await ingest(store, browser({"event": "identify", "event_id": f"r{i}",
                                             "user": {"email": JANE}}, sc))
                await ingest(store, backend_event({"event": "identify", "event_id": f"k{i}",
                                                   "user": {"email": JANE}}))

        who = person.selector("shop1", email=JANE)
        reports = await asyncio.gather(arrivals(), *(store.forget_person(who, dry_run=False)
                                                     for _ in range(3)))
        # The three run at once: which of them finds Jane first is the databases' choice.
        assert any(r["found"] for r in reports[1:])
    finally:
        await store.close()
    assert await backend.rows(
        "SELECT count(*) FROM events e WHERE e.identity_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM identities i WHERE i.id = e.identity_id)") == [(0,)]
    assert await backend.rows(
        "SELECT count(*) FROM events e WHERE e.sc IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM sessions s WHERE s.site_id = e.site_id AND s.sc = e.sc)") == [(0,)]
    assert await backend.rows(
        "SELECT count(*) FROM sessions s WHERE s.identity_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM identities i WHERE i.id = s.identity_id)") == [(0,)]
    assert await backend.rows("SELECT count(*) FROM sessions WHERE sc = ?", B1) == [(1,)]


def test_the_docs_quote_the_reason_a_cancelled_row_carries() -> None:
    """docs/shoppers-data.md tells the operator what `deliveries` shows for a cancelled row."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "shoppers-data.md").read_text()
    assert f'"{person.CANCELLED}"' in " ".join(page.split())


def late(claimed, now: int, state: str = "delivered") -> list[Outcome]:
    """The forwarder's outcomes of ``claimed`` with their attempts, as it always sends them:
    the request as sent (the person's email in its body) and the vendor's answer."""
    return [Outcome(d.id, state, lease=d.lease, attempt=Attempt(
        1, now, 5, {"method": "POST", "url": "u", "headers": {}, "body": d.request.get("json")},
        200, {"body": "ok"})) for d in claimed]


async def test_a_late_outcome_after_forget_keeps_no_attempt(backend, fake) -> None:
    """A forwarder's outcome for a row it claimed before the erasure writes no attempt of
    the erased delivery: no later export or forget could reach it (it names no event)."""
    store = await backend.open(backend.settings(**vendor_sections(fake)))
    try:
        await ingest(store, backend_event(purchase("1002", JANE)),
                     backend_event(purchase("2002", BOB)))
        claimed = await store.claim(int(time.time() * 1000), 30_000, 100)
        jane = [d for d in claimed if JANE in json.dumps(d.request)]
        assert jane and len(jane) < len(claimed)
        report = await store.forget_person(person.selector("shop1", email=JANE), dry_run=False)
        assert report["found"]
        await store.finish(late(claimed, int(time.time() * 1000)), int(time.time() * 1000))
        rows = await backend.dicts("SELECT * FROM attempts ORDER BY id")
    finally:
        await store.close()
    assert not mentions(dict(enumerate(rows)), JANE)
    # Bob's attempts, and his rows' outcomes, are kept as ever.
    bob = {d.id for d in claimed} - {d.id for d in jane}
    assert {row["delivery_id"] for row in rows} == bob
    assert all(row["site_id"] == "shop1" and row["vendor"] for row in rows)


async def test_a_late_outcome_waits_for_an_erasure_in_progress(backend, fake) -> None:
    """PostgreSQL, many workers: an outcome whose lease was taken over (its row changes
    nothing) while an erasure of the row is not committed yet waits for it, then keeps no
    attempt; the erasure reads the attempts only after locking the deliveries, so one
    committed before it is found and deleted."""
    if backend.name != "postgresql":
        pytest.skip("SQLite's one writer runs the forget job and the finish one after another")
    import asyncio
    import asyncpg

    store = await backend.open(backend.settings(**vendor_sections(fake)))
    try:
        await ingest(store, backend_event(purchase("1002", JANE)))
        claimed = await store.claim(int(time.time() * 1000), 30_000, 100)
        assert claimed
        ids = [d.id for d in claimed]
        conn = await asyncpg.connect(backend.database)
        try:
            # Another worker took the leases over (a late outcome changes no row) ...
            await conn.execute("UPDATE deliveries SET claim_token = claim_token + 1000 "
                               "WHERE id = ANY($1::bigint[])", ids)
            # ... and an erasure has anonymised the rows but not committed yet.
            erasure = conn.transaction()
            await erasure.start()
            await conn.execute("UPDATE deliveries SET visitor = 'erased', state = 'ignored', "
                               "request = $2 WHERE id = ANY($1::bigint[])", ids,
                               person.ERASED_REQUEST)
            finishing = asyncio.create_task(store.finish(late(claimed, 1), 1))
            await asyncio.sleep(0.5)
            assert not finishing.done()  # it waits for the erasure's row locks
            await erasure.commit()
            await asyncio.wait_for(finishing, 10)
        finally:
            await conn.close()
        assert await backend.rows("SELECT count(*) FROM attempts") == [(0,)]
    finally:
        await store.close()
