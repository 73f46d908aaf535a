"""Rejoiner's browser adapter in real Chromium: every row of CONTRACT.md section 6, exact payloads.

The stub library never consumes `_rejoiner`, so the array holds every call onetag made.
Prices are integer cents computed without float error (4.35 -> 435, 0.57 -> 57, 3 x 19.99 -> 5997).
"""

from __future__ import annotations

import dataclasses
import uuid

from vendor_stub_server import (during, open_page, page_with_site_settings, push, queues,  # noqa: F401
                                server_bodies, vendors)

MUG = {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1,
       "item_category": "Kitchen", "item_category2": "Mugs", "item_brand": "Acme",
       "item_url": "https://shop.example/p/mug", "image_url": "https://shop.example/i/mug.jpg",
       "description": "A mug", "in_stock": True}
BOTTLE = {"item_id": "SKU-3000", "item_name": "Bottle", "price": 19.99, "quantity": 3,
          "item_category": "Outdoor"}
TEA = {"item_id": "SKU-4000", "item_name": "Tea", "price": 4.35, "quantity": 1}
SUGAR = {"item_id": "SKU-5000", "item_name": "Sugar", "price": 0.57, "quantity": 1}


def rj_item(item, qty, cents):
    variant = f":{item['item_variant']}" if "item_variant" in item else ""
    out = {"product_id": item["item_id"] + variant, "name": item["item_name"],
           "price": cents, "item_qty": qty, "qty_price": cents * qty}
    categories = [item[k] for k in ("item_category", "item_category2") if k in item]
    if categories:  # an empty category is left out
        out["category"] = categories
    for src, dst in (("item_url", "product_url"), ("image_url", "image_url"),
                     ("description", "description")):
        if src in item:
            out[dst] = item[src]
    return out


def ecom(*items, **extra):
    return {"currency": "USD", "items": [dict(i) for i in items], **extra}


