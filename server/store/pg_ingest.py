"""Ingest for one PostgreSQL group commit: every request a node gathered, in one transaction.

The same steps as SQLite's ``IngestBatch`` and the same rules (``store/rules.py``,
``outbox.plan``), without its cache: other nodes write the same tables, so every batch
reads the rows it needs, and locks them, inside its transaction.

Concurrency (several nodes, one visitor in two tabs; docs/architecture.md):

- Sessions: before any event is applied, the batch's stored sessions are locked with
  ``SELECT ... FOR UPDATE`` (in the statement that looks its event ids up), then those not
  stored are created and locked (``INSERT ... ON CONFLICT DO UPDATE``), each in (site_id,
  sc) order. A second node with events of the same visitor waits for the first's commit,
  then reads the session (its cart, identity, seq bounds) as the first left it: no lost
  update. Two batches can deadlock over sessions only when a third transaction commits a
  new session between their reads (one finds it stored, the other creates it after
  locking another): rare, detected by PostgreSQL, and run again like any deadlock.
- Identities: read ``FOR UPDATE`` before being changed (by session, in id order; by email
  or customer id as events name them). Two nodes creating one email's identity at once:
  the second fails on the unique index and its transaction is run again (``postgres.py``),
  finding the first's.
- Event ids: a duplicate sent to two nodes at once: the second insert fails on
  ``events_id`` and its transaction is run again, answering ``duplicate``.
- A backend fact and a browser claim under one key (orders): an advisory transaction lock
  on the key, taken in key order, orders the two checks (``rules.fact_meets_claim``).
  Other claim keys name the event's own id or a cart GUID, which no fact shares.
- An order's status change and its purchase (``load_orders``): the batch takes the advisory
  locks of the purchase keys it reads, in key order, before reading them; a purchase another
  node is committing holds that lock, so it is waited for and read.

Whatever still deadlocks (identities named in different orders by two batches) is run
again by the caller; a transaction is never half applied.

Most batches need none of those locks (``PgIngestBatch.run_optimistic``): browser events
of visitors they don't identify, no order, no backend fact, no product to write. Such a
batch reads its sessions, their identities and its products without a lock, applies the
same rules, and writes in one statement that is its own transaction (``ingest_write``,
migration 027): a session is written only if it is still the version read (its ``xmin``)
and created only if no one created it meanwhile, else nothing is written and the batch
runs again locked (``NeedsLocks``, serialization failure). Two round trips where the
locked transaction takes four or more: BEGIN and COMMIT are each a round trip, and a
node's group commit waits on its round trips, not on the database's work.
"""

from __future__ import annotations

import time
from operator import attrgetter
from typing import Any, Iterable, Mapping, Sequence

from .. import catalog, outbox, product_sync, trust
from ..jsontext import encode, loads
from ..sessions import IDENTITY_FIELDS, claimed_fields
from . import pg_catalog, rules
from .pg_catalog import PgCatalogBatch
from .rules import CART_EVENTS, charge_stored, identity_fields, identity_known, known_since

Request = tuple[str, Sequence[dict[str, Any]], Sequence[bytes], str | None, str | None]

_UNREAD = object()  # a cart whose stored JSON has not been parsed yet


def now_ms() -> int:
    """A batch's clock (``PgIngestBatch.now``), as SQLite's ``sqlite_writer.now_ms``."""
    return int(time.time() * 1000)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _flag(value: Any) -> int | None:
    return None if value is None else int(bool(value))


# The ingest_session composite's fields in the type's order (migrations 025, 027, 034:
# 027 appended the key and version, 034 cart_id after them); its rows are built from it.
_SESSION_FIELDS = ("id", "identity_id", "last_ms", "user_agent", "last_page", "first_seq",
                   "last_seq", "cart_guid", "cart_currency", "cart_items", "cart_updated_ms",
                   "verified", "version", "site_id", "sc", "cart_id")
# The fields an ingest writes to a session (all but its key and the version read).
_SESSION_COLUMNS = tuple(f for f in _SESSION_FIELDS if f not in ("id", "version", "site_id", "sc"))
_SESSION_READ = ("id", "site_id", "sc", *_SESSION_COLUMNS)


class _Session:
    """A session row as the batch changes it: locked by this transaction, or (an optimistic
    batch's) read at ``version``, or new (``id`` None) to be created."""

    __slots__ = (*_SESSION_READ, "version", "cart")

    def __init__(self, row: Sequence[Any], version: int | None = None):
        """``row``: the ``_SESSION_READ`` columns, in order."""
        for name, value in zip(_SESSION_READ, row):
            setattr(self, name, value)
        self.version = version
        self.cart: Any = _UNREAD if self.cart_items is not None else None

    @classmethod
    def new(cls, site_id: str, sc: str) -> "_Session":
        return cls((None, site_id, sc) + (None,) * len(_SESSION_COLUMNS))


# The sessions changed, one ingest_session row each, its fields in the type's order.
_session_row = attrgetter(*_SESSION_FIELDS)
_SESSION_UPDATE = (
    "UPDATE sessions s SET " + ", ".join(f"{c} = u.{c}" for c in _SESSION_COLUMNS)
    + " FROM unnest($1::ingest_session[]) AS u WHERE s.id = u.id")
