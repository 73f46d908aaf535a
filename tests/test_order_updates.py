"""An order's status change carries the order as onetag reported it, on both backends.

Remarkety's orders/update has "the same format as orders/create" (Remarkety event reference,
orders/create mandatory fields: lines, totals, created_at ...), and Sendlane's per-product
events "execute based on the content of the line_items array" (Sendlane custom integration,
"Order & Other Product Events"). An order_status or refund event knows neither the order's
lines nor its totals (a refund's value is the refund's), so the store hands the adapters the
body of the order's creation request it stored (``PlanContext.order``), looked up in the
ingest transaction; an order it never saw keeps the partial body.
"""

from __future__ import annotations

from server.events import Origin, normalise
from server.store.base import SessionInfo

from support import item

EMAIL = "a@b.co"
DAY = 86_400_000
T0 = 1_764_000_000_000
VENDORS = {"remarkety": {"store_id": "RMSTORE", "api_key": "k"},
           "sendlane": {"integration_token": "t", "api_token": "k"}}


def event(raw: dict, sc: str | None = None, source: str = "backend") -> dict:
    origin = Origin(site_id="shop1", source=source, currency="USD", received_ms=T0 + 3 * DAY, sc=sc)
    return normalise(raw, "e", origin)


def purchase(order: str = "1001") -> dict:
    return event({"event": "purchase", "event_id": f"buy-{order}", "time": T0,
                  "user": {"email": EMAIL, "customer_id": "42"},
                  "ecommerce": {"transaction_id": order, "currency": "USD", "value": 30.00,
                                "tax": 2.75, "shipping": 4.99, "coupon": "SALE",
                                "items": [item("SKU-1", 29.99), item("SKU-435", 4.35)]}})


def status(status: str, order: str = "1001", at: int = T0 + DAY) -> dict:
    return event({"event": "order_status", "event_id": f"st-{order}-{status}", "time": at,
                  "transaction_id": order, "status": status, "user": {"email": EMAIL}})


def refund(order: str = "1001", value: float = 5.00, items: list | None = None) -> dict:
    return event({"event": "refund", "event_id": f"rf-{order}", "time": T0 + 2 * DAY,
                  "user": {"email": EMAIL},
                  "ecommerce": {"transaction_id": order, "currency": "USD", "value": value,
                                "items": [item("SKU-435", 4.35)] if items is None else items}})


async def ingest(store, *events: dict) -> None:
    await store.ingest("shop1", list(events), list(events), SessionInfo(user_agent="UA"))


async def bodies(backend) -> dict[tuple[str, str], dict]:
    from server.jsontext import loads

    return {(vendor, key): loads(request)["json"] for vendor, key, request in await backend.rows(
        "SELECT vendor, dedup_key, request FROM deliveries")}


def check_remarkety(body: dict, created: dict, status: str, updated_at: str) -> None:
    """orders/update = orders/create with the new status and updated_at on top."""
    assert body == {**created, "status": {"code": status, "name": status},
                    "updated_at": updated_at, "customer": body["customer"]}
    assert body["customer"]["email"] == EMAIL
    for field in ("line_items", "created_at", "currency", "subtotal_price", "total_discounts",
                  "total_shipping", "total_tax", "total_price"):
        assert body[field] == created[field], field


def check_sendlane(body: dict, placed: dict, status: str) -> None:
    assert body["event_id"] == f"1001:{status}" and body["status"] == status
    for field in ("line_items", "subtotal", "total_tax", "total", "total_items", "currency",
                  "discounts"):
        assert body[field] == placed[field], field


