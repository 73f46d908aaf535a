"""Rejoiner, server side: its REST API v1 (CONTRACT.md section 7, column "Rejoiner REST").

Sources: Rejoiner's "REST API" reference ("RJ REST"), its "API Integration Guide" ("RJ
guide") and REFERENCE.md section 1.3 / 6 ("RJ ref").

- Base ``{api_base}/{site_id}/``; every path ends in a slash ("The trailing slash at the end of
  the endpoint is required", RJ ref 1.3). Auth ``Authorization: Rejoiner <api_key>``, a plain
  token (no HMAC in Rejoiner 2), added at send time by ``auth_headers``.
- Money is integer cents (RJ guide: "all prices should be given in cents"), via
  ``money.cents`` from exact minor units.
- Rejoiner keys everything by email, so every request here ``needs_email``: a purchase made
  before the visitor was identified waits in the outbox until the session has an email.

Routing defaults (``DEFAULT_ROUTES``):

    page_view        browser   addPageView (SPA route changes); the REST API has no page views
    identify         both      browser setCustomerEmail/setCustomerData tags the browsing
                               session; the server's PUT customers/{email}/ updates the stored
                               profile: two different facts, neither counts anything
    view_item        browser   trackProductView; nothing in REST
    add_to_cart, remove_from_cart, view_cart, cart_updated, begin_checkout
                     browser   setCartItem/setCartData; REST has no cart call (section 7: "—")
    purchase         fallback  sendConversion in the page; POST customer/convert/ only when
                               the library did not load or threw. When the browser took it,
                               the outbox still plans convert and records it as delivered by
                               the browser under the same key ("convert:<order id>"), so the
                               backend's copy of that order is not converted a second time
    order_status, refund
                     server    POST customer/cancel/ when the order is cancelled, refunded or
                               failed: the journeys that followed the purchase must stop. Not
                               for a partial refund (the order stands: its journeys go on)
    unsubscribe, opt_in
                     server    customer/unsubscribe/, customer/opt_in/ (no browser call exists)
    view_item_list, search, add_to_wishlist, product_updated, "*"
                     off       no Rejoiner call exists for these, in the page or in REST
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from .. import money
from . import _common as c
from ._base import PlanContext, Setting, VendorConfig, VendorRequest

NAME = "rejoiner"

SETTINGS = (
    Setting("site_id", required=True, public=True,
            help="Site ID (Rejoiner: Settings > Domain): the page's setAccount and the REST path"),
    Setting("domain", public=True,
            help="cookie domain for setDomain; optional, Rejoiner defaults to the page's host"),
    Setting("api_key", secret=True, server_auth=True,
            help="REST API key, sent as 'Authorization: Rejoiner <api_key>'; needed for every "
                 "server-side call"),
    Setting("script_url", url=True, public=True, default="https://cdn.rejoiner.com/js/v4/rj2.lib.js",
            help="the rj2 library"),
    Setting("api_base", url=True, default="https://rj2.rejoiner.com/api/v1",
            help="REST base; requests go to {api_base}/{site_id}/customer/convert/ ..."),
)

DEFAULT_ROUTES = {
    "page_view": "browser",
    "identify": "both",
    "view_item": "browser",
    "view_item_list": "off",
    "search": "off",
    "add_to_cart": "browser",
    "remove_from_cart": "browser",
    "view_cart": "browser",
    "cart_updated": "browser",
    "begin_checkout": "browser",
    "purchase": "fallback",
    "refund": "server",
    "order_status": "server",
    "add_to_wishlist": "off",
    "product_updated": "off",
    "unsubscribe": "server",
    "opt_in": "server",
    "*": "off",
}

# Order statuses after which Rejoiner's journeys for the customer must stop.
CANCELLING = frozenset({"cancelled", "refunded", "failed"})
# The order as converted (PlanContext.order): a refund's value is compared with its
# cart_value to tell a partial refund.
ORDER_KEY = "convert:{order}"


def auth_headers(cfg: VendorConfig) -> dict[str, str]:
    key = cfg.get("api_key")
    return {"Authorization": f"Rejoiner {key}"} if key else {}


def plan(event: dict[str, Any], ctx: PlanContext) -> list[VendorRequest]:
    name = event["name"]
    if name == "identify":
        return [_profile(event, ctx)]
    if name == "purchase":
        return [_convert(event, ctx)]
    if name in c.STATUS_EVENTS:
        status = c.order_status(event)
        if status not in CANCELLING or _partial_refund(event, ctx):
            return []
        order = c.ecommerce(event)["transaction_id"]
        return [_post(ctx, "customer/cancel/", _with_email(event, {}), f"cancel:{order}:{status}")]
    if name == "unsubscribe":
        return [_post(ctx, "customer/unsubscribe/", _with_email(event, {}),
                      f"unsubscribe:{c.event_ref(event)}")]
    if name == "opt_in":
        # RJ REST customer/opt_in/: "Any additional fields will be treated as strings and
        # stored along with the record of explicit consent": the event's own properties
        # (e.g. {"type": "accepts marketing checkbox"}) are exactly that record.
        record = dict(event.get("properties") or {})
        return [_post(ctx, "customer/opt_in/", _with_email(event, record),
                      f"opt_in:{c.event_ref(event)}")]
    return []


def _url(ctx: PlanContext, path: str) -> str:
    site = quote(ctx.vendor["site_id"], safe="")
    return c.join_url(ctx.vendor["api_base"], f"{site}/{path}")


def _post(ctx: PlanContext, path: str, body: dict[str, Any], key: str) -> VendorRequest:
    return VendorRequest("POST", _url(ctx, path), body, key, needs_email=True)


def _with_email(event: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the customer's email (absent until the session is identified)."""
    return {**body, **c.compact({"email": c.person(event).get("email")})}


