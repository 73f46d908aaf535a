"""Sendlane's browser adapter in real Chromium: exact `_Sendlane` pushes (Sendlane "Custom
Integration Setup & API v2", JavaScript tracking API).

Amounts are JSON decimals in major units, exact: 3 x 19.99 is 59.97 on the wire (parsed here as
Decimal, so 59.970000000000006 would fail).
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from vendor_stub_server import open_page, push, queues, server_bodies, vendors  # noqa: F401

MUG = {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1}
BOTTLE = {"item_id": "SKU-3000", "item_name": "Bottle", "price": 19.99, "quantity": 3}
TEA = {"item_id": "SKU-4000", "item_name": "Tea", "price": 4.35, "quantity": 1}
SUGAR = {"item_id": "SKU-5000", "item_name": "Sugar", "price": 0.57, "quantity": 1}
# The guide's checkout_started example, first line item: product_id 12345678, sku "ABC123".
TSHIRT = {"item_id": "12345678", "sku": "ABC123", "item_name": "tshirt #1", "price": 19.99, "quantity": 1}


def ecom(*items, **extra):
    return {"currency": "USD", "items": [dict(i) for i in items], **extra}


def line(item, qty, price, total, sku=None):
    return {"product_id": item["item_id"], "sku": sku or item["item_id"], "product_name": item["item_name"],
            "quantity": qty, "item_price": Decimal(price), "total": Decimal(total)}


def test_pusher_and_events(vendors, context):
    url = vendors.page("all")
    page = open_page(context, url)
    page.wait_for_function("() => window.__stub_sendlane === 1")
    # (load) pusher.js with data-token, async; _Sendlane is the queue.
    tag = page.evaluate("""() => { var s = document.querySelector('script[src$="/vendors/ok/sendlane.js"]');
        return s && {token: s.getAttribute('data-token'), async: s.async}; }""")
    assert tag == {"token": "SL-INTEGRATION-TOKEN", "async": True}
    assert queues(page)["sendlane"] == []

    # "Contacts must have been identified ... to continue tracking": an unknown visitor's product
    # views and adds wait in the page ...
    assert push(page, {"event": "view_item", "ecommerce": ecom(MUG)})["sendlane"] == []
    assert push(page, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE, TEA)})["sendlane"] == []
    # ... and go, in order, right after the identify call.
    calls = push(page, {"event": "identify", "user": {"email": "Ann@Example.com", "first_name": "Ann"}})
    assert calls["sendlane"] == [
        {"event": "identify", "email": "ann@example.com"},
        {"event": "product_viewed", "product_id": "SKU-1000"},
        {"event": "added_to_cart", "line_items": [line(BOTTLE, 3, "19.99", "59.97")]},
        {"event": "added_to_cart", "line_items": [line(TEA, 1, "4.35", "4.35")]}]
    assert push(page, {"event": "identify", "user": {"email": "ann@example.com"}})["sendlane"] == []

    # Identified: at once. added_to_cart: one push per added line, the quantity added; sku is the
    # item's sku or item_sku when given, else its item_id.
    assert push(page, {"event": "view_item", "ecommerce": ecom(TEA)})["sendlane"] == \
        [{"event": "product_viewed", "product_id": "SKU-4000"}]
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(dict(SUGAR, item_sku="SUG-1"), TSHIRT)})["sendlane"]
    assert calls == [{"event": "added_to_cart", "line_items": [line(SUGAR, 1, "0.57", "0.57", sku="SUG-1")]},
                     {"event": "added_to_cart", "line_items": [line(TSHIRT, 1, "19.99", "19.99", sku="ABC123")]}]
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
    # eSputnik's StatusCart for the same event carries too; total = value + tax + shipping.
    calls = push(page, {"event": "begin_checkout",
                        "ecommerce": ecom(BOTTLE, TEA, value=64.32, tax=5.15, shipping=2.5)})
    (sl,) = calls["sendlane"]
    checkout_id = sl.pop("checkout_id")
    assert checkout_id == calls["esputnik"][0][2]["GUID"]
    assert sl == {"event": "checkout_started", "email": "ann@example.com", "status": "pending",
                  "checkout_url": url, "subtotal": Decimal("64.32"), "total_tax": Decimal("5.15"),
                  "total": Decimal("71.97"), "total_items": 4, "currency": "USD",
                  "line_items": [line(BOTTLE, 3, "19.99", "59.97"), line(TEA, 1, "4.35", "4.35")]}
    # The same checkout again (a reload): the same checkout_id, which Sendlane records once.
    (again,) = push(page, {"event": "begin_checkout", "ecommerce": ecom(BOTTLE, TEA)})["sendlane"]
    assert again["checkout_id"] == checkout_id
    assert again["total_tax"] == 0 and again["total"] == Decimal("64.32")  # value = the lines' sum
    # purchase is the server's (order-placed).
    assert push(page, {"event": "purchase", "ecommerce": ecom(BOTTLE, TEA, transaction_id="1001")})["sendlane"] == []
    page2 = open_page(context, vendors.page("all"))
    assert push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})["sendlane"] == \
        [{"event": "product_viewed", "product_id": "SKU-4000"}]


def test_checkout_golden_from_the_guide(vendors, context):
    """The guide's checkout_started example, for its first line item alone: subtotal 19.99,
    total_tax 0, total 19.99, total_items 1, the line {product_id, sku, product_name, quantity,
    item_price, total}."""
    page = open_page(context, vendors.page("all"))
    push(page, {"event": "identify", "user": {"email": "jimmy@sendlane.com"}})
    (sl,) = push(page, {"event": "begin_checkout", "ecommerce": ecom(TSHIRT)})["sendlane"]
    assert isinstance(sl.pop("checkout_id"), str) and sl.pop("checkout_url")
    assert sl == {"event": "checkout_started", "email": "jimmy@sendlane.com", "status": "pending",
                  "subtotal": Decimal("19.99"), "total_tax": 0, "total": Decimal("19.99"),
                  "total_items": 1, "currency": "USD",
                  "line_items": [{"product_id": "12345678", "sku": "ABC123", "product_name": "tshirt #1",
                                  "quantity": 1, "item_price": Decimal("19.99"), "total": Decimal("19.99")}]}


def test_a_checkout_before_the_email_waits_for_it(vendors, context):
    """An email typed at checkout comes after begin_checkout: the checkout waits, then goes
    after identify with that email (Sendlane could not attribute it before)."""
    page = open_page(context, vendors.page("all"))
    assert push(page, {"event": "begin_checkout", "ecommerce": ecom(TEA)})["sendlane"] == []
    calls = push(page, {"event": "identify", "user": {"email": "bo@example.com"}})["sendlane"]
    assert [c["event"] for c in calls] == ["identify", "checkout_started"]
    assert calls[1]["email"] == "bo@example.com" and calls[1]["line_items"] == [line(TEA, 1, "4.35", "4.35")]


def test_checkout_matches_the_servers_checkout_started(vendors, context):
    """Both paths can send checkout_started (routes: fallback): the page's push and the server's
    /tracking/checkout-started body for the same event are the same fields and values (the
    server adds only its `token`), the GUID included: the server adopts the page's cart_guid."""
    page = open_page(context, vendors.page("all"))
    # An email no other test used: the server's copy carries what the store knows of the
    # identity (an earlier test's phone, say), which this page never pushed.
    push(page, {"event": "identify", "user": {"email": f"cmp-{uuid.uuid4().hex[:8]}@example.com"}})
    eid = str(uuid.uuid4())
    (browser,) = push(page, {"event": "begin_checkout", "event_id": eid, "ecommerce": ecom(
        BOTTLE, dict(TEA, item_sku="TEA-1"), TSHIRT, value=80.0, tax=1, shipping=2)})["sendlane"]
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "all", "sendlane", eid)
    assert server.pop("token") == "SL-INTEGRATION-TOKEN"
    assert browser.pop("event") == "checkout_started"
    assert browser["total"] == Decimal("83") and browser["total_tax"] == 1
    assert browser == server



