"""The writing side of the PostgreSQL store's ingest: one node's group commit.

``PgWriteOps`` owns the ingest connections of one node: it reads browser bodies
(``envelope.read_browser_body``), applies the requests that arrive in one turn of its event
loop together in one transaction (``pg_ingest.PgIngestBatch``: set-based statements over
``unnest`` arrays, the rules of ``store/rules.py``), commits once with
``synchronous_commit = on``, and only then answers. A batch of browser events that change
no identity is tried first as one unlocked read and one write that is its own transaction
(``run_optimistic``); what that can't write is run as the locked transaction. One such transaction runs at a time in
steady traffic, and requests arriving meanwhile wait for the next (so batches grow with
load); a second starts beside it only when the first is slow or a backlog waits
(``MAX_BATCHES``, ``SECOND_BATCH_AFTER_S``). A transaction that lost a race to another node
is run again from the start.

``onetag serve`` runs it in a process of its own (``python -m server.store.pg_writer``,
``PgProcessWriter``), fed frames of plain data as SQLite's writer is (``writer_process``),
so that parsing bodies and applying the rules happen on the other core, not on the loop
that serves HTTP: on the node's loop they cost about twice bare Starlette's whole request
(bench/pg_ingest.py). Tools and tests run the same ops in-process (``InlineWriter``).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
import time
from collections import Counter
from typing import Any, Mapping, Sequence

from ..envelope import BrowserFacts, Problem, Refused, read_browser_body
from ..events import NUL_PROBLEM
from ..jsontext import encode
from . import compat, pg_migrate, rules
from .base import JobFailure, StoreUnavailable
from .writer_process import (INGEST_OPS, UNREADABLE, WriterProcess, child_pipes, encode_frame,
                             reply_frame)

log = logging.getLogger("onetag.store")

# Ingest transactions of one node in flight at once (each holds a pooled connection). In
# steady traffic only one: requests arriving while it commits make the next batch bigger,
# and a batch's fixed cost (round trips, the commit) is most of a small one's. Measured
# with bench/pg_ingest.py's one node at 32 connections, quiet machine, back to back: two
# always in flight gave 0.45 and 0.41 of bare Starlette (11.7 requests a transaction), one
# at a time 0.52 and 0.49 (14.9), with less CPU a request; a third in flight made batches
# smaller still. The second slot is for a transaction that is slow (a row lock another
# node holds, a database stalling) or a backlog: it starts once the one in flight has run
# SECOND_BATCH_AFTER_S, or when BATCH_REQUESTS requests wait. Tried and not kept: starting
# the next batch as soon as the one in flight has only its COMMIT left (0.36-0.39 against
# 0.45 back to back, smaller batches and more CPU a request: the next batch's session
# locks wait for that commit anyway).
MAX_BATCHES = 2
SECOND_BATCH_AFTER_S = 0.05
# Requests one transaction takes at most: a backlog (a stalled database coming back) is
# committed in several transactions, none holding its row locks for long.
BATCH_REQUESTS = 64
# A transaction that lost a race to another node (deadlock, serialization failure, a
# unique key taken meanwhile) is run again from the start, at most this many times.
RETRIES = 5
# SQLSTATEs worth running the whole transaction again for.
RETRYABLE = {"40001", "40P01", "23505"}
# How long the schema check after a failed write may take before the failure answers as is.
SCHEMA_CHECK_S = 2.0
WRITER_POOL_SIZE = MAX_BATCHES + 1  # the writer process's connections: batches and a ping

Request = tuple[str, Sequence[dict[str, Any]], Sequence[bytes], str | None, str | None]


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def unavailable(exc: BaseException) -> StoreUnavailable:
    """A failure of the database (not of a request's content) as a 503's reason."""
    state = sqlstate(exc) or ""
    kind = "disk" if state.startswith("53") else "database"  # 53xxx: insufficient resources
    return StoreUnavailable(kind, f"{type(exc).__name__}: {exc}")


def is_connection_failure(exc: BaseException) -> bool:
    """The connection or the server failed: nothing more is learnt by asking it again now."""
    import asyncpg

    if isinstance(exc, (ValueError, TypeError)):  # asyncpg.DataError: an argument's content
        return False
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError,
                        asyncpg.InternalClientError, asyncpg.PostgresConnectionError)):
        return True  # (InternalClientError: asyncpg's state on a connection the server cut)
    state = sqlstate(exc) or ""
    # 08: connection; 53: resources (disk full, out of memory); 57: operator intervention
    # (shutdown); 58: system errors (I/O); 25006: read-only transaction (a standby).
    return state[:2] in ("08", "53", "57", "58") or state == "25006"


# The SQLSTATE classes a request's content can cause (its own 4xx): 21 cardinality (a
# batch naming one row twice), 22 data exception (a value out of range, untranslatable),
# 23 integrity constraint, 54 program limit exceeded (a value too big to index). Every
# other class says the database, its state or its schema does not fit this code (42: an
# undefined function, column or table, 42804 a composite type with another number of
# fields: a newer onetag migrated it; 0A; 25, 40, 53, 57, 58...): a 503, which browsers
# keep their events for and send again, never a 4xx that has them dropped.
CONTENT_CLASSES = ("21", "22", "23", "54")


def is_database_failure(exc: BaseException) -> bool:
    """The connection, the server or the schema failed, as opposed to a statement's content:
    a 503, never the request's own 4xx."""
    if isinstance(exc, (ValueError, TypeError)):  # asyncpg.DataError: an argument's content
        return False
    if is_connection_failure(exc):
        return True
    state = sqlstate(exc)
    return state is not None and state[:2] not in CONTENT_CLASSES


def may_be_misfit(exc: BaseException) -> bool:
    """Whether a failed write is worth a look at the schema: not a lost connection, not
    onetag's own refusal of a request's content (a 413 or 422 the rules gave). A content
    error from the database may be one (asyncpg refuses an argument for a composite type
    whose fields changed as a DataError)."""
    return not isinstance(exc, Refused) and not is_connection_failure(exc)


def must_drop(exc: BaseException) -> bool:
    """Whether the connection ``exc`` came from is closed rather than pooled again: every
    database failure but a lost race (the session is fine; it runs again at once). A schema
    changed under it leaves it asyncpg's cached statements and type codecs of the old one."""
    return is_database_failure(exc) and sqlstate(exc) not in RETRYABLE


# The health check's write: durable once it returns (synchronous_commit is on). In the same
# statement, the migrations the database has that this code does not know ($2: those it
# does), in two lists: those it does not run with, and those each recorded compatible with
# it (compat.py: a newer release's, in a rolling upgrade). A node left running on the
# previous release after ``onetag migrate`` applied one of the first fails its health check,
# saying so, until it is restarted on the new one; the second it says once, and stays up.
HEALTH_WRITE = ("WITH written AS (INSERT INTO health (id, at_ms) VALUES (1, $1) "
                "ON CONFLICT (id) DO UPDATE SET at_ms = EXCLUDED.at_ms RETURNING 1) "
                "SELECT array_agg(name ORDER BY version) FILTER (WHERE NOT coalesce("
                + compat.tolerated_sql("ANY($2::int[])") + ", false)), "
                "array_agg(name ORDER BY version) FILTER (WHERE "
                + compat.tolerated_sql("ANY($2::int[])") + ") FROM schema_migrations "
                "WHERE version <> ALL($2::int[]) AND EXISTS (SELECT FROM written)")


def drop_if_failed(conn: Any, exc: BaseException) -> None:
    """A connection whose database failed is closed, so the pool opens a new one: a session
    keeps what held when it began (``default_transaction_read_only``, a standby promoted
    since), and a pooled connection would keep failing after the database is writable."""
    if must_drop(exc):
        conn.terminate()


async def _keep_session(conn: Any) -> None:
    """The pool's reset of a released connection: nothing to do. asyncpg's default sends
    ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL`` and ``pg_advisory_unlock_all()``: a round
    trip on every release, for session state this store never creates (no ``SET``, no
    ``LISTEN``, no cursors, advisory locks only transaction-scoped). An open transaction is
    still rolled back by the pool before this is called."""


async def create_pool(dsn: str, size: int, generic_plans: bool = False,
                      part: str = "") -> Any:
    """An asyncpg pool whose every commit is durable before it returns.

    ``generic_plans``, for the ingest's connections: every prepared statement runs the plan
    made at its first run, for any arguments (``plan_cache_mode = force_generic_plan``). By
    default PostgreSQL plans a statement over arrays again at every run (knowing their
    lengths, the custom plan always looks cheaper than the generic one): 0.15 ms of the
    database's CPU a transaction, a third of what a transaction of one request costs it
    (bench/pg_writer.py). A plan made once must suit any size of table: every ingest
    statement probes a unique key per row (LATERAL over the arrays) or inserts, and
    with hash and merge joins off the joins that remain (a batch's sessions updated from
    arrays, held deliveries and their events) are nested loops of index probes whatever the
    tables' size when they were planned (else a plan made on a new database seq-scanned
    ``sessions`` for every batch: measured, PostgreSQL's CPU a request doubled within 10 s)."""
    import asyncpg

    # Durable before answered, whatever the database's default: an acknowledged event
    # must survive a crash of the database server.
    from . import application_name

    settings = {"synchronous_commit": "on", "application_name": application_name(part)}
    if generic_plans:
        settings.update(plan_cache_mode="force_generic_plan", enable_hashjoin="off",
                        enable_mergejoin="off")
    return await asyncpg.create_pool(dsn, min_size=1, max_size=size, server_settings=settings,
                                     reset=_keep_session)


def nul_field(value: Any, path: str) -> str | None:
    """The path of the first string holding a NUL in ``value``, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = (path if isinstance(key, str) and "\x00" in key
                     else nul_field(item, f"{path}.{key}"))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = nul_field(item, f"{path}[{index}]")
            if found:
                return found
    return None


def stored_json(raws: Sequence[Any]) -> list[bytes] | Problem:
    """The events as sent, as the JSON to store; a 422 naming the field that holds a NUL,
    which PostgreSQL text can't hold. ``events.check_bounds`` refuses one in every event the
    endpoints and a backfill read, on both backends: this is the second line, for a caller
    of ``Store.ingest`` that did not normalise its events' raw form with them."""
    stored = [encode(raw) for raw in raws]
    for position, raw in enumerate(stored):
        if b"\\u0000" in raw:  # JSON's escape of NUL: cheap to look for in the bytes
            field = nul_field(raws[position], f"events[{position}]")
            if field is not None:
                return Problem(422, "invalid_event", field, NUL_PROBLEM)
    return stored


class PgWriteOps:
    """One node's ingest: the jobs a writer is sent (``run``), group-committed."""

    def __init__(self, dsn: str, sites: Mapping[str, Any], hold_ms: int,
                 browser_grace_ms: int, pool: Any = None):
        self.dsn = dsn
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self.pool = pool
        self._own_pool = pool is None
        self._pending: list[tuple[Request, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._batches: dict[asyncio.Task[None], float] = {}  # in flight: when each started
        self._recheck: asyncio.TimerHandle | None = None  # _start again when a slot is due
        self.commits = 0  # ingest transactions committed
        self.retries = 0  # ... run again after losing a race to another node
        # Committed batches by way (``pg_ingest``): "one statement" (optimistic), "locked";
        # and the optimistic ones run again locked: "needed locks", "lost a race".
        self.paths: Counter[str] = Counter()
        self.on_commit: Any = None  # called with the requests of each committed batch

    async def open(self) -> None:
        if self.pool is None:
            self.pool = await create_pool(self.dsn, WRITER_POOL_SIZE, generic_plans=True,
                                          part="writer")

    async def close(self, grace_s: float = 10) -> None:
        """Batches already in a transaction are committed and answered (within
        ``grace_s``)."""
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=grace_s)
        if self._own_pool and self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), grace_s)
            except asyncio.TimeoutError:
                pool.terminate()

    # Jobs -------------------------------------------------------------------------------

    def submit(self, jobs: Sequence[tuple[str, tuple[Any, ...]]]) -> asyncio.Future[list[Any]]:
        """One answer per job, as plain data: its result, a ``Problem`` or a ``JobFailure``,
        once every job of the frame is answered. Each job is begun here (a body read, its
        request queued), so the jobs of every frame that arrived in one loop turn share a
        transaction; no task is made for a job or a frame (they cost the writer's loop more
        than a request's reading did)."""
        loop = asyncio.get_running_loop()
        answers: list[Any] = [None] * len(jobs)
        whole = loop.create_future()
        waiting = 0

        def answered(i: int, op: str, args: tuple[Any, ...], finish: Any,
                     future: asyncio.Future[Any]) -> None:
            nonlocal waiting
            exc = future.exception()
            answers[i] = self._failed(op, args, exc) if exc is not None else finish(future.result())
            waiting -= 1
            if waiting == 0:
                whole.set_result(answers)

        for i, (op, args) in enumerate(jobs):
            try:
                future, then = self._begin(op, args)
            except Exception as exc:
                future, then = None, self._failed(op, args, exc)
            if future is None:
                answers[i] = then
                continue
            waiting += 1
            future.add_done_callback(
                lambda done, i=i, op=op, args=args, finish=then: answered(i, op, args, finish,
                                                                          done))
        if waiting == 0:
            whole.set_result(answers)
        return whole

    def _begin(self, op: str, args: tuple[Any, ...]) -> tuple[asyncio.Future[Any] | None, Any]:
        """(None, the job's answer now: a refused body), or (a future of its result, what
        turns that result into the answer)."""
        if op == "ingest_browser":
            data, facts, request_id = args
            facts = BrowserFacts(*facts)  # it crosses the pipe as a plain tuple
            batch = read_browser_body(data, facts, self.sites)
            if isinstance(batch, Problem):
                return None, batch
            stored = stored_json(batch.raws)
            if isinstance(stored, Problem):
                return None, stored
            names = tuple(event["name"] for event in batch.events)
            return (self.ingest((batch.site_id, batch.events, stored, facts.user_agent,
                                 request_id)),
                    lambda rows: rows if isinstance(rows, Problem) else (
                        batch.sc, rows, batch.site_id, names))
        if op == "ingest":
            return self.ingest(args), _same
        if op == "ping":
            return asyncio.ensure_future(self.ping()), _same
        raise ValueError(f"no job {op!r} here")

    @staticmethod
    def _failed(op: str, args: tuple[Any, ...], exc: BaseException) -> Any:
        """A job's error as its answer: a 503's ``JobFailure`` or the request's own 4xx."""
        if isinstance(exc, StoreUnavailable):
            return JobFailure(exc.kind, exc.message)
        if isinstance(exc, Refused):
            return exc.problem
        if is_database_failure(exc):
            failure = unavailable(exc)
            return JobFailure(failure.kind, failure.message)
        # A bug with one request fails that request alone.
        request_id = args[-1] if op in INGEST_OPS else None
        log.error("an ingest request failed alone: %s: %s", type(exc).__name__, exc,
                  extra={"request_id": request_id})
        if op in INGEST_OPS:
            return Problem(422, "invalid_event", "events",
                           f"could not be stored ({type(exc).__name__}: {str(exc)[:200]})")
        return JobFailure("database", f"{type(exc).__name__}: {exc}")

    async def ping(self) -> int:
        """A committed write (migration 028's row); this process's pid. Tried twice, as a
        batch is: a pooled connection the server cut (a restart) fails once, then a new
        one answers for the database as it is now. A newer release's migrations each
        compatible with this code are said once a process (a warning), not refused."""
        try:
            newer, tolerated = await self._health_write()
        except Exception as exc:
            if not is_connection_failure(exc):
                raise unavailable(exc) from None
            try:
                newer, tolerated = await self._health_write()
            except Exception as again:
                raise unavailable(again) from None
        if newer:
            raise StoreUnavailable("database", pg_migrate.newer_schema(newer))
        compat.say_newer(log, tolerated or ())
        return os.getpid()

    async def _health_write(self) -> tuple[list[str] | None, list[str] | None]:
        """The committed write; the migrations this code does not know that it does not
        run with, and those it runs with (None: none)."""
        async with self.pool.acquire() as conn:
            try:
                row = await conn.fetchrow(HEALTH_WRITE, int(time.time() * 1000),
                                          pg_migrate.known_versions())
                return row[0], row[1]
            except Exception as exc:
                drop_if_failed(conn, exc)
                raise

    async def schema_misfit(self) -> StoreUnavailable | None:
        """After a write failed (not for a lost connection): a 503 saying why if the schema
        is not the one this code knows (a newer onetag migrated it, or it lacks a
        migration), whatever form the failure took (asyncpg refusing an argument for a
        composite type whose fields changed raises no SQLSTATE at all); else None, and the
        failure answers for itself."""
        try:
            async with self.pool.acquire() as conn:
                await asyncio.wait_for(pg_migrate.check(conn), SCHEMA_CHECK_S)
        except pg_migrate.SchemaNotCurrent as exc:
            # Its connections hold asyncpg's codecs of the types as they were: new ones
            # read them again (once the schema fits, the write is made).
            await self.pool.expire_connections()
            return StoreUnavailable("database", str(exc))
        except Exception:
            return None  # the database failing now: the write's own failure says enough
        return None

    # Group commit -----------------------------------------------------------------------

    def ingest(self, request: Request) -> asyncio.Future[Any]:
        """``(site_id, events, stored JSON, user agent, request id)``, committed with the
        requests of this loop turn: (event_id, seq, duplicate) tuples, a ``Problem``, or
        ``StoreUnavailable``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((request, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start, context=contextvars.Context())
        return future

    def _start(self) -> None:
        """At the end of a loop turn: the requests waiting go in one transaction, if a
        batch slot is free (else the next batch to finish starts them)."""
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and len(self._batches) < MAX_BATCHES:
            if self._batches and not self._second_due(loop):
                break
            batch = self._pending[:BATCH_REQUESTS]
            self._pending = self._pending[BATCH_REQUESTS:]
            task = loop.create_task(self._commit(batch), name="onetag-pg-ingest")
            self._batches[task] = loop.time()
            task.add_done_callback(self._batch_done)

    def _second_due(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether another transaction may start beside those in flight: a backlog waits,
        or the oldest in flight has run ``SECOND_BATCH_AFTER_S`` (else a timer asks again
        then, in case no request arrives meanwhile)."""
        if len(self._pending) >= BATCH_REQUESTS:
            return True
        due = min(self._batches.values()) + SECOND_BATCH_AFTER_S
        if loop.time() >= due:
            return True
        if self._recheck is None:
            self._recheck = loop.call_at(due, self._start_again)
        return False

    def _start_again(self) -> None:
        self._recheck = None
        self._start()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        if self._pending:
            self._start()

    async def _commit(self, batch: list[tuple[Request, asyncio.Future[Any]]]) -> None:
        requests = [request for request, _ in batch]
        # Every attempt starts from the events as sent (rules.keep_pristine says why).
        restores = [rules.keep_pristine([request]) for request in requests]
        try:
            try:
                results: list[Any] = await self._transaction(requests, restores)
            except Exception as exc:
                misfit = await self.schema_misfit() if may_be_misfit(exc) else None
                if misfit is not None:
                    raise misfit from exc
                if is_database_failure(exc) or len(requests) == 1:
                    raise
                # One request's content failed the batch: each alone, so it fails alone.
                results = []
                for request, restore in zip(requests, restores):
                    try:
                        results.append((await self._transaction([request], [restore]))[0])
                    except Exception as alone:
                        if is_database_failure(alone):
                            raise
                        results.append(alone)
        except Exception as exc:
            if isinstance(exc, StoreUnavailable):
                results = [exc] * len(batch)
            elif is_database_failure(exc):
                results = [unavailable(exc)] * len(batch)
            else:
                results = [exc] * len(batch)
        for (request, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Refused):
                future.set_result(result.problem)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _transaction(self, requests: list[Request], restores: list[Any]) -> list[Any]:
        """``requests`` applied and committed in one transaction, run again (from a clean
        start: ``restores`` put their events back as sent) when it lost a race to another
        node."""
        from .pg_ingest import NeedsLocks, PgIngestBatch, optimistic

        attempt = 0
        one_statement = optimistic(requests)
        while True:
            for restore in restores:
                restore()
            try:
                async with self.pool.acquire() as conn:
                    batch = PgIngestBatch(conn, self.sites, self.hold_ms, self.browser_grace_ms)
                    try:
                        if one_statement:
                            results = await batch.run_optimistic(requests)
                        else:
                            async with conn.transaction():
                                results = await batch.run(requests)
                    except Exception as exc:
                        drop_if_failed(conn, exc)
                        raise
                self.commits += 1
                self.paths["one statement" if one_statement else "locked"] += 1
                if self.on_commit is not None:
                    self.on_commit(len(requests))
                return results
            except NeedsLocks:
                self.paths["needed locks"] += 1
                one_statement = False
                continue
            except Exception as exc:
                if one_statement and sqlstate(exc) in RETRYABLE:
                    # A session changed, or an event id or session was taken, since the
                    # read: run it locked, at once (it waits for the other's locks anyway).
                    self.paths["lost a race"] += 1
                    one_statement = False
                    continue
                attempt += 1
                # A connection the server cut (a restart, a failover, an idle timeout) is
                # dropped by the pool: the next attempt gets a new one. Run once more on it;
                # if the cut came after the commit, the event ids answer "duplicate".
                lost = is_connection_failure(exc) and attempt == 1
                if not lost and (sqlstate(exc) not in RETRYABLE or attempt > RETRIES):
                    raise
                self.retries += 1
                await asyncio.sleep(0.005 * attempt)


