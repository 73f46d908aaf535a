"""Remarkety webhooks: golden requests per CONTRACT.md section 7, with the mandatory fields of
Remarkety's event reference (REFERENCE.md 2.3) and exact decimal money."""

from __future__ import annotations

import dataclasses
import json

from server.vendors import remarkety

from ._events import (BOOK, CLIP, EMAIL, GUID, MUG, PAGE, PEN, SC, T_ISO, T_MS, T_UNIX, cart,
                      context, ecommerce, event, identity, item, samples)

CTX = context(remarkety)
URL = "https://webhooks.remarkety.com/webhooks/?storeId=RMSTORE"
WHO = identity(customer_id="42", first_name="Jimmy", last_name="Kim", phone="8885552664",
               accepts_marketing=True)
CUSTOMER = {"email": EMAIL, "id": "42", "first_name": "Jimmy", "last_name": "Kim",
            "accepts_marketing": True, "default_address": {"phone": "8885552664"},
            "created_at": T_ISO, "updated_at": T_ISO}
MUG_LINE = {"product_id": "SKU-1000", "sku": "SKU-1000", "name": "Mug", "title": "Mug",
            "vendor": "Acme", "quantity": 1, "price": 29.99,
            "url": "https://shop.example/p/mug", "image": "https://shop.example/i/mug.jpg"}
PEN_LINE = {"product_id": "SKU-435", "sku": "SKU-435", "name": "Pen", "title": "Pen",
            "quantity": 1, "price": 4.35}


def headers(event_type):
    return {"x-event-type": event_type, "x-event-time": T_UNIX}


def test_identify_creates_a_new_customer():
    evt = event("identify", user={"email": EMAIL}, identity={**WHO, "is_new": True})
    [req] = remarkety.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", URL)
    assert dict(req.headers) == headers("customers/create")
    assert req.json == {"email": EMAIL, "id": "42", "first_name": "Jimmy", "last_name": "Kim",
                        "accepts_marketing": True, "default_address": {"phone": "8885552664"},
                        "updated_at": T_ISO}
    assert req.needs_email is True
    assert req.dedup_key.startswith(f"customers/create:{EMAIL}:")


def test_identify_updates_a_known_customer_and_leaves_unknown_consent_out():
    evt = event("identify", user={"email": EMAIL}, identity=identity(first_name="Jimmy"))
    [req] = remarkety.plan(evt, CTX)
    assert dict(req.headers) == headers("customers/update")
    assert req.json == {"email": EMAIL, "first_name": "Jimmy", "updated_at": T_ISO}
    again = remarkety.plan({**evt, "event_id": "EVT-2", "time_ms": evt["time_ms"] + 60000}, CTX)
    assert again[0].dedup_key == req.dedup_key  # same profile: sent once
    changed = remarkety.plan({**evt, "identity": identity(first_name="James")}, CTX)
    assert changed[0].dedup_key != req.dedup_key


def test_cart_change_sends_the_whole_cart_under_the_session_id():
    evt = event("begin_checkout", page=PAGE, ecommerce=ecommerce(MUG, PEN), cart=cart(MUG, PEN),
                identity=WHO)
    [req] = remarkety.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", URL)
    assert dict(req.headers) == headers("carts/update")
    assert req.json == {
        "id": SC,
        "abandoned_checkout_url": "https://shop.example/checkout",
        "accepts_marketing": True,
        "created_at": T_ISO,
        "updated_at": T_ISO,
        "currency": "USD",
        "customer": CUSTOMER,
        "email": EMAIL,
        "line_items": [MUG_LINE, PEN_LINE],
        "subtotal_price": 34.34,
        "total_discounts": 0,
        "total_price": 34.34,
    }
    assert req.dedup_key == f"carts/update:{GUID}"
    assert req.needs_email is True


def test_an_anonymous_cart_is_held_with_its_mandatory_nulls():
    evt = event("add_to_cart", ecommerce=ecommerce(PEN), cart=cart(PEN, guid="G2"))
    [req] = remarkety.plan(evt, CTX)
    assert req.needs_email is True
    assert req.json["customer"] is None and req.json["email"] is None
    assert req.json["accepts_marketing"] is None and req.json["abandoned_checkout_url"] is None
    assert req.dedup_key == "carts/update:G2"
    [emptied] = remarkety.plan(event("remove_from_cart", ecommerce=ecommerce(PEN),
                                     cart=cart(guid="G3"), identity=WHO), CTX)
    assert emptied.json["line_items"] == [] and emptied.json["total_price"] == 0


