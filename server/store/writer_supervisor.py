"""The server's side of a store's writer: group commit by loop turn, backpressure, supervision.

Shared by SQLite (``sqlite.py``: its writer thread or process) and PostgreSQL
(``postgres.py``: its writer process, or the same ops in-process). A write adds its job to
``_pending`` and, the first in this turn of the event loop, schedules ``_send`` for the end
of the turn: the jobs of one turn go to the writer in frames of up to ``frame_jobs``; up to
``depth`` frames are in flight, and jobs arriving meanwhile wait for the next answer. Each
job is answered with plain data (``writer_process``): its result, a ``Problem`` (its 4xx)
or a ``JobFailure`` (503).

A writer process that exits, is killed or hangs (``WriterProcess`` kills one that leaves a
frame unanswered for ``writer_timeout_s``) fails the frames it held: their requests get 503
and their clients retry. A new writer is started at once, then after a backoff that doubles
while starts keep failing; the log says so once per change, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Sequence

from ..envelope import BrowserFacts, Problem
from ..jsontext import encode
from .base import BrowserIngested, IngestResult, JobFailure, SessionInfo, StoreUnavailable
from .writer_process import INGEST_OPS, WriterGone

log = logging.getLogger("onetag.store")

# Writes queued or in flight before new ones are refused with 503 (the browser runtime
# retries them): without a bound, 300 requests of 0.9 MB during a stall held 592 MB.
DEFAULT_MAX_PENDING_WRITES = 2000
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
DEFAULT_WRITER_TIMEOUT_S = 10.0
# Side writes: counts that may be lost (a wrong guess of a secret, ``auth.SharedThrottle``),
# never an acknowledged event. They take none of ``max_pending_writes`` (a flood of them
# made right-key posts 503), are at most ``SIDE_MAX_PENDING`` at once, and are refused
# (``StoreUnavailable``: the caller counts in memory instead) while the queue is half full.
SIDE_OPS = frozenset({"guess_failed", "guesses_cleared"})
SIDE_MAX_PENDING = 16
# A writer that keeps dying is restarted after 0.1 s, then 0.2, 0.4 ... up to 30 s.
RESTART_FIRST_S = 0.1
RESTART_MAX_S = 30.0
FAULT_LOG_EVERY_S = 60.0  # a storage fault is logged at most once a minute


class StoreClosed(StoreUnavailable):
    """A write asked of a store that is closing: it was not made."""

    def __init__(self, message: str):
        super().__init__("writer", message)


# The writes ``max_pending_writes`` does not bound: the forwarder's own (a claim per lane,
# one finish, one expiry, one prune, one product-sync pass at a time: bounded by the
# forwarder) and /healthz's ping. Counted, they took the whole of a small bound
# (``max_pending_writes = 1`` refused every request beside them, and warned of the
# forwarder's own writes); the bound is for the requests' writes, which no one else limits.
UNBOUNDED_OPS = frozenset({"ping", "claim", "finish", "expire_held", "prune_attempts",
                           "label_attempts", "prune_coupon_calls", "plan_product_sync",
                           "prune_deliveries", "prune_events", "prune_sessions"})


class WriterSupervisor:
    """Mixin for a store whose writes go to a writer (``_new_writer``, not started).

    A writer has ``start()``, ``stop(grace_s)``, ``submit(jobs) -> future of answers``,
    ``depth``, ``frame_jobs``, ``pid``, ``transactions`` and the callbacks ``on_exit`` (its
    process is gone) and ``on_commit`` (jobs of a committed transaction).
    """

    max_pending_writes: int
    max_pending_bytes: int

    def _init_supervisor(self) -> None:
        self._writer: Any = None
        # Jobs not yet sent: (op, args, future, size). Sent once per turn of the event loop.
        self._pending: list[tuple[str, tuple[Any, ...], asyncio.Future[Any], int]] = []
        self._send_scheduled = False
        self._in_flight = 0  # frames sent, not yet answered
        # Jobs pending or in flight, but ``UNBOUNDED_OPS`` (the backpressure bound) ...
        self._queued = 0
        self._queued_bytes = 0  # ... and the bytes of their bodies
        self._queued_side = 0  # side writes (``SIDE_OPS``) pending or in flight, apart
        self._closing = False
        self._restarting: asyncio.Task[None] | None = None
        self.writer_problem: JobFailure | None = None  # why there is no writer now
        self.fault: JobFailure | None = None  # the storage's last failure, until a commit works
        self._fault_logged: dict[str, float] = {}
        self.restarts = 0
        self.commits = 0  # transactions the writer committed (the benchmark reports requests per commit)
        self.on_commit: Any = None  # called with the jobs of each committed transaction (metrics)

    def _new_writer(self) -> Any:
        raise NotImplementedError

    def _failure(self, exc: BaseException) -> JobFailure:
        """What an in-process writer's exception (its whole commit failed) answers."""
        return JobFailure("database", f"{type(exc).__name__}: {exc}")

    # Life cycle -------------------------------------------------------------------------

    async def _start_writer(self) -> Any:
        writer = self._new_writer()
        await writer.start()
        writer.on_exit = self._writer_exited
        writer.on_commit = self._committed
        return writer

    def _committed(self, jobs: int) -> None:
        if self.on_commit is not None:
            self.on_commit(jobs)

    async def _stop_writer(self, grace_s: float) -> None:
        """Frames already sent are committed and answered (within ``grace_s``); jobs not
        sent yet fail."""
        self._closing = True
        if self._restarting is not None:
            self._restarting.cancel()
            self._restarting = None
        self._fail_pending(StoreClosed("the store closed before this write was made"))
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.stop(grace_s)

    async def ping(self, timeout_s: float = 2.0) -> int | None:
        """A round trip through the writer with a committed write (``GET /healthz``): the
        writer process's pid (None for a writer in this process), or ``StoreUnavailable``
        naming what is wrong."""
        writer = self._writer
        try:
            pid = await asyncio.wait_for(self._write("ping"), timeout_s)
        except asyncio.TimeoutError:
            raise StoreUnavailable("writer", f"the writer did not answer within {timeout_s:g} s") from None
        if self.fault is not None:
            raise StoreUnavailable(self.fault.kind, self.fault.message)
        return pid if writer is not None and writer.pid is not None else None

    # Supervision ------------------------------------------------------------------------

    def _writer_exited(self, writer: Any) -> None:
        if writer is not self._writer or self._closing:
            return
        self._writer = None
        reason = getattr(writer, "exit_reason", None) or "the writer exited"
        self.writer_problem = JobFailure("writer", reason)
        log.error("%s; starting a new writer", reason)
        self._fail_pending(StoreUnavailable("writer", reason))
        self._restarting = asyncio.get_running_loop().create_task(
            self._restart(), name="onetag-writer-restart")

    async def _restart(self) -> None:
        delay, said = RESTART_FIRST_S, None
        while not self._closing:
            try:
                self._writer = await self._start_writer()
            except Exception as exc:
                failure = getattr(exc, "failure", None) or JobFailure("writer", str(exc))
                self.writer_problem = failure
                if failure.message != said:
                    log.error("the writer does not start (%s: %s); retrying, at most every "
                              "%g s", failure.kind, failure.message, RESTART_MAX_S)
                    said = failure.message
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_S)
                continue
            self.restarts += 1
            self.writer_problem = None
            log.warning("a new writer is running (pid %s)", self._writer.pid)
            self._restarting = None
            if self._pending:
                self._send()
            return

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, []
        for op, _, future, size in pending:
            self._unqueue(op, size)
            if not future.done():
                future.set_exception(exc)

    def _unqueue(self, op: str, size: int) -> None:
        if op in SIDE_OPS:
            self._queued_side -= 1
        elif op not in UNBOUNDED_OPS:
            self._queued -= 1
            self._queued_bytes -= size

    def _storage_fault(self, failure: JobFailure) -> None:
        """Remember it for /healthz, and log it at most once a minute per kind."""
        self.fault = failure
        now = time.monotonic()
        if now - self._fault_logged.get(failure.kind, -FAULT_LOG_EVERY_S) >= FAULT_LOG_EVERY_S:
            self._fault_logged[failure.kind] = now
            log.error("the store can't write (%s): %s; answering 503 until it can",
                      failure.kind, failure.message)

    # Ingest -----------------------------------------------------------------------------

    async def ingest(self, site_id: str, events: Sequence[dict[str, Any]],
                     raws: Sequence[Any], session: SessionInfo,
                     request_id: str | None = None) -> list[IngestResult] | Problem:
        # What crosses to a writer process is kept to plain values: the events as sent go
        # as their stored JSON (bytes, not dicts of Decimals), the visitor as its user
        # agent, and the answer comes back as (event_id, seq, duplicate) tuples.
        stored = self._stored_json(raws)
        if isinstance(stored, Problem):  # a value this backend can't store
            return stored
        rows = await self._write("ingest", site_id, list(events), stored, session.user_agent,
                                 request_id, size=sum(map(len, stored)))
        if isinstance(rows, Problem):  # refused by a rule of the store (a cart too large)
            return rows
        return [IngestResult(*row) for row in rows]

    async def ingest_browser(self, data: bytes, facts: BrowserFacts,
                             request_id: str | None = None) -> BrowserIngested | Problem:
        # The writer reads the body (envelope.read_browser_body) on its own core: only the
        # bytes cross, and the sc and (event_id, seq, duplicate) tuples come back.
        # ``facts`` cross as a plain tuple, made ``BrowserFacts`` again by the writer: a
        # NamedTuple pickles through Python-level hooks, 5.8 µs for a frame of 7 jobs against
        # 1.1 µs as tuples, on the event loop.
        answer = await self._write("ingest_browser", data, tuple(facts), request_id,
                                   size=len(data))
        if isinstance(answer, Problem):
            return answer
        sc, rows, site_id, names = answer
        return BrowserIngested(sc, [IngestResult(*row) for row in rows], site_id, names)

    def _stored_json(self, raws: Sequence[Any]) -> list[bytes] | Problem:
        """The events as sent, as the JSON to store."""
        return [encode(raw) for raw in raws]

    # Group commit -----------------------------------------------------------------------

    async def _write(self, op: str, *args: Any, size: int = 0) -> Any:
        if self._closing:
            raise StoreClosed("the store is closing")
        if self._writer is None:
            problem = self.writer_problem or JobFailure("writer", "the store is not open")
            raise StoreUnavailable(problem.kind, problem.message)
        if op in SIDE_OPS:
            if (self._queued_side >= SIDE_MAX_PENDING
                    or self._queued * 2 >= self.max_pending_writes):
                raise StoreUnavailable("queue", "the store is busy: this count is kept in "
                                       "memory instead")
            self._queued_side += 1
        elif op not in UNBOUNDED_OPS:
            if (self._queued >= self.max_pending_writes
                    or (size and self._queued_bytes + size > self.max_pending_bytes)):
                raise StoreUnavailable("queue", f"{self._queued} writes ({self._queued_bytes} "
                                       "bytes) are waiting for the store; try again shortly")
            self._queued += 1
            self._queued_bytes += size
        future = asyncio.get_running_loop().create_future()
        self._pending.append((op, args, future, size))
        if not self._send_scheduled:
            self._send_scheduled = True
            # Not in this request's context: the frame (and its log lines) serves many.
            future.get_loop().call_soon(self._send, context=contextvars.Context())
        return await future

    def _send(self) -> None:
        self._send_scheduled = False
        writer = self._writer
        while self._pending and writer is not None and self._in_flight < writer.depth:
            size = writer.frame_jobs
            batch, self._pending = self._pending[:size], self._pending[size:]
            self._submit(writer, batch)

    def _submit(self, writer: Any, batch: list[Any]) -> None:
        try:
            answer = writer.submit([(op, args) for op, args, _, _ in batch])
        except WriterGone as exc:  # the writer is gone: nothing of this frame was made
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(exc)
        except Exception as exc:  # the frame can't be sent: each job alone, to find which
            if len(batch) > 1:
                for job in batch:
                    self._submit(writer, [job])
                return
            answer = asyncio.get_running_loop().create_future()
            answer.set_result([Problem(422, "invalid_event", "events",
                                       f"could not be passed to the store ({type(exc).__name__})")])
        self._in_flight += 1
        answer.add_done_callback(
            lambda done, batch=batch, writer=writer: self._answered(batch, done, writer))

    def _answered(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any], int]],
                  answer: asyncio.Future[Any], writer: Any) -> None:
        self._in_flight -= 1
        self.commits = writer.transactions
        if answer.cancelled():
            results: list[Any] = [JobFailure("writer", "the writer stopped")] * len(batch)
        elif answer.exception() is not None:
            exc = answer.exception()
            if isinstance(exc, WriterGone):
                results = [JobFailure("writer", str(exc))] * len(batch)
            else:  # an in-process writer: the commit itself raised
                log.error("group commit of %d jobs failed: %s", len(batch), exc)
                results = [self._failure(exc)] * len(batch)
        else:
            results = answer.result()
            if not isinstance(results, list) or len(results) != len(batch):
                results = [results if isinstance(results, JobFailure) else JobFailure(
                    "writer", "the writer answered out of shape")] * len(batch)
        committed = False
        for (op, _, future, size), result in zip(batch, results):
            self._unqueue(op, size)
            if isinstance(result, JobFailure):
                if result.kind in ("disk", "database"):
                    self._storage_fault(result)
                result = StoreUnavailable(result.kind, result.message)
            elif op in INGEST_OPS or op == "ping":  # a ping's answer is a committed write
                committed = True
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if committed and self.fault is not None:
            log.warning("the store writes again (after: %s)", self.fault.message)
            self.fault = None
        if self._pending:
            self._send()