def test_load_page_views_and_the_cart_in_cents(vendors, context):
    page = open_page(context, vendors.page("all"))
    page.wait_for_function("() => window.__stub_rejoiner === 1")
    # (load) the base snippet: setAccount, setDomain; the library does the first page view.
    assert queues(page)["rejoiner"] == [["setAccount", "RJ2SITE"], ["setDomain", "127.0.0.1"]]
    assert page.evaluate("() => document.querySelectorAll('script[src$=\"/vendors/ok/rejoiner.js\"]').length") == 1

    # SPA route change: addPageView with the full URL; same URL or a hash change: nothing.
    calls = during(page, "history.pushState({}, '', '/shop/route-2?x=1')")
    assert calls["rejoiner"] == [["addPageView", {"url": vendors.static.url("/shop/route-2?x=1")}]]
    assert during(page, "history.pushState({}, '', '/shop/route-2?x=1')")["rejoiner"] == []
    assert during(page, "location.hash = 'reviews'")["rejoiner"] == []

    calls = push(page, {"event": "view_item", "ecommerce": ecom(MUG, value=29.99)})
    assert calls["rejoiner"] == [["trackProductView", {
        "product_id": "SKU-1000", "name": "Mug", "category": ["Kitchen", "Mugs"], "price": 2999,
        "product_url": "https://shop.example/p/mug", "image_url": "https://shop.example/i/mug.jpg",
        "description": "A mug"}]]

    # add_to_cart: setCartItem (quantity in the cart) + setCartData (whole cart).
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(MUG)})
    assert calls["rejoiner"] == [["setCartItem", rj_item(MUG, 1, 2999)],
                                 ["setCartData", {"cart_value": 2999, "cart_item_count": 1}]]
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE)})
    assert calls["rejoiner"] == [["setCartItem", rj_item(BOTTLE, 3, 1999)],
                                 ["setCartData", {"cart_value": 2999 + 5997, "cart_item_count": 4}]]
    assert calls["rejoiner"][0][1]["qty_price"] == 5997
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA, SUGAR)})
    assert calls["rejoiner"] == [["setCartItem", rj_item(TEA, 1, 435)],
                                 ["setCartItem", rj_item(SUGAR, 1, 57)],
                                 ["setCartData", {"cart_value": 9488, "cart_item_count": 6}]]
    # One more mug: the line now holds 2.
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(MUG)})
    assert calls["rejoiner"] == [["setCartItem", rj_item(MUG, 2, 2999)],
                                 ["setCartData", {"cart_value": 12487, "cart_item_count": 7}]]

    # remove_from_cart: a line that leaves -> removeCartItem; a partial removal -> setCartItem.
    calls = push(page, {"event": "remove_from_cart", "ecommerce": ecom(SUGAR)})
    assert calls["rejoiner"] == [["removeCartItem", {"product_id": "SKU-5000"}],
                                 ["setCartData", {"cart_value": 12430, "cart_item_count": 6}]]
    calls = push(page, {"event": "remove_from_cart", "ecommerce": ecom(MUG)})
    assert calls["rejoiner"] == [["setCartItem", rj_item(MUG, 1, 2999)],
                                 ["setCartData", {"cart_value": 9431, "cart_item_count": 5}]]

    # view_cart / cart_updated / begin_checkout carry the whole cart: clearCartData (so a line
    # that left leaves Rejoiner's cart too), then setCartData and setCartItem for each line.
    cart = [MUG, BOTTLE, TEA]
    full = [rj_item(MUG, 1, 2999), rj_item(BOTTLE, 3, 1999), rj_item(TEA, 1, 435)]
    for name in ("view_cart", "cart_updated"):
        calls = push(page, {"event": name, "ecommerce": ecom(*cart, value=94.31)})
        assert calls["rejoiner"] == [["clearCartData"], ["setCartData", {"cart_value": 9431, "cart_item_count": 5}]] + \
            [["setCartItem", i] for i in full], name
    calls = push(page, {"event": "begin_checkout", "ecommerce": ecom(*cart, value=94.31, coupon="SPRING")})
    assert calls["rejoiner"] == [["clearCartData"], ["setCartData", {"cart_value": 9431, "cart_item_count": 5,
                                                                     "promo": "SPRING"}]] + [["setCartItem", i] for i in full]

    # purchase: sendConversion with cart_data and cart_items.
    calls = push(page, {"event": "purchase", "ecommerce": ecom(*cart, transaction_id="1001",
                                                              value=94.31, coupon="SPRING", tax=7.5)})
    assert calls["rejoiner"] == [["sendConversion", {
        "cart_data": {"cart_value": 9431, "cart_item_count": 5, "order_number": "1001", "promo": "SPRING"},
        "cart_items": full}]]

    # Rows with no Rejoiner call.
    for event in ({"event": "view_item_list", "ecommerce": ecom(MUG, item_list_id="mugs")},
                  {"event": "search", "search_term": "mug", "ecommerce": ecom()},
                  {"event": "add_to_wishlist", "ecommerce": ecom(MUG)},
                  {"event": "newsletter_popup_seen", "popup": "spring"}):
        assert push(page, event)["rejoiner"] == [], event["event"]