# The new events, one ingest_event row each (migration 025), in the columns' order.
_EVENT_INSERT = ("INSERT INTO events (seq, site_id, event_id, name, source, sc, identity_id, "
                 "received_ms, raw, data) SELECT * FROM unnest($2::ingest_event[])")


# The sessions' update and the events' insert in one statement (one round trip): they touch
# different tables, so the data-modifying CTE's shared snapshot changes nothing.
_SESSIONS_AND_EVENTS = "WITH touched AS (" + _SESSION_UPDATE + " RETURNING 1) " + _EVENT_INSERT
# ... and, in the same round trip, the products the batch observed (as last committed,
# unlocked: ``PgCatalogBatch.flush`` locks those it writes).
_SESSIONS_EVENTS_PRODUCTS = (
    "WITH touched AS (" + _SESSION_UPDATE + " RETURNING 1), added AS (" + _EVENT_INSERT
    + " RETURNING 1) " + pg_catalog.read_statement(3, lock=False))
# Each distinct (site, event id, scope) of the batch (``rules.event_scope``: '' for the
# backend's ids, a browser's sc for its): its stored seq if it is stored, else
# a new seq from the shared sequence. A lookup a key (LATERAL), on the whole of the unique
# index events_id: a prepared statement's generic plan is made once, often while the table
# is nearly empty, and not made again until an ANALYZE; as a plain join such a plan hashed
# a scan of the whole table, a cost growing with every event stored (measured: 1.1 ms a
# batch after 5 s of bench/pg_ingest.py, 9.7 ms after 20 s, with autovacuum off). A lookup
# per key (LIMIT 1 keeps the planner from flattening it into a join) is an index probe whatever the table's size was when it was planned.
# The sequence's name is looked up once a statement (an InitPlan), not once a row.
_KNOWN_COLUMNS = ("u.s, u.i, u.b, e.seq, CASE WHEN e.seq IS NULL THEN "
                  "nextval((SELECT pg_get_serial_sequence('events', 'seq')::regclass)) END")
_KNOWN_FROM = (
    " FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[])) AS u(s, i, b) "
    "LEFT JOIN LATERAL (SELECT seq FROM events WHERE site_id = u.s AND event_id = u.i "
    f"AND ({rules.EVENT_SCOPE_SQL}) = u.b LIMIT 1) AS e ON true")
_KNOWN_AND_SEQS = "SELECT " + _KNOWN_COLUMNS + _KNOWN_FROM
# The batch's stored sessions, locked in the order of the arrays ((site_id, sc) order): a
# probe a key (as above), FOR UPDATE waiting for another node's transaction that holds the
# row, then returning the row as that one committed it. Locking a stored row costs
# PostgreSQL less than half what the upsert below does (measured: 32 rows, 0.65 ms of its
# CPU against 1.5 ms: the upsert draws an id, probes the index, then writes a new row
# version that the batch's update replaces again).
_SESSIONS_STORED = (
    "SELECT " + ", ".join(f"t.{c}" for c in _SESSION_READ) + ", NULL::text AS k_s, "
    "NULL::text AS k_i, NULL::text AS k_b, NULL::bigint AS k_seq, NULL::bigint AS k_new "
    "FROM unnest($4::text[], $5::text[]) AS u(s, sc) CROSS JOIN LATERAL "
    "(SELECT * FROM sessions WHERE site_id = u.s AND sc = u.sc FOR UPDATE) AS t")
# Both in one round trip: the sessions' rows first (their locks taken first), then a row a
# distinct event key, its session columns NULL (k_s is NULL on a session's row).
_KNOWN_AND_SESSIONS = (
    _SESSIONS_STORED + " UNION ALL SELECT " + ", ".join(["NULL"] * len(_SESSION_READ))
    + "," + _KNOWN_AND_SEQS[len("SELECT"):])
_IDENTITY_READ = (*IDENTITY_FIELDS, "created_ms")  # rules.identity_known's columns
# An optimistic batch's one read (``run_optimistic``), nothing locked: its stored sessions
# with their versions (xmin: every update of a row changes it) and identities, its event
# keys as above, and the products its events name. Three kinds of rows, each an anonymous
# record (asyncpg reads one as a tuple), so that one statement returns them all. Every join
# a probe of a unique key (LATERAL ... LIMIT 1), as above.
_READ_UNLOCKED = (
    "SELECT 's', ROW(" + ", ".join(f"t.{c}" for c in _SESSION_READ)
    + ", t.xmin::text::bigint, " + ", ".join(f"i.{c}" for c in _IDENTITY_READ) + ") "
    "FROM unnest($4::text[], $5::text[]) AS u(s, sc) CROSS JOIN LATERAL "
    "(SELECT *, xmin FROM sessions WHERE site_id = u.s AND sc = u.sc) AS t "
    "LEFT JOIN LATERAL (SELECT * FROM identities WHERE id = t.identity_id LIMIT 1) AS i "
    "ON true "
    "UNION ALL SELECT 'k', ROW(" + _KNOWN_COLUMNS + ")" + _KNOWN_FROM
    + " UNION ALL SELECT 'p', ROW({}){}".format(*pg_catalog.read_parts(6, lock=False)))
