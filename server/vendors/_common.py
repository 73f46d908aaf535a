"""Readers the four server adapters share: who an event is about, its order totals, times,
and the digests behind stable dedup keys. Pure, like the adapters.

Money stays integer minor units here; each adapter formats it the way its vendor wants with
``server.money`` (``cents``, ``major_number``, ``major_str``).
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

# What a purchase is when nothing says otherwise: GA4 fires `purchase` once checkout has
# completed (the thank-you page); a backend may send its own `status`.
DEFAULT_ORDER_STATUS = "completed"

CART_EVENTS = frozenset({"add_to_cart", "remove_from_cart", "view_cart", "cart_updated",
                         "begin_checkout"})
STATUS_EVENTS = frozenset({"order_status", "refund"})


def compact(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without its None values (vendors take a missing key better than a null)."""
    return {key: value for key, value in fields.items() if value is not None}


def person(event: dict[str, Any]) -> dict[str, Any]:
    """Who the event is about: the session's identity after the event, with the event's own
    ``user`` fields on top (a backend event names its customer itself); onetag's own
    bookkeeping keys (``id``, ``is_new``, ``last_sc``, ``unverified_sessions``, ``created_ms``)
    left out."""
    merged = {key: value for key, value in (event.get("identity") or {}).items()
              if key not in _BOOKKEEPING and value is not None}
    merged.update(compact(event.get("user") or {}))
    return merged


_BOOKKEEPING = frozenset({"id", "is_new", "last_sc", "unverified_sessions", "created_ms"})


def known_since_ms(event: dict[str, Any]) -> int | None:
    """When the store first knew the person the event is about (their identity's creation,
    ``identity.created_ms``: the same on all their events); None when it does not say (an
    event stored before it kept this, or one of no identity)."""
    since = (event.get("identity") or {}).get("created_ms")
    return since if isinstance(since, int) and not isinstance(since, bool) else None


def event_ref(event: dict[str, Any]) -> str:
    """An event's id as a dedup key names it: ``<sc>/<event id>`` for an event of a browser
    session (the backend's naming one too), else the id alone. A browser's event id is its
    session's (docs/security.md): pages may set their own (``event_id: "purchase-5001"``),
    and a key of the id alone let one visitor's delivery hold the key of another's, whose
    row was then never made. The backend's copy of a page's event (its id, naming the
    page's sc) still meets the page's under one key (``rules.fact_meets_claim``).
    ``/`` is in neither an sc nor an event id."""
    sc = event.get("sc")
    return f"{sc}/{event['event_id']}" if sc else event["event_id"]


def full_name(who: dict[str, Any]) -> str | None:
    return " ".join(part for part in (who.get("first_name"), who.get("last_name")) if part) or None


def ecommerce(event: dict[str, Any]) -> dict[str, Any]:
    return event.get("ecommerce") or {}


def currency(event: dict[str, Any], site_currency: str) -> str:
    cart_currency = (event.get("cart") or {}).get("currency")
    return ecommerce(event).get("currency") or cart_currency or site_currency


def order_items(event: dict[str, Any]) -> list[dict[str, Any]]:
    """An order's lines: the event's own, else the cart it bought (the store hands a purchase
    the cart as bought)."""
    return ecommerce(event).get("items") or (event.get("cart") or {}).get("items") or []


def order_status(event: dict[str, Any]) -> str | None:
    """The status an order_status/refund event moves its order to."""
    if event["name"] == "refund":
        return event.get("status") or "refunded"
    return event.get("status")


def item_price_minor(item: dict[str, Any], currency: str) -> int | None:
    """An item's price in minor units: its own, else the product catalog's that the store
    added to a line without one (``catalog_price_minor`` in ``catalog_currency``:
    ``catalog.add_prices``) when that is in ``currency``; None when neither is known."""
    own = item.get("price_minor")
    if own is not None:
        return own
    if item.get("catalog_currency") == currency:
        return item.get("catalog_price_minor")
    return None


def refund_lines_ref(event: dict[str, Any]) -> str | None:
    """What names a partial refund (a ``refund`` whose ``ecommerce.items`` are the lines it
    refunds, GA4's partial refund): a digest of its lines (item, variant, quantity), the same
    for every copy of it; None for any other event, and for a refund of the whole order."""
    items = ecommerce(event).get("items") if event["name"] == "refund" else None
    if not items:
        return None
    return digest(sorted([i["item_id"], i.get("item_variant") or "", i["quantity"]]
                         for i in items))


