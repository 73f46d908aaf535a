"""Writes the "Server side" section of docs/mapping.md from the server adapters themselves.

    python docs/gen_server_mapping.py          # rewrite the section in place
    python docs/gen_server_mapping.py --check  # exit 1 when the section is out of date

Every request in the section is the real output of ``server/vendors/<vendor>.py`` ``plan()``
for one example storefront story (below), configured by the example config that ``onetag
init`` writes, with each secret shown as its setting's name (``<api_key>``). Routing
decisions and row states come from ``server/routing.py`` and ``server/outbox.py``.
``tests/vendors/test_mapping_doc.py`` regenerates the section and parses its JSON blocks, so
a code change that changes a request fails until the doc is regenerated.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import textwrap
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server import config as config_module  # noqa: E402
from server import outbox, routing, trust  # noqa: E402
from server.cli import EXAMPLE_CONFIG  # noqa: E402
from server.store import rules  # noqa: E402
from server.vendors import VENDORS  # noqa: E402
from server.vendors._base import PlanContext, VendorConfig, VendorRequest  # noqa: E402
from server.vendors._common import iso_time  # noqa: E402

DOC = ROOT / "docs" / "mapping.md"
HEADING = "## Server side"
TITLES = {"rejoiner": "Rejoiner", "remarkety": "Remarkety", "esputnik": "eSputnik",
          "sendlane": "Sendlane"}

# --- the example storefront ------------------------------------------------------------

T0 = 1764000000000  # 2025-11-24T16:00:00Z
MINUTE, DAY = 60_000, 86_400_000
SC = "CDA68358-94FB-4D83-9655-3FEB3C4114A3"  # the session's sc cookie (eSputnik's own name)
GUID = "6F9619FF-8B86-D011-B42D-00CF4FC964FF"  # the cart state after the notebooks were added
# The cart's own id: the GUID of its first state (when the pen went in; store/rules.cart_step).
CART_ID = "1A2B3C4D-5E6F-4A1B-8C2D-3E4F5A6B7C8D"
SHOP = "https://shop.example"
EMAIL = "jimmy@example.com"
LOADED = ["rejoiner", "remarkety"]  # an ad blocker stopped eS.js and pusher.js on this visit
# The site's cart_url (commented out in the example config: a shop sets its own).
CART_URL = f"{SHOP}/cart/restore?guid={{cart_guid}}"

PEN = {"item_id": "SKU-435", "item_name": "Gel pen", "item_variant": "blue", "price_minor": 435,
       "quantity": 1, "categories": ["Stationery", "Pens"], "item_url": f"{SHOP}/p/gel-pen",
       "image_url": f"{SHOP}/i/gel-pen.jpg", "in_stock": True}
CLIP = {"item_id": "SKU-057", "item_name": "Paper clip", "price_minor": 57, "quantity": 1,
        "categories": ["Stationery"], "item_url": f"{SHOP}/p/paper-clip",
        "image_url": f"{SHOP}/i/paper-clip.jpg", "in_stock": True}
NOTEBOOK = {"item_id": "SKU-1999", "item_name": "Notebook", "item_sku": "NB-A5-DOT",
            "price_minor": 1999, "quantity": 1,
            "categories": ["Stationery", "Notebooks"], "item_brand": "Acme",
            "item_url": f"{SHOP}/p/notebook", "image_url": f"{SHOP}/i/notebook.jpg",
            "description": "A5 dotted notebook", "in_stock": True}
NOTEBOOKS = {**NOTEBOOK, "quantity": 3}
CART_ITEMS = [PEN, CLIP, NOTEBOOKS]  # 4.35 + 0.57 + 3 x 19.99 = 64.89

USER = {"email": EMAIL, "customer_id": "42", "first_name": "Jimmy", "last_name": "Kim",
        "phone": "+18885552664", "accepts_marketing": True}
IDENTITY = {**USER, "id": 7, "is_new": False}  # the session's identity once Jimmy signed in
BILLING = {"first_name": "Jimmy", "last_name": "Kim", "email": EMAIL,
           "address_1": "10620 Treena St", "city": "San Diego", "state_code": "CA",
           "country_code": "US", "postal_code": "92131", "phone": "+18885552664"}


@dataclass(frozen=True)
class Step:
    id: str  # the marker name: <!-- server: <vendor> <id> -->
    row: str  # CONTRACT.md section 7 trigger row ("" beyond section 7)
    title: str
    story: str  # one sentence: what happened, what onetag received
    event: dict[str, Any]


def _ecommerce(items: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    out = {"currency": "USD", "value_minor": None, "tax_minor": None, "shipping_minor": None,
           "transaction_id": None, "coupon": None, "item_list_id": None,
           "item_list_name": None, "items": [dict(item) for item in items]}
    out.update(fields)
    return out


def _cart(guid: str = GUID) -> dict[str, Any]:
    return {"currency": "USD", "items": [dict(item) for item in CART_ITEMS],
            "value_minor": sum(i["price_minor"] * i["quantity"] for i in CART_ITEMS),
            "item_count": sum(i["quantity"] for i in CART_ITEMS), "guid": guid, "id": CART_ID}


def _event(step_id: str, name: str, minutes: int, *, source: str = "browser",
           page: str | None = None, title: str | None = None, user: dict | None = None,
           ecommerce: dict | None = None, cart: dict | None = None,
           identity: dict[str, Any] | None = IDENTITY, **fields: Any) -> dict[str, Any]:
    """A normalised event as server/events.py + the store hand it to the adapters
    (docs/architecture.md, "The normalised event")."""
    browser = source == "browser"
    if not browser and identity is not None:
        # What the store adds to a backend event of a customer seen in a browser: the sc of
        # his latest session (eSputnik's cookies.sc; server/store/sqlite_ingest.py).
        identity = {"last_sc": SC, **identity}
    time_ms = T0 + minutes * MINUTE
    event = {
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{SHOP}/onetag-doc/{step_id}")),
        "name": name, "source": source, "site_id": "shop1", "time_ms": time_ms,
        "received_ms": time_ms + 123, "sc": SC if browser else None,
        "page": {"location": f"{SHOP}{page}", "referrer": None, "title": title}
        if browser and page else None,
        "user": user, "ecommerce": ecommerce, "search_term": None, "status": None,
        "billing_address": None, "shipping_address": None, "properties": {},
        "loaded": list(LOADED) if browser else [], "cart": cart,
        "identity": identity, "cart_guid": None,
    }
    event.update(fields)
    return event


def scenario() -> list[Step]:
    """Jimmy's visit and what followed, in order: one product, one customer, order 1001."""
    order = _ecommerce(CART_ITEMS, transaction_id="1001", coupon="SAVE5",
                       value_minor=5989, tax_minor=479, shipping_minor=499)
    status = _ecommerce([], transaction_id="1001")
    return [
        Step("identify", "identify / backend customer", "Jimmy signs in",
             "A first sign-in: `identify` with his profile and billing address; onetag "
             "creates his identity (`is_new`). A backend `identify` plans the same requests; "
             "eSputnik's `cookies.sc` is then the sc of his latest session (for a customer never "
             "seen in a browser, CustomerData, like any eSputnik request, is recorded as "
             "`ignored`, not sent).",
             _event("identify", "identify", 0, page="/account", title="Account",
                    user=dict(USER), identity={**IDENTITY, "is_new": True},
                    billing_address=dict(BILLING))),
        Step("view_item_list", "view_item / view_item_list when the vendor's library failed",
             "He opens the notebooks category",
             "`view_item_list` with `item_list_id: \"notebooks\"`.",
             _event("view_item_list", "view_item_list", 1, page="/c/notebooks",
                    title="Notebooks", ecommerce=_ecommerce(
                        [NOTEBOOK], item_list_id="notebooks", item_list_name="Notebooks"))),
        Step("view_item", "view_item / view_item_list when the vendor's library failed",
             "He views the notebook", "`view_item` of the notebook, 19.99.",
             _event("view_item", "view_item", 2, page="/p/notebook", title="Notebook",
                    ecommerce=_ecommerce([NOTEBOOK], value_minor=1999))),
        Step("add_to_cart", "cart of an identified session changed",
             "He adds three notebooks",
             "`add_to_cart` of 3 notebooks to a cart already holding the blue pen (4.35) and "
             "the clip (0.57). The page names the new cart state with its `cart_guid` "
             f"`{GUID}` (the GUID eS.js would have sent); the store adopts it and hands the "
             "adapters the whole cart after the add (64.89) under that GUID, and under the "
             f"cart's own id `{CART_ID}`, the GUID of its first state (when the pen went in), "
             "kept across its states until a purchase closes it.",
             _event("add_to_cart", "add_to_cart", 3, page="/p/notebook", title="Notebook",
                    ecommerce=_ecommerce([NOTEBOOKS], value_minor=5997), cart=_cart(),
                    cart_guid=GUID)),
        Step("begin_checkout", "cart of an identified session changed",
             "He starts checkout",
             "`begin_checkout` with the same three lines: the cart's content did not change, "
             "so neither did its GUID.",
             _event("begin_checkout", "begin_checkout", 4, page="/checkout", title="Checkout",
                    ecommerce=_ecommerce(CART_ITEMS, value_minor=6489), cart=_cart(),
                    cart_guid=GUID)),
        Step("purchase", "purchase", "He places order 1001",
             "`purchase` on the thank-you page: coupon SAVE5 (5.00 off), value 59.89, tax 4.79, "
             "shipping 4.99; the store adds the cart as bought, under the GUID of its last "
             f"state. Its `loaded` is `{json.dumps(LOADED)}`.",
             _event("purchase", "purchase", 5, page="/thank-you", title="Thank you",
                    ecommerce=order, cart=_cart(), cart_guid=GUID)),
        Step("backend_purchase", "purchase", "The shop's backend reports order 1001 too",
             "`POST /api/v1/sites/shop1/events` with the same order, its customer and billing "
             "address (no session).",
             _event("backend_purchase", "purchase", 6, source="backend",
                    user={"email": EMAIL, "customer_id": "42"}, ecommerce=order,
                    billing_address=dict(BILLING), shipping_address=dict(BILLING))),
        Step("order_status", "order_status, refund", "The next day the order is cancelled",
             "Backend `order_status` with `status: \"cancelled\"`. It names the order, not "
             "its lines or totals: the store hands each adapter the order as onetag reported "
             "it (the body of step 7's Remarkety orders/create, Sendlane order-placed), and "
             "the status change is that order with the new status on top. A status change of "
             "an order onetag never saw carries only the order id, the customer and the "
             "status.",
             _event("order_status", "order_status", DAY // MINUTE, source="backend",
                    user={"email": EMAIL}, ecommerce=status, status="cancelled")),
        Step("refund", "order_status, refund", "... and refunded",
             "Backend `refund` of order 1001 (status `refunded`), naming no items and no "
             "value below the order's: the whole order, once (an `order_status` `refunded` "
             "is the same fact). Its value is the refund's: the order's lines and totals stay "
             "the order's. A partial refund (naming items, GA4's partial refund, or a value "
             "below the order's) is one refund among several, each its own fact under its own "
             "event id: Sendlane gets order-placed with status `refunded`, only the lines it "
             "names (completed from the order as placed; a line only from the order's line of "
             "its product and SKU), else the order's, under `order-placed:1001:refunded:"
             "<event id>` (its `event_id` `1001:refunded:<event id>`: Sendlane records one "
             "event and id once, its guide's \"Event IDs\"); Remarkety orders/update with "
             "the order's latest `status` as onetag reported it (the order is not refunded, "
             "and `status.name` is mandatory on an order, Remarkety's event reference: the "
             "latest status change's, else the order's creation one, so a fulfilment is not "
             "undone) and with `financial_status` `partially_refunded`, under `orders/update:1001:"
             "partially_refunded:<event id>`; Rejoiner nothing (customer/cancel/ \"will "
             "immediately stop any active journeys\", and the order stands). Two refunds of "
             "the same lines or amount are two; the backend retrying one (the same event id) "
             "is one.",
             _event("refund", "refund", DAY // MINUTE + 60, source="backend",
                    user={"email": EMAIL}, ecommerce=status)),
        Step("unsubscribe", "unsubscribe / opt_in", "He unsubscribes",
             "Backend `unsubscribe` (the shop's preference centre).",
             _event("unsubscribe", "unsubscribe", 2 * DAY // MINUTE, source="backend",
                    user={"email": EMAIL}, identity={**IDENTITY, "accepts_marketing": False})),
        Step("opt_in", "unsubscribe / opt_in", "... and later opts in again",
             "Backend `opt_in` with `type: \"accepts marketing checkbox\"`.",
             _event("opt_in", "opt_in", 9 * DAY // MINUTE, source="backend",
                    user={"email": EMAIL}, properties={"type": "accepts marketing checkbox"})),
        Step("product_updated", "product_updated", "The shop updates the notebook and the clip",
             "Backend `product_updated` for the notebook and the clip (a catalog fact: no "
             "visitor); the clip comes without `in_stock`.",
             _event("product_updated", "product_updated", 10 * DAY // MINUTE, source="backend",
                    ecommerce=_ecommerce([NOTEBOOK, {k: v for k, v in CLIP.items()
                                                     if k != "in_stock"}]), identity=None)),
        Step("add_to_wishlist", "", "He had wishlisted the notebook",
             "Back on his first visit (same session, same blocked libraries), Jimmy had put "
             "the notebook on his wishlist.",
             _event("add_to_wishlist", "add_to_wishlist", 2, page="/p/notebook",
                    title="Notebook", ecommerce=_ecommerce([NOTEBOOK]))),
        Step("custom", "", "He finishes a quiz (a custom event)",
             "`{event: \"quiz_done\", score: 3}` pushed on the same visit.",
             _event("custom", "quiz_done", 2, page="/quiz", title="Quiz",
                    properties={"score": 3})),
    ]


