"""Remarkety, server side: its inbound webhooks (CONTRACT.md section 7, column "Remarkety
webhook").

Sources: Remarkety's "Integrating custom platforms with Remarkety" ("RM guide"), REFERENCE.md
sections 2.3 and 6 ("RM ref"), and the event reference it digests (Remarkety's built-in events
reference, "RM events": the JSON and mandatory fields of each event type).

- ``POST {webhook_url}`` (default ``https://webhooks.remarkety.com/webhooks/?storeId=...``,
  the form the vendor's own connector uses: RM ref 6), the raw event JSON as the body, the
  event type in ``x-event-type``, and ``x-event-time`` (UNIX seconds: "for events that happened
  in the past", which a held or retried request is). The store API key goes in ``x-token``,
  added at send time by ``auth_headers``.
- Money is JSON decimals in major units (``money.major_number``: 4.35 goes out as 4.35).
- Retries: the RM guide ("Important note about retrying webhooks") asks for a retry whenever
  the endpoint "does not respond with HTTP 200 status code", so ``RETRY_ANY_NON_2XX``: every
  non-2xx answer is retried with the usual backoff and attempt cap, a 401/403 too (shown as
  a key problem in ``onetag deliveries``).
- Remarkety keys customers, carts and orders by email (``customer.email`` is mandatory on an
  order; a cart is worth nothing to it without one), so those requests ``needs_email``.

Routing defaults (``DEFAULT_ROUTES``):

    identify         both      setCustomer in the page identifies the visitor to track.js;
                               the server's customers/create|update stores the profile
    view_item, view_item_list, search
                     browser   productView, track categoryView / siteSearch; no webhook
    add_to_cart, remove_from_cart, view_cart, cart_updated, begin_checkout
                     both      the page's track carts/update and the server's carts/update
                               carry the same cart under the same id (the cart's), so a
                               second copy updates the cart, it does not add one. The server
                               copy is what makes carts reliable: Remarkety drops client-side
                               events of unidentified visitors, and the outbox holds the
                               session's carts until it has an email, then sends them
    purchase         server    orders/create; the page has no purchase call at all, so one
                               order is one webhook (keyed "orders/create:<order id>"; a
                               browser's copy is a claim: the backend's fact replaces it, as
                               orders/update where it was sent differently, docs/mapping.md)
    order_status, refund
                     server    orders/update: the order as orders/create sent it (lines,
                               totals, created_at), with the new status on top (a partial
                               refund: the latest status onetag sent, ORDER_UPDATES_KEY)
    product_updated  server    products/update, one per product
    unsubscribe, opt_in
                     server    newsletter/unsubscribe; customers/update accepts_marketing=true
    "*"              browser   track <name> in the page (section 6); section 7 has no
                               server-side custom event for Remarkety
    page_view, add_to_wishlist
                     off       no Remarkety call exists for these
"""

from __future__ import annotations

from typing import Any

from .. import money
from . import _common as c
from ._base import PlanContext, Setting, VendorConfig, VendorRequest

NAME = "remarkety"

SETTINGS = (
    Setting("store_id", required=True, public=True,
            help="Store ID (Remarkety: Settings > API Keys): the page's setStoreKey"),
    Setting("api_key", secret=True, server_auth=True,
            help="store API key, sent as the x-token header; needed for every webhook"),
    Setting("script_url", url=True, public=True,
            default="https://d3ryumxhbd2uw7.cloudfront.net/webtracking/track.js",
            help="track.js"),
    Setting("webhook_url", url=True, default="https://webhooks.remarkety.com/webhooks/?storeId={store_id}",
            help="where server-side events are POSTed"),
)

# RM guide, "Important note about retrying webhooks": re-send whenever "Remarkety's endpoint
# does not respond with HTTP 200 status code" (read by the forwarder).
RETRY_ANY_NON_2XX = True