def refund_is_partial(event: dict[str, Any], order_value_minor: int | None = None,
                      order_currency: str | None = None) -> bool:
    """Whether a ``refund`` returns only part of its order: it names the lines it refunds
    (GA4's refund: ``items`` for a partial refund, none for the whole order), or its value is
    below the order's (``order_value_minor`` in ``order_currency``: GA4's value, without tax
    and shipping, as the adapter knows the order it reported; not compared when unknown or
    in another currency). False for any other event."""
    if event["name"] != "refund":
        return False
    ecom = ecommerce(event)
    if ecom.get("items"):
        return True
    value = ecom.get("value_minor")
    same_currency = order_currency is None or ecom.get("currency") in (None, order_currency)
    return (value is not None and order_value_minor is not None and same_currency
            and value < order_value_minor)


def line_minor(item: dict[str, Any]) -> int:
    return (item.get("price_minor") or 0) * item["quantity"]


@dataclass(frozen=True)
class Totals:
    """An order's or cart's money, integer minor units."""

    subtotal: int  # sum of price x quantity
    discount: int  # positive: what GA4's value is below the subtotal
    tax: int
    shipping: int
    total: int  # what the customer pays: value + tax + shipping
    item_count: int  # sum of quantities


def totals(ecom: dict[str, Any], items: list[dict[str, Any]]) -> Totals:
    """GA4 semantics: ``value`` is the sum of price x quantity, after discounts, WITHOUT tax
    and shipping (GA4 reference, purchase.value: "Don't include shipping or tax"); when it is
    missing the lines' sum stands in."""
    subtotal = sum(line_minor(item) for item in items)
    value = ecom.get("value_minor")
    value = subtotal if value is None else value
    tax = ecom.get("tax_minor") or 0
    shipping = ecom.get("shipping_minor") or 0
    return Totals(subtotal=subtotal, discount=max(subtotal - value, 0), tax=tax,
                  shipping=shipping, total=value + tax + shipping,
                  item_count=sum(item["quantity"] for item in items))


def iso_time(ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 datetime with its timezone (UTC), to the second."""
    return datetime.fromtimestamp(ms // 1000, tz=timezone.utc).isoformat()


def json_text(value: Any) -> str:
    """A JSON-able value as compact JSON text, keys sorted (so equal values give equal text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (key order does not matter)."""
    return hashlib.sha256(json_text(value).encode()).hexdigest()[:16]


def join_url(base: str, path: str) -> str:
    """``base`` + ``/`` + ``path``, one slash between them; ``path`` keeps its own trailing
    slash (Rejoiner requires one)."""
    return f"{base.rstrip('/')}/{path.lstrip('/')}"


def sku(item: dict[str, Any]) -> str:
    """An item's SKU: ``item_sku`` (``sku`` on input; an onetag addition to GA4 items) when
    the shop gave one, else its ``item_id`` (GA4's item_id is "the SKU or id")."""
    return item.get("item_sku") or item["item_id"]


def line_id(item: dict[str, Any]) -> str:
    """A cart line's id where a vendor keys lines by product id alone (Rejoiner's
    ``product_id``): ``<item_id>:<item_variant>`` for a variant, so two variants of one item
    are two lines, not one overwriting the other; the bare ``item_id`` otherwise. Both paths
    (the browser adapter and the server's) use this rule."""
    variant = item.get("item_variant")
    return f"{item['item_id']}:{variant}" if variant else item["item_id"]


def cart_guid(event: dict[str, Any]) -> str | None:
    """The GUID of the cart state the event is about: the store's (the cart after the event,
    or the cart a purchase bought), else the one the browser sent with the event."""
    return (event.get("cart") or {}).get("guid") or event.get("cart_guid")


def session_sc(event: dict[str, Any]) -> str | None:
    """The visitor's sc cookie: the event's session, else (a backend event) the customer's
    latest session, which the store adds as ``identity.last_sc``."""
    return event.get("sc") or (event.get("identity") or {}).get("last_sc")


def cart_url(event: dict[str, Any], cart_template: str | None) -> str | None:
    """Where a returning visitor finds this cart: the event's ``ecommerce.cart_url``, else the
    site's ``cart_url`` template filled with the cart's GUID and the sc; None when neither is
    configured or the template names a value the event lacks."""
    given = ecommerce(event).get("cart_url")
    if given:
        return given
    if not cart_template:
        return None
    values = {"cart_guid": cart_guid(event), "sc": session_sc(event)}
    needed = {name for _, name, _, _ in string.Formatter().parse(cart_template) if name}
    if any(not values.get(name) for name in needed):
        return None
    return cart_template.format_map({k: quote(v or "", safe="") for k, v in values.items()})