# --- the site: the example config of `onetag init`, secrets as placeholders ---------------

def site() -> config_module.SiteConfig:
    data = tomllib.loads(EXAMPLE_CONFIG)
    data["sites"][0]["cart_url"] = CART_URL
    env = {}
    guards = [data["server"], *data["sites"]]  # admin_token, api_key: 16 characters, not shown
    for table in [*guards, *(s[v] for s in data["sites"] for v in VENDORS if v in s)]:
        for key, value in table.items():
            if isinstance(value, str) and value.startswith("env:"):
                env[value[4:]] = f"<{key}>"
                if any(table is guard for guard in guards):
                    env[value[4:]] = env[value[4:]].ljust(config_module.MIN_SECRET, "-")
    return config_module.parse(data, env=env).sites["shop1"]


def context(vendor: VendorConfig, shop: config_module.SiteConfig,
            order: Any = None) -> PlanContext:
    return PlanContext(site_id=shop.id, vendor=vendor, currency=shop.currency,
                       cart_url=shop.cart_url, order=order)


def known_orders() -> dict[str, dict[str, Any]]:
    """Per step id, per vendor: the order body its adapter is given for a status change
    (``PlanContext.order``), as the store finds it then (``rules.KnownOrders``: the rows of
    the steps before, a backend fact's over a browser claim's, never an ignored one)."""
    shop = site()
    steps = scenario()
    known = rules.KnownOrders(rules.orders_wanted({shop.id: shop},
                                                  [(shop.id, step.event) for step in steps]))
    out = {}
    for step in steps:
        out[step.id] = {name: known.get((shop.id, name, outbox.order_key(name, step.event)))
                        for name in shop.vendors}
        known.planned(shop.id, outbox.plan(shop, step.event, orders=known))
    return out