# The order a status change repeats (orders/update is orders/create's format): the store
# hands ``_order_updated`` the body stored under this key (``PlanContext.order``).
ORDER_KEY = "orders/create:{order}"
# ... and the key of its status changes (``_order_updated``'s, one a status), whose bodies
# the store hands it too (``PlanContext.order_updates``): a partial refund repeats the
# latest status.
ORDER_UPDATES_KEY = "orders/update:{order}:{status}"

DEFAULT_ROUTES = {
    "page_view": "off",
    "identify": "both",
    "view_item": "browser",
    "view_item_list": "browser",
    "search": "browser",
    "add_to_cart": "both",
    "remove_from_cart": "both",
    "view_cart": "both",
    "cart_updated": "both",
    "begin_checkout": "both",
    "purchase": "server",
    "refund": "server",
    "order_status": "server",
    "add_to_wishlist": "off",
    "product_updated": "server",
    "unsubscribe": "server",
    "opt_in": "server",
    "*": "browser",
}


def auth_headers(cfg: VendorConfig) -> dict[str, str]:
    key = cfg.get("api_key")
    return {"x-token": key} if key else {}


def plan(event: dict[str, Any], ctx: PlanContext) -> list[VendorRequest]:
    name = event["name"]
    if name == "identify":
        return [_customer(event, ctx)]
    if name in c.CART_EVENTS:
        return [_cart(event, ctx)] if event.get("cart") else []
    if name == "purchase":
        return _order_created(event, ctx)
    if name in c.STATUS_EVENTS:
        return [_order_updated(event, ctx)]
    if name == "product_updated":
        return _products(event, ctx)
    if name == "unsubscribe":
        # RM events newsletter/unsubscribe: {email}; adds it to the suppression list.
        return [_webhook(ctx, event, "newsletter/unsubscribe", _email_only(event),
                         f"newsletter/unsubscribe:{c.event_ref(event)}", needs_email=True)]
    if name == "opt_in":
        # Section 7: opt_in is customers/update. Not newsletter/subscribe, which sends the
        # customer an opt-in confirmation (RM events) for consent the shop already has.
        body = {**_email_only(event), "accepts_marketing": True}
        return [_webhook(ctx, event, "customers/update", body,
                         f"customers/update:{c.event_ref(event)}", needs_email=True)]
    return []


