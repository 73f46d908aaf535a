"""The four adapters together: blocked libraries, throwing vendors, routing, replayed pushes,
and no secret in the generated script (CONTRACT.md sections 3 and 6)."""

from __future__ import annotations

import uuid

from vendor_stub_server import (SITES, VENDORS, all_secrets, open_page, page_html, push,  # noqa: F401
                                queues, vendors)

MUG = {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1, "in_stock": True}
TEA = {"item_id": "SKU-4000", "item_name": "Tea", "price": 4.35, "quantity": 1}


def ecom(*items, **extra):
    return {"currency": "USD", "items": [dict(i) for i in items], **extra}


def stored(vendors, site, event_id):
    """The event as onetag stored it (waits, on the condition, for it to arrive)."""
    rows = vendors.onetag.wait_events(
        lambda rows: any(r["data"]["event_id"] == event_id for r in rows),
        f"event {event_id} stored", site_id=site)
    return next(r["data"] for r in rows if r["data"]["event_id"] == event_id)


def test_no_secret_in_any_script(vendors):
    secrets = all_secrets()
    assert len(secrets) == 1 + 5 * len(SITES)
    for site in SITES:
        js = vendors.script(site)
        # eSputnik's site_id is the server's (its adapter reads script_url only): its loader URL.
        for value in ("RJ2SITE", "rm-store-1", "/esputnik.js", "SL-INTEGRATION-TOKEN",
                      "_rejoiner", "_rmData", ".q=[]", "_Sendlane"):
            assert value in js, (site, value)  # the real script, every adapter included
        leaked = [s for s in secrets if s in js]
        assert leaked == [], (site, leaked)
        assert "SECRET" not in js, site


def test_blocked_libraries_keep_the_calls_and_the_event_reaches_onetag(vendors, context):
    page = open_page(context, vendors.page("blocked"))
    # Every library 404s (as an ad blocker answers); each was asked for.
    for vendor in VENDORS:
        assert vendors.static.hits(f"/vendors/blocked/{vendor}.js") >= 1
    page.wait_for_function("() => document.querySelectorAll('script[src*=\"/vendors/blocked/\"]').length === 4")
    assert page.evaluate("() => [window.__stub_rejoiner, window.__stub_remarkety, window.__stub_esputnik,"
                         " window.__stub_sendlane].every(function (x) { return x === undefined })")
    # Queue first: the calls are still made and kept for a library that never came.
    assert queues(page) == {"rejoiner": [["setAccount", "RJ2SITE"], ["setDomain", "127.0.0.1"]],
                            "remarkety": [["setStoreKey", "rm-store-1"]],
                            "esputnik": [["init", {"TRACKING": False, "RECOMS": True}]],
                            "sendlane": []}
    push(page, {"event": "identify", "user": {"email": "ann@example.com"}})
    eid = str(uuid.uuid4())
    calls = push(page, {"event": "view_item", "event_id": eid, "ecommerce": ecom(MUG)})
    assert [c[0] for c in calls["rejoiner"]] == ["trackProductView"]
    assert [c[0] for c in calls["remarkety"]] == ["productView"]
    assert [c[1] for c in calls["esputnik"]] == ["ProductPage"]
    assert [c["event"] for c in calls["sendlane"]] == ["product_viewed"]
    # The event reaches onetag, telling it no vendor library loaded (the server falls back).
    event = stored(vendors, "blocked", eid)
    assert event["name"] == "view_item" and event["loaded"] == []


def test_a_throwing_vendor_breaks_nothing_else(vendors, context):
    errors = []
    page = open_page(context, vendors.page("throwing"))
    page.on("pageerror", lambda exc: errors.append(exc))
    page.wait_for_function("() => window.__stub_rejoiner && window.__stub_esputnik"
                           " && window.__stub_remarkety && window.__stub_sendlane")
    assert page.evaluate("() => { try { _rejoiner.push(['x']); return false } catch (e) { return true } }")
    assert page.evaluate("() => { try { eS('x'); return false } catch (e) { return true } }")
    calls = push(page, {"event": "identify", "user": {"email": "ann@example.com"}})
    assert calls["remarkety"] == [["setCustomer", "ann@example.com"]]
    assert calls["sendlane"] == [{"event": "identify", "email": "ann@example.com"}]
    eid = str(uuid.uuid4())
    calls = push(page, {"event": "add_to_cart", "event_id": eid, "ecommerce": ecom(TEA)})
    assert calls["rejoiner"] == [] and calls["esputnik"] == []  # their calls threw
    assert [c[:2] for c in calls["remarkety"]] == [["track", "carts/update"]]
    assert [c["event"] for c in calls["sendlane"]] == ["added_to_cart"]
    # The page goes on, and the event reaches onetag, naming only the vendors that took it.
    assert page.evaluate("() => { window.dataLayer.push({event: 'quiz_done'}); return 1 }") == 1
    event = stored(vendors, "throwing", eid)
    assert sorted(event["loaded"]) == ["remarkety", "sendlane"]
    assert errors == []


