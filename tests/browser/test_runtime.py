"""The generated script's runtime (templates/onetag.js.j2) in real Chromium.

Pages live on a static origin; onetag runs as a real server subprocess on another port.
Every assertion reads what landed in the server's SQLite store (read-only), after waiting
on a condition: a named event arriving, or the page's stored queue draining.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest


UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SC_RE = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}$")
SITES = """
[[sites]]
id = "shop"
origins = ["{origin}"]
currency = "USD"

[[sites]]
id = "manual"
origins = ["{origin}"]
spa_page_views = "manual"

[[sites]]
id = "vend"
origins = ["{origin}"]

[sites.rejoiner]
site_id = "RJ00001"
api_key = "rj-key"
script_url = "{origin}/missing/rj2.lib.js"
api_base = "http://127.0.0.1:9/api/v1"

[sites.sendlane]
integration_token = "sl-token"
api_token = "sl-key"
script_url = "{origin}/lib/pusher.js"
api_base = "http://127.0.0.1:9/v2"
"""


@pytest.fixture(scope="module")
def server(onetag_server: Any) -> Any:
    """One server for the module; tests keep apart by their own fresh context (own sc)."""
    return onetag_server(SITES)


def shop_page(server: Any, site: str = "shop", before: str = "", body: str = "") -> str:
    """A storefront page: optional inline script run BEFORE the async onetag tag, then it."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Shop page</title>"
            f"<script>window.dataLayer = window.dataLayer || [];{before}</script>"
            f"<script async src='{server.script_url(site)}'></script></head>"
            f"<body>{body}</body></html>")


def open_shop(page: Any, static: Any, server: Any, site: str = "shop",
              **kw: str) -> str:
    url = static.add(shop_page(server, site, **kw))
    page.goto(url)
    page.wait_for_function("window.onetag && window.onetag.v")
    return url


def sc_of(page: Any) -> str:
    return page.evaluate("(document.cookie.match(/(?:^|; )sc=([^;]+)/) || [])[1] || null")


def names(rows: list[dict[str, Any]]) -> list[str]:
    return [r["name"] for r in rows]


def has(*wanted: str):
    return lambda rows: all(w in names(rows) for w in wanted)


def queue_drained(page: Any, site: str = "shop") -> None:
    page.wait_for_function(f"JSON.parse(localStorage.getItem('onetag_{site}_q') || '[]').length === 0")


def stored_queue(page: Any, site: str = "shop") -> list[dict[str, Any]]:
    return page.evaluate(f"JSON.parse(localStorage.getItem('onetag_{site}_q') || '[]')")


# dataLayer ------------------------------------------------------------------------------------


def test_pushes_before_load_are_replayed_in_order_and_non_events_ignored(page, static_server, server):
    before = """
      dataLayer.push({event: "gtm.js", "gtm.start": 1});
      dataLayer.push({ecommerce: null});
      dataLayer.push(["set", "x"]);
      (function () { dataLayer.push(arguments) })("event", "gtag_style", {});
      var c = {event: "circular"}; c.self = c; dataLayer.push(c);
      dataLayer.push(null); dataLayer.push("just a string");
      dataLayer.push({event: "first", n: 1});
      dataLayer.push({event: "view_item", ecommerce: {currency: "USD", value: 4.35,
        items: [{item_id: "SKU-1", item_name: "Mug", price: 4.35, quantity: 1}]}});
      dataLayer.push({event: "third", n: 3});
    """
    url = open_shop(page, static_server, server, before=before)
    sc = sc_of(page)
    rows = server.wait_events(has("third"), "the replayed pushes", sc=sc)
    queue_drained(page)
    rows = server.events(sc=sc)
    # A gtag('event', ...) push is an event (test_gtag_pushes_are_read_as_data_layer_events).
    assert names(rows) == ["page_view", "gtag_style", "first", "view_item", "third"]
    view_item, third = rows[3]["data"], rows[4]["data"]
    assert view_item["ecommerce"]["value_minor"] == 435
    assert view_item["ecommerce"]["items"][0]["price_minor"] == 435
    assert third["ecommerce"] is None, "each push is read on its own: no ecommerce carried over"
    assert third["properties"] == {"n": 3}
    assert all(r["data"]["page"]["location"] == url for r in rows)
    assert all(r["source"] == "browser" and r["site_id"] == "shop" for r in rows)
    assert all(UUID7_RE.match(r["event_id"]) for r in rows), "event ids are UUIDv7"
    assert len({r["event_id"] for r in rows}) == 5
    for r in rows:  # a v7 id starts with its Unix milliseconds: the push's own time
        assert abs(int(r["event_id"].replace("-", "")[:12], 16) - r["data"]["time_ms"]) < 5000
    assert [r["data"]["time_ms"] for r in rows] == sorted(r["data"]["time_ms"] for r in rows)


