"""eSputnik tracker REST v2: golden bodies per CONTRACT.md section 7, shaped as the JSON
examples of eSputnik's "Transferring Website Behavior Data via REST API" (prices as
strings)."""

from __future__ import annotations

import base64

from server.vendors import esputnik

from ._events import (BOOK, CLIP, EMAIL, GUID, MUG, PEN, SC, T_MS, cart, context, ecommerce,
                      event, identity, item, samples)

CTX = context(esputnik)
URL = "https://tracker.esputnik.com/api/v2"
WHO = identity(customer_id="1234509876", first_name="Gregori", last_name="Boczynski",
               phone="1-541-754-3010")


def general(event_name, **extra):
    return {"eventName": event_name, "siteId": "8A412DC", "datetime": T_MS,
            "externalCustomerId": "1234509876", "user_email": EMAIL,
            "user_phone": "1-541-754-3010", "user_name": "Gregori Boczynski",
            "cookies": {"sc": SC}, **extra}


def test_identify_sends_customer_data():
    evt = event("identify", user={"email": EMAIL}, identity=WHO)
    [req] = esputnik.plan(evt, CTX)
    assert (req.method, req.url) == ("POST", URL)
    assert req.json == {"GeneralInfo": general("CustomerData")}
    assert req.needs_email is False
    assert req.dedup_key.startswith("CustomerData:")
    later = {**evt, "event_id": "EVT-2", "time_ms": T_MS + 1000}
    assert esputnik.plan(later, CTX)[0].dedup_key == req.dedup_key
    other_device = {**evt, "sc": "11111111-2222-3333-4444-555555555555"}
    assert esputnik.plan(other_device, CTX)[0].dedup_key != req.dedup_key


def test_view_item_is_a_product_page():
    [req] = esputnik.plan(event("view_item", ecommerce=ecommerce(MUG), identity=WHO), CTX)
    assert req.json == {"GeneralInfo": general("ProductPage"),
                        "ProductPage": {"Product": {"productKey": "SKU-1000", "price": "29.99",
                                                    "isInStock": "1"}}}
    assert req.dedup_key == f"ProductPage:{SC}/EVT-1"
    assert req.needs_email is False


def test_anonymous_events_go_by_the_sc_cookie():
    [req] = esputnik.plan(event("view_item", ecommerce=ecommerce(PEN)), CTX)
    assert req.json["GeneralInfo"] == {"eventName": "ProductPage", "siteId": "8A412DC",
                                       "datetime": T_MS, "cookies": {"sc": SC}}
    assert req.json["ProductPage"] == {"Product": {"productKey": "SKU-435", "price": "4.35"}}


def test_view_item_list_is_a_category_page():
    evt = event("view_item_list", ecommerce=ecommerce(MUG, item_list_id="509876",
                                                      item_list_name="Babies"), identity=WHO)
    [req] = esputnik.plan(evt, CTX)
    assert req.json == {"GeneralInfo": general("CategoryPage"),
                        "CategoryPage": {"Category": {"categoryKey": "509876"}}}
    assert req.dedup_key == f"CategoryPage:{SC}/EVT-1"
    by_name = event("view_item_list", ecommerce=ecommerce(MUG, item_list_name="Babies"))
    assert esputnik.plan(by_name, CTX)[0].json["CategoryPage"] == {
        "Category": {"categoryKey": "Babies"}}
    assert esputnik.plan(event("view_item_list", ecommerce=ecommerce(MUG)), CTX) == []


def test_add_to_wishlist():
    out = item("SKU-9", 754, 1, in_stock=False)
    [mug, gone] = esputnik.plan(event("add_to_wishlist", ecommerce=ecommerce(MUG, out),
                                      identity=WHO), CTX)
    assert mug.json == {"GeneralInfo": general("AddToWishlist"),
                        "AddToWishlist": {"Product": {"productKey": "SKU-1000", "price": "29.99",
                                                      "isInStock": "1"}}}
    assert gone.json["AddToWishlist"] == {"Product": {"productKey": "SKU-9", "price": "7.54",
                                                      "isInStock": "0"}}
    assert (mug.dedup_key, gone.dedup_key) == (f"AddToWishlist:{SC}/EVT-1:0", f"AddToWishlist:{SC}/EVT-1:1")


