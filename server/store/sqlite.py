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
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import aiosqlite

from .. import outbox
from ..sessions import cart_snapshot
from .base import Delivery, IngestResult, Outcome, SessionInfo, Store
from .sqlite_ingest import IngestBatch, identity_fields, insert_deliveries

log = logging.getLogger("onetag.store")

MAX_BATCH = 256  # requests per group commit


def now_ms() -> int:
    return int(time.time() * 1000)


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


_INGEST = None  # the job function of ingest requests, which the writer applies together


def _savepoint(conn: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a savepoint: its writes undone if it raises; the error returned."""
    conn.execute("SAVEPOINT job")
    try:
        result = fn(*args)
    except Exception as exc:
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return exc
    conn.execute("RELEASE job")
    return result


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
        """Runs in the connection's thread: one transaction for every job waiting.

        The ingest requests among them are applied together (``IngestBatch``); if that
        fails, each is applied again on its own, so a bad request fails alone. Other jobs
        (claims, outcomes) run in a savepoint each.
        """
        conn = self._writer._conn  # type: ignore[union-attr]
        results: list[Any] = [None] * len(jobs)
        ingests = [i for i, job in enumerate(jobs) if job.fn is _INGEST]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if ingests:
                together = _savepoint(conn, self._ingest_batch, conn,
                                      [jobs[i].args for i in ingests])
                if isinstance(together, Exception):
                    for i in ingests:
                        alone = _savepoint(conn, self._ingest_batch, conn, [jobs[i].args])
                        results[i] = alone if isinstance(alone, Exception) else alone[0]
                else:
                    for i, result in zip(ingests, together):
                        results[i] = result
            for i, job in enumerate(jobs):
                if job.fn is not _INGEST:
                    results[i] = _savepoint(conn, job.fn, conn, *job.args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    # Ingest -----------------------------------------------------------------------------

    async def ingest(self, site_id: str, events: Sequence[dict[str, Any]],
                     raws: Sequence[Any], session: SessionInfo) -> list[IngestResult]:
        return await self._write(_INGEST, site_id, list(events), list(raws), session)

    def _ingest_batch(self, conn: sqlite3.Connection, requests: list[Any]) -> list[Any]:
        return IngestBatch(conn, self.sites, now_ms(), self.hold_ms,
                           self.browser_grace_ms).run(requests)

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
            identity = None
            if identity_id:
                row = conn.execute("SELECT * FROM identities WHERE id = ?", (identity_id,)).fetchone()
                identity = {**identity_fields(row), "id": identity_id, "is_new": False}
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
            insert_deliveries(conn, [(site_id, seq, row) for row in planned], now)
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
