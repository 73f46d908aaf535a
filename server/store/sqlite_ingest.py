"""Ingest for one group commit: every request waiting, applied with set-based statements.

Per-event statements (a dedup SELECT, a session upsert, a cart read and write, an
INSERT...) made the writer the bottleneck. So a batch loads the state it needs once
(known event ids; sessions with their carts and identities, from the ``SessionCache``
where the writer has them), applies every event in order in memory with the same pure
rules (``store/rules.py``, ``outbox.plan``: the PostgreSQL store applies the same), and writes
back with one ``executemany`` per table. The rare paths — a new or changed identity,
releasing held deliveries — still talk to the database directly.
"""

from __future__ import annotations

import itertools
import sqlite3
from typing import Any, Iterable, Mapping, Sequence

from .. import catalog, outbox, product_sync, trust
from ..jsontext import encode, loads
from ..sessions import claimed_fields
from . import rules
from .rules import (CART_EVENTS, MAX_CART_BYTES, MAX_REQUEST_STORED_BYTES,  # noqa: F401
                    charge_stored, identity_fields, identity_known,
                    known_since)
from .sqlite_catalog import CatalogBatch, ProductCache

CHUNK = 400  # bound variables per IN (...) stay well under SQLite's limit
# The writer's session cache keeps at most this many bytes of carts (their stored JSON), and
# a cart larger than PARSED_CART_BYTES only as that JSON, parsed again when an event needs it.
MAX_CACHED_CART_BYTES = 32 * 1024 * 1024
PARSED_CART_BYTES = 8 * 1024

# (site_id, normalised events, the events as sent as stored JSON (jsontext.encode), user
# agent or None)
# (site_id, events, raws as stored, user agent, request id)
Request = tuple[str, Sequence[dict[str, Any]], Sequence[bytes], str | None, str | None]


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


_COLUMNS = ("identity_id", "first_ms", "user_agent", "last_page", "first_seq", "last_seq",
            "cart_guid", "cart_currency", "cart_items", "cart_updated_ms", "verified", "cart_id")
_UNREAD = object()  # a cart whose stored JSON has not been parsed yet


class _Session:
    """A session's row as the writer last wrote or read it, plus its cart as Python values.

    ``cart`` is None (no cart), ``rules.Cart``, or ``_UNREAD`` until a cart
    event needs the stored ``cart_items`` parsed.
    """

    __slots__ = ("id", "last_ms", *_COLUMNS, "cart")

    def __init__(self, id: int | None, last_ms: int, identity_id: int | None = None,
                 first_ms: int | None = None, user_agent: str | None = None,
                 last_page: str | None = None, first_seq: int | None = None,
                 last_seq: int | None = None, cart_guid: str | None = None,
                 cart_currency: str | None = None, cart_items: str | bytes | None = None,
                 cart_updated_ms: int | None = None, verified: int | None = None,
                 cart_id: str | None = None):
        self.id, self.last_ms, self.identity_id = id, last_ms, identity_id
        self.first_ms, self.user_agent, self.last_page = first_ms, user_agent, last_page
        self.first_seq, self.last_seq = first_seq, last_seq
        self.cart_guid, self.cart_currency, self.cart_items = cart_guid, cart_currency, cart_items
        self.cart_updated_ms, self.cart_id = cart_updated_ms, cart_id
        self.verified = verified  # 1: the identity was bound by a signed identify
        self.cart: Any = _UNREAD if cart_items is not None else None

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _COLUMNS)

    def update_values(self) -> tuple[Any, ...]:
        """``_SESSION_UPDATE``'s parameters."""
        return (self.last_ms, *(getattr(self, name) for name in _UPDATED), self.id)


_SESSION_SELECT = f"SELECT sc, id, last_ms, {', '.join(_COLUMNS)} FROM sessions WHERE site_id = ? "
_SESSION_INSERT = (
    f"INSERT INTO sessions (id, site_id, sc, last_ms, {', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, "
    + ", ".join("CAST(? AS TEXT)" if name == "cart_items" else "?" for name in _COLUMNS) + ")")
