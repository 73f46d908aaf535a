"""Sendlane's browser adapter in real Chromium: CONTRACT.md section 6, exact `_Sendlane` pushes.

Amounts are JSON decimals in major units, exact: 3 x 19.99 is 59.97 on the wire (parsed here as
Decimal, so 59.970000000000006 would fail).
"""

from __future__ import annotations

from decimal import Decimal

from vendor_stub_server import open_page, push, queues, vendors  # noqa: F401

MUG = {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1}
BOTTLE = {"item_id": "SKU-3000", "item_name": "Bottle", "price": 19.99, "quantity": 3}
TEA = {"item_id": "SKU-4000", "item_name": "Tea", "price": 4.35, "quantity": 1}
SUGAR = {"item_id": "SKU-5000", "item_name": "Sugar", "price": 0.57, "quantity": 1}


def ecom(*items, **extra):
    return {"currency": "USD", "items": [dict(i) for i in items], **extra}


def line(item, qty, price, total):
    return {"product_id": item["item_id"], "product_name": item["item_name"], "quantity": qty,
            "item_price": Decimal(price), "total": Decimal(total)}


def test_pusher_and_events(vendors, context):
    url = vendors.page("all")
    page = open_page(context, url)
    page.wait_for_function("() => window.__stub_sendlane === 1")
    # (load) pusher.js with data-token, async; _Sendlane is the queue.
    tag = page.evaluate("""() => { var s = document.querySelector('script[src$="/vendors/ok/sendlane.js"]');
        return s && {token: s.getAttribute('data-token'), async: s.async}; }""")
    assert tag == {"token": "SL-INTEGRATION-TOKEN", "async": True}
    assert queues(page)["sendlane"] == []

    assert push(page, {"event": "view_item", "ecommerce": ecom(MUG)})["sendlane"] == \
        [{"event": "product_viewed", "product_id": "SKU-1000"}]
    # added_to_cart: one push per added line, the quantity added.
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE, TEA)})["sendlane"]
    assert calls == [{"event": "added_to_cart", "line_items": [line(BOTTLE, 3, "19.99", "59.97")]},
                     {"event": "added_to_cart", "line_items": [line(TEA, 1, "4.35", "4.35")]}]
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(SUGAR)})["sendlane"]
    assert calls == [{"event": "added_to_cart", "line_items": [line(SUGAR, 1, "0.57", "0.57")]}]
    # Not Sendlane's in the page.
    for event in ({"event": "remove_from_cart", "ecommerce": ecom(SUGAR)},
                  {"event": "view_cart", "ecommerce": ecom(BOTTLE, TEA)},
                  {"event": "cart_updated", "ecommerce": ecom(BOTTLE, TEA)},
                  {"event": "view_item_list", "ecommerce": ecom(MUG, item_list_id="mugs")},
                  {"event": "search", "search_term": "x", "ecommerce": ecom()},
                  {"event": "add_to_wishlist", "ecommerce": ecom(MUG)},
                  {"event": "quiz_done"}):
        assert push(page, event)["sendlane"] == [], event["event"]

    # checkout_started: the whole cart, decimals; checkout_id = the cart state's GUID, which
    # eSputnik's StatusCart for the same event carries too.
    calls = push(page, {"event": "begin_checkout", "ecommerce": ecom(BOTTLE, TEA, value=64.32, tax=5.15)})
    (sl,) = calls["sendlane"]
    checkout_id = sl.pop("checkout_id")
    assert checkout_id == calls["esputnik"][0][2]["GUID"]
    assert sl == {"event": "checkout_started", "status": "pending", "checkout_url": url,
                  "subtotal": Decimal("64.32"), "total_tax": Decimal("5.15"), "total": Decimal("64.32"),
                  "total_items": 4, "currency": "USD",
                  "line_items": [line(BOTTLE, 3, "19.99", "59.97"), line(TEA, 1, "4.35", "4.35")]}
    # The same checkout again (a reload): the same checkout_id, which Sendlane records once.
    (again,) = push(page, {"event": "begin_checkout", "ecommerce": ecom(BOTTLE, TEA)})["sendlane"]
    assert again["checkout_id"] == checkout_id and "total_tax" not in again
    assert again["total"] == Decimal("64.32")

    # identify once per change; a known email rides on checkout_started.
    calls = push(page, {"event": "identify", "user": {"email": "Ann@Example.com", "first_name": "Ann"}})
    assert calls["sendlane"] == [{"event": "identify", "email": "ann@example.com"}]
    assert push(page, {"event": "identify", "user": {"email": "ann@example.com"}})["sendlane"] == []
    (sl,) = push(page, {"event": "begin_checkout", "ecommerce": ecom(MUG)})["sendlane"]
    assert sl["email"] == "ann@example.com" and sl["checkout_id"] != checkout_id
    assert sl["line_items"] == [line(MUG, 1, "29.99", "29.99")] and sl["total"] == Decimal("29.99")
    # purchase is the server's (order-placed).
    assert push(page, {"event": "purchase", "ecommerce": ecom(MUG, transaction_id="1001")})["sendlane"] == []
    page2 = open_page(context, vendors.page("all"))
    assert push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})["sendlane"] == \
        [{"event": "product_viewed", "product_id": "SKU-4000"}]