def test_pushes_after_load_are_hooked_and_push_keeps_its_meaning(page, static_server, server):
    open_shop(page, static_server, server)
    before, returned, after = page.evaluate("""() => {
        const n = dataLayer.length;
        const r = dataLayer.push({event: "hooked", colour: "red"}, {event: "hooked_too"});
        return [n, r, dataLayer.length];
    }""")
    assert returned == before + 2 == after, "the original push ran and its value came back"
    sc = sc_of(page)
    rows = server.wait_events(has("hooked", "hooked_too"), "hooked pushes", sc=sc)
    assert names(rows)[-2:] == ["hooked", "hooked_too"]
    assert rows[-2]["data"]["properties"] == {"colour": "red"}
    assert rows[-2]["raw"]["loaded"] == []


# Page views -------------------------------------------------------------------------------------


def test_spa_page_views_once_per_url(page, static_server, server):
    url = open_shop(page, static_server, server)
    base = url.rsplit("/", 1)[0]
    page.evaluate("""() => {
        history.pushState({}, "", "a");          // new URL: a page view
        history.replaceState({x: 1}, "", "a");   // same URL: none
        history.pushState({}, "", "a#details");  // hash only: none
        history.pushState({}, "", "b?q=1");      // new URL: a page view
    }""")
    # Back to a#details: a popstate to another path+search, so a page view.
    back_to = page.evaluate("""() => new Promise(done => {
        addEventListener("popstate", () => done(location.href), {once: true});
        history.back();
    })""")
    assert back_to == base + "/a#details"
    page.evaluate("dataLayer.push({event: 'marker'})")
    sc = sc_of(page)
    rows = server.wait_events(has("marker"), "the marker after the route changes", sc=sc)
    views = [r["data"]["page"] for r in rows if r["name"] == "page_view"]
    assert [v["location"] for v in views] == [url, base + "/a", base + "/b?q=1", base + "/a#details"]
    assert views[2]["referrer"] == base + "/a", "after an SPA change the referrer is the last page"


def test_manual_mode_counts_only_pushed_page_views_once_per_url(page, static_server, server):
    url = open_shop(page, static_server, server, site="manual")
    base = url.rsplit("/", 1)[0]
    page.evaluate("""() => {
        history.pushState({}, "", "x");                          // manual: nothing automatic
        dataLayer.push({event: "page_view"});                    // counts: /x
        dataLayer.push({event: "page_view"});                    // same URL: dropped
        history.pushState({}, "", "y");
        dataLayer.push({event: "page_view", page_location: location.origin + "/virtual/1"});
        dataLayer.push({event: "page_view", page_location: location.origin + "/virtual/1#top"});
        dataLayer.push({event: "marker"});
    }""")
    sc = sc_of(page)
    rows = server.wait_events(has("marker"), "the marker", site_id="manual", sc=sc)
    views = [r["data"]["page"]["location"] for r in rows if r["name"] == "page_view"]
    assert views == [base + "/x", static_server.origin + "/virtual/1"]
    assert names(rows) == ["page_view", "page_view", "marker"]


# sc cookie ---------------------------------------------------------------------------------------


def test_sc_cookie_is_made_once_reused_across_reloads_and_sent(page, context, static_server, server):
    open_shop(page, static_server, server)
    sc = sc_of(page)
    assert sc and SC_RE.match(sc), sc
    server.wait_events(has("page_view"), "the first page view", sc=sc)
    cookie = next(c for c in context.cookies() if c["name"] == "sc")
    assert cookie["value"] == sc and cookie["path"] == "/" and cookie["sameSite"] == "Lax"
    assert cookie["expires"] > time.time() + 360 * 86400
    page.reload()
    page.wait_for_function("window.onetag && window.onetag.v")
    page.evaluate("dataLayer.push({event: 'after_reload'})")
    assert sc_of(page) == sc
    rows = server.wait_events(has("after_reload"), "the event after the reload", sc=sc)
    assert names(rows) == ["page_view", "page_view", "after_reload"]
    assert server.query("SELECT count(*) FROM sessions WHERE site_id = 'shop' AND sc = ?",
                        (sc,))[0][0] == 1


