"""Read-only queries of the operator console (Live, Search, the event, delivery and install
pages), the same on every backend: ``SearchReads`` asks them through the few primitives a
backend gives (``ConsoleReads`` in ``console_reads.py``: run a query, extract a JSON
field), so the SQL, its bounds and the rows' shape are written once.

Every query is bounded by a LIMIT and uses an index or a seq (primary key) range
(``tests/test_console_search.py`` checks the plans on both backends). Three questions have
no index on SQLite and would otherwise read the whole events table; they read at most the
latest ``SCAN_WINDOW`` events instead (a seq range, newest first), and the pages say so:

- events of an identity that have no session (a backend event without an ``sc``): there is
  no index on ``events.identity_id`` (each index costs every ingested event a write);
- an order id: ``transaction_id`` lives inside the event's JSON;
- the latest browser event from an origin: the page URL lives inside the JSON too.

PostgreSQL has partial indexes for the first two (``pg_migrations/021_console_search.sql``:
only the events they are about are written to them); the window still bounds them. A
customer's backfilled history (``onetag backfill``: kept apart from sessions and
identities), found by the email inside its JSON, has a partial index on both backends
(SQLite ``migrations/019``, PostgreSQL ``pg_migrations/029``) and no window.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from .. import money
from ..jsontext import loads
from ..sessions import cart_snapshot
from .rules import LATEST_SESSION_SQL, identity_fields
from .sqlite import with_body

SCAN_WINDOW = 200_000  # events read at most by a search without an index (newest first)
TIMELINE_LIMIT = 200  # events shown for one search
SESSIONS_LIMIT = 50  # sessions of one identity
DELIVERIES_LIMIT = 200  # deliveries listed for one search
ATTEMPTS_SHOWN = 5  # the latest attempts of each, on the search page (all: the delivery page)
MATCHES_LIMIT = 20  # identities / events one search term may match (event ids: a page)
MATCHES_COUNTED = 10_000  # event-id matches counted at most ("more than 10,000")
CHUNK = 400  # values bound in one IN (...) list
ORDER_EVENTS = ("purchase", "refund", "order_status")
SOURCES = ("browser", "backend", "verified browser")
# What may follow an origin in a page URL for the URL to be on that origin.
ORIGIN_ENDS = ("", "/", "?", "#")
SC_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                   r"[0-9A-Fa-f]{12}$")
EVENT_COLUMNS = ("e.seq, e.site_id, e.event_id, e.name, e.source, e.sc, e.identity_id, "
                 "e.received_ms")
DELIVERY_COLUMNS = ("d.id, d.site_id, d.vendor, d.dedup_key, d.claim, d.event_seq, d.visitor, "
                    "d.state, d.attempts, d.next_attempt_ms, d.last_error, d.created_ms, "
                    "d.updated_ms, d.delivered_ms, d.request_id")
SUMMARY_SELECT = (f"SELECT {EVENT_COLUMNS}, i.email, e.data FROM events e "
                  "LEFT JOIN identities i ON i.id = e.identity_id ")


def marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def chunks(values: Sequence[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(values), CHUNK):
        yield list(values[start:start + CHUNK])


def live_filter(sites: Sequence[str], site: str | None = None, name: str | None = None,
                source: str | None = None, email: str | None = None, sc: str | None = None, *,
                history_email: str) -> tuple[str, list[Any]]:
    """The WHERE clause (after ``e.seq`` bounds) for the Live page's filters
    (``SearchReads.live_filter`` gives ``history_email``, its backend's SQL for the email
    inside an event's JSON). ``email`` finds what a search by it on ``sites`` (the
    configured ones) finds: the events of the identity with it, those of the sessions bound
    to that identity (those from before the visitor was identified too), and the backfilled
    history naming it. The identity and its sessions are looked up once a query
    (``identities_email``, ``sessions_identity``), not once an event."""
    where, params = [], []
    for column, value in (("e.site_id", site), ("e.name", name), ("e.source", source),
                          ("e.sc", sc)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if email:
        email = email.strip().lower()
        sites = list(sites) or [None]  # no site configured: no identity matches
        where.append(
            f"(e.identity_id IN (SELECT id FROM identities WHERE site_id IN ({marks(sites)}) "
            "AND email = ?) OR (e.site_id, e.sc) IN (SELECT s.site_id, s.sc FROM identities si "
            f"JOIN sessions s ON s.identity_id = si.id WHERE si.site_id IN ({marks(sites)}) "
            "AND si.email = ?) OR (e.sc IS NULL AND e.identity_id IS NULL "
            f"AND e.site_id IN ({marks(sites)}) AND {history_email} = ?))")
        params += [*sites, email, *sites, email, *sites, email]
    return "".join(f" AND {clause}" for clause in where), params


def summary(data: Mapping[str, Any]) -> str:
    """One line about a normalised event: its order, value, items, page or search."""
    parts = []
    ecommerce = data.get("ecommerce") or {}
    if ecommerce.get("transaction_id"):
        parts.append(f"order {ecommerce['transaction_id']}")
    if data.get("status"):
        parts.append(str(data["status"]))
    if ecommerce.get("value_minor") is not None:
        parts.append(money.display_or_minor(ecommerce["value_minor"], ecommerce.get("currency")))
    items = ecommerce.get("items") or []
    if items:
        parts.append(f"{len(items)} item{'s' if len(items) != 1 else ''}: "
                     + ", ".join(str(item.get("item_id")) for item in items[:3])
                     + ("…" if len(items) > 3 else ""))
    if data.get("search_term"):
        parts.append(f"search {data['search_term']!r}")
    page = data.get("page") or {}
    if page.get("location") and not parts:
        parts.append(str(page["location"]))
    return " · ".join(parts)[:300]


def _session(row: dict[str, Any]) -> dict[str, Any]:
    items = row.pop("cart_items", None)
    currency, guid = row.pop("cart_currency", None), row.pop("cart_guid", None)
    cart_id = row.pop("cart_id", None)
    row["cart"] = (cart_snapshot(loads(items), currency, guid, cart_id) if items is not None
                   else None)
    return row


class SearchReads:
    """Live, Search, the event, delivery and install pages' queries (``?`` placeholders).
    A backend's ``ConsoleReads`` provides ``rows`` and ``json_text``."""

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def json_text(self, column: str, *path: str) -> str:
        raise NotImplementedError

    def history_email(self) -> str:
        """SQL: the email inside event ``e``'s JSON, its user's, else its order's buyer's
        (what backfilled history is found by; the indexes SQLite migrations/019 and
        PostgreSQL pg_migrations/029 are on this expression)."""
        return (f"coalesce({self.json_text('e.data', 'user', 'email')}, "
                f"{self.json_text('e.data', 'identity', 'email')})")

    def live_filter(self, sites: Sequence[str], **filters: str | None
                    ) -> tuple[str, list[Any]]:
        """The Live page's filters as a WHERE clause (``live_filter``) on this backend,
        ``sites`` the configured ones."""
        return live_filter(sites, **filters, history_email=self.history_email())

    async def latest_seq(self) -> int:
        """The newest event's seq (0: none yet)."""
        rows = await self.rows("SELECT max(seq) AS seq FROM events")
        return rows[0]["seq"] or 0

    # Live -----------------------------------------------------------------------------

    async def tail_events(self, after_seq: int, upto_seq: int,
                          filters: tuple[str, list[Any]], limit: int) -> list[dict[str, Any]]:
        """Events with ``after_seq < seq <= upto_seq`` that pass ``filters``, oldest first:
        a seq range, so polling it costs only what arrived since."""
        where, params = filters
        return await self._event_summaries(
            f"{SUMMARY_SELECT}WHERE e.seq > ? AND e.seq <= ?{where} ORDER BY e.seq LIMIT ?",
            [after_seq, upto_seq, *params, limit])

    async def events_at(self, seqs: Sequence[int], filters: tuple[str, list[Any]]
                        ) -> list[dict[str, Any]]:
        """These events (the primary key), those that pass ``filters``, oldest first."""
        where, params = filters
        found: list[dict[str, Any]] = []
        for chunk in chunks(seqs):
            found += await self._event_summaries(
                f"{SUMMARY_SELECT}WHERE e.seq IN ({marks(chunk)}){where} ORDER BY e.seq",
                [*chunk, *params])
        return found

    async def seqs_between(self, after_seq: int, upto_seq: int, limit: int) -> list[int]:
        """The seqs stored in ``(after_seq, upto_seq]``, any event, oldest first."""
        rows = await self.rows("SELECT seq FROM events WHERE seq > ? AND seq <= ? "
                               "ORDER BY seq LIMIT ?", [after_seq, upto_seq, limit])
        return [row["seq"] for row in rows]

    async def seqs_in(self, seqs: Sequence[int]) -> list[int]:
        """Which of these seqs are stored (the primary key)."""
        found: list[int] = []
        for chunk in chunks(seqs):
            found += [row["seq"] for row in await self.rows(
                f"SELECT seq FROM events WHERE seq IN ({marks(chunk)})", chunk)]
        return found

    async def recent_events(self, filters: tuple[str, list[Any]], limit: int,
                            before_seq: int | None = None) -> list[dict[str, Any]]:
        """The latest events that pass ``filters``, newest first, looking back at most
        ``SCAN_WINDOW`` events."""
        top = before_seq if before_seq is not None else await self.latest_seq() + 1
        where, params = filters
        return await self._event_summaries(
            f"{SUMMARY_SELECT}WHERE e.seq < ? AND e.seq >= ?{where} ORDER BY e.seq DESC LIMIT ?",
            [top, top - SCAN_WINDOW, *params, limit])

    async def _event_summaries(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        found = []
        for row in await self.rows(sql, params):
            data = loads(row.pop("data"))
            row["summary"] = summary(data)
            if not row.get("email"):
                row["email"] = ((data.get("identity") or data.get("user") or {}).get("email"))
            found.append(row)
        return found

    # One event, one delivery ----------------------------------------------------------

    async def event(self, seq: int) -> dict[str, Any] | None:
        """The stored event (raw and normalised parsed), its session and identity."""
        rows = await self.rows(f"SELECT {EVENT_COLUMNS}, e.raw, e.data FROM events e "
                               "WHERE e.seq = ?", [seq])
        if not rows:
            return None
        found = rows[0]
        found["raw"], found["data"] = loads(found["raw"]), loads(found["data"])
        found["session"] = (await self.session(found["site_id"], found["sc"])
                            if found["sc"] else None)
        found["identity"] = ((await self.identities_by_id([found["identity_id"]]) or [None])[0]
                             if found["identity_id"] else None)
        return found

    async def deliveries_of_events(self, seqs: Sequence[int], limit: int = DELIVERIES_LIMIT
                                   ) -> list[dict[str, Any]]:
        """The deliveries planned from these events (index ``deliveries_event``), newest
        first."""
        found: list[dict[str, Any]] = []
        for chunk in chunks(seqs):
            found += await self.rows(
                f"SELECT {DELIVERY_COLUMNS}, e.name AS event_name FROM deliveries d "
                f"JOIN events e ON e.seq = d.event_seq WHERE d.event_seq IN ({marks(chunk)}) "
                "ORDER BY d.id DESC LIMIT ?", [*chunk, limit])
        found.sort(key=lambda row: -row["id"])
        return found[:limit]

    async def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        """One delivery row, its planned request parsed, and its event's name."""
        rows = await self.rows(f"SELECT {DELIVERY_COLUMNS}, d.request, e.name AS event_name "
                               "FROM deliveries d LEFT JOIN events e ON e.seq = d.event_seq "
                               "WHERE d.id = ?", [delivery_id])
        if not rows:
            return None
        found = rows[0]
        found["request"] = loads(found["request"])
        return found

    async def attempts_of(self, delivery_ids: Sequence[int], per_delivery: int = ATTEMPTS_SHOWN
                          ) -> dict[int, list[dict[str, Any]]]:
        """The latest ``per_delivery`` attempts of each of these deliveries (index
        ``attempts_delivery``), first first, with each request's body put back from its
        delivery row (the store's ``attempts`` does the same for one delivery)."""
        found: dict[int, list[dict[str, Any]]] = {}
        for chunk in chunks(delivery_ids):
            planned = {row["id"]: loads(row["request"]) for row in await self.rows(
                f"SELECT id, request FROM deliveries WHERE id IN ({marks(chunk)})", chunk)}
            # Newest first, so each delivery's latest are kept; the JSON is parsed only for
            # them. At most per_delivery a delivery come back (a window over its attempts).
            for row in await self.rows(
                    "SELECT delivery_id, attempt, started_ms, duration_ms, request, status, "
                    "answer, error FROM (SELECT *, row_number() OVER (PARTITION BY "
                    "delivery_id ORDER BY id DESC) AS nth FROM attempts "
                    f"WHERE delivery_id IN ({marks(chunk)})) AS latest WHERE nth <= ? "
                    "ORDER BY id DESC", [*chunk, per_delivery]):
                row["request"] = with_body(loads(row["request"]),
                                           planned.get(row["delivery_id"], {}))
                row["answer"] = None if row["answer"] is None else loads(row["answer"])
                found.setdefault(row["delivery_id"], []).append(row)
        for attempts in found.values():
            attempts.reverse()
        return found

    # Identities and sessions ----------------------------------------------------------

    async def identities_by_id(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        if not ids:
            return []
        rows = await self.rows(f"SELECT * FROM identities WHERE id IN ({marks(ids)})",
                               list(ids))
        return [{**identity_fields(row), "id": row["id"], "site_id": row["site_id"],
                 "created_ms": row["created_ms"], "updated_ms": row["updated_ms"]}
                for row in rows]

    async def identities_by_email(self, sites: Sequence[str], email: str
                                  ) -> list[dict[str, Any]]:
        """Per configured site, the identity with this (normalised) email: index
        ``identities_email`` (site_id, email)."""
        if not sites:
            return []
        rows = await self.rows(f"SELECT id FROM identities WHERE site_id IN ({marks(sites)}) "
                               "AND email = ? LIMIT ?",
                               [*sites, email.strip().lower(), MATCHES_LIMIT])
        return await self.identities_by_id([row["id"] for row in rows])

    async def session(self, site_id: str, sc: str) -> dict[str, Any] | None:
        rows = await self.rows("SELECT * FROM sessions WHERE site_id = ? AND sc = ?",
                               [site_id, sc])
        return _session(rows[0]) if rows else None

    async def sessions_by_sc(self, sites: Sequence[str], sc: str) -> list[dict[str, Any]]:
        """Sessions with this ``sc`` on any configured site: the UNIQUE (site_id, sc) index."""
        if not sites:
            return []
        rows = await self.rows(f"SELECT * FROM sessions WHERE site_id IN ({marks(sites)}) "
                               "AND sc = ? LIMIT ?", [*sites, sc, MATCHES_LIMIT])
        return [_session(row) for row in rows]

    async def sessions_of(self, identity_ids: Sequence[int], limit: int = SESSIONS_LIMIT
                          ) -> list[dict[str, Any]]:
        """The identities' sessions, latest first (``rules.LATEST_SESSION_SQL``, the order
        a backend event's ``last_sc`` takes; index ``sessions_identity``)."""
        if not identity_ids:
            return []
        rows = await self.rows(f"SELECT * FROM sessions WHERE identity_id IN "
                               f"({marks(identity_ids)}) {LATEST_SESSION_SQL} LIMIT ?",
                               [*identity_ids, limit])
        return [_session(row) for row in rows]

    # Events of a search ---------------------------------------------------------------

    async def session_events(self, sessions: Iterable[Mapping[str, Any]],
                             limit: int = TIMELINE_LIMIT) -> list[dict[str, Any]]:
        """The sessions' events, newest first: each session's seq bounds (first_seq,
        last_seq) make it a seq range, as the store's ``session_view`` does."""
        found: list[dict[str, Any]] = []
        for item in sessions:
            if item.get("last_seq") is None:
                continue
            found += await self._event_summaries(
                f"{SUMMARY_SELECT}WHERE e.seq BETWEEN ? AND ? AND e.site_id = ? AND e.sc = ? "
                "ORDER BY e.seq DESC LIMIT ?",
                [item.get("first_seq") or 0, item["last_seq"], item["site_id"], item["sc"],
                 limit])
        return found

    async def sessionless_events(self, identity_ids: Sequence[int],
                                 limit: int = TIMELINE_LIMIT) -> list[dict[str, Any]]:
        """An identity's events without a session (backend events without an ``sc``),
        among the latest ``SCAN_WINDOW`` events, newest first: SQLite has no index for
        them and reads the window, PostgreSQL a partial one (pg_migrations/021)."""
        if not identity_ids:
            return []
        top = await self.latest_seq()
        return await self._event_summaries(
            f"{SUMMARY_SELECT}WHERE e.seq > ? AND e.sc IS NULL "
            f"AND e.identity_id IN ({marks(identity_ids)}) ORDER BY e.seq DESC LIMIT ?",
            [top - SCAN_WINDOW, *identity_ids, limit])

    async def history_events(self, sites: Sequence[str], email: str,
                             limit: int = TIMELINE_LIMIT) -> list[dict[str, Any]]:
        """A customer's backfilled history (``onetag backfill``: backend events kept apart
        from sessions and identities, so with neither an ``sc`` nor an ``identity_id``) by
        the email inside it (its user's, else its order's buyer's), newest first, however
        old: a partial index on that email on both backends (SQLite migrations/019,
        PostgreSQL pg_migrations/029), which only such events are written to."""
        if not sites:
            return []
        return await self._event_summaries(
            f"{SUMMARY_SELECT}WHERE e.sc IS NULL AND e.identity_id IS NULL "
            f"AND {self.history_email()} = ? AND e.site_id IN ({marks(sites)}) "
            "ORDER BY e.seq DESC LIMIT ?",
            [email.strip().lower(), *sites, limit])

    async def events_by_event_id(self, sites: Sequence[str], event_id: str,
                                 before: int | None = None, limit: int = MATCHES_LIMIT
                                 ) -> list[dict[str, Any]]:
        """Index ``events_id`` (site_id, event_id, scope), by its first two columns: the
        backend's event with this id and every browser session's (a browser's id is its
        session's, ``rules.event_scope``), newest first (older than seq ``before``), up
        to ``limit``."""
        if not sites:
            return []
        older = "" if before is None else "AND e.seq < ? "
        return await self._event_summaries(
            f"{SUMMARY_SELECT}WHERE e.site_id IN ({marks(sites)}) AND e.event_id = ? {older}"
            "ORDER BY e.seq DESC LIMIT ?",
            [*sites, event_id, *([] if before is None else [before]), limit])

    async def count_by_event_id(self, sites: Sequence[str], event_id: str,
                                cap: int = MATCHES_COUNTED) -> int:
        """How many events have this id (``events_by_event_id``'s), counted through the
        same index up to ``cap``."""
        if not sites:
            return 0
        rows = await self.rows(
            f"SELECT count(*) AS n FROM (SELECT 1 FROM events e WHERE e.site_id IN "
            f"({marks(sites)}) AND e.event_id = ? LIMIT ?) AS found", [*sites, event_id, cap])
        return int(rows[0]["n"])

    async def events_by_order_id(self, order_id: str) -> list[dict[str, Any]]:
        """Order events (purchase, refund, order_status) with this ``transaction_id``,
        newest first, among the latest ``SCAN_WINDOW`` events (the id is inside the JSON;
        PostgreSQL has an index on it, SQLite reads the window)."""
        top = await self.latest_seq()
        order = self.json_text("e.data", "ecommerce", "transaction_id")
        # The names as literals: PostgreSQL's partial index on order ids (pg_migrations/021)
        # is used only where the query's own text implies its WHERE.
        names = ", ".join(f"'{name}'" for name in ORDER_EVENTS)
        return await self._event_summaries(
            f"{SUMMARY_SELECT}WHERE e.seq > ? AND e.name IN ({names}) "
            f"AND {order} = ? ORDER BY e.seq DESC LIMIT ?",
            [top - SCAN_WINDOW, order_id, MATCHES_LIMIT])

    # The whole search -----------------------------------------------------------------

    async def search(self, sites: Sequence[str], query: str, before: int | None = None
                     ) -> dict[str, Any]:
        """``query`` as an email (has an @), an ``sc`` (an uppercase UUID), else as an event
        id and as an order id. Returns what was searched (``kinds``), the identities, their
        sessions, the timeline (newest first), the latest cart, and the deliveries of the
        timeline's events (each with ``attempts``). An event id may match many events (one
        per browser session): ``MATCHES_LIMIT`` of them a page, older than seq ``before``,
        and ``event_ids`` says how many were shown, how many there are, and where the next
        page starts (None: this is the last)."""
        query = query.strip()
        kinds: list[str] = []
        identities: list[dict[str, Any]] = []
        sessions: list[dict[str, Any]] = []
        matched: list[dict[str, Any]] = []  # events found directly (event id, order id)
        event_ids = None
        if "@" in query:
            kinds.append("email")
            identities = await self.identities_by_email(sites, query)
            matched = await self.history_events(sites, query)
        elif SC_RE.match(query):
            kinds.append("sc")
            sessions = await self.sessions_by_sc(sites, query.upper())
            identities = await self.identities_by_id(sorted({s["identity_id"] for s in sessions
                                                             if s["identity_id"]}))
        else:
            kinds += ["event id", "order id"]
            by_id = await self.events_by_event_id(sites, query, before, MATCHES_LIMIT + 1)
            more = len(by_id) > MATCHES_LIMIT
            by_id = by_id[:MATCHES_LIMIT]
            total = (await self.count_by_event_id(sites, query) if more or before is not None
                     else len(by_id))  # a count only when there is more than this page
            event_ids = {"shown": len(by_id), "total": total,
                         "next_before": by_id[-1]["seq"] if more else None}
            matched = by_id + (await self.events_by_order_id(query) if before is None else [])
            identities = await self.identities_by_id(sorted({e["identity_id"] for e in matched
                                                             if e["identity_id"]}))
        identity_ids = [identity["id"] for identity in identities]
        known = {(s["site_id"], s["sc"]) for s in sessions}
        sessions += [s for s in await self.sessions_of(identity_ids)
                     if (s["site_id"], s["sc"]) not in known]
        timeline = {e["seq"]: e for e in matched}
        for found in (await self.session_events(sessions)
                      + await self.sessionless_events(identity_ids)):
            timeline.setdefault(found["seq"], found)
        events = sorted(timeline.values(), key=lambda e: -e["seq"])[:TIMELINE_LIMIT]
        deliveries = await self.deliveries_of_events([e["seq"] for e in events])
        attempts = await self.attempts_of([d["id"] for d in deliveries])
        for row in deliveries:
            row["attempt_list"] = attempts.get(row["id"], [])
        carts = sorted((s for s in sessions if s.get("cart")),
                       key=lambda s: -(s.get("cart_updated_ms") or 0))
        return {"query": query, "kinds": kinds, "identities": identities, "sessions": sessions,
                "events": events, "cart": carts[0]["cart"] if carts else None,
                "cart_session": carts[0] if carts else None, "deliveries": deliveries,
                "scan_window": SCAN_WINDOW, "event_ids": event_ids,
                "matches_counted": MATCHES_COUNTED}

    # Install --------------------------------------------------------------------------

    async def last_from_origin(self, site_id: str, origin: str, window: int = SCAN_WINDOW
                               ) -> dict[str, Any] | None:
        """The latest browser event of ``site_id`` whose page is on ``origin`` (scheme://host
        [:port]), among the latest ``window`` events, newest first."""
        origin = origin.rstrip("/")
        top = await self.latest_seq()
        location = self.json_text("data", "page", "location")
        rows = await self.rows(
            f"SELECT seq, name, received_ms, {location} AS location FROM events "
            "WHERE seq > ? AND site_id = ? AND source != 'backend' "
            f"AND substr({location}, 1, ?) = ? "
            f"AND substr({location}, ? + 1, 1) IN ({marks(ORIGIN_ENDS)}) "
            "ORDER BY seq DESC LIMIT 1",
            [top - window, site_id, len(origin), origin, len(origin), *ORIGIN_ENDS])
        return rows[0] if rows else None
