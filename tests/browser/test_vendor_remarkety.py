"""Remarkety's browser adapter in real Chromium: exact `_rmData` calls (Remarkety "Integrating
custom platforms with Remarkety", Carts and other client-side information).

Remarkety attributes tracked events to the visitor named by setCustomer, so setCustomer comes
before any track; an unidentified visitor's tracks are held in the page and pushed, in order,
right after the setCustomer that identifies them. productView is not held.
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal

from vendor_stub_server import (open_page, page_with_site_settings, push, queues,  # noqa: F401
                                server_bodies, vendors)

MUG = {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1,
       "item_category": "Kitchen", "item_category2": "Mugs",
       "item_category_id": "12", "item_category_id2": "1207", "item_brand": "Acme",
       "item_url": "https://shop.example/p/mug", "image_url": "https://shop.example/i/mug.jpg"}
BOTTLE = {"item_id": "SKU-3000", "item_name": "Bottle", "price": 19.99, "quantity": 3, "item_variant": "blue"}
TEA = {"item_id": "SKU-4000", "item_name": "Tea", "price": 4.35, "quantity": 1}
SPOON = {"item_id": "SKU-6000", "item_name": "Spoon", "price": 2.5, "quantity": 2}

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")  # to the second, as the server writes it


def ecom(*items, **extra):
    return {"currency": "USD", "items": [dict(i) for i in items], **extra}


def line(item, qty, price):
    """A carts/update line, the fields of the server's (server/vendors/remarkety.py _line_item)."""
    out = {"product_id": item["item_id"], "sku": item["item_id"], "name": item["item_name"],
           "title": item["item_name"], "quantity": qty, "price": Decimal(price)}
    for src, dst in (("item_variant", "variant_title"), ("item_brand", "vendor"), ("item_url", "url"),
                     ("image_url", "image")):
        if src in item:
            out[dst] = item[src]
    return out


def cart_body(call, sc, url):
    """The carts/update payload without id, URL and timestamps (checked here)."""
    assert call[:2] == ["track", "carts/update"]
    body = dict(call[2])
    created, updated = body.pop("created_at"), body.pop("updated_at")
    assert ISO.match(updated) and created == updated
    cart_id = body.pop("id")  # the cart's own: the GUID of its first state
    assert cart_id != sc and re.fullmatch(r"[0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}", cart_id)
    assert body.pop("abandoned_checkout_url") == url
    return body


def customer_of(body):
    customer = dict(body.pop("customer"))
    assert ISO.match(customer.pop("created_at")) and ISO.match(customer.pop("updated_at"))
    return customer


