"""SQLite store: WAL with ``synchronous=FULL``, one writer, group commit.

Every write goes to one writer (``sqlite_writer.py``), which applies the jobs waiting in
one transaction (up to ``TRANSACTION_JOBS`` in the writer process), then commits once: under load many requests share one fsync,
and a request is answered only after the commit that made it durable. The writer runs in
a process of its own (``writer="process"``, what ``onetag serve`` uses) or in aiosqlite's
connection thread (``writer="thread"``, for tools and tests). Reads use their own
aiosqlite connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import aiosqlite

from ..jsontext import encode, loads
from ..sessions import cart_snapshot
from ..envelope import BrowserFacts, Problem
from .base import BrowserIngested, Delivery, IngestResult, Outcome, SessionInfo, Store
from .sqlite_ingest import identity_fields
from .sqlite_writer import ProcessWriter, ThreadWriter, migrate, migrations, now_ms

__all__ = ["SQLiteStore", "migrate", "migrations", "now_ms"]

log = logging.getLogger("onetag.store")

WRITERS = {"process": ProcessWriter, "thread": ThreadWriter}


class StoreClosed(RuntimeError):
    """A write asked of a store that is closing: it was not made."""


class SQLiteStore(Store):
    def __init__(self, path: str, sites: Mapping[str, Any], hold_ms: int = 7 * 86_400_000,
                 browser_grace_ms: int = 0, writer: str = "thread"):
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {', '.join(WRITERS)}, not {writer!r}")
        self.path = path
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self.writer_kind = writer
        self._writer: ProcessWriter | ThreadWriter | None = None
        self._reader: aiosqlite.Connection | None = None
        # Jobs not yet sent: (op, args, future). Sent once per turn of the event loop.
        self._pending: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._send_scheduled = False
        self._in_flight = 0  # batches sent, not yet answered
        self.commits = 0  # transactions the writer committed (the benchmark reports requests per commit)

    # Life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = WRITERS[self.writer_kind](self.path, self.sites, self.hold_ms,
                                                 self.browser_grace_ms)
        await self._writer.start()  # migrates before anything reads
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=10000")
        self._reader.row_factory = sqlite3.Row

    async def close(self) -> None:
        """Batches already sent are committed and answered; jobs not sent yet fail."""
        pending, self._pending = self._pending, []
        for _, _, future in pending:
            if not future.done():
                future.set_exception(StoreClosed("the store closed before this write was made"))
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.stop()

    async def ping(self) -> None:
        assert self._reader is not None, "store is not open"
        await self._reader.execute_fetchall("SELECT 1")

    # The writer -------------------------------------------------------------------------
    #
    # Group commit without a queue task: a write adds its job to ``_pending`` and, the first
    # in this turn of the event loop, schedules ``_send`` for the end of the turn. The jobs
    # of one turn go to the writer in frames of up to ``frame_jobs``; up to ``depth``
    # frames are in flight, and jobs arriving meanwhile wait for the next answer.

    async def _write(self, op: str, *args: Any) -> Any:
        if self._writer is None:
            raise StoreClosed("the store is not open")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((op, args, future))
        if not self._send_scheduled:
            self._send_scheduled = True
            future.get_loop().call_soon(self._send)
        return await future

    def _send(self) -> None:
        self._send_scheduled = False
        writer = self._writer
        while self._pending and writer is not None and self._in_flight < writer.depth:
            size = writer.frame_jobs
            batch, self._pending = self._pending[:size], self._pending[size:]
            self._in_flight += 1
            try:
                answer = writer.submit([(op, args) for op, args, _ in batch])
            except Exception as exc:  # the writer is gone: nothing of this batch was made
                answer = asyncio.get_running_loop().create_future()
                answer.set_exception(exc)
            answer.add_done_callback(
                lambda done, batch=batch, writer=writer: self._answered(batch, done, writer))

    def _answered(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]],
                  answer: asyncio.Future[Any], writer: ProcessWriter | ThreadWriter) -> None:
        self._in_flight -= 1
        self.commits = writer.transactions
        if answer.cancelled():
            results: list[Any] = [StoreClosed("the writer stopped")] * len(batch)
        elif answer.exception() is not None:  # the commit failed: nobody's write is durable
            exc = answer.exception()
            log.error("group commit of %d jobs failed: %s", len(batch), exc)
            results = [exc] * len(batch)
        else:
            results = answer.result()
        for (_, _, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._pending:
            self._send()

    # Ingest -----------------------------------------------------------------------------

    async def ingest(self, site_id: str, events: Sequence[dict[str, Any]],
                     raws: Sequence[Any], session: SessionInfo) -> list[IngestResult]:
        # What crosses to a writer process is kept to plain values: the events as sent go
        # as their stored JSON (bytes, not dicts of Decimals), the visitor as its user
        # agent, and the answer comes back as (event_id, seq, duplicate) tuples.
        rows = await self._write("ingest", site_id, list(events), [encode(raw) for raw in raws],
                                 session.user_agent)
        return [IngestResult(*row) for row in rows]

    async def ingest_browser(self, data: bytes, facts: BrowserFacts) -> BrowserIngested | Problem:
        # The writer reads the body (envelope.read_browser_body) on its own core: only the
        # bytes cross, and the sc and (event_id, seq, duplicate) tuples come back.
        answer = await self._write("ingest_browser", data, facts)
        if isinstance(answer, Problem):
            return answer
        sc, rows = answer
        return BrowserIngested(sc, [IngestResult(*row) for row in rows])

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
        items, currency, guid = (fields.pop(f"cart_{k}", None)
                                 for k in ("items", "currency", "guid"))
        fields.pop("cart_updated_ms", None)
        cart = cart_snapshot(loads(items), currency, guid) if items is not None else None
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

    async def delivery_stats(self, now_ms: int) -> list[dict[str, Any]]:
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(
            "SELECT vendor, "
            "sum(state = 'pending' AND last_error IS NULL) AS pending, "
            "sum(state = 'pending' AND last_error IS NOT NULL) AS failing, "
            "sum(state = 'held') AS held, sum(state = 'delivered') AS delivered, "
            "sum(state = 'dead') AS dead, sum(state = 'browser') AS browser, "
            "sum(state = 'expired') AS expired, sum(state = 'ignored') AS ignored, "
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
        return await self._write("replay", now_ms, vendor, since_ms, tuple(states))

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
