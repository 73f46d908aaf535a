"""eSputnik's browser adapter in real Chromium: CONTRACT.md section 6, exact `eS.q` calls.

The stub library leaves `eS` as the loader's queue function, so `eS.q` holds the arguments of
every call onetag made. StatusCart carries the whole cart and a GUID that is new for every new
cart state; PurchasedItems carries the GUID of the last StatusCart, across pages.
"""

from __future__ import annotations

import re
import uuid


from vendor_stub_server import during, open_page, push, queues, server_bodies, vendors  # noqa: F401

MUG = {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1, "in_stock": True}
BOTTLE = {"item_id": "SKU-3000", "item_name": "Bottle", "price": 19.99, "quantity": 3}
TEA = {"item_id": "SKU-4000", "item_name": "Tea", "price": 4.35, "quantity": 1, "in_stock": False}
SUGAR = {"item_id": "SKU-5000", "item_name": "Sugar", "price": 0.57, "quantity": 2}

GUID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")


def ecom(*items, **extra):
    return {"currency": "USD", "items": [dict(i) for i in items], **extra}


def line(item, qty, price):
    return {"productKey": item["item_id"], "price": price, "quantity": qty, "currency": "USD"}


def status_cart(calls):
    assert len(calls) == 1 and calls[0][:2] == ["sendEvent", "StatusCart"], calls
    body = calls[0][2]
    assert set(body) == {"StatusCart", "GUID"} and GUID.match(body["GUID"]), body
    return body["StatusCart"], body["GUID"]