def test_identity_once_per_change(vendors, context):
    page = open_page(context, vendors.page("all"))
    calls = push(page, {"event": "identify", "user": {"email": " Ann@Example.com ", "first_name": "Ann",
                                                     "last_name": "Lee", "phone": "+15550100"}})
    assert calls["rejoiner"] == [["setCustomerEmail", {"email": "ann@example.com"}],
                                 ["setCustomerData", {"first_name": "Ann", "last_name": "Lee"}]]
    # The same identity again, and a new page for the same visitor: nothing more.
    assert push(page, {"event": "identify", "user": {"email": "ann@example.com"}})["rejoiner"] == []
    page2 = open_page(context, vendors.page("all"))
    assert queues(page2)["rejoiner"] == [["setAccount", "RJ2SITE"], ["setDomain", "127.0.0.1"]]
    assert [c[0] for c in push(page2, {"event": "view_item", "ecommerce": ecom(MUG)})["rejoiner"]] == \
        ["trackProductView"]
    # An email typed into a form is an identity change too (no names: no setCustomerData).
    calls = during(page2, "var i = document.getElementById('email'); i.value = 'Bob@Example.com';"
                          "i.dispatchEvent(new Event('change', {bubbles: true}))")
    assert calls["rejoiner"] == [["setCustomerEmail", {"email": "bob@example.com"}]]
    # A change carried by an event Rejoiner does not take in the page still reaches it, once,
    # on its next event (here: a custom event, off for Rejoiner, then a product view).
    assert push(page2, {"event": "quiz_done", "user": {"email": "cy@example.com"}})["rejoiner"] == []
    calls = push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})
    assert [c[0] for c in calls["rejoiner"]] == ["setCustomerEmail", "trackProductView"]
    assert calls["rejoiner"][0][1] == {"email": "cy@example.com"}
    assert [c[0] for c in push(page2, {"event": "view_item", "ecommerce": ecom(TEA)})["rejoiner"]] == \
        ["trackProductView"]


def replay_rejoiner_cart(calls):
    """Rejoiner's cart after these calls, as its guide describes them: setCartItem adds or
    updates a line by product_id, removeCartItem drops one, clearCartData drops them all."""
    lines: dict[str, int] = {}
    for call in calls:
        if call[0] == "setCartItem":
            lines[call[1]["product_id"]] = call[1]["item_qty"]
        elif call[0] == "removeCartItem":
            lines.pop(call[1]["product_id"], None)
        elif call[0] == "clearCartData":
            lines.clear()
    return lines


def test_rejoiners_cart_equals_onetags_and_variants_are_lines(vendors, context):
    page = open_page(context, vendors.page("all"))
    red, blue = dict(BOTTLE, item_variant="red", quantity=1), dict(BOTTLE, item_variant="blue", quantity=2)
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(red, blue, TEA)})["rejoiner"]
    # Two variants of one item are two lines: item_id + ":" + item_variant.
    assert [c[1]["product_id"] for c in calls if c[0] == "setCartItem"] == ["SKU-3000:red", "SKU-3000:blue", "SKU-4000"]
    # A full-cart event that drops lines: Rejoiner's cart afterwards is exactly onetag's.
    calls += push(page, {"event": "cart_updated", "ecommerce": ecom(blue)})["rejoiner"]
    assert replay_rejoiner_cart(calls) == {"SKU-3000:blue": 2}
    calls += push(page, {"event": "remove_from_cart", "ecommerce": ecom(dict(blue, quantity=1))})["rejoiner"]
    assert replay_rejoiner_cart(calls) == {"SKU-3000:blue": 1}
    # An emptied cart: clearCartData alone.
    last = push(page, {"event": "view_cart", "ecommerce": ecom()})["rejoiner"]
    assert last == [["clearCartData"]] and replay_rejoiner_cart(calls + last) == {}


def test_set_domain_defaults_to_the_page_host_and_return_url_leads_to_the_cart(vendors, context):
    from server.config import load

    rejoiner = load(vendors.onetag.config_path).sites["all"].vendors["rejoiner"]
    no_domain = dataclasses.replace(rejoiner, values={k: v for k, v in rejoiner.values.items() if k != "domain"})
    site = load(vendors.onetag.config_path).sites["all"]
    url = page_with_site_settings(vendors, "all", vendors={**site.vendors, "rejoiner": no_domain},
                                  cart_url="https://shop.example/cart/{cart_guid}")
    page = open_page(context, url)
    # setDomain is part of the guide's Basic Snippet: the page's host when none is configured.
    assert queues(page)["rejoiner"] == [["setAccount", "RJ2SITE"], ["setDomain", "127.0.0.1"]]
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA)})["rejoiner"]
    guid = page.evaluate("() => JSON.parse(localStorage.getItem('onetag_all_c')).guid")
    assert calls[-1] == ["setCartData", {"cart_value": 435, "cart_item_count": 1,
                                         "return_url": f"https://shop.example/cart/{guid}"}]
    # The event's own ecommerce.cart_url wins.
    calls = push(page, {"event": "view_cart", "ecommerce": ecom(TEA, cart_url="https://shop.example/c?id=5")})
    assert calls["rejoiner"][1] == ["setCartData", {"cart_value": 435, "cart_item_count": 1,
                                                    "return_url": "https://shop.example/c?id=5"}]