def test_cart_change_is_the_whole_cart_under_its_guid():
    evt = event("add_to_cart", ecommerce=ecommerce(BOOK), cart=cart(PEN, CLIP, BOOK),
                identity=WHO)
    [req] = esputnik.plan(evt, CTX)
    assert req.json == {
        "GeneralInfo": general("StatusCart"),
        "StatusCart": {"GUID": GUID, "Products": [
            {"productKey": "SKU-435", "price": "4.35", "quantity": 1, "price_currency_code": "USD"},
            {"productKey": "SKU-057", "price": "0.57", "quantity": 1, "price_currency_code": "USD"},
            {"productKey": "SKU-1999", "price": "19.99", "quantity": 3,
             "price_currency_code": "USD"},
        ]},
    }
    assert req.dedup_key == f"StatusCart:{GUID}"
    assert req.needs_email is False
    [empty] = esputnik.plan(event("remove_from_cart", ecommerce=ecommerce(PEN),
                                  cart=cart(guid="G-EMPTY")), CTX)
    assert empty.json["StatusCart"] == {"GUID": "G-EMPTY", "Products": []}
    assert esputnik.plan(event("view_cart", sc=None, ecommerce=ecommerce(PEN)), CTX) == []


def test_purchase_refers_to_the_last_cart_guid():
    """ES REST "PurchasedItems" example: {GUID, OrderNumber} and nothing else; the lines are
    the StatusCart's under that GUID."""
    evt = event("purchase", ecommerce=ecommerce(MUG, PEN, transaction_id="123/2017"),
                cart=cart(MUG, PEN), identity=WHO)
    [req] = esputnik.plan(evt, CTX)
    assert req.json == {
        "GeneralInfo": general("PurchasedItems"),
        "PurchasedItems": {"GUID": "6F9619FF-8B86-D011-B42D-00CF4FC964FF",
                           "OrderNumber": "123/2017"},
    }
    assert req.dedup_key == "PurchasedItems:123/2017"
    assert req.needs_email is False


def test_purchase_without_a_stored_cart_quotes_the_browsers_guid():
    evt = {**event("purchase", ecommerce=ecommerce(PEN, transaction_id="1003"), identity=WHO),
           "cart_guid": "0F8FAD5B-D9CB-469F-A165-70867728950E"}
    [req] = esputnik.plan(evt, CTX)
    assert req.json["PurchasedItems"] == {"GUID": "0F8FAD5B-D9CB-469F-A165-70867728950E",
                                          "OrderNumber": "1003"}


def test_backend_purchase_without_session_is_the_one_click_form():
    """ES REST "PurchasedItems (One Click)": Products of {product_id, unit_price, quantity}
    and OrderNumber, no GUID; cookies from the customer's latest session."""
    evt = event("purchase", source="backend", sc=None, user={"email": EMAIL},
                ecommerce=ecommerce(BOOK, transaction_id="1002"), identity=identity(last_sc=SC))
    [req] = esputnik.plan(evt, CTX)
    assert req.skipped is None
    assert req.json["GeneralInfo"] == {"eventName": "PurchasedItems", "siteId": "8A412DC",
                                       "datetime": T_MS, "user_email": EMAIL,
                                       "cookies": {"sc": SC}}
    assert req.json["PurchasedItems"] == {"Products": [
        {"product_id": "SKU-1999", "unit_price": "19.99", "quantity": 3}], "OrderNumber": "1002"}
    assert "GUID" not in req.json["PurchasedItems"]
    assert req.dedup_key == "PurchasedItems:1002"