def test_a_cart_event_without_a_session_cart_plans_nothing():
    assert remarkety.plan(event("add_to_cart", sc=None, ecommerce=ecommerce(PEN)), CTX) == []


def test_purchase_creates_the_order_and_deletes_the_bought_cart():
    order = ecommerce(MUG, PEN, value=3000, tax=275, shipping=499, transaction_id="1001",
                      coupon="SALE")
    evt = event("purchase", ecommerce=order, cart=cart(MUG, PEN), identity=WHO)
    [create] = remarkety.plan(evt, CTX)  # no carts/delete: not a documented event type
    assert dict(create.headers) == headers("orders/create")
    assert create.json == {
        "id": "1001",
        "created_at": T_ISO,
        "updated_at": T_ISO,
        "currency": "USD",
        "email": EMAIL,
        "customer": CUSTOMER,
        "line_items": [MUG_LINE, PEN_LINE],
        "status": {"code": "completed", "name": "completed"},
        "subtotal_price": 34.34,
        "total_discounts": 4.34,  # subtotal 34.34 - value 30.00, positive
        "total_shipping": 4.99,
        "total_tax": 2.75,
        "total_price": 37.74,  # 30.00 + 2.75 + 4.99
        "discount_codes": [{"code": "SALE", "amount": 4.34, "type": "fixed_amount"}],
    }
    assert create.dedup_key == "orders/create:1001"
    assert create.needs_email is True


def test_order_money_is_exact_decimal():
    evt = event("purchase", source="backend", sc=None, status="processing",
                user={"email": EMAIL}, identity=identity(),
                ecommerce=ecommerce(PEN, CLIP, BOOK, tax=519, shipping=499,
                                    transaction_id="1002"))
    [req] = remarkety.plan(evt, CTX)  # no session: no cart to delete
    prices = [line["price"] for line in req.json["line_items"]]
    assert prices == [4.35, 0.57, 19.99]
    text = json.dumps(req.json)
    assert '"price": 4.35' in text and '"price": 0.57' in text and '"price": 19.99' in text
    assert '"subtotal_price": 64.89' in text and '"total_price": 75.07' in text
    assert '"total_discounts": 0' in text
    assert req.json["status"] == {"code": "processing", "name": "processing"}
    assert req.json["customer"]["accepts_marketing"] is None  # mandatory: null = unknown


def test_order_status_updates_the_order_with_what_is_known():
    evt = event("order_status", source="backend", sc=None, status="fulfilled",
                user={"email": EMAIL}, ecommerce=ecommerce(transaction_id="1001"),
                identity=WHO)
    [req] = remarkety.plan(evt, CTX)
    assert dict(req.headers) == headers("orders/update")
    assert req.json == {"id": "1001", "updated_at": T_ISO, "email": EMAIL,
                        "customer": CUSTOMER, "status": {"code": "fulfilled", "name": "fulfilled"}}
    assert req.dedup_key == "orders/update:1001:fulfilled"
    refunded = remarkety.plan(event("refund", ecommerce=ecommerce(PEN, value=435,
                                                                  transaction_id="1001"),
                                    identity=WHO), CTX)[0]
    # A refund naming items refunds part of the order: not "refunded", financial_status
    # partially_refunded, a key per refund. Of an order onetag never reported (no
    # orders/create, no status change: CTX has neither) it knows no status to repeat, so
    # none is sent, and Remarkety keeps the one it has.
    assert "status" not in refunded.json
    assert refunded.json["financial_status"] == {"code": "partially_refunded",
                                                 "name": "partially_refunded"}
    assert "total_price" not in refunded.json  # a refund's value is not the order's total
    assert refunded.dedup_key == f"orders/update:1001:partially_refunded:{SC}/EVT-1"
    whole = remarkety.plan(event("refund", ecommerce=ecommerce(value=435, transaction_id="1001"),
                                 identity=WHO), CTX)[0]  # the order unknown: no items, whole
    assert whole.json["status"] == whole.json["financial_status"] == {"code": "refunded",
                                                                      "name": "refunded"}
    assert whole.dedup_key == "orders/update:1001:refunded"


