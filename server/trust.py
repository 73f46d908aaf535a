"""Browser events are claims, backend events are facts (docs/security.md).

Anyone can post to ``POST /e``: what a browser says is what someone claims, and only the
backend (holding the site's ``api_key``) states facts. A page can lift one browser identity
to near-backend trust by signing it: ``user.signature = hex(HMAC-SHA256(identity_secret,
normalised email))``, computed by the store's server for its signed-in customer. Pure rules,
used by ``events`` (the signature), the store (identities) and ``outbox`` (deliveries).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Mapping

BROWSER, BACKEND, VERIFIED = "browser", "backend", "verified browser"
SOURCES = (BROWSER, BACKEND, VERIFIED)
ORDER_EVENTS = frozenset({"purchase", "refund", "order_status"})
CONSENT_EVENTS = frozenset({"unsubscribe", "opt_in"})
SIGNATURE_RE = re.compile(r"^[0-9A-Fa-f]{64}$")


def signature(secret: str, email: str) -> str:
    """What a store's page puts in ``user.signature`` for ``email`` (lower-cased, trimmed)."""
    return hmac.new(secret.encode(), email.strip().lower().encode(), hashlib.sha256).hexdigest()


def signature_valid(secret: str, email: str, sent: str) -> bool:
    """In constant time: a timing difference must not tell how much of a guess was right."""
    return hmac.compare_digest(signature(secret, email), sent.lower())


def trusted(event: Mapping[str, Any]) -> bool:
    """Whether an event may change who someone is or what they consented to."""
    return event["source"] != BROWSER


def is_claim(event: Mapping[str, Any]) -> bool:
    """Rows planned from what a browser sent, verified or not: never a backend fact."""
    return event["source"] != BACKEND


def ignore_reason(site: Any, event: Mapping[str, Any]) -> str | None:
    """Why onetag's server must not forward ``event`` to any vendor, or None.

    Only the server side: what a vendor's own library did in the page is the page's doing.
    """
    name, source = event["name"], event["source"]
    if source == BACKEND:
        return None
    if name in ORDER_EVENTS and site.order_source == "backend":
        return (f"unverified: {name} from a browser; this site's orders come from its backend "
                "(order_source = \"backend\")")
    if source == VERIFIED:
        return None
    if name in CONSENT_EVENTS:
        return f"unverified: {name} needs the backend or a verified identity (user.signature)"
    if name == "identify" and not (event.get("identity") or {}).get("is_new"):
        return ("unverified: the profile of a known email is changed only by the backend or a "
                "verified identify")
    return None


# Facts meeting claims ---------------------------------------------------------------------

_VOLATILE = frozenset({"updated_at", "created_at", "datetime", "time"})


def fact_fingerprint(event: Mapping[str, Any], request: Mapping[str, Any]) -> Any:
    """What must be equal for a browser's claim and a backend fact under one dedup key to be
    the same fact. An order: its id, customer email, value and currency (a page and a
    backend describe one order with different incidental fields: addresses, times, item
    names). Anything else: the request itself, without timestamps."""
    if event["name"] in ORDER_EVENTS:
        ecommerce = event.get("ecommerce") or {}
        who = {**(event.get("identity") or {}), **(event.get("user") or {})}
        return ("order", event["name"] if event["name"] == "purchase" else "status",
                ecommerce.get("transaction_id"), who.get("email"), ecommerce.get("value_minor"),
                ecommerce.get("currency"), event.get("status"))
    return ("request", request.get("method"), request.get("url"), _strip(request.get("json")))


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def correction(vendor: str, request: dict[str, Any]) -> dict[str, Any]:
    """The backend's version of a fact a browser claim already delivered differently: what
    replaces the claim at the vendor (docs/mapping.md, "When a backend fact meets a browser
    claim"). Remarkety: the ``/update`` event type of the same webhook (orders/update for
    orders/create); Sendlane: the same call under a new ``event_id``, since Sendlane records
    only the first call with one event and id. Rejoiner and eSputnik have no update call:
    the request as planned (a convert or PurchasedItems for the real customer)."""
    request = dict(request)
    if vendor == "remarkety":
        headers = dict(request.get("headers") or {})
        event_type = headers.get("x-event-type", "")
        if event_type.endswith("/create"):
            headers["x-event-type"] = event_type[:-len("/create")] + "/update"
        request["headers"] = headers
    elif vendor == "sendlane" and isinstance(request.get("json"), dict) \
            and request["json"].get("event_id") is not None:
        request["json"] = {**request["json"],
                           "event_id": f"{request['json']['event_id']}:backend"}
    return request
