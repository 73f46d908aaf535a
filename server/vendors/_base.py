"""The shape every vendor module shares, so a fifth vendor is one more file pair.

A vendor module (``server/vendors/<name>.py``) defines::

    NAME: str
    SETTINGS: tuple[Setting, ...]        # its config keys: public ones may reach the browser
    DEFAULT_ROUTES: dict[str, str]       # event name -> routing mode; "*" for custom events
    def plan(event: dict, ctx: PlanContext) -> list[VendorRequest]   # pure, no I/O
    def auth_headers(cfg: VendorConfig) -> dict[str, str]            # secrets, at send time only

and may declare how the forwarder treats its answers (vendor knowledge stays here):

    RETRY_ANY_NON_2XX: bool = False      # the vendor asks for a retry on anything but 2xx
    RETRY_STATUSES: frozenset[int] = ()  # 4xx that are temporary at this vendor

and, when its vendor requires a price for every product it names:

    CATALOG_PRICES: frozenset[str] = ()  # event names whose lines without a price get the
                                         # product catalog's, added by the store before
                                         # planning (``_common.item_price_minor``)

and, when a request about a backend event's customer can't go without their session's
cookie (``identity.last_sc``) and says what it waits for:

    UNVERIFIED_SESSIONS: bool = False    # the store adds identity.unverified_sessions on a
                                         # site with identity_secret when no verified session
                                         # is known (store/rules.UNVERIFIED_SESSIONS)

and, when a status change (order_status, refund) must repeat the order it changes:

    ORDER_KEY: str = ""                  # the dedup key of its purchase request ("{order}":
                                         # the order id); the store then plans the status
                                         # change with that request's body (PlanContext.order)
    ORDER_UPDATES_KEY: str = ""          # the dedup key of its status change requests
                                         # ("{order}", "{status}": one of events.
                                         # ORDER_STATUSES); the store then hands it their
                                         # bodies too (PlanContext.order_updates)

A 401/403 is reported as a key problem naming the vendor's secret setting (``KEY_SETTING``,
else its first ``secret`` setting).

Its browser half is ``templates/vendors/<name>.js.j2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

ROUTING_MODES = ("browser", "server", "both", "fallback", "off")


@dataclass(frozen=True)
class Setting:
    """One key of a vendor's config section.

    ``public`` keys are the only ones the generated script may contain; ``secret`` keys are
    additionally never logged. ``browser=False`` keeps a public key the browser adapter never
    reads (e.g. an id already formatted into ``script_url``) out of the script: every byte of
    it is paid on every page view. A default may name other keys as ``{key}`` (e.g. a URL that
    embeds the store id); they are filled in after the section is read.
    """

    name: str
    required: bool = False
    public: bool = False
    secret: bool = False
    browser: bool = True
    default: str | None = None
    help: str = ""
    url: bool = False  # an absolute http(s) URL (``onetag check`` says so when it is not)
    # The vendor's server API refuses a request without it: a section that routes any event
    # to the server must set it (``onetag check`` says so; sent unauthenticated, every call
    # was refused).
    server_auth: bool = False


@dataclass(frozen=True)
class VendorConfig:
    """A site's resolved config section for one vendor (defaults applied, env: resolved)."""

    name: str
    values: Mapping[str, str]
    routes: Mapping[str, str]

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def __repr__(self) -> str:
        """Names the keys set, never their values: some are secrets, and a site's config is
        printed whole by debug logs (aiosqlite's, for one)."""
        return f"VendorConfig(name={self.name!r}, keys={sorted(self.values)!r})"

    def get(self, key: str, default: str | None = None) -> str | None:
        value = self.values.get(key)
        return default if value in (None, "") else value

    def route(self, event_name: str) -> str:
        """Routing mode for an event name; custom events use the ``*`` entry."""
        if event_name in self.routes:
            return self.routes[event_name]
        return self.routes.get("*", "off")


@dataclass(frozen=True)
class PlanContext:
    """What a server adapter may know besides the event itself."""

    site_id: str
    vendor: VendorConfig
    currency: str = "USD"  # the site's default currency
    # The site's cart_url template ({cart_guid}, {sc}): where a returning visitor finds the
    # cart; an event's ecommerce.cart_url wins (``_common.cart_url``).
    cart_url: str | None = None
    # An order_status / refund event's order as onetag reported it to this vendor: the JSON
    # body of the delivery stored under the adapter's ``ORDER_KEY`` for the event's order
    # (a backend fact's, else a browser claim's the store did not ignore), looked up by the
    # store in the ingest transaction. None when no such request was ever planned (the
    # store never saw the purchase) or the adapter declares no ``ORDER_KEY``.
    order: Mapping[str, Any] | None = None
    # The same event's order's status changes as onetag reported them to this vendor: the
    # JSON bodies of the deliveries under the adapter's ``ORDER_UPDATES_KEY`` for the order
    # and each status of ``events.ORDER_STATUSES`` (one request a status: the key), looked
    # up with ``order``, a row the same batch planned before this event included, chosen
    # as ``order`` is; in the vocabulary's order, not in time's. Empty when none was or the
    # adapter declares no ``ORDER_UPDATES_KEY``.
    order_updates: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class VendorRequest:
    """One HTTP request to a vendor, built purely from an event.

    ``dedup_key`` is stable for the fact it reports (an order id, an event id, a cart guid):
    the outbox stores one row per (site, vendor, dedup_key), so planning the same fact twice
    (a replayed beacon, the same order from browser and backend) sends it once.
    ``needs_email``: the vendor can only take this for a known email; the outbox holds it
    until the session is identified.
    """

    method: str
    url: str
    json: Any
    dedup_key: str
    needs_email: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)  # non-secret extra headers
    # Sent instead when the vendor answers 404 (Rejoiner: update a profile by email, and
    # create it when there is none yet). Same delivery, same dedup key.
    if_not_found: VendorRequest | None = None
    # Why this request is NOT sent: a fact the vendor cannot take without a field it requires
    # (eSputnik's cookies.sc, isInStock). Stored as an `ignored` row, the reason in last_error,
    # so `onetag deliveries --state ignored` shows it; never sent.
    skipped: str | None = None
    # Why this request waits rather than goes: the vendor requires what only a browser
    # session of the customer gives (eSputnik's cookies.sc for a backend order of a customer
    # never seen in a browser). Stored as a ``held`` row, the reason in last_error; planned
    # again with the session's sc once one of the customer's sessions is identified (verified,
    # on a site with identity_secret: ``rules.held_visitors``; as rows
    # waiting for an email are), expired after ``hold_days`` like them.
    waits: str | None = None

    def to_row(self) -> dict[str, Any]:
        row = {"method": self.method, "url": self.url, "json": self.json,
               "headers": dict(self.headers)}
        if self.if_not_found is not None:
            row["if_not_found"] = self.if_not_found.to_row()
        return row
