"""Rejoiner REST: golden requests per CONTRACT.md section 7, shaped as
vendor-docs/rejoiner-rest-api.txt shows them (prices in integer cents, trailing slashes)."""

from __future__ import annotations

from server.vendors import rejoiner

from ._events import (BOOK, CLIP, EMAIL, MUG, PEN, cart, context, ecommerce, event, identity,
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
    assert unsub.dedup_key == "unsubscribe:U1"
    # The REST docs' opt_in example: extra fields are the record of how consent was given.
    props = {"type": "accepts marketing checkbox",
             "otherInfo": "accepted marketing on checkout page"}
    [opt] = rejoiner.plan(event("opt_in", event_id="O1", user={"email": EMAIL},
                                identity=identity(), properties=props), CTX)
    assert (opt.method, opt.url) == ("POST", f"{BASE}/customer/opt_in/")
    assert opt.json == {"email": EMAIL, **props}
    assert opt.dedup_key == "opt_in:O1"
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