def test_identify_first_then_tracks(vendors, context):
    url = vendors.page("all")
    page = open_page(context, url)
    page.wait_for_function("() => window.__stub_remarkety === 1")
    assert queues(page)["remarkety"] == [["setStoreKey", "rm-store-1"]]
    assert page.evaluate("() => document.querySelectorAll('script[src$=\"/vendors/ok/remarkety.js\"]').length") == 1
    sc = next(c["value"] for c in context.cookies() if c["name"] == "sc")

    # productView is not held (track.js may know the visitor from an email click); the guide's
    # snippet: productId, productName, productCategoriesIds, productCategories.
    assert push(page, {"event": "view_item", "ecommerce": ecom(MUG)})["remarkety"] == [
        ["productView", {"productId": "SKU-1000", "productName": "Mug",
                         "productCategories": ["Kitchen", "Mugs"], "productCategoriesIds": ["12", "1207"]}]]
    # Unidentified: the tracks are held in the page.
    assert push(page, {"event": "add_to_cart", "ecommerce": ecom(MUG)})["remarkety"] == []
    assert push(page, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE)})["remarkety"] == []
    assert push(page, {"event": "view_item_list", "ecommerce": ecom(MUG, item_list_id="mugs",
                                                                    item_list_name="Mugs")})["remarkety"] == []

    # identify: setCustomer first, then the held tracks in order (only the latest cart), the
    # cart built now, so it names the customer.
    calls = push(page, {"event": "identify", "user": {"email": "Ann@Example.com", "first_name": "Ann",
                                                     "accepts_marketing": True}})["remarkety"]
    assert calls[0] == ["setCustomer", "ann@example.com"]
    first_cart = calls[1][2]["id"]
    body = cart_body(calls[1], sc, url)
    assert customer_of(body) == {"email": "ann@example.com", "first_name": "Ann", "accepts_marketing": True}
    assert body == {
        "accepts_marketing": True, "email": "ann@example.com", "currency": "USD",
        "line_items": [line(MUG, 1, "29.99"), line(BOTTLE, 3, "19.99")],
        "subtotal_price": Decimal("89.96"), "total_discounts": 0, "total_price": Decimal("89.96")}
    assert calls[2] == ["track", "categoryView", {"category_id": "mugs", "category_name": "Mugs"}]
    assert len(calls) == 3

    # Identified: each event is its own track, no second setCustomer.
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA)})["remarkety"]
    assert len(calls) == 1
    body = cart_body(calls[0], sc, url)
    customer_of(body)
    assert body["line_items"] == [line(MUG, 1, "29.99"), line(BOTTLE, 3, "19.99"), line(TEA, 1, "4.35")]
    assert body["subtotal_price"] == body["total_price"] == Decimal("94.31")
    calls = push(page, {"event": "remove_from_cart", "ecommerce": ecom(BOTTLE)})["remarkety"]
    assert cart_body(calls[0], sc, url)["line_items"] == [line(MUG, 1, "29.99"), line(TEA, 1, "4.35")]
    for name in ("view_cart", "cart_updated", "begin_checkout"):
        calls = push(page, {"event": name, "ecommerce": ecom(TEA)})["remarkety"]
        body = cart_body(calls[0], sc, url)
        assert len(calls) == 1 and body["line_items"] == [line(TEA, 1, "4.35")], name
        assert body["subtotal_price"] == body["total_price"] == Decimal("4.35")
    # abandoned_checkout_url: ecommerce.cart_url when the event gives it.
    calls = push(page, {"event": "view_cart", "ecommerce": ecom(TEA, cart_url="https://shop.example/cart/77")})
    cart_body(calls["remarkety"][0], sc, "https://shop.example/cart/77")
    assert calls["remarkety"][0][2]["id"] == first_cart  # one cart across its updates

    calls = push(page, {"event": "search", "search_term": "green tea", "ecommerce": ecom(TEA)})["remarkety"]
    assert calls == [["track", "siteSearch", {"search_keyword": "green tea", "products": [line(TEA, 1, "4.35")]}]]
    calls = push(page, {"event": "wishlist_shared", "list": "xmas", "ecommerce": {"items": []}})["remarkety"]
    assert calls == [["track", "wishlist_shared", {"list": "xmas", "ecommerce": {"items": []}}]]
    # Not Remarkety's in the page: purchase (the server's orders/create), page views, wishlist.
    assert push(page, {"event": "purchase", "ecommerce": ecom(TEA, transaction_id="1001", value=4.35)})["remarkety"] == []
    # The purchase closed the cart: the next one is another cart, with an id of its own (the
    # sc, a year long, named the converted cart again).
    (calls,) = push(page, {"event": "add_to_cart", "ecommerce": ecom(SPOON)})["remarkety"]
    assert cart_body(calls, sc, url)["line_items"] == [line(SPOON, 2, "2.5")]
    assert calls[2]["id"] != first_cart
    assert push(page, {"event": "add_to_wishlist", "ecommerce": ecom(MUG)})["remarkety"] == []
    assert push(page, {"event": "page_view", "page_location": vendors.static.url("/elsewhere")})["remarkety"] == []

    # A new identity: setCustomer again, once (profile fields go by the server's webhook).
    calls = push(page, {"event": "identify", "user": {"email": "bo@example.com", "first_name": "Bo"}})["remarkety"]
    assert calls == [["setCustomer", "bo@example.com"]]
    assert push(page, {"event": "identify", "user": {"email": "bo@example.com"}})["remarkety"] == []

    # Next page: every page starts a new _rmData, so the first call is preceded by setCustomer.
    page2 = open_page(context, vendors.page("all"))
    assert queues(page2)["remarkety"] == [["setStoreKey", "rm-store-1"]]
    calls = push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})["remarkety"]
    assert calls == [["setCustomer", "bo@example.com"],
                     ["productView", {"productId": "SKU-4000", "productName": "Tea", "productCategories": []}]]
    assert push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})["remarkety"] == [calls[1]]


