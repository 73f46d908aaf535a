"""PostgreSQL store: many ``onetag serve`` nodes and ``onetag worker`` processes, one database.

Each node group-commits its own ingest: the requests that arrive in one turn of the event
loop are applied together in one transaction (``pg_ingest.PgIngestBatch``: set-based
statements over ``unnest`` arrays), committed once with ``synchronous_commit = on``, and
only then answered. Up to ``MAX_BATCHES`` such transactions run at once, each on its own
pooled connection; requests arriving meanwhile wait for the next one. Nodes never share
memory: what two nodes do to one visitor is ordered by the database's row locks
(``pg_ingest`` says which, in which order), and a transaction that loses a race (a
deadlock, a unique key another node took first) is run again from the start.

The rules are the SQLite store's (``store/rules.py``, ``outbox.plan``); the outbox half
(claims, outcomes, replays) is ``postgres_outbox.PostgresOutbox``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Mapping, Sequence

from ..envelope import Problem, Refused
from ..jsontext import encode, loads
from ..sessions import cart_snapshot
from . import pg_migrate
from .base import IngestResult, SessionInfo, Store, StoreUnavailable
from .postgres_outbox import PostgresOutbox
from . import rules
from .rules import identity_fields

log = logging.getLogger("onetag.store")

# Ingest transactions of one node in flight at once (each holds a pooled connection). Two
# lets a node commit one batch while the next is applied; a third made batches smaller
# (more transactions, more round trips a request) and, measured with bench/pg_ingest.py's
# one node, 10-20% fewer events/s. The pool keeps a few more for reads and the outbox.
MAX_BATCHES = 2
# Requests one transaction takes at most: a backlog (a stalled database coming back) is
# committed in several transactions, none holding its row locks for long.
BATCH_REQUESTS = 64
POOL_SIZE = 8
# A transaction that lost a race to another node (deadlock, serialization failure, a
# unique key taken meanwhile) is run again from the start, at most this many times.
RETRIES = 5
# SQLSTATEs worth running the whole transaction again for.
RETRYABLE = {"40001", "40P01", "23505"}
DEFAULT_MAX_PENDING_WRITES = 2000
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    """A failure of the database (not of a request's content) as a 503's reason."""
    state = _sqlstate(exc) or ""
    kind = "disk" if state.startswith("53") else "database"  # 53xxx: insufficient resources
    return StoreUnavailable(kind, f"{type(exc).__name__}: {exc}")


def _is_database_failure(exc: BaseException) -> bool:
    """The connection or the server failed, as opposed to a statement's content."""
    import asyncpg

    if isinstance(exc, (ValueError, TypeError)):  # asyncpg.DataError: an argument's content
        return False
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError,
                        asyncpg.InternalClientError, asyncpg.PostgresConnectionError)):
        return True  # (InternalClientError: asyncpg's state on a connection the server cut)
    state = _sqlstate(exc) or ""
    # 08: connection; 53: resources (disk full, out of memory); 57: operator intervention
    # (shutdown); 58: system errors (I/O); 25006: read-only transaction (a standby).
    return state[:2] in ("08", "53", "57", "58") or state == "25006"


Request = tuple[str, Sequence[dict[str, Any]], Sequence[bytes], str | None, str | None]


async def _keep_session(conn: Any) -> None:
    """The pool's reset of a released connection: nothing to do. asyncpg's default sends
    ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL`` and ``pg_advisory_unlock_all()``: a round
    trip on every release, for session state this store never creates (no ``SET``, no
    ``LISTEN``, no cursors, advisory locks only transaction-scoped). An open transaction is
    still rolled back by the pool before this is called."""