def test_existing_sc_cookie_is_reused(page, context, static_server, server):
    preset = str(uuid.uuid4()).upper()
    context.add_cookies([{"name": "sc", "value": preset, "url": static_server.origin + "/"}])
    open_shop(page, static_server, server)
    page.evaluate("dataLayer.push({event: 'with_preset_sc'})")
    rows = server.wait_events(has("with_preset_sc"), "events under the preset sc", sc=preset)
    assert names(rows) == ["page_view", "with_preset_sc"]
    assert sc_of(page) == preset


# Transport ----------------------------------------------------------------------------------------


def test_push_right_before_leaving_lands_by_beacon(page, static_server, server):
    open_shop(page, static_server, server)
    sc = sc_of(page)
    server.wait_events(has("page_view"), "the page view", sc=sc)
    queue_drained(page)
    away = static_server.add("<!doctype html><title>elsewhere</title><p>no onetag here")
    # Push and leave in one task: the page hides before the 300 ms flush timer runs. The
    # timer is held off, so that a next page slower than that to come (a loaded machine)
    # can't let the flush send it first: what is tested is the pagehide beacon.
    page.evaluate("window.setTimeout = () => 0")
    page.evaluate(f"dataLayer.push({{event: 'leaving'}}); location.href = {json.dumps(away)}")
    page.wait_for_url(away)
    rows = server.wait_events(has("leaving"), "the event pushed right before leaving", sc=sc)
    assert names(rows).count("leaving") == 1
    # The away page shares the origin: the event is still stored, marked as sent by beacon
    # (its answer is unseen; the next page with onetag re-sends it and the server dedups).
    [kept] = [x for x in stored_queue(page) if x["e"]["event"] == "leaving"]
    assert kept["b"] == 1 and kept["e"]["event_id"] == rows[-1]["event_id"]


def test_push_right_before_closing_lands(context, static_server, server):
    page = context.new_page()
    open_shop(page, static_server, server)
    sc = sc_of(page)
    server.wait_events(has("page_view"), "the page view", sc=sc)
    page.evaluate("dataLayer.push({event: 'closing'})")
    page.close(run_before_unload=True)
    server.wait_events(has("closing"), "the event pushed right before closing", sc=sc)


def test_same_event_id_is_stored_once_though_sent_again(page, static_server, server, wait_until):
    open_shop(page, static_server, server)
    sc = sc_of(page)
    server.wait_events(has("page_view"), "the page view", sc=sc)
    queue_drained(page)
    event_id = f"fixed-{uuid.uuid4()}"
    bodies: list[str] = []
    page.on("request", lambda r: bodies.append(r.post_data or "") if r.url.endswith("/e") else None)
    # The same id pushed twice; then a pagehide beacon AND a fetch of the same stored events.
    page.evaluate(f"""() => {{
        dataLayer.push({{event: "twice", event_id: "{event_id}"}});
        dataLayer.push({{event: "twice", event_id: "{event_id}"}});
        dispatchEvent(new Event("pagehide"));
        onetag.flush();
    }}""")
    queue_drained(page)
    wait_until(lambda: len([b for b in bodies if event_id in b]) >= 2, "the beacon and the fetch")
    assert sum(b.count(event_id) for b in bodies) >= 4, "sent four times over two requests"
    rows = server.wait_events(has("twice"), "the duplicated event", sc=sc)
    assert [r["event_id"] for r in rows if r["name"] == "twice"] == [event_id]


def test_events_pushed_while_server_is_down_land_once_after_restart(context, static_server, onetag_server):
    srv = onetag_server(SITES)
    page = context.new_page()
    open_shop(page, static_server, srv)
    sc = sc_of(page)
    srv.wait_events(has("page_view"), "the page view", sc=sc)
    queue_drained(page)
    srv.kill()
    with page.expect_event("requestfailed", lambda r: r.url == srv.url + "/e"):
        page.evaluate("dataLayer.push({event: 'while_down'})")
    [stored] = [x for x in stored_queue(page) if x["e"]["event"] == "while_down"]
    srv.start()
    rows = srv.wait_events(has("while_down"), "the retried event", timeout=90, sc=sc)
    queue_drained(page)
    rows = srv.events(sc=sc)
    assert names(rows) == ["page_view", "while_down"]
    assert rows[1]["event_id"] == stored["e"]["event_id"]