async def test_a_status_change_and_a_refund_carry_the_order_as_created(backend) -> None:
    store = await backend.open(backend.settings(**VENDORS))
    try:
        await ingest(store, purchase())
        await ingest(store, status("cancelled"))
        await ingest(store, refund())
    finally:
        await store.close()
    sent = await bodies(backend)
    created = sent[("remarkety", "orders/create:1001")]
    assert created["total_price"] == 37.74 and len(created["line_items"]) == 2
    check_remarkety(sent[("remarkety", "orders/update:1001:cancelled")], created, "cancelled",
                    "2025-11-25T16:00:00+00:00")
    # The refund's 5.00 and its one line are the refund's, never the order's; a partial
    # refund repeats the order's latest status (status.name is mandatory) and says so in
    # financial_status.
    partial = sent[("remarkety", "orders/update:1001:partially_refunded:rf-1001")]
    assert partial.pop("financial_status") == {"code": "partially_refunded",
                                               "name": "partially_refunded"}
    check_remarkety(partial, created, "cancelled", "2025-11-26T16:00:00+00:00")
    placed = sent[("sendlane", "order-placed:1001")]
    check_sendlane(sent[("sendlane", "order-placed:1001:cancelled")], placed, "cancelled")
    # Sendlane's per-product events read line_items: a refund naming one line sends that
    # line (completed from the order as placed), under a key of its own; the money stays
    # the order's.
    [key] = [k for v, k in sent if v == "sendlane" and k.startswith("order-placed:1001:refunded:")]
    refunded = sent[("sendlane", key)]
    assert refunded["line_items"] == [line for line in placed["line_items"]
                                      if line["product_id"] == "SKU-435"]
    assert refunded["event_id"] == key.removeprefix("order-placed:")
    assert refunded["total"] == placed["total"] and refunded["status"] == "refunded"


async def test_a_partial_refund_repeats_the_latest_status_not_the_creation_one(backend) -> None:
    """purchase -> order_status fulfilled -> partial refund: the refund's orders/update
    carries status fulfilled (Remarkety's order requires status.name; the creation's
    completed would undo the fulfilment), stored or planned earlier in the same batch, as
    the Remarkety orders export states the order; an order whose id starts with the
    other's and a colon ("1001:2") lends it nothing; a status change of an order never
    seen is as before (``test_an_order_never_seen_keeps_the_partial_update``)."""
    from server.remarkety_export import orders_from, rows

    store = await backend.open(backend.settings(**VENDORS))
    try:
        await ingest(store, purchase("1001"), purchase("1001:2"), purchase("3003"))
        await ingest(store, status("fulfilled", order="1001"))
        await ingest(store, status("cancelled", order="1001:2"))
        await ingest(store, refund("1001"), refund("1001:2"))
        # one batch: the status change planned before the refund, not stored yet
        await ingest(store, status("processing", order="3003"), refund("3003"))
        # a later status, then another partial refund: the latest again
        await ingest(store, status("completed", order="1001", at=T0 + 2 * DAY + 1000))
        second = {**refund("1001"), "event_id": "rf-1001-b", "time_ms": T0 + 2 * DAY + 2000}
        await ingest(store, second)
    finally:
        await store.close()
    sent = await bodies(backend)
    expect = {"orders/update:1001:partially_refunded:rf-1001": "fulfilled",
              "orders/update:1001:2:partially_refunded:rf-1001:2": "cancelled",
              "orders/update:3003:partially_refunded:rf-3003": "processing",
              "orders/update:1001:partially_refunded:rf-1001-b": "completed"}
    for key, name in expect.items():
        body = sent[("remarkety", key)]
        assert body["status"] == {"code": name, "name": name}, key
        assert body["financial_status"]["code"] == "partially_refunded", key
        assert body["line_items"] == sent[("remarkety", "orders/create:" + body["id"])][
            "line_items"], key
    events = [encode_data(data) for (data,) in await backend.rows(
        "SELECT data FROM events ORDER BY seq")]
    exported = {row["order_id"]: row for row in (next(rows(order))
                                                 for order in orders_from(events)[0])}
    assert {order: row["order_status"] for order, row in exported.items()} == {
        "1001": "completed", "1001:2": "cancelled", "3003": "processing"}
    assert {row["order_financial_status"] for row in exported.values()} == {
        "partially_refunded"}


def encode_data(data) -> str:
    from server.jsontext import encode

    return data if isinstance(data, str) else (
        data.decode() if isinstance(data, bytes) else encode(data))