def test_order_status_repeats_the_order_as_created_with_the_new_status():
    """orders/update has "the same format as orders/create" (RM events): given the order's
    orders/create body (``PlanContext.order``), the update is that order with the new status,
    updated_at and customer on top; a refund's value never becomes the order's totals."""
    created = remarkety.plan(event("purchase", ecommerce=ecommerce(
        MUG, PEN, value=3000, tax=275, shipping=499, transaction_id="1001", coupon="SALE"),
        identity=WHO), CTX)[0].json
    day = 86_400_000
    ctx = dataclasses.replace(CTX, order=created)
    evt = {**event("order_status", source="backend", sc=None, status="fulfilled",
                   user={"email": EMAIL}, ecommerce=ecommerce(transaction_id="1001"),
                   identity=identity()), "time_ms": T_MS + day}
    [req] = remarkety.plan(evt, ctx)
    customer = {**req.json["customer"]}
    assert req.json == {**created, "updated_at": "2025-11-25T16:00:00+00:00",
                        "customer": customer, "status": {"code": "fulfilled",
                                                         "name": "fulfilled"}}
    assert req.json["created_at"] == T_ISO and customer["email"] == EMAIL
    assert customer["created_at"] == T_ISO  # first seen with the order
    assert customer["updated_at"] == "2025-11-25T16:00:00+00:00"
    assert dict(req.headers)["x-event-type"] == "orders/update"
    assert req.dedup_key == "orders/update:1001:fulfilled"
    refunded = remarkety.plan({**event("refund", ecommerce=ecommerce(
        PEN, value=435, transaction_id="1001"), identity=WHO), "time_ms": T_MS + 2 * day}, ctx)[0]
    # Partial, and no status change reported yet: the order's status as orders/create sent
    # it (status.name is mandatory on an order, RM events).
    assert refunded.json["status"] == created["status"] == {"code": "completed",
                                                            "name": "completed"}
    assert refunded.json["financial_status"]["code"] == "partially_refunded"
    assert (refunded.json["total_price"], refunded.json["line_items"]) == (
        37.74, [MUG_LINE, PEN_LINE])  # the order's, not the refund's 4.35
    # After the fulfilment (its orders/update body, ``PlanContext.order_updates``): the
    # partial refund repeats fulfilled, never the creation status that would undo it.
    fulfilled = dataclasses.replace(ctx, order_updates=[req.json])
    # No items, a value below the order's 30.00: partial too; the order's value: whole.
    partly = {"code": "fulfilled", "name": "fulfilled"}
    for value, status in ((435, partly), (3000, {"code": "refunded", "name": "refunded"})):
        [again] = remarkety.plan({**event("refund", ecommerce=ecommerce(
            value=value, transaction_id="1001"), identity=WHO), "time_ms": T_MS + 2 * day},
            fulfilled)
        assert again.json["status"] == status, value
        assert again.json["financial_status"]["code"] == (
            "partially_refunded" if status is partly else "refunded")
    assert remarkety.ORDER_KEY.format(order="1001") == "orders/create:1001"
    assert remarkety.ORDER_UPDATES_KEY.format(order="1001", status="fulfilled") == req.dedup_key


def test_a_partial_refund_repeats_the_latest_status_reported():
    """The latest by the status event's time (``updated_at``), as the orders export orders
    them, not by the order the store hands them in; another order's body is none of its;
    without an orders/create the latest status change still gives it."""
    def update(status: str, when: str, order: str = "1001") -> dict:
        return {"id": order, "updated_at": when, "status": {"code": status, "name": status}}
    refund = event("refund", ecommerce=ecommerce(PEN, value=435, transaction_id="1001"),
                   identity=WHO)
    cases = [
        ([update("fulfilled", "2025-11-26T10:00:00+00:00"),
          update("processing", "2025-11-25T10:00:00+00:00")], "fulfilled"),
        ([update("processing", "2025-11-25T10:00:00+00:00"),
          update("cancelled", "2025-11-26T10:00:00+00:00")], "cancelled"),
        ([update("processing", "2025-11-25T10:00:00+00:00"),
          update("cancelled", "2025-11-26T10:00:00+00:00", order="1001:x")], "processing"),
    ]
    for updates, status in cases:
        [req] = remarkety.plan(refund, dataclasses.replace(CTX, order_updates=updates))
        assert req.json["status"] == {"code": status, "name": status}, updates
        assert "line_items" not in req.json  # no orders/create: only what is known