# Not identity_id: SQLite rewrites an index entry whenever its column is SET, even to the
# same value, and sessions_identity's entries of anonymous sessions (NULL, rowid) lie as
# scattered as the sessions: 0.38 more WAL frames an event. It is set on its own, when
# a session is bound (``_SESSION_BIND``).
_UPDATED = tuple(name for name in _COLUMNS if name not in ("first_ms", "identity_id"))
_SESSION_BIND = "UPDATE sessions SET identity_id = ? WHERE id = ?"
_SESSION_UPDATE = (  # by rowid: no search of the (site_id, sc) index
    "UPDATE sessions SET last_ms = ?, "
    + ", ".join(f"{name} = CAST(? AS TEXT)" if name == "cart_items" else f"{name} = ?"
                for name in _UPDATED) + " WHERE id = ?")


class SessionCache:
    """The sessions (and their identities) this writer has read or written, across batches.

    Each event rewrites its session's row; reading that row back first, and parsing its
    cart again, cost the writer about a fifth of its time per event. Rows are changed in
    place while a batch applies, so the cache is only right while (1) this connection is
    the only one writing — ``check`` empties it when ``PRAGMA data_version`` says another
    connection committed — and (2) every change it saw was committed: the writer calls
    ``clear`` whenever a transaction or a savepoint rolls back.
    """

    def __init__(self, limit: int = 10_000, cart_bytes_limit: int = MAX_CACHED_CART_BYTES):
        self.limit = limit
        self.cart_bytes_limit = cart_bytes_limit
        self.sessions: dict[tuple[str, str], _Session] = {}  # oldest use first
        self.identities: dict[int, dict[str, Any]] = {}
        self.cart_bytes = 0  # the stored JSON of the cached sessions' carts
        self.catalog = ProductCache()  # the products, under the same rules (sqlite_catalog.py)
        self._data_version: int | None = None

    def check(self, conn: sqlite3.Connection) -> None:
        """Inside the write transaction, before anything is read."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self.clear()
            self._data_version = version

    def clear(self) -> None:
        self.sessions.clear()
        self.identities.clear()
        self.catalog.clear()
        self.cart_bytes = 0

    def trim(self) -> None:
        """Forget the least recently used sessions beyond ``limit`` sessions or
        ``cart_bytes_limit`` bytes of carts (a writer once grew to 466 MB of carts)."""
        excess = len(self.sessions) - self.limit
        if excess > 0:
            for key in list(itertools.islice(self.sessions, excess)):
                self.cart_bytes -= len(self.sessions.pop(key).cart_items or b"")
        while self.cart_bytes > self.cart_bytes_limit and self.sessions:
            key = next(iter(self.sessions))
            self.cart_bytes -= len(self.sessions.pop(key).cart_items or b"")
        if len(self.identities) > self.limit:
            self.identities.clear()


_new_guid = rules.new_guid


def _flag(value: Any) -> int | None:
    return None if value is None else int(bool(value))


def insert_deliveries(conn: sqlite3.Connection,
                      rows: Iterable[tuple[str, int, Any, str | None]], now: int) -> None:
    """(site_id, event seq, PlannedDelivery, request id) rows; one per (site, vendor,
    dedup_key, claim). The request id is the HTTP request's that planned it (server/logs.py).

    A fact planned twice is kept once, and so is a claim. A browser's claim never holds the
    key a backend fact needs (server/trust.py): each kind has its own row, and where they
    meet, the fact wins — see ``_insert_fact``. The claim side is the hot path: one statement
    for all of them, plus a look-up per order a vendor's library took in the page, whose
    match may cancel a backend copy still waiting out its grace (``_matches_waiting_fact``).
    Only orders: other keys name the event's own id or a cart state's guid, which a backend
    copy does not share.
    """
    claims, facts = [], []
    for site_id, seq, r, request_id in rows:
        if r.claim:
            claims.append((site_id, r.vendor, r.dedup_key, seq, r.visitor, r.state,
                           encode(r.request), now + r.delay_ms, r.error, now, request_id))
            if r.state == outbox.BROWSER and r.event["name"] in trust.ORDER_EVENTS:
                _matches_waiting_fact(conn, site_id, r, now)
        else:
            facts.append((site_id, seq, r, request_id))
    if claims:
        conn.executemany(_CLAIM_INSERT, claims)
    for site_id, seq, r, request_id in facts:
        _insert_fact(conn, site_id, seq, r, now, request_id)


# ``rules.claim_taken`` in SQL: a claim the server would send, under a key a backend fact
# holds, is not sent: the fact is the vendor's truth. One index probe in VALUES (an INSERT ... SELECT form cost each row
# about twice as much, measured on a bare deliveries table).
_TAKEN = ("?6 IN ('pending', 'held') AND EXISTS (SELECT 1 FROM deliveries f WHERE "
          "f.site_id = ?1 AND f.vendor = ?2 AND f.dedup_key = ?3 AND f.claim = 0)")
_CLAIM_INSERT = (
    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, next_attempt_ms, last_error, created_ms, updated_ms, request_id) "
    f"VALUES (?1, ?2, ?3, 1, ?4, ?5, CASE WHEN {_TAKEN} THEN 'ignored' ELSE ?6 END, "
    f"CAST(?7 AS TEXT), ?8, CASE WHEN {_TAKEN} THEN '{rules.CLAIM_TAKEN_ERROR}' ELSE ?9 END, "
    "?10, ?10, ?11) ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING")
# A fact due after it is made (waiting out ``[server] browser_grace_s`` for the page's own
# copy) keeps when it falls due in ``due_ms``: its age as a pending row counts from then
# (``deadletters.OLDEST_PENDING``). NULL: due when made.
_FACT_INSERT = (
    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, next_attempt_ms, due_ms, last_error, created_ms, updated_ms, request_id) "
    "VALUES (?, ?, ?, 0, ?, ?, ?, CAST(? AS TEXT), ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING")
_OTHER = ("SELECT d.id, d.state, d.attempts, d.request, e.data FROM deliveries d "
          "JOIN events e ON e.seq = d.event_seq "
          "WHERE d.site_id = ? AND d.vendor = ? AND d.dedup_key = ? AND d.claim = ?")


def _same_fact(row: Mapping[str, Any], planned: Any) -> bool:
    return rules.same_fact(loads(row["data"]), loads(row["request"]), planned.event,
                           planned.request)


def _matches_waiting_fact(conn: sqlite3.Connection, site_id: str, r: Any, now: int) -> None:
    """A vendor's library took in the page the very fact a backend copy waits to send (a
    ``fallback`` route's grace): the vendor has it, so that copy is not sent. Only the same
    fact (order id, email, value, currency): a differing claim leaves the fact alone."""
    for row in conn.execute(_OTHER + " AND d.state IN ('pending', 'held') AND d.attempts = 0",
                            (site_id, r.vendor, r.dedup_key, 0)).fetchall():
        if rules.waiting_fact_superseded(row["state"], row["attempts"], _same_fact(row, r)):
            conn.execute("UPDATE deliveries SET state = 'browser', updated_ms = ?, "
                         "last_error = ? WHERE id = ?",
                         (now, rules.FACT_SUPERSEDED_ERROR, row["id"]))


def _insert_fact(conn: sqlite3.Connection, site_id: str, seq: int, r: Any, now: int,
                 request_id: str | None = None) -> None:
    """A backend (fact) row, given the browser's claim under the same key, if any
    (``rules.fact_meets_claim``)."""
    claim = conn.execute(_OTHER, (site_id, r.vendor, r.dedup_key, 1)).fetchone()
    same = claim is not None and r.state in (outbox.PENDING, outbox.HELD) and _same_fact(claim, r)
    state, request, error, cancel = rules.fact_meets_claim(r.vendor, r.state, r.request,
                                                           r.error, claim, same)
    if cancel:
        conn.execute("UPDATE deliveries SET state = 'ignored', updated_ms = ?, "
                     "last_error = ? WHERE id = ?",
                     (now, rules.CLAIM_SUPERSEDED_ERROR, claim["id"]))
    delay = r.delay_ms if state == outbox.PENDING else 0
    conn.execute(_FACT_INSERT, (site_id, r.vendor, r.dedup_key, seq, r.visitor, state,
                                encode(request), now + delay, now + delay if delay else None,
                                error, now, now, request_id))


def load_orders(conn: sqlite3.Connection, wanted: Sequence[tuple[str, str, str]]
                ) -> rules.KnownOrders:
    """The stored order requests status changes repeat (``rules.KnownOrders``): the rows
    under ``wanted`` (site id, vendor, dedup key) that ``orders_statements`` select."""
    orders = rules.KnownOrders(wanted)
    for sql, params in orders_statements(wanted):
        for site_id, vendor, key, claim, state, request in conn.execute(sql, params):
            orders.add(site_id, vendor, key, claim, state, loads(request))
    return orders


def orders_statements(wanted: Sequence[tuple[str, str, str]]
                      ) -> Iterable[tuple[str, tuple[Any, ...]]]:
    """(sql, params) finding the rows under ``wanted``: one statement per (site, vendor)
    and chunk of keys, each key a search of the unique (site_id, vendor, dedup_key, claim)
    index. Shared by the writer (``load_orders``) and the store's reader
    (``SQLiteStore.known_orders``); rows are (site, vendor, key, claim, state, request)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for site_id, vendor, key in wanted:
        groups.setdefault((site_id, vendor), []).append(key)
    for (site_id, vendor), keys in groups.items():
        for chunk in _chunks(keys):
            yield (_ORDERS + f"({','.join('?' * len(chunk))}) ORDER BY claim, id",
                   (site_id, vendor, *chunk))