async def test_rejoiner_journeys_stop_for_a_whole_refund_not_a_partial_one(backend) -> None:
    """The store hands Rejoiner the order as converted (its cart_value): a refund of less
    than that (naming no items) leaves the journeys running; the whole value stops them."""
    rejoiner = {"rejoiner": {"site_id": "RJSITE", "api_key": "k"}}
    store = await backend.open(backend.settings(**rejoiner))
    try:
        await ingest(store, purchase("1001"), purchase("1002"))
        await ingest(store, refund("1001", value=5.00, items=[]),
                     refund("1002", value=30.00, items=[]))
    finally:
        await store.close()
    keys = {key for vendor, key in await bodies(backend) if vendor == "rejoiner"}
    assert keys == {"convert:1001", "convert:1002", "cancel:1002:refunded"}


async def test_a_purchase_and_its_status_in_one_request_and_one_batch(backend) -> None:
    """The order's creation planned earlier in the same batch (not stored yet) counts too."""
    store = await backend.open(backend.settings(**VENDORS))
    try:
        await ingest(store, purchase(), status("fulfilled"))
    finally:
        await store.close()
    sent = await bodies(backend)
    check_remarkety(sent[("remarkety", "orders/update:1001:fulfilled")],
                    sent[("remarkety", "orders/create:1001")], "fulfilled",
                    "2025-11-25T16:00:00+00:00")
    check_sendlane(sent[("sendlane", "order-placed:1001:fulfilled")],
                   sent[("sendlane", "order-placed:1001")], "fulfilled")


async def test_an_order_never_seen_keeps_the_partial_update(backend) -> None:
    store = await backend.open(backend.settings(**VENDORS))
    try:
        await ingest(store, purchase("1001"))
        await ingest(store, status("processing", order="2002"))
    finally:
        await store.close()
    sent = await bodies(backend)
    body = sent[("remarkety", "orders/update:2002:processing")]
    assert sorted(body) == ["customer", "email", "id", "status", "updated_at"]
    assert body["id"] == "2002" and body["status"] == {"code": "processing", "name": "processing"}
    assert sorted(sent[("sendlane", "order-placed:2002:processing")]) == [
        "customer_id", "email", "event", "event_id", "order_id", "status", "token"]


async def test_the_order_look_up_searches_the_deliveries_unique_key(backend) -> None:
    """One look-up per batch, a probe of the unique (site_id, vendor, dedup_key, claim) index
    a key, on either backend (a scan would grow with every delivery stored)."""
    store = await backend.open(backend.settings(**VENDORS))
    await store.close()
    if backend.name == "sqlite":
        from server.store import sqlite_ingest

        plan = " ".join(row[-1] for row in await backend.rows(
            "EXPLAIN QUERY PLAN " + sqlite_ingest._ORDERS + "(?, ?)", "shop1", "remarkety",
            "orders/create:1", "orders/create:2"))
        assert "SEARCH deliveries USING INDEX" in plan and "dedup_key=?" in plan, plan
        return
    import asyncpg

    from server.store import pg_ingest

    conn = await asyncpg.connect(backend.database)
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = " ".join(row[0] for row in await conn.fetch(
            "EXPLAIN " + pg_ingest._ORDERS, ["shop1"], ["remarkety"], ["orders/create:1"]))
    finally:
        await conn.close()
    assert "Index Scan using deliveries_site_id_vendor_dedup_key_claim_key" in plan, plan
    assert "dedup_key = u.k" in plan, plan



async def test_a_status_change_waits_for_its_purchase_another_node_is_committing(
        pg_database) -> None:
    """PostgreSQL, several nodes: the look-up takes the advisory locks a fact's row is written
    under, so a purchase another node is committing at that moment is waited for and read,
    not missed (the status change would go out partial)."""
    import asyncio

    import asyncpg

    from backends import Backend
    from server import outbox
    from server.jsontext import encode
    from server.store import pg_ingest

    backend = Backend("postgresql", pg_database)
    settings = backend.settings(**VENDORS)
    store = await backend.open(settings)
    other = await asyncpg.connect(pg_database)  # the other node, mid-transaction
    try:
        buy = purchase()
        site = settings.sites["shop1"]
        buy["identity"] = {"email": EMAIL, "customer_id": "42", "id": None, "is_new": True}
        transaction = other.transaction()
        await transaction.start()
        seq = await other.fetchval(
            "INSERT INTO events (site_id, event_id, name, source, received_ms, raw, data) "
            "VALUES ('shop1', 'buy-1001', 'purchase', 'backend', 0, '{}', $1) RETURNING seq",
            encode(buy).decode())
        await pg_ingest.insert_deliveries(other, [("shop1", seq, row, None)
                                                  for row in outbox.plan(site, buy)], T0)
        waiting = asyncio.ensure_future(ingest(store, status("cancelled")))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # waits for the purchase's commit
        await transaction.commit()
        await asyncio.wait_for(waiting, 10)
    finally:
        await other.close()
        await store.close()
    sent = await bodies(backend)
    check_remarkety(sent[("remarkety", "orders/update:1001:cancelled")],
                    sent[("remarkety", "orders/create:1001")], "cancelled",
                    "2025-11-25T16:00:00+00:00")