def test_unsent_events_are_sent_on_the_next_page_load(context, static_server, onetag_server):
    srv = onetag_server(SITES)
    page = context.new_page()
    url = open_shop(page, static_server, srv)
    sc = sc_of(page)
    srv.wait_events(has("page_view"), "the page view", sc=sc)
    queue_drained(page)
    srv.kill()
    with page.expect_event("requestfailed", lambda r: r.url == srv.url + "/e"):
        page.evaluate("dataLayer.push({event: 'before_leaving'})")
    page.goto(static_server.add("<!doctype html><title>away</title>"))  # pagehide: a lost beacon
    # Same origin, so the away page sees the stored queue: the event is kept, marked beaconed.
    [stored] = [x for x in stored_queue(page) if x["e"]["event"] == "before_leaving"]
    assert stored.get("b") == 1
    srv.start()
    page.goto(url)
    rows = srv.wait_events(has("before_leaving", "page_view"), "the stored event", sc=sc)
    queue_drained(page)
    rows = srv.events(sc=sc)
    assert names(rows).count("before_leaving") == 1
    assert names(rows).count("page_view") == 2
    assert [r["event_id"] for r in rows if r["name"] == "before_leaving"] == [stored["e"]["event_id"]]


# Identity and cart --------------------------------------------------------------------------------


def test_form_email_identifies_the_session(page, static_server, server, wait_until):
    body = ("<input type='email' id='email'> <input name='newsletter_email' id='nl'>"
            "<input name='q' id='search'> <button id='go'>go</button>")
    open_shop(page, static_server, server, body=body)
    sc = sc_of(page)
    page.fill("#email", "  Ann@Example.COM ")
    page.press("#email", "Tab")
    rows = server.wait_events(has("identify"), "the identify from the form", sc=sc)
    [identify] = [r for r in rows if r["name"] == "identify"]
    assert identify["data"]["user"] == {"email": "ann@example.com"}
    assert identify["raw"]["source"] == "form"

    def bound() -> Any:
        found = server.query("SELECT i.email FROM sessions s JOIN identities i ON i.id = s.identity_id"
                             " WHERE s.site_id = 'shop' AND s.sc = ?", (sc,))
        return found and found[0]["email"]

    assert wait_until(bound, "the session bound to the identity") == "ann@example.com"
    page.fill("#email", "ann@example.com")           # the same email again: nothing new
    page.press("#email", "Tab")
    page.fill("#search", "carl@example.com")         # not an email field: ignored
    page.press("#search", "Tab")
    page.fill("#nl", "Bob@example.com")              # name contains "email": picked up
    page.click("#go")                                # blur by clicking elsewhere
    page.evaluate("dataLayer.push({event: 'marker'})")
    rows = server.wait_events(has("marker"), "the marker", sc=sc)
    emails = [r["data"]["user"]["email"] for r in rows if r["name"] == "identify"]
    assert emails == ["ann@example.com", "bob@example.com"]
    assert page.evaluate("JSON.parse(localStorage.getItem('onetag_shop_i')).email") == "bob@example.com"
    assert "@example.com" not in page.evaluate("JSON.stringify(dataLayer)"), "no email for GTM"