def test_backend_purchase_of_a_customer_never_seen_in_a_browser_waits_for_a_session():
    """ES REST PurchasedItems and PurchasedItems (One Click): ``cookies`` is Required ("Cookie
    sc is a cookie generated by our script"); externalCustomerId, user_email and the other
    identifiers are Optional and the document names none of them as a stand-in. Without any
    session of the customer there is no sc to send yet, never a request the tracker's
    document calls invalid: the order waits (``waits``, a held row with the reason) for a
    session of the customer; one with nobody to wait for is not sent (``skipped``)."""
    evt = event("purchase", source="backend", sc=None, user={"email": EMAIL},
                ecommerce=ecommerce(BOOK, transaction_id="1002"),
                identity=identity(customer_id="1234509876"))
    [req] = esputnik.plan(evt, CTX)
    why = ("eSputnik PurchasedItems requires cookies.sc, and no browser session of this "
           "customer is known yet")
    assert req.waits == f"{why}; held until one is identified (hold_days)"
    assert req.skipped is None
    assert req.dedup_key == "PurchasedItems:1002"
    anonymous = {**evt, "user": None, "identity": None}
    assert esputnik.plan(anonymous, CTX)[0].skipped == why
    # A browser's order (a claim, order_source = "browser") has its own sc or none at all.
    page = {**evt, "source": "browser", "user": None, "identity": None}
    assert (esputnik.plan(page, CTX)[0].skipped, esputnik.plan(page, CTX)[0].waits) == (why, None)
    # The customer's latest session known: sent at once with its sc.
    known = {**evt, "identity": identity(customer_id="1234509876", last_sc=SC)}
    [sent] = esputnik.plan(known, CTX)
    assert (sent.waits, sent.skipped) == (None, None)
    assert sent.json["GeneralInfo"]["cookies"] == {"sc": SC}


def test_every_visitor_event_without_a_cookie_is_not_sent():
    """``cookies`` is Required in every event's GeneralInfo but ProductUpdate's (ES REST)."""
    for name, extra in (("view_item", {"ecommerce": ecommerce(MUG)}),
                        ("add_to_wishlist", {"ecommerce": ecommerce(MUG)}),
                        ("view_item_list", {"ecommerce": ecommerce(MUG, item_list_id="k")}),
                        ("newsletter_popup_shown", {})):
        evt = event(name, source="backend", sc=None, user={"email": EMAIL},
                    identity=identity(), **extra)
        [req] = esputnik.plan(evt, CTX)
        assert req.skipped and "requires cookies.sc" in req.skipped, name
        known = {**evt, "identity": identity(last_sc=SC)}
        [sent] = esputnik.plan(known, CTX)
        assert sent.skipped is None and sent.json["GeneralInfo"]["cookies"] == {"sc": SC}, name


def priceless(item_id: str, quantity: int = 1, **catalog) -> dict:
    """An item the page or backend gave without a price; ``catalog``: what the store found
    in its product catalog (``catalog_price_minor``, ``catalog_currency``)."""
    return item(item_id, None, quantity, item_name=item_id, **catalog)


def test_a_product_page_without_a_price_takes_the_catalogs_or_is_not_sent():
    """ES REST ProductPage / AddToWishlist: ``price`` is Required ("If the price has changed
    on the site but hasn't changed in the feed, the sent value will be the value from the
    site"): a made-up "0" would overwrite the feed's price, so an item without one takes the
    catalog's price (in the event's currency), else the request is not sent."""
    known = priceless("SKU-7", catalog_price_minor=1250, catalog_currency="USD")
    [page] = esputnik.plan(event("view_item", ecommerce=ecommerce(known)), CTX)
    assert page.skipped is None
    assert page.json["ProductPage"] == {"Product": {"productKey": "SKU-7", "price": "12.50"}}
    for unknown in (priceless("SKU-8"),
                    priceless("SKU-8", catalog_price_minor=1250, catalog_currency="EUR")):
        [req] = esputnik.plan(event("view_item", ecommerce=ecommerce(unknown)), CTX)
        assert req.skipped == ("eSputnik ProductPage requires price; item 'SKU-8' came without "
                               "one and the catalog has none in USD")
    [wished, unpriced] = esputnik.plan(event("add_to_wishlist",
                                             ecommerce=ecommerce(known, priceless("SKU-8"))), CTX)
    assert wished.json["AddToWishlist"] == {"Product": {"productKey": "SKU-7", "price": "12.50"}}
    assert unpriced.skipped and unpriced.dedup_key == f"AddToWishlist:{SC}/EVT-1:1"


