"""eSputnik / Yespo / Reteno, server side: the website-behaviour tracker, REST v2 (CONTRACT.md
section 7, column "eSputnik tracker").

Sources: eSputnik's "Transferring Website Behavior Data via REST API" ("ES REST": the JSON
example of each event) and REFERENCE.md sections 3.3, 3.4 and 6 ("ES ref").

- ``POST {tracker_url}`` (default ``https://tracker.esputnik.com/api/v2``), JSON body
  ``{"GeneralInfo": {...}, "<EventName>": {...}}``. ``GeneralInfo`` carries ``eventName``,
  ``siteId`` (the account's site id, kept apart from the loader's script id: ES ref 6),
  ``datetime`` (epoch milliseconds), whatever we know of the visitor (``externalCustomerId``,
  ``user_email``, ``user_phone``, ``user_name``) and ``cookies.sc``: the visitor is the sc
  cookie, which onetag shares with eSputnik's own script, so anonymous events need no email.
  ``cookies`` is Required in every event's GeneralInfo but ProductUpdate's, and the document
  offers no stand-in for it (the identifiers above are all Optional): a backend event takes
  the sc of the customer's latest session (verified, on a site with ``identity_secret``:
  ``rules.signs_identities``); with none, a backend order's PurchasedItems waits
  for one (``waits``: a ``held`` row saying why, planned again with the sc of the first of
  the customer's sessions identified, else expired after hold_days), and its other requests
  are not sent (``skipped``, an ``ignored`` row saying why).
- Prices are Required wherever a product is named (ProductPage, AddToWishlist, StatusCart,
  PurchasedItems (One Click)). An item without one takes the catalog's price, which the store
  adds (``_common.item_price_minor``); with none, the request or the line is not sent: a
  made-up "0" would overwrite the feed's price ("If the price has changed on the site but
  hasn't changed in the feed, the sent value will be the value from the site").
- Auth: the docs say none is needed; the vendor's own plugins send the API key as the HTTP
  Basic password (ES ref 3.4), so ``auth_headers`` does that when ``api_key`` is configured.
- Prices are strings in major units ("754"; ``money.major_str``: 4.35 goes out as "4.35").

Routing defaults (``DEFAULT_ROUTES``):

    page_view        browser   PageView on SPA route changes; REST has no page view
    identify         server    CustomerData (the page has no identify call: section 6)
    view_item, view_item_list, add_to_wishlist
                     fallback  sendEvent ProductPage / CategoryPage / AddToWishlist in the page;
                               the tracker's copy only when the library failed
    add_to_cart, remove_from_cart, view_cart, cart_updated, begin_checkout
                     fallback  StatusCart (the whole cart under the cart state's GUID), same
    purchase         fallback  PurchasedItems in the page; the tracker only when the library
                               failed; one order is one request ("PurchasedItems:<order id>")
    search           browser   SearchRequest (no results only); REST has no search event
    product_updated  server    ProductUpdate (backend only)
    "*"              server    CustomEvent: ES REST documents it for the tracker, and the page
                               has no custom-event call (ES ref 3.2: UNCONFIRMED shape in eS.js)
    order_status, refund, unsubscribe, opt_in
                     off       the tracker has no event for them (section 7: "—")
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from .. import money
from . import _common as c
from ._base import PlanContext, Setting, VendorConfig, VendorRequest

NAME = "esputnik"

SETTINGS = (
    Setting("site_id", required=True, public=True, browser=False,
            help="the tracker's siteId (from eSputnik support or the account's site setup)"),
    Setting("script_id", public=True, browser=False, default="{site_id}",
            help="the eS.js loader id, when it differs from site_id"),
    Setting("api_key", secret=True,
            help="optional: sent as the HTTP Basic password to the tracker, as the vendor's "
                 "plugins do"),
    Setting("script_url", url=True, public=True, default="https://cdn.esputnik.com/scripts/{script_id}.js",
            help="the eS.js loader"),
    Setting("tracker_url", url=True, default="https://tracker.esputnik.com/api/v2",
            help="REST tracker endpoint (Yespo accounts: https://tracker.yespo.io/api/v2)"),
)

DEFAULT_ROUTES = {
    "page_view": "browser",
    "identify": "server",
    "view_item": "fallback",
    "view_item_list": "fallback",
    "search": "browser",
    "add_to_cart": "fallback",
    "remove_from_cart": "fallback",
    "view_cart": "fallback",
    "cart_updated": "fallback",
    "begin_checkout": "fallback",
    "purchase": "fallback",
    "refund": "off",
    "order_status": "off",
    "add_to_wishlist": "fallback",
    "product_updated": "server",
    "unsubscribe": "off",
    "opt_in": "off",
    "*": "server",
}

_STANDARD = frozenset(DEFAULT_ROUTES) - {"*"}
# The events whose products need a price (ProductPage, AddToWishlist, StatusCart, and the
# PurchasedItems One Click form): the store adds the catalog's to a line without one.
CATALOG_PRICES = frozenset({"view_item", "add_to_wishlist", *c.CART_EVENTS, "purchase"})
# A request without the customer's sc says whether only unverified sessions are known
# (``_no_session``): the store adds identity.unverified_sessions for it.
UNVERIFIED_SESSIONS = True
# The only names templates/vendors/esputnik.js.j2 makes a call for; for any other its handler
# does nothing, so the script need not say how those are routed (routing.browser_routes).
BROWSER_EVENTS = frozenset({"page_view", "view_item", "add_to_wishlist", "view_item_list", "search",
                            "add_to_cart", "remove_from_cart", "view_cart", "cart_updated",
                            "begin_checkout", "purchase"})


def auth_headers(cfg: VendorConfig) -> dict[str, str]:
    """HTTP Basic with the API key as password. The username is ignored by the tracker (ES ref
    3.4: WooCommerce sends an empty one, Shopify "user"); this sends "user"."""
    key = cfg.get("api_key")
    if not key:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"user:{key}".encode()).decode()}


def plan(event: dict[str, Any], ctx: PlanContext) -> list[VendorRequest]:
    name = event["name"]
    cur = c.currency(event, ctx.currency)
    eid = c.event_ref(event)
    if name == "identify":
        # ES REST CustomerData: GeneralInfo alone ties the sc cookie to the customer. Keyed by
        # a digest of it (without the time): the same person on another device (another sc)
        # is sent again, a replay of the same identify is not.
        body = {"GeneralInfo": _general(event, ctx, "CustomerData")}
        stable = {**body["GeneralInfo"], "datetime": None}
        return [_visitor_request(event, ctx, body, f"CustomerData:{c.digest(stable)}")]
    if name == "view_item":
        item = c.ecommerce(event)["items"][0]  # a product page shows one product
        return [_product_request(event, ctx, "ProductPage", item, cur, f"ProductPage:{eid}")]
    if name == "view_item_list":
        ecom = c.ecommerce(event)
        # categoryKey "must match category names or IDs in the feed": the list's id, else name.
        key = ecom.get("item_list_id") or ecom.get("item_list_name")
        if not key:
            return []
        body = {"CategoryPage": {"Category": {"categoryKey": key}}}
        return [_visitor_request(event, ctx,
                                 _with_general(event, ctx, "CategoryPage", body),
                                 f"CategoryPage:{eid}")]
    if name == "add_to_wishlist":
        return [_product_request(event, ctx, "AddToWishlist", item, cur,
                                 f"AddToWishlist:{eid}:{index}")
                for index, item in enumerate(c.ecommerce(event)["items"])]
    if name in c.CART_EVENTS:
        return _status_cart(event, ctx) if event.get("cart") else []
    if name == "purchase":
        return _purchased(event, ctx, cur)
    if name == "product_updated":
        return _product_update(event, ctx, cur)
    if name not in _STANDARD:
        return [_custom(event, ctx)]
    return []


def _request(ctx: PlanContext, body: dict[str, Any], key: str) -> VendorRequest:
    return VendorRequest("POST", ctx.vendor["tracker_url"], body, key)


def _visitor_request(event: dict[str, Any], ctx: PlanContext, body: dict[str, Any],
                     key: str, skipped: str | None = None, wait: bool = False) -> VendorRequest:
    """A request about a visitor: not sent (``skipped``) without ``cookies.sc``, which ES REST
    marks Required in GeneralInfo ("Cookie sc is a cookie generated by our script") with no
    alternative identifier; else not sent for ``skipped``, if given.

    ``wait`` (a backend order): without the sc but with someone to wait for (an email or a
    customer id, as every backend event has), held instead (``VendorRequest.waits``) until a
    browser session of the customer is identified (by a signed identify, on a site with
    ``identity_secret``: ``rules.held_visitors``), then planned again with its sc; what it
    lacks stays in its last_error (``_no_session``), and it expires after hold_days like any
    held row. The order is the customer's fact whenever it is told, and PurchasedItems keeps
    its own ``datetime``; ES REST gives the tracker no way to make a contact from the email
    alone.
    """
    general = body["GeneralInfo"]
    waits = None
    if "cookies" not in general:
        why, until = _no_session(event, general["eventName"])
        if wait and not skipped and ("user_email" in general or "externalCustomerId" in general):
            waits = f"{why}; held until {until} (hold_days)"
        else:
            skipped = why
    return dataclasses.replace(_request(ctx, body, key), skipped=skipped, waits=waits)


def _no_session(event: dict[str, Any], event_name: str) -> tuple[str, str]:
    """Why a request about the customer has no sc, and what a held one waits for. On a site
    with ``identity_secret`` only a verified session will do (``rules.signs_identities``),
    and the store says whether unverified ones are known (``identity.unverified_sessions``,
    ``rules.UNVERIFIED_SESSIONS``). Each wording stays true while the row waits: a typed
    email later binds no session the site would take, and on a site that can't sign the
    first session identified releases the row."""
    lacks = f"eSputnik {event_name} requires cookies.sc, and "
    unverified = (event.get("identity") or {}).get("unverified_sessions")
    if unverified is None:  # a site without identity_secret: any session of the customer
        return lacks + "no browser session of this customer is known yet", "one is identified"
    signed = "on a site with identity_secret only a signed identify (user.signature) verifies one"
    if unverified:
        return (lacks + "only unverified browser sessions of this customer are known (bound "
                f"by an email without a signature; {signed})", "one is verified")
    return (lacks + "no verified browser session of this customer is known yet "
            f"({signed})", "one is verified")


def _unpriced(event_name: str, field: str, item: dict[str, Any], cur: str) -> str:
    return (f"eSputnik {event_name} requires {field}; item {item['item_id']!r} came without "
            f"one and the catalog has none in {cur}")


def _general(event: dict[str, Any], ctx: PlanContext, event_name: str) -> dict[str, Any]:
    who = c.person(event)
    info: dict[str, Any] = {"eventName": event_name, "siteId": ctx.vendor["site_id"],
                            "datetime": event["time_ms"]}
    info.update(c.compact({"externalCustomerId": who.get("customer_id"),
                           "user_email": who.get("email"), "user_phone": who.get("phone"),
                           "user_name": c.full_name(who)}))
    # cookies.sc is Required: a backend event (no session of its own) gets the customer's
    # latest session's sc. With none at all, ``_visitor_request`` does not send it.
    sc = c.session_sc(event)
    if sc:
        info["cookies"] = {"sc": sc}
    return info


def _with_general(event: dict[str, Any], ctx: PlanContext, event_name: str,
                  body: dict[str, Any]) -> dict[str, Any]:
    return {"GeneralInfo": _general(event, ctx, event_name), **body}


def _price(minor: int | None, cur: str) -> str | None:
    return money.major_str(minor, cur) if minor is not None else None


def _item_price(item: dict[str, Any], cur: str) -> str | None:
    """The item's price string: its own, else the catalog's in ``cur``; None when neither."""
    return _price(c.item_price_minor(item, cur), cur)


def _stock(item: dict[str, Any]) -> str | None:
    """isInStock: "1" / "0" as the ES REST examples send it; left out when unknown."""
    return None if item.get("in_stock") is None else ("1" if item["in_stock"] else "0")


def _product(item: dict[str, Any], cur: str) -> dict[str, Any]:
    """ProductPage / AddToWishlist "Product": productKey (the feed's id), price (a string,
    without the optional currency suffix), isInStock."""
    return c.compact({"productKey": item["item_id"], "price": _item_price(item, cur),
                      "isInStock": _stock(item)})


def _product_request(event: dict[str, Any], ctx: PlanContext, event_name: str,
                     item: dict[str, Any], cur: str, key: str) -> VendorRequest:
    """ProductPage / AddToWishlist for one item; not sent without a price (Required)."""
    product = _product(item, cur)
    body = _with_general(event, ctx, event_name, {event_name: {"Product": product}})
    return _visitor_request(event, ctx, body, key, None if "price" in product
                            else _unpriced(event_name, "price", item, cur))


Line = dict[str, Any]


def _priced_lines(items: list[Line],
                  cur: str) -> tuple[list[tuple[int, Line, str]], list[tuple[int, Line]]]:
    """The items split into ``(index, item, price)`` for those with a price (their own or
    the catalog's) and ``(index, item)`` for the others; the index names a left-out line."""
    priced, unpriced = [], []
    for index, item in enumerate(items):
        price = _item_price(item, cur)
        if price is None:
            unpriced.append((index, item))
        else:
            priced.append((index, item, price))
    return priced, unpriced


def _left_out(ctx: PlanContext, line: dict[str, Any], key: str, reason: str) -> VendorRequest:
    """An ignored row for one line left out of a request (``<key>:<line index>``, never a
    sendable key), its body the line as that request names its fields."""
    return dataclasses.replace(_request(ctx, line, key), skipped=reason)


def _status_cart(event: dict[str, Any], ctx: PlanContext) -> list[VendorRequest]:
    """StatusCart: the WHOLE cart, not a delta, under the GUID of this cart state (the store
    makes a new one per change, as ES REST requires); an emptied cart is an empty Products.

    A line without any price is left out (each product's ``price`` is Required); a cart of
    only such lines is not sent at all, since an empty Products would say it was emptied.
    """
    cart = event["cart"]
    cur = cart.get("currency") or c.currency(event, ctx.currency)
    key = f"StatusCart:{cart['guid']}"
    priced, unpriced = _priced_lines(cart["items"], cur)
    products = [{"productKey": item["item_id"], "price": price, "quantity": item["quantity"],
                 "price_currency_code": cur} for _, item, price in priced]
    left_out = [_left_out(ctx, {"productKey": item["item_id"], "quantity": item["quantity"]},
                          f"{key}:{index}",
                          f"{_unpriced('StatusCart', 'price', item, cur)}: left out of the cart")
                for index, item in unpriced]
    body = {"StatusCart": {"GUID": cart["guid"], "Products": products}}
    skipped = ("eSputnik StatusCart requires each product's price; no line of the cart has one"
               if left_out and not products else None)
    return [_visitor_request(event, ctx, _with_general(event, ctx, "StatusCart", body), key,
                             skipped),
            *left_out]


def _purchased(event: dict[str, Any], ctx: PlanContext, cur: str) -> list[VendorRequest]:
    """PurchasedItems in one of the two documented forms, never a mix of them.

    With a cart GUID (the store hands a purchase the cart as bought under the GUID of its
    last state, which either path sent as StatusCart; or the GUID the browser sent with the
    purchase): ES REST "PurchasedItems", ``{GUID, OrderNumber}``, the GUID "identical to the
    GUID of the StatusCart event", which is what closes the abandoned cart. Without one (a
    backend order of a session that had no cart): ES REST "PurchasedItems (One Click)",
    ``{Products: [{product_id, unit_price, quantity}], OrderNumber}``; a line without any
    price (``unit_price`` is Required) is left out, and an order of only such lines is not
    sent.

    The One Click table also lists ``block_id``, "Recommendation block ID. To get it, contact
    support", inside ``Tags`` (which every other event's table marks Optional), and eSputnik's
    "Setting up web tracking by sending events via JavaScript requests" makes it optional for
    a purchase in one click (REFERENCE.md 3.2, "blockId"): it says which of eSputnik's
    recommendation blocks sold the product, which neither the backend nor onetag knows for
    an order, so none is sent (a fixed one would credit every such order to one block).
    """
    order = c.ecommerce(event)["transaction_id"]
    key = f"PurchasedItems:{order}"
    guid = c.cart_guid(event)
    left_out: list[VendorRequest] = []
    skipped = None
    if guid:
        purchased = {"GUID": guid, "OrderNumber": order}
    else:
        priced, unpriced = _priced_lines(c.order_items(event), cur)
        products = [{"product_id": item["item_id"], "unit_price": price,
                     "quantity": item["quantity"]} for _, item, price in priced]
        left_out = [_left_out(ctx, {"product_id": item["item_id"], "quantity": item["quantity"]},
                              f"{key}:{index}",
                              f"{_unpriced('PurchasedItems', 'unit_price', item, cur)}: "
                              "left out of the order")
                    for index, item in unpriced]
        purchased = {"Products": products, "OrderNumber": order}
        if left_out and not products:
            skipped = ("eSputnik PurchasedItems (One Click) requires its products' unit_price; "
                       f"no line of order {order!r} has one")
    body = _with_general(event, ctx, "PurchasedItems", {"PurchasedItems": purchased})
    return [_visitor_request(event, ctx, body, key, skipped, wait=event["source"] == "backend"),
            *left_out]


def _product_update(event: dict[str, Any], ctx: PlanContext,
                    cur: str) -> list[VendorRequest]:
    """ProductUpdate: the event's products in one request; GeneralInfo is just eventName and
    siteId, as in the ES REST example (a catalog fact has no visitor).

    isInStock is "required, could be 0 or 1" (ES REST ProductUpdate parameters): a product
    whose stock the backend did not give is not sent, rather than guessed (a wrong "1" would
    advertise a sold-out product); it is recorded as an ``ignored`` row with the reason.
    """
    products, skipped = [], []
    eid = c.event_ref(event)
    for index, item in enumerate(c.ecommerce(event)["items"]):
        if item.get("in_stock") is None:
            skipped.append(_left_out(
                ctx, {"product_id": item["item_id"]}, f"ProductUpdate:{eid}:{index}",
                f"eSputnik ProductUpdate requires isInStock; product {item['item_id']!r} "
                "came without in_stock"))
            continue
        categories = item.get("categories") or []
        products.append(c.compact({
            "product_id": item["item_id"],
            "name": item.get("item_name"),
            "description": item.get("description"),
            "brand": item.get("item_brand"),
            "imgurl": item.get("image_url"),
            "unit_price": _price(item.get("price_minor"), cur),
            "price_currency_code": cur,
            "isInStock": _stock(item),
            "category": " > ".join(categories) if categories else None,  # "level1 > level2"
        }))
    if not products:
        return skipped
    body = {"GeneralInfo": {"eventName": "ProductUpdate", "siteId": ctx.vendor["site_id"]},
            "ProductUpdate": products}
    return [_request(ctx, body, f"ProductUpdate:{eid}"), *skipped]


def _tag(value: Any) -> list[str]:
    """A CustomEvent tag: "always transferred as array of strings"."""
    values = value if isinstance(value, list) else [value]
    return [v if isinstance(v, str) else c.json_text(v) for v in values]


def _custom(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """CustomEvent (ES REST): {"EventName": <name>, "Tags": {<property>: [strings]}}."""
    tags = {key: _tag(value) for key, value in (event.get("properties") or {}).items()}
    custom = c.compact({"EventName": event["name"], "Tags": tags or None})
    return _visitor_request(event, ctx,
                            _with_general(event, ctx, "CustomEvent", {"CustomEvent": custom}),
                            f"CustomEvent:{c.event_ref(event)}")