def _same(result: Any) -> Any:
    return result


class InlineWriter:
    """``PgWriteOps`` in the server's own process, on its pool: for tools and tests, as
    SQLite's ``ThreadWriter``. ``onetag serve`` uses ``PgProcessWriter``."""

    depth = 64
    frame_jobs = BATCH_REQUESTS
    pid = None

    def __init__(self, ops: PgWriteOps):
        self.ops = ops
        self.on_exit: Any = None  # never called: it does not die on its own
        self.on_commit: Any = None
        ops.on_commit = lambda jobs: self.on_commit is not None and self.on_commit(jobs)

    @property
    def transactions(self) -> int:
        return self.ops.commits

    async def start(self) -> None:
        await self.ops.open()

    def submit(self, jobs: list[tuple[str, tuple[Any, ...]]]) -> asyncio.Future[list[Any]]:
        return self.ops.submit(jobs)

    async def stop(self, grace_s: float = 10) -> None:
        await self.ops.close(grace_s)


class PgProcessWriter(WriterProcess):
    """The node's ingest in a process of its own (``python -m server.store.pg_writer``)."""

    def __init__(self, dsn: str, sites: Mapping[str, Any], hold_ms: int, browser_grace_ms: int,
                 timeout_s: float = 10.0):
        super().__init__("server.store.pg_writer", (dsn, dict(sites), hold_ms, browser_grace_ms),
                         timeout_s)