def test_a_cart_line_without_a_price_takes_the_catalogs_or_is_left_out():
    """ES REST StatusCart: each product's ``price`` is Required. A line with no price of its
    own nor in the catalog is left out of the cart (an ignored row names it); the rest of
    the cart goes under its GUID."""
    known = priceless("SKU-7", 2, catalog_price_minor=1250, catalog_currency="USD")
    evt = event("add_to_cart", ecommerce=ecommerce(known),
                cart=cart(PEN, known, priceless("SKU-8")))
    [req, left_out] = esputnik.plan(evt, CTX)
    assert req.json["StatusCart"] == {"GUID": GUID, "Products": [
        {"productKey": "SKU-435", "price": "4.35", "quantity": 1, "price_currency_code": "USD"},
        {"productKey": "SKU-7", "price": "12.50", "quantity": 2, "price_currency_code": "USD"}]}
    assert req.dedup_key == f"StatusCart:{GUID}"
    assert left_out.dedup_key == f"StatusCart:{GUID}:2"  # the line's index
    assert left_out.json == {"productKey": "SKU-8", "quantity": 1}  # as StatusCart names it
    assert left_out.skipped == ("eSputnik StatusCart requires price; item 'SKU-8' came "
                                "without one and the catalog has none in USD: left out of "
                                "the cart")
    only_unpriced = event("add_to_cart", ecommerce=ecommerce(PEN), cart=cart(priceless("SKU-8")))
    # Not an empty Products: that would say the cart was emptied.
    assert [r.skipped is not None for r in esputnik.plan(only_unpriced, CTX)] == [True, True]


def test_a_one_click_line_without_a_price_takes_the_catalogs_or_is_left_out():
    """ES REST PurchasedItems (One Click): ``unit_price`` is Required per product."""
    known = priceless("SKU-7", 2, catalog_price_minor=1250, catalog_currency="USD")
    evt = event("purchase", source="backend", sc=None, user={"email": EMAIL},
                ecommerce=ecommerce(known, priceless("SKU-8"), transaction_id="1004"),
                identity=identity(last_sc=SC))
    [req, left_out] = esputnik.plan(evt, CTX)
    assert req.json["PurchasedItems"] == {"Products": [
        {"product_id": "SKU-7", "unit_price": "12.50", "quantity": 2}], "OrderNumber": "1004"}
    assert (left_out.dedup_key, left_out.skipped) == (
        "PurchasedItems:1004:1", "eSputnik PurchasedItems requires unit_price; item "
        "'SKU-8' came without one and the catalog has none in USD: left out of the order")
    # The line as One Click names its fields (ES REST PurchasedItems (One Click): product_id).
    assert left_out.json == {"product_id": "SKU-8", "quantity": 1}
    nothing_priced = {**evt, "ecommerce": ecommerce(priceless("SKU-8"), transaction_id="1005")}
    [order, line] = esputnik.plan(nothing_priced, CTX)
    assert order.skipped == ("eSputnik PurchasedItems (One Click) requires its products' "
                             "unit_price; no line of order '1005' has one")
    assert line.skipped is not None
    # The GUID form names no lines, so needs no prices.
    with_guid = {**evt, "cart": cart(priceless("SKU-8"))}
    [guid_form] = esputnik.plan(with_guid, CTX)
    assert guid_form.json["PurchasedItems"] == {"GUID": GUID, "OrderNumber": "1004"}


def test_backend_customer_data_takes_the_latest_sessions_cookie_or_is_not_sent():
    """ES REST CustomerData: cookies is Required."""
    evt = event("identify", source="backend", sc=None, user={"email": EMAIL},
                identity=identity(last_sc=SC))
    [req] = esputnik.plan(evt, CTX)
    assert req.json == {"GeneralInfo": {"eventName": "CustomerData", "siteId": "8A412DC",
                                        "datetime": T_MS, "user_email": EMAIL,
                                        "cookies": {"sc": SC}}}
    assert req.skipped is None
    [never_seen] = esputnik.plan({**evt, "identity": identity()}, CTX)
    assert never_seen.skipped == ("eSputnik CustomerData requires cookies.sc, and no browser "
                                  "session of this customer is known yet")