def test_a_guest_cart_and_the_sites_cart_url(vendors, context):
    """customer and email are null for a guest ("customer: the object, or null for guests");
    abandoned_checkout_url comes from the site's cart_url template ({cart_guid}, {sc})."""
    url = page_with_site_settings(vendors, "all", cart_url="https://shop.example/cart?restore={cart_guid}&s={sc}")
    page = open_page(context, url)
    sc = next(c["value"] for c in context.cookies() if c["name"] == "sc")
    assert push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA)})["remarkety"] == []  # held
    page.evaluate("() => window.onetag.flush()")
    guid = page.evaluate("() => JSON.parse(localStorage.getItem('onetag_all_c')).guid")
    calls = push(page, {"event": "identify", "user": {"email": "cy@example.com"}})["remarkety"]
    body = cart_body(calls[1], sc, f"https://shop.example/cart?restore={guid}&s={sc}")
    assert customer_of(body) == {"email": "cy@example.com", "accepts_marketing": None}
    assert body["accepts_marketing"] is None and body["email"] == "cy@example.com"


def test_cart_matches_the_servers_carts_update(vendors, context):
    """Both paths send carts/update (routes: both) under one cart id: for the same event the
    page's cart and the server's webhook body are the same fields and values."""
    page = open_page(context, vendors.page("all"))
    # No accepts_marketing or customer_id: from the page they are claims the server
    # does not keep (docs/security.md), while the page's own library gets what it pushed.
    push(page, {"event": "identify", "user": {"email": f"dee-{uuid.uuid4().hex[:8]}@example.com",
                                             "first_name": "Dee", "last_name": "Ray",
                                             "phone": "+15550100"}})
    eid = str(uuid.uuid4())
    (browser,) = push(page, {"event": "cart_updated", "event_id": eid, "ecommerce": ecom(MUG, BOTTLE, TEA)})["remarkety"]
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "all", "remarkety", eid)
    assert browser[:2] == ["track", "carts/update"]
    assert browser[2]["customer"]["default_address"] == {"phone": "+15550100"}
    # customer.created_at: when the customer was first known, to the page (its identity's
    # since_ms) and to the server (the identity's creation): the same moment, seen by two
    # clocks, each the same on every cart.
    page_since = _first_known(browser[2], server)
    assert browser[2] == server
    (later,) = push(page, {"event": "add_to_cart", "ecommerce": ecom(SPOON)})["remarkety"]
    assert later[2]["customer"]["created_at"] == page_since
    assert later[2]["id"] == browser[2]["id"]  # one cart, one id across its updates


def test_an_identity_switch_starts_a_new_cart_on_both_paths(vendors, context):
    """The server closes a session's cart when the session, someone's, names someone else
    (server/store/rules.py bind_session): what A had in the cart is not B's. The page's
    mirror does the same, so both send B's cart under one new id, with B's lines only."""
    page = open_page(context, vendors.page("all"))
    tag = uuid.uuid4().hex[:8]
    push(page, {"event": "identify", "user": {"email": f"ann-{tag}@example.com"}})
    (a_cart,) = push(page, {"event": "add_to_cart", "ecommerce": ecom(MUG)})["remarkety"]
    push(page, {"event": "identify", "user": {"email": f"bo-{tag}@example.com"}})
    eid = str(uuid.uuid4())
    (browser,) = push(page, {"event": "add_to_cart", "event_id": eid, "ecommerce": ecom(TEA)})["remarkety"]
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "all", "remarkety", eid)
    assert browser[2]["id"] == server["id"] != a_cart[2]["id"]
    assert browser[2]["line_items"] == server["line_items"] == [line(TEA, 1, "4.35")]


