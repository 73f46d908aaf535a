"""SQLite store: WAL with ``synchronous=FULL``, one writer, group commit.

Every write goes to one writer (``sqlite_writer.py``), which applies the jobs waiting in
one transaction (up to ``TRANSACTION_JOBS`` in the writer process), then commits once: under load many requests share one fsync,
and a request is answered only after the commit that made it durable. The writer runs in
a process of its own (``writer="process"``, what ``onetag serve`` uses) or in aiosqlite's
connection thread (``writer="thread"``, for tools and tests). Reads use their own
aiosqlite connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import aiosqlite

from ..jsontext import loads
from ..sessions import cart_snapshot
from . import deadletters
from .base import Delivery, JobFailure, Outcome, Store, StoreUnavailable
from .deadletters import OLDEST_PENDING, ReplayFilter
from .sqlite_ingest import identity_fields
from . import person as person_module, rules, sqlite_catalog, sqlite_ingest
from .sqlite_writer import (COUPON_CALL_COLUMNS, ProcessWriter, ThreadWriter, commit_failure,
                            migrate, migrations, now_ms)
from .writer_supervisor import (DEFAULT_MAX_PENDING_BYTES, DEFAULT_MAX_PENDING_WRITES,
                                DEFAULT_WRITER_TIMEOUT_S, WriterSupervisor)

__all__ = ["SQLiteStore", "migrate", "migrations", "now_ms"]

log = logging.getLogger("onetag.store")

WRITERS = {"process": ProcessWriter, "thread": ThreadWriter}
# Per vendor named (a JSON list), when its oldest pending row fell due: a seek into
# deliveries_oldest_pending (migrations 014, 020), which holds the pending rows by (vendor, this
# expression). A GROUP BY over the pending rows read each from the table.
OLDEST_PENDING_BY_VENDOR = (
    f"SELECT v.value, (SELECT min({OLDEST_PENDING}) FROM deliveries "
    "WHERE state = 'pending' AND vendor = v.value) FROM json_each(?) AS v")


class SQLiteStore(WriterSupervisor, Store):
    def __init__(self, path: str, sites: Mapping[str, Any], hold_ms: int = 7 * 86_400_000,
                 browser_grace_ms: int = 0, writer: str = "thread",
                 writer_timeout_s: float = DEFAULT_WRITER_TIMEOUT_S,
                 max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES):
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {', '.join(WRITERS)}, not {writer!r}")
        self.path = path
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self.writer_kind = writer
        self.writer_timeout_s = writer_timeout_s
        self.max_pending_writes = max_pending_writes
        self.max_pending_bytes = max_pending_bytes
        self._reader: aiosqlite.Connection | None = None
        self._init_supervisor()

    # Life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._closing = False
        self._writer = await self._start_writer()  # migrates before anything reads
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=10000")
        self._reader.row_factory = sqlite3.Row

    def _new_writer(self) -> ProcessWriter | ThreadWriter:
        return WRITERS[self.writer_kind](self.path, self.sites, self.hold_ms,
                                         self.browser_grace_ms, self.writer_timeout_s)

    def _failure(self, exc: BaseException) -> JobFailure:
        return commit_failure(exc)

    async def close(self, grace_s: float = 10) -> None:
        """Frames already sent are committed and answered (within ``grace_s``); jobs not
        sent yet fail."""
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        await self._stop_writer(grace_s)

    # Reads ------------------------------------------------------------------------------

    async def session_view(self, site_id: str, sc: str, limit: int = 50) -> dict[str, Any]:
        assert self._reader is not None
        session = await self._reader.execute_fetchall(
            "SELECT * FROM sessions WHERE site_id = ? AND sc = ?", (site_id, sc))
        identity = None
        if session and session[0]["identity_id"]:
            rows = await self._reader.execute_fetchall(
                "SELECT * FROM identities WHERE id = ?", (session[0]["identity_id"],))
            identity = {**identity_fields(rows[0]), "id": rows[0]["id"]} if rows else None
        fields = dict(session[0]) if session else {}
        items, currency, guid, cart_id = (fields.pop(f"cart_{k}", None)
                                          for k in ("items", "currency", "guid", "id"))
        fields.pop("cart_updated_ms", None)
        cart = (cart_snapshot(loads(items), currency, guid, cart_id) if items is not None
                else None)
        # No index on (site, sc): the session row's seq bounds limit the walk back through
        # events (migration 003 says why), newest first, until `limit` of them are found.
        first, last = fields.get("first_seq"), fields.get("last_seq")
        events = deliveries = []
        if last is not None:
            bounds = (first or 0, last, site_id, sc)
            events = await self._reader.execute_fetchall(
                "SELECT data FROM events WHERE seq BETWEEN ? AND ? AND site_id = ? AND sc = ? "
                "ORDER BY seq DESC LIMIT ?", (*bounds, limit))
            deliveries = await self._reader.execute_fetchall(
                "SELECT d.vendor, d.state, d.dedup_key, d.attempts, d.last_error, e.name "
                "FROM deliveries d JOIN events e ON e.seq = d.event_seq "
                "WHERE d.event_seq BETWEEN ?1 AND ?2 AND e.seq BETWEEN ?1 AND ?2 "
                "AND e.site_id = ?3 AND e.sc = ?4 ORDER BY d.id DESC LIMIT ?5", (*bounds, limit))
        return {"sc": sc, "session": fields or None,
                "identity": identity, "cart": cart,
                "events": [loads(row["data"]) for row in events],
                "deliveries": [dict(row) for row in deliveries]}

    # A shopper's data (store/person.py) --------------------------------------------------

    async def person(self, who: Any) -> person_module.Person:
        """On the reader (WAL: beside the writer), without taking the write lock."""
        return await person_module.run_async(person_module.gather(person_module.SQLITE, who),
                                             person_module.aiosqlite_execute(self.reader))

    async def forget_person(self, who: Any, dry_run: bool = True) -> dict[str, Any]:
        """The events naming the identity are found on the reader first (a read of the
        site's events, which the writer's lock must not wait for), then everything again
        in the writer's transaction, those by seq (``person.Scanned``). A dry run is that
        first read alone."""
        rows = await self.reader.execute_fetchall("SELECT coalesce(max(seq), 0) FROM events")
        found = await self.person(who)
        if dry_run:  # counted on the reader: a dry run takes no write lock
            return person_module.forget_report(found, True, None)
        return await self._write("forget_person", tuple(who),
                                 tuple(person_module.scanned(found, rows[0][0])))

    # The catalog (server/catalog.py) ----------------------------------------------------

    async def catalog_state(self, site_id: str) -> tuple[int, int, int]:
        """(products, latest changed_ms, sum of versions): what the feeds' ETag is made of;
        any change of a product moves the last two."""
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(sqlite_catalog.STATE_SQL, (site_id,))
        count, changed, versions = rows[0]
        return int(count), int(changed), int(versions)

    async def catalog_page(self, site_id: str, after: str | None,
                           limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` products of a site whose item_id sorts after ``after``."""
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(sqlite_catalog.FEED_PAGE_SQL,
                                                   (site_id, after or "", limit))
        return [sqlite_catalog.as_dict(tuple(row)) for row in rows]

    async def catalog_sites(self) -> list[str]:
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(
            "SELECT DISTINCT site_id FROM products ORDER BY site_id")
        return [row[0] for row in rows]

    async def plan_product_sync(self, site_id: str, now_ms: int, night: str | None,
                                limit: int) -> dict[str, Any]:
        """One step of the Sendlane product sync (server/product_sync.py), in the writer."""
        return await self._write("plan_product_sync", site_id, now_ms, night, limit)

    # The outbox -------------------------------------------------------------------------

    async def claim(self, now_ms: int, lease_ms: int, limit: int,
                    vendors: Iterable[str] | None = None) -> list[Delivery]:
        return await self._write("claim", now_ms, lease_ms, limit,
                                 tuple(vendors) if vendors is not None else None)

    async def finish(self, outcomes: Sequence[Outcome], now_ms: int) -> None:
        if outcomes:
            await self._write("finish", list(outcomes), now_ms)

    async def expire_held(self, before_ms: int, now_ms: int) -> int:
        return await self._write("expire_held", before_ms, now_ms)

    async def prune_attempts(self, before_ms: int, limit: int) -> int:
        return await self._write("prune_attempts", before_ms, limit)

    async def label_attempts(self, before: tuple[int, int], limit: int
                             ) -> tuple[int, tuple[int, int] | None]:
        return await self._write("label_attempts", tuple(before), limit)

    async def prune_coupon_calls(self, before_ms: int, limit: int) -> int:
        return await self._write("prune_coupon_calls", before_ms, limit)

    async def prune_deliveries(self, before_ms: int, limit: int) -> int:
        return await self._write("prune_deliveries", before_ms, limit)

    async def prune_events(self, before_ms: int, after: int, limit: int
                           ) -> tuple[int, int | None]:
        deleted, last = await self._write("prune_events", before_ms, after, limit)
        return deleted, last

    async def prune_sessions(self, before_ms: int, after: int, limit: int
                             ) -> tuple[int, int | None]:
        deleted, last = await self._write("prune_sessions", before_ms, after, limit)
        return deleted, last

    async def attempts(self, delivery_id: int) -> list[dict[str, Any]]:
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(
            "SELECT attempt, started_ms, duration_ms, request, status, answer, error "
            "FROM attempts WHERE delivery_id = ? ORDER BY id", (delivery_id,))
        planned = await self._reader.execute_fetchall(
            "SELECT request FROM deliveries WHERE id = ?", (delivery_id,))
        planned_request = loads(planned[0][0]) if planned and planned[0][0] else {}
        found = []
        for row in rows:
            item = dict(row)
            item["request"] = with_body(loads(item["request"]), planned_request)
            item["answer"] = None if item["answer"] is None else loads(item["answer"])
            found.append(item)
        return found

    async def delivery_stats(self, now_ms: int) -> list[dict[str, Any]]:
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(
            "SELECT vendor, "
            "sum(state = 'pending' AND last_error IS NULL) AS pending, "
            "sum(state = 'pending' AND last_error IS NOT NULL) AS failing, "
            "sum(state = 'held') AS held, sum(state = 'delivered') AS delivered, "
            "sum(state = 'dead') AS dead, sum(state = 'browser') AS browser, "
            "sum(state = 'expired') AS expired, sum(state = 'ignored') AS ignored, "
            f"min(CASE WHEN state = 'pending' THEN {OLDEST_PENDING} END) AS oldest_pending_ms "
            "FROM deliveries GROUP BY vendor ORDER BY vendor")
        stats = []
        for row in rows:
            item = dict(row)
            oldest = item.pop("oldest_pending_ms")
            item["oldest_pending_age_s"] = None if oldest is None else max(0, now_ms - oldest) / 1000
            stats.append(item)
        return stats

    async def outbox_depth(self, now_ms: int) -> tuple[list[tuple[str, str, int]], dict[str, float]]:
        """For ``/metrics``, cheaper than ``delivery_stats``: rows per (vendor, state) for
        the states still in the outbox (pending, held, dead), and per vendor the age in
        seconds of its oldest pending row (``OLDEST_PENDING``: since it fell due). The counts
        read the ``deliveries_due`` index alone; the age is one seek per vendor with pending
        rows into ``deliveries_oldest_pending`` (migrations 014, 020). The delivered rows, however
        many, are not visited."""
        assert self._reader is not None
        depth = await self._reader.execute_fetchall(
            "SELECT vendor, state, count(*) FROM deliveries "
            "WHERE state IN ('pending', 'held', 'dead') GROUP BY state, vendor")
        pending = sorted({vendor for vendor, state, _ in depth if state == "pending"})
        oldest = await self._reader.execute_fetchall(OLDEST_PENDING_BY_VENDOR,
                                                     [json.dumps(pending)]) if pending else []
        return ([(vendor, state, count) for vendor, state, count in depth],
                {vendor: max(0, now_ms - created) / 1000 for vendor, created in oldest
                 if created is not None})

    async def replay_rows(self, now_ms: int, *, vendor: str | None = None,
                          since_ms: int | None = None, states: Sequence[str] = ("dead",),
                          ids: Sequence[int] | None = None, dry_run: bool = False,
                          site_id: str | None = None, until_ms: int | None = None,
                          error: str | None = None, time_field: str = "created"
                          ) -> list[dict[str, Any]]:
        """``until_ms`` (exclusive), ``site_id`` and ``error`` (a substring of last_error)
        narrow it further, ``time_field="updated"`` puts since/until on the last attempt;
        every condition is ``deadletters.where``'s."""
        selection = ReplayFilter(tuple(states), vendor, site_id, since_ms, until_ms, error,
                                 None if ids is None else tuple(ids), time_field)
        await self._check_replay(selection)
        made = await self._write("replay_rows", now_ms, selection, dry_run)
        if not dry_run:
            _log_replay(len(made), selection)
        return made

    async def backfill_run(self, site_id: str, files: str, files_hash: str,
                           lines_total: int) -> tuple[int, int, str]:
        return await self._write("backfill_run", site_id, files, files_hash, lines_total)

    async def known_orders(self, wanted: Sequence[tuple[str, str, str]]) -> rules.KnownOrders:
        """``sqlite_ingest.load_orders``' rows, read on the reader connection (committed
        rows: a backfill batch still being written is the caller's to remember)."""
        assert self._reader is not None
        orders = rules.KnownOrders(wanted)
        for sql, params in sqlite_ingest.orders_statements(wanted):
            for site_id, vendor, key, claim, state, request in (
                    await self._reader.execute_fetchall(sql, params)):
                orders.add(site_id, vendor, key, claim, state, loads(request))
        return orders

    async def backfill(self, site_id: str, run_id: int, events: list[tuple[Any, ...]],
                       skipped: dict[str, dict[str, int]], lines_done: int, finished: bool,
                       pace_ms: int = 0) -> tuple[dict[str, int], dict[str, int], int]:
        return await self._write("backfill", site_id, run_id, events, skipped, lines_done,
                                 finished, pace_ms,
                                 size=sum(len(e[2]) + len(e[3]) for e in events))

    async def _check_replay(self, selection: ReplayFilter) -> None:
        """``ValueError`` naming the field for a filter a replay can't take, or one that
        matches more rows than one replay (one writer transaction, which ingest waits
        for) may take: counted on the reader, before any work."""
        problem = deadletters.check(selection, replay=True)
        if problem:
            raise ValueError(problem)
        for state in selection.states:
            limit = deadletters.MAX_REPLAY_ROWS[state]
            condition, params = deadletters.where(selection, states=(state,))
            rows = await self.reader.execute_fetchall(
                f"SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE {condition} LIMIT ?)",
                [*params, limit + 1])
            if rows[0][0] > limit:
                raise ValueError(f"states: more than {limit} {state} deliveries match; one "
                                 f"replay takes at most {limit}: narrow the filter (vendor, "
                                 f"site, since/until, error text)")

    async def replay_preview(self, now_ms: int, selection: ReplayFilter) -> tuple[int, str]:
        """What ``replay_recorded`` would take now: (count, fingerprint); changes nothing."""
        await self._check_replay(selection)
        count, fingerprint = await self._write("replay_preview", now_ms, selection)
        return count, fingerprint

    async def replay_recorded(self, now_ms: int, selection: ReplayFilter, who: str,
                              expect: str | None = None, shown: int | None = None
                              ) -> dict[str, Any]:
        """Replay ``selection`` and record it (``replays``: who, when, the filter, ``shown``:
        the dry-run count the operator saw) in one transaction. With ``expect`` (the dry
        run's ``deadletters.fingerprint``), a set that changed since is not replayed: the
        answer has ``changed`` and the rows as they are now. Returns ``{changed, rows,
        replay_id, fingerprint}``."""
        await self._check_replay(selection)
        result = await self._write("replay_recorded", now_ms, selection, who, expect, shown)
        if not result["changed"]:
            _log_replay(len(result["rows"]), selection, who)
        return result

    async def record_replay(self, now_ms: int, who: str, scope: Mapping[str, Any],
                            rows: Sequence[Mapping[str, Any]], shown: int | None = None) -> int:
        """Record a replay already made (``rows``: what ``replay_rows`` returned; ``scope``:
        what was asked, as JSON-able fields); the new record's id."""
        return await self._write("record_replay", now_ms, who, dict(scope), shown,
                                 [row["id"] for row in rows])

    @property
    def reader(self) -> aiosqlite.Connection:
        """The read-only connection (WAL: it reads beside the writer)."""
        if self._reader is None:
            raise StoreUnavailable("database", "the store is not open")
        return self._reader

    def console(self) -> Any:
        """The console's queries on the reader connection (``sqlite_console.py``)."""
        from .sqlite_console import SQLiteConsole

        return SQLiteConsole(self.reader)

    async def list_deliveries(self, *, state: str | None = None, vendor: str | None = None,
                              limit: int = 50, ids: Sequence[int] | None = None
                              ) -> list[dict[str, Any]]:
        assert self._reader is not None
        where, params = ["1"], []
        if state == "failing":
            where.append("d.state = 'pending' AND d.last_error IS NOT NULL")
        elif state:
            where.append("d.state = ?")
            params.append(state)
        if vendor:
            where.append("d.vendor = ?")
            params.append(vendor)
        if ids is not None:
            where.append(f"d.id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        rows = await self._reader.execute_fetchall(
            "SELECT d.id, d.site_id, d.vendor, d.dedup_key, d.state, d.attempts, "
            "d.next_attempt_ms, d.last_error, d.created_ms, d.updated_ms, d.delivered_ms, "
            "coalesce(d.retry_from_ms, d.created_ms) AS retry_from_ms, d.request_id, "
            "CASE WHEN d.state = 'pending' THEN (SELECT min(p.id) FROM deliveries p "
            "WHERE p.site_id = d.site_id AND p.vendor = d.vendor AND p.visitor = d.visitor "
            "AND p.state = 'pending' AND p.id < d.id) END AS waits_for "
            f"FROM deliveries d WHERE {' AND '.join(where)} ORDER BY d.id DESC LIMIT ?",
            [*params, limit])
        return [dict(row) for row in rows]

    # The console's logouts (migration 016) ----------------------------------------------

    async def revoke_session(self, nonce: str, expires_ms: int, now_ms: int) -> None:
        """Through the writer: answered once committed."""
        await self._write("revoke_session", nonce, int(expires_ms), int(now_ms))

    async def session_revoked(self, nonce: str) -> bool:
        rows = await self.reader.execute_fetchall(
            "SELECT 1 FROM console_logouts WHERE nonce = ?", (nonce,))
        return bool(rows)

    # Wrong guesses of a secret (migration 019) -------------------------------------------

    async def guess_failed(self, scope: str, address: str, now_ms: int, window_ms: int,
                           earlier_ms: Sequence[int] = ()) -> list[int]:
        """Through the writer, answered once committed, as a side write: outside
        ``max_pending_writes`` and refused while the queue is busy (``WriterSupervisor``)."""
        return await self._write("guess_failed", scope, address, int(now_ms), int(window_ms),
                                 tuple(int(t) for t in earlier_ms))

    async def guess_failures(self, scope: str, address: str, since_ms: int) -> list[int]:
        from .sqlite_writer import GUESS_READ_SQL

        rows = await self.reader.execute_fetchall(
            GUESS_READ_SQL.format(scope="?", address="?", since="?"),
            (scope, address, int(since_ms)))
        return [row[0] for row in rows]

    async def guesses_cleared(self, scope: str, address: str) -> None:
        await self._write("guesses_cleared", scope, address)

    # The Remarkety Coupons bridge (server/coupons.py) -----------------------------------

    async def record_coupon_call(self, call: Mapping[str, Any]) -> int:
        return await self._write("record_coupon_call",
                                 tuple(call.get(column) for column in COUPON_CALL_COLUMNS))

    async def coupon_calls(self, *, site_id: str | None = None, limit: int = 20
                           ) -> list[dict[str, Any]]:
        assert self._reader is not None
        where, params = ("WHERE site_id = ?", [site_id]) if site_id else ("", [])
        rows = await self._reader.execute_fetchall(
            f"SELECT id, {', '.join(COUPON_CALL_COLUMNS)} FROM coupon_calls {where} "
            "ORDER BY id DESC LIMIT ?", [*params, limit])
        return [dict(row) for row in rows]


def with_body(sent: dict[str, Any], planned: Mapping[str, Any]) -> dict[str, Any]:
    """An attempt's request with its body put back from the delivery row's request, which
    the attempt names (``body_of``) instead of storing a copy of it."""
    source = sent.pop("body_of", None)
    if source is not None:
        request = planned.get("if_not_found") if source == "if_not_found" else planned
        sent["body"] = (request or {}).get("json")
    return sent


def _log_replay(count: int, selection: ReplayFilter, who: str | None = None) -> None:
    """A replay at info; the forwarder logs each replayed delivery as it is sent."""
    fields = selection.describe()
    fields.pop("states", None)
    scope = ", ".join(f"{key} {', '.join(map(str, value)) if isinstance(value, list) else value}"
                      for key, value in fields.items()) or "any vendor, any time"
    log.info("replayed %d deliveries (%s; %s)%s", count, ", ".join(selection.states), scope,
             f" by {who}" if who else "", extra={"replayed": count, "vendor": selection.vendor})
