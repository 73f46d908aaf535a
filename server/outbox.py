"""Delivery planning: which vendor requests an event implies, decided inside the ingest
transaction so an acknowledged event always has its deliveries recorded with it.

Pure: routing (``server/routing.py``) decides who delivers, each vendor's ``plan`` builds the
requests, and this module turns them into delivery rows with their starting state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from . import catalog, routing, trust
from .events import ORDER_STATUSES
from .vendors import VENDORS
from .vendors._base import PlanContext, VendorRequest
from .vendors._common import STATUS_EVENTS

# Row states (docs/architecture.md, "Delivery rows"). ``ignored``: onetag will not send it,
# and ``last_error`` says why (server/trust.py: a browser's claim it does not forward).
HELD, PENDING, DELIVERED, DEAD, BROWSER, EXPIRED, IGNORED = (
    "held", "pending", "delivered", "dead", "browser", "expired", "ignored")
IGNORED_SKIPPED = "skipped: "  # an ignored row the vendor could not take (VendorRequest.skipped)
HELD_WAITING = "waiting: "  # a held row waiting for a browser session (VendorRequest.waits)


@dataclass(frozen=True)
class PlannedDelivery:
    vendor: str
    dedup_key: str
    state: str
    visitor: str
    request: dict[str, Any]
    delay_ms: int = 0  # not due before this long after planning
    claim: bool = False  # planned from what a browser sent (server/trust.py), not a fact
    error: str | None = None  # why an ``ignored`` row is not sent
    event: Any = field(default=None, compare=False, repr=False)  # what it was planned from


def visitor_key(event: dict[str, Any]) -> str:
    """Deliveries for one visitor go out in order; this names the visitor."""
    if event.get("sc"):
        return f"sc:{event['sc']}"
    identity = event.get("identity") or event.get("user") or {}
    if identity.get("email"):
        return f"email:{identity['email']}"
    if identity.get("customer_id"):
        return f"customer:{identity['customer_id']}"
    return f"event:{event['event_id']}"


def has_email(event: dict[str, Any]) -> bool:
    return bool((event.get("identity") or {}).get("email"))


def order_key(vendor: str, event: Mapping[str, Any]) -> str | None:
    """The dedup key of the request that reported to ``vendor`` the order a status change
    (order_status, refund) names: the adapter's ``ORDER_KEY`` for its transaction_id. None
    for other events, and for a vendor whose status change does not repeat the order."""
    if event["name"] not in STATUS_EVENTS:
        return None
    template = getattr(VENDORS.get(vendor), "ORDER_KEY", "")
    order = (event.get("ecommerce") or {}).get("transaction_id")
    return template.format(order=order) if template and order else None


def order_update_keys(vendor: str, event: Mapping[str, Any]) -> list[str]:
    """The dedup keys of the requests that reported to ``vendor`` the status changes of the
    order a status change names, one a status of ``ORDER_STATUSES``: the adapter's
    ``ORDER_UPDATES_KEY`` (``PlanContext.order_updates``). Empty for other events and
    for a vendor that declares none."""
    if event["name"] not in STATUS_EVENTS:
        return []
    template = getattr(VENDORS.get(vendor), "ORDER_UPDATES_KEY", "")
    order = (event.get("ecommerce") or {}).get("transaction_id")
    if not template or not order:
        return []
    return [template.format(order=order, status=status) for status in ORDER_STATUSES]


def orders_wanted(site: Any, event: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(site id, vendor, dedup key) of each order request ``plan`` would hand an event's
    adapters (``PlanContext.order``, and ``order_updates``: ``order_update_keys``): what a
    store looks up before planning it."""
    wanted: list[tuple[str, str, str]] = []
    if event["name"] not in STATUS_EVENTS:  # most events: no vendor is asked
        return wanted
    for name in site.vendors:
        key = order_key(name, event)
        if key is not None:
            wanted.append((site.id, name, key))
            wanted.extend((site.id, name, update) for update in order_update_keys(name, event))
    return wanted


