"""Rejoiner REST: golden requests per CONTRACT.md section 7, shaped as Rejoiner's REST API
reference shows them (prices in integer cents, trailing slashes)."""

from __future__ import annotations

import dataclasses

from server.vendors import rejoiner

from ._events import (BOOK, CLIP, EMAIL, MUG, PEN, SC, cart, context, ecommerce, event, identity,
                      item, samples)

CTX = context(rejoiner)
BASE = "https://rj2.rejoiner.com/api/v1/RJSITE1"


def test_purchase_converts_with_the_rest_docs_example_payload():
    # The "Example Payload" of POST /customer/convert/, as a GA4 purchase: $20.00, 3 items.
    one = item("12345", 1000, 1, item_name="Product #1", description="A product",
               categories=["cool", "products"], item_url="http://example.com/products/12345",
               image_url="http://example.com/products/img/12345.jpg")
    two = item("54321", 500, 2, item_name="Product #2", description="Another product",
               categories=["awesome", "products"], item_url="http://example.com/products/54321",
               image_url="http://example.com/products/img/54321.jpg")
    evt = event("purchase", ecommerce=ecommerce(one, two, value=2000, transaction_id="1001",
                                                coupon="SALE"), identity=identity())
    [req] = rejoiner.plan(evt, CTX)
    assert req.method == "POST"
    assert req.url == f"{BASE}/customer/convert/"
    assert req.json == {
        "email": EMAIL,
        "cart_data": {"cart_value": 2000, "cart_item_count": 3, "order_number": "1001",
                      "promo": "SALE"},
        "cart_items": [
            {"product_id": "12345", "name": "Product #1", "price": 1000, "item_qty": 1,
             "qty_price": 1000, "category": ["cool", "products"],
             "product_url": "http://example.com/products/12345",
             "image_url": "http://example.com/products/img/12345.jpg",
             "description": "A product"},
            {"product_id": "54321", "name": "Product #2", "price": 500, "item_qty": 2,
             "qty_price": 1000, "category": ["awesome", "products"],
             "product_url": "http://example.com/products/54321",
             "image_url": "http://example.com/products/img/54321.jpg",
             "description": "Another product"},
        ],
    }
    assert req.dedup_key == "convert:1001"
    assert req.needs_email is True
    assert dict(req.headers) == {}


def test_purchase_money_is_integer_cents_without_float_error():
    evt = event("purchase", ecommerce=ecommerce(PEN, CLIP, BOOK, transaction_id="1002"),
                identity=identity())
    [req] = rejoiner.plan(evt, CTX)
    lines = {line["product_id"]: line for line in req.json["cart_items"]}
    assert (lines["SKU-435"]["price"], lines["SKU-435"]["qty_price"]) == (435, 435)
    assert (lines["SKU-057"]["price"], lines["SKU-057"]["qty_price"]) == (57, 57)
    assert (lines["SKU-1999"]["price"], lines["SKU-1999"]["item_qty"],
            lines["SKU-1999"]["qty_price"]) == (1999, 3, 5997)
    # No value given: the lines' sum, 4.35 + 0.57 + 59.97.
    assert req.json["cart_data"] == {"cart_value": 6489, "cart_item_count": 5,
                                     "order_number": "1002"}
    for line in req.json["cart_items"]:
        assert all(type(line[key]) is int for key in ("price", "item_qty", "qty_price"))


def test_cents_are_hundredths_whatever_the_currency():
    yen = item("JP-1", 500, 2, item_name="Tea")  # JPY has no minor unit: 500 yen
    evt = event("purchase", ecommerce=ecommerce(yen, currency="JPY", value=1000,
                                                transaction_id="J1"), identity=identity())
    [req] = rejoiner.plan(evt, CTX)
    assert req.json["cart_data"]["cart_value"] == 100000
    assert req.json["cart_items"][0]["price"] == 50000
    assert req.json["cart_items"][0]["qty_price"] == 100000


def test_purchase_takes_the_bought_cart_when_the_event_has_no_items():
    evt = event("purchase", ecommerce=ecommerce(transaction_id="1003", value=3434),
                cart=cart(MUG, PEN), identity=identity())
    [req] = rejoiner.plan(evt, CTX)
    assert [line["product_id"] for line in req.json["cart_items"]] == ["SKU-1000", "SKU-435"]
    assert req.json["cart_data"]["cart_value"] == 3434


def test_anonymous_purchase_is_held_for_an_email_under_the_same_key():
    anonymous = event("purchase", ecommerce=ecommerce(MUG, transaction_id="1001"))
    [held] = rejoiner.plan(anonymous, CTX)
    assert held.needs_email is True
    assert "email" not in held.json
    [later] = rejoiner.plan({**anonymous, "identity": identity()}, CTX)
    assert later.json["email"] == EMAIL
    assert later.dedup_key == held.dedup_key == "convert:1001"