# The sessions not found stored, created and locked, in (site_id, sc) order, in one
# statement: ON CONFLICT DO UPDATE locks a row another node created meanwhile (waiting for
# its transaction, then returning the row as that one committed it) and returns it as the
# insert returns a new one.
_SESSIONS_LOCKED = (
    "INSERT INTO sessions AS t (site_id, sc, first_ms, last_ms) "
    "SELECT s, sc, $3, $3 FROM unnest($1::text[], $2::text[]) AS u(s, sc) ORDER BY s, sc "
    "ON CONFLICT (site_id, sc) DO UPDATE SET last_ms = t.last_ms RETURNING "
    + ", ".join(f"t.{c}" for c in _SESSION_READ))
_DELIVERY_INSERT = (
    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, next_attempt_ms, last_error, created_ms, updated_ms, request_id) "
    "SELECT s, v, k, c, q, w, st, r, n, e, $13, $13, rid FROM unnest($1::text[], $2::text[], "
    "$3::text[], $4::smallint[], $5::bigint[], $6::text[], $7::text[], $8::text[], "
    "$9::bigint[], $10::text[], $11::text[], $12::int[]) "
    "AS u(s, v, k, c, q, w, st, r, n, e, rid, ord) ORDER BY ord "
    "ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING")
# The stored order requests status changes repeat (``load_orders``): a probe of the unique
# (site_id, vendor, dedup_key, claim) index a key.
_ORDERS = ("SELECT u.s, u.v, u.k, d.claim, d.state, d.request FROM unnest($1::text[], "
           "$2::text[], $3::text[]) AS u(s, v, k) CROSS JOIN LATERAL (SELECT claim, state, "
           "request, id FROM deliveries WHERE site_id = u.s AND vendor = u.v "
           "AND dedup_key = u.k) AS d ORDER BY d.claim, d.id")
_ORDER_LOCKS = ("SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) "
                "FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) AS keys")
_OTHER = ("SELECT d.id, d.state, d.attempts, d.request, e.data FROM deliveries d "
          "JOIN events e ON e.seq = d.event_seq "
          "WHERE d.site_id = $1 AND d.vendor = $2 AND d.dedup_key = $3 AND d.claim = $4")


