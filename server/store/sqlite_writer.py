"""The writing side of the SQLite store: everything that changes the database.

One connection, one transaction per group commit. It runs either in a thread of the server
(``ThreadWriter``, via aiosqlite) or in a process of its own (``ProcessWriter``). The
process is the default for ``onetag serve``: the writer's Python (JSON, planning, binding
statements) and the event loop's share one GIL inside one process, and each SQLite step
hands the GIL back and forth between them — measured by ``bench/ingest.py``, that cost the
endpoint most of its throughput. In a process of its own the writer works on the second
core, and the server only sends it each batch and waits for the commit.

The protocol with a writer process is pickled frames on its stdin/stdout: first
``(path, sites, hold_ms, browser_grace_ms)``, answered ``"ready"`` (or an error); then a
list of jobs ``(op, args)`` per batch, answered with the writer's count of transactions
committed so far and the jobs' results in order.
"""

from __future__ import annotations

import asyncio
import collections
import os
import pickle
import select
import signal
import sqlite3
import struct
import sys
import time
from importlib import resources
from typing import Any, BinaryIO, Mapping, Sequence

from .. import outbox
from ..envelope import Problem, read_browser_body
from ..jsontext import encode, loads
from .base import Delivery, Outcome
from .sqlite_ingest import IngestBatch, SessionCache, identity_fields, insert_deliveries

_FRAME = struct.Struct("!I")
# Jobs a transaction of the writer process takes from the batches waiting (it stops at the
# first batch that reaches it). With no limit, 32 closed-loop clients fell into lockstep:
# the writer committed all 32 requests while the event loop waited, then the loop answered
# and read all 32 while the writer waited (bench/ingest.py: 377 of 674 commits held all
# 32). With 16, the loop answers one half while the writer commits the other, and the two
# processes work at once: +7% events/s at 32 connections, +11% at 64 (alternating solo
# runs). Smaller transactions cost more a request (each commit has its fsync and rewrites
# the pages it touches), and 8, 12 and 24 measured about the same as 16.
TRANSACTION_JOBS = 16
INGEST_OPS = ("ingest", "ingest_browser")
# WAL pages before a commit checkpoints (SQLite's default: 1,000). The checkpoint runs
# inside the commit that crosses it, so every request of that batch waits on it; fewer,
# larger ones copy each hot page once instead of many times (bench/ingest.py: ~+10-20%
# events/s, p99 ~18 -> ~36 ms, a WAL file of up to ~32 MiB). Commits stay synced.
WAL_AUTOCHECKPOINT = 8000


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


def configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    """The writer's connection: WAL, ``synchronous=FULL`` (a commit survives power loss),
    checkpoints every ``WAL_AUTOCHECKPOINT`` pages, temporary journals in memory, migrated."""
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
    # Savepoints (claims, outcomes, and requests applied alone after a batch failed)
    # journal every page they change, by default to a temporary file: about as many bytes
    # written again as the WAL itself. In memory it is a copy, not a write.
    conn.execute("PRAGMA temp_store=MEMORY")
    migrate(conn)
    return conn


def _savepoint(conn: sqlite3.Connection, fn: Any, *args: Any) -> Any:
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


def _filters(prefix: str, vendor: str | None, since: int | None, where: list[str],
             params: list[Any]) -> tuple[list[str], list[Any]]:
    """``where``/``params`` plus the operator's ``--vendor`` and ``--since`` conditions."""
    if vendor:
        where.append(f"{prefix}vendor = ?")
        params.append(vendor)
    if since is not None:
        where.append(f"{prefix}created_ms >= ?")
        params.append(since)
    return where, params


