"""Visitor sessions: the ``sc`` cookie, and the pure rules for carts and identities.

The store applies these inside its ingest transaction; keeping them free of SQL lets the
SQLite and a later PostgreSQL backend share them, and lets tests check them directly.
"""

from __future__ import annotations

import uuid
from typing import Any

from .events import CART_DELTAS, CART_REPLACING, SC_RE

COOKIE_NAME = "sc"
COOKIE_MAX_AGE = 365 * 24 * 3600
IDENTITY_FIELDS = ("email", "customer_id", "first_name", "last_name", "phone", "accepts_marketing")


def new_sc() -> str:
    """An uppercase UUID, the form eSputnik's own ``sc`` cookie takes."""
    return str(uuid.uuid4()).upper()


def valid_sc(value: str | None) -> str | None:
    if value and SC_RE.fullmatch(value):
        return value.upper()
    return None


def cookie_header(sc: str, secure: bool) -> str:
    """Not HttpOnly: the runtime reads it when onetag is served from the shop's own host."""
    parts = [f"{COOKIE_NAME}={sc}", "Path=/", f"Max-Age={COOKIE_MAX_AGE}", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _line_key(item: dict[str, Any]) -> tuple[str, str]:
    return item["item_id"], item.get("item_variant") or ""


def apply_cart(cart: list[dict[str, Any]], event: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The session's cart after ``event``, or None when the event does not touch the cart.

    ``add_to_cart``/``remove_from_cart`` are deltas by item (quantity added or removed);
    ``view_cart``/``begin_checkout``/``cart_updated`` carry the whole cart and replace it;
    ``purchase`` empties it.
    """
    name = event["name"]
    if name == "purchase":
        return []
    items = (event.get("ecommerce") or {}).get("items") or []
    if name in CART_REPLACING:
        return [dict(item) for item in items if item["quantity"] > 0]
    if name not in CART_DELTAS:
        return None
    # ``cart``'s lines are never changed: a line that changes is copied first (the store
    # keeps the last cart between batches, and earlier events' snapshots share its lines).
    lines = {_line_key(item): item for item in cart}
    for item in items:
        key = _line_key(item)
        if name == "add_to_cart":
            if key in lines:
                line = lines[key] = dict(lines[key])
                line["quantity"] += item["quantity"]
                for field, value in item.items():  # a fresher price or name wins
                    if field != "quantity" and value not in (None, [], ""):
                        line[field] = value
            else:
                lines[key] = dict(item)
        elif key in lines:
            remaining = lines[key]["quantity"] - item["quantity"]
            if remaining > 0:
                lines[key] = {**lines[key], "quantity": remaining}
            else:
                del lines[key]
    return [line for line in lines.values() if line["quantity"] > 0]


def cart_snapshot(items: list[dict[str, Any]], currency: str,
                  guid: str | None, cart_id: str | None = None) -> dict[str, Any]:
    """A cart as events carry it: ``guid`` names this state of it, ``id`` the cart itself
    (the GUID of its first state: ``store/rules.cart_step``)."""
    value = sum((item.get("price_minor") or 0) * item["quantity"] for item in items)
    return {"currency": currency, "items": items, "value_minor": value,
            "item_count": sum(item["quantity"] for item in items), "guid": guid, "id": cart_id}


def identity_update(current: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
    """Identity fields after ``event``: its ``user`` fields win; consent events set consent.
    In ``IDENTITY_FIELDS`` order, as a stored row reads back (``rules.identity_fields``): the
    identity is copied into each event's stored JSON, which must not depend on whether the
    store had it cached or read it again."""
    merged = {k: v for k, v in (current or {}).items() if k in IDENTITY_FIELDS}
    for key, value in (event.get("user") or {}).items():
        if key in IDENTITY_FIELDS and value is not None:
            merged[key] = value
    if event["name"] == "unsubscribe":
        merged["accepts_marketing"] = False
    elif event["name"] == "opt_in":
        merged["accepts_marketing"] = True
    return {key: merged[key] for key in IDENTITY_FIELDS if key in merged}


CLAIMABLE_FIELDS = ("email", "first_name", "last_name", "phone")


def claimed_fields(user: dict[str, Any] | None) -> dict[str, Any]:
    """A new identity's fields from an unverified browser (docs/security.md): who they say
    they are, never marketing consent (which only the backend or a signed identify states)
    nor a customer id (which only the backend states)."""
    user = user or {}
    return {key: user[key] for key in CLAIMABLE_FIELDS if user.get(key)}  # (in field order)
