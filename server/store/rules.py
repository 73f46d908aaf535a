"""The store's correctness rules, free of SQL: what every backend applies the same way.

Each backend loads the rows a rule needs (with the locks its concurrency needs), calls the
rule, and writes what it returns. Tested directly (tests/test_store_rules.py) and through
both backends (tests/test_store.py, tests/test_store_pg.py).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from .. import outbox, trust
from ..envelope import Problem, Refused
from ..jsontext import encode
from ..sessions import apply_cart, cart_snapshot, identity_update


def identity_fields(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """An ``identities`` row as the identity's fields (None columns left out; consent a bool)."""
    if row is None:
        return {}
    fields = {key: row[key] for key in ("email", "customer_id", "first_name", "last_name", "phone")
              if row[key] is not None}
    if row["accepts_marketing"] is not None:
        fields["accepts_marketing"] = bool(row["accepts_marketing"])
    return fields


def identity_known(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """An ``identities`` row as events carry it (``event["identity"]``): its fields, then
    ``created_ms``, when the store first knew the person (Remarkety's ``customer.created_at``:
    one value on every order and cart). Not for comparing with ``merge_identity``'s result,
    which has the fields alone (``identity_fields``)."""
    return known_since(identity_fields(row), row["created_ms"] if row is not None else None)


def known_since(fields: Mapping[str, Any], created_ms: int | None) -> dict[str, Any]:
    """An identity's fields (None ones left out) with ``created_ms`` last: the same key order
    whether the store had the identity cached or read it again (it is copied into each
    event's stored JSON)."""
    known = {key: value for key, value in fields.items() if value is not None}
    if created_ms is not None:
        known["created_ms"] = created_ms
    return known


# Identity matching (docs/security.md: browser events are claims, backend events facts) ----

KEEP, TRUSTED, OWN, CLAIMED = "keep", "trusted", "own", "claimed"


class IdentityStep(NamedTuple):
    """What an event asks of its session's identity, before any row is looked up.

    ``kind``: ``keep`` (the session's identity, or none, stays as it is), ``trusted`` (a
    fact or a verified claim: find the identity by email, else customer id, and update
    it, or create it: ``match_identity`` and ``merge_identity``), ``own`` (an unverified
    claim of the session's own email: nothing to look up), ``claimed`` (an unverified
    email: its identity untouched, or a new one with ``sessions.claimed_fields``).
    """

    kind: str
    email: str | None = None


def identity_step(event: dict[str, Any], session_verified: bool, current_id: int | None,
                  current: Mapping[str, Any]) -> IdentityStep:
    """Decide ``event``'s identity step; changes the event as the rule says.

    A browser event from a session whose identity is verified, about that identity,
    counts as verified (its ``source`` becomes ``verified browser``). A browser event's
    ``customer_id`` is never kept, signed or not: the signature signs the email only, so
    a customer id comes only from the backend (it is removed from ``event["user"]`` and
    the event marked ``customer_id_dropped``, so a vendor needing one can say why it has
    none). Of an unverified event only the email is kept (``event["user"]`` is cut to
    it), and it binds nothing when the event is about consent (it names whoever it
    names, not this visitor).
    """
    user = event.get("user") or {}
    if (event["source"] == trust.BROWSER and session_verified and current_id is not None
            and user.get("email") in (None, current.get("email"))
            and user.get("customer_id") in (None, current.get("customer_id"))):
        event["source"] = trust.VERIFIED
    trusted = trust.trusted(event)
    email = user.get("email")
    if trust.is_claim(event) and user.get("customer_id"):
        # Never a key to an identity from a browser: Sendlane's row says why it has none.
        user = {key: value for key, value in user.items() if key != "customer_id"}
        event["user"] = user or None
        event["customer_id_dropped"] = True
    if not trusted:
        event["user"] = {"email": email} if email else None
        if not email or event["name"] in trust.CONSENT_EVENTS:
            email = None
    if not (user.get("email") or user.get("customer_id")) or (not trusted and not email):
        return IdentityStep(KEEP)
    if trusted:
        return IdentityStep(TRUSTED, user.get("email"))
    if current.get("email") == email:
        return IdentityStep(OWN, email)
    return IdentityStep(CLAIMED, email)


def match_identity(user: Mapping[str, Any], by_email: Mapping[str, Any] | None,
                   by_customer: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """Which stored identity a trusted event is about: the one with its email, else the
    one with its customer id, unless that one has another email (a customer id now used
    with another email: that email gets an identity of its own)."""
    if by_email is not None:
        return by_email
    if (by_customer is not None and by_customer["email"] and user.get("email")
            and by_customer["email"] != user["email"]):
        return None
    return by_customer


def merge_identity(current: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
    """The identity's fields after a trusted event (``sessions.identity_update``)."""
    return identity_update(current, event)


def customer_id_to_check(fields: Mapping[str, Any], current: Mapping[str, Any] | None
                         ) -> str | None:
    """The customer id whose other holder must be looked for before ``fields`` are written
    (None: the identity keeps the one it had, nothing to check)."""
    wanted = fields.get("customer_id")
    if wanted is None or wanted == (current or {}).get("customer_id"):
        return None
    return wanted


def keep_customer_id(fields: dict[str, Any], current: Mapping[str, Any] | None,
                     held_elsewhere: bool) -> dict[str, Any]:
    """A customer id another identity holds stays that identity's: a new identity goes
    without it, an existing one keeps the customer id it had."""
    if not held_elsewhere:
        return fields
    fields = dict(fields)
    if current is None:
        fields.pop("customer_id", None)
    else:
        fields["customer_id"] = current.get("customer_id")
    return fields


class Binding(NamedTuple):
    """What becomes of the session after its event's identity is known."""

    switch: bool  # it was someone else's: its cart emptied, what it held never sent
    newly_bound: bool  # it had no identity before: what it held waits no longer
    verified: int | None  # the session's verified flag after
    # Its binding is verified now and was not before (a signed identify of a session that
    # had no identity, another one, or the same one by a typed email): ``held_visitors``.
    newly_verified: bool = False


def bind_session(source: str, verified: int | None, current_id: int | None,
                 identity_id: int | None) -> Binding:
    """Only a signature verifies a session; not the backend naming its sc (a guest checkout
    under someone else's email is not proof of being them). A session that changes
    identity loses its verification."""
    changed = identity_id is not None and current_id != identity_id
    was = verified
    if source == trust.VERIFIED:
        verified = 1
    elif changed:
        verified = None
    newly_verified = identity_id is not None and verified == 1 and (was != 1 or changed)
    return Binding(changed and current_id is not None, changed and current_id is None, verified,
                   newly_verified)


# Whose event id is whose ------------------------------------------------------------------

def event_scope(event: Mapping[str, Any]) -> str | None:
    """The space an event's id is unique in, beside its site: a duplicate is an event with
    the same (site, event id, scope). The backend's ids are its own, one space a site
    (``""``, whatever ``sc`` it names); a browser's are its session's (its ``sc``): a
    retried beacon is a duplicate, another visitor's event under an id it predicted
    ("purchase-5001") is not. The events table's unique index ``events_id`` is on the same
    (``EVENT_SCOPE_SQL``; migrations 015 and 031)."""
    return "" if event["source"] == trust.BACKEND else event["sc"]


# ``event_scope`` of a stored row, as both databases' unique index ``events_id`` computes it
# (a lookup must name the same expression to probe the whole index).
EVENT_SCOPE_SQL = "CASE WHEN source = 'backend' THEN '' ELSE sc END"


# The cart GUID policy ---------------------------------------------------------------------

# A session's cart as the store keeps it: (lines, the state's GUID, currency, the cart's id).
Cart = tuple[list[dict[str, Any]], str | None, str | None, str | None]


class CartStep(NamedTuple):
    lines: list[dict[str, Any]]  # the cart's lines after the event, to check and store
    snapshot: dict[str, Any]  # what the event carries as ``event["cart"]``
    cart: Cart | None  # the session's after


def cart_step(cart: Cart | None,
              event: dict[str, Any], site_currency: str, new_guid: Callable[[], str],
              max_lines: int | None = None) -> CartStep | None:
    """The session's cart (``(lines, guid, currency, cart id)`` or None) after ``event``;
    None when the event does not touch the cart.

    A backend event's lines are facts (``backend_lines``): marked ``FACT``, and a browser's
    claimed lines make room for them within ``max_lines`` (the site's ``max_cart_lines``)
    and ``MAX_CART_BYTES``. What still overflows is ``check_cart``'s to refuse.

    The GUID names a cart state. The browser may name it (``cart_guid``: it may already
    have sent that state to a vendor under it, eS.js's StatusCart): both paths then quote
    the last GUID either sent. Otherwise a changed cart (or one without a GUID) gets a new
    one. A purchase carries the cart as bought under the GUID of its last state (eSputnik's
    PurchasedItems refers to the last StatusCart GUID), else the one the page names, none
    when the session never had a cart (a made-up GUID would match nothing); then the
    session starts an empty cart.

    The cart's id names the cart across its states (Remarkety's carts/update ``id``: "keep
    the same id so that carts don't get duplicated"): the GUID of its first state, so the
    page, whose runtime makes that GUID, names the cart alike. A purchase closes the cart
    (the session's next one gets an id of its own: the visitor's sc, a year long, made the
    next cart the converted one); so does an identity switch, which empties it.
    """
    items, guid, stored_currency, cart_id = cart if cart else ([], None, None, None)
    currency = (event.get("ecommerce") or {}).get("currency") or stored_currency or site_currency
    after = apply_cart(items, event)
    if after is None:
        return None
    if event["source"] == trust.BACKEND and after:
        after = backend_lines(after, event, max_lines)
    given = event.get("cart_guid")
    if event["name"] == "purchase":
        bought = guid or given
        return CartStep(after, cart_snapshot(items, currency, bought, cart_id or bought), None)
    if given:
        guid = given
    elif after != items or guid is None:
        guid = new_guid()
    cart_id = cart_id or guid  # a new cart: named by its first state
    return CartStep(after, cart_snapshot(after, currency, guid, cart_id),
                    (after, guid, currency, cart_id))


# A cart line the backend stated carries ``FACT: True`` (never a field an event's item can
# have: ``events._item`` builds each from known keys). A browser's lines are claims.
FACT = "fact"


def backend_lines(lines: list[dict[str, Any]], event: dict[str, Any],
                  max_lines: int | None) -> list[dict[str, Any]]:
    """The cart after a backend cart event (``lines``, from ``apply_cart``): the lines it
    states marked ``FACT`` (a whole cart's every line; an add's the lines it names), then,
    over ``max_lines`` or ``MAX_CART_BYTES``, the browser's claimed lines dropped, oldest
    first (a cart's lines are in the order they were first added), until it fits.

    A claim never blocks a fact (docs/security.md, "Carts"): a browser filling the cart to
    its limit made the backend's own add_to_cart fail. The backend's own lines are bounded
    as before: if they alone overflow, ``check_cart`` refuses the event. Lines are never
    changed in place (earlier snapshots share them): a line to mark is copied."""
    if event["name"] == "add_to_cart":
        named = {(item["item_id"], item.get("item_variant") or "")
                 for item in (event.get("ecommerce") or {}).get("items") or ()}
        lines = [{**line, FACT: True} if not line.get(FACT) and (
                     line["item_id"], line.get("item_variant") or "") in named else line
                 for line in lines]
    elif event["name"] != "remove_from_cart":  # a whole cart (view_cart, cart_updated, ...)
        lines = [line if line.get(FACT) else {**line, FACT: True} for line in lines]
    excess = len(lines) - max_lines if max_lines is not None else 0
    dropped: set[int] = set()
    for index, line in enumerate(lines):
        if excess <= 0:
            break
        if not line.get(FACT):
            dropped.add(index)
            excess -= 1
    if dropped:
        lines = [line for index, line in enumerate(lines) if index not in dropped]
    if all(line.get(FACT) for line in lines):
        return lines  # no claim to drop: ``check_cart`` bounds the facts alone
    size = len(encode(lines))
    if size > MAX_CART_BYTES:
        kept = []
        for line in lines:
            if size > MAX_CART_BYTES and not line.get(FACT):
                size -= len(encode(line)) + 1  # the line and its comma
            else:
                kept.append(line)
        lines = kept
    return lines


def check_cart(lines: list[dict[str, Any]], site: Any, field: str) -> bytes:
    """The cart's stored JSON; refused (422, naming the event's items) over the site's
    ``max_cart_lines`` or ``MAX_CART_BYTES``."""
    limit = site.max_cart_lines
    if len(lines) > limit:
        raise Refused(Problem(422, "invalid_event", field, f"would make the cart {len(lines)} "
                              f"lines; the limit is {limit} (the site's max_cart_lines)"))
    encoded = encode(lines)
    size = len(encoded)
    if size > MAX_CART_BYTES:
        raise Refused(Problem(422, "invalid_event", field, f"would make the cart {size} "
                              f"bytes; the limit is {MAX_CART_BYTES}"))
    return encoded


CART_EVENTS = frozenset({"add_to_cart", "remove_from_cart", "view_cart", "begin_checkout",
                         "cart_updated", "purchase"})
# What one request may make the store write (its events as sent and normalised, and their
# vendor requests), estimated before writing: a 1 MiB body may not become gigabytes.
MAX_REQUEST_STORED_BYTES = 16 * 1024 * 1024


def charge_stored(stored: int, raw_bytes: int, data_bytes: int, planned: int) -> int:
    """A request's running estimate of what it makes the store write, with one more event:
    the event as sent and normalised, and a vendor request per planned delivery (made of the
    event's fields, so no larger than its stored form). Refused (413) past the bound."""
    stored += raw_bytes + data_bytes * (1 + planned)
    if stored > MAX_REQUEST_STORED_BYTES:
        raise Refused(Problem(413, "too_large", "events", "would store more than "
                              f"{MAX_REQUEST_STORED_BYTES} bytes (carts are stored with "
                              "each event): send fewer events a request"))
    return stored


def new_guid() -> str:
    """An uppercase random (version 4) UUID naming a cart state. It must be unique, not
    secret, so it comes from ``random`` (seeded from the OS at start): ``uuid4()`` makes a
    system call per GUID, and with ``UUID``'s checks took a twentieth of the writer's time
    per cart event."""
    n = random.getrandbits(128) & _GUID_MASK | _GUID_BITS
    h = f"{n:032X}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_GUID_MASK = ~(0xF000 << 64 | 0xC000 << 48)  # RFC 9562: version 4, variant 10
_GUID_BITS = 0x4000 << 64 | 0x8000 << 48


# A session's cart, as stored JSON, at most (its lines are bounded by the site's
# ``max_cart_lines``, default 200). Each cart event stores the whole cart with the event and
# in each vendor's request: unbounded, four 162 KiB requests grew a database by 677 MB.
MAX_CART_BYTES = 64 * 1024


# A browser's claim meeting a backend fact under one key (the browser copy wins only when
# it carried the same fact) ----------------------------------------------------------------

def same_fact(event: Mapping[str, Any], request: Mapping[str, Any],
              planned_event: Mapping[str, Any], planned_request: Mapping[str, Any]) -> bool:
    """Whether a stored row (its event and request) and a planned one state one fact."""
    return (trust.fact_fingerprint(event, request)
            == trust.fact_fingerprint(planned_event, planned_request))


def claim_taken(state: str, fact_holds_key: bool) -> bool:
    """A claim the server would send, under a key a backend fact holds, is not sent
    (stored ``ignored``, ``CLAIM_TAKEN_ERROR``): the fact is the vendor's truth.
    (PostgreSQL's one-statement write, migration 027, applies it in SQL, given
    ``CLAIM_TAKEN_STATES``.)"""
    return fact_holds_key and state in CLAIM_TAKEN_STATES


CLAIM_TAKEN_STATES = (outbox.PENDING, outbox.HELD)  # a claim's states a fact's key cancels


CLAIM_TAKEN_ERROR = "a backend fact holds this key"
FACT_SUPERSEDED_ERROR = "delivered by the browser first"
CLAIM_SUPERSEDED_ERROR = "superseded by the backend's fact"


def waiting_fact_superseded(fact_state: str, fact_attempts: int, same: bool) -> bool:
    """A vendor's library took in the page the very fact a backend copy waits to send (a
    ``fallback`` route's grace): the vendor has it, so that copy is not sent (it becomes
    ``browser``, ``FACT_SUPERSEDED_ERROR``). Only the same fact, not tried yet."""
    return same and fact_attempts == 0 and fact_state in (outbox.PENDING, outbox.HELD)


class FactPlan(NamedTuple):
    state: str
    request: dict[str, Any]
    error: str | None
    cancel_claim: bool  # the claim's row becomes ``ignored`` (CLAIM_SUPERSEDED_ERROR)


def fact_meets_claim(vendor: str, state: str, request: dict[str, Any], error: str | None,
                     claim: Mapping[str, Any] | None, same: bool) -> FactPlan:
    """A backend fact's row, given the browser's claim under the same key (``claim``: its
    ``id``, ``state``, ``attempts``; None: no claim), ``same``: whether they state one fact.

    Claim not sent yet: cancelled, the fact goes. Claim delivered (by onetag or by the
    vendor's library) with the same fact: the vendor has it, the fact row is recorded as
    ``browser``. Delivered differently: the fact goes as the vendor's update
    (``trust.correction``). A dead, expired or ignored claim changed nothing at the vendor.
    """
    if claim is None or state not in (outbox.PENDING, outbox.HELD):
        return FactPlan(state, request, error, False)
    if claim["state"] in (outbox.DELIVERED, outbox.BROWSER):
        if same:
            return FactPlan(outbox.BROWSER, request, f"the browser's copy (delivery "
                            f"{claim['id']}) carried the same fact", False)
        return FactPlan(state, trust.correction(vendor, request), error, False)
    if claim["state"] in (outbox.PENDING, outbox.HELD):
        if claim["attempts"] and not same:  # it may have reached the vendor
            request = trust.correction(vendor, request)
        return FactPlan(state, request, error, True)
    return FactPlan(state, request, error, False)


# An order's status change repeats the order (``PlanContext.order``) -------------------------

class KnownOrders:
    """The order requests a batch's status changes repeat: (site id, vendor, dedup key) ->
    the stored request's JSON body (``outbox.OrderBodies``).

    A backend loads the rows under the keys ``outbox.orders_wanted`` names for the batch's
    events, in its transaction, in one set-based read (``add`` each row found), and tells
    it each row the batch plans (``planned``: a purchase earlier in the same batch is not
    stored yet). Which row is the order as the vendor has it: a backend fact's over a
    browser claim's (the fact replaces the claim at the vendor: ``fact_meets_claim``); of
    two of one kind, the first (the store keeps the first row under a key); never an
    ``ignored`` row (a claim onetag does not forward is no report of the order).
    """

    def __init__(self, wanted: Iterable[tuple[str, str, str]] = ()):
        self.wanted = frozenset(wanted)
        self.found: dict[tuple[str, str, str], tuple[bool, Mapping[str, Any]]] = {}

    def __bool__(self) -> bool:
        return bool(self.found)

    def add(self, site_id: str, vendor: str, key: str, claim: Any, state: str,
            request: Mapping[str, Any]) -> None:
        """One stored or planned row under a wanted key: ``claim`` its claim flag, ``request``
        its stored request (``method``, ``url``, ``json``, ...)."""
        at = (site_id, vendor, key)
        body = request.get("json")
        if at not in self.wanted or state == outbox.IGNORED or not isinstance(body, Mapping):
            return
        kept = self.found.get(at)
        if kept is None or (kept[0] and not claim):
            self.found[at] = (bool(claim), body)

    def planned(self, site_id: str, rows: Iterable[Any]) -> None:
        """The rows (``outbox.PlannedDelivery``) one event of the batch planned."""
        if self.wanted:
            for r in rows:
                self.add(site_id, r.vendor, r.dedup_key, r.claim, r.state, r.request)

    def get(self, key: tuple[str, str, str], default: Any = None) -> Any:
        kept = self.found.get(key)
        return default if kept is None else kept[1]


def orders_wanted(sites: Mapping[str, Any], events: Iterable[tuple[str, Mapping[str, Any]]]
                  ) -> list[tuple[str, str, str]]:
    """The (site id, vendor, dedup key) to look up for (site id, event) pairs, sorted."""
    wanted = set()
    for site_id, event in events:
        wanted.update(outbox.orders_wanted(sites[site_id], event))
    return sorted(wanted)


# A customer's latest session ---------------------------------------------------------------

# What a backend event naming no session takes as the customer's session (``last_sc``:
# eSputnik's cookies.sc), and the console's "latest first": the session last active
# (``last_ms``); in a tie of one millisecond, the one whose event came later (``last_seq``:
# seqs follow arrival), never the one created later (``id``, which said the other session
# when two steps shared a millisecond, and this one when they did not: the answer hung on
# the clock). ``id`` is left for sessions older than migration 003 (no ``last_seq``).
# One order: LATEST_SESSION_SQL where the rows are stored, ``session_recency`` where a
# batch holds them unwritten (``latest_session``).
LATEST_SESSION_SQL = "ORDER BY last_ms DESC, coalesce(last_seq, 0) DESC, id DESC"


def session_recency(session: Any) -> tuple[int, int, int]:
    """LATEST_SESSION_SQL's order as a key (greatest: latest) of a session with ``last_ms``,
    ``last_seq`` and ``id`` (None before the batch writes a new one: its ``last_seq``, this
    batch's, already tells it from any other)."""
    return session.last_ms, session.last_seq or 0, session.id or 0


def signs_identities(site: Any) -> bool:
    """Whether the site's pages can prove who a session is (an ``identity_secret``): then
    ``last_sc`` is taken only from verified sessions (``verified = 1``: bound by a signed
    identify), and the customer's held rows wait for a verified binding
    (``held_visitors``' ``signing``). There a session bound by a typed email
    proves nothing (anyone may type the customer's email before the backend reports their
    order), so it never gets the backend's events; with none verified, a backend eSputnik
    order waits (held) for one. A site without a secret has no proof to ask for: any
    session bound to the customer (docs/security.md)."""
    return site.identity_secret is not None


# On a site that signs identities, a backend event of a customer with no verified session
# (``last_sc`` None) also says whether any session, bound by an unsigned email, is known
# (``identity.unverified_sessions``: true or false; absent elsewhere): what an eSputnik row
# that can't go without the customer's sc says it waits for (a verified session, and that
# only unverified ones are known when so). Bookkeeping: no vendor is sent it. Added only
# when an adapter that reads it gets the event (``outbox.unverified_sessions_wanted``), and
# found by the same read as ``last_sc`` (``last_sc_sql``, ``LastSession``).
UNVERIFIED_SESSIONS = "unverified_sessions"

# A stored session's ``verified`` as 1 or 0 (the column may be NULL: not verified).
_VERIFIED = "CASE WHEN verified = 1 THEN 1 ELSE 0 END"

# What ``last_sc_sql``'s statement selects: the session's sc, and whether it is verified.
LAST_SC_COLUMNS = f"sc, {_VERIFIED}"


def last_sc_sql(verified_first: bool) -> str:
    """The tail of ``SELECT {LAST_SC_COLUMNS} FROM sessions WHERE site_id = ? AND
    identity_id = ?`` that picks the customer's latest stored session (``LATEST_SESSION_SQL``;
    ``latest_session`` for unwritten rows); with ``verified_first`` (``signs_identities``),
    the latest verified one, else (none is) the latest of the others: one read tells
    ``last_sc`` and whether unverified sessions are known (``LastSession.stored``)."""
    order = f"ORDER BY {_VERIFIED} DESC, " if verified_first else "ORDER BY "
    return order + LATEST_SESSION_SQL.removeprefix("ORDER BY ") + " LIMIT 1"


def latest_session(sessions: Iterable[tuple[str, Any]], verified_only: bool = False
                   ) -> str | None:
    """The sc of the latest of (sc, session) pairs (``session_recency``), or None; with
    ``verified_only``, of those whose ``verified`` is 1 (``last_sc_sql``'s
    ``verified_first``, when its first row is verified)."""
    latest = max((pair for pair in sessions if not verified_only or pair[1].verified == 1),
                 key=lambda pair: session_recency(pair[1]), default=None)
    return latest[0] if latest is not None else None


class LastSession(NamedTuple):
    """What a backend event naming no session takes of its customer's sessions:
    ``last_sc`` (``signs_identities``: a verified session's), and, on a signing site with
    none verified, whether unverified ones are known (``UNVERIFIED_SESSIONS``; else None).

    A store finds it with at most one read (``unwritten``, then ``stored``): the batch's
    unwritten sessions of the customer first (they are the latest: active at the batch's
    ``now``); the database only when they hold no session ``last_sc`` takes, and not for a
    customer the batch created that no session was bound to since (nothing stored is
    theirs: ``stored(None, ...)``)."""
    last_sc: str | None
    unverified: bool | None

    @staticmethod
    def unwritten(sessions: Iterable[tuple[str, Any]], signing: bool
                  ) -> tuple[LastSession | None, bool]:
        """From the batch's unwritten (sc, session) pairs of the customer: the answer, if
        they give it (None: read the database, ``stored``), and whether there are any."""
        pairs = list(sessions)
        latest = latest_session(pairs, signing)
        return (LastSession(latest, None) if latest is not None else None), bool(pairs)

    @staticmethod
    def stored(row: Sequence[Any] | None, signing: bool, unwritten: bool) -> LastSession:
        """From ``last_sc_sql``'s first row ((sc, verified) or None), when the unwritten
        sessions gave no answer (``unwritten``: whether there were any of the customer's)."""
        if row is not None and (not signing or row[1] == 1):
            return LastSession(row[0], None)
        return LastSession(None, (row is not None or unwritten) if signing else None)


# Releasing held deliveries when the session gets an email ---------------------------------

class Held(NamedTuple):
    seq: int  # the event the rows were planned from
    data: Any  # its stored JSON
    vendors: frozenset[str]  # whose rows held
    fresh: bool  # all still within the hold window: re-planned; else they expire


def held_release(rows: Iterable[Mapping[str, Any]], now: int, hold_ms: int) -> list[Held]:
    """Group a session's held rows (``event_seq``, ``vendor``, ``created_ms``, ``data``; in
    id order) by event. An event with any row older than the hold window expires whole."""
    by_event: dict[int, tuple[Any, set[str], bool]] = {}
    for row in rows:
        data, vendors, fresh = by_event.get(row["event_seq"], (row["data"], set(), True))
        vendors.add(row["vendor"])
        by_event[row["event_seq"]] = (data, vendors,
                                      fresh and row["created_ms"] >= now - hold_ms)
    return [Held(seq, data, frozenset(vendors), fresh)
            for seq, (data, vendors, fresh) in by_event.items()]


def held_visitors(sc: str, identity: Mapping[str, Any], binding: Binding | None,
                  signing: bool) -> list[str]:
    """Whose held rows a session's identification releases (``outbox.visitor_key``; none:
    nothing to look up): the session's own, which waited for an email, once it is bound;
    and the customer's backend events naming no session (``email:``, ``customer:``), which
    waited for an email or for a browser session of theirs (``VendorRequest.waits``:
    eSputnik's cookies.sc), which then go with this session's sc.

    ``signing``: the site has an ``identity_secret``, so its pages can prove who a session
    is. There the customer's rows wait for a verified binding (``newly_verified``): any
    browser may type anyone's email, and the typist's cookie would be tied to the
    customer's order at the vendor. A site that can't sign releases them on the first
    binding, typed or not (docs/security.md)."""
    if binding is None:
        return []
    visitors = [f"sc:{sc}"] if binding.newly_bound else []
    if binding.newly_verified or (binding.newly_bound and not signing):
        if identity.get("email"):
            visitors.append(f"email:{identity['email']}")
        if identity.get("customer_id"):
            visitors.append(f"customer:{identity['customer_id']}")
    return visitors


def released_event(event: dict[str, Any], identity: Mapping[str, Any],
                   sc: str | None = None) -> dict[str, Any]:
    """A held event as re-planned: with the identity it waited for (not new any more), and
    the session that released it as the customer's latest (``last_sc``, what an event
    naming no session of its own takes: ``_common.session_sc``)."""
    event["identity"] = {**{k: v for k, v in identity.items() if k != "is_new"},
                         "is_new": False, **({"last_sc": sc} if sc else {})}
    return event


# Applying a request again -----------------------------------------------------------------

def keep_pristine(requests: Iterable[Any]) -> Callable[[], None]:
    """Remember what applying the rules changes in each request's events (``source``: a
    verified session's browser event is upgraded; ``user``: cut to the email, with
    ``customer_id_dropped`` when it named a customer id; ``identity``
    and ``cart``: filled in), and return the function that puts it back.

    A batch that fails (one bad request, a race lost to another node) is applied again,
    alone or whole, to a database rolled back to before it: its events must be as they
    arrived too, or an event upgraded to ``verified browser`` under the first attempt's
    state would keep that trust under a state that no longer grants it.
    """
    kept = [(event, {key: event[key] for key in _CHANGED if key in event})
            for request in requests for event in request[1]]

    def restore() -> None:
        for event, values in kept:
            for key in _CHANGED:
                if key in values:
                    event[key] = values[key]  # in place: the event's key order stays
                else:
                    event.pop(key, None)

    return restore


# what applying the rules sets on an event
_CHANGED = ("source", "user", "customer_id_dropped", "identity", "cart")


def add_backfill_counts(counts: dict[str, Any], planned: Mapping[str, int],
                        already: Mapping[str, int], skipped: Mapping[str, Mapping[str, int]],
                        known: int) -> dict[str, Any]:
    """A backfill run's stored counts with one batch's added (both backends store the result
    in ``backfill_runs.counts``, in the batch's transaction, so a resumed run restores them)."""
    for name, tally in (("planned", planned), ("already", already)):
        into = counts.setdefault(name, {})
        for vendor, n in tally.items():
            into[vendor] = into.get(vendor, 0) + n
    for vendor, reasons in skipped.items():
        into = counts.setdefault("skipped", {}).setdefault(vendor, {})
        for reason, n in reasons.items():
            into[reason] = into.get(reason, 0) + n
    counts["events_known"] = counts.get("events_known", 0) + known
    return counts