class WriteOps:
    """The operations a job may name; ``run_batch`` applies a group commit's jobs."""

    def __init__(self, conn: sqlite3.Connection, sites: Mapping[str, Any], hold_ms: int,
                 browser_grace_ms: int):
        self.conn = conn
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self.cache = SessionCache()
        self.transactions = 0  # committed

    def run_batch(self, jobs: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """One transaction for every job waiting.

        Browser bodies are read first (``envelope.read_browser_body``): a refused one is
        answered with its ``Problem`` and takes no further part. The ingest requests are
        then applied together (``IngestBatch``), first and without a savepoint (it would
        journal every page they change); if that fails, the transaction is rolled back and
        each is applied again on its own in a savepoint, so a bad request fails alone.
        Other jobs (claims, outcomes) run in a savepoint each. Whatever rolls back also
        empties the session cache, whose rows it had changed.
        """
        conn = self.conn
        results: list[Any] = [None] * len(jobs)
        requests, request_jobs = self._requests(jobs, results)
        conn.execute("BEGIN IMMEDIATE")
        try:
            self.cache.check(conn)
            if requests:
                try:
                    together = self.ingest(requests)
                except Exception:  # nothing else ran yet: start the transaction over
                    self.cache.clear()
                    if conn.in_transaction:  # some errors end it already
                        conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    together = [self._ingest_alone(request) for request in requests]
                for (i, sc), result in zip(request_jobs, together):
                    # A browser body's answer carries the visitor's sc, for the cookie.
                    results[i] = result if sc is None or isinstance(result, Exception) else (
                        sc, result)
            for i, (op, args) in enumerate(jobs):
                if op not in INGEST_OPS:
                    results[i] = _savepoint(conn, getattr(self, op), *args)
            conn.execute("COMMIT")
            self.transactions += 1
        except BaseException:
            self.cache.clear()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    def _requests(self, jobs: Sequence[tuple[str, tuple[Any, ...]]],
                  results: list[Any]) -> tuple[list[Any], list[tuple[int, str | None]]]:
        """The ingest requests among ``jobs`` (browser bodies read into requests), and for
        each, its job's index and the sc a browser body was given (None: an ``ingest``).
        A body refused, or failing to be read, has its answer put in ``results``."""
        requests, request_jobs = [], []
        for i, (op, args) in enumerate(jobs):
            if op == "ingest":
                requests.append(args)
                request_jobs.append((i, None))
            elif op == "ingest_browser":
                data, facts = args
                try:
                    batch = read_browser_body(data, facts, self.sites)
                except Exception as exc:  # a bug reading one body fails that request alone
                    results[i] = exc
                    continue
                if isinstance(batch, Problem):
                    results[i] = batch
                    continue
                requests.append((batch.site_id, batch.events, [encode(raw) for raw in batch.raws],
                                 facts.user_agent))
                request_jobs.append((i, batch.sc))
        return requests, request_jobs

    def ingest(self, requests: list[Any]) -> list[Any]:
        return IngestBatch(self.conn, self.sites, now_ms(), self.hold_ms,
                           self.browser_grace_ms, self.cache).run(requests)

    def _ingest_alone(self, request: Any) -> Any:
        """One request in a savepoint: its results, or its error (and the cache emptied)."""
        result = _savepoint(self.conn, self.ingest, [request])
        if isinstance(result, Exception):
            self.cache.clear()
            return result
        return result[0]

    def claim(self, now: int, lease_ms: int, limit: int,
               vendors: tuple[str, ...] | None) -> list[Delivery]:
        vendor_filter = ""
        params: list[Any] = [now]
        if vendors is not None:
            if not vendors:
                return []
            vendor_filter = f"AND d.vendor IN ({','.join('?' * len(vendors))})"
            params.extend(vendors)
        params.append(limit)
        rows = self.conn.execute(
            "SELECT d.id, d.site_id, d.vendor, d.dedup_key, d.visitor, d.request, d.attempts, "
            "d.created_ms, coalesce(d.retry_from_ms, d.created_ms) FROM deliveries d "
            f"WHERE d.state = 'pending' AND d.next_attempt_ms <= ? {vendor_filter} "
            "AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.site_id = d.site_id "
            "AND p.vendor = d.vendor AND p.visitor = d.visitor AND p.state = 'pending' "
            # Due longest ago first: with one vendor this walks deliveries_due in order and
            # stops at LIMIT (ORDER BY d.id would check and sort every due row per claim).
            "AND p.id < d.id) ORDER BY d.next_attempt_ms, d.id LIMIT ?", params).fetchall()
        self.conn.executemany(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_ms = ?, updated_ms = ? "
            "WHERE id = ?", [(now + lease_ms, now, row[0]) for row in rows])
        return [Delivery(id=row[0], site_id=row[1], vendor=row[2], dedup_key=row[3],
                         visitor=row[4], request=loads(row[5]), attempts=row[6] + 1,
                         created_ms=row[7], retry_from_ms=row[8]) for row in rows]

    def finish(self, outcomes: list[Outcome], now: int) -> None:
        self.conn.executemany(
            "UPDATE deliveries SET state = ?, next_attempt_ms = ?, last_error = ?, "
            "updated_ms = ?, delivered_ms = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_ms END "
            "WHERE id = ? AND state = 'pending'",  # a late outcome never undoes a final one
            [(o.state, o.next_attempt_ms, o.error, now, o.state, now, o.id) for o in outcomes])

    def expire_held(self, before: int, now: int) -> int:
        return self.conn.execute("UPDATE deliveries SET state = 'expired', updated_ms = ? "
                            "WHERE state = 'held' AND created_ms < ?", (now, before)).rowcount

    def replay(self, now: int, vendor: str | None,
                since: int | None, states: tuple[str, ...]) -> int:
        count = 0
        plain = tuple(state for state in states if state != "expired")
        if plain:
            where, params = _filters("", vendor, since,
                                     [f"state IN ({','.join('?' * len(plain))})"], list(plain))
            params = [now, now, now, *params]
            count += self.conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_ms = ?, "
                f"retry_from_ms = ?, updated_ms = ?, last_error = NULL WHERE {' AND '.join(where)}",
                params).rowcount
        if "expired" in states:
            count += self._replay_expired(now, vendor, since)
        return count

    def _replay_expired(self, now: int, vendor: str | None,
                        since: int | None) -> int:
        """Expired rows never had an email; re-plan those whose visitor has one now."""
        where, params = _filters("d.", vendor, since, ["d.state = 'expired'"], [])
        rows = self.conn.execute(
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
                row = self.conn.execute("SELECT * FROM identities WHERE id = ?", (identity_id,)).fetchone()
                identity = {**identity_fields(row), "id": identity_id, "is_new": False}
            if site is None or not identity or not identity.get("email"):
                continue
            event = loads(data)
            event["identity"] = identity
            planned = [r for r in outbox.plan(site, event, vendors) if r.state == outbox.PENDING]
            replanned = sorted({r.vendor for r in planned})
            if not replanned:
                continue
            self.conn.execute(f"DELETE FROM deliveries WHERE event_seq = ? AND state = 'expired' "
                         f"AND vendor IN ({','.join('?' * len(replanned))})", (seq, *replanned))
            before = self.conn.total_changes
            insert_deliveries(self.conn, [(site_id, seq, row) for row in planned], now)
            inserted += self.conn.total_changes - before
        return inserted


class ThreadWriter:
    """The writer in a thread of this process: aiosqlite's connection thread.

    For tools and tests that open the store briefly; ``onetag serve`` uses a process.
    """

    depth = 1  # one batch at a time: the next one grows while this one commits
    frame_jobs = 256  # jobs a batch

    def __init__(self, path: str, sites: Mapping[str, Any], hold_ms: int, browser_grace_ms: int):
        self.args = (path, sites, hold_ms, browser_grace_ms)
        self._conn: Any = None
        self._ops: WriteOps | None = None

    async def start(self) -> None:
        import aiosqlite

        path, sites, hold_ms, grace_ms = self.args
        self._conn = await aiosqlite.connect(path, isolation_level=None)
        await self._conn._execute(self._setup, sites, hold_ms, grace_ms)

    def _setup(self, sites: Mapping[str, Any], hold_ms: int, grace_ms: int) -> None:
        self._ops = WriteOps(configure(self._conn._conn), sites, hold_ms, grace_ms)

    @property
    def transactions(self) -> int:
        """Transactions committed so far."""
        return self._ops.transactions if self._ops is not None else 0

    def submit(self, jobs: list[tuple[str, tuple[Any, ...]]]) -> asyncio.Future[list[Any]]:
        """One group commit: its results, in order, once committed."""
        # One hop into the connection's thread per group commit, not one per statement.
        return asyncio.ensure_future(self._conn._execute(self._ops.run_batch, jobs))  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class WriterFailed(RuntimeError):
    """A job raised in the writer process (its type and message, as text)."""


class ProcessWriter:
    """The writer in a process of its own (``python -m server.store.sqlite_writer``).

    Batches are pipelined: the server sends each batch (a frame of up to ``frame_jobs``
    jobs) as soon as it has one, up to ``depth`` in flight, and the writer applies the
    batches waiting in its pipe together, up to ``TRANSACTION_JOBS`` jobs a transaction —
    so the commit never waits on a round trip, and a slow commit makes the next one bigger,
    not later. Replies come back in order, one per batch. The pipes are asyncio's own, so
    no helper thread has to win the GIL from the event loop to pass a batch or an answer
    along.

    If this server dies (even by kill -9), the writer reads end-of-file and exits; a job is
    answered only after its commit, so nothing acknowledged depends on it living on.
    """

    depth = 64
    frame_jobs = 8  # small frames, so that a transaction can stop at TRANSACTION_JOBS

    def __init__(self, path: str, sites: Mapping[str, Any], hold_ms: int, browser_grace_ms: int):
        self.args = (path, dict(sites), hold_ms, browser_grace_ms)
        self._process: asyncio.subprocess.Process | None = None
        self._replies: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transactions = 0  # committed so far, as the last reply said

    async def start(self) -> None:
        # Linux refuses a single environment string over 128 KiB (MAX_ARG_STRLEN); the
        # writer needs nothing that large, so such values are not passed on.
        env = {k: v for k, v in os.environ.items() if len(k) + len(v) < 65536}
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.store.sqlite_writer", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 24)
        self._replies = asyncio.create_task(self._read_replies(), name="onetag-writer-replies")
        answer = await self.submit(self.args)
        if answer != "ready":
            await self.stop()
            raise answer if isinstance(answer, BaseException) else WriterFailed(repr(answer))

    def submit(self, message: Any) -> asyncio.Future[Any]:
        """Send one frame (a group commit's jobs); its answer, once committed."""
        assert self._process is not None and self._process.stdin is not None
        if self._replies is None or self._replies.done():
            raise WriterFailed(f"the writer process exited (code {self._process.returncode})")
        future = asyncio.get_running_loop().create_future()
        # Appended and written in one step: replies come back in this order.
        self._waiting.append(future)
        self._process.stdin.write(_frame(message))
        return future

    async def _read_replies(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        try:
            while True:
                (size,) = _FRAME.unpack(await stdout.readexactly(_FRAME.size))
                self.transactions, reply = pickle.loads(await stdout.readexactly(size))
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            while self._waiting:
                future = self._waiting.popleft()
                if not future.done():
                    future.set_exception(WriterFailed(
                        f"the writer process exited (code {self._process.returncode})"))

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # end of file after what was sent: it finishes and exits
        try:
            await asyncio.wait_for(process.wait(), 10)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
        if self._replies is not None:
            await self._replies


class _FrameReader:
    """Frames from a file descriptor: block for the first, then take whatever else is there."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()
        self.eof = False

    def _complete(self) -> list[Any]:
        frames = []
        while len(self.buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + size:
                break
            frames.append(pickle.loads(self.buffer[_FRAME.size:_FRAME.size + size]))
            del self.buffer[:_FRAME.size + size]
        return frames

    def _fill(self) -> None:
        chunk = os.read(self.fd, 1 << 20)
        if chunk:
            self.buffer += chunk
        else:
            self.eof = True

    def next(self) -> list[Any]:
        """At least one frame (blocking), plus every frame already waiting; [] at the end."""
        frames = self._complete()
        while not frames and not self.eof:
            self._fill()
            frames = self._complete()
        return frames + self.waiting()

    def waiting(self) -> list[Any]:
        """Every frame already there, without blocking."""
        frames = self._complete()
        while not self.eof and select.select([self.fd], [], [], 0)[0]:
            self._fill()
            frames += self._complete()
        return frames


def _frame(message: Any) -> bytes:
    """One message on the pipe: its length, then its pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def _send(stream: BinaryIO, message: Any) -> None:
    stream.write(_frame(message))
    stream.flush()


def _portable(result: Any) -> Any:
    """Results cross the pipe; an exception is sent as one the server can always unpickle."""
    if isinstance(result, BaseException):
        return WriterFailed(f"{type(result).__name__}: {result}")
    return result


def _take(frames: list[Any], limit: int) -> tuple[list[Any], list[Any]]:
    """The first frames, up to the one whose jobs reach ``limit``; and the rest."""
    jobs = 0
    for i, frame in enumerate(frames):
        jobs += len(frame)
        if jobs >= limit:
            return frames[:i + 1], frames[i + 1:]
    return frames, []


def main() -> None:
    """The writer process: set up from the first frame, then one commit per read.

    The batches waiting in the pipe go into one transaction, up to ``TRANSACTION_JOBS``
    jobs; each batch gets its own reply.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it closes us
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the frame stream
    reader = _FrameReader(sys.stdin.fileno())
    frames = reader.next()
    if not frames:
        return
    try:
        path, sites, hold_ms, grace_ms = frames.pop(0)
        conn = configure(sqlite3.connect(path, isolation_level=None))
        ops = WriteOps(conn, sites, hold_ms, grace_ms)
    except Exception as exc:
        _send(stdout, (0, _portable(exc)))
        return
    _send(stdout, (0, "ready"))
    while frames or (frames := reader.next()):
        frames, later = _take(frames, TRANSACTION_JOBS)
        jobs = [job for frame in frames for job in frame]
        try:
            results = [_portable(result) for result in ops.run_batch(jobs)]
        except Exception as exc:  # the commit itself failed: nobody's write is durable
            results = [_portable(exc)] * len(jobs)
        replies = []  # one write for every reply of this transaction
        for frame in frames:
            replies.append(_frame((ops.transactions, results[:len(frame)])))
            results = results[len(frame):]
        try:
            stdout.write(b"".join(replies))
            stdout.flush()
        except BrokenPipeError:
            return
        frames = later + reader.waiting() if later else []


if __name__ == "__main__":
    main()