class PgIngestBatch:
    def __init__(self, conn: Any, sites: Mapping[str, Any], hold_ms: int,
                 browser_grace_ms: int):
        self.conn = conn
        self.sites = sites
        self.hold_ms = hold_ms
        self.grace_ms = browser_grace_ms
        self.now = now_ms()
        self.sessions: dict[tuple[str, str], _Session] = {}
        self.identities: dict[int, dict[str, Any]] = {}
        self.dirty: set[tuple[str, str]] = set()  # sessions to write at the next flush
        self.cart_json: dict[tuple[str, str], tuple[list[dict[str, Any]], bytes]] = {}
        self.event_rows: list[tuple[Any, ...]] = []
        self.delivery_rows: list[tuple[str, int, Any, str | None]] = []
        self.products = PgCatalogBatch(conn, self.now)  # what events say of products
        self.orders = rules.KnownOrders()  # what the batch's status changes repeat
        # Identities this batch created that no session was bound to since: none stored is
        # theirs (``_last_session`` reads nothing for them).
        self.new_identities: set[int] = set()

    # The batch ----------------------------------------------------------------------------

    async def run(self, requests: Sequence[Request]) -> list[list[tuple[str, int, bool]]]:
        """Per request, an ``IngestResult``-shaped tuple per event: the locked transaction
        (the caller's)."""
        known, seqs, stored = await self._known_events(requests)
        results, work = self._sequenced(requests, known, seqs)
        await self._load_state(work, stored)
        wanted = rules.orders_wanted(self.sites, ((site_id, event)
                                                  for _, site_id, event, *_ in work))
        if wanted:
            self.orders = await load_orders(self.conn, wanted)
        await self._apply_all(requests, work)
        keys = self.products.keys()
        read = await self._flush(keys)
        # Last: product rows are locked after sessions and identities.
        await self.products.flush(pg_catalog.products_read(keys, read) if keys else None)
        return results

    async def run_optimistic(self, requests: Sequence[Request]
                             ) -> list[list[tuple[str, int, bool]]]:
        """As ``run``, outside any transaction block: one unlocked read, then one write that
        is its own transaction (``ingest_write``). Raises ``NeedsLocks`` (nothing written)
        when the rules want a statement of their own; the write raises a serialization
        failure (nothing written) when a session changed since the read."""
        conn = self.conn
        product_keys = named_products(requests)
        known, seqs, stored, products = await self._read_unlocked(requests, product_keys)
        self.products.know_prices(products)
        results, work = self._sequenced(requests, known, seqs)
        self.sessions = {key: stored.get(key) or _Session.new(*key)
                         for key in _session_keys(work)}
        self.conn = self.products.conn = _LOCKS_NEEDED
        await self._apply_all(requests, work)
        if not set(self.products.keys()) <= products.keys() or self.products.writes(products):
            raise NeedsLocks("a product to write")
        claims = []
        for site_id, seq, r, request_id in self.delivery_rows:
            if not r.claim or r.event["name"] in trust.ORDER_EVENTS:
                raise NeedsLocks("an order or a backend fact to deliver")
            claims.append((site_id, r.vendor, r.dedup_key, seq, r.visitor, r.state,
                           encode(r.request).decode(), self.now + r.delay_ms, r.error,
                           request_id))
        changed, created = [], []
        for state in self._dirty_sessions():
            (changed if state.id is not None else created).append(_session_row(state))
        self.conn = conn
        if not (changed or created or self.event_rows or claims):
            return results  # duplicates only: nothing to write
        await conn.execute(_INGEST_WRITE, changed, created, self.event_rows,
                           *([list(c) for c in zip(*claims)] if claims else [[]] * 10),
                           list(rules.CLAIM_TAKEN_STATES), outbox.IGNORED,
                           rules.CLAIM_TAKEN_ERROR, self.now)
        return results

    def _sequenced(self, requests: Sequence[Request], known: dict[tuple[str, str, str | None], Any],
                   seqs: list[int]) -> tuple[list[list[tuple[str, int, bool]]], list[Any]]:
        """Each event's answer (a new seq, or the stored one's: a duplicate), and the new
        events to apply: (seq, site_id, event, raw, user agent, (request, position))."""
        results: list[list[tuple[str, int, bool]]] = [[] for _ in requests]
        fresh = []  # (request index, position, key)
        for index, (site_id, events, *_rest) in enumerate(requests):
            for position, event in enumerate(events):
                key = (site_id, event["event_id"], rules.event_scope(event))
                if key not in known:
                    known[key] = None  # taken by this batch: later copies are duplicates
                    fresh.append((index, position, key))
        assert len(seqs) == len(fresh), "one sequence value for each new event"
        new_seq = {}
        for (index, position, key), seq in zip(fresh, seqs):
            new_seq[(index, position)] = seq
            known[key] = seq
        work = []
        for index, (site_id, events, raws, user_agent, _) in enumerate(requests):
            for position, (event, raw) in enumerate(zip(events, raws)):
                seq = new_seq.get((index, position))
                if seq is None:
                    key = (site_id, event["event_id"], rules.event_scope(event))
                    results[index].append((event["event_id"], known[key], True))
                    continue
                results[index].append((event["event_id"], seq, False))
                work.append((seq, site_id, event, raw, user_agent, (index, position)))
        return results, work

    async def _apply_all(self, requests: Sequence[Request], work: Sequence[Any]) -> None:
        self.request_ids = [request[4] for request in requests]
        self.stored_bytes = [0] * len(requests)
        for seq, site_id, event, raw, user_agent, place in work:
            await self._apply(seq, self.sites[site_id], event, raw, user_agent, place)

    async def _read_unlocked(self, requests: Sequence[Request],
                             product_keys: list[tuple[str, str]]) -> tuple[
            dict[tuple[str, str, str | None], Any], list[int], dict[tuple[str, str], _Session],
            dict[tuple[str, str], Any]]:
        """``_known_events``' answers without a lock, with each stored session's version
        and identity, and the products of ``product_keys``: one round trip."""
        sites, ids, scopes, keys = _event_keys(requests)
        known, seqs, stored, products = {}, [], {}, []
        at = len(_SESSION_READ)
        for kind, row in await self.conn.fetch(
                _READ_UNLOCKED, sites, ids, scopes, [k[0] for k in keys],
                [k[1] for k in keys], [k[0] for k in product_keys],
                [k[1] for k in product_keys]):
            if kind == "s":
                session = _Session(row, version=row[at])
                stored[(session.site_id, session.sc)] = session
                if session.identity_id is not None:
                    self.identities[session.identity_id] = identity_known(
                        dict(zip(_IDENTITY_READ, row[at + 1:])))
            elif kind == "k":
                if row[3] is None:
                    seqs.append(row[4])
                else:
                    known[row[:3]] = row[3]
            else:
                products.append(row)
        seqs.sort()
        return known, seqs, stored, pg_catalog.products_read(product_keys, products)

    async def _known_events(self, requests: Sequence[Request]
                            ) -> tuple[dict[tuple[str, str, str | None], Any], list[int],
                                       dict[tuple[str, str], _Session]]:
        """The batch's events already stored (key: seq), a seq from the shared sequence for
        each distinct new one, ascending, and the stored sessions of the batch's first
        copies of each event, locked: one round trip."""
        sites, ids, scopes, keys = _event_keys(requests)
        known, seqs, stored = {}, [], {}
        at = len(_SESSION_READ)
        for row in await self.conn.fetch(_KNOWN_AND_SESSIONS, sites, ids, scopes,
                                         [k[0] for k in keys], [k[1] for k in keys]):
            if row[at] is None:
                stored[(row["site_id"], row["sc"])] = _Session(row)
            elif row[at + 3] is None:
                seqs.append(row[at + 4])
            else:
                known[(row[at], row[at + 1], row[at + 2])] = row[at + 3]
        seqs.sort()
        return known, seqs, stored

    async def _load_state(self, work: Sequence[tuple[Any, ...]],
                          stored: dict[tuple[str, str], _Session]) -> None:
        """The batch's sessions (``stored``: those found stored, locked), those missing
        created and locked, in (site, sc) order; their identities, locked, in id order."""
        keys = _session_keys(work)
        if not keys:
            return
        missing = [key for key in keys if key not in stored]
        if missing:  # a visitor's first events: after the stored ones are locked
            for row in await self.conn.fetch(_SESSIONS_LOCKED, [k[0] for k in missing],
                                             [k[1] for k in missing], self.now):
                stored[(row["site_id"], row["sc"])] = _Session(row)
        # (site, sc) order; a session only a duplicate named stays locked, untouched.
        self.sessions = {key: stored[key] for key in keys}
        identity_ids = sorted({s.identity_id for s in self.sessions.values()} - {None})
        if identity_ids:
            for row in await self.conn.fetch(
                    "SELECT * FROM identities WHERE id = ANY($1::bigint[]) ORDER BY id "
                    "FOR UPDATE", identity_ids):
                self.identities[row["id"]] = identity_known(row)

    async def _apply(self, seq: int, site: Any, event: dict[str, Any], raw: bytes,
                     user_agent: str | None, place: tuple[int, int]) -> None:
        sc = event["sc"]
        key = (site.id, sc)
        if sc:
            state = self.sessions[key]
            state.last_ms = self.now
            state.user_agent = user_agent or state.user_agent
            state.last_page = (event.get("page") or {}).get("location") or state.last_page
            # Seqs come from one sequence shared by every node, so a later commit may carry
            # a lower seq: the bounds only ever widen (session_view scans between them).
            state.first_seq = seq if state.first_seq is None else min(state.first_seq, seq)
            state.last_seq = seq if state.last_seq is None else max(state.last_seq, seq)
            self.dirty.add(key)
        identity, binding = await self._identity(site.id, event)
        if identity and not sc:
            last = await self._last_session(site, identity["id"])
            identity["last_sc"] = last.last_sc
            if last.unverified is not None and outbox.unverified_sessions_wanted(site, event):
                identity[rules.UNVERIFIED_SESSIONS] = last.unverified
        event["identity"] = identity
        if sc and event["name"] in CART_EVENTS:
            event["cart"] = self._cart(site, event, place)
        priceless = outbox.catalog_prices_wanted(site, event)
        if priceless:  # a vendor requires prices: the catalog's for lines without one
            catalog.add_prices(event, await self.products.prices(site.id, priceless))
        data = encode(event)
        self.event_rows.append((seq, site.id, event["event_id"], event["name"], event["source"],
                                sc, identity["id"] if identity else None, self.now,
                                _text(raw), data.decode()))
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
            await self._flush()  # what waited must be in the database to be found
            await self._release_held(site, sc, identity, visitors, request_id)

    async def _flush(self, product_keys: Sequence[tuple[str, str]] = ()) -> list[Any]:
        """Write what changed since the last flush: sessions and events (one statement,
        which also reads the products of ``product_keys``, unlocked: their rows are
        returned), then deliveries."""
        conn = self.conn
        sessions = [_session_row(state) for state in self._dirty_sessions()]
        events, self.event_rows = self.event_rows, []
        read: list[Any] = []
        if product_keys:
            read = await conn.fetch(_SESSIONS_EVENTS_PRODUCTS, sessions, events,
                                    [k[0] for k in product_keys], [k[1] for k in product_keys])
        elif sessions or events:
            await conn.execute(_SESSIONS_AND_EVENTS, sessions, events)
        if self.delivery_rows:
            rows, self.delivery_rows = self.delivery_rows, []
            await insert_deliveries(conn, rows, self.now)
        return read

    def _dirty_sessions(self) -> list[_Session]:
        """The sessions changed since the last write, in (site_id, sc) order, their carts
        encoded; none are dirty after."""
        states = []
        for key in sorted(self.dirty):
            state = self.sessions[key]
            if key in self.cart_json:
                lines, encoded = self.cart_json.pop(key)
                cart = state.cart
                if cart and lines is not cart[0]:
                    encoded = encode(cart[0])
                state.cart_items, state.cart_guid, state.cart_currency, state.cart_id = (
                    (encoded.decode(), *cart[1:]) if cart else (None, None, None, None))
                state.cart_updated_ms = self.now
            states.append(state)
        self.dirty.clear()
        return states

    # Identity -----------------------------------------------------------------------------

    async def _identity(self, site_id: str, event: dict[str, Any]
                        ) -> tuple[dict[str, Any] | None, rules.Binding | None]:
        """The session's identity after ``event``, and what became of its binding
        (``rules.identity_step``, ``rules.bind_session``; SQLite's ``IngestBatch._identity``)."""
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
            identity_id, is_new = await self._upsert_identity(site_id, event)
        elif step.kind == rules.OWN:
            identity_id, is_new = current_id, False
        else:
            identity_id, is_new = await self._claimed_identity(site_id, step.email, user)
        binding = None
        if state is not None:
            binding = rules.bind_session(event["source"], state.verified, current_id,
                                         identity_id)
            if binding.switch:
                await self._switch(site_id, sc, state)
            if current_id != identity_id:
                state.identity_id = identity_id
                self.new_identities.discard(identity_id)
                self.dirty.add((site_id, sc))
            state.verified = binding.verified
        return {**self.identities[identity_id], "id": identity_id, "is_new": is_new}, binding

    async def _claimed_identity(self, site_id: str, email: str, user: dict[str, Any]
                                ) -> tuple[int, bool]:
        row = await self.conn.fetchrow(
            "SELECT * FROM identities WHERE site_id = $1 AND email = $2", site_id, email)
        if row is not None:
            self.identities[row["id"]] = identity_known(row)
            return row["id"], False
        fields = claimed_fields(user)
        identity_id = await self.conn.fetchval(
            "INSERT INTO identities (site_id, email, first_name, last_name, phone, created_ms, "
            "updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING id",
            site_id, email, fields.get("first_name"), fields.get("last_name"),
            fields.get("phone"), self.now)
        self.identities[identity_id] = known_since(fields, self.now)
        self.new_identities.add(identity_id)
        return identity_id, True

    async def _switch(self, site_id: str, sc: str, state: _Session) -> None:
        """The session was someone else's: what it held stays unsent, its cart is emptied."""
        await self._flush()
        await self.conn.execute(
            "UPDATE deliveries SET state = 'ignored', updated_ms = $1, last_error = 'identity "
            "switch: held while the session was someone else''s' WHERE site_id = $2 AND "
            "visitor = $3 AND state = 'held'", self.now, site_id, f"sc:{sc}")
        self.dirty.add((site_id, sc))
        if state.cart is not None:
            state.cart = None
            self.cart_json[(site_id, sc)] = ([], b"")

    async def _upsert_identity(self, site_id: str, event: dict[str, Any]) -> tuple[int, bool]:
        conn, user = self.conn, event.get("user") or {}
        row = by_customer = None
        if user.get("email"):
            row = await conn.fetchrow("SELECT * FROM identities WHERE site_id = $1 AND "
                                      "email = $2 FOR UPDATE", site_id, user["email"])
        if row is None and user.get("customer_id"):
            by_customer = await conn.fetchrow(
                "SELECT * FROM identities WHERE site_id = $1 AND customer_id = $2 FOR UPDATE",
                site_id, user["customer_id"])
        row = rules.match_identity(user, row, by_customer)
        current = identity_fields(row) if row is not None else None
        fields = rules.merge_identity(current, event)
        check = rules.customer_id_to_check(fields, current)
        held = check is not None and await conn.fetchval(
            "SELECT 1 FROM identities WHERE site_id = $1 AND customer_id = $2 AND id != $3",
            site_id, check, row["id"] if row is not None else -1) is not None
        fields = rules.keep_customer_id(fields, current, held)
        values = (fields.get("email"), fields.get("customer_id"), fields.get("first_name"),
                  fields.get("last_name"), fields.get("phone"),
                  _flag(fields.get("accepts_marketing")))
        if row is None:
            identity_id = await conn.fetchval(
                "INSERT INTO identities (site_id, email, customer_id, first_name, last_name, "
                "phone, accepts_marketing, created_ms, updated_ms) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id",
                site_id, *values, self.now)
            self.identities[identity_id] = known_since(fields, self.now)
            self.new_identities.add(identity_id)
            return identity_id, True
        identity_id = row["id"]
        if fields != current:
            await conn.execute(
                "UPDATE identities SET email = $1, customer_id = $2, first_name = $3, "
                "last_name = $4, phone = $5, accepts_marketing = $6, updated_ms = $7 "
                "WHERE id = $8", *values, self.now, identity_id)
        self.identities[identity_id] = known_since(fields, row["created_ms"])
        return identity_id, False

    async def _last_session(self, site: Any, identity_id: int) -> rules.LastSession:
        """The identity's ``last_sc``, and on a signing site with none verified whether
        unverified sessions are known (``rules.LastSession``): from the sessions written in
        this batch and not flushed yet, else from one read of the database's; no read for
        an identity this batch created that no session was bound to since (SQLite's
        ``_last_session``)."""
        site_id, signing = site.id, rules.signs_identities(site)
        last, unwritten = rules.LastSession.unwritten(
            ((sc, self.sessions[(sid, sc)]) for sid, sc in self.dirty
             if sid == site_id and self.sessions[(sid, sc)].identity_id == identity_id),
            signing)
        if last is not None:
            return last
        row = None
        if identity_id not in self.new_identities:
            row = await self.conn.fetchrow(
                f"SELECT {rules.LAST_SC_COLUMNS} FROM sessions WHERE site_id = $1 AND "
                f"identity_id = $2 {rules.last_sc_sql(signing)}", site_id, identity_id)
        return rules.LastSession.stored(row, signing, unwritten)

    # Cart ---------------------------------------------------------------------------------

    def _cart(self, site: Any, event: dict[str, Any], place: tuple[int, int]
              ) -> dict[str, Any] | None:
        key = (site.id, event["sc"])
        state = self.sessions[key]
        if state.cart is _UNREAD:
            state.cart = (loads(state.cart_items), state.cart_guid, state.cart_currency,
                          state.cart_id)
        step = rules.cart_step(state.cart or None, event, site.currency, rules.new_guid,
                               site.max_cart_lines)
        if step is None:
            return None
        field = f"events[{place[1]}].ecommerce.items"
        self.cart_json[key] = (step.lines, rules.check_cart(step.lines, site, field))
        self.dirty.add(key)
        state.cart = step.cart
        return step.snapshot

    # Held deliveries ----------------------------------------------------------------------

    async def _release_held(self, site: Any, sc: str, identity: dict[str, Any],
                            visitors: list[str], request_id: str | None) -> None:
        """The session just got an email (or a verified one): re-plan what waited for one,
        and the customer's backend rows that waited for a session of theirs (``visitors``:
        ``rules.held_visitors``), within the window."""
        conn, now = self.conn, self.now
        held = await conn.fetch(
            "SELECT d.event_seq, d.vendor, d.created_ms, e.data FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            "WHERE d.site_id = $1 AND d.visitor = ANY($2::text[]) AND d.state = 'held' "
            "ORDER BY d.id FOR UPDATE OF d", site.id, visitors)
        released = rules.held_release(held, now, self.hold_ms)
        events = {seq: loads(data) for seq, data, _, fresh in released if fresh}
        orders = await load_orders(conn, rules.orders_wanted(
            self.sites, ((site.id, event) for event in events.values())))
        for seq, _, vendors, fresh in released:
            if not fresh:
                await conn.execute("UPDATE deliveries SET state = 'expired', updated_ms = $1 "
                                   "WHERE event_seq = $2 AND state = 'held'", now, seq)
                continue
            event = rules.released_event(events[seq], identity, sc)
            await conn.execute("DELETE FROM deliveries WHERE event_seq = $1 AND state = 'held'",
                               seq)
            planned = outbox.plan(site, event, vendors, self.grace_ms, orders)
            orders.planned(site.id, planned)
            await insert_deliveries(conn, [(site.id, seq, row, request_id) for row in planned],
                                    now)