def auth_text(vendor: VendorConfig) -> str:
    """The vendor's auth headers with the secret placeholder, Basic auth shown decoded."""
    parts = []
    for name, value in VENDORS[vendor.name].auth_headers(vendor).items():
        if value.startswith("Basic "):
            value = f'Basic base64("{base64.b64decode(value[6:]).decode()}")'
        parts.append(f"`{name}: {value}`")
    return ", ".join(parts) or "none"


# --- planning, as the outbox does it ------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    step: Step
    vendor: str
    mode: str
    decision: str  # routing.decide: send | browser | skip
    requests: list[tuple[VendorRequest, str, int | None]]  # request, row state, step no. seen
    # Per request: the step whose browser claim carried the same fact, which the vendor's
    # library took in the page (the store records the backend's copy as `browser`).
    met: tuple[int | None, ...] = ()


def plan_story() -> list[list[Planned]]:
    """Per step, per vendor: the routing decision, the requests and their row states; a
    request whose (vendor, dedup key) an earlier step already stored is marked with that
    step's number (the store's INSERT OR IGNORE keeps the first row)."""
    shop = site()
    seen: dict[tuple[str, str], int] = {}
    taken: dict[tuple[str, str], tuple[int, Any]] = {}  # claims taken in the page: step, fact
    out = []
    orders = known_orders()
    for number, step in enumerate(scenario(), 1):
        rows = {(r.vendor, r.dedup_key.removeprefix("skipped:")): r.state
                for r in outbox.plan(shop, step.event)}
        planned = []
        for name, vendor in shop.vendors.items():
            decision = routing.decide(vendor, step.event)
            requests, met = [], []
            if decision != "skip":
                ctx = context(vendor, shop, orders[step.id][name])
                for req in VENDORS[name].plan(step.event, ctx):
                    # A browser's claim and a backend fact have a row each (server/trust.py).
                    is_claim = trust.is_claim(step.event)
                    key = (name, req.dedup_key, is_claim)
                    state = rows[key[:2]]
                    fingerprint = trust.fact_fingerprint(step.event, req.to_row())
                    if is_claim and state == outbox.BROWSER:
                        taken.setdefault(key[:2], (number, fingerprint))
                    # The store's rule (sqlite_ingest._insert_fact): a fact the vendor's
                    # library already took, the same, is recorded as `browser`, not sent.
                    claim = taken.get(key[:2]) if not is_claim else None
                    same = claim is not None and claim[1] == fingerprint
                    met.append(claim[0] if same and state == outbox.PENDING else None)
                    requests.append((req, outbox.BROWSER if met[-1] else state, seen.get(key)))
                    seen.setdefault(key, number)
            planned.append(Planned(step, name, vendor.route(step.event["name"]), decision,
                                   requests, tuple(met)))
        out.append(planned)
    return out