def test_identify_puts_the_profile_by_url_encoded_email():
    who = identity("jimmy+shop@example.com", first_name="Jimmy", last_name="Kim",
                   phone="8885552664", customer_id="42", accepts_marketing=True)
    evt = event("identify", user={"email": "jimmy+shop@example.com"}, identity=who)
    [req] = rejoiner.plan(evt, CTX)
    assert req.method == "PUT"
    assert req.url == f"{BASE}/customers/jimmy%2Bshop%40example.com/"
    # Only documented profile fields; no metadata (it would replace what Rejoiner has).
    assert req.json == {"email": "jimmy+shop@example.com", "first_name": "Jimmy",
                        "last_name": "Kim", "phone": "8885552664"}
    assert req.needs_email is True
    assert req.dedup_key.startswith("customers:jimmy+shop@example.com:")
    # A customer Rejoiner does not know yet (404) is created instead (REFERENCE.md 6).
    create = req.if_not_found
    assert (create.method, create.url, create.json) == ("POST", f"{BASE}/customers/", req.json)
    assert req.to_row()["if_not_found"]["url"] == f"{BASE}/customers/"
    renamed = {**evt, "identity": {**who, "first_name": "James"}}
    assert rejoiner.plan(renamed, CTX)[0].dedup_key != req.dedup_key
    assert rejoiner.plan(dict(evt), CTX)[0].dedup_key == req.dedup_key


def test_journeys_stop_when_an_order_is_cancelled_refunded_or_failed():
    for status in ("cancelled", "refunded", "failed"):
        evt = event("order_status", source="backend", sc=None, status=status,
                    user={"email": EMAIL}, ecommerce=ecommerce(transaction_id="1001"),
                    identity=identity())
        [req] = rejoiner.plan(evt, CTX)
        assert (req.method, req.url) == ("POST", f"{BASE}/customer/cancel/")
        assert req.json == {"email": EMAIL}
        assert req.dedup_key == f"cancel:1001:{status}"
        assert req.needs_email is True
    for status in ("pending", "processing", "completed", "fulfilled"):
        evt = event("order_status", source="backend", status=status, user={"email": EMAIL},
                    ecommerce=ecommerce(transaction_id="1001"), identity=identity())
        assert rejoiner.plan(evt, CTX) == []


def test_a_refund_cancels_like_a_refunded_status():
    evt = event("refund", ecommerce=ecommerce(transaction_id="1001"), identity=identity())
    [req] = rejoiner.plan(evt, CTX)
    assert req.url == f"{BASE}/customer/cancel/"
    assert req.dedup_key == "cancel:1001:refunded"


def test_consent():
    [unsub] = rejoiner.plan(event("unsubscribe", event_id="U1", user={"email": EMAIL},
                                  identity=identity()), CTX)
    assert (unsub.method, unsub.url, unsub.json) == (
        "POST", f"{BASE}/customer/unsubscribe/", {"email": EMAIL})
    assert unsub.dedup_key == f"unsubscribe:{SC}/U1"
    # The REST docs' opt_in example: extra fields are the record of how consent was given.
    props = {"type": "accepts marketing checkbox",
             "otherInfo": "accepted marketing on checkout page"}
    [opt] = rejoiner.plan(event("opt_in", event_id="O1", user={"email": EMAIL},
                                identity=identity(), properties=props), CTX)
    assert (opt.method, opt.url) == ("POST", f"{BASE}/customer/opt_in/")
    assert opt.json == {"email": EMAIL, **props}
    assert opt.dedup_key == f"opt_in:{SC}/O1"
    assert unsub.needs_email and opt.needs_email


def test_events_without_a_rest_call_plan_nothing():
    for name, evt in samples().items():
        if name not in ("identify", "purchase", "refund", "order_status", "unsubscribe", "opt_in"):
            assert rejoiner.plan(evt, CTX) == [], name


def test_api_base_with_a_trailing_slash():
    ctx = context(rejoiner, api_base="http://127.0.0.1:9/rejoiner/")
    [req] = rejoiner.plan(samples()["unsubscribe"], ctx)
    assert req.url == "http://127.0.0.1:9/rejoiner/RJSITE1/customer/unsubscribe/"


def test_auth_header():
    assert rejoiner.auth_headers(CTX.vendor) == {"Authorization": "Rejoiner RJ-SECRET-KEY"}
    assert rejoiner.auth_headers(context(rejoiner, api_key="").vendor) == {}