async def test_an_expired_status_change_replayed_repeats_its_order(backend) -> None:
    """Re-planning outside ingest looks the order up too: a customer known by id alone
    bought and had the order cancelled (both held for an email, then expired); once the
    customer has an email, replaying the expired rows sends the update with the order."""
    import time

    store = await backend.open(backend.settings(**VENDORS))
    who = {"customer_id": "C1"}
    try:
        await ingest(store, event({"event": "purchase", "event_id": "buy-c1", "time": T0,
                                   "user": who, "ecommerce": {
                                       "transaction_id": "1001", "currency": "USD",
                                       "value": 30.00, "items": [item("SKU-1", 29.99)]}}),
                     event({"event": "order_status", "event_id": "st-c1", "time": T0 + DAY,
                            "transaction_id": "1001", "status": "cancelled", "user": who}))
        now = int(time.time() * 1000)
        assert await store.expire_held(now + 1, now) >= 4
        await ingest(store, event({"event": "identify", "event_id": "id-c1", "time": T0,
                                   "user": {**who, "email": EMAIL}}))
        replayed = await store.replay_rows(now, states=("expired",))
    finally:
        await store.close()
    assert {row["dedup_key"] for row in replayed} >= {"orders/create:1001",
                                                      "orders/update:1001:cancelled"}
    sent = await bodies(backend)
    update = sent[("remarkety", "orders/update:1001:cancelled")]
    created = sent[("remarkety", "orders/create:1001")]
    assert update["line_items"] == created["line_items"] and len(update["line_items"]) == 1
    assert update["total_price"] == created["total_price"] == 30
    assert update["customer"]["email"] == EMAIL
    placed = sent[("sendlane", "order-placed:1001")]
    assert sent[("sendlane", "order-placed:1001:cancelled")]["line_items"] == placed["line_items"]


async def test_a_backfilled_status_change_repeats_its_order(backend, tmp_path) -> None:
    """History's status changes are planned as live ones are: with the order as onetag
    reported it (a live purchase's, or one backfilled earlier in the run: in an earlier
    batch, committed or still being written, or earlier in the same batch)."""
    import io
    import json

    from server.backfill import Backfill

    settings = backend.settings(**VENDORS)
    store = await backend.open(settings)
    lines = [
        {"event": "purchase", "time": T0, "transaction_id": "B1",
         "user": {"email": EMAIL, "customer_id": "42"},
         "ecommerce": {"currency": "USD", "value": "19.00",
                       "items": [{"item_id": "SKU-1", "item_name": "Mug", "price": "9.50",
                                  "quantity": 2}]}},
        {"event": "purchase", "time": T0, "transaction_id": "B2",
         "user": {"email": EMAIL, "customer_id": "42"},
         "ecommerce": {"currency": "USD", "value": "4.35",
                       "items": [{"item_id": "SKU-435", "price": "4.35"}]}},
        {"event": "order_status", "time": T0 + DAY, "transaction_id": "B2",
         "status": "fulfilled", "user": {"customer_id": "42"}},
        {"event": "order_status", "time": T0 + DAY, "transaction_id": "B1",
         "status": "fulfilled", "user": {"customer_id": "42"}},
        {"event": "order_status", "time": T0 + DAY, "transaction_id": "1001",
         "status": "fulfilled", "user": {"email": EMAIL}},
    ]
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    try:
        await ingest(store, purchase())  # a live order, 1001
        for batch_lines in (1, 500):  # each line a batch; then the whole file one batch
            await backend.rows("DELETE FROM deliveries WHERE dedup_key LIKE '%:fulfilled'")
            await backend.rows("DELETE FROM backfill_runs")
            run = Backfill(settings.sites["shop1"], [path], send=True, batch_lines=batch_lines,
                           pace=0, stream=io.StringIO(), tty=False)
            await run.run(store=store)
            sent = await bodies(backend)
            for order in ("1001", "B1", "B2"):
                placed = sent[("sendlane", f"order-placed:{order}")]
                status = sent[("sendlane", f"order-placed:{order}:fulfilled")]
                assert status["line_items"] == placed["line_items"], (batch_lines, order)
                assert status["total"] == placed["total"], (batch_lines, order)
                assert status["initial_sync"] is True and status["status"] == "fulfilled"
    finally:
        await store.close()