async def load_orders(conn: Any, wanted: Sequence[tuple[str, str, str]]) -> rules.KnownOrders:
    """The stored order requests status changes repeat (``rules.KnownOrders``): the rows
    under ``wanted`` (site id, vendor, dedup key), in one statement (none when nothing is
    wanted).

    First the keys' advisory locks, in key order, the locks a fact's row is written under
    (``insert_deliveries``): a purchase another node is committing at this moment is waited
    for and then read, so a status change sent after its order is never planned without it.
    """
    orders = rules.KnownOrders(wanted)
    if wanted:
        await conn.execute(_ORDER_LOCKS, sorted({_lock_name(*key) for key in wanted}))
        for site_id, vendor, key, claim, state, request in await conn.fetch(
                _ORDERS, *[list(column) for column in zip(*wanted)]):
            orders.add(site_id, vendor, key, claim, state,
                       loads(request) if isinstance(request, (str, bytes)) else request)
    return orders


# The optimistic batch ---------------------------------------------------------------------------

class NeedsLocks(Exception):
    """An optimistic batch met what only the locked transaction does (an identity to write,
    a held delivery to release, an order or a backend fact, a product to write): nothing of
    it was written; the writer runs it locked."""


class _LocksNeeded:
    """The connection of an optimistic batch while its rules run: a statement they want is
    one the locked transaction must make."""

    async def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise NeedsLocks("a statement inside the rules")

    fetch = fetchrow = fetchval = execute = executemany = _refuse


