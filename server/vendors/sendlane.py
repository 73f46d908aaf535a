"""Sendlane, server side: the Server-Side API v2 tracking endpoints (CONTRACT.md section 7,
column "Sendlane API v2").

Sources: vendor-docs/sendlane-custom-integration.txt ("SL guide": the vendor's own words, which
win where they and the spec differ) and REFERENCE.md sections 4.2 and 6 ("SL ref", digesting
Sendlane's OpenAPI/Stoplight spec: required fields and the schema of each endpoint).

- ``POST {api_base}/tracking/<event>``; ``Authorization: Bearer <api_token>`` (secret, added at
  send time by ``auth_headers``); every body carries ``token`` = the custom-integration token,
  which is public by design (it is pusher.js's data-token).
- Money is JSON decimals in major units (``money.major_number``: 19.99 goes out as 19.99).
- ``time`` is never sent: "time values should only be used when passing historical data ...
  Calls without time values will default to the time the call was made" (SL guide).
- ``accepts_marketing`` is sent only when it is true: Sendlane unsubscribes a contact at once
  on false (SL guide, Troubleshooting), and an unticked box at checkout is no unsubscribe
  request (explicit ones arrive as ``unsubscribe`` events).
- A tracking event binds to a contact by email ("Without an identifier the event cannot be
  attributed", SL ref), so all but the catalog call ``needs_email``.

Routing defaults (``DEFAULT_ROUTES``):

    identify         both      identify in the page sets Sendlane's cookie; customer-added on
                               the server stores the customer: two different facts
    view_item, add_to_cart, begin_checkout
                     fallback  product_viewed / added_to_cart / checkout_started in the page;
                               product-viewed / added-to-cart / checkout-started from the
                               server only when pusher.js failed, so none is counted twice
    purchase         server    order-placed; the page has no order call, so one order is one
                               request (keyed "order-placed:<order id>": the browser's and the
                               backend's copy of one order are one)
    order_status, refund
                     server    order-placed again with the new status (the guide's statuses
                               fulfilled, cancelled, refunded trigger order_fulfilled,
                               order_cancelled, order_refunded)
    product_updated  server    product-added (the guide: "sync product data ... for all changes")
    "*"              server    /tracking/event (custom_event); pusher.js has no custom call
    page_view, view_item_list, search, remove_from_cart, view_cart, cart_updated,
    add_to_wishlist, unsubscribe, opt_in
                     off       Sendlane has no call for these (page views: pusher.js tracks
                               "active on site" by itself)
"""

from __future__ import annotations

from typing import Any

from .. import money
from . import _common as c
from ._base import PlanContext, Setting, VendorConfig, VendorRequest

NAME = "sendlane"

SETTINGS = (
    Setting("integration_token", required=True, public=True,
            help="custom-integration token: pusher.js's data-token and the API bodies' `token`"),
    Setting("api_token", secret=True,
            help="API v2 token, sent as 'Authorization: Bearer <api_token>'; needed for every "
                 "server-side call"),
    Setting("script_url", public=True, default="https://sendlane.com/scripts/pusher.js",
            help="pusher.js"),
    Setting("api_base", default="https://api.sendlane.com/v2",
            help="API v2 base; requests go to {api_base}/tracking/order-placed ..."),
)

DEFAULT_ROUTES = {
    "page_view": "off",
    "identify": "both",
    "view_item": "fallback",
    "view_item_list": "off",
    "search": "off",
    "add_to_cart": "fallback",
    "remove_from_cart": "off",
    "view_cart": "off",
    "cart_updated": "off",
    "begin_checkout": "fallback",
    "purchase": "server",
    "refund": "server",
    "order_status": "server",
    "add_to_wishlist": "off",
    "product_updated": "server",
    "unsubscribe": "off",
    "opt_in": "off",
    "*": "server",
}

_STANDARD = frozenset(DEFAULT_ROUTES) - {"*"}


def auth_headers(cfg: VendorConfig) -> dict[str, str]:
    token = cfg.get("api_token")
    return {"Authorization": f"Bearer {token}"} if token else {}


