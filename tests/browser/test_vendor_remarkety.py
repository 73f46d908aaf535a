"""Remarkety's browser adapter in real Chromium: CONTRACT.md section 6, exact `_rmData` calls.

Remarkety attributes tracked events to the visitor named by setCustomer, so setCustomer comes
before any track; an unidentified visitor's tracks are held in the page and pushed, in order,
right after the setCustomer that identifies them.
"""

from __future__ import annotations

import re
from decimal import Decimal

from vendor_stub_server import open_page, push, queues, vendors  # noqa: F401

MUG = {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1,
       "item_category": "Kitchen", "item_category2": "Mugs",
       "item_url": "https://shop.example/p/mug", "image_url": "https://shop.example/i/mug.jpg"}
BOTTLE = {"item_id": "SKU-3000", "item_name": "Bottle", "price": 19.99, "quantity": 3}
TEA = {"item_id": "SKU-4000", "item_name": "Tea", "price": 4.35, "quantity": 1}

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def ecom(*items, **extra):
    return {"currency": "USD", "items": [dict(i) for i in items], **extra}


def line(item, qty, price):
    out = {"product_id": item["item_id"], "sku": item["item_id"], "title": item["item_name"],
           "quantity": qty, "price": Decimal(price)}
    if "item_url" in item:
        out["url"] = item["item_url"]
    if "image_url" in item:
        out["image"] = item["image_url"]
    return out


def cart_body(call, sc, url):
    """The carts/update payload without its two timestamps (checked here)."""
    assert call[:2] == ["track", "carts/update"]
    body = dict(call[2])
    created, updated = body.pop("created_at"), body.pop("updated_at")
    assert ISO.match(updated) and created == updated
    assert body.pop("id") == sc
    assert body.pop("abandoned_checkout_url") == url
    return body


def test_identify_first_then_tracks(vendors, context):
    url = vendors.page("all")
    page = open_page(context, url)
    page.wait_for_function("() => window.__stub_remarkety === 1")
    assert queues(page)["remarkety"] == [["setStoreKey", "rm-store-1"]]
    assert page.evaluate("() => document.querySelectorAll('script[src$=\"/vendors/ok/remarkety.js\"]').length") == 1
    sc = next(c["value"] for c in context.cookies() if c["name"] == "sc")

    # Unidentified: nothing reaches _rmData yet (held in the page).
    assert push(page, {"event": "view_item", "ecommerce": ecom(MUG)})["remarkety"] == []
    assert push(page, {"event": "add_to_cart", "ecommerce": ecom(MUG)})["remarkety"] == []
    assert push(page, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE)})["remarkety"] == []
    assert push(page, {"event": "view_item_list", "ecommerce": ecom(MUG, item_list_id="mugs",
                                                                    item_list_name="Mugs")})["remarkety"] == []

    # identify: setCustomer first, then the held tracks in order (only the latest cart).
    calls = push(page, {"event": "identify", "user": {"email": "Ann@Example.com"}})["remarkety"]
    assert calls[0] == ["setCustomer", "ann@example.com"]
    assert calls[1] == ["productView", {"productId": "SKU-1000", "productName": "Mug",
                                        "productCategories": ["Kitchen", "Mugs"]}]
    assert cart_body(calls[2], sc, url) == {
        "currency": "USD", "line_items": [line(MUG, 1, "29.99"), line(BOTTLE, 3, "19.99")],
        "subtotal": Decimal("89.96"), "total_price": Decimal("89.96")}
    assert calls[3] == ["track", "categoryView", {"category_id": "mugs", "category_name": "Mugs"}]
    assert len(calls) == 4

    # Identified: each event is its own track, no second setCustomer.
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA)})["remarkety"]
    assert len(calls) == 1
    assert cart_body(calls[0], sc, url) == {
        "currency": "USD",
        "line_items": [line(MUG, 1, "29.99"), line(BOTTLE, 3, "19.99"), line(TEA, 1, "4.35")],
        "subtotal": Decimal("94.31"), "total_price": Decimal("94.31")}
    calls = push(page, {"event": "remove_from_cart", "ecommerce": ecom(BOTTLE)})["remarkety"]
    assert cart_body(calls[0], sc, url)["line_items"] == [line(MUG, 1, "29.99"), line(TEA, 1, "4.35")]
    for name in ("view_cart", "cart_updated", "begin_checkout"):
        calls = push(page, {"event": name, "ecommerce": ecom(TEA)})["remarkety"]
        assert len(calls) == 1 and cart_body(calls[0], sc, url) == {
            "currency": "USD", "line_items": [line(TEA, 1, "4.35")],
            "subtotal": Decimal("4.35"), "total_price": Decimal("4.35")}, name

    calls = push(page, {"event": "search", "search_term": "green tea", "ecommerce": ecom(TEA)})["remarkety"]
    assert calls == [["track", "siteSearch", {"search_keyword": "green tea",
                                              "products": [line(TEA, 1, "4.35")]}]]
    calls = push(page, {"event": "wishlist_shared", "list": "xmas", "ecommerce": {"items": []}})["remarkety"]
    assert calls == [["track", "wishlist_shared", {"list": "xmas", "ecommerce": {"items": []}}]]
    # Not Remarkety's in the page: purchase (the server's orders/create), page views, wishlist.
    assert push(page, {"event": "purchase", "ecommerce": ecom(TEA, transaction_id="1001", value=4.35)})["remarkety"] == []
    assert push(page, {"event": "add_to_wishlist", "ecommerce": ecom(MUG)})["remarkety"] == []
    assert push(page, {"event": "page_view", "page_location": vendors.static.url("/elsewhere")})["remarkety"] == []

    # A new identity: setCustomer again, once (profile fields go by the server's webhook).
    calls = push(page, {"event": "identify", "user": {"email": "bo@example.com", "first_name": "Bo",
                                                     "accepts_marketing": True}})["remarkety"]
    assert calls == [["setCustomer", "bo@example.com"]]
    assert push(page, {"event": "identify", "user": {"email": "bo@example.com"}})["remarkety"] == []

    # Next page: every page starts a new _rmData, so the first track is preceded by setCustomer.
    page2 = open_page(context, vendors.page("all"))
    assert queues(page2)["remarkety"] == [["setStoreKey", "rm-store-1"]]
    calls = push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})["remarkety"]
    assert calls == [["setCustomer", "bo@example.com"],
                     ["productView", {"productId": "SKU-4000", "productName": "Tea", "productCategories": []}]]
    assert push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})["remarkety"] == [calls[1]]