def test_return_url_leads_to_the_cart():
    """RJ REST Cart Data: return_url, "A unique url to return to the cart page" (the REST
    example's "http://example.com/cart/12345/"): the site's cart_url with the cart's GUID, or
    the event's ecommerce.cart_url, which wins."""
    evt = event("purchase", ecommerce=ecommerce(PEN, transaction_id="1001"),
                cart=cart(PEN, guid="12345"), identity=identity())
    ctx = dataclasses.replace(CTX, cart_url="http://example.com/cart/{cart_guid}/")
    [req] = rejoiner.plan(evt, ctx)
    assert req.json["cart_data"]["return_url"] == "http://example.com/cart/12345/"
    own = {**evt, "ecommerce": {**evt["ecommerce"], "cart_url": "https://shop.example/c?k=9"}}
    assert rejoiner.plan(own, ctx)[0].json["cart_data"]["return_url"] == \
        "https://shop.example/c?k=9"
    assert "return_url" not in rejoiner.plan(evt, CTX)[0].json["cart_data"]
    by_session = dataclasses.replace(CTX, cart_url="https://shop.example/cart?s={sc}")
    assert rejoiner.plan(evt, by_session)[0].json["cart_data"]["return_url"] == \
        "https://shop.example/cart?s=CDA68358-94FB-4D83-9655-3FEB3C4114A3"


def test_two_variants_of_one_item_are_two_lines():
    """Rejoiner keys cart lines by product_id (RJ guide: removeCartItem takes only
    product_id): a variant's id is "<item_id>:<item_variant>", the browser adapter's rule."""
    red = item("SKU-1000", 2999, 1, item_name="Mug", item_variant="red")
    blue = item("SKU-1000", 2999, 2, item_name="Mug", item_variant="blue")
    evt = event("purchase", ecommerce=ecommerce(red, blue, PEN, transaction_id="1001"),
                identity=identity())
    items = rejoiner.plan(evt, CTX)[0].json["cart_items"]
    assert [(i["product_id"], i["item_qty"]) for i in items] == [
        ("SKU-1000:red", 1), ("SKU-1000:blue", 2), ("SKU-435", 1)]


def test_an_empty_category_is_left_out():
    evt = event("purchase", ecommerce=ecommerce(item("SKU-1", 100, categories=[]),
                                                transaction_id="1001"), identity=identity())
    assert "category" not in rejoiner.plan(evt, CTX)[0].json["cart_items"][0]


def test_billing_address_fills_the_profiles_address_fields():
    """RJ REST customer fields (POST /customers/, PUT /customers/EMAIL/): address1, address2,
    city, state, postal_code, country, as in its GET example ("state": "AZ", "country": "US")."""
    billing = {"first_name": "Madonna", "last_name": "Lewis", "address_1": "1505 Dogwood Lane",
               "address_2": "Apt 2", "city": "Tucson", "state": "Arizona", "state_code": "AZ",
               "country": "United States", "country_code": "US", "postal_code": "85705"}
    who = identity(first_name="Madonna", last_name="Lewis")
    evt = event("identify", user={"email": EMAIL}, identity=who, billing_address=billing)
    [req] = rejoiner.plan(evt, CTX)
    assert req.json == {"email": EMAIL, "first_name": "Madonna", "last_name": "Lewis",
                        "address1": "1505 Dogwood Lane", "address2": "Apt 2", "city": "Tucson",
                        "state": "AZ", "postal_code": "85705", "country": "US"}
    assert req.if_not_found.json == req.json
    names_only = {**evt, "billing_address": {"city": "Tucson", "state": "Arizona",
                                             "country": "United States"}}
    assert rejoiner.plan(names_only, CTX)[0].json["state"] == "Arizona"


def test_a_partial_refund_leaves_the_journeys_running():
    """customer/cancel/ "will immediately stop any active journeys for a specific customer"
    (Rejoiner REST API): right for an order cancelled or refunded whole, wrong for a partial
    refund (GA4's refund naming items, or a value below the order's), after which the order
    stands and its journeys (a review request, a replenishment reminder) should go on."""
    placed = rejoiner.plan(event("purchase", ecommerce=ecommerce(
        item("12345", 1000, 2), value=2000, transaction_id="1001"), identity=identity()),
        CTX)[0].json
    assert rejoiner.ORDER_KEY.format(order="1001") == "convert:1001"
    ctx = dataclasses.replace(CTX, order=placed)
    naming_items = event("refund", ecommerce=ecommerce(item("12345", 1000, 1),
                                                       transaction_id="1001"),
                         identity=identity())
    assert rejoiner.plan(naming_items, ctx) == []
    assert rejoiner.plan(naming_items, CTX) == []  # the order never seen: the items tell
    part = event("refund", ecommerce=ecommerce(value=500, transaction_id="1001"),
                 identity=identity())
    assert rejoiner.plan(part, ctx) == []
    # The whole value, or no value at all: the whole order.
    for whole in (ecommerce(value=2000, transaction_id="1001"),
                  ecommerce(transaction_id="1001")):
        [req] = rejoiner.plan(event("refund", ecommerce=whole, identity=identity()), ctx)
        assert (req.url, req.dedup_key) == (f"{BASE}/customer/cancel/", "cancel:1001:refunded")
    # A value below an order never seen can't be told from the whole: journeys stop.
    [req] = rejoiner.plan(part, CTX)
    assert req.url == f"{BASE}/customer/cancel/"