def test_events_and_cart_guids(vendors, context):
    page = open_page(context, vendors.page("all"))
    page.wait_for_function("() => window.__stub_esputnik === 1")
    # (load) the loader: eS is the queue function, eS.q its arguments; then init.
    # The doc's loader exactly: eS(...) -> f.c(arguments) -> f.q.push(arguments), so an entry
    # of eS.q is f.c's arguments object holding the call's own arguments object.
    assert page.evaluate("() => typeof eS === 'function' && Array.isArray(eS.q) && eS.q.length === 1"
                         " && eS.q[0].length === 1 && eS.q[0][0][0] === 'init'"
                         " && Object.prototype.toString.call(eS.q[0][0]) === '[object Arguments]'")
    assert queues(page)["esputnik"] == [["init", {"TRACKING": False, "RECOMS": True}]]
    assert page.evaluate("() => document.querySelectorAll('script[src$=\"/vendors/ok/esputnik.js\"]').length") == 1

    # SPA route change: PageView; the first load is the library's own.
    assert during(page, "history.pushState({}, '', '/c/mugs')")["esputnik"] == \
        [["sendEvent", "PageView", {"PageView": {}}]]
    assert during(page, "history.replaceState({}, '', '/c/mugs#top')")["esputnik"] == []

    # ProductPage: price string, isInStock 1/0 (left out when unknown).
    assert push(page, {"event": "view_item", "ecommerce": ecom(MUG)})["esputnik"] == \
        [["sendEvent", "ProductPage", {"ProductPage": {"productKey": "SKU-1000", "price": "29.99", "isInStock": 1}}]]
    assert push(page, {"event": "view_item", "ecommerce": ecom(TEA)})["esputnik"] == \
        [["sendEvent", "ProductPage", {"ProductPage": {"productKey": "SKU-4000", "price": "4.35", "isInStock": 0}}]]
    assert push(page, {"event": "view_item", "ecommerce": ecom(SUGAR)})["esputnik"] == \
        [["sendEvent", "ProductPage", {"ProductPage": {"productKey": "SKU-5000", "price": "0.57"}}]]
    assert push(page, {"event": "view_item_list", "ecommerce": ecom(MUG, item_list_id="mugs",
                                                                    item_list_name="Mugs")})["esputnik"] == \
        [["sendEvent", "CategoryPage", {"CategoryPage": {"categoryKey": "mugs"}}]]
    # categoryKey is required: a list without id or name sends nothing (not categoryKey "").
    assert push(page, {"event": "view_item_list", "ecommerce": ecom(MUG)})["esputnik"] == []
    assert push(page, {"event": "add_to_wishlist", "ecommerce": ecom(MUG)})["esputnik"] == \
        [["sendEvent", "AddToWishlist", {"AddToWishlist": {"productKey": "SKU-1000", "price": "29.99", "isInStock": 1}}]]

    # SearchRequest only for a search that found nothing.
    assert push(page, {"event": "search", "search_term": "unicorn", "ecommerce": ecom()})["esputnik"] == \
        [["sendEvent", "SearchRequest", {"SearchRequest": {"search": "unicorn"}}]]
    assert push(page, {"event": "search", "search_term": "mug", "ecommerce": ecom(MUG)})["esputnik"] == []
    assert push(page, {"event": "search", "search_term": "mug"})["esputnik"] == []

    # StatusCart: the whole cart, a new GUID per cart state.
    cart, g1 = status_cart(push(page, {"event": "add_to_cart", "ecommerce": ecom(MUG)})["esputnik"])
    assert cart == [line(MUG, 1, "29.99")]
    cart, again = status_cart(push(page, {"event": "view_cart", "ecommerce": ecom(MUG)})["esputnik"])
    assert cart == [line(MUG, 1, "29.99")] and again == g1  # same state, same GUID
    cart, g2 = status_cart(push(page, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE, SUGAR)})["esputnik"])
    assert cart == [line(MUG, 1, "29.99"), line(BOTTLE, 3, "19.99"), line(SUGAR, 2, "0.57")]
    assert g2 != g1
    cart, g3 = status_cart(push(page, {"event": "remove_from_cart", "ecommerce": ecom(SUGAR)})["esputnik"])
    assert cart == [line(MUG, 1, "29.99"), line(BOTTLE, 3, "19.99")] and g3 not in (g1, g2)
    cart, g4 = status_cart(push(page, {"event": "cart_updated", "ecommerce": ecom(MUG, TEA)})["esputnik"])
    assert cart == [line(MUG, 1, "29.99"), line(TEA, 1, "4.35")] and g4 not in (g1, g2, g3)
    cart, g5 = status_cart(push(page, {"event": "begin_checkout", "ecommerce": ecom(MUG, TEA)})["esputnik"])
    assert g5 == g4  # checkout of the same cart: same state
    cart, g6 = status_cart(push(page, {"event": "remove_from_cart", "ecommerce": ecom(MUG, TEA)})["esputnik"])
    assert cart == [] and g6 not in (g1, g2, g3, g4)  # an emptied cart is StatusCart []
    cart, g7 = status_cart(push(page, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE)})["esputnik"])
    assert cart == [line(BOTTLE, 3, "19.99")] and g7 != g6

    # Not eSputnik's in the page: identify (server: CustomerData), custom events (server).
    assert push(page, {"event": "identify", "user": {"email": "ann@example.com"}})["esputnik"] == []
    assert push(page, {"event": "quiz_done", "score": 3})["esputnik"] == []

    # The thank-you page (a new page load): PurchasedItems with the last StatusCart's GUID.
    page2 = open_page(context, vendors.page("all"))
    calls = push(page2, {"event": "purchase", "ecommerce": ecom(BOTTLE, transaction_id="1001/A", value=59.97)})
    assert calls["esputnik"] == [["sendEvent", "PurchasedItems", {
        "PurchasedItems": [line(BOTTLE, 3, "19.99")], "OrderNumber": "1001/A", "GUID": g7}]]
    # After the purchase the next cart is a new state, even with the same content.
    cart, g8 = status_cart(push(page2, {"event": "add_to_cart", "ecommerce": ecom(BOTTLE)})["esputnik"])
    assert cart == [line(BOTTLE, 3, "19.99")] and g8 != g7
    # A purchase with no StatusCart before it (one click): no GUID.
    page3 = open_page(context, vendors.page("all"))
    push(page3, {"event": "purchase", "ecommerce": ecom(MUG, transaction_id="1002")})
    calls = push(page3, {"event": "purchase", "ecommerce": ecom(TEA, transaction_id="1003")})
    assert calls["esputnik"] == [["sendEvent", "PurchasedItems", {
        "PurchasedItems": [line(TEA, 1, "4.35")], "OrderNumber": "1003"}]]