def _webhook(ctx: PlanContext, event: dict[str, Any], event_type: str, body: dict[str, Any],
             key: str, needs_email: bool) -> VendorRequest:
    headers = {"x-event-type": event_type, "x-event-time": str(event["time_ms"] // 1000)}
    return VendorRequest("POST", ctx.vendor["webhook_url"], body, key, needs_email=needs_email,
                         headers=headers)


def _email_only(event: dict[str, Any]) -> dict[str, Any]:
    return c.compact({"email": c.person(event).get("email")})


def _customer_fields(who: dict[str, Any]) -> dict[str, Any]:
    """RM events customers/create: email (mandatory), id (so an email change is matched),
    names, accepts_marketing, default_address.phone (the only place it has a phone)."""
    return c.compact({
        "email": who.get("email"),
        "id": who.get("customer_id"),
        "first_name": who.get("first_name"),
        "last_name": who.get("last_name"),
        "accepts_marketing": who.get("accepts_marketing"),
        "default_address": {"phone": who["phone"]} if who.get("phone") else None,
    })


def _customer(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """customers/create when this identify created the identity, else customers/update.

    accepts_marketing is left out when unknown: on an update a null would erase a known
    choice (RM events: null means "unknown"). Keyed by type + email + a digest of the fields
    (not the timestamp), so an identical profile is not sent again.
    """
    who = c.person(event)
    fields = _customer_fields(who)
    is_new = (event.get("identity") or {}).get("is_new")
    event_type = "customers/create" if is_new else "customers/update"
    since = c.known_since_ms(event)  # created_at as the customer's orders and carts say it
    body = {**fields, **({"created_at": c.iso_time(since)} if since is not None else {}),
            "updated_at": c.iso_time(event["time_ms"])}
    key = f"{event_type}:{who.get('email', '')}:{c.digest(fields)}"
    return _webhook(ctx, event, event_type, body, key, needs_email=True)


def _order_customer(event: dict[str, Any]) -> dict[str, Any] | None:
    """The ``customer`` object of an order or cart. accepts_marketing, created_at and
    updated_at are mandatory on an order (RM events orders/create). ``created_at`` is when
    the customer was created, so one value on all their orders and carts: when the store
    first knew them (``_common.known_since_ms``: their identity's creation; the event's own
    time only for an event stored without it). ``updated_at`` is the event's. An unknown
    consent is null ("null for unknown", RM guide)."""
    who = c.person(event)
    if not who.get("email"):
        return None
    when = c.iso_time(event["time_ms"])
    since = c.known_since_ms(event)
    return {**_customer_fields(who), "accepts_marketing": who.get("accepts_marketing"),
            "created_at": c.iso_time(since) if since is not None else when, "updated_at": when}


def _line_item(item: dict[str, Any], cur: str) -> dict[str, Any]:
    """RM events line_items[]: product_id, quantity, sku, name, url, image, price are the
    mandatory ones; GA4's item_id is the SKU, and must match the products feed (RM guide)."""
    price = item.get("price_minor")
    return c.compact({
        "product_id": item["item_id"],
        "sku": c.sku(item),
        "name": item.get("item_name"),
        "title": item.get("item_name"),
        "variant_title": item.get("item_variant"),
        "vendor": item.get("item_brand"),
        "quantity": item["quantity"],
        "price": money.major_number(price, cur) if price is not None else None,
        "url": item.get("item_url"),
        "image": item.get("image_url"),
    })


def _cart(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """carts/update with the session's whole cart.

    Always carts/update, never carts/create: it is what the RM guide tells a custom platform
    to send on every cart change ("When the customer is viewing the cart screen, adding/
    removing a product ... _rmData.push(['track', 'carts/update', data])"), so Remarkety takes
    it for a cart it has not seen. ``id`` is the cart's (``rules.cart_step``: the GUID of
    its first state), stable across its updates as RM events requires ("keep the same id so
    that carts don't get duplicated"), new for the cart after a purchase, and the id the
    browser adapter sends (the runtime makes that first GUID). Keyed by the cart state's
    guid: one state, one webhook.
    """
    cart = event["cart"]
    cur = cart.get("currency") or c.currency(event, ctx.currency)
    who = c.person(event)
    when = c.iso_time(event["time_ms"])
    value = money.major_number(cart["value_minor"], cur)
    body = {
        # The cart's own id (the store's: the GUID of its first state), not the visitor's:
        # the sc lasts a year, and a cart after a purchase is another cart. "keep the same
        # id so that carts don't get duplicated" (RM events, carts/create). The sc only for
        # a cart event stored before carts had ids.
        "id": cart.get("id") or event["sc"],
        # "This URL should lead to the cart contents": the cart's URL (the event's
        # ecommerce.cart_url, else the site's cart_url template), else the page the cart
        # changed on (the cart or checkout page for view_cart / begin_checkout).
        "abandoned_checkout_url": (c.cart_url(event, ctx.cart_url)
                                   or (event.get("page") or {}).get("location")),
        "accepts_marketing": who.get("accepts_marketing"),
        # Mandatory; onetag does not keep when a cart began, so this state's time.
        "created_at": when,
        "updated_at": when,  # "Very important for timing the emails"
        "currency": cur,
        "customer": _order_customer(event),
        "email": who.get("email"),
        "line_items": [_line_item(item, cur) for item in cart["items"]],
        "subtotal_price": value,
        "total_discounts": 0,
        "total_price": value,
    }
    return _webhook(ctx, event, "carts/update", body, f"carts/update:{cart['guid']}",
                    needs_email=True)


def _order_created(event: dict[str, Any], ctx: PlanContext) -> list[VendorRequest]:
    """orders/create with every mandatory field of RM events.

    No carts/delete: it is not among the event types the vendor documents (REFERENCE.md 2.3:
    carts/create, carts/update only), and an undocumented type risks a 400 on every order.
    Remarkety matches the order to the cart's customer, which ends the abandonment flow.
    """
    ecom = c.ecommerce(event)
    order = ecom["transaction_id"]
    cur = c.currency(event, ctx.currency)
    items = c.order_items(event)
    t = c.totals(ecom, items)
    status = event.get("status") or c.DEFAULT_ORDER_STATUS
    who = c.person(event)
    when = c.iso_time(event["time_ms"])
    body = c.compact({
        "id": order,
        "created_at": when,
        "updated_at": when,
        "currency": cur,
        "email": who.get("email"),
        "customer": _order_customer(event),
        "line_items": [_line_item(item, cur) for item in items],
        "status": {"code": status, "name": status},
        "subtotal_price": money.major_number(t.subtotal, cur),
        "total_discounts": money.major_number(t.discount, cur),  # "a positive number"
        "total_shipping": money.major_number(t.shipping, cur),
        "total_tax": money.major_number(t.tax, cur),
        "total_price": money.major_number(t.total, cur),
        "discount_codes": [{"code": ecom["coupon"], "amount": money.major_number(t.discount, cur),
                            "type": "fixed_amount"}] if ecom.get("coupon") else None,
    })
    return [_webhook(ctx, event, "orders/create", body, f"orders/create:{order}",
                     needs_email=True)]


def _order_updated(event: dict[str, Any], ctx: PlanContext) -> VendorRequest:
    """orders/update: the order as onetag sent it in orders/create, with the new status,
    updated_at and the customer as the status event knows them on top.

    RM events gives orders/update "the same format as orders/create", whose mandatory fields
    include the lines, the totals and created_at; it does not say whether a partial update
    is accepted. An order_status event carries only the order id and status, and a refund's
    value and items are the refund's, not the order's: sent as the order's totals they would
    overwrite its revenue. So the lines, totals, currency and created_at are those of the
    order's orders/create body, which the store looks up (``ORDER_KEY``,
    ``PlanContext.order``), never the status event's. When no orders/create was ever planned
    for the order (the store never saw the purchase), only what is known for sure is sent
    (id, updated_at, status, customer) and Remarkety keeps the lines and totals it has.

    Refunds (``_refund_state``): a refund of the whole order sets ``status`` refunded and
    ``financial_status`` refunded; a partial refund sets ``financial_status``
    partially_refunded, under a key of its own per refund, and repeats the order's latest
    status as onetag reported it (``_latest_status``): ``status.name`` is mandatory on an
    order (RM events), and the status the order was created with would undo a later
    fulfilment.
    """
    ecom = c.ecommerce(event)
    order = ecom["transaction_id"]
    status = c.order_status(event)
    who = c.person(event)
    partial = c.refund_is_partial(event, *_order_value(ctx.order))
    body = c.compact({
        "id": order,
        "updated_at": c.iso_time(event["time_ms"]),
        "email": who.get("email"),
        "customer": _order_customer(event),
        "status": _latest_status(order, ctx) if partial else {"code": status, "name": status},
        "financial_status": _refund_state(status, partial),
    })
    if ctx.order:
        known = ctx.order.get("customer")
        if isinstance(known, dict) and "customer" in body:
            # The customer as the status event knows them, first seen when the order was.
            body["customer"] = {**body["customer"],
                                "created_at": known.get("created_at",
                                                        body["customer"]["created_at"])}
        body = {**ctx.order, **body}
    key = f"orders/update:{order}:{status}"
    if partial:
        key = f"orders/update:{order}:{PARTIALLY_REFUNDED}:{c.event_ref(event)}"
    return _webhook(ctx, event, "orders/update", body, key, needs_email=True)


PARTIALLY_REFUNDED = "partially_refunded"


def _latest_status(order: Any, ctx: PlanContext) -> dict[str, Any] | None:
    """The ``status`` object of the order as onetag last reported it to Remarkety: that of
    its latest status change (``PlanContext.order_updates``: the one with the latest
    ``updated_at``, the status event's time, as the Remarkety orders export orders them),
    else that of its orders/create (``PlanContext.order``); None for an order onetag never
    reported, which then goes without one, as before."""
    latest: str | None = None
    found = None
    for update in ctx.order_updates:
        status = update.get("status")
        if (str(update.get("id")) != str(order) or not isinstance(status, dict)
                or not status.get("name")):
            continue
        when = str(update.get("updated_at") or "")
        if latest is None or when > latest:
            latest, found = when, status
    if found is None and ctx.order:
        created = ctx.order.get("status")
        found = created if isinstance(created, dict) and created.get("name") else None
    return dict(found) if found is not None else None


def _refund_state(status: str | None, partial: bool) -> dict[str, str] | None:
    """``financial_status`` of an orders/update: what a refund did to the order's money.

    RM events' order JSON has two status objects, ``status`` {code, name} (the order's; its
    name mandatory) and ``financial_status`` {code, name}, and lists no fixed vocabulary for
    either: the platform's own codes go there (Remarkety's Magento connector sends the
    store's status code and label). A partial refund does not refund the order: its
    ``status`` is the order's latest as onetag reported it (``_latest_status``; the status
    the order was created with would undo a later fulfilment, and none at all would leave
    out a mandatory field) and its ``financial_status`` says partially_refunded
    (UNCONFIRMED, chosen: the code Shopify's order JSON, whose field names Remarkety's
    order JSON reuses, gives a partially refunded order); a refund of the whole order (or an
    order_status refunded) says refunded in both. None for other statuses.
    """
    if partial:
        return {"code": PARTIALLY_REFUNDED, "name": PARTIALLY_REFUNDED}
    if status == "refunded":
        return {"code": "refunded", "name": "refunded"}
    return None


def _order_value(created: Any) -> tuple[int | None, str | None]:
    """The order's value (GA4's: after discounts, without tax and shipping) in minor units
    and its currency, from the orders/create body this adapter sent: ``subtotal_price`` less
    ``total_discounts``; (None, None) for an order never seen."""
    if not created or created.get("subtotal_price") is None or not created.get("currency"):
        return None, None
    cur = created["currency"]
    return (money.to_minor(str(created["subtotal_price"]), cur)
            - money.to_minor(str(created.get("total_discounts") or 0), cur), cur)


def _products(event: dict[str, Any], ctx: PlanContext) -> list[VendorRequest]:
    """products/update, one webhook per product (RM events products/create shape).

    UNCONFIRMED gaps, filled the least harmful way: ``created_at`` (mandatory, "the time this
    product was created") is not known and is left out rather than moved to today on every
    update; ``inventory_quantity`` is sent only as 0 for a product out of stock, since onetag
    knows availability, not counts; ``product_exists`` is true (out of stock is still for
    sale; only a deletion would be false, and the vocabulary has none).
    """
    cur = c.currency(event, ctx.currency)
    when = c.iso_time(event["time_ms"])
    requests = []
    for index, item in enumerate(c.ecommerce(event).get("items") or []):
        image = item.get("image_url")
        price = item.get("price_minor")
        variant = c.compact({
            "id": item["item_id"],
            "product_id": item["item_id"],
            "sku": c.sku(item),
            "title": item.get("item_variant") or item.get("item_name"),
            "price": money.major_number(price, cur) if price is not None else None,
            "currency": cur,
            "image": image,
            "inventory_quantity": 0 if item.get("in_stock") is False else None,
        })
        body = c.compact({
            "id": item["item_id"],
            "sku": c.sku(item),
            "title": item.get("item_name"),
            "body_html": item.get("description"),
            "url": item.get("item_url"),
            "image": {"src": image} if image else None,
            "images": [{"src": image}] if image else None,
            "vendor": item.get("item_brand"),
            "categories": [{"name": name} for name in item.get("categories") or []] or None,
            "product_exists": True,
            "updated_at": when,
            "variants": [variant],
        })
        requests.append(_webhook(ctx, event, "products/update", body,
                                 f"products/update:{c.event_ref(event)}:{index}", needs_email=False))
    return requests