def plan(event: dict[str, Any], ctx: PlanContext) -> list[VendorRequest]:
    name = event["name"]
    cur = c.currency(event, ctx.currency)
    eid = event["event_id"]
    if name == "identify":
        return [_customer(event, ctx)]
    if name == "view_item":
        item = c.ecommerce(event)["items"][0]  # a product page shows one product
        body = {"product_id": item["item_id"], **_contact(event)}
        return [_post(ctx, "product-viewed", body, f"product-viewed:{eid}")]
    if name == "add_to_cart":
        return [_added_to_cart(event, ctx, cur)]
    if name == "begin_checkout":
        return [_checkout_started(event, ctx, cur)]
    if name == "purchase":
        return [_order_placed(event, ctx, cur)]
    if name in c.STATUS_EVENTS:
        return [_order_status(event, ctx)]
    if name == "product_updated":
        return _products(event, ctx, cur)
    if name not in _STANDARD:
        # /tracking/event: {token, custom_event, email, data} (SL ref; "data ... can be free
        # form"). The event must be registered in the Custom Integration to trigger anything.
        body = {"custom_event": name, **_contact(event), "data": event.get("properties") or {}}
        return [_post(ctx, "event", body, f"event:{eid}")]
    return []


def _post(ctx: PlanContext, path: str, body: dict[str, Any], key: str,
          needs_email: bool = True) -> VendorRequest:
    url = c.join_url(ctx.vendor["api_base"], f"tracking/{path}")
    return VendorRequest("POST", url, {"token": ctx.vendor["integration_token"], **body}, key,
                         needs_email=needs_email)


def _contact(event: dict[str, Any]) -> dict[str, Any]:
    who = c.person(event)
    return c.compact({"email": who.get("email"), "phone": who.get("phone")})


def _opted_in(event: dict[str, Any]) -> dict[str, Any]:
    return {"accepts_marketing": True} if c.person(event).get("accepts_marketing") is True else {}


def _number(minor: int | None, cur: str) -> int | float | None:
    return money.major_number(minor, cur) if minor is not None else None


def _line(item: dict[str, Any], cur: str) -> dict[str, Any]:
    """SL guide line item: product_id, sku, product_name, quantity, item_price, total
    (the spec's Product; GA4's item_id is the SKU)."""
    price = item.get("price_minor")
    return c.compact({
        "product_id": item["item_id"],
        "sku": item["item_id"],
        "product_name": item.get("item_name"),
        "quantity": item["quantity"],
        "item_price": _number(price, cur),
        "total": _number(c.line_minor(item), cur) if price is not None else None,
    })