def marker(vendor: str, step_id: str, index: int, count: int) -> str:
    """The HTML comment before a request's JSON: ``<!-- server: <vendor> <step>[ #n] -->``."""
    return f"<!-- server: {vendor} {step_id}{f' #{index + 1}' if count > 1 else ''} -->"


def markers() -> dict[str, tuple[str, str, int]]:
    """Marker -> (vendor, step id, request index) for every request the doc shows (those no
    earlier step already stored)."""
    return {marker(p.vendor, p.step.id, i, len(p.requests)): (p.vendor, p.step.id, i)
            for planned in plan_story() for p in planned
            for i, (_, _, earlier) in enumerate(p.requests)
            if earlier is None and not _met(p, i)}


def _met(p: Planned, index: int) -> int | None:
    return p.met[index] if index < len(p.met) else None


# --- routing reasons: one line per non-obvious default ------------------------------------

CART = ("add_to_cart", "remove_from_cart", "view_cart", "cart_updated", "begin_checkout")
REASONS: dict[str, dict[tuple[str, ...], str]] = {
    "rejoiner": {
        ("identify",): "setCustomerEmail/setCustomerData tag the browsing session, `PUT "
                       "customers/{email}/` updates the stored profile: two facts, neither "
                       "counts anything.",
        ("purchase",): "sendConversion in the page; `convert` only when rj2 did not take it. "
                       "When it did, `convert:<order id>` is recorded as delivered by the "
                       "browser, so the backend's copy of the order is not converted again.",
    },
    "remarkety": {
        ("identify",): "setCustomer names the visitor to track.js; customers/create|update "
                       "stores the profile (keyed by a digest of it: an unchanged profile is "
                       "sent once).",
        CART: "the page's and the server's carts/update carry the same cart under the same "
              "`id` (the cart's own: the GUID of its first state, which the page makes and the "
              "store adopts; not the year-long sc, so the cart after a purchase is another "
              "cart): a second copy updates that cart, it does not add one; the server's copy "
              "reaches Remarkety for carts built before the email was known.",
        ("purchase",): "the page has no order call: one order is one orders/create "
                       "(`orders/create:<order id>`, the same key from browser and backend).",
        ("*",): "`track <name>` in the page; section 7 has no server-side custom event.",
    },
    "esputnik": {
        ("identify",): "eS.js has no identify call: CustomerData comes from the server only.",
        ("view_item", "view_item_list", "add_to_wishlist"):
            "ProductPage / CategoryPage / AddToWishlist from eS.js; the tracker's copy only "
            "when the library did not take the event, so a view is never counted twice.",
        CART: "StatusCart from eS.js, else from the tracker; both carry the whole cart under "
              "the cart state's GUID, the one the page sent as `cart_guid` (the store adopts "
              "it), so one state is one StatusCart whichever path sent it.",
        ("purchase",): "PurchasedItems from eS.js, else from the tracker, both quoting the "
                       "GUID of the cart's last StatusCart; `PurchasedItems:<order id>` is "
                       "recorded as delivered by the browser when eS.js took it, so the "
                       "backend's copy is skipped.",
        ("*",): "eS.js has no custom-event call: CustomEvent from the tracker only.",
    },
    "sendlane": {
        ("identify",): "identify in the page sets pusher.js's cookie; customer-added stores "
                       "the customer: two facts.",
        ("view_item", "add_to_cart", "begin_checkout"):
            "product_viewed / added_to_cart / checkout_started from pusher.js; the API's only "
            "when pusher.js did not take the event.",
        ("purchase",): "pusher.js has no order call: one order-placed per order, its "
                       "`event_id` the order id (Sendlane records an event + id once).",
        ("*",): "pusher.js has no custom call: /tracking/event from the server only.",
    },
}


