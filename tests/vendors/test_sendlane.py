"""Sendlane API v2: golden requests per CONTRACT.md section 7, shaped as Sendlane's "Custom
Integration Setup & API v2" shows them (decimal money, `token` in the body)."""

from __future__ import annotations

import dataclasses
import json

from server.vendors import sendlane

from ._events import (BOOK, CLIP, EMAIL, GUID, MUG, PAGE, PEN, SC, cart, context, ecommerce, event,
                      identity, item, samples)

CTX = context(sendlane)
BASE = "https://api.sendlane.com/v2/tracking"
TOKEN = "ABCDEFGHIJKLM1234567890"
WHO = identity(customer_id="123456789", first_name="Jimmy", last_name="Kim",
               phone="8885552664", accepts_marketing=True)
ADDRESS = {"first_name": "Jimmy", "last_name": "Kim", "email": EMAIL, "company": "Sendlane",
           "address_1": "10620 Treena St", "address_2": "UNIT 250", "city": "San Diego",
           "state": "California", "state_code": "CA", "country": "United States",
           "country_code": "US", "postal_code": "92131", "phone": "8885552664"}
TSHIRT = item("12345678", 2498, 1, item_name="tshirt #1")


def test_purchase_is_order_placed_as_in_the_guide_example():
    # The guide's "Example order event data": one t-shirt, code 25OFF worth 4.99.
    evt = event("purchase", source="backend", sc=None, status="processing",
                user={"email": EMAIL, "customer_id": "123456789"},
                ecommerce=ecommerce(TSHIRT, value=1999, tax=0, transaction_id="1001",
                                    coupon="25OFF"),
                billing_address=ADDRESS, shipping_address=ADDRESS, identity=WHO)
    [req] = sendlane.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/order-placed")
    assert req.json == {
        "token": TOKEN,
        "event": "order_placed",
        "event_id": "1001",
        "order_id": "1001",
        "email": EMAIL,
        "phone": "8885552664",
        "customer_id": "123456789",
        "status": "processing",
        "subtotal": 24.98,
        "total_tax": 0,
        "total": 19.99,
        "total_items": 1,
        "currency": "USD",
        "discounts": {"discount_code": "25OFF", "discount_value": 4.99},
        "line_items": [{"product_id": "12345678", "sku": "12345678", "product_name": "tshirt #1",
                        "quantity": 1, "item_price": 24.98, "total": 24.98}],
        "billing_address": ADDRESS,
        "shipping_address": ADDRESS,
        "accepts_marketing": True,
    }
    assert req.dedup_key == "order-placed:1001"
    assert req.needs_email is True


def test_order_money_is_exact_decimal():
    evt = event("purchase", ecommerce=ecommerce(PEN, CLIP, BOOK, tax=519, shipping=499,
                                                transaction_id="1002"),
                cart=cart(PEN, CLIP, BOOK), identity=identity())
    [req] = sendlane.plan(evt, CTX)
    text = json.dumps(req.json)
    for fragment in ('"item_price": 4.35', '"item_price": 0.57', '"item_price": 19.99',
                     '"total": 59.97', '"subtotal": 64.89', '"total_tax": 5.19',
                     '"total": 75.07', '"total_items": 5'):
        assert fragment in text, fragment
    assert req.json["status"] == "completed"
    assert "discounts" not in req.json and "accepts_marketing" not in req.json


def test_a_status_change_is_order_placed_again_under_its_own_key():
    placed = sendlane.plan(samples()["purchase"], CTX)[0]
    evt = event("order_status", source="backend", sc=None, status="fulfilled",
                user={"email": EMAIL}, ecommerce=ecommerce(transaction_id="1001"), identity=WHO)
    [req] = sendlane.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/order-placed")
    assert req.json == {"token": TOKEN, "event": "order_placed", "event_id": "1001:fulfilled",
                        "order_id": "1001", "email": EMAIL, "phone": "8885552664",
                        "customer_id": "123456789", "status": "fulfilled"}
    assert req.dedup_key == "order-placed:1001:fulfilled" != placed.dedup_key
    cancelled = sendlane.plan({**evt, "status": "cancelled"}, CTX)[0]
    assert cancelled.dedup_key == "order-placed:1001:cancelled"
    refunded = sendlane.plan(event("refund", ecommerce=ecommerce(value=435,
                                                                 transaction_id="1001"),
                                   identity=WHO), CTX)[0]
    assert refunded.json["status"] == "refunded" and "total" not in refunded.json
    assert refunded.dedup_key == "order-placed:1001:refunded"