def test_a_checkout_without_currency_is_in_the_sites_currency(vendors, context):
    """The site ``shop`` (currency EUR): a begin_checkout whose push names no currency is in the
    site's currency (the guide's checkout_started example has "currency"), as the server's copy
    of the same event is; the event's own currency wins, read as the server reads it (upper
    case)."""
    page = open_page(context, vendors.page("shop"))
    push(page, {"event": "identify", "user": {"email": f"eur-{uuid.uuid4().hex[:8]}@example.com"}})
    for currency, expected in ((None, "EUR"), ("gbp", "GBP")):
        eid = str(uuid.uuid4())
        ecommerce = {"items": [dict(BOTTLE), dict(TEA)], **({"currency": currency} if currency else {})}
        (browser,) = push(page, {"event": "begin_checkout", "event_id": eid, "ecommerce": ecommerce})["sendlane"]
        page.evaluate("() => window.onetag.flush()")
        (server,) = server_bodies(vendors, "shop", "sendlane", eid)
        assert browser.get("currency") == server["currency"] == expected



def test_checkout_url_is_the_carts_url_as_on_the_server(vendors, context):
    """checkout_url, where Sendlane's abandoned-checkout emails lead: the cart's URL, i.e. the
    event's ecommerce.cart_url, else the site's cart_url template filled in (as the server's
    checkout-started has it, server/vendors/_common.py cart_url, and as Rejoiner's return_url
    and Remarkety's abandoned_checkout_url are in the page), else the page."""
    page = open_page(context, vendors.page("shop"))
    sc = next(c["value"] for c in context.cookies() if c["name"] == "sc")
    push(page, {"event": "identify", "user": {"email": f"url-{uuid.uuid4().hex[:8]}@example.com"}})
    eid = str(uuid.uuid4())
    (browser,) = push(page, {"event": "begin_checkout", "event_id": eid, "ecommerce": ecom(BOTTLE, TEA)})["sendlane"]
    guid = page.evaluate("() => JSON.parse(localStorage.getItem('onetag_shop_c')).guid")
    assert browser["checkout_url"] == f"https://shop.example/cart?restore={guid}&s={sc}"
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "shop", "sendlane", eid)
    assert server.pop("token") == "SL-INTEGRATION-TOKEN" and browser.pop("event") == "checkout_started"
    assert browser == server
    # The event's own cart_url wins.
    eid = str(uuid.uuid4())
    (browser,) = push(page, {"event": "begin_checkout", "event_id": eid,
                             "ecommerce": ecom(TEA, cart_url="https://shop.example/c/9")})["sendlane"]
    assert browser["checkout_url"] == "https://shop.example/c/9"
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "shop", "sendlane", eid)
    server.pop("token")
    browser.pop("event")
    assert browser == server



def test_a_lines_sku_is_the_servers(vendors, context):
    """A line's sku as the server's (server/vendors/_common.py sku; server/events.py takes
    `sku` for `item_sku` only when item_sku is absent): item_sku, else sku, else item_id."""
    page = open_page(context, vendors.page("all"))
    push(page, {"event": "identify", "user": {"email": f"sku-{uuid.uuid4().hex[:8]}@example.com"}})
    eid = str(uuid.uuid4())
    items = [dict(BOTTLE), dict(TEA, sku="TEA-1"), dict(SUGAR, item_sku="SUG-1", sku="SUG-0"),
             dict(MUG, item_sku="", sku="MUG-0")]
    (browser,) = push(page, {"event": "begin_checkout", "event_id": eid, "ecommerce": ecom(*items)})["sendlane"]
    assert [line["sku"] for line in browser["line_items"]] == ["SKU-3000", "TEA-1", "SUG-1", "SKU-1000"]
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "all", "sendlane", eid)
    server.pop("token")
    browser.pop("event")
    assert browser == server