def test_cart_mirror_follows_deltas_replacements_and_purchase(page, static_server, server):
    open_shop(page, static_server, server)
    cart = lambda: page.evaluate("JSON.parse(localStorage.getItem('onetag_shop_c'))")  # noqa: E731
    page.evaluate("""() => {
        const item = (id, q, price) => ({item_id: id, item_name: id, price: price, quantity: q});
        dataLayer.push({event: "add_to_cart", ecommerce: {currency: "EUR", items: [item("A", 2, 1.5)]}});
        dataLayer.push({event: "add_to_cart", ecommerce: {items: [item("A", 1, 1.75), item("B", 1, 3)]}});
        dataLayer.push({event: "remove_from_cart", ecommerce: {items: [item("B", 1, 3)]}});
    }""")
    after_remove = cart()
    guid = after_remove.pop("guid")
    cart_id = after_remove.pop("id")  # the cart's own id: the GUID of its first state
    # The cart's currency is its last event's, else the site's (USD): the server's rule (it
    # reads an event without a currency as in the site's), checked against its cart below.
    assert after_remove == {"currency": "USD", "items": [
        {"item_id": "A", "item_name": "A", "price": 1.75, "quantity": 3}]}
    page.evaluate("""dataLayer.push({event: "view_cart", ecommerce: {currency: "EUR",
        items: [{item_id: "C", price: 2}, {item_id: "D", price: 1, quantity: 0}]}})""")
    assert cart()["items"] == [{"item_id": "C", "price": 2, "quantity": 1}]
    bought_guid = cart()["guid"]
    page.evaluate("""dataLayer.push({event: "purchase", ecommerce: {transaction_id: "T-1",
        currency: "EUR", value: 2, items: [{item_id: "C", price: 2, quantity: 1}]}})""")
    assert cart() == {"currency": "EUR", "items": []}  # no GUID: the next cart is a new state
    sc = sc_of(page)
    rows = server.wait_events(has("purchase"), "the purchase", sc=sc)
    assert names(rows) == ["page_view", "add_to_cart", "add_to_cart", "remove_from_cart",
                           "view_cart", "purchase"]
    # Every cart event carries its cart state's GUID (an uppercase UUID v4, new per content
    # change); the purchase carries the GUID of the cart as bought.
    guids = [r["raw"].get("cart_guid") for r in rows]
    assert guids[0] is None and len(set(guids[1:5])) == 4 and guids[3] == guid
    assert guids[4] == guids[5] == bought_guid
    # The cart's id is its first state's GUID, on the page and in the store alike.
    assert cart_id == guids[1] != sc
    assert {r["data"]["cart"]["id"] for r in rows[1:]} == {cart_id}
    assert re.match(r"^[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}$", guid)
    # The server keeps the same cart: as bought on the purchase, then none for the session.
    assert [(i["item_id"], i["quantity"]) for i in rows[3]["data"]["cart"]["items"]] == [("A", 3)]
    assert [r["data"]["cart"]["currency"] for r in rows[1:5]] == ["EUR", "USD", "USD", "EUR"]
    assert [(i["item_id"], i["quantity"]) for i in rows[-1]["data"]["cart"]["items"]] == [("C", 1)]
    assert server.query("SELECT cart_items FROM sessions WHERE site_id = 'shop' AND sc = ?",
                        (sc,))[0][0] is None


def cart_items_both_sides(page: Any, server: Any, adds: int) -> tuple[list, list]:
    """The page's cart mirror, and the server's cart after the page's `adds`-th add_to_cart."""
    browser = page.evaluate("JSON.parse(localStorage.getItem('onetag_shop_c')).items")
    rows = server.wait_events(lambda rows: names(rows).count("add_to_cart") == adds,
                              f"{adds} add_to_cart", sc=sc_of(page))
    return browser, rows[-1]["data"]["cart"]["items"]


def test_cart_mirror_keeps_a_lines_known_fields_as_the_server_does(page, static_server, server):
    """An add_to_cart for a line the cart has keeps what the item leaves out, null or blank:
    the server's rule (server/sessions.py apply_cart: a fresher value wins, an empty one
    never), so the vendors' cart calls keep the line's name and image."""
    open_shop(page, static_server, server)
    page.evaluate("""() => {
        dataLayer.push({event: "add_to_cart", ecommerce: {items: [{item_id: "SKU1", price: 5,
            item_name: "Mug", item_brand: "Acme", image_url: "https://shop.example/i/mug.jpg"}]}});
        dataLayer.push({event: "add_to_cart", ecommerce: {items: [{item_id: "SKU1", price: 6,
            quantity: 2, item_name: "", item_brand: null, image_url: "  "}]}});
    }""")
    line = {"item_id": "SKU1", "item_name": "Mug", "item_brand": "Acme",
            "image_url": "https://shop.example/i/mug.jpg", "quantity": 3}
    browser, stored = cart_items_both_sides(page, server, 2)
    assert browser == [{**line, "price": 6}]
    assert [{key: item[key] for key in line} for item in stored] == [line]
    assert stored[0]["price_minor"] == 600