_ORDERS = ("SELECT site_id, vendor, dedup_key, claim, state, request FROM deliveries "
           "WHERE site_id = ? AND vendor = ? AND dedup_key IN ")


def _by_site(values: Mapping[str, set[str]]) -> Iterable[tuple[str, Sequence[str]]]:
    for site_id, items in values.items():
        for chunk in _chunks(sorted(items)):
            yield site_id, chunk


_check_cart = rules.check_cart


class IngestBatch:
    def __init__(self, conn: sqlite3.Connection, sites: Mapping[str, Any], now: int,
                 hold_ms: int, browser_grace_ms: int, cache: SessionCache):
        self.conn = conn
        self.sites = sites
        self.now = now
        self.hold_ms = hold_ms
        self.grace_ms = browser_grace_ms
        self.cache = cache
        self.sessions = self.cache.sessions
        self.identities = self.cache.identities
        self.dirty: dict[tuple[str, str], _Session] = {}  # sessions to write at the next flush
        self.bound: set[tuple[str, str]] = set()  # ... whose identity changed too
        self.dirty_carts: set[tuple[str, str]] = set()  # ... whose cart changed too
        # Each changed cart's lines and their JSON, as ``_check_cart`` encoded them: the
        # flush writes those bytes instead of encoding the same lines again.
        self.cart_json: dict[tuple[str, str], tuple[list[dict[str, Any]], bytes]] = {}
        self.event_rows: list[tuple[Any, ...]] = []
        self.delivery_rows: list[tuple[str, int, Any]] = []
        self.products = CatalogBatch(conn, cache.catalog, now)  # what events say of products
        self.orders = rules.KnownOrders()  # what the batch's status changes repeat
        # Identities this batch created that no session was bound to since: none stored is
        # theirs (``_last_session`` reads nothing for them).
        self.new_identities: set[int] = set()

    # The batch ----------------------------------------------------------------------------

    def run(self, requests: Sequence[Request]) -> list[list[tuple[str, int, bool]]]:
        """Per request, an ``IngestResult``-shaped tuple per event (tuples pickle cheaply)."""
        results: list[list[tuple[str, int, bool]]] = [[] for _ in requests]
        known = self._known_events(requests)
        next_seq = self.conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()[0]
        work = []  # (seq, site_id, event, raw, user agent, (request, position))
        self.request_ids = [request[4] for request in requests]
        for index, (site_id, events, raws, user_agent, _) in enumerate(requests):
            for position, (event, raw) in enumerate(zip(events, raws)):
                # The backend's ids are its own, a browser's its session's (rules.event_scope):
                # neither suppresses the backend's nor another visitor's event.
                key = (site_id, event["event_id"], rules.event_scope(event))
                if key in known:
                    results[index].append((event["event_id"], known[key], True))
                    continue
                known[key] = next_seq
                results[index].append((event["event_id"], next_seq, False))
                work.append((next_seq, site_id, event, raw, user_agent, (index, position)))
                next_seq += 1
        self._load_state(work)
        wanted = rules.orders_wanted(self.sites, ((site_id, event)
                                                  for _, site_id, event, *_ in work))
        if wanted:
            self.orders = load_orders(self.conn, wanted)
        self.stored_bytes = [0] * len(requests)
        for seq, site_id, event, raw, user_agent, place in work:
            self._apply(seq, self.sites[site_id], event, raw, user_agent, place)
        self.products.flush()
        self._flush()
        self.cache.trim()
        return results

    def _known_events(self, requests: Sequence[Request]
                      ) -> dict[tuple[str, str, str | None], int]:
        """The stored events among the batch's ids, by (site, event id, scope): a probe of
        the unique index ``events_id`` by its first two columns."""
        ids: dict[str, list[str]] = {}
        for site_id, events, *_ in requests:
            ids.setdefault(site_id, []).extend(event["event_id"] for event in events)
        known = {}
        for site_id, event_ids in ids.items():
            for chunk in _chunks(event_ids):
                rows = self.conn.execute(
                    f"SELECT event_id, seq, {rules.EVENT_SCOPE_SQL} FROM events WHERE "
                    f"site_id = ? AND event_id IN ({','.join('?' * len(chunk))})",
                    (site_id, *chunk))
                known.update(((site_id, event_id, scope), seq)
                             for event_id, seq, scope in rows)
        return known

    def _load_state(self, work: Sequence[tuple[Any, ...]]) -> None:
        """The batch's sessions and identities into the cache: read only those it lacks."""
        sessions, missing, keys = self.sessions, {}, set()
        for _, site_id, event, _, _, _ in work:
            sc = event["sc"]
            if sc:
                key = (site_id, sc)
                keys.add(key)
                state = sessions.pop(key, None)
                if state is not None:
                    sessions[key] = state  # most recently used last
                else:
                    missing.setdefault(site_id, set()).add(sc)
        # One site per query, so the index on (site_id, sc) is searched, not scanned.
        for site_id, chunk in _by_site(missing):
            for sc, *values in self.conn.execute(
                    f"{_SESSION_SELECT} AND sc IN ({','.join('?' * len(chunk))})",
                    (site_id, *chunk)):
                state = sessions[(site_id, sc)] = _Session(*values)
                self.cache.cart_bytes += len(state.cart_items or b"")
        identity_ids = sorted({sessions[key].identity_id for key in keys if key in sessions}
                              - {None} - self.identities.keys())
        for chunk in _chunks(identity_ids):
            for row in self.conn.execute(
                    f"SELECT * FROM identities WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                self.identities[row["id"]] = identity_known(row)

    def _apply(self, seq: int, site: Any, event: dict[str, Any], raw: bytes,
               user_agent: str | None, place: tuple[int, int] = (0, 0)) -> None:
        sc = event["sc"]
        key = (site.id, sc)
        if sc:
            state = self.sessions.get(key)
            if state is None:
                state = self.sessions[key] = _Session(None, self.now, first_ms=self.now,
                                                      first_seq=seq, last_seq=seq)
            state.last_ms = self.now
            state.user_agent = user_agent or state.user_agent
            state.last_page = (event.get("page") or {}).get("location") or state.last_page
            state.first_seq = state.first_seq or seq  # NULL if older than migration 003's data
            state.last_seq = seq
            self.dirty[key] = state
        identity, binding = self._identity(site.id, event)
        if identity and not sc:
            # A backend event names no session: the customer's latest one, for vendors that
            # require the visitor's cookie (eSputnik's cookies.sc).
            last = self._last_session(site, identity["id"])
            identity["last_sc"] = last.last_sc
            if last.unverified is not None and outbox.unverified_sessions_wanted(site, event):
                identity[rules.UNVERIFIED_SESSIONS] = last.unverified
        event["identity"] = identity
        if sc and event["name"] in CART_EVENTS:
            event["cart"] = self._cart(site, event, place)
        priceless = outbox.catalog_prices_wanted(site, event)
        if priceless:  # a vendor requires prices: the catalog's for lines without one
            catalog.add_prices(event, self.products.prices(site.id, priceless))
        data = encode(event)
        self.event_rows.append((seq, site.id, event["event_id"], event["name"], event["source"],
                                sc, identity["id"] if identity else None, self.now, raw, data))
        planned = outbox.plan(site, event, None, self.grace_ms, self.orders)
        self.orders.planned(site.id, planned)
        if event["name"] in catalog.EVENTS:
            self.products.observe(site.id, event, product_sync.planned_by_event(event, planned)
                                  if event["name"] in catalog.FACT_EVENTS else frozenset())
        request, _ = place
        request_id = self.request_ids[request]
        self.delivery_rows.extend((site.id, seq, row, request_id) for row in planned)
        self.stored_bytes[request] = charge_stored(self.stored_bytes[request], len(raw),
                                                   len(data), len(planned))
        visitors = (rules.held_visitors(sc, identity, binding, rules.signs_identities(site))
                    if sc and identity and identity.get("email") else [])
        if visitors:
            self._flush()  # what waited must be in the database to be found
            self._release_held(site, sc, identity, visitors, request_id)

    def _flush(self) -> None:
        """Write what changed since the last flush: sessions, then events and deliveries."""
        conn = self.conn
        for key in self.dirty_carts:
            state = self.sessions[key]
            cart = state.cart
            before = len(state.cart_items or b"")
            lines, encoded = self.cart_json.pop(key, (None, b""))
            if cart and lines is not cart[0]:
                encoded = encode(cart[0])
            state.cart_items, state.cart_guid, state.cart_currency, state.cart_id = (
                (encoded, *cart[1:]) if cart else (None, None, None, None))
            state.cart_updated_ms = self.now
            size = len(state.cart_items or b"")
            self.cache.cart_bytes += size - before
            if size > PARSED_CART_BYTES:
                state.cart = _UNREAD  # kept as its JSON only: read again when needed
        self.dirty_carts.clear()
        if self.dirty:
            updates, inserts = [], []
            for (site_id, sc), state in self.dirty.items():
                if state.id is not None:
                    updates.append(state.update_values())
                else:
                    inserts.append(((site_id, sc), state))
            if updates:
                conn.executemany(_SESSION_UPDATE, updates)
                conn.executemany(_SESSION_BIND, [(state.identity_id, state.id)
                                                 for key, state in self.dirty.items()
                                                 if key in self.bound and state.id is not None])
            if inserts:  # ids given here, so the cache knows each new row's id
                next_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM sessions").fetchone()[0]
                for offset, (_, state) in enumerate(inserts):
                    state.id = next_id + offset
                conn.executemany(_SESSION_INSERT, [(state.id, site_id, sc, state.last_ms,
                                                    *state.values())
                                                   for (site_id, sc), state in inserts])
            self.dirty.clear()
            self.bound.clear()
        if self.event_rows:
            conn.executemany(
                "INSERT INTO events (seq, site_id, event_id, name, source, sc, identity_id, "
                "received_ms, raw, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS TEXT), "
                "CAST(? AS TEXT))", self.event_rows)
            self.event_rows.clear()
        if self.delivery_rows:
            insert_deliveries(conn, self.delivery_rows, self.now)
            self.delivery_rows.clear()

    # Identity -----------------------------------------------------------------------------

    def _identity(self, site_id: str, event: dict[str, Any]
                  ) -> tuple[dict[str, Any] | None, rules.Binding | None]:
        """The session's identity after ``event``, and what became of the session's binding
        (``rules.Binding``; None: the event left it as it was).

        Trust (server/trust.py, docs/security.md; the rules: ``rules.identity_step``,
        ``rules.bind_session``): an unverified event may bind the session to an email (a
        guest typing it), and creates the identity of an email never seen; of everything
        else it says about a person only the email is kept. A session that changes
        identity starts clean (``_switch``).
        """
        sc = event["sc"]
        state = self.sessions.get((site_id, sc)) if sc else None
        current_id = state.identity_id if state else None
        user = event.get("user") or {}
        current = self.identities[current_id] if current_id is not None else {}
        step = rules.identity_step(event, bool(state is not None and state.verified),
                                   current_id, current)
        if step.kind == rules.KEEP:
            if current_id is None:
                return None, None
            return {**self.identities[current_id], "id": current_id, "is_new": False}, None
        if step.kind == rules.TRUSTED:
            identity_id, is_new = self._upsert_identity(site_id, event)
        elif step.kind == rules.OWN:
            identity_id, is_new = current_id, False  # the session's own: nothing to look up
        else:
            identity_id, is_new = self._claimed_identity(site_id, step.email, user)
        binding = None
        if state is not None:
            binding = rules.bind_session(event["source"], state.verified, current_id,
                                         identity_id)
            if binding.switch:
                self._switch(site_id, sc, state)
            if current_id != identity_id:
                state.identity_id = identity_id
                self.bound.add((site_id, sc))
                self.new_identities.discard(identity_id)
            state.verified = binding.verified
        return {**self.identities[identity_id], "id": identity_id, "is_new": is_new}, binding

    def _claimed_identity(self, site_id: str, email: str, user: dict[str, Any]) -> tuple[int, bool]:
        """An unverified email's identity: the existing one untouched, or a new one with the
        names and phone the browser gave (never consent, never a customer id)."""
        row = self.conn.execute("SELECT * FROM identities WHERE site_id = ? AND email = ?",
                                (site_id, email)).fetchone()
        if row is not None:
            self.identities[row["id"]] = identity_known(row)
            return row["id"], False
        fields = claimed_fields(user)
        identity_id = self.conn.execute(
            "INSERT INTO identities (site_id, email, first_name, last_name, phone, created_ms, "
            "updated_ms) VALUES (?,?,?,?,?,?,?)",
            (site_id, email, fields.get("first_name"), fields.get("last_name"),
             fields.get("phone"), self.now, self.now)).lastrowid
        self.identities[identity_id] = known_since(fields, self.now)
        self.new_identities.add(identity_id)
        return identity_id, True

    def _switch(self, site_id: str, sc: str, state: _Session) -> None:
        """The session was someone else's: what it did then is never sent under the new
        identity. Its cart is emptied, and what waited for an email stays unsent."""
        self._flush()  # earlier events' held rows must be in the database to be found
        self.conn.execute(
            "UPDATE deliveries SET state = 'ignored', updated_ms = ?, last_error = 'identity "
            "switch: held while the session was someone else''s' WHERE site_id = ? AND "
            "visitor = ? AND state = 'held'", (self.now, site_id, f"sc:{sc}"))
        self.dirty[(site_id, sc)] = state  # the flush wrote it; what follows changes it again
        if state.cart is not None:
            state.cart = None
            self.dirty_carts.add((site_id, sc))

    def _upsert_identity(self, site_id: str, event: dict[str, Any]) -> tuple[int, bool]:
        """One identity per (site, email); a customer id also matches. Returns (id, is_new)."""
        conn, user = self.conn, event.get("user") or {}
        row = by_customer = None
        if user.get("email"):
            row = conn.execute("SELECT * FROM identities WHERE site_id = ? AND email = ?",
                               (site_id, user["email"])).fetchone()
        if row is None and user.get("customer_id"):
            by_customer = conn.execute("SELECT * FROM identities WHERE site_id = ? AND "
                                       "customer_id = ?", (site_id, user["customer_id"])).fetchone()
        row = rules.match_identity(user, row, by_customer)
        current = identity_fields(row) if row is not None else None
        fields = rules.merge_identity(current, event)
        check = rules.customer_id_to_check(fields, current)
        held = check is not None and conn.execute(
            "SELECT 1 FROM identities WHERE site_id = ? AND customer_id = ? AND id != ?",
            (site_id, check, row["id"] if row is not None else -1)).fetchone() is not None
        fields = rules.keep_customer_id(fields, current, held)
        if row is None:
            identity_id = conn.execute(
                "INSERT INTO identities (site_id, email, customer_id, first_name, last_name, "
                "phone, accepts_marketing, created_ms, updated_ms) VALUES (?,?,?,?,?,?,?,?,?)",
                (site_id, fields.get("email"), fields.get("customer_id"), fields.get("first_name"),
                 fields.get("last_name"), fields.get("phone"),
                 _flag(fields.get("accepts_marketing")), self.now, self.now)).lastrowid
            self.identities[identity_id] = known_since(fields, self.now)
            self.new_identities.add(identity_id)
            return identity_id, True
        identity_id = row["id"]
        if fields != current:
            conn.execute(
                "UPDATE identities SET email = ?, customer_id = ?, first_name = ?, last_name = ?, "
                "phone = ?, accepts_marketing = ?, updated_ms = ? WHERE id = ?",
                (fields.get("email"), fields.get("customer_id"), fields.get("first_name"),
                 fields.get("last_name"), fields.get("phone"),
                 _flag(fields.get("accepts_marketing")), self.now, identity_id))
        self.identities[identity_id] = known_since(fields, row["created_ms"])
        return identity_id, False

    def _last_session(self, site: Any, identity_id: int) -> rules.LastSession:
        """The identity's ``last_sc`` (``rules.latest_session``; only a verified session's on
        a site with ``identity_secret``: ``rules.signs_identities``), and there, with none
        verified, whether unverified ones are known (``rules.LastSession``): from the
        sessions written in this batch and not flushed yet, else from one read of the
        database's; no read for an identity this batch created that no session was bound
        to since."""
        site_id, signing = site.id, rules.signs_identities(site)
        last, unwritten = rules.LastSession.unwritten(
            ((sc, state) for (sid, sc), state in self.dirty.items()
             if sid == site_id and state.identity_id == identity_id), signing)
        if last is not None:
            return last
        row = None
        if identity_id not in self.new_identities:
            row = self.conn.execute(
                f"SELECT {rules.LAST_SC_COLUMNS} FROM sessions WHERE site_id = ? AND "
                f"identity_id = ? {rules.last_sc_sql(signing)}", (site_id, identity_id)
            ).fetchone()
        return rules.LastSession.stored(row, signing, unwritten)

    # Cart ---------------------------------------------------------------------------------

    def _cart(self, site: Any, event: dict[str, Any],
              place: tuple[int, int] = (0, 0)) -> dict[str, Any] | None:
        """The cart after ``event`` (``rules.cart_step``: the GUID policy), checked."""
        key = (site.id, event["sc"])
        state = self.sessions[key]
        if state.cart is _UNREAD:
            state.cart = (loads(state.cart_items), state.cart_guid, state.cart_currency,
                          state.cart_id)
        step = rules.cart_step(state.cart or None, event, site.currency, _new_guid,
                               site.max_cart_lines)
        if step is None:
            return None
        field = f"events[{place[1]}].ecommerce.items"
        self.cart_json[key] = (step.lines, _check_cart(step.lines, site, field))
        self.dirty_carts.add(key)
        state.cart = step.cart
        return step.snapshot

    # Held deliveries ----------------------------------------------------------------------

    def _release_held(self, site: Any, sc: str, identity: dict[str, Any],
                      visitors: list[str], request_id: str | None = None) -> None:
        """The session just got an email (or a verified one): re-plan what waited for one,
        and the customer's backend rows that waited for a session of theirs (``visitors``:
        ``rules.held_visitors``), within the window."""
        conn, now = self.conn, self.now
        held = conn.execute(
            "SELECT d.event_seq, d.vendor, d.created_ms, e.data FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            f"WHERE d.site_id = ? AND d.visitor IN ({', '.join('?' * len(visitors))}) "
            "AND d.state = 'held' ORDER BY d.id", (site.id, *visitors)).fetchall()
        released = rules.held_release(held, now, self.hold_ms)
        events = {seq: loads(data) for seq, data, _, fresh in released if fresh}
        orders = load_orders(conn, rules.orders_wanted(
            self.sites, ((site.id, event) for event in events.values())))
        for seq, _, vendors, fresh in released:
            if not fresh:
                conn.execute("UPDATE deliveries SET state = 'expired', updated_ms = ? "
                             "WHERE event_seq = ? AND state = 'held'", (now, seq))
                continue
            event = rules.released_event(events[seq], identity, sc)
            conn.execute("DELETE FROM deliveries WHERE event_seq = ? AND state = 'held'", (seq,))
            planned = outbox.plan(site, event, vendors, self.grace_ms, orders)
            orders.planned(site.id, planned)
            insert_deliveries(conn, [(site.id, seq, row, request_id) for row in planned], now)