_LOCKS_NEEDED = _LocksNeeded()

# migration 027's function; the claims go as one array a column, as _DELIVERY_INSERT's.
_INGEST_WRITE = (
    "SELECT ingest_write($1::ingest_session[], $2::ingest_session[], $3::ingest_event[], "
    "$4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[], "
    "$11::bigint[], $12::text[], $13::text[], $14::text[], $15::text, $16::text, $17::bigint)")


def optimistic(requests: Sequence[Request]) -> bool:
    """Whether a batch may try ``run_optimistic``: browser events only, each with its
    session, none naming a person (an identity step other than keeping the session's:
    ``rules.identity_step``) or an order (a fact may wait under its key). What only the
    stored state tells (a verified session, a product to write) still sends a batch to
    the locked transaction, after its read."""
    for _, events, *_ in requests:
        for event in events:
            user = event.get("user") or {}
            if (event["source"] != trust.BROWSER or not event["sc"]
                    or user.get("email") or user.get("customer_id")
                    or event["name"] in trust.ORDER_EVENTS):
                return False
    return True


def named_products(requests: Sequence[Request]) -> list[tuple[str, str]]:
    """The (site_id, item_id) of every product a browser event of the batch names, in
    order (what ``PgCatalogBatch.observe`` will observe of them)."""
    keys = set()
    for site_id, events, *_ in requests:
        for event in events:
            if event["name"] in catalog.EVENTS:
                for item in (event.get("ecommerce") or {}).get("items") or ():
                    keys.add((site_id, item["item_id"]))
    return sorted(keys)