def _customer(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """customer-added: token and customer_id are required (SL ref).

    UNCONFIRMED, chosen: the spec's body has no top-level name fields; the contact's email,
    names and phone go in ``billing_address`` (the only place the schema has them), with the
    email also top-level as on every other tracking body, so the call binds to the contact.
    A visitor who identified by email alone has no shop customer id: the email stands in
    (stable per contact; Sendlane keys contacts by email anyway).
    """
    who = c.person(event)
    email = who.get("email")
    billing = c.compact({"first_name": who.get("first_name"), "last_name": who.get("last_name"),
                         "email": email, "phone": who.get("phone")})
    body = c.compact({"customer_id": who.get("customer_id") or email, "email": email,
                      "billing_address": billing or None, **_opted_in(event)})
    return _post(ctx, "customer-added", body, f"customer-added:{email or ''}:{c.digest(body)}")


def _added_to_cart(event: dict[str, Any], ctx: PlanContext, cur: str) -> VendorRequest:
    """added-to-cart: "each call represents one product being added ... there is no contextual
    information about other items" (SL guide), so the lines, count and total are the add's.

    cart_id (required) is the GUID of the cart state this add made: Sendlane records only the
    first of several calls with the same event and id (SL guide "Event IDs"), and a cart id
    that stayed the same would make it skip every add after the first.
    """
    items = c.ecommerce(event)["items"]
    t = c.totals(c.ecommerce(event), items)
    body = {"cart_id": (event.get("cart") or {}).get("guid") or event["event_id"],
            **_contact(event), "total_items": t.item_count, "total": _number(t.total, cur),
            "currency": cur, "line_items": [_line(item, cur) for item in items]}
    return _post(ctx, "added-to-cart", body, f"added-to-cart:{event['event_id']}")


def _checkout_started(event: dict[str, Any], ctx: PlanContext, cur: str) -> VendorRequest:
    """checkout-started with the whole cart (SL guide: "it is important to include all product
    details"); checkout_id = the cart state's GUID (a new checkout of a changed cart is a new
    checkout; the same one re-sent is skipped); checkout_url = the page it started on, which
    the abandoned-checkout emails link back to."""
    ecom = c.ecommerce(event)
    cart = event.get("cart") or {}
    items = cart.get("items", ecom.get("items") or [])
    t = c.totals(ecom, items)
    body = c.compact({
        "checkout_id": cart.get("guid") or event["event_id"],
        **_contact(event),
        "status": "pending",  # the SL guide's checkout_started example
        "checkout_url": (event.get("page") or {}).get("location"),
        "subtotal": _number(t.subtotal, cur),
        "total_tax": _number(t.tax, cur),
        "total": _number(t.total, cur),
        "total_items": t.item_count,
        "currency": cur,
        "line_items": [_line(item, cur) for item in items],
    })
    return _post(ctx, "checkout-started", body, f"checkout-started:{body['checkout_id']}")


def _order_placed(event: dict[str, Any], ctx: PlanContext, cur: str) -> VendorRequest:
    """order-placed, shaped as the SL guide's "Example order event data".

    Where the guide and the spec differ, the guide's fields: ``total_tax`` (the spec has
    ``tax_lines``) and ``discounts`` as an object {discount_code, discount_value} (the spec an
    array of {code, value}). ``event``/``event_id``: the guide's dedup is on "the same
    combination of event and id"; the id is the order's own here, the order id + status for a
    status change (below), so a retry is skipped and a status change is not.
    """
    ecom = c.ecommerce(event)
    order = ecom["transaction_id"]
    items = c.order_items(event)
    t = c.totals(ecom, items)
    who = c.person(event)
    body = c.compact({
        "event": "order_placed",
        "event_id": order,
        "order_id": order,
        **_contact(event),
        "status": event.get("status") or c.DEFAULT_ORDER_STATUS,
        "subtotal": _number(t.subtotal, cur),
        "total_tax": _number(t.tax, cur),
        "total": _number(t.total, cur),  # "the total amount spent on a single order"
        "total_items": t.item_count,
        "currency": cur,
        "discounts": {"discount_code": ecom["coupon"], "discount_value": _number(t.discount, cur)}
        if ecom.get("coupon") else None,
        "line_items": [_line(item, cur) for item in items],
        "billing_address": event.get("billing_address"),  # onetag's keys are Sendlane's
        "shipping_address": event.get("shipping_address"),
        "customer_id": who.get("customer_id"),
        **_opted_in(event),
    })
    return _post(ctx, "order-placed", body, f"order-placed:{order}")


def _order_status(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """A status change: order-placed again with the new status (UNCONFIRMED: v2 has no path for
    fulfilled/cancelled/refunded orders, and the SL guide says a status change triggers
    order_fulfilled / order_cancelled / order_refunded; SL ref 6 calls this the fitting
    reading). Only what is known for sure: no totals or lines, since a refund's value is the
    refund's, and "changes made to the total after calculation will not be passed over"."""
    order = c.ecommerce(event)["transaction_id"]
    status = c.order_status(event)
    body = c.compact({"event": "order_placed", "event_id": f"{order}:{status}", "order_id": order,
                      **_contact(event), "status": status,
                      "customer_id": c.person(event).get("customer_id")})
    return _post(ctx, "order-placed", body, f"order-placed:{order}:{status}")


def _products(event: dict[str, Any], ctx: PlanContext, cur: str) -> list[VendorRequest]:
    """product-added, one per product. product_url and image_url are required (SL ref): a
    product without them is left out, since Sendlane would refuse it."""
    requests = []
    for index, item in enumerate(c.ecommerce(event)["items"]):
        if not (item.get("item_url") and item.get("image_url")):
            continue
        body = c.compact({
            "product_id": item["item_id"],
            "sku": item["item_id"],
            "product_name": item.get("item_name"),
            "item_price": _number(item.get("price_minor"), cur),
            "product_url": item["item_url"],
            "image_url": item["image_url"],
            "categories": item.get("categories") or None,
            "brand": item.get("item_brand"),
        })
        requests.append(_post(ctx, "product-added", body,
                              f"product-added:{event['event_id']}:{index}", needs_email=False))
    return requests