def _reason(vendor: str, event: str) -> str | None:
    for events, text in REASONS[vendor].items():
        if event in events:
            return text
    return None


# --- rendering ----------------------------------------------------------------------------

def _json(value: Any, indent: int = 0, column: int = 0, width: int = 92) -> str:
    """JSON indented by two, keeping any object or array that fits in ``width`` on one line
    (``column``: where the value starts on its line)."""
    flat = json.dumps(value, ensure_ascii=False)
    if column + len(flat) <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        inner = []
        for key, item in value.items():
            head = f"{pad}{json.dumps(key, ensure_ascii=False)}: "
            inner.append(head + _json(item, indent + 2, len(head), width))
        return "{\n" + ",\n".join(inner) + "\n" + " " * indent + "}"
    inner = [pad + _json(item, indent + 2, len(pad), width) for item in value]
    return "[\n" + ",\n".join(inner) + "\n" + " " * indent + "]"


def _key_pattern(key: str, steps: list[Step]) -> str:
    """A dedup key with the story's values named: the shape every such key has."""
    names = {GUID: "<cart guid>", EMAIL: "<email>", f"{SC}/": "<sc>/",
             **{s.event["event_id"]: "<event id>" for s in steps}}
    for value, name in names.items():
        key = key.replace(value, name)
    key = re.sub(r"(?<=:)1001(?=:|$)", "<order id>", key)
    key = re.sub(r"(?<=:)[0-9a-f]{16}$", "<digest of the fields>", key)
    return re.sub(r"(?<=<event id>:)\d+$", "<item index>", key)


def _what(req: VendorRequest) -> str:
    """A short name for a request: its event type, tracker event or path."""
    if "x-event-type" in req.headers:
        return req.headers["x-event-type"]
    if isinstance(req.json, dict) and "GeneralInfo" in req.json:
        return req.json["GeneralInfo"]["eventName"]
    path = re.sub(r"^https://[^/]+/(api/v1/[^/]+/|v2/)?", "", req.url)
    return re.sub(r"customers/[^/]+/", "customers/{email}/", path)