def test_a_cart_url_template_has_every_placeholder_filled_as_on_the_server(vendors, context):
    """The site's cart_url template may name {cart_guid} and {sc} more than once, and write a
    literal brace as {{ or }}: the server fills it with str.format (server/vendors/_common.py
    cart_url), so the page's return_url is that same URL."""
    from server.vendors._common import cart_url

    template = "https://shop.example/c/{cart_guid}/{{x}}?g={cart_guid}&s={sc}&t={sc}"
    page = open_page(context, page_with_site_settings(vendors, "all", cart_url=template))
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA)})["rejoiner"]
    guid = page.evaluate("() => JSON.parse(localStorage.getItem('onetag_all_c')).guid")
    sc = next(c["value"] for c in context.cookies() if c["name"] == "sc")
    expected = f"https://shop.example/c/{guid}/{{x}}?g={guid}&s={sc}&t={sc}"
    assert cart_url({"cart": {"guid": guid}, "sc": sc}, template) == expected
    assert calls[-1] == ["setCartData", {"cart_value": 435, "cart_item_count": 1,
                                         "return_url": expected}]


PRODUCT_URL, IMAGE_URL = "https://shop.example/p/1000", "https://shop.example/i/1000.png"
CART_URL = "https://shop.example/cart?id=7"


def test_cart_golden_from_the_guide(vendors, context):
    """The guide's setCartItem and setCartData examples ("Tracking Cart Activity"): SKU-1000,
    "Product Name", 2 x 2999 = 5998 cents; a cart of 7996 cents and 4 items with promo and
    return_url. The guide's URLs are "..."; a page's links are absolute by the time they reach
    a vendor (a relative one is made so against the page), so these are real ones."""
    page = open_page(context, vendors.page("all"))
    product = {"item_id": "SKU-1000", "item_name": "Product Name", "item_category": "product",
               "item_category2": "categories", "price": 29.99, "quantity": 2, "item_url": PRODUCT_URL,
               "image_url": IMAGE_URL, "description": "..."}
    other = {"item_id": "SKU-2000", "item_name": "Other", "price": 9.99, "quantity": 2}
    calls = push(page, {"event": "begin_checkout", "ecommerce": ecom(product, other, coupon="PROMO", cart_url=CART_URL)})
    assert calls["rejoiner"][1] == ["setCartData", {"cart_value": 7996, "cart_item_count": 4, "promo": "PROMO",
                                                    "return_url": CART_URL}]
    assert calls["rejoiner"][2] == ["setCartItem", {
        "product_id": "SKU-1000", "name": "Product Name", "category": ["product", "categories"],
        "price": 2999, "item_qty": 2, "qty_price": 5998, "product_url": PRODUCT_URL, "image_url": IMAGE_URL,
        "description": "..."}]