def test_a_status_change_repeats_the_order_as_placed():
    """Sendlane's per-product order events "execute based on the content of the line_items
    array": given the order's order-placed body (``PlanContext.order``; a backfilled one
    carries history marks), the status change carries its lines and totals, its own
    event_id and status, this config's token, and neither the history marks nor the
    purchase's consent."""
    placed = sendlane.plan(samples()["purchase"], CTX)[0].json
    stored = {**placed, "token": "OLD", "initial_sync": True, "time": 1764000000,
              "accepts_marketing": True}
    ctx = dataclasses.replace(CTX, order=stored)
    # A refund of the whole order: its value (the order's 34.34) is not the order's total.
    evt = event("refund", source="backend", sc=None, user={"email": EMAIL},
                ecommerce=ecommerce(value=3434, transaction_id="1001"),
                identity=identity(customer_id="123456789"))
    [req] = sendlane.plan(evt, ctx)
    assert req.json == {**{k: v for k, v in placed.items() if k != "accepts_marketing"},
                        "event_id": "1001:refunded", "status": "refunded",
                        "email": EMAIL, "customer_id": "123456789"}
    assert req.json["token"] == TOKEN and req.json["line_items"] == placed["line_items"]
    assert req.json["total"] == placed["total"]  # the order's, not the refund's 34.34
    assert req.dedup_key == "order-placed:1001:refunded"
    # 4.35 of it, naming no items: a partial refund, the order's lines, its own event_id.
    [part] = sendlane.plan({**evt, "ecommerce": ecommerce(value=435, transaction_id="1001")},
                           ctx)
    assert part.json == {**req.json, "event_id": "1001:refunded:EVT-1"}
    assert part.dedup_key == "order-placed:1001:refunded:EVT-1"
    assert sendlane.ORDER_KEY.format(order="1001") == "order-placed:1001"


def test_a_partial_refund_sends_only_the_refunded_lines():
    """A refund naming its items (GA4's refund: "items" for a partial refund) refunds those
    lines only: Sendlane's product events "execute based on the content of the line_items
    array" ("Order & Other Product Events"), so the order's other lines must not be in it.
    A line the refund names by id and quantity alone takes its name, SKU and price from the
    order as placed; the order's totals stay the order's. Its own event_id and key: a
    second partial refund of the order is another refund, not a repeat Sendlane skips."""
    placed = sendlane.plan(samples()["purchase"], CTX)[0].json  # MUG and PEN
    ctx = dataclasses.replace(CTX, order=placed)
    bare_pen = {"item_id": "SKU-435", "price_minor": None, "quantity": 1, "categories": [],
                "in_stock": None}
    evt = event("refund", source="backend", sc=None, user={"email": EMAIL},
                ecommerce=ecommerce(bare_pen, value=435, transaction_id="1001"),
                identity=identity(customer_id="123456789"))
    [req] = sendlane.plan(evt, ctx)
    assert req.json["line_items"] == [{"product_id": "SKU-435", "sku": "SKU-435",
                                       "product_name": "Pen", "quantity": 1,
                                       "item_price": 4.35, "total": 4.35}]
    assert req.json["total_items"] == 1
    assert req.json["total"] == placed["total"] and req.json["status"] == "refunded"
    assert req.json["event_id"] == "1001:refunded:EVT-1"
    assert req.dedup_key == f"order-placed:{req.json['event_id']}"
    mug = sendlane.plan({**evt, "event_id": "EVT-2",
                         "ecommerce": ecommerce(MUG, transaction_id="1001")}, ctx)[0]
    assert [line["product_id"] for line in mug.json["line_items"]] == ["SKU-1000"]
    assert mug.dedup_key != req.dedup_key
    # A second refund of the same line (another event id) is another refund (Sendlane's
    # guide, "Event IDs": one event and id is recorded once); the same event again is not.
    again = sendlane.plan({**evt, "event_id": "EVT-3"}, ctx)[0]
    assert (again.dedup_key, again.json["event_id"]) == (
        "order-placed:1001:refunded:EVT-3", "1001:refunded:EVT-3")
    assert sendlane.plan(evt, ctx)[0].dedup_key == req.dedup_key
    # A browser's copy of a refund is named by its session too (``_common.event_ref``).
    page = sendlane.plan({**evt, "sc": "SC-1", "source": "browser"}, ctx)[0]
    assert (page.dedup_key, page.json["event_id"]) == (
        "order-placed:1001:refunded:SC-1/EVT-1", "1001:refunded:EVT-1")
    # An order onetag never saw: the refund's own lines, as given.
    [unknown] = sendlane.plan(evt, CTX)
    assert unknown.json["line_items"] == [{"product_id": "SKU-435", "sku": "SKU-435",
                                           "quantity": 1}]


