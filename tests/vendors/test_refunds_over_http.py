"""Partial refunds and a backend order of a customer never seen, end to end: the real app, a
real SQLite file and the fake vendors over loopback.

- Sendlane's custom integration guide ("Server-side API events", "Event IDs"): "If the same
  combination of event and id are sent more than once, Sendlane will record the first event
  and skip all subsequent events with the same event and id combination." Two partial
  refunds of one order are two events: each needs its own delivery and its own event_id; a
  retry of the same backend event (same event_id) stays one.
- Remarkety's order JSON (built-in events reference, orders/create; orders/update is "the
  same format") has ``status`` and ``financial_status`` objects: a partial refund does not
  refund the order, so its status is not "refunded" but the order's latest as onetag sent it
  (``status.name`` is mandatory on an order); its financial_status says partially refunded.
"""

from __future__ import annotations

import httpx

from server import config

from fakes.harness import backend, item, rows, serve, settings_data, until

EMAIL = "jim@example.com"


async def settled(db) -> None:
    await until(lambda: not rows(db, "d.state = 'pending'"), what="deliveries to settle",
                describe=lambda: rows(db, "d.state = 'pending'"))


def order(transaction_id: str = "1001") -> dict:
    """A 50.00 order: five of one item at 10.00."""
    return {"event": "purchase", "event_id": f"order-{transaction_id}", "user": {"email": EMAIL},
            "ecommerce": {"currency": "USD", "transaction_id": transaction_id, "value": "50.00",
                          "items": [item("SKU-1", "10.00", 5)]}}


def refund(event_id: str, value: str = "10.00", items: list | None = None,
           transaction_id: str = "1001") -> dict:
    ecommerce = {"currency": "USD", "transaction_id": transaction_id, "value": value}
    if items is not None:
        ecommerce["items"] = items
    return {"event": "refund", "event_id": event_id, "user": {"email": EMAIL},
            "ecommerce": ecommerce}


async def run(tmp_path, fake, *batches: list[dict]) -> list[dict]:
    settings = config.parse(settings_data(tmp_path, fake, only=("remarkety", "sendlane")),
                            env={})
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        for batch in batches:
            await backend(client, *batch)
            await settled(db)
    return rows(db)


async def test_two_partial_refunds_of_the_same_amount_are_two_refunds(tmp_path, fake) -> None:
    """Two refunds of 10.00 of a 50.00 order, one naming its line (GA4's partial refund), the
    other only its value: each reaches Sendlane under its own event_id; the backend's retry
    of the first (same event_id) does not."""
    line = [item("SKU-1", "10.00", 1)]
    await run(tmp_path, fake, [order()], [refund("rf-1", items=line)],
              [refund("rf-2", items=line)], [refund("rf-1", items=line)],
              [refund("rf-3")], [refund("rf-4")])
    sent = [r.json for r in fake.requests("sendlane")]
    assert [(body["event_id"], body["status"]) for body in sent] == [
        ("1001", "completed"), ("1001:refunded:rf-1", "refunded"),
        ("1001:refunded:rf-2", "refunded"), ("1001:refunded:rf-3", "refunded"),
        ("1001:refunded:rf-4", "refunded")]
    # Lines named: those lines; value only: the order's lines, as placed.
    assert [body["line_items"][0]["quantity"] for body in sent[1:]] == [1, 1, 5, 5]
    assert all(body["total"] == 50 for body in sent)  # the order's money, never the refund's


async def test_a_refund_of_the_whole_order_is_one_fact(tmp_path, fake) -> None:
    """No items and the order's value (or none): the order becomes refunded, once, whichever
    event says it; a partial refund before it is sent too."""
    await run(tmp_path, fake, [order()], [refund("rf-1", value="10.00")],
              [refund("rf-2", value="50.00")], [refund("rf-3", value="50.00")],
              [{"event": "order_status", "event_id": "st-1", "transaction_id": "1001",
                "status": "refunded", "user": {"email": EMAIL}}])
    assert [r.json["event_id"] for r in fake.requests("sendlane")] == [
        "1001", "1001:refunded:rf-1", "1001:refunded"]
    assert [r.json.get("status") for r in fake.requests("remarkety")] == [
        {"code": "completed", "name": "completed"},  # partial: the order's status again
        {"code": "completed", "name": "completed"}, {"code": "refunded", "name": "refunded"}]


async def test_a_partial_refund_does_not_mark_the_remarkety_order_refunded(tmp_path,
                                                                          fake) -> None:
    fulfilled = {"event": "order_status", "event_id": "st-1", "transaction_id": "1001",
                 "status": "fulfilled", "user": {"email": EMAIL}}
    found = await run(tmp_path, fake, [order()], [fulfilled],
                      [refund("rf-1", items=[item("SKU-1", "10.00", 1)])], [refund("rf-2")])
    created, shipped, *updates = [r.json for r in fake.requests("remarkety")]
    assert [r.headers["x-event-type"] for r in fake.requests("remarkety")] == [
        "orders/create", "orders/update", "orders/update", "orders/update"]
    assert shipped["status"] == {"code": "fulfilled", "name": "fulfilled"}
    for body in updates:
        # The order's latest status again (status.name is mandatory), not the creation's
        # completed, which would undo the fulfilment.
        assert body["status"] == shipped["status"]
        assert body["financial_status"] == {"code": "partially_refunded",
                                            "name": "partially_refunded"}
        for field in ("line_items", "created_at", "subtotal_price", "total_price"):
            assert body[field] == created[field], field  # the order's, not the refund's
    assert {r["dedup_key"] for r in found if r["vendor"] == "remarkety"} == {
        "orders/create:1001", "orders/update:1001:fulfilled",
        "orders/update:1001:partially_refunded:rf-1",
        "orders/update:1001:partially_refunded:rf-2"}
    # A refund of the whole order: refunded, in both.
    await run(tmp_path, fake, [refund("rf-9", value="50.00")])
    last = fake.requests("remarkety")[-1].json
    assert last["status"] == last["financial_status"] == {"code": "refunded", "name": "refunded"}