def _event_keys(requests: Sequence[Request]) -> tuple[list[str], list[str],
                                                     list[str | None], list[tuple[str, str]]]:
    """The batch's event keys as three arrays (site, event id, scope: ``rules.event_scope``),
    and the sessions of each key's first copy, in (site_id, sc) order."""
    sites, ids, scopes = [], [], []
    first: set[tuple[str, str, str | None]] = set()
    visitors = set()
    for site_id, events, *_ in requests:
        for event in events:
            event_id, scope = event["event_id"], rules.event_scope(event)
            sites.append(site_id)
            ids.append(event_id)
            scopes.append(scope)
            key = (site_id, event_id, scope)
            if key not in first:
                first.add(key)
                if event["sc"]:
                    visitors.add((site_id, event["sc"]))
    return sites, ids, scopes, sorted(visitors)


def _session_keys(work: Sequence[tuple[Any, ...]]) -> list[tuple[str, str]]:
    """The sessions the new events of a batch name, in (site_id, sc) order."""
    return sorted({(site_id, event["sc"]) for _, site_id, event, *_ in work if event["sc"]})


# Deliveries -----------------------------------------------------------------------------------

def _lock_name(site_id: str, vendor: str, dedup_key: str) -> str:
    return f"{site_id}\x1f{vendor}\x1f{dedup_key}"


