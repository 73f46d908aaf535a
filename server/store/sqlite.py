"""SQLite store: WAL with ``synchronous=FULL``, one writer, group commit.

Every write goes through one queue to one connection. The writer drains whatever requests
are waiting and runs them in one transaction (a savepoint each, so one failing request
fails alone), then commits once: under load many requests share one fsync, and a request
is answered only after the commit that made it durable. The whole batch runs inside
aiosqlite's connection thread in one hop, not one ``await`` per statement (aiosqlite
issue #97: per-statement awaits are an order of magnitude slower). Reads use their own
connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import aiosqlite

from .. import outbox
from ..events import json_number
from ..sessions import apply_cart, cart_snapshot, identity_update
from .base import Delivery, IngestResult, Outcome, SessionInfo, Store

log = logging.getLogger("onetag.store")

MAX_BATCH = 256  # requests per group commit
CART_EVENTS = frozenset({"add_to_cart", "remove_from_cart", "view_cart", "begin_checkout",
                         "cart_updated", "purchase"})


def now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=json_number)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in ``migrations/``, in order."""
    found = []
    folder = resources.files(__package__) / "migrations"
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations this database has not seen; returns their names."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                 "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, name, sql in migrations():
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in sql.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, now_ms()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


class _Job:
    __slots__ = ("fn", "args", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], future: asyncio.Future):
        self.fn, self.args, self.future = fn, args, future