def test_an_empty_variant_is_no_variant_as_on_the_server(vendors, context):
    """product_id is item_id + ":" + item_variant only for a variant that says something: an
    empty (or blank) item_variant is the bare item_id, in every call, as the server's
    customer/convert cart_items have it (server/vendors/_common.py line_id)."""
    page = open_page(context, vendors.page("all"))
    plain, blank = dict(TEA, item_variant=""), dict(SUGAR, item_variant="  ")
    sized = dict(BOTTLE, item_variant=" M ")
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(plain, blank, sized)})["rejoiner"]
    assert [c[1]["product_id"] for c in calls if c[0] == "setCartItem"] == ["SKU-4000", "SKU-5000", "SKU-3000:M"]
    # A line whose variant is empty is the item's line: removing the item without a variant
    # removes it, from Rejoiner's cart and onetag's (the server's cart line key is the same).
    eid = str(uuid.uuid4())
    calls = push(page, {"event": "remove_from_cart", "event_id": eid, "ecommerce": ecom(TEA)})["rejoiner"]
    assert calls[0] == ["removeCartItem", {"product_id": "SKU-4000"}]
    mirror = page.evaluate("() => JSON.parse(localStorage.getItem('onetag_all_c')).items")
    page.evaluate("() => window.onetag.flush()")
    rows = vendors.onetag.wait_events(lambda rows: any(r["data"]["event_id"] == eid for r in rows),
                                      "the remove_from_cart", site_id="all")
    server_cart = next(r["data"]["cart"] for r in rows if r["data"]["event_id"] == eid)
    assert [line["item_id"] for line in mirror] == [line["item_id"] for line in server_cart["items"]] == [
        "SKU-5000", "SKU-3000"]
    calls = push(page, {"event": "view_item", "ecommerce": ecom(plain)})["rejoiner"]
    assert calls[0][1]["product_id"] == "SKU-4000"

    eid = str(uuid.uuid4())
    (conversion,) = push(page, {"event": "purchase", "event_id": eid,
                                "ecommerce": ecom(plain, blank, sized, transaction_id="RJ-77")})["rejoiner"]
    assert [item["product_id"] for item in conversion[1]["cart_items"]] == ["SKU-4000", "SKU-5000", "SKU-3000:M"]
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "all", "rejoiner", eid)
    assert conversion[1]["cart_items"] == server["cart_items"]


def test_a_conversion_names_the_carts_url_as_on_the_server(vendors, context):
    """sendConversion's cart_data has the guide's return_url ("http://example.com/cart/12345"):
    the cart's URL, as the server's customer/convert has it (server/vendors/_common.py
    cart_url): the event's ecommerce.cart_url, else the site's template for the cart as bought.
    A purchase with no cart before it has none, on either path (the template names a GUID
    there is not)."""
    page = open_page(context, vendors.page("shop"))
    sc = next(c["value"] for c in context.cookies() if c["name"] == "sc")
    push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA)})
    guid = page.evaluate("() => JSON.parse(localStorage.getItem('onetag_shop_c')).guid")
    eid = str(uuid.uuid4())
    (conversion,) = push(page, {"event": "purchase", "event_id": eid,
                                "ecommerce": ecom(TEA, transaction_id=f"RJ-{eid[:8]}")})["rejoiner"]
    assert conversion[1]["cart_data"]["return_url"] == f"https://shop.example/cart?restore={guid}&s={sc}"
    page.evaluate("() => window.onetag.flush()")
    (server,) = server_bodies(vendors, "shop", "rejoiner", eid)
    assert conversion[1] == {"cart_data": server["cart_data"], "cart_items": server["cart_items"]}

    # One click: no cart before the purchase (a fresh visitor), no return_url.
    other = context.browser.new_context()
    try:
        page = open_page(other, vendors.page("shop"))
        eid = str(uuid.uuid4())
        (conversion,) = push(page, {"event": "purchase", "event_id": eid,
                                    "ecommerce": ecom(TEA, transaction_id=f"RJ-{eid[:8]}")})["rejoiner"]
        assert "return_url" not in conversion[1]["cart_data"]
        page.evaluate("() => window.onetag.flush()")
        (server,) = server_bodies(vendors, "shop", "rejoiner", eid)
        assert conversion[1] == {"cart_data": server["cart_data"], "cart_items": server["cart_items"]}
    finally:
        other.close()