def _first_known(page_body, server_body):
    """customer.created_at, popped from both: when the customer was first known, to the page
    (its identity's since_ms) and to the server (the identity's creation), one moment seen by
    two clocks. Returns the page's."""
    from datetime import datetime

    page_since = page_body["customer"].pop("created_at")
    server_since = server_body["customer"].pop("created_at")
    assert ISO.match(page_since) and ISO.match(server_since)
    assert abs(datetime.fromisoformat(page_since).timestamp()
               - datetime.fromisoformat(server_since).timestamp()) <= 5
    return page_since



def test_a_cart_without_currency_is_in_the_sites_currency(vendors, context):
    """The site ``shop`` (currency EUR): a cart push that names no currency is in the site's
    currency (mandatory in the event reference's carts/update), as the server's webhook for the
    same event is. The cart's currency is the event's (upper case, as the server reads it),
    else the site's: not an earlier event's, which the server does not keep either."""
    page = open_page(context, vendors.page("shop"))
    push(page, {"event": "identify", "user": {"email": f"eur-{uuid.uuid4().hex[:8]}@example.com"}})
    pushes = [("cart_updated", {"items": [dict(MUG), dict(BOTTLE)]}, "EUR"),
              ("add_to_cart", {"currency": "gbp", "items": [dict(SPOON)]}, "GBP"),
              ("view_cart", {"items": [dict(MUG), dict(SPOON)]}, "EUR")]
    for name, ecommerce, expected in pushes:
        eid = str(uuid.uuid4())
        (browser,) = push(page, {"event": name, "event_id": eid, "ecommerce": ecommerce})["remarkety"]
        assert browser[2].get("currency") == expected, name
        page.evaluate("() => window.onetag.flush()")
        (server,) = server_bodies(vendors, "shop", "remarkety", eid)
        _first_known(browser[2], server)  # each side's own clock
        assert browser[2] == server, name



def test_a_lines_sku_is_the_servers(vendors, context):
    """A line's sku is the item's item_sku, else its sku, else its item_id (the server's rule,
    server/vendors/_common.py sku): "the product id/sku should match a product from the
    products feed, otherwise a new product is created as disabled" (the custom platform
    guide). In carts/update, as in the server's webhook, and in siteSearch's products."""
    page = open_page(context, vendors.page("all"))
    push(page, {"event": "identify", "user": {"email": f"sku-{uuid.uuid4().hex[:8]}@example.com"}})
    items = [dict(MUG, item_sku="MUG-1"), dict(BOTTLE, sku="BOT-1"), dict(TEA, item_sku="TEA-1", sku="TEA-0"),
             dict(SPOON)]
    eid = str(uuid.uuid4())
    (browser,) = push(page, {"event": "cart_updated", "event_id": eid, "ecommerce": ecom(*items)})["remarkety"]
    assert [line["sku"] for line in browser[2]["line_items"]] == ["MUG-1", "BOT-1", "TEA-1", "SKU-6000"]
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "all", "remarkety", eid)
    _first_known(browser[2], server)
    assert browser[2] == server
    calls = push(page, {"event": "search", "search_term": "mug", "ecommerce": ecom(*items[:2])})["remarkety"]
    assert calls == [["track", "siteSearch", {"search_keyword": "mug", "products": [
        dict(line(MUG, 1, "29.99"), sku="MUG-1"), dict(line(BOTTLE, 3, "19.99"), sku="BOT-1")]}]]