def test_a_refunded_variant_is_completed_only_from_its_own_line():
    """An order with two variants of one product has two lines of one product_id: a refund
    naming the product takes the line its SKU names, and when nothing tells the lines apart
    it is sent as given, not completed from whichever line came last."""
    red = {"product_id": "TEE", "sku": "TEE-RED", "product_name": "Tee (red)", "quantity": 1,
           "item_price": 10.0, "total": 10.0}
    blue = {**red, "sku": "TEE-BLUE", "product_name": "Tee (blue)", "item_price": 12.0,
            "total": 12.0}
    ctx = dataclasses.replace(CTX, order={"order_id": "1001", "line_items": [red, blue]})
    bare = {"item_id": "TEE", "price_minor": None, "quantity": 1, "categories": [],
            "in_stock": None}

    def refunded(item):
        evt = event("refund", source="backend", sc=None, user={"email": EMAIL},
                    ecommerce=ecommerce(item, transaction_id="1001"), identity=WHO)
        return sendlane.plan(evt, ctx)[0].json["line_items"]

    assert refunded({**bare, "item_sku": "TEE-RED"}) == [red]
    assert refunded(bare) == [{"product_id": "TEE", "sku": "TEE", "quantity": 1}]


def test_identify_adds_the_customer():
    [req] = sendlane.plan(event("identify", user={"email": EMAIL}, identity=WHO), CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/customer-added")
    assert req.json == {"token": TOKEN, "email": EMAIL, "phone": "8885552664",
                        "customer_id": "123456789",
                        "billing_address": {"first_name": "Jimmy", "last_name": "Kim",
                                            "email": EMAIL, "phone": "8885552664"},
                        "accepts_marketing": True}
    assert req.needs_email is True and req.skipped is None
    assert req.dedup_key.startswith(f"customer-added:{EMAIL}:")
    with_address = event("identify", user={"email": EMAIL}, identity=WHO,
                         billing_address=ADDRESS, shipping_address=ADDRESS)
    [req] = sendlane.plan(with_address, CTX)
    assert req.json["billing_address"] == ADDRESS and req.json["shipping_address"] == ADDRESS


def test_customer_id_is_the_platforms_never_invented():
    """SL guide, Troubleshooting: "customer_id is generated by the eCommerce platform, not
    Sendlane", and LTV sums a customer_id's orders: an email alone is no customer id."""
    who = identity(accepts_marketing=False)
    [req] = sendlane.plan(event("identify", user={"email": EMAIL}, identity=who), CTX)
    assert req.json == {"token": TOKEN, "email": EMAIL, "billing_address": {"email": EMAIL}}
    assert req.skipped == ("Sendlane customer-added requires the platform's customer_id "
                           "(user.customer_id), and none is known")
    # A page that sent one in an identify, signed or not, is told why it was dropped.
    dropped = {**event("identify", user={"email": EMAIL}, identity=who),
               "customer_id_dropped": True}
    [req] = sendlane.plan(dropped, CTX)
    assert req.skipped.startswith("Sendlane customer-added requires the platform's customer_id")
    assert "the page's identify sent user.customer_id" in req.skipped
    assert "never kept, signed or not" in req.skipped and "only from the backend" in req.skipped
    # The same id on every call whose schema has one: customer-added, order-placed (and its
    # status changes); none where it is unknown.
    known = identity(customer_id="C-42")
    calls = [event("identify", user={"email": EMAIL}, identity=known),
             event("purchase", ecommerce=ecommerce(PEN, transaction_id="1"), identity=known),
             event("order_status", source="backend", sc=None, status="fulfilled",
                   ecommerce=ecommerce(transaction_id="1"), identity=known)]
    assert [sendlane.plan(e, CTX)[0].json["customer_id"] for e in calls] == ["C-42"] * 3
    unknown = event("purchase", ecommerce=ecommerce(PEN, transaction_id="1"),
                    identity=identity())
    assert "customer_id" not in sendlane.plan(unknown, CTX)[0].json


def test_view_item_is_product_viewed():
    [req] = sendlane.plan(event("view_item", ecommerce=ecommerce(MUG), identity=identity()), CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/product-viewed")
    assert req.json == {"token": TOKEN, "product_id": "SKU-1000", "email": EMAIL}
    assert req.dedup_key == f"product-viewed:{SC}/EVT-1"
    assert req.needs_email is True


def test_add_to_cart_is_added_to_cart_with_the_added_lines():
    evt = event("add_to_cart", ecommerce=ecommerce(BOOK), cart=cart(PEN, BOOK),
                identity=identity())
    [req] = sendlane.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/added-to-cart")
    assert req.json == {"token": TOKEN, "cart_id": GUID, "email": EMAIL, "total_items": 3,
                        "total": 59.97, "currency": "USD",
                        "line_items": [{"product_id": "SKU-1999", "sku": "SKU-1999",
                                        "product_name": "Book", "quantity": 3,
                                        "item_price": 19.99, "total": 59.97}]}
    assert req.dedup_key == f"added-to-cart:{SC}/EVT-1"
    assert req.needs_email is True


def test_begin_checkout_is_checkout_started_with_the_whole_cart():
    evt = event("begin_checkout", page=PAGE, ecommerce=ecommerce(MUG, PEN, value=3434),
                cart=cart(MUG, PEN), identity=identity())
    [req] = sendlane.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/checkout-started")
    assert req.json == {
        "token": TOKEN, "checkout_id": GUID, "email": EMAIL, "status": "pending",
        "checkout_url": "https://shop.example/checkout", "subtotal": 34.34, "total_tax": 0,
        "total": 34.34, "total_items": 2, "currency": "USD",
        "line_items": [
            {"product_id": "SKU-1000", "sku": "SKU-1000", "product_name": "Mug", "quantity": 1,
             "item_price": 29.99, "total": 29.99},
            {"product_id": "SKU-435", "sku": "SKU-435", "product_name": "Pen", "quantity": 1,
             "item_price": 4.35, "total": 4.35},
        ],
    }
    assert req.dedup_key == f"checkout-started:{GUID}"


def test_checkout_total_is_value_plus_tax_plus_shipping():
    """SL guide, Total Property: "the total monetary value"; GA4's value excludes tax and
    shipping. Value 5, tax 1, shipping 2: total 8, on the server as in the page."""
    evt = event("begin_checkout", ecommerce=ecommerce(item("A", 500), value=500, tax=100,
                                                      shipping=200),
                cart=cart(item("A", 500)), identity=identity())
    [req] = sendlane.plan(evt, CTX)
    assert (req.json["subtotal"], req.json["total_tax"], req.json["total"]) == (5, 1, 8)


def test_line_items_carry_the_items_sku():
    """SL guide line items: product_id and sku ("ABC123"): the item's own SKU (item_sku, an
    onetag addition to GA4 items) when given, else its item_id."""
    shirt = item("12345678", 1999, 1, item_name="tshirt #1", item_sku="ABC123")
    evt = event("purchase", ecommerce=ecommerce(shirt, PEN, transaction_id="1001"),
                identity=identity())
    lines = sendlane.plan(evt, CTX)[0].json["line_items"]
    assert lines == [{"product_id": "12345678", "sku": "ABC123", "product_name": "tshirt #1",
                      "quantity": 1, "item_price": 19.99, "total": 19.99},
                     {"product_id": "SKU-435", "sku": "SKU-435", "product_name": "Pen",
                      "quantity": 1, "item_price": 4.35, "total": 4.35}]
    catalog = event("product_updated", source="backend", sc=None, ecommerce=ecommerce(
        {**MUG, "item_sku": "MUG-RED"}))
    assert sendlane.plan(catalog, CTX)[0].json["sku"] == "MUG-RED"


def test_checkout_url_is_the_carts_when_configured():
    evt = event("begin_checkout", page=PAGE, ecommerce=ecommerce(MUG), cart=cart(MUG),
                identity=identity())
    ctx = dataclasses.replace(CTX, cart_url="https://shop.example/cart/{cart_guid}")
    assert sendlane.plan(evt, ctx)[0].json["checkout_url"] == f"https://shop.example/cart/{GUID}"
    assert sendlane.plan(evt, CTX)[0].json["checkout_url"] == "https://shop.example/checkout"


def test_product_updated_is_product_added_when_it_has_url_and_image():
    bare = item("SKU-2", 1250, 1, item_name="Cup")  # no product_url/image_url: Sendlane needs both
    evt = event("product_updated", event_id="P1", source="backend", sc=None,
                ecommerce=ecommerce(bare, MUG))
    [req] = sendlane.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/product-added")
    assert req.json == {"token": TOKEN, "product_id": "SKU-1000", "sku": "SKU-1000",
                        "product_name": "Mug", "item_price": 29.99,
                        "product_url": "https://shop.example/p/mug",
                        "image_url": "https://shop.example/i/mug.jpg",
                        "categories": ["Kitchen", "Mugs"], "brand": "Acme"}
    assert req.dedup_key == "product-added:P1:1"
    assert req.needs_email is False


def test_custom_event():
    evt = event("password_reset", event_id="C1", identity=identity(),
                properties={"password-reset-url": "https://website.domain/forgotpassword"})
    [req] = sendlane.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", f"{BASE}/event")
    assert req.json == {"token": TOKEN, "custom_event": "password_reset", "email": EMAIL,
                        "data": {"password-reset-url": "https://website.domain/forgotpassword"}}
    assert req.dedup_key == f"event:{SC}/C1"
    # A browser's event id is its session's: the key names the sc. A backend event that
    # names no session is keyed by its id alone (the backend's ids are its own).
    backend = {**evt, "source": "backend", "sc": None}
    assert sendlane.plan(backend, CTX)[0].dedup_key == "event:C1"
    assert req.needs_email is True


def test_events_without_a_sendlane_call_plan_nothing():
    for name in ("page_view", "view_item_list", "search", "remove_from_cart", "view_cart",
                 "cart_updated", "add_to_wishlist", "unsubscribe", "opt_in"):
        assert sendlane.plan(samples()[name], CTX) == [], name


def test_auth_is_a_bearer_token_and_the_body_token_is_the_public_one():
    assert sendlane.auth_headers(CTX.vendor) == {"Authorization": "Bearer SL-SECRET-TOKEN"}
    assert sendlane.auth_headers(context(sendlane, api_token="").vendor) == {}
    ctx = context(sendlane, api_base="http://127.0.0.1:9/sendlane/")
    assert sendlane.plan(samples()["view_item"], ctx)[0].url == \
        "http://127.0.0.1:9/sendlane/tracking/product-viewed"