def sent(vendors, page, event_id):
    """The event as the page sent it to onetag (the wire form, with its cart_guid)."""
    page.evaluate("() => window.onetag.flush()")
    rows = vendors.onetag.wait_events(lambda rows: any(r["data"]["event_id"] == event_id for r in rows),
                                      f"event {event_id} stored", site_id="all")
    return next(r["raw"] for r in rows if r["data"]["event_id"] == event_id)


def test_one_guid_per_cart_state_for_both_paths(vendors, context):
    """The GUID of StatusCart is the one the page sends onetag with the event (cart_guid), and
    the purchase quotes the last one in the doc's "purchase from the site" form:
    eS('sendEvent', 'PurchasedItems', {OrderNumber, PurchasedItems: [...], GUID})."""
    page = open_page(context, vendors.page("all"))
    ids = [str(uuid.uuid4()) for _ in range(3)]
    cart, g1 = status_cart(push(page, {"event": "add_to_cart", "event_id": ids[0], "ecommerce": ecom(MUG)})["esputnik"])
    cart, g2 = status_cart(push(page, {"event": "begin_checkout", "event_id": ids[1], "ecommerce": ecom(MUG)})["esputnik"])
    assert g1 == g2  # the same cart state
    # The doc's example order: OrderNumber "123/2017", productKey "24-MB02", price "153".
    item = {"item_id": "24-MB02", "item_name": "Bag", "price": 153, "quantity": 1}
    calls = push(page, {"event": "purchase", "event_id": ids[2],
                        "ecommerce": ecom(item, transaction_id="123/2017")})["esputnik"]
    assert calls == [["sendEvent", "PurchasedItems", {
        "OrderNumber": "123/2017",
        "PurchasedItems": [{"productKey": "24-MB02", "price": "153.00", "quantity": 1, "currency": "USD"}],
        "GUID": g1}]]
    assert [sent(vendors, page, eid).get("cart_guid") for eid in ids] == [g1, g1, g1]


def test_status_cart_and_purchase_match_the_servers(vendors, context):
    """Both paths can send StatusCart and PurchasedItems (routes: fallback): the tracker's
    copy names the page's GUID, so whichever path sends PurchasedItems quotes the StatusCart
    either path sent."""
    page = open_page(context, vendors.page("all"))
    cart_id, order_id = str(uuid.uuid4()), str(uuid.uuid4())
    cart, guid = status_cart(push(page, {"event": "add_to_cart", "event_id": cart_id,
                                         "ecommerce": ecom(MUG, BOTTLE)})["esputnik"])
    push(page, {"event": "purchase", "event_id": order_id, "ecommerce": ecom(MUG, BOTTLE, transaction_id="9001")})
    page.evaluate("() => window.onetag.flush()")
    (status,) = server_bodies(vendors, "all", "esputnik", cart_id)
    assert status["StatusCart"]["GUID"] == guid
    assert status["StatusCart"]["Products"] == [
        {"productKey": line["productKey"], "price": line["price"], "quantity": line["quantity"],
         "price_currency_code": "USD"} for line in cart]
    (purchased,) = server_bodies(vendors, "all", "esputnik", order_id)
    assert purchased["PurchasedItems"] == {"GUID": guid, "OrderNumber": "9001"}