def test_routes_decide_what_the_browser_sends(vendors, context):
    page = open_page(context, vendors.page("routed"))
    calls = push(page, {"event": "identify", "user": {"email": "ann@example.com"}})
    assert calls["rejoiner"] == []  # identify = server for Rejoiner here
    assert calls["sendlane"] == [{"event": "identify", "email": "ann@example.com"}]
    calls = push(page, {"event": "view_item", "ecommerce": ecom(MUG)})
    assert [c[0] for c in calls["rejoiner"]] == ["trackProductView"]  # still browser
    assert calls["remarkety"] == [] and calls["sendlane"] == []  # server / off here
    assert [c[1] for c in calls["esputnik"]] == ["ProductPage"]
    calls = push(page, {"event": "purchase", "ecommerce": ecom(MUG, transaction_id="7")})
    assert calls["rejoiner"] == []  # purchase = server: no sendConversion
    assert [c[1] for c in calls["esputnik"]] == ["PurchasedItems"]
    assert push(page, {"event": "quiz_done"})["remarkety"] == []  # "*" = off
    assert push(page, {"event": "quiz_special", "n": 1})["remarkety"] == \
        [["track", "quiz_special", {"n": 1}]]  # a custom event routed by name
    assert push(page, {"event": "search", "search_term": "zz", "ecommerce": ecom()})["esputnik"] == []
    calls = push(page, {"event": "add_to_cart", "ecommerce": ecom(TEA)})
    assert [c[:2] for c in calls["remarkety"]] == [["track", "carts/update"]]


def test_pushes_made_before_the_script_are_replayed_in_order(vendors, context):
    pre = [{"event": "identify", "user": {"email": "early@example.com"}},
           {"event": "view_item", "ecommerce": ecom(MUG)},
           {"event": "add_to_cart", "ecommerce": ecom(TEA)}]
    page = open_page(context, vendors.page("all", pre))
    q = queues(page)
    assert [c[0] for c in q["rejoiner"]] == ["setAccount", "setDomain", "setCustomerEmail",
                                             "trackProductView", "setCartItem", "setCartData"]
    assert [c[0] if c[0] != "track" else c[1] for c in q["remarkety"]] == \
        ["setStoreKey", "setCustomer", "productView", "carts/update"]
    assert [c[1] if c[0] == "sendEvent" else c[0] for c in q["esputnik"]] == ["init", "ProductPage", "StatusCart"]
    assert [c["event"] for c in q["sendlane"]] == ["identify", "product_viewed", "added_to_cart"]
    assert q["rejoiner"][5][1] == {"cart_value": 435, "cart_item_count": 1}


def test_money_helper_is_exact(vendors, context):
    """onetag.money (templates/vendors/_money.js.j2), in the browser: cents from the decimal text.
    The debug build exposes it (the wire form's money is checked through the vendor payloads)."""
    script = f"{vendors.onetag.url}/s/all.js"
    page = open_page(context, vendors.static.add(page_html(vendors.onetag.url, "all").replace(
        script, script + "?onetag_debug=1")))
    assert "onetag.money = " in vendors.script("all", debug=True)
    bad = page.evaluate("""() => {
        var m = window.onetag.money, bad = [], i, s, want;
        for (i = 0; i <= 1000000; i++) {            // every 2-decimal price up to 10,000.00
            s = (i / 100).toFixed(2);
            if (m.cents(+s) !== i || m.cents(s) !== i || m.priceString(+s) !== s || m.decimal(+s) !== +s) bad.push(s);
        }
        for (i = 0; i <= 1000000; i++) {            // every 3-decimal value up to 1,000.000: half up
            s = (i / 1000).toFixed(3); want = Math.floor(i / 10) + (i % 10 >= 5 ? 1 : 0);
            if (m.cents(+s) !== want) bad.push(s);
        }
        return bad.slice(0, 20);
    }""")
    assert bad == []
    got = page.evaluate("""() => { var m = window.onetag.money; return JSON.stringify([
        m.cents(4.35), m.cents(0.57), m.cents(19.99) * 3, m.cents("29.99"), m.cents(" 4.35 "), m.cents(0.1 + 0.2),
        m.cents(1e-7), m.cents(1e21), m.cents(1.005), m.decimal(19.99) * 1, m.cents(19.99) * 3 / 100, m.priceString(30), m.priceString(0.5),
        m.cents(null), m.cents(undefined), m.cents(""), m.cents("abc"), m.priceString("x"), 435 / 100, 5997 / 100,
        m.totals([{price: 19.99, quantity: 3}, {price: 4.35}, {price: 0.57, quantity: "2"}])]) }""")
    assert got == ('[435,57,5997,2999,435,30,0,1e+23,101,19.99,59.97,"30.00","0.50",'
                   'null,null,null,null,null,4.35,59.97,[6546,6]]')