# The writer process ----------------------------------------------------------------------

class _Child:
    """The process's loop: frames read as they arrive, each answered once its jobs are;
    the replies of one loop turn written together."""

    def __init__(self, stdout: Any, reader: Any):
        self.stdout = stdout
        self.reader = reader
        self.ops: PgWriteOps | None = None
        self.setup: asyncio.Future[tuple[int, Any]] | None = None
        self.done: asyncio.Future[None] | None = None
        self.frames: set[asyncio.Future[list[Any]]] = set()  # frames not answered yet
        self.out: list[bytes] = []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.setup, self.done = loop.create_future(), loop.create_future()
        loop.add_reader(self.reader.fd, self._readable)
        try:
            setup_id, setup = await self.setup
            try:
                dsn, sites, hold_ms, grace_ms = setup
                self.ops = PgWriteOps(dsn, sites, hold_ms, grace_ms)
                await self.ops.open()
                await self.ops.ping()  # a database that can't be written is found now
            except Exception as exc:
                failure = JobFailure(unavailable(exc).kind, f"{type(exc).__name__}: {exc}")
                self._write(encode_frame(setup_id, (0, failure)))
                return
            # What is here now (modules, the pool, asyncpg's codecs) lives as long as the
            # process: out of the collector's full passes, as in SQLite's writer.
            gc.freeze()
            self._write(encode_frame(setup_id, (0, "ready")))
            await self.done  # end of file: the server is gone or closing
            if self.frames:  # what was sent before the end is committed and answered
                await asyncio.wait(list(self.frames))
            if self.out:
                self._flush()
            await self.ops.close()
        finally:
            loop.remove_reader(self.reader.fd)

    def _readable(self) -> None:
        try:
            frames = self.reader.read_ready()
        except OSError:
            frames, self.reader.eof = [], True
        for frame_id, jobs in frames:
            if self.setup is not None and not self.setup.done():
                self.setup.set_result((frame_id, jobs))
            elif self.ops is None:
                continue  # frames sent before the set-up's answer: none are
            elif jobs is UNREADABLE or not isinstance(jobs, list):
                self._reply(frame_id, JobFailure("writer", "unreadable frame"))
            else:
                answers = self.ops.submit(jobs)
                self.frames.add(answers)
                answers.add_done_callback(lambda done, frame_id=frame_id: self._answer(frame_id, done))
        if self.reader.eof:
            asyncio.get_running_loop().remove_reader(self.reader.fd)
            if self.setup is not None and not self.setup.done():
                self.setup.cancel()
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def _answer(self, frame_id: int, answers: asyncio.Future[list[Any]]) -> None:
        assert self.ops is not None
        self.frames.discard(answers)
        self.out.append(reply_frame(frame_id, self.ops.commits, answers.result()))
        if len(self.out) == 1:  # the first reply of this turn: written at its end
            asyncio.get_running_loop().call_soon(self._flush)

    def _reply(self, frame_id: int, answer: Any) -> None:
        self._write(encode_frame(frame_id, (self.ops.commits if self.ops else 0, answer)))

    def _flush(self) -> None:
        out, self.out = self.out, []
        if out:
            self._write(b"".join(out))

    def _write(self, data: bytes) -> None:
        try:
            self.stdout.write(data)
            self.stdout.flush()
        except BrokenPipeError:  # the server is gone: nobody waits for an answer
            if self.done is not None and not self.done.done():
                self.done.set_result(None)


def main() -> None:
    """The writer process: set up from the first frame, then answer frames until the end
    of its stdin."""
    stdout, reader = child_pipes()
    try:
        asyncio.run(_Child(stdout, reader).serve())
    except asyncio.CancelledError:
        pass  # end of file before the set-up


if __name__ == "__main__":
    main()