def test_lines_without_a_currency_are_in_the_sites(vendors, context):
    """The site ``shop`` (currency EUR): StatusCart and PurchasedItems lines of pushes that name
    no currency carry the site's, as the server's StatusCart (price_currency_code) does; an
    event's own currency wins, read as the server reads it (upper case)."""
    page = open_page(context, vendors.page("shop"))
    cart_id = str(uuid.uuid4())
    cart, guid = status_cart(push(page, {"event": "add_to_cart", "event_id": cart_id,
                                         "ecommerce": {"items": [dict(MUG), dict(BOTTLE)]}})["esputnik"])
    assert [item["currency"] for item in cart] == ["EUR", "EUR"]
    page.evaluate("() => window.onetag.flush()")
    (status,) = server_bodies(vendors, "shop", "esputnik", cart_id)
    assert status["StatusCart"] == {"GUID": guid, "Products": [
        {"productKey": item["productKey"], "price": item["price"], "quantity": item["quantity"],
         "price_currency_code": item["currency"]} for item in cart]}
    calls = push(page, {"event": "purchase", "ecommerce": {"transaction_id": "9101", "items": [dict(MUG)]}})
    assert calls["esputnik"] == [["sendEvent", "PurchasedItems", {
        "OrderNumber": "9101", "PurchasedItems": [dict(line(MUG, 1, "29.99"), currency="EUR")], "GUID": guid}]]

    cart_id = str(uuid.uuid4())
    cart, _ = status_cart(push(page, {"event": "add_to_cart", "event_id": cart_id,
                                      "ecommerce": {"currency": "pln", "items": [dict(TEA)]}})["esputnik"])
    assert [item["currency"] for item in cart] == ["PLN"]
    page.evaluate("() => window.onetag.flush()")
    (status,) = server_bodies(vendors, "shop", "esputnik", cart_id)
    assert status["StatusCart"]["Products"][0]["price_currency_code"] == "PLN"


def stored_loaded(vendors, page, event_id):
    """The vendors that took the event in the page, as onetag stored it (``loaded``)."""
    page.evaluate("() => window.onetag.flush()")
    rows = vendors.onetag.wait_events(lambda rows: any(r["data"]["event_id"] == event_id for r in rows),
                                      f"event {event_id} stored", site_id="all")
    return sorted(next(r["data"] for r in rows if r["data"]["event_id"] == event_id)["loaded"])


def test_a_product_without_a_price_is_left_to_the_server(vendors, context):
    """"Transferring Website Behavior Data via REST API": price is Required in ProductPage,
    AddToWishlist and StatusCart. The page has no catalog: an item without a price is not
    sent through eS.js, and eSputnik is left out of the event's `loaded`, so on its
    `fallback` route the server sends it with the catalog's price (or records why not)."""
    page = open_page(context, vendors.page("all"))
    page.wait_for_function("() => window.__stub_esputnik === 1")
    bare = {"item_id": "SKU-9000", "item_name": "Unpriced", "quantity": 1}
    ids = [str(uuid.uuid4()) for _ in range(4)]
    for event_id, name in zip(ids, ("view_item", "add_to_wishlist", "add_to_cart")):
        calls = push(page, {"event": name, "event_id": event_id, "ecommerce": ecom(bare)})
        assert calls["esputnik"] == [], name
    # The cart now holds the unpriced line: the purchase of it is the server's too.
    calls = push(page, {"event": "purchase", "event_id": ids[3],
                        "ecommerce": ecom(bare, MUG, transaction_id="1009")})
    assert calls["esputnik"] == []
    for event_id in ids:
        assert "esputnik" not in stored_loaded(vendors, page, event_id)
    # A priced product still goes through eS.js, and counts as taken.
    eid = str(uuid.uuid4())
    assert push(page, {"event": "view_item", "event_id": eid, "ecommerce": ecom(MUG)})["esputnik"] == \
        [["sendEvent", "ProductPage", {"ProductPage": {"productKey": "SKU-1000", "price": "29.99", "isInStock": 1}}]]
    assert "esputnik" in stored_loaded(vendors, page, eid)