def test_product_updated_sends_one_product_each():
    sold_out = item("SKU-2", 1250, 1, item_name="Cup", item_variant="Blue", in_stock=False)
    evt = event("product_updated", event_id="P1", source="backend", sc=None,
                ecommerce=ecommerce(MUG, sold_out))
    mug, cup = remarkety.plan(evt, CTX)
    assert dict(mug.headers) == headers("products/update")
    assert mug.json == {
        "id": "SKU-1000", "sku": "SKU-1000", "title": "Mug", "body_html": "A mug",
        "url": "https://shop.example/p/mug", "image": {"src": "https://shop.example/i/mug.jpg"},
        "images": [{"src": "https://shop.example/i/mug.jpg"}], "vendor": "Acme",
        "categories": [{"name": "Kitchen"}, {"name": "Mugs"}], "product_exists": True,
        "updated_at": T_ISO,
        "variants": [{"id": "SKU-1000", "product_id": "SKU-1000", "sku": "SKU-1000",
                      "title": "Mug", "price": 29.99, "currency": "USD",
                      "image": "https://shop.example/i/mug.jpg"}],
    }
    assert cup.json["variants"][0]["inventory_quantity"] == 0
    assert cup.json["variants"][0]["title"] == "Blue"
    assert (mug.dedup_key, cup.dedup_key) == ("products/update:P1:0", "products/update:P1:1")
    assert not mug.needs_email


def test_consent():
    [unsub] = remarkety.plan(event("unsubscribe", event_id="U1", user={"email": EMAIL},
                                   identity=identity()), CTX)
    assert dict(unsub.headers) == headers("newsletter/unsubscribe")
    assert unsub.json == {"email": EMAIL}
    assert unsub.dedup_key == f"newsletter/unsubscribe:{SC}/U1"
    [opt] = remarkety.plan(event("opt_in", event_id="O1", user={"email": EMAIL},
                                 identity=identity()), CTX)
    assert dict(opt.headers) == headers("customers/update")
    assert opt.json == {"email": EMAIL, "accepts_marketing": True}
    assert opt.dedup_key == f"customers/update:{SC}/O1"


def test_events_without_a_webhook_plan_nothing():
    for name in ("page_view", "view_item", "view_item_list", "search", "add_to_wishlist", "*"):
        assert remarkety.plan(samples()[name], CTX) == [], name


def test_webhook_url_default_names_the_store_and_auth_is_x_token():
    assert CTX.vendor["webhook_url"] == URL
    assert remarkety.auth_headers(CTX.vendor) == {"x-token": "RM-SECRET-KEY"}
    assert remarkety.auth_headers(context(remarkety, api_key="").vendor) == {}


def test_abandoned_checkout_url_leads_to_the_cart():
    """RM events carts/update abandoned_checkout_url: "This URL should lead to the cart
    contents": the event's ecommerce.cart_url, else the site's cart_url, else the page."""
    evt = event("view_cart", page=PAGE, ecommerce=ecommerce(MUG), cart=cart(MUG), identity=WHO)
    ctx = dataclasses.replace(CTX, cart_url="https://shop.example/cart/restore?g={cart_guid}")
    assert remarkety.plan(evt, ctx)[0].json["abandoned_checkout_url"] == \
        f"https://shop.example/cart/restore?g={GUID}"
    own = {**evt, "ecommerce": {**evt["ecommerce"], "cart_url": "https://shop.example/c/77"}}
    assert remarkety.plan(own, ctx)[0].json["abandoned_checkout_url"] == \
        "https://shop.example/c/77"
    assert remarkety.plan(evt, CTX)[0].json["abandoned_checkout_url"] == \
        "https://shop.example/checkout"


def test_line_items_sku_is_the_items_sku():
    mug = {**MUG, "item_sku": "MUG-RED"}
    evt = event("purchase", ecommerce=ecommerce(mug, transaction_id="1001"), identity=WHO)
    [line] = remarkety.plan(evt, CTX)[0].json["line_items"]
    assert (line["product_id"], line["sku"]) == ("SKU-1000", "MUG-RED")