def test_cart_mirror_trims_item_ids_as_the_server_does(page, static_server, server):
    """The server reads an item_id trimmed (server/events.py), so "SKU1 " and "SKU1" are one
    line there: one in the page's cart too, under the id the server keeps."""
    open_shop(page, static_server, server)
    page.evaluate("""() => {
        const item = (id) => ({item_id: id, item_name: "Mug", price: 5, quantity: 1});
        dataLayer.push({event: "add_to_cart", ecommerce: {items: [item("SKU1 ")]}});
        dataLayer.push({event: "add_to_cart", ecommerce: {items: [item("SKU1")]}});
    }""")
    browser, stored = cart_items_both_sides(page, server, 2)
    assert [(item["item_id"], item["quantity"]) for item in stored] == [("SKU1", 2)]
    assert [(item["item_id"], item["quantity"]) for item in browser] == [("SKU1", 2)]


def test_links_relative_to_the_page_are_sent_absolute(page, static_server, server):
    """The server takes only absolute http(s) item, image and cart URLs (a relative one is a
    422 for the whole batch); a page's data layer may well say "/p/mug". The runtime makes
    them absolute against the page, as the browser itself would follow them; a javascript:
    link stays what it is, and the server refuses it."""
    url = open_shop(page, static_server, server)
    page.evaluate("""dataLayer.push({event: "add_to_cart", ecommerce: {currency: "USD",
        cart_url: "/cart?restore=1", items: [{item_id: "MUG", price: 5, quantity: 1,
        item_url: "/p/mug", image_url: "img/mug.png"}]}})""")
    rows = server.wait_events(has("add_to_cart"), "the add_to_cart", sc=sc_of(page))
    origin = "/".join(url.split("/")[:3])
    folder = url.rsplit("/", 1)[0]
    item = rows[-1]["raw"]["ecommerce"]["items"][0]
    assert (item["item_url"], item["image_url"]) == (origin + "/p/mug", folder + "/img/mug.png")
    assert rows[-1]["raw"]["ecommerce"]["cart_url"] == origin + "/cart?restore=1"


def test_gtag_pushes_are_read_as_data_layer_events(page, static_server, server):
    """A page on gtag.js pushes each call's ``arguments`` (``gtag('event', name, params)``), not
    an object with ``event``: GA4's e-commerce params sit at the top of ``params``. The runtime
    reads such a push as the object a Tag Manager page pushes (items, currency, value and the
    order's fields in ``ecommerce``; ``search_term``, ``user`` and the rest beside it), drops
    gtag's own routing keys, and ignores gtag's other commands (js, config, set, consent)."""
    gtag = """function gtag(){dataLayer.push(arguments);}
        gtag('js', new Date()); gtag('config', 'G-TEST1');
        gtag('event', 'view_item', {currency: 'USD', value: 5, send_to: 'G-TEST1',
            items: [{item_id: 'MUG', item_name: 'Mug', price: 5, quantity: 1}]});"""
    open_shop(page, static_server, server, before=gtag)
    page.evaluate("""gtag('event', 'add_to_cart', {currency: 'USD', value: 10,
            items: [{item_id: 'MUG', item_name: 'Mug', price: 5, quantity: 2}]});
        gtag('event', 'search', {search_term: 'blue mug'});
        gtag('event', 'sign_up', {method: 'Google', event_callback: function () {}});
        gtag('event', 'purchase', {transaction_id: 'T-1', currency: 'USD', value: 10, tax: 1,
            items: [{item_id: 'MUG', item_name: 'Mug', price: 5, quantity: 2}]});""")
    sc = sc_of(page)
    rows = server.wait_events(has("view_item", "add_to_cart", "search", "sign_up", "purchase"),
                              "the gtag events", sc=sc)
    raw = {r["name"]: r["raw"] for r in rows}
    assert names(rows).count("page_view") == 1  # gtag('config') is no page view of its own
    assert raw["view_item"]["ecommerce"] == {"currency": "USD", "value": 5, "items": [
        {"item_id": "MUG", "item_name": "Mug", "price": 5, "quantity": 1}]}
    assert raw["add_to_cart"]["ecommerce"]["items"][0]["quantity"] == 2
    assert raw["search"]["search_term"] == "blue mug" and "ecommerce" not in raw["search"]
    assert raw["sign_up"]["method"] == "Google" and "event_callback" not in raw["sign_up"]
    assert raw["purchase"]["ecommerce"]["transaction_id"] == "T-1"
    assert raw["purchase"]["ecommerce"]["tax"] == 1
    assert not any(name in ("js", "config") for name in names(rows))