def _decision_text(p: Planned) -> str:
    mode = f"route `{p.mode}`"
    if p.decision == "skip":
        if p.mode == "off":
            return f"{mode}: no request."
        return f"{mode}: the page's call only; no server request."
    if not p.requests:
        if p.decision == "browser":
            return f"{mode}, taken in the page: nothing on the server."
        return f"{mode}: the adapter has nothing to send for this event."
    if p.decision == "browser":
        return (f"{mode}, and `loaded` lists {p.vendor}: planned and recorded as delivered by "
                f"the browser (state `browser`), not sent.")
    if all(state == "ignored" for _, state, _ in p.requests):
        why = ("this site's orders come from its backend" if p.step.event["name"]
               in trust.ORDER_EVENTS else "it is not verified")
        return (f"{mode}: planned as `ignored`, not sent: a browser's claim onetag's server "
                f"does not forward ({why}; docs/security.md).")
    sent = ("sent by the server" if any(earlier is None and not _met(p, i)
                                        for i, (_, _, earlier) in enumerate(p.requests))
            else "planned by the server")
    if p.step.event["source"] == "backend":
        return f"{mode}, a backend event: {sent}."
    if p.mode == "fallback":
        return f"{mode}, and `loaded` lacks {p.vendor}: {sent}."
    return f"{mode}: {sent}."


def _render_request(p: Planned, index: int, req: VendorRequest, state: str,
                    earlier: int | None, shop: config_module.SiteConfig) -> list[str]:
    label = f"{_what(req)}" + (f" ({index + 1} of {len(p.requests)})"
                               if len(p.requests) > 1 else "")
    if earlier is not None:
        return _wrap(f"{label}: dedup key `{req.dedup_key}`, already stored by step {earlier}: "
                     f"the outbox keeps that row, this copy is not sent.", "- ", "  ")
    if _met(p, index):
        return _wrap(f"{label}: dedup key `{req.dedup_key}`; the page's copy in step "
                     f"{_met(p, index)} carried the same order (id, email, value, currency) and "
                     f"{TITLES[p.vendor]}'s library took it, so this fact is recorded as "
                     "`browser`, not sent (see \"When a backend fact meets a browser claim\").",
                     "- ", "  ")
    if req.skipped:
        return [*_wrap(f"{label}: not sent. Stored as an `ignored` row, dedup key "
                       f"`skipped:{req.dedup_key}`, `last_error` \"skipped: {req.skipped}\" "
                       "(`onetag deliveries --state ignored`). The request it would have been:",
                       "- ", "  "),
                "", marker(p.vendor, p.step.id, index, len(p.requests)), "```json",
                _json(req.json), "```", ""]
    headers = [f"`{k}: {v}`" for k, v in req.headers.items()]
    auth = auth_text(shop.vendors[p.vendor])
    if auth != "none":
        headers.append(auth)
    lines = [
        f"- {label}: `{req.method} {req.url}`",
        f"  - headers: {', '.join(headers) or 'none beyond the common ones'}",
        f"  - dedup key `{req.dedup_key}`; needs_email: {'yes' if req.needs_email else 'no'}; "
        f"row state `{state}`",
        *([f"  - if the vendor answers 404: `{req.if_not_found.method} {req.if_not_found.url}` "
           "with the same body, in the same delivery"] if req.if_not_found else []),
        "",
        marker(p.vendor, p.step.id, index, len(p.requests)),
        "```json",
        _json(req.json),
        "```",
        "",
    ]
    return lines


