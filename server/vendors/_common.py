"""Readers the four server adapters share: who an event is about, its order totals, times,
and the digests behind stable dedup keys. Pure, like the adapters.

Money stays integer minor units here; each adapter formats it the way its vendor wants with
``server.money`` (``cents``, ``major_number``, ``major_str``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

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
    bookkeeping keys (``id``, ``is_new``) left out."""
    merged = {key: value for key, value in (event.get("identity") or {}).items()
              if key not in ("id", "is_new") and value is not None}
    merged.update(compact(event.get("user") or {}))
    return merged


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