def _key_lock(site_id: str, r: Any) -> str:
    return _lock_name(site_id, r.vendor, r.dedup_key)


async def insert_deliveries(conn: Any, rows: Iterable[tuple[str, int, Any, str | None]],
                            now: int) -> None:
    """(site_id, event seq, PlannedDelivery, request id) rows, as SQLite's
    ``insert_deliveries``: claims in one statement (``rules.claim_taken`` against the facts
    stored), a claim of an order a vendor's library took checked against a waiting fact,
    then each fact against its claim (``rules.fact_meets_claim``)."""
    claims, facts = [], []
    for site_id, seq, r, request_id in rows:
        (claims if r.claim else facts).append((site_id, seq, r, request_id))
    locked = sorted({_key_lock(site_id, r) for site_id, _, r, _ in claims + facts
                     if not r.claim or r.event["name"] in trust.ORDER_EVENTS})
    for key in locked:  # in key order: two nodes never wait on each other's in reverse
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
    if claims:
        wanted = [(site_id, r.vendor, r.dedup_key) for site_id, _, r, _ in claims
                  if r.state in (outbox.PENDING, outbox.HELD)]
        taken = set()
        if wanted:
            taken = {tuple(row) for row in await conn.fetch(
                "SELECT u.s, u.v, u.k FROM unnest($1::text[], $2::text[], $3::text[]) "
                "AS u(s, v, k) CROSS JOIN LATERAL (SELECT 1 FROM deliveries d WHERE "
                "d.site_id = u.s AND d.vendor = u.v AND d.dedup_key = u.k AND d.claim = 0 "
                "LIMIT 1) AS d",
                *[list(c) for c in zip(*wanted)])}
        values = []
        for order, (site_id, seq, r, request_id) in enumerate(claims):
            if rules.claim_taken(r.state, (site_id, r.vendor, r.dedup_key) in taken):
                state, error = outbox.IGNORED, rules.CLAIM_TAKEN_ERROR
            else:
                state, error = r.state, r.error
            values.append((site_id, r.vendor, r.dedup_key, 1, seq, r.visitor, state,
                           encode(r.request).decode(), now + r.delay_ms, error, request_id,
                           order))
            if r.state == outbox.BROWSER and r.event["name"] in trust.ORDER_EVENTS:
                await _matches_waiting_fact(conn, site_id, r, now)
        await conn.execute(_DELIVERY_INSERT, *[list(c) for c in zip(*values)], now)
    for site_id, seq, r, request_id in facts:
        await _insert_fact(conn, site_id, seq, r, now, request_id)


def _same_fact(row: Mapping[str, Any], planned: Any) -> bool:
    return rules.same_fact(loads(row["data"]), loads(row["request"]), planned.event,
                           planned.request)


async def _matches_waiting_fact(conn: Any, site_id: str, r: Any, now: int) -> None:
    for row in await conn.fetch(_OTHER + " AND d.state IN ('pending', 'held') "
                                "AND d.attempts = 0", site_id, r.vendor, r.dedup_key, 0):
        if rules.waiting_fact_superseded(row["state"], row["attempts"], _same_fact(row, r)):
            await conn.execute("UPDATE deliveries SET state = 'browser', updated_ms = $1, "
                               "last_error = $2 WHERE id = $3",
                               now, rules.FACT_SUPERSEDED_ERROR, row["id"])


async def _insert_fact(conn: Any, site_id: str, seq: int, r: Any, now: int,
                       request_id: str | None) -> None:
    claim = await conn.fetchrow(_OTHER, site_id, r.vendor, r.dedup_key, 1)
    same = claim is not None and r.state in (outbox.PENDING, outbox.HELD) and _same_fact(claim, r)
    state, request, error, cancel = rules.fact_meets_claim(r.vendor, r.state, r.request,
                                                           r.error, claim, same)
    if cancel:
        await conn.execute("UPDATE deliveries SET state = 'ignored', updated_ms = $1, "
                           "last_error = $2 WHERE id = $3",
                           now, rules.CLAIM_SUPERSEDED_ERROR, claim["id"])
    delay = r.delay_ms if state == outbox.PENDING else 0
    await conn.execute(  # due_ms: as sqlite_ingest._FACT_INSERT (a grace's due time)
        "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
        "request, next_attempt_ms, due_ms, last_error, created_ms, updated_ms, request_id) "
        "VALUES ($1, $2, $3, 0, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12) "
        "ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING",
        site_id, r.vendor, r.dedup_key, seq, r.visitor, state, encode(request).decode(),
        now + delay, now + delay if delay else None, error, now, request_id)