def render() -> str:
    shop = site()
    steps = scenario()
    story = plan_story()
    vendors = list(shop.vendors)
    modules = [VENDORS[v] for v in vendors]
    events = list(modules[0].DEFAULT_ROUTES)
    out: list[str] = [HEADING, ""]
    w = out.append

    w("What onetag's server sends each vendor (CONTRACT.md section 7). Every request below is")
    w("real output of `server/vendors/<vendor>.py` `plan()` for one example story, generated by")
    w("`python docs/gen_server_mapping.py`; `tests/vendors/test_mapping_doc.py` parses each JSON")
    w("block (after its `<!-- server: <vendor> <step> -->` marker) and compares it with `plan()`,")
    w("and fails when the section differs from a fresh generation. Do not edit it by hand.")
    w("")

    # Conventions -------------------------------------------------------------------------
    w("### Conventions")
    w("")
    w("- **Config**: the example `onetag.toml` that `onetag init` writes (site `shop1`, USD), so")
    w("  ids are its placeholders; secrets are shown as `<setting name>` and are added by")
    w("  `auth_headers` at send time only: they are never stored in a delivery row.")
    w("- **Every request** also carries `Accept: application/json`, `Content-Type:")
    w("  application/json` and `User-Agent: onetag/<version>`; the body is compact JSON (shown")
    w("  indented here).")
    w("- **One row per (site, vendor, dedup key) and kind of sender**: planning is pure and")
    w("  repeatable; the store inserts a delivery row only if that key is new for a browser")
    w("  (a claim) or for the backend (a fact), so a replayed beacon or a retried request is")
    w("  one request, and the backend's copy of an order the browser already delivered is")
    w("  recorded, not sent, when it is the same order (\"When a backend fact meets a browser")
    w("  claim\", below). A retry re-sends the stored row unchanged.")
    w("- **needs_email**: the vendor can only take the request for a known email. Planned for a")
    w("  session without one, the row is `held`; when the session is identified the held event")
    w("  is planned again with the identity (same dedup keys) and sent; after `hold_days` a")
    w("  held row expires.")
    out.extend(_wrap(f"**cart_url**: the site also sets `cart_url = \"{CART_URL}\"` (a "
                     "template of `{cart_guid}` and `{sc}`; commented out in the example "
                     "config), which Rejoiner's `return_url`, Remarkety's "
                     "`abandoned_checkout_url` and Sendlane's `checkout_url` use.", "- ", "  "))
    w("- **ignored**: a request the vendor cannot take without a field it requires is not sent;")
    w("  it is stored as an `ignored` row with the reason in `last_error`, under `skipped:<key>`")
    w("  (so a later copy of the fact that has the field is still sent).")
    w("- **Money** is exact integer minor units in the event; Rejoiner gets integer cents")
    w("  (`435`), eSputnik price strings (`\"4.35\"`), Remarkety and Sendlane JSON decimals")
    w("  (`4.35`, `59.97`).")
    w("")
    w("| vendor | requests go to | auth (added at send time) |")
    w("|---|---|---|")
    targets = {
        "rejoiner": f"`{shop.vendors['rejoiner']['api_base']}/"
                    f"{shop.vendors['rejoiner']['site_id']}/<path>/` (trailing slash required)",
        "remarkety": f"`POST {shop.vendors['remarkety']['webhook_url']}`, the event type in "
                     "`x-event-type`, its time in `x-event-time` (UNIX seconds)",
        "esputnik": f"`POST {shop.vendors['esputnik']['tracker_url']}`, "
                    "`{\"GeneralInfo\": ..., \"<EventName>\": ...}`",
        "sendlane": f"`POST {shop.vendors['sendlane']['api_base']}/tracking/<event>`, "
                    "`token` (the public integration token) in every body",
    }
    for v in vendors:
        w(f"| {TITLES[v]} | {targets[v]} | {auth_text(shop.vendors[v])} |")
    w("")

    # Routing -----------------------------------------------------------------------------
    w("### Default routing")
    w("")
    w("Each module's `DEFAULT_ROUTES` (a site overrides them with `routes = {...}` in its vendor")
    w("section). `\"*\"` is every custom event.")
    w("")
    w("| event | " + " | ".join(TITLES[v] for v in vendors) + " |")
    w("|---|" + "---|" * len(vendors))
    for event in events:
        w(f"| `{event}` | " + " | ".join(f"`{m.DEFAULT_ROUTES[event]}`" for m in modules) + " |")
    w("")
    w("Why the defaults that could count twice do not (every `both` and `fallback`, every")
    w("purchase, every custom-event route that is not `off`):")
    w("")
    for v, module in zip(vendors, modules):
        for events_, text in REASONS[v].items():
            modes = sorted({module.DEFAULT_ROUTES[e] for e in events_})
            names = ", ".join(f"`{e}`" for e in events_)
            out.extend(_wrap(f"{TITLES[v]} {names} (`{'/'.join(modes)}`): {text}", "- ", "  "))
    w("")

    w("### The fallback rule")
    w("")
    w("`server/routing.py` `decide()`, per vendor and stored event. A `fallback` route is sent")
    w("server-side only when the event's `loaded` list lacks the vendor. When the browser took")
    w("it, the server still plans it and records the rows as delivered by the browser (state")
    w("`browser`) under the same dedup key, so a backend copy of the same order (same id,")
    w("email, value, currency) is skipped:")
    w("")
    cases = [("browser event, `loaded` lists the vendor", "browser", True),
             ("browser event, `loaded` lacks it", "browser", False),
             ("backend event", "backend", False)]
    texts = {"send": "sent", "browser": "recorded as `browser`, not sent", "skip": "nothing"}
    w("| mode | " + " | ".join(c[0] for c in cases) + " |")
    w("|---|" + "---|" * len(cases))
    for mode in routing.MODES:
        cfg = VendorConfig(name="v", values={}, routes={"e": mode})
        cells = [texts[routing.decide(cfg, {"name": "e", "source": source,
                                            "loaded": ["v"] if took else []})]
                 for _, source, took in cases]
        w(f"| `{mode}` | " + " | ".join(cells) + " |")
    w("")

    # The story -----------------------------------------------------------------------------
    w("### The example story")
    w("")
    w("Jimmy Kim (`jimmy@example.com`, shop customer 42, accepts marketing) shops on a phone")
    w("whose ad blocker stops eS.js and pusher.js, so every browser event's `loaded` is")
    w(f"`{json.dumps(LOADED)}`: eSputnik's and Sendlane's `fallback` routes go out from the")
    w("server, and Rejoiner's purchase is the page's. The products (Stationery):")
    w("")
    w("| item_id | name | price |")
    w("|---|---|---|")
    for item in (PEN, CLIP, NOTEBOOK):
        extra = "".join(f", {key} `{item[key]}`" for key in ("item_variant", "item_sku")
                        if key in item)
        w(f"| `{item['item_id']}` | {item['item_name']}{extra} | "
          f"{item['price_minor'] / 100:.2f} |")
    w("")
    w("Order 1001: the pen, the clip and three notebooks (subtotal 64.89), coupon SAVE5 (5.00")
    w("off: GA4 `value` 59.89), tax 4.79, shipping 4.99 (paid: 69.67). Times start at")
    w(f"{iso_time(T0)}. The normalised purchase event (step 6) the four adapters receive:")
    w("")
    w("<!-- event: purchase -->")
    w("```json")
    w(_json(steps[5].event))
    w("```")
    w("")
    w("| step | what happened | CONTRACT.md section 7 row |")
    w("|---|---|---|")
    for i, step in enumerate(steps, 1):
        w(f"| {i} | [{step.title}](#{i}-{_anchor(step.title)}) | {step.row or '(beyond section 7)'} |")
    w("")

    for i, (step, planned) in enumerate(zip(steps, story), 1):
        w(f"### {i}. {step.title}")
        w("")
        out.extend(_wrap(step.story + (f" Section 7 row: *{step.row}*." if step.row else "")))
        w("")
        for p in planned:
            out.extend(_wrap(f"**{TITLES[p.vendor]}**: {_decision_text(p)}"))
            w("")
            for index, (req, state, earlier) in enumerate(p.requests):
                out.extend(_render_request(p, index, req, state, earlier, shop))
            if p.requests and out[-1] != "":
                w("")

    # Summary -----------------------------------------------------------------------------
    w("### Dedup keys and needs_email, at a glance")
    w("")
    w("Every request type the story produced, with the shape of its dedup key. Jimmy is")
    w("signed in from step 1, so nothing in the story is held; had he shopped as a guest, each")
    w("`needs_email` request of his session would have waited as `held` until the email he")
    w("typed at checkout identified the session, and then gone out with it, under the same key:")
    w("")
    w("| vendor | request | dedup key | needs_email |")
    w("|---|---|---|---|")
    rows: dict[tuple[str, str], tuple[str, bool]] = {}
    for planned in story:
        for p in planned:
            for req, _, _ in p.requests:
                rows.setdefault((p.vendor, f"{_what(req)} ({p.step.event['name']})"),
                                (_key_pattern(req.dedup_key, steps), req.needs_email))
    for (v, what), (key, needs) in sorted(rows.items(), key=lambda r: vendors.index(r[0][0])):
        w(f"| {TITLES[v]} | {what} | `{key}` | {'yes' if needs else 'no'} |")
    w("")
    w("A status change never reuses the order's key (`cancel:1001:cancelled`,")
    w("`orders/update:1001:refunded`, ...), so it is sent, while the same status twice is not.")
    w("A partial refund adds its own event id (`order-placed:1001:refunded:<event id>`,")
    w("`orders/update:1001:partially_refunded:<event id>`): each refund is sent, a retry of one")
    w("(the same event id) is not.")
    w("Keys with `<digest of the fields>` change when the profile changes and only then.")
    w("A key made of an event id names the event's session too (`<sc>/<event id>`; the id")
    w("alone for a backend event naming no session): a page may set its own event ids, and")
    w("another visitor's event under the same id is another delivery (docs/security.md).")
    return "\n".join(out).rstrip() + "\n"