def test_two_partial_refunds_of_an_order_in_a_history_are_two_events() -> None:
    """A history line without an event_id gets one from what it states: two refunds of one
    order naming different lines are two refunds (each is its own order-placed at
    Sendlane), not one line twice."""
    from server.backfill import natural_key

    def partial(sku: str) -> dict:
        return refund(items=[item(sku, 4.35)])

    assert natural_key(partial("SKU-1")) != natural_key(partial("SKU-2"))
    assert natural_key(partial("SKU-1")) == natural_key(partial("SKU-1"))
    assert natural_key(refund(items=[])) == "refund:1001:refunded"


def readme_backend_bodies() -> list[dict]:
    """The bodies of README Quick start step 5's curl commands, in order."""
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    step = readme.split("\n5. From your backend", 1)[1].split("\nThe full vocabulary", 1)[0]
    return [json.loads(body) for body in re.findall(r"-d '(\{.*?\})'", step, re.S)]


async def test_the_readme_backend_example_sends_the_order_before_its_status(backend) -> None:
    """Quick start step 5 as written: a purchase, then its order_status, which vendors get
    with the order's lines (an order_status of an order never sent had none)."""
    raws = readme_backend_bodies()
    assert [raw["event"] for raw in raws] == ["purchase", "order_status"]
    assert all(raw["user"].get("customer_id") for raw in raws)
    store = await backend.open(backend.settings(**VENDORS))
    try:
        for n, raw in enumerate(raws):
            await ingest(store, event({**raw, "event_id": f"readme-{n}", "time": T0 + n}))
    finally:
        await store.close()
    sent = await bodies(backend)
    created = sent[("remarkety", "orders/create:1001")]
    assert len(created["line_items"]) == 1
    changed = sent[("remarkety", "orders/update:1001:fulfilled")]
    assert changed["status"]["code"] == "fulfilled"
    assert changed["line_items"] == created["line_items"]
    assert changed["total_price"] == created["total_price"] == 29.99
    update = sent[("sendlane", "order-placed:1001:fulfilled")]
    assert len(update["line_items"]) == 1 and update["customer_id"] == "C-42"


def test_the_remarkety_export_says_a_partial_refund_in_the_financial_status() -> None:
    """``onetag export remarkety-orders`` states an order as orders/update does: a partial
    refund (items named, or a value below the order's) leaves the order's status and says
    partially_refunded in its financial status; a refund of the whole order says refunded
    in both."""
    from server.jsontext import encode
    from server.remarkety_export import orders_from, rows

    def exported(*events: dict) -> tuple[str, str]:
        [order], _ = orders_from(encode(e) for e in events)
        row = next(rows(order))
        return row["order_status"], row["order_financial_status"]

    fulfilled = status("fulfilled")
    by_items = refund()  # 5.00 naming one line of a 30.00 order
    by_value = refund(items=[])
    assert exported(purchase(), fulfilled, by_items) == ("fulfilled", "partially_refunded")
    assert exported(purchase(), by_value) == ("completed", "partially_refunded")
    whole = refund(value=30.00, items=[])
    assert exported(purchase(), by_items, whole) == ("refunded", "refunded")
    assert exported(purchase(), fulfilled) == ("fulfilled", "")