def test_product_updated():
    cup = item("SKU-2", 27000, 1, item_name="Cup", in_stock=False)
    unknown = item("SKU-3", 100, 1, item_name="Saucer")  # in_stock not given
    evt = event("product_updated", event_id="P1", source="backend", sc=None,
                ecommerce=ecommerce(MUG, cup, unknown, currency="UAH"))
    [req, skipped] = esputnik.plan(evt, CTX)
    # ES REST ProductUpdate: isInStock "required, could be 0 or 1": never guessed.
    assert (skipped.dedup_key, skipped.skipped) == (
        "ProductUpdate:P1:2", "eSputnik ProductUpdate requires isInStock; product 'SKU-3' came "
                              "without in_stock")
    assert req.skipped is None
    assert req.json == {
        "GeneralInfo": {"eventName": "ProductUpdate", "siteId": "8A412DC"},
        "ProductUpdate": [
            {"product_id": "SKU-1000", "name": "Mug", "description": "A mug", "brand": "Acme",
             "imgurl": "https://shop.example/i/mug.jpg", "unit_price": "29.99",
             "price_currency_code": "UAH", "isInStock": "1", "category": "Kitchen > Mugs"},
            {"product_id": "SKU-2", "name": "Cup", "unit_price": "270.00",
             "price_currency_code": "UAH", "isInStock": "0"},
        ],
    }
    assert req.dedup_key == "ProductUpdate:P1"
    only_unknown = {**evt, "ecommerce": ecommerce(unknown)}
    assert [r.skipped is not None for r in esputnik.plan(only_unknown, CTX)] == [True]


def test_the_documents_product_update_example():
    """The ES REST ProductUpdate example's first product, from a backend product_updated."""
    phone = item("430738", 20195, 1, item_name="iPhone 7", description="Some description",
                 item_brand="Apple", image_url="https://domain.com/apple/product_large.png",
                 categories=["level1", "level2", "level3"], in_stock=True)
    evt = event("product_updated", source="backend", sc=None,
                ecommerce=ecommerce(phone, currency="UAH"))
    [req] = esputnik.plan(evt, CTX)
    assert req.json["ProductUpdate"] == [{
        "product_id": "430738", "name": "iPhone 7", "description": "Some description",
        "brand": "Apple", "imgurl": "https://domain.com/apple/product_large.png",
        "unit_price": "201.95", "price_currency_code": "UAH", "isInStock": "1",
        "category": "level1 > level2 > level3"}]


def test_custom_event():
    evt = event("newsletter_popup_shown", event_id="C1", identity=WHO,
                properties={"popup": "spring", "variant": 2, "tags": ["a", "b"]})
    [req] = esputnik.plan(evt, CTX)
    assert req.json == {"GeneralInfo": general("CustomEvent"),
                        "CustomEvent": {"EventName": "newsletter_popup_shown",
                                        "Tags": {"popup": ["spring"], "variant": ["2"],
                                                 "tags": ["a", "b"]}}}
    assert req.dedup_key == f"CustomEvent:{SC}/C1"
    bare = esputnik.plan(event("ping", event_id="C2"), CTX)[0]
    assert bare.json["CustomEvent"] == {"EventName": "ping"}


def test_events_without_a_tracker_event_plan_nothing():
    for name in ("page_view", "search", "refund", "order_status", "unsubscribe", "opt_in"):
        assert esputnik.plan(samples()[name], CTX) == [], name


def test_settings_defaults_and_auth():
    assert CTX.vendor["script_id"] == "8A412DC"
    assert CTX.vendor["script_url"] == "https://cdn.esputnik.com/scripts/8A412DC.js"
    ctx = context(esputnik, script_id="000000000000000000")
    assert ctx.vendor["script_url"] == "https://cdn.esputnik.com/scripts/000000000000000000.js"
    [auth] = esputnik.auth_headers(CTX.vendor).items()
    assert auth[0] == "Authorization" and auth[1].startswith("Basic ")
    assert base64.b64decode(auth[1][6:]).decode() == "user:ES-SECRET-KEY"
    assert esputnik.auth_headers(context(esputnik, api_key="").vendor) == {}