class SQLiteStore(Store):
    def __init__(self, path: str, sites: Mapping[str, Any], hold_ms: int = 7 * 86_400_000,
                 browser_grace_ms: int = 0):
        self.path = path
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.commits = 0  # group commits so far (the benchmark reports requests per commit)

    # Life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = await aiosqlite.connect(self.path, isolation_level=None)
        self._writer.row_factory = sqlite3.Row
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._writer.execute("PRAGMA synchronous=FULL")
        await self._writer.execute("PRAGMA busy_timeout=10000")
        await self._writer._execute(migrate, self._writer._conn)
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=10000")
        self._reader.row_factory = sqlite3.Row
        self._task = asyncio.create_task(self._write_loop(), name="onetag-writer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    async def ping(self) -> None:
        assert self._reader is not None, "store is not open"
        await self._reader.execute_fetchall("SELECT 1")

    # The writer -------------------------------------------------------------------------

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(fn, args, future))
        return await future

    async def _write_loop(self) -> None:
        assert self._writer is not None
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < MAX_BATCH and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                results = await self._writer._execute(self._run_batch, jobs)
            except Exception as exc:  # the commit itself failed: nobody's write is durable
                log.exception("group commit of %d requests failed", len(jobs))
                results = [exc] * len(jobs)
            self.commits += 1
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _run_batch(self, jobs: list[_Job]) -> list[Any]:
        """Runs in the connection's thread: one transaction, a savepoint per request."""
        conn = self._writer._conn  # type: ignore[union-attr]
        results: list[Any] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    results.append(job.fn(conn, *job.args))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append(exc)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    # Ingest -----------------------------------------------------------------------------

    async def ingest(self, site_id: str, events: Sequence[dict[str, Any]],
                     raws: Sequence[Any], session: SessionInfo) -> list[IngestResult]:
        return await self._write(self._ingest, site_id, list(events), list(raws), session)

    def _ingest(self, conn: sqlite3.Connection, site_id: str, events: list[dict[str, Any]],
                raws: list[Any], session: SessionInfo) -> list[IngestResult]:
        site = self.sites[site_id]
        now = now_ms()
        results = []
        for event, raw in zip(events, raws):
            known = conn.execute("SELECT seq FROM events WHERE site_id = ? AND event_id = ?",
                                 (site_id, event["event_id"])).fetchone()
            if known:
                results.append(IngestResult(event["event_id"], known[0], True))
                continue
            sc = event["sc"]
            if sc:
                self._touch_session(conn, site_id, sc, now, session, event)
            identity, newly_bound = self._apply_identity(conn, site_id, event, now)
            event["identity"] = identity
            if sc and event["name"] in CART_EVENTS:
                event["cart"] = self._apply_cart(conn, site, event, now)
            seq = conn.execute(
                "INSERT INTO events (site_id, event_id, name, source, sc, identity_id, "
                "received_ms, raw, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (site_id, event["event_id"], event["name"], event["source"], sc,
                 identity["id"] if identity else None, now, _dumps(raw), _dumps(event)),
            ).lastrowid
            self._insert_deliveries(conn, site_id, seq,
                                    outbox.plan(site, event, None, self.browser_grace_ms), now)
            if newly_bound and sc and identity and identity.get("email"):
                self._release_held(conn, site, sc, identity, now)
            results.append(IngestResult(event["event_id"], seq, False))
        return results

    @staticmethod
    def _touch_session(conn: sqlite3.Connection, site_id: str, sc: str, now: int,
                       session: SessionInfo, event: dict[str, Any]) -> None:
        page = (event.get("page") or {}).get("location")
        conn.execute(
            "INSERT INTO sessions (site_id, sc, first_ms, last_ms, user_agent, last_page) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site_id, sc) DO UPDATE SET "
            "last_ms = excluded.last_ms, "
            "user_agent = coalesce(excluded.user_agent, sessions.user_agent), "
            "last_page = coalesce(excluded.last_page, sessions.last_page)",
            (site_id, sc, now, now, session.user_agent, page))

    def _apply_identity(self, conn: sqlite3.Connection, site_id: str, event: dict[str, Any],
                        now: int) -> tuple[dict[str, Any] | None, bool]:
        """The session's identity after ``event``, and whether the session was newly bound."""
        sc = event["sc"]
        current_id = None
        if sc:
            row = conn.execute("SELECT identity_id FROM sessions WHERE site_id = ? AND sc = ?",
                               (site_id, sc)).fetchone()
            current_id = row[0] if row else None
        user = event.get("user") or {}
        if not (user.get("email") or user.get("customer_id")):
            return (self._identity(conn, current_id) if current_id else None), False
        row = None
        if user.get("email"):
            row = conn.execute("SELECT * FROM identities WHERE site_id = ? AND email = ?",
                               (site_id, user["email"])).fetchone()
        if row is None and user.get("customer_id"):
            row = conn.execute("SELECT * FROM identities WHERE site_id = ? AND customer_id = ?",
                               (site_id, user["customer_id"])).fetchone()
            if row is not None and row["email"] and user.get("email") and row["email"] != user["email"]:
                row = None  # a customer id now used with another email: that email's own identity
        is_new = row is None
        current = _identity_fields(row) if row else None
        fields = identity_update(current, event)
        if is_new:
            if fields.get("customer_id") and conn.execute(
                    "SELECT 1 FROM identities WHERE site_id = ? AND customer_id = ?",
                    (site_id, fields["customer_id"])).fetchone():
                fields.pop("customer_id")  # held by another email's identity
            identity_id = conn.execute(
                "INSERT INTO identities (site_id, email, customer_id, first_name, last_name, "
                "phone, accepts_marketing, created_ms, updated_ms) VALUES (?,?,?,?,?,?,?,?,?)",
                (site_id, fields.get("email"), fields.get("customer_id"), fields.get("first_name"),
                 fields.get("last_name"), fields.get("phone"),
                 _flag(fields.get("accepts_marketing")), now, now)).lastrowid
        else:
            identity_id = row["id"]
            if fields != current:
                if fields.get("customer_id") != (current or {}).get("customer_id") and conn.execute(
                        "SELECT 1 FROM identities WHERE site_id = ? AND customer_id = ? AND id != ?",
                        (site_id, fields.get("customer_id"), identity_id)).fetchone():
                    fields["customer_id"] = (current or {}).get("customer_id")
                conn.execute(
                    "UPDATE identities SET email = ?, customer_id = ?, first_name = ?, "
                    "last_name = ?, phone = ?, accepts_marketing = ?, updated_ms = ? WHERE id = ?",
                    (fields.get("email"), fields.get("customer_id"), fields.get("first_name"),
                     fields.get("last_name"), fields.get("phone"),
                     _flag(fields.get("accepts_marketing")), now, identity_id))
        newly_bound = False
        if sc and current_id != identity_id:
            conn.execute("UPDATE sessions SET identity_id = ? WHERE site_id = ? AND sc = ?",
                         (identity_id, site_id, sc))
            newly_bound = True
        identity = self._identity(conn, identity_id)
        identity["is_new"] = is_new
        return identity, newly_bound

    @staticmethod
    def _identity(conn: sqlite3.Connection, identity_id: int) -> dict[str, Any]:
        row = conn.execute("SELECT * FROM identities WHERE id = ?", (identity_id,)).fetchone()
        identity = _identity_fields(row)
        identity["id"] = identity_id
        identity["is_new"] = False
        return identity

    @staticmethod
    def _apply_cart(conn: sqlite3.Connection, site: Any, event: dict[str, Any],
                    now: int) -> dict[str, Any] | None:
        row = conn.execute("SELECT guid, currency, items FROM carts WHERE site_id = ? AND sc = ?",
                           (site.id, event["sc"])).fetchone()
        items = json.loads(row["items"]) if row else []
        guid = row["guid"] if row else None
        currency = (event.get("ecommerce") or {}).get("currency") or (
            row["currency"] if row else site.currency)
        after = apply_cart(items, event)
        if after is None:
            return None
        if event["name"] == "purchase":
            # The cart as bought, under the guid of its last state (eSputnik's PurchasedItems
            # refers to the last StatusCart GUID); then the session starts an empty cart.
            snapshot = cart_snapshot(items, currency, guid or str(uuid.uuid4()).upper())
            conn.execute("DELETE FROM carts WHERE site_id = ? AND sc = ?", (site.id, event["sc"]))
            return snapshot
        if after != items or guid is None:
            guid = str(uuid.uuid4()).upper()  # a new cart state, a new GUID
        conn.execute(
            "INSERT INTO carts (site_id, sc, guid, currency, items, updated_ms) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site_id, sc) DO UPDATE SET "
            "guid = excluded.guid, currency = excluded.currency, items = excluded.items, "
            "updated_ms = excluded.updated_ms",
            (site.id, event["sc"], guid, currency, _dumps(after), now))
        return cart_snapshot(after, currency, guid)

    @staticmethod
    def _insert_deliveries(conn: sqlite3.Connection, site_id: str, seq: int,
                           rows: Iterable[outbox.PlannedDelivery], now: int) -> None:
        """One row per (site, vendor, dedup_key): a fact planned twice is kept once.

        The one update: the browser reporting a fact whose server copy has not been tried
        yet (a backend order waiting out its grace) cancels that copy — the vendor has it.
        """
        conn.executemany(
            "INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, "
            "state, request, next_attempt_ms, created_ms, updated_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (site_id, vendor, dedup_key) DO UPDATE SET state = 'browser', "
            "updated_ms = excluded.updated_ms, last_error = 'delivered by the browser first' "
            "WHERE excluded.state = 'browser' AND deliveries.state IN ('pending', 'held') "
            "AND deliveries.attempts = 0",
            [(site_id, r.vendor, r.dedup_key, seq, r.visitor, r.state, _dumps(r.request),
              now + r.delay_ms, now, now) for r in rows])

    def _release_held(self, conn: sqlite3.Connection, site: Any, sc: str,
                      identity: dict[str, Any], now: int) -> None:
        """The session just got an email: re-plan what waited for one, within the window."""
        held = conn.execute(
            "SELECT d.event_seq, d.vendor, d.created_ms, e.data FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            "WHERE d.site_id = ? AND d.visitor = ? AND d.state = 'held' ORDER BY d.id",
            (site.id, f"sc:{sc}")).fetchall()
        by_event: dict[int, tuple[str, set[str], bool]] = {}
        for row in held:
            data, vendors, fresh = by_event.get(row["event_seq"], (row["data"], set(), True))
            vendors.add(row["vendor"])
            fresh = fresh and row["created_ms"] >= now - self.hold_ms
            by_event[row["event_seq"]] = (data, vendors, fresh)
        for seq, (data, vendors, fresh) in by_event.items():
            if not fresh:
                conn.execute("UPDATE deliveries SET state = 'expired', updated_ms = ? "
                             "WHERE event_seq = ? AND state = 'held'", (now, seq))
                continue
            event = json.loads(data)
            event["identity"] = {k: v for k, v in identity.items() if k != "is_new"}
            event["identity"]["is_new"] = False
            conn.execute("DELETE FROM deliveries WHERE event_seq = ? AND state = 'held'", (seq,))
            self._insert_deliveries(conn, site.id, seq,
                                    outbox.plan(site, event, vendors, self.browser_grace_ms), now)

    # Reads ------------------------------------------------------------------------------

    async def session_view(self, site_id: str, sc: str, limit: int = 50) -> dict[str, Any]:
        assert self._reader is not None
        session = await self._reader.execute_fetchall(
            "SELECT * FROM sessions WHERE site_id = ? AND sc = ?", (site_id, sc))
        identity = None
        if session and session[0]["identity_id"]:
            rows = await self._reader.execute_fetchall(
                "SELECT * FROM identities WHERE id = ?", (session[0]["identity_id"],))
            identity = {**_identity_fields(rows[0]), "id": rows[0]["id"]} if rows else None
        cart_rows = await self._reader.execute_fetchall(
            "SELECT * FROM carts WHERE site_id = ? AND sc = ?", (site_id, sc))
        cart = (cart_snapshot(json.loads(cart_rows[0]["items"]), cart_rows[0]["currency"],
                              cart_rows[0]["guid"]) if cart_rows else None)
        events = await self._reader.execute_fetchall(
            "SELECT data FROM events WHERE site_id = ? AND sc = ? ORDER BY seq DESC LIMIT ?",
            (site_id, sc, limit))
        deliveries = await self._reader.execute_fetchall(
            "SELECT d.vendor, d.state, d.dedup_key, d.attempts, d.last_error, e.name "
            "FROM deliveries d JOIN events e ON e.seq = d.event_seq "
            "WHERE e.site_id = ? AND e.sc = ? ORDER BY d.id DESC LIMIT ?", (site_id, sc, limit))
        return {"sc": sc, "session": dict(session[0]) if session else None,
                "identity": identity, "cart": cart,
                "events": [json.loads(row["data"]) for row in events],
                "deliveries": [dict(row) for row in deliveries]}

    # The outbox -------------------------------------------------------------------------

    async def claim(self, now_ms: int, lease_ms: int, limit: int,
                    vendors: Iterable[str] | None = None) -> list[Delivery]:
        return await self._write(self._claim, now_ms, lease_ms, limit,
                                 tuple(vendors) if vendors is not None else None)

    @staticmethod
    def _claim(conn: sqlite3.Connection, now: int, lease_ms: int, limit: int,
               vendors: tuple[str, ...] | None) -> list[Delivery]:
        vendor_filter = ""
        params: list[Any] = [now]
        if vendors is not None:
            if not vendors:
                return []
            vendor_filter = f"AND d.vendor IN ({','.join('?' * len(vendors))})"
            params.extend(vendors)
        params.append(limit)
        rows = conn.execute(
            "SELECT d.id, d.site_id, d.vendor, d.dedup_key, d.visitor, d.request, d.attempts, "
            "d.created_ms, coalesce(d.retry_from_ms, d.created_ms) FROM deliveries d "
            f"WHERE d.state = 'pending' AND d.next_attempt_ms <= ? {vendor_filter} "
            "AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.site_id = d.site_id "
            "AND p.vendor = d.vendor AND p.visitor = d.visitor AND p.state = 'pending' "
            # Due longest ago first: with one vendor this walks deliveries_due in order and
            # stops at LIMIT (ORDER BY d.id would check and sort every due row per claim).
            "AND p.id < d.id) ORDER BY d.next_attempt_ms, d.id LIMIT ?", params).fetchall()
        conn.executemany(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_ms = ?, updated_ms = ? "
            "WHERE id = ?", [(now + lease_ms, now, row[0]) for row in rows])
        return [Delivery(id=row[0], site_id=row[1], vendor=row[2], dedup_key=row[3],
                         visitor=row[4], request=json.loads(row[5]), attempts=row[6] + 1,
                         created_ms=row[7], retry_from_ms=row[8]) for row in rows]

    async def finish(self, outcomes: Sequence[Outcome], now_ms: int) -> None:
        if outcomes:
            await self._write(self._finish, list(outcomes), now_ms)

    @staticmethod
    def _finish(conn: sqlite3.Connection, outcomes: list[Outcome], now: int) -> None:
        conn.executemany(
            "UPDATE deliveries SET state = ?, next_attempt_ms = ?, last_error = ?, "
            "updated_ms = ?, delivered_ms = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_ms END "
            "WHERE id = ? AND state = 'pending'",  # a late outcome never undoes a final one
            [(o.state, o.next_attempt_ms, o.error, now, o.state, now, o.id) for o in outcomes])

    async def expire_held(self, before_ms: int, now_ms: int) -> int:
        return await self._write(self._expire_held, before_ms, now_ms)

    @staticmethod
    def _expire_held(conn: sqlite3.Connection, before: int, now: int) -> int:
        return conn.execute("UPDATE deliveries SET state = 'expired', updated_ms = ? "
                            "WHERE state = 'held' AND created_ms < ?", (now, before)).rowcount

    async def delivery_stats(self, now_ms: int) -> list[dict[str, Any]]:
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(
            "SELECT vendor, "
            "sum(state = 'pending' AND last_error IS NULL) AS pending, "
            "sum(state = 'pending' AND last_error IS NOT NULL) AS failing, "
            "sum(state = 'held') AS held, sum(state = 'delivered') AS delivered, "
            "sum(state = 'dead') AS dead, sum(state = 'browser') AS browser, "
            "sum(state = 'expired') AS expired, "
            "min(CASE WHEN state = 'pending' THEN created_ms END) AS oldest_pending_ms "
            "FROM deliveries GROUP BY vendor ORDER BY vendor")
        stats = []
        for row in rows:
            item = dict(row)
            oldest = item.pop("oldest_pending_ms")
            item["oldest_pending_age_s"] = None if oldest is None else max(0, now_ms - oldest) / 1000
            stats.append(item)
        return stats

    async def replay(self, now_ms: int, *, vendor: str | None = None, since_ms: int | None = None,
                     states: Sequence[str] = ("dead",)) -> int:
        return await self._write(self._replay, now_ms, vendor, since_ms, tuple(states))

    def _replay(self, conn: sqlite3.Connection, now: int, vendor: str | None,
                since: int | None, states: tuple[str, ...]) -> int:
        count = 0
        plain = tuple(state for state in states if state != "expired")
        if plain:
            where = [f"state IN ({','.join('?' * len(plain))})"]
            params: list[Any] = [now, now, now, *plain]
            if vendor:
                where.append("vendor = ?")
                params.append(vendor)
            if since is not None:
                where.append("created_ms >= ?")
                params.append(since)
            count += conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_ms = ?, "
                f"retry_from_ms = ?, updated_ms = ?, last_error = NULL WHERE {' AND '.join(where)}",
                params).rowcount
        if "expired" in states:
            count += self._replay_expired(conn, now, vendor, since)
        return count

    def _replay_expired(self, conn: sqlite3.Connection, now: int, vendor: str | None,
                        since: int | None) -> int:
        """Expired rows never had an email; re-plan those whose visitor has one now."""
        where, params = ["d.state = 'expired'"], []
        if vendor:
            where.append("d.vendor = ?")
            params.append(vendor)
        if since is not None:
            where.append("d.created_ms >= ?")
            params.append(since)
        rows = conn.execute(
            "SELECT d.event_seq, d.vendor, e.site_id, e.data, "
            "coalesce(s.identity_id, e.identity_id) AS identity_id FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            "LEFT JOIN sessions s ON s.site_id = e.site_id AND s.sc = e.sc "
            f"WHERE {' AND '.join(where)} ORDER BY d.id", params).fetchall()
        by_event: dict[int, tuple[str, str, int | None, set[str]]] = {}
        for row in rows:
            entry = by_event.setdefault(row["event_seq"], (row["site_id"], row["data"],
                                                           row["identity_id"], set()))
            entry[3].add(row["vendor"])
        inserted = 0
        for seq, (site_id, data, identity_id, vendors) in by_event.items():
            site = self.sites.get(site_id)
            identity = self._identity(conn, identity_id) if identity_id else None
            if site is None or not identity or not identity.get("email"):
                continue
            event = json.loads(data)
            event["identity"] = identity
            planned = [r for r in outbox.plan(site, event, vendors) if r.state == outbox.PENDING]
            replanned = sorted({r.vendor for r in planned})
            if not replanned:
                continue
            conn.execute(f"DELETE FROM deliveries WHERE event_seq = ? AND state = 'expired' "
                         f"AND vendor IN ({','.join('?' * len(replanned))})", (seq, *replanned))
            before = conn.total_changes
            self._insert_deliveries(conn, site_id, seq, planned, now)
            inserted += conn.total_changes - before
        return inserted

    async def list_deliveries(self, *, state: str | None = None, vendor: str | None = None,
                              limit: int = 50) -> list[dict[str, Any]]:
        assert self._reader is not None
        where, params = ["1"], []
        if state:
            where.append("state = ?")
            params.append(state)
        if vendor:
            where.append("vendor = ?")
            params.append(vendor)
        rows = await self._reader.execute_fetchall(
            "SELECT id, site_id, vendor, dedup_key, state, attempts, next_attempt_ms, last_error, "
            f"created_ms, updated_ms, delivered_ms FROM deliveries WHERE {' AND '.join(where)} "
            "ORDER BY id DESC LIMIT ?", [*params, limit])
        return [dict(row) for row in rows]


def _flag(value: Any) -> int | None:
    return None if value is None else int(bool(value))


def _identity_fields(row: sqlite3.Row | None) -> dict[str, Any]:
    if row is None:
        return {}
    fields = {key: row[key] for key in ("email", "customer_id", "first_name", "last_name", "phone")
              if row[key] is not None}
    if row["accepts_marketing"] is not None:
        fields["accepts_marketing"] = bool(row["accepts_marketing"])
    return fields