def _convert(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """POST customer/convert/ (RJ REST): "convert the latest session for a customer"."""
    ecom = c.ecommerce(event)
    cur = c.currency(event, ctx.currency)
    items = [_cart_item(item, cur) for item in c.order_items(event)]
    value = ecom.get("value_minor")
    cart_data = c.compact({
        # The order's value when the page gave one (GA4 value: after discounts, before tax
        # and shipping), else the lines' sum: the same number sendConversion gets in the page.
        "cart_value": money.cents(value, cur) if value is not None else sum(
            item.get("qty_price", 0) for item in items),
        "cart_item_count": sum(item["item_qty"] for item in items),
        "order_number": ecom["transaction_id"],  # RJ REST CartData: "External ID for the order"
        "promo": ecom.get("coupon"),
        # RJ REST CartData: "A unique url to return to the cart page" (the site's cart_url
        # or the event's ecommerce.cart_url); left out when neither is configured.
        "return_url": c.cart_url(event, ctx.cart_url),
    })
    body = _with_email(event, {"cart_data": cart_data, "cart_items": items})
    return _post(ctx, "customer/convert/", body, f"convert:{ecom['transaction_id']}")


def _partial_refund(event: dict[str, Any], ctx: PlanContext) -> bool:
    """A refund of part of the order (``_common.refund_is_partial``): customer/cancel/ "will
    immediately stop any active journeys for a specific customer" (RJ REST), but the order
    stands. The convert body holds the order's value in cents only, so the refund's value
    is compared in cents."""
    if event["name"] != "refund" or c.refund_is_partial(event):
        return c.refund_is_partial(event)
    cart_value = ((ctx.order or {}).get("cart_data") or {}).get("cart_value")
    value = c.ecommerce(event).get("value_minor")
    return (value is not None and cart_value is not None
            and money.cents(value, c.currency(event, ctx.currency)) < cart_value)


def _cart_item(item: dict[str, Any], cur: str) -> dict[str, Any]:
    """RJ REST "Cart Item Payload Structure": prices in integer cents, qty_price = price x qty.
    ``product_id`` ("The unique SKU or ID which identifies the product", any string) is
    ``<item_id>:<item_variant>`` for a variant (``_common.line_id``): Rejoiner keys cart lines
    by it (RJ guide, removeCartItem takes only a product_id), so two variants of one item
    must not share one. ``category`` is left out when the item has none (an empty list
    says nothing)."""
    price = money.cents(item["price_minor"], cur) if item.get("price_minor") is not None else None
    return c.compact({
        "product_id": c.line_id(item),
        "name": item.get("item_name"),
        "price": price,
        "item_qty": item["quantity"],
        "qty_price": price * item["quantity"] if price is not None else None,
        "category": item.get("categories") or None,
        "product_url": item.get("item_url"),
        "image_url": item.get("image_url"),
        "description": item.get("description"),
    })


def _address(address: dict[str, Any]) -> dict[str, Any]:
    """onetag's billing_address as RJ REST's customer address fields (``POST /customers/``
    payload: address1, address2, city, state, postal_code, country; the GET example's
    "state": "AZ", "country": "US" are codes, so the codes are preferred to the names)."""
    return c.compact({
        "address1": address.get("address_1"),
        "address2": address.get("address_2"),
        "city": address.get("city"),
        "state": address.get("state_code") or address.get("state"),
        "postal_code": address.get("postal_code"),
        "country": address.get("country_code") or address.get("country"),
    })


def _profile(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """PUT customers/{email}/ (RJ REST "update the customer profile record"; RJ ref 6: prefer
    PUT by email, since whether v1 serves POST /customers/ is UNCONFIRMED).

    Only the documented fields we have; never ``metadata`` ("any previously existing metadata
    will be replaced"). Keyed by email + a digest of the fields, so the same profile sent
    again (a replayed identify, a second device) is not re-sent, and a change is.
    """
    who = c.person(event)
    email = who.get("email") or ""
    body = c.compact({"email": who.get("email"), "first_name": who.get("first_name"),
                      "last_name": who.get("last_name"), "phone": who.get("phone"),
                      **_address(event.get("billing_address") or {})})
    url = _url(ctx, f"customers/{quote(email, safe='')}/")
    key = f"customers:{email}:{c.digest(body)}"
    # RJ ref 6: "prefer PUT by email, falling back to POST on 404" — a customer Rejoiner has
    # never seen has no record to update yet.
    create = VendorRequest("POST", _url(ctx, "customers/"), body, key, needs_email=True)
    return VendorRequest("PUT", url, body, key, needs_email=True, if_not_found=create)