def catalog_prices_wanted(site: Any, event: dict[str, Any]) -> list[str]:
    """The item_ids whose catalog price the store adds to ``event`` before planning it
    (``catalog.add_prices``): its lines without a price, when an adapter the event is sent
    to requires one for this event (its ``CATALOG_PRICES``); else none, and no read."""
    for name, vendor in site.vendors.items():
        if (event["name"] in getattr(VENDORS[name], "CATALOG_PRICES", ())
                and routing.decide(vendor, event) == "send"):
            return catalog.priceless(event)
    return []


def unverified_sessions_wanted(site: Any, event: dict[str, Any]) -> bool:
    """Whether an adapter the event is planned for words what a request without the
    customer's session waits for from ``identity.unverified_sessions`` (its
    ``UNVERIFIED_SESSIONS``: eSputnik's): only then does a store add it
    (``store/rules.UNVERIFIED_SESSIONS``)."""
    return any(getattr(VENDORS[name], "UNVERIFIED_SESSIONS", False)
               and routing.decide(vendor, event) != "skip"
               for name, vendor in site.vendors.items())


# (site id, vendor, dedup key) -> the JSON body of the order request stored under that key
OrderBodies = Mapping[tuple[str, str, str], Mapping[str, Any]]


def plan(site: Any, event: dict[str, Any], vendors: Iterable[str] | None = None,
         browser_grace_ms: int = 0, orders: OrderBodies | None = None) -> list[PlannedDelivery]:
    """Delivery rows for one stored event (optionally only for some vendors).

    A backend event on a ``fallback`` route is one the page normally delivers itself (the
    thank-you page's purchase): its rows wait ``browser_grace_ms``, and if the browser's
    copy arrives meanwhile carrying the same fact, the store turns them into ``browser`` rows,
    never sent. Whichever copy comes first, the vendor counts the order once.

    What a browser sent is a claim (``server/trust.py``): what onetag's server must not
    forward for it is planned anyway, as ``ignored`` rows that say why.

    ``orders``: the order requests the store found for a status change (``orders_wanted``,
    ``store/rules.KnownOrders``); each vendor's adapter gets its own as ``PlanContext.order``.
    """
    rows: list[PlannedDelivery] = []
    visitor = visitor_key(event)
    claim = trust.is_claim(event)
    ignored = trust.ignore_reason(site, event)
    for name, vendor in site.vendors.items():
        if vendors is not None and name not in vendors:
            continue
        decision = routing.decide(vendor, event)
        if decision == "skip":
            continue
        key = order_key(name, event) if orders else None
        updates = []
        if key:
            for update in order_update_keys(name, event):
                body = orders.get((site.id, name, update))  # type: ignore[union-attr]
                if body is not None:
                    updates.append(body)
        context = PlanContext(site_id=site.id, vendor=vendor, currency=site.currency,
                              cart_url=site.cart_url,
                              order=orders.get((site.id, name, key)) if key else None,
                              order_updates=updates)
        delay = browser_grace_ms if (event["source"] == "backend"
                                     and vendor.route(event["name"]) == "fallback") else 0
        requests: list[VendorRequest] = VENDORS[name].plan(event, context)
        for request in requests:
            if decision == "browser":
                state = BROWSER
            elif ignored or request.skipped:
                state = IGNORED
            elif request.waits or (request.needs_email and not has_email(event)):
                state = HELD
            else:
                state = PENDING
            # A row the vendor can't take (``skipped``) never holds the key of a request
            # that can be sent (a later copy of the same fact that has what this one lacked).
            skipped_only = state == IGNORED and not ignored
            key = f"skipped:{request.dedup_key}" if skipped_only else request.dedup_key
            reason = ignored or (f"{IGNORED_SKIPPED}{request.skipped}" if skipped_only else None)
            if state == HELD and request.waits:
                reason = f"{HELD_WAITING}{request.waits}"
            rows.append(PlannedDelivery(name, key, state, visitor, request.to_row(),
                                        delay if state == PENDING else 0, claim,
                                        reason if state in (IGNORED, HELD) else None, event))
    return rows