# Vendors -------------------------------------------------------------------------------------------


VENDOR_STUB = "window.__pusherLoaded = true;"


def test_a_vendor_library_404_does_not_stop_events(page, static_server, server):
    static_server.add(VENDOR_STUB, "application/javascript", path="/lib/pusher.js")
    open_shop(page, static_server, server, site="vend")
    page.evaluate("dataLayer.push({event: 'after_vendors'})")
    sc = sc_of(page)
    rows = server.wait_events(has("after_vendors"), "events on a site with a 404 vendor",
                              site_id="vend", sc=sc)
    assert static_server.hits("/missing/rj2.lib.js") >= 1, "the rejoiner library was asked for"
    assert page.evaluate("window.__pusherLoaded") is True
    assert [r["data"]["loaded"] for r in rows] == [["sendlane"], ["sendlane"]]


def test_a_throwing_vendor_call_is_kept_inside_its_adapter(page, static_server, server):
    static_server.add(VENDOR_STUB, "application/javascript", path="/lib/pusher.js")
    sabotage = "window._Sendlane = {push: function () { throw new Error('vendor boom') }};"
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    open_shop(page, static_server, server, site="vend", before=sabotage)
    # A known visitor (Sendlane holds product views until then), so the pushes happen and throw.
    returned = page.evaluate("""dataLayer.push({event: "view_item", user: {email: "t@example.com"},
        ecommerce: {currency: "USD", items: [{item_id: "SKU-9", item_name: "Lamp", price: 10, quantity: 1}]}},
        {event: "after_throw"})""")
    assert isinstance(returned, int)
    sc = sc_of(page)
    rows = server.wait_events(has("view_item", "after_throw"), "events past a throwing vendor",
                              site_id="vend", sc=sc)
    loaded = {r["name"]: r["data"]["loaded"] for r in rows}
    assert loaded == {"page_view": ["sendlane"], "view_item": [], "after_throw": ["sendlane"]}
    assert errors == []


def test_the_debug_build_logs_and_the_wire_form_does_not(page, static_server, server, wait_until):
    """Debugging a page = serving it the readable build (the script URL with ?onetag_debug=1),
    which logs every event; the minified build logs nothing, whatever the page's URL says."""
    debug_page = shop_page(server).replace(server.script_url("shop"), server.script_url("shop") + "?onetag_debug=1")
    logs: list[str] = []
    page.on("console", lambda m: logs.append(m.text))
    page.goto(static_server.add(debug_page))
    page.wait_for_function("window.onetag && window.onetag.v")
    page.evaluate("dataLayer.push({event: 'debug_me'})")
    wait_until(lambda: any("[onetag]" in x and "debug_me" in x for x in logs), "a debug log line")
    logs.clear()
    page.goto(static_server.add(shop_page(server)) + "?onetag_debug=1")
    page.wait_for_function("window.onetag && window.onetag.v")
    page.evaluate("dataLayer.push({event: 'quiet_please'})")
    page.evaluate("window.onetag.flush()")
    server.wait_events(has("quiet_please"), "the event stored")
    assert not any("[onetag]" in x for x in logs)


def test_gtag_events_sent_only_to_other_google_products_are_not_read(page, static_server, server):
    """``send_to`` routes a gtag event: one naming only other products' targets (a Google Ads
    conversion, ``AW-...``; Floodlight, ``DC-...``) is theirs, not the site's analytics event.
    One naming a GA4 target (``G-...``), a group (which may hold one), or no target, is read."""
    gtag = "function gtag(){dataLayer.push(arguments);}"
    open_shop(page, static_server, server, before=gtag)
    page.evaluate("""
        gtag('event', 'conversion', {send_to: 'AW-123/abc', value: 5, currency: 'USD',
                                     transaction_id: 'T-9'});
        gtag('event', 'ads_and_floodlight', {send_to: ['AW-1/a', 'DC-2/b']});
        gtag('event', 'ads_and_ga4', {send_to: ['AW-1/a', 'G-TEST1']});
        gtag('event', 'grouped', {send_to: 'default'});
        gtag('event', 'untargeted', {});
        dataLayer.push({event: 'last'});""")
    rows = server.wait_events(has("last"), "the events", sc=sc_of(page))
    assert names(rows) == ["page_view", "ads_and_ga4", "grouped", "untargeted", "last"]