def _nul_field(value: Any, path: str) -> str | None:
    """The path of the first string holding a NUL in ``value``, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = (path if isinstance(key, str) and "\x00" in key
                     else _nul_field(item, f"{path}.{key}"))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_field(item, f"{path}[{index}]")
            if found:
                return found
    return None


class PostgresStore(PostgresOutbox, Store):
    """``Store`` on PostgreSQL through an asyncpg pool (``self.pool``)."""

    def __init__(self, dsn: str, sites: Mapping[str, Any], hold_ms: int = 7 * 86_400_000,
                 browser_grace_ms: int = 0,
                 max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
                 pool_size: int = POOL_SIZE, check_schema: bool = True):
        self.dsn = dsn
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self.max_pending_writes = max_pending_writes
        self.max_pending_bytes = max_pending_bytes
        self.pool_size = pool_size
        self.check_schema = check_schema
        self.pool: Any = None
        self._pending: list[tuple[Request, asyncio.Future[Any], int]] = []
        self._scheduled = False
        self._batches: set[asyncio.Task[None]] = set()
        self._queued = 0
        self._queued_bytes = 0
        self._closing = False
        self.commits = 0  # ingest transactions committed by this node
        self.retries = 0  # ... run again after losing a race to another node
        self.on_commit: Any = None  # called with the requests of each committed batch
        self.fault: Any = None
        self.writer_problem: Any = None

    # Life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect; ``pg_migrate.SchemaNotCurrent`` when the schema lacks migrations (the
        nodes never migrate by themselves: ``onetag migrate`` does)."""
        import asyncpg

        self._closing = False
        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.pool_size,
            # Durable before answered, whatever the database's default: an acknowledged
            # event must survive a crash of the database server.
            server_settings={"synchronous_commit": "on", "application_name": "onetag"},
            reset=_keep_session)
        if self.check_schema:
            try:
                async with self.pool.acquire() as conn:
                    await pg_migrate.check(conn)
            except BaseException:
                await self.pool.close()
                self.pool = None
                raise

    async def migrate(self) -> list[str]:
        """Apply the pending migrations (``onetag migrate``); their names."""
        async with self.pool.acquire() as conn:
            return await pg_migrate.migrate(conn)

    async def close(self, grace_s: float = 10) -> None:
        """Batches already in a transaction are committed and answered (within ``grace_s``);
        requests still waiting fail with 503."""
        self._closing = True
        pending, self._pending = self._pending, []
        for _, future, size in pending:
            self._unqueue(size)
            if not future.done():
                future.set_exception(StoreUnavailable("writer", "the store closed before "
                                                      "this write was made"))
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=grace_s)
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), grace_s)
            except asyncio.TimeoutError:
                pool.terminate()

    async def ping(self, timeout_s: float = 2.0) -> int | None:
        """A committed transaction that takes a transaction id, within ``timeout_s``."""
        if self.pool is None:
            raise StoreUnavailable("database", "the store is not open")
        try:
            async with asyncio.timeout(timeout_s):
                async with self.pool.acquire() as conn:
                    async with conn.transaction():
                        await conn.fetchval("SELECT pg_current_xact_id()")
        except TimeoutError:
            raise StoreUnavailable("database", f"PostgreSQL did not answer within "
                                   f"{timeout_s:g} s") from None
        except Exception as exc:
            raise _unavailable(exc) from None
        return None

    # Ingest -----------------------------------------------------------------------------

    async def ingest(self, site_id: str, events: Sequence[dict[str, Any]],
                     raws: Sequence[Any], session: SessionInfo,
                     request_id: str | None = None) -> list[IngestResult] | Problem:
        if self._closing or self.pool is None:
            raise StoreUnavailable("writer", "the store is not open")
        stored = [encode(raw) for raw in raws]
        for position, raw in enumerate(stored):
            if b"\\u0000" in raw:  # JSON's escape of NUL: cheap to look for in the bytes
                field = _nul_field(raws[position], f"events[{position}]")
                if field is not None:
                    return Problem(422, "invalid_event", field, "contains a NUL character "
                                   "(\\u0000), which PostgreSQL text can't hold")
        size = sum(map(len, stored))
        if (self._queued >= self.max_pending_writes
                or (size and self._queued_bytes + size > self.max_pending_bytes)):
            raise StoreUnavailable("queue", f"{self._queued} writes ({self._queued_bytes} "
                                   "bytes) are waiting for the store; try again shortly")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(((site_id, list(events), stored, session.user_agent, request_id),
                              future, size))
        self._queued += 1
        self._queued_bytes += size
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start, context=contextvars.Context())
        rows = await future
        if isinstance(rows, Problem):
            return rows
        return [IngestResult(*row) for row in rows]

    def _unqueue(self, size: int) -> None:
        self._queued -= 1
        self._queued_bytes -= size

    def _start(self) -> None:
        """At the end of a loop turn: the requests waiting go in one transaction, if a
        batch slot is free (else the next batch to finish starts them)."""
        self._scheduled = False
        while self._pending and len(self._batches) < MAX_BATCHES and not self._closing:
            batch = self._pending[:BATCH_REQUESTS]
            self._pending = self._pending[BATCH_REQUESTS:]
            task = asyncio.get_running_loop().create_task(self._commit(batch),
                                                          name="onetag-pg-ingest")
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._pending and not self._closing:
            self._start()

    async def _commit(self, batch: list[tuple[Request, asyncio.Future[Any], int]]) -> None:
        requests = [request for request, _, _ in batch]
        # Every attempt starts from the events as sent (rules.keep_pristine says why).
        restores = [rules.keep_pristine([request]) for request in requests]
        try:
            try:
                results: list[Any] = await self._transaction(requests, restores)
            except Exception as exc:
                if _is_database_failure(exc) or len(requests) == 1:
                    raise
                # One request's content failed the batch: each alone, so it fails alone.
                results = []
                for request, restore in zip(requests, restores):
                    try:
                        results.append((await self._transaction([request], [restore]))[0])
                    except Exception as alone:
                        if _is_database_failure(alone):
                            raise
                        results.append(alone)
        except Exception as exc:
            failure = _unavailable(exc) if not isinstance(exc, StoreUnavailable) else exc
            if _is_database_failure(exc):
                self.fault = failure
                log.error("the store can't write (%s): %s", failure.kind, failure.message)
                results = [failure] * len(batch)
            else:
                results = [exc] * len(batch)
        else:
            if self.fault is not None:
                log.warning("the store writes again (after: %s)", self.fault.message)
            self.fault = None
        for (request, future, size), result in zip(batch, results):
            self._unqueue(size)
            if future.done():
                continue
            if isinstance(result, Refused):
                future.set_result(result.problem)
            elif isinstance(result, StoreUnavailable):
                future.set_exception(result)
            elif isinstance(result, BaseException):
                log.error("an ingest request failed alone: %s: %s", type(result).__name__,
                          result, extra={"request_id": request[4]})
                future.set_result(Problem(422, "invalid_event", "events", "could not be "
                                          f"stored ({type(result).__name__}: "
                                          f"{str(result)[:200]})"))
            else:
                future.set_result(result)

    async def _transaction(self, requests: list[Request], restores: list[Any]) -> list[Any]:
        """``requests`` applied and committed in one transaction, run again (from a clean
        start: ``restores`` put their events back as sent) when it lost a race to another
        node."""
        from .pg_ingest import PgIngestBatch

        attempt = 0
        while True:
            for restore in restores:
                restore()
            try:
                async with self.pool.acquire() as conn:
                    async with conn.transaction():
                        results = await PgIngestBatch(conn, self.sites, self.hold_ms,
                                                      self.browser_grace_ms).run(requests)
                self.commits += 1
                if self.on_commit is not None:
                    self.on_commit(len(requests))
                return results
            except Exception as exc:
                attempt += 1
                # A connection the server cut (a restart, a failover, an idle timeout) is
                # dropped by the pool: the next attempt gets a new one. Run once more on it;
                # if the cut came after the commit, the event ids answer "duplicate".
                lost = _is_database_failure(exc) and attempt == 1
                if not lost and (_sqlstate(exc) not in RETRYABLE or attempt > RETRIES):
                    raise
                self.retries += 1
                await asyncio.sleep(0.005 * attempt)

    # Reads ------------------------------------------------------------------------------

    async def session_view(self, site_id: str, sc: str, limit: int = 50) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            session = await conn.fetchrow(
                "SELECT * FROM sessions WHERE site_id = $1 AND sc = $2", site_id, sc)
            identity = None
            if session is not None and session["identity_id"]:
                row = await conn.fetchrow("SELECT * FROM identities WHERE id = $1",
                                          session["identity_id"])
                identity = {**identity_fields(row), "id": row["id"]} if row else None
            fields = dict(session) if session is not None else {}
            items, currency, guid = (fields.pop(f"cart_{k}", None)
                                     for k in ("items", "currency", "guid"))
            fields.pop("cart_updated_ms", None)
            cart = cart_snapshot(loads(items), currency, guid) if items is not None else None
            first, last = fields.get("first_seq"), fields.get("last_seq")
            events: list[Any] = []
            deliveries: list[Any] = []
            if last is not None:
                bounds = (first or 0, last, site_id, sc)
                events = await conn.fetch(
                    "SELECT data FROM events WHERE seq BETWEEN $1 AND $2 AND site_id = $3 "
                    "AND sc = $4 ORDER BY seq DESC LIMIT $5", *bounds, limit)
                deliveries = await conn.fetch(
                    "SELECT d.vendor, d.state, d.dedup_key, d.attempts, d.last_error, e.name "
                    "FROM deliveries d JOIN events e ON e.seq = d.event_seq "
                    "WHERE d.event_seq BETWEEN $1 AND $2 AND e.site_id = $3 AND e.sc = $4 "
                    "ORDER BY d.id DESC LIMIT $5", *bounds, limit)
        return {"sc": sc, "session": fields or None, "identity": identity, "cart": cart,
                "events": [loads(row["data"]) for row in events],
                "deliveries": [dict(row) for row in deliveries]}

    def console(self) -> Any:
        """The console's queries on this node's pool (``pg_console.py``)."""
        from .pg_console import PgConsole

        if self.pool is None:
            raise StoreUnavailable("database", "the store is not open")
        return PgConsole(self.pool)

    # The Remarkety Coupons bridge (server/coupons.py) -----------------------------------

    async def record_coupon_call(self, call: Mapping[str, Any]) -> int:
        from .sqlite_writer import COUPON_CALL_COLUMNS as columns

        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                f"INSERT INTO coupon_calls ({', '.join(columns)}) VALUES ({marks}) RETURNING id",
                *(call.get(column) for column in columns))

    async def coupon_calls(self, *, site_id: str | None = None, limit: int = 20
                           ) -> list[dict[str, Any]]:
        from .sqlite_writer import COUPON_CALL_COLUMNS as columns

        where, params = ("WHERE site_id = $1", [site_id]) if site_id else ("", [])
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT id, {', '.join(columns)} FROM coupon_calls {where} "
                f"ORDER BY id DESC LIMIT ${len(params) + 1}", *params, limit)
        return [dict(row) for row in rows]

    # The catalog (server/catalog.py; store/pg_catalog.py) ------------------------------

    async def catalog_state(self, site_id: str) -> tuple[int, int, int]:
        """(products, latest changed_ms, sum of versions): the feeds' ETag."""
        from . import pg_catalog

        async with self.pool.acquire() as conn:
            return await pg_catalog.catalog_state(conn, site_id)

    async def catalog_page(self, site_id: str, after: str | None,
                           limit: int) -> list[dict[str, Any]]:
        from . import pg_catalog

        async with self.pool.acquire() as conn:
            return await pg_catalog.catalog_page(conn, site_id, after, limit)

    async def catalog_sites(self) -> list[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT DISTINCT site_id FROM products ORDER BY site_id")
        return [row[0] for row in rows]

    async def plan_product_sync(self, site_id: str, now_ms: int, night: str | None,
                                limit: int) -> dict[str, Any]:
        """One step of the Sendlane product sync, in a transaction of its own."""
        from . import pg_catalog

        site = self.sites.get(site_id)
        if site is None:
            return {"changes": 0, "nightly": 0, "more": False}
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                return await pg_catalog.plan_sync(conn, site, now_ms, night, limit)

    # Backfill (server/backfill.py) ------------------------------------------------------

    async def backfill_run(self, site_id: str, files: str, files_hash: str,
                           lines_total: int) -> tuple[int, int, str]:
        """As SQLite's: the unfinished run over these files, else a new one. Two runs started
        at once over the same files take turns on an advisory lock, so one resumes the
        other's row instead of both making one."""
        now = int(time.time() * 1000)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))",
                                   f"backfill\x1f{site_id}\x1f{files_hash}")
                row = await conn.fetchrow(
                    "SELECT id, lines_done, counts FROM backfill_runs WHERE site_id = $1 AND "
                    "files_hash = $2 AND finished_ms IS NULL ORDER BY id DESC LIMIT 1",
                    site_id, files_hash)
                if row is not None:
                    return row[0], row[1], row[2]
                run_id = await conn.fetchval(
                    "INSERT INTO backfill_runs (site_id, files, files_hash, lines_total, "
                    "started_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $5) RETURNING id",
                    site_id, files, files_hash, lines_total, now)
        return run_id, 0, "{}"

    async def backfill(self, site_id: str, run_id: int, events: list[tuple[Any, ...]],
                       skipped: dict[str, dict[str, int]], lines_done: int, finished: bool,
                       pace_ms: int = 0) -> tuple[dict[str, int], dict[str, int], int]:
        """One batch of history with the run's progress, in one transaction (SQLite's
        ``WriteOps.backfill``, whose docstring says what each part means)."""
        from . import pg_backfill

        attempt = 0
        while True:
            try:
                async with self.pool.acquire() as conn:
                    async with conn.transaction():
                        return await pg_backfill.backfill(conn, site_id, run_id, events,
                                                          skipped, lines_done, finished,
                                                          pace_ms)
            except Exception as exc:
                attempt += 1
                if _sqlstate(exc) not in RETRYABLE or attempt > RETRIES:
                    if _is_database_failure(exc):
                        raise _unavailable(exc) from None
                    raise
                await asyncio.sleep(0.005 * attempt)