def _wrap(text: str, first: str = "", rest: str = "") -> list[str]:
    """``text`` as lines of at most 95 characters (``first``/``rest``: list item prefixes)."""
    return textwrap.wrap(text, 95, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False, break_long_words=False)


def _anchor(title: str) -> str:
    """GitHub's heading anchor for "N. <title>" minus the "N-" prefix."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")


# --- splicing into docs/mapping.md ---------------------------------------------------------

def split(doc: str) -> tuple[str, str, str]:
    """``doc`` as (before, the Server side section, after): the section runs from its heading
    to the next level-2 heading or the end."""
    start = doc.index(HEADING + "\n")
    nxt = re.search(r"^## ", doc[start + len(HEADING):], flags=re.M)
    end = start + len(HEADING) + nxt.start() if nxt else len(doc)
    return doc[:start], doc[start:end], doc[end:]


def updated(doc: str) -> str:
    before, _, after = split(doc)
    section = render()
    return before + section + ("\n" + after if after else "")


def main(argv: list[str]) -> int:
    doc = DOC.read_text(encoding="utf-8")
    new = updated(doc)
    if "--check" in argv:
        if new != doc:
            print("docs/mapping.md: the Server side section is out of date; run "
                  "python docs/gen_server_mapping.py", file=sys.stderr)
            return 1
        return 0
    if new != doc:
        DOC.write_text(new, encoding="utf-8")
        print("docs/mapping.md: Server side section rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
