"""Remarkety's customers and carts as the store hands them to its adapter, on both backends.

Remarkety's event reference makes ``customer.created_at`` mandatory on an order and keys a
cart by its ``id`` ("keep the same id so that carts don't get duplicated"): both must be
facts the store keeps, not the time or cookie of the event at hand.
"""

from __future__ import annotations

from server.events import Origin, normalise
from server.store.base import SessionInfo
from server.vendors._common import iso_time

from support import item

EMAIL = "a@b.co"
DAY = 86_400_000
T0 = 1_764_000_000_000
SC = "CDA68358-94FB-4D83-9655-3FEB3C4114A3"
VENDORS = {"remarkety": {"store_id": "RMSTORE", "api_key": "k"}}


def event(raw: dict, sc: str | None = None, source: str = "backend") -> dict:
    origin = Origin(site_id="shop1", source=source, currency="USD", received_ms=T0 + 9 * DAY,
                    sc=sc)
    return normalise(raw, "e", origin)


def purchase(order: str, at: int, sc: str | None = None) -> dict:
    return event({"event": "purchase", "event_id": f"buy-{order}", "time": at,
                  "user": {"email": EMAIL}, **({"sc": sc} if sc else {}),
                  "ecommerce": {"transaction_id": order, "currency": "USD", "value": 29.99,
                                "items": [item("SKU-1", 29.99)]}}, sc)


def add(event_id: str, at: int, sku: str = "SKU-1") -> dict:
    return event({"event": "add_to_cart", "event_id": event_id, "time": at,
                  "ecommerce": {"currency": "USD", "items": [item(sku, 29.99)]}}, SC, "browser")


async def ingest(store, *events: dict) -> None:
    await store.ingest("shop1", list(events), list(events), SessionInfo(user_agent="UA"))


async def bodies(backend) -> dict[tuple[str, str], dict]:
    from server.jsontext import loads

    return {(vendor, key): loads(request)["json"] for vendor, key, request in await backend.rows(
        "SELECT vendor, dedup_key, request FROM deliveries")}


async def test_customer_created_at_is_when_the_customer_was_first_known(backend) -> None:
    """Every order and cart names the customer with one created_at: when the store first knew
    them (the identity's creation), not each event's own time."""
    store = await backend.open(backend.settings(**VENDORS))
    try:
        await ingest(store, event({"event": "identify", "event_id": "id-1", "time": T0,
                                   "user": {"email": EMAIL}}, SC))
        await ingest(store, add("add-1", T0 + DAY))  # a browser event: the session's identity
        await ingest(store, purchase("1001", T0 + 2 * DAY))
        await ingest(store, purchase("1002", T0 + 5 * DAY))
    finally:
        await store.close()
    [(created_ms,)] = await backend.rows("SELECT created_ms FROM identities")
    sent = await bodies(backend)
    first = sent[("remarkety", "orders/create:1001")]["customer"]["created_at"]
    assert first == iso_time(created_ms)
    assert sent[("remarkety", "orders/create:1002")]["customer"]["created_at"] == first
    [cart] = [body for (vendor, key), body in sent.items() if key.startswith("carts/update:")]
    assert cart["customer"]["created_at"] == first
    assert cart["created_at"] != first  # the cart's own time is the cart's
    [profile] = [body for (vendor, key), body in sent.items() if key.startswith("customers/")]
    assert profile["created_at"] == first


GUID_A = "6F9619FF-8B86-4011-B42D-00CF4FC964FF"
GUID_B = "0F9619FF-8B86-4011-B42D-00CF4FC964F0"


async def test_each_cart_has_its_own_id_stable_across_its_updates(backend) -> None:
    """carts/update's id is the cart's, not the visitor's year-long sc: the cart after a
    purchase is a new cart (the first one converted), and each cart keeps its id across its
    updates. It is the GUID of the cart's first state: the one the page named, so the page's
    carts/update (templates/vendors/remarkety.js.j2) and the server's name one cart."""
    store = await backend.open(backend.settings(**VENDORS))
    try:
        await ingest(store, event({"event": "identify", "event_id": "id-1", "time": T0,
                                   "user": {"email": EMAIL}}, SC))
        await ingest(store, {**add("add-1", T0 + 1), "cart_guid": GUID_A})
        await ingest(store, add("add-2", T0 + 2, "SKU-2"))
        await ingest(store, purchase("1001", T0 + 3, SC))
        await ingest(store, {**add("add-3", T0 + 4), "cart_guid": GUID_B})
        await ingest(store, add("add-4", T0 + 5, "SKU-3"))
        await ingest(store, purchase("1002", T0 + 6, SC))
        await ingest(store, add("add-5", T0 + 7))  # the page named no GUID: the store's
    finally:
        await store.close()
    from server.jsontext import loads

    ids = [loads(request)["json"]["id"] for (request,) in await backend.rows(
        "SELECT request FROM deliveries WHERE dedup_key LIKE 'carts/update:%' ORDER BY id")]
    assert ids[:4] == [GUID_A, GUID_A, GUID_B, GUID_B], ids
    assert len(ids) == 5 and ids[4] not in (GUID_A, GUID_B, SC), ids
    assert SC not in ids
