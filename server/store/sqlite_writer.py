"""The writing side of the SQLite store: everything that changes the database.

One connection, one transaction per group commit. It runs either in a thread of the server
(``ThreadWriter``, via aiosqlite) or in a process of its own (``ProcessWriter``). The
process is the default for ``onetag serve``: the writer's Python (JSON, planning, binding
statements) and the event loop's share one GIL inside one process, and each SQLite step
hands the GIL back and forth between them — measured by ``bench/ingest.py``, that cost the
endpoint most of its throughput. In a process of its own the writer works on the second
core, and the server only sends it each batch and waits for the commit.

The protocol with a writer process (frames of plain data with ids, answered by id) and the
process's life are ``writer_process``'s, shared with PostgreSQL's writer; SQLite's set-up
frame is ``(path, sites, hold_ms, browser_grace_ms)``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import sys
import threading
import time
import traceback
from importlib import resources
from typing import Any, Mapping, NamedTuple, Sequence

from .. import outbox
from ..envelope import BrowserFacts, Problem, Refused, read_browser_body
from ..jsontext import encode, loads
from . import compat, deadletters, person, retention, rules
from .base import Delivery, JobFailure, Outcome, SchemaNotCurrent, newer_schema
from .deadletters import ReplayFilter
from .outbox_rules import CLAIMABLE
from .sqlite_catalog import plan_sync
from .sqlite_ingest import (IngestBatch, SessionCache, identity_fields, insert_deliveries,
                            load_orders)
from .writer_process import (INGEST_OPS, UNREADABLE, WriterProcess, child_pipes, encode_frame,
                             reply_frame)

log = logging.getLogger("onetag.store")
UNREADABLE_FAILURE = JobFailure("writer", "unreadable frame")  # a frame, or its jobs, unreadable

# Jobs a transaction of the writer process takes from the batches waiting (it stops at the
# first batch that reaches it). With no limit, 32 closed-loop clients fell into lockstep:
# the writer committed all 32 requests while the event loop waited, then the loop answered
# and read all 32 while the writer waited (bench/ingest.py: 377 of 674 commits held all
# 32). With 16, the loop answers one half while the writer commits the other, and the two
# processes work at once: +7% events/s at 32 connections, +11% at 64 (alternating solo
# runs). Smaller transactions cost more a request (each commit has its fsync and rewrites
# the pages it touches), and 8, 12 and 24 measured about the same as 16.
TRANSACTION_JOBS = 16
_CLAIMABLE_SQL = CLAIMABLE.format(d="d", p="p")  # the claim rule (store/outbox_rules.py)
# WAL pages before a commit checkpoints (SQLite's default: 1,000), for the thread writer.
# Such a checkpoint runs inside the commit that crosses it, and every request of that batch
# waits on it (bench/ingest.py: p99 58 ms against 17 ms for bare Starlette). The writer
# process turns that off and checkpoints from a thread of its own (``Checkpointer``).
WAL_AUTOCHECKPOINT = 8000
# How often the writer process's checkpointer copies the WAL into the database. A passive
# checkpoint takes no lock a commit needs, so commits go on meanwhile; once a second still
# copies each hot page once per second, not once per commit.
CHECKPOINT_EVERY_S = 1.0
REPLAY_IDS_KEPT = 100  # a replay record lists the rows made due when there are at most this many


# Coupon calls past ``[server] keep_attempts_days`` (both backends; ``prune_coupon_calls``).
COUPON_PRUNE_SQL = ("DELETE FROM coupon_calls WHERE id IN (SELECT id FROM (SELECT id, created_ms "
                    "FROM coupon_calls ORDER BY id LIMIT {limit}) AS oldest "
                    "WHERE created_ms < {before})")
# A console logout kept until the cookie's expiry, and the expired ones pruned (both backends;
# ``revoke_session``). A session's nonce and expiry come from its signed cookie: logging it
# out twice (two nodes, two tabs) writes the same row.
CONSOLE_LOGOUT_SQL = ("INSERT INTO console_logouts (nonce, expires_ms) VALUES ({nonce}, {expires}) "
                      "ON CONFLICT (nonce) DO NOTHING")
CONSOLE_LOGOUT_PRUNE_SQL = "DELETE FROM console_logouts WHERE expires_ms <= {now}"
# Wrong guesses of a secret by client address (both backends; ``guess_failed``): a guess kept,
# its bound's rows that left the window pruned, the address's remaining ones read back.
GUESS_SQL = "INSERT INTO guess_failures (scope, address, at_ms) VALUES ({scope}, {address}, {at})"
GUESS_PRUNE_SQL = "DELETE FROM guess_failures WHERE scope = {scope} AND at_ms <= {before}"
GUESS_READ_SQL = ("SELECT at_ms FROM guess_failures WHERE scope = {scope} AND address = {address} "
                  "AND at_ms > {since} ORDER BY at_ms")
GUESS_CLEAR_SQL = "DELETE FROM guess_failures WHERE scope = {scope} AND address = {address}"
# The columns of a coupon call, in the order ``record_coupon_call`` takes them.
COUPON_CALL_COLUMNS = ("created_ms", "site_id", "request_id", "idempotency_key", "code",
                       "template_id", "expiration", "email", "status", "result",
                       "store_status", "duration_ms", "error")


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
    """Apply the migrations this database has not seen; returns their names.

    Each is checked again inside its own write transaction: two processes opening one
    database at once (``onetag worker`` and ``onetag backfill`` started together) must not
    both apply it (the second failed with "table ... already exists", and its writer with
    it). A database a newer onetag migrated is refused (``SchemaNotCurrent``) unless each
    migration this code does not know was recorded compatible with it (``compat.py``),
    which is said once a process. Every file's declaration is read first: one missing
    applies nothing."""
    declared = {version: compat.compatible_from(name, sql)
                for version, name, sql in migrations()}
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                 "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL)")
    done = recorded(conn)
    unknown = compat.sort_unknown(done, declared)
    if unknown.refused or (unknown.tolerated and len(done) - len(unknown.tolerated)
                           < len(declared)):
        # A downgrade (or, with some of this code's own missing, another line of
        # releases): this code does not run against a schema it does not know.
        raise SchemaNotCurrent(newer_schema(unknown.refused or unknown.tolerated))
    compat.say_newer(log, unknown.tolerated)
    versions = {version for version, _, _ in done}
    applied = []
    for version, name, sql in migrations():
        if version in versions:
            continue
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?",
                        (version,)).fetchone():
            conn.execute("COMMIT")  # another connection applied it meanwhile
            continue
        try:
            for statement in sql.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            if _declared(conn):
                conn.execute("INSERT INTO schema_migrations (version, name, applied_ms, "
                             "compatible_from) VALUES (?, ?, ?, ?)",
                             (version, name, now_ms(), declared[version]))
            else:
                conn.execute("INSERT INTO schema_migrations (version, name, applied_ms) "
                             "VALUES (?, ?, ?)", (version, name, now_ms()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    # The rows a release without the column wrote get their files' declarations.
    names = {version: name for version, name, _ in migrations()}
    undeclared = [(declared[version], version) for version, name, floor in recorded(conn)
                  if floor is None and names.get(version) == name]
    if undeclared:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("UPDATE schema_migrations SET compatible_from = ? "
                             "WHERE version = ? AND compatible_from IS NULL", undeclared)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied


def _declared(conn: sqlite3.Connection) -> bool:
    """Whether ``schema_migrations`` records declarations yet (migration 024)."""
    return any(row[1] == "compatible_from"
               for row in conn.execute("PRAGMA table_info(schema_migrations)"))


def recorded(conn: sqlite3.Connection) -> list[tuple[int, str, int | None]]:
    """(version, name, compatible_from) of every migration applied (None: not recorded)."""
    if not _declared(conn):
        return [(version, name, None) for version, name in
                conn.execute("SELECT version, name FROM schema_migrations")]
    return [tuple(row) for row in conn.execute(
        "SELECT version, name, compatible_from FROM schema_migrations")]


def plan(conn: sqlite3.Connection) -> compat.Plan:
    """What ``migrate`` would apply, with each file's declaration (``migrate --check``):
    reads only (no table is made)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                          "AND name = 'schema_migrations'").fetchone()
    done = {version: name for version, name, _ in recorded(conn)} if exists else {}
    return compat.plan(done, migrations(), bool(exists) and _declared(conn))


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


def storage_failure(exc: BaseException) -> JobFailure:
    """What a failed statement or commit says about the storage, as a 503's field."""
    text = str(exc)
    lowered = text.lower()
    if "full" in lowered or "disk i/o" in lowered or "no space" in lowered:
        return JobFailure("disk", text)
    return JobFailure("database", text)


def commit_failure(exc: BaseException) -> JobFailure:
    """Why a whole transaction (or the writer's set-up) failed: nobody's write was made."""
    if _is_storage_error(exc):
        return storage_failure(exc)
    return JobFailure("database", f"{type(exc).__name__}: {exc}")


def _is_storage_error(exc: BaseException) -> bool:
    """SQLite failing to store (full, read-only, I/O, locked), not a statement's content."""
    return isinstance(exc, (sqlite3.OperationalError, OSError)) or (
        type(exc) is sqlite3.DatabaseError)


def _request_id(op: str, args: tuple[Any, ...]) -> str | None:
    """The HTTP request id an ingest job carries (its last argument), if any."""
    if op in INGEST_OPS and len(args) == (5 if op == "ingest" else 3):
        return args[-1]
    return None


def answer(op: str, result: Any, args: tuple[Any, ...] = ()) -> Any:
    """A job's result as plain data for its caller: the value, a ``Problem`` or a
    ``JobFailure``. An error of an ingest request that ran alone is that request's own,
    logged with its request id."""
    if not isinstance(result, BaseException):
        return result
    if isinstance(result, Refused):
        return result.problem
    if _is_storage_error(result):
        return storage_failure(result)
    if op in INGEST_OPS:
        log.error("an ingest request failed alone:\n%s",
                  "".join(traceback.format_exception(result)).rstrip(),
                  extra={"request_id": _request_id(op, args)})
        return Problem(422, "invalid_event", "events",
                       f"could not be stored ({type(result).__name__}: {str(result)[:200]})")
    return JobFailure("database", f"{type(result).__name__}: {result}")


class ReadJob(NamedTuple):
    """A job as ``WriteOps.read`` left it: its ingest request (None: not an ingest, or
    refused) and, for a browser body, (sc, site, event names); or its answer already."""

    op: str
    args: tuple[Any, ...]
    early: Any  # a Problem or an exception: the answer, decided when the body was read
    request: Any  # sqlite_ingest.Request
    browser: tuple[Any, ...] | None


class WriteOps:
    """The operations a job may name; ``run`` applies a group commit's jobs."""

    def __init__(self, conn: sqlite3.Connection, sites: Mapping[str, Any], hold_ms: int,
                 browser_grace_ms: int):
        self.conn = conn
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self.cache = SessionCache()
        self.transactions = 0  # committed

    def run(self, jobs: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """``run_batch``, every answer plain data (``answer``); a failed commit fails every
        job with the storage's ``JobFailure``: nothing of the batch was made."""
        return self.run_read([self.read(op, args) for op, args in jobs])

    def run_read(self, jobs: Sequence[ReadJob]) -> list[Any]:
        """``run`` for jobs already read (``read``)."""
        try:
            results = self.run_batch(jobs)
        except Exception as exc:
            failure = commit_failure(exc)
            return [failure] * len(jobs)
        return [answer(job.op, result, job.args) for job, result in zip(jobs, results)]

    def ping(self) -> int:
        """A health check's write: one header field, committed with the batch it joins, so
        an answer means this writer commits (``GET /healthz``)."""
        self.conn.execute(f"PRAGMA user_version = {self.transactions % 1_000_000 + 1}")
        return os.getpid()

    def read(self, op: str, args: tuple[Any, ...]) -> ReadJob:
        """A job with its browser body read (``envelope.read_browser_body``: parse, site,
        origin, sc, validate, normalise) into an ingest request, before the transaction. A
        body refused, or failing to be read, gets its answer here (``early``) and takes no
        further part."""
        if op == "ingest":  # (site_id, events, raws, user agent[, request id])
            return ReadJob(op, args, None, args if len(args) == 5 else (*args, None), None)
        if op != "ingest_browser":
            return ReadJob(op, args, None, None, None)
        data, facts, *request_id = args  # [request id]
        try:
            facts = BrowserFacts(*facts)  # it crosses the pipe as a plain tuple
            batch = read_browser_body(data, facts, self.sites)
            if isinstance(batch, Problem):
                return ReadJob(op, args, batch, None, None)
            request = (batch.site_id, batch.events, [encode(raw) for raw in batch.raws],
                       facts.user_agent, request_id[0] if request_id else None)
        except Exception as exc:  # a bug reading one body fails that request alone
            return ReadJob(op, args, exc, None, None)
        # A browser body's answer carries the visitor's sc, for the cookie, and its site
        # and event names, for the server's metrics.
        return ReadJob(op, args, None, request,
                       (batch.sc, batch.site_id, tuple(event["name"] for event in batch.events)))

    def run_batch(self, jobs: Sequence[ReadJob]) -> list[Any]:
        """One transaction for every job waiting, read (``read``).

        The ingest requests are applied together (``IngestBatch``), first and without a
        savepoint (it would journal every page they change); if that fails, the transaction
        is rolled back and each is applied again on its own in a savepoint, so a bad
        request fails alone. Other jobs (claims, outcomes) run in a savepoint each.
        Whatever rolls back also empties the session cache, whose rows it had changed.
        """
        conn = self.conn
        results: list[Any] = [job.early for job in jobs]
        request_jobs = [(i, job.browser) for i, job in enumerate(jobs) if job.request is not None]
        requests = [jobs[i].request for i, _ in request_jobs]
        conn.execute("BEGIN IMMEDIATE")
        try:
            self.cache.check(conn)
            if requests:
                # Each request alone starts from its events as sent (rules.keep_pristine).
                restores = [rules.keep_pristine([request]) for request in requests]
                try:
                    together = self.ingest(requests)
                except Exception:  # nothing else ran yet: start the transaction over
                    self.cache.clear()
                    if conn.in_transaction:  # some errors end it already
                        conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    together = []
                    for request, restore in zip(requests, restores):
                        restore()
                        together.append(self._ingest_alone(request))
                for (i, browser), result in zip(request_jobs, together):
                    results[i] = result if browser is None or isinstance(result, Exception) else (
                        browser[0], result, *browser[1:])
            for i, job in enumerate(jobs):
                if job.op not in INGEST_OPS:
                    results[i] = _savepoint(conn, getattr(self, job.op), *job.args)
            conn.execute("COMMIT")
            self.transactions += 1
        except BaseException:
            self.cache.clear()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

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

    def plan_product_sync(self, site_id: str, now: int, night: str | None,
                          limit: int) -> dict[str, Any]:
        """The Sendlane product sync's planning step (server/product_sync.py)."""
        site = self.sites.get(site_id)
        if site is None:
            return {"changes": 0, "nightly": 0, "more": False}
        return plan_sync(self.conn, site, now, night, limit)

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
            "d.created_ms, coalesce(d.retry_from_ms, d.created_ms), d.request_id FROM deliveries d "
            f"WHERE d.state = 'pending' AND d.next_attempt_ms <= ? {vendor_filter} "
            # One in flight per (site, vendor, visitor), in order: outbox_rules, as on
            # PostgreSQL. Due longest ago first: with one vendor this walks deliveries_due in
            # order and stops at LIMIT (ORDER BY d.id would check and sort every due row).
            f"AND {_CLAIMABLE_SQL} ORDER BY d.next_attempt_ms, d.id LIMIT ?", params).fetchall()
        self.conn.executemany(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_ms = ?, updated_ms = ? "
            "WHERE id = ?", [(now + lease_ms, now, row[0]) for row in rows])
        return [Delivery(id=row[0], site_id=row[1], vendor=row[2], dedup_key=row[3],
                         visitor=row[4], request=loads(row[5]), attempts=row[6] + 1,
                         created_ms=row[7], retry_from_ms=row[8], request_id=row[9])
                for row in rows]

    def finish(self, outcomes: list[Outcome], now: int) -> None:
        self.conn.executemany(
            "UPDATE deliveries SET state = ?, next_attempt_ms = ?, last_error = ?, "
            "updated_ms = ?, delivered_ms = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_ms END "
            "WHERE id = ? AND state = 'pending'",  # a late outcome never undoes a final one
            [(o.state, o.next_attempt_ms, o.error, now, o.state, now, o.id) for o in outcomes])
        kept = [(o.id, a.attempt, a.started_ms, a.duration_ms, encode(a.request), a.status,
                 None if a.answer is None else encode(a.answer), a.error, o.id)
                for o in outcomes if (a := o.attempt) is not None]
        if kept:  # encoded here, in the writer, off the forwarder's event loop
            # Labelled with the delivery's site and vendor (migration 013): the Vendors
            # page's latency series reads the range's attempts alone.
            # One probe of the delivery a row; an attempt is kept even without one, but not
            # for a delivery erased since its claim (``onetag person forget``, store/
            # person.py: visitor 'erased'): a forwarder's late outcome must not write the
            # person's request back, where no export or forget could reach it.
            self.conn.executemany(
                "INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request, "
                "status, answer, error, site_id, vendor) SELECT ?, ?, ?, ?, CAST(? AS TEXT), "
                "?, CAST(? AS TEXT), ?, d.site_id, d.vendor FROM (SELECT ? AS id) AS k "
                "LEFT JOIN deliveries d ON d.id = k.id WHERE d.visitor IS NOT 'erased'", kept)

    def prune_attempts(self, before: int, limit: int) -> int:
        """The oldest attempts first, at most ``limit``: one pass's work stays bounded."""
        return self.conn.execute(
            "DELETE FROM attempts WHERE id IN (SELECT id FROM attempts WHERE started_ms < ? "
            "ORDER BY started_ms LIMIT ?)", (before, limit)).rowcount

    def label_attempts(self, before: tuple[int, int], limit: int
                       ) -> tuple[int, tuple[int, int] | None]:
        """``Store.label_attempts``: the batch through attempts_unlabelled (migration 013)."""
        batch = ("SELECT started_ms, id FROM attempts WHERE site_id IS NULL "
                 "AND (started_ms, id) < (?, ?) ORDER BY started_ms DESC, id DESC LIMIT ?")
        rows = self.conn.execute(batch, (*before, limit)).fetchall()
        if not rows:
            return 0, None
        labelled = self.conn.execute(
            "UPDATE attempts SET site_id = (SELECT site_id FROM deliveries d WHERE "
            "d.id = attempts.delivery_id), vendor = (SELECT vendor FROM deliveries d WHERE "
            f"d.id = attempts.delivery_id) WHERE attempts.id IN (SELECT id FROM ({batch})) "
            "AND EXISTS (SELECT 1 FROM deliveries d WHERE d.id = attempts.delivery_id)",
            (*before, limit)).rowcount
        return labelled, tuple(rows[-1])

    def prune_coupon_calls(self, before: int, limit: int) -> int:
        """Of the ``limit`` oldest calls (by id: no index on time is needed, and a pass with
        nothing to prune reads ``limit`` rows, not the table), those made before ``before``."""
        return self.conn.execute(COUPON_PRUNE_SQL.format(limit="?", before="?"),
                                 (limit, before)).rowcount

    def prune_deliveries(self, before: int, limit: int) -> int:
        """``Store.prune_deliveries``: through deliveries_finished (migration 022)."""
        ids = [row[0] for row in self.conn.execute(
            retention.PICK_DELIVERIES.format(before="?1", limit="?2",
                                             indexed=retention.SQLITE_INDEXED),
            (before, limit))]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        self.conn.execute(f"DELETE FROM attempts WHERE delivery_id IN ({marks})", ids)
        return self.conn.execute(f"DELETE FROM deliveries WHERE id IN ({marks})", ids).rowcount

    def prune_events(self, before: int, after: int, limit: int) -> tuple[int, int | None]:
        """``Store.prune_events``: a batch of the walk by seq."""
        return self._prune_walk(retention.EVENTS, before, after, limit)

    def prune_sessions(self, before: int, after: int, limit: int) -> tuple[int, int | None]:
        """``Store.prune_sessions``: a batch of the walk by id. The session cache forgets
        every session once any is deleted (it would write a deleted row back)."""
        deleted, last = self._prune_walk(retention.SESSIONS, before, after, limit)
        if deleted:
            self.cache.clear()
        return deleted, last

    def _prune_walk(self, walk: retention.Walk, before: int, after: int, limit: int
                    ) -> tuple[int, int | None]:
        rows = self.conn.execute(walk.read().format(after="?", limit="?"),
                                 (after, limit)).fetchall()
        old = [key for key, at in rows if at < before]
        deleted = 0
        if old:
            deleted = self.conn.execute(
                walk.delete().format(keys=",".join("?" * len(old)), before="?"),
                (*old, before) if "{before}" in walk.extra else old).rowcount
        end = retention.walk_end([at for _, at in rows], before, limit)
        return deleted, None if end else rows[-1][0]

    def revoke_session(self, nonce: str, expires_ms: int, now: int) -> None:
        """``Store.revoke_session``: the logout kept (migration 016), the expired pruned."""
        self.conn.execute(CONSOLE_LOGOUT_SQL.format(nonce="?", expires="?"), (nonce, expires_ms))
        self.conn.execute(CONSOLE_LOGOUT_PRUNE_SQL.format(now="?"), (now,))

    def guess_failed(self, scope: str, address: str, now: int, window: int,
                     earlier: Sequence[int] = ()) -> list[int]:
        """``Store.guess_failed``: the guesses kept (migration 019), the old pruned."""
        self.conn.executemany(GUESS_SQL.format(scope="?", address="?", at="?"),
                              [(scope, address, at) for at in (*earlier, now)])
        self.conn.execute(GUESS_PRUNE_SQL.format(scope="?", before="?"), (scope, now - window))
        rows = self.conn.execute(GUESS_READ_SQL.format(scope="?", address="?", since="?"),
                                 (scope, address, now - window)).fetchall()
        return [row[0] for row in rows]

    def guesses_cleared(self, scope: str, address: str) -> None:
        self.conn.execute(GUESS_CLEAR_SQL.format(scope="?", address="?"), (scope, address))

    def forget_person(self, who: tuple[Any, ...], hint: tuple[Any, ...]) -> dict[str, Any]:
        """``Store.forget_person`` in this transaction (store/person.py): found again under
        the writer's lock (``hint``: the reader's scan), then erased."""
        execute = person.sqlite_execute(self.conn)
        found = person.run_sync(person.gather(person.SQLITE, person.Selector(*who),
                                              hint=person.Scanned(*hint)), execute)
        done = person.run_sync(person.erase(person.SQLITE, found, now_ms()), execute)
        # This connection's own deletes leave ``PRAGMA data_version`` as it was: the cached
        # sessions and identities must go, or a later event of the same sc would update
        # the deleted row instead of starting a fresh session.
        self.cache.clear()
        return person.forget_report(found, False, done)

    def record_coupon_call(self, call: tuple[Any, ...]) -> int:
        """One row of ``coupon_calls`` (server/coupons.py, ``COUPON_CALL_COLUMNS``)."""
        return self.conn.execute(
            f"INSERT INTO coupon_calls ({', '.join(COUPON_CALL_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(COUPON_CALL_COLUMNS))})", call).lastrowid

    def expire_held(self, before: int, now: int) -> int:
        return self.conn.execute("UPDATE deliveries SET state = 'expired', updated_ms = ? "
                            "WHERE state = 'held' AND created_ms < ?", (now, before)).rowcount

    def replay(self, now: int, vendor: str | None,
               since: int | None, states: tuple[str, ...]) -> int:
        return len(self.replay_rows(now, ReplayFilter(tuple(states), vendor, since_ms=since),
                                    False))

    def replay_rows(self, now: int, selection: ReplayFilter,
                    dry_run: bool) -> list[dict[str, Any]]:
        """The rows made due again (``replaces``: the expired rows a re-planned one takes
        the place of), selected by ``deadletters.where`` alone. A dry run does exactly that
        in a savepoint it then rolls back, so its answer is what the same call would do."""
        problem = deadletters.check(selection, replay=True)
        if problem:
            raise ValueError(problem)
        if dry_run:
            self.conn.execute("SAVEPOINT dry_run")
            try:
                return self.replay_rows(now, selection, False)
            finally:
                self.conn.execute("ROLLBACK TO dry_run")
                self.conn.execute("RELEASE dry_run")
        made: list[dict[str, Any]] = []
        if "dead" in selection.states:
            condition, params = deadletters.where(selection, states=("dead",))
            made += [{"id": row[0], "site_id": row[1], "vendor": row[2], "dedup_key": row[3],
                      "from_state": row[4], "replaces": []} for row in self.conn.execute(
                "SELECT id, site_id, vendor, dedup_key, state FROM deliveries "
                f"WHERE {condition} ORDER BY id", params)]
            if made:
                self.conn.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_ms = ?, "
                    f"retry_from_ms = ?, updated_ms = ?, last_error = NULL WHERE {condition}",
                    [now, now, now, *params])
        if "expired" in selection.states:
            made += self._replay_expired(now, selection)
        return made

    def replay_preview(self, now: int, selection: ReplayFilter) -> tuple[int, str]:
        """A dry run's count and ``deadletters.fingerprint``, without its rows (the console
        shows the count on every listing; the rows would only cross the pipe to be counted)."""
        rows = self.replay_rows(now, selection, True)
        return len(rows), deadletters.fingerprint(rows)

    def replay_recorded(self, now: int, selection: ReplayFilter, who: str,
                        expect: str | None, shown: int | None) -> dict[str, Any]:
        """An operator's replay, recorded in the ``replays`` table by the same transaction.

        ``expect``: the fingerprint of the set the operator's dry run showed. When the set
        is no longer that one (rows died, were replayed or delivered meanwhile), nothing is
        replayed and the answer is the set as it is now (``changed``), for the operator to
        look at again. Checked and replayed in one job: nothing runs between the two."""
        if expect is not None:
            current = self.replay_rows(now, selection, True)
            if deadletters.fingerprint(current) != expect:
                return {"changed": True, "rows": current, "replay_id": None,
                        "fingerprint": deadletters.fingerprint(current)}
        made = self.replay_rows(now, selection, False)
        replay_id = self.record_replay(now, who, selection.describe(), shown,
                                       [row["id"] for row in made])
        return {"changed": False, "rows": made, "replay_id": replay_id,
                "fingerprint": deadletters.fingerprint(made)}

    def record_replay(self, now: int, who: str, scope: dict[str, Any], shown: int | None,
                      ids: list[int]) -> int:
        """One row of ``replays``; its id. (A replay made elsewhere, e.g. a delivery's own
        page, is recorded with this after the fact.)"""
        return self.conn.execute(
            "INSERT INTO replays (at_ms, who, filter, dry_run_count, replayed, ids) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (now, who, encode(scope).decode(), shown, len(ids),
             encode(ids).decode() if len(ids) <= REPLAY_IDS_KEPT else None)).lastrowid

    def _replay_expired(self, now: int, selection: ReplayFilter) -> list[dict[str, Any]]:
        """Expired rows never had an email; re-plan those whose visitor has one now."""
        condition, params = deadletters.where(selection, prefix="d.", states=("expired",))
        rows = self.conn.execute(
            "SELECT d.id, d.event_seq, d.vendor, e.site_id, e.data, d.request_id, "
            "coalesce(s.identity_id, e.identity_id) AS identity_id FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            "LEFT JOIN sessions s ON s.site_id = e.site_id AND s.sc = e.sc "
            f"WHERE {condition} ORDER BY d.id", params).fetchall()
        by_event: dict[int, tuple[str, str, int | None, dict[str, list[int]], str | None]] = {}
        for row in rows:  # a replanned row keeps the request id of the request that planned it
            entry = by_event.setdefault(row["event_seq"], (row["site_id"], row["data"],
                                                           row["identity_id"], {},
                                                           row["request_id"]))
            entry[3].setdefault(row["vendor"], []).append(row["id"])
        inserted: list[dict[str, Any]] = []
        # The orders the replayed status changes repeat, in one look-up (PlanContext.order).
        events = {seq: loads(entry[1]) for seq, entry in by_event.items()
                  if entry[0] in self.sites}
        orders = load_orders(self.conn, rules.orders_wanted(
            self.sites, ((by_event[seq][0], event) for seq, event in events.items())))
        for seq, (site_id, data, identity_id, vendors, request_id) in by_event.items():
            site = self.sites.get(site_id)
            identity = None
            if identity_id:
                row = self.conn.execute("SELECT * FROM identities WHERE id = ?", (identity_id,)).fetchone()
                identity = {**identity_fields(row), "id": identity_id, "is_new": False}
            if site is None or not identity or not identity.get("email"):
                continue
            event = events[seq]
            event["identity"] = identity
            planned = [r for r in outbox.plan(site, event, vendors, orders=orders)
                       if r.state == outbox.PENDING]
            replanned = sorted({r.vendor for r in planned})
            if not replanned:
                continue
            self.conn.execute(f"DELETE FROM deliveries WHERE event_seq = ? AND state = 'expired' "
                         f"AND vendor IN ({','.join('?' * len(replanned))})", (seq, *replanned))
            last_id = self.conn.execute("SELECT coalesce(max(id), 0) FROM deliveries").fetchone()[0]
            insert_deliveries(self.conn, [(site_id, seq, row, request_id) for row in planned],
                              now)
            inserted += [{"id": row[0], "site_id": site_id, "vendor": row[1], "dedup_key": row[2],
                          "from_state": "expired", "replaces": vendors[row[1]]}
                         for row in self.conn.execute(
                             "SELECT id, vendor, dedup_key FROM deliveries WHERE id > ? "
                             "AND event_seq = ? ORDER BY id", (last_id, seq))]
        return inserted


    # Backfill (server/backfill.py) ----------------------------------------------------------

    def backfill_run(self, site_id: str, files: str, files_hash: str,
                     lines_total: int) -> tuple[int, int, str]:
        """The unfinished run over the same files (to resume), else a new one:
        (run id, lines done, counts as JSON text)."""
        row = self.conn.execute(
            "SELECT id, lines_done, counts FROM backfill_runs WHERE site_id = ? AND "
            "files_hash = ? AND finished_ms IS NULL ORDER BY id DESC LIMIT 1",
            (site_id, files_hash)).fetchone()
        if row is not None:
            return row[0], row[1], row[2]
        now = now_ms()
        cursor = self.conn.execute(
            "INSERT INTO backfill_runs (site_id, files, files_hash, lines_total, started_ms, "
            "updated_ms) VALUES (?, ?, ?, ?, ?, ?)", (site_id, files, files_hash, lines_total,
                                                      now, now))
        return cursor.lastrowid, 0, "{}"

    def backfill(self, site_id: str, run_id: int, events: list[tuple[Any, ...]],
                 skipped: dict[str, dict[str, int]], lines_done: int, finished: bool,
                 pace_ms: int = 0) -> tuple[dict[str, int], dict[str, int], int]:
        """One batch of a backfill, with the run's progress, in this transaction.

        ``events``: (event_id, name, raw JSON, normalised JSON, deliveries), each delivery
        (vendor, dedup_key, visitor, request JSON). An event already stored (its id, from the
        backend) is not stored again; a delivery whose (site, vendor, dedup key) any row
        holds already — planned live or by an earlier run, sent or not — is not planned
        again. ``skipped``: vendor -> reason -> requests the vendor can't take, added to the
        run's counts with the rest. ``pace_ms``: a vendor's new rows fall due that far apart
        (0: all at once), after the last pending row of that vendor (an earlier batch's, or
        another run's), so history trickles out and live rows, due when made, go first; a
        paced row is created now and due later, its retry window (``retry_from_ms``)
        starting when it falls due.
        Returns (planned per vendor, already there per vendor, events already there).
        """
        now = now_ms()
        planned: dict[str, int] = {}
        already: dict[str, int] = {}
        known = 0
        request_id = f"backfill-{run_id}"
        next_due: dict[str, int] = {}
        for event_id, name, raw, data, deliveries in events:
            cursor = self.conn.execute(
                "INSERT OR IGNORE INTO events (site_id, event_id, name, source, sc, identity_id, "
                "received_ms, raw, data) VALUES (?, ?, ?, 'backend', NULL, NULL, ?, "
                "CAST(? AS TEXT), CAST(? AS TEXT))", (site_id, event_id, name, now, raw, data))
            if cursor.rowcount:
                seq = cursor.lastrowid
            else:
                known += 1
                seq = self.conn.execute(
                    "SELECT seq FROM events WHERE site_id = ? AND event_id = ? AND "
                    "source = 'backend'", (site_id, event_id)).fetchone()[0]
            for vendor, key, visitor, request in deliveries:
                due = next_due.get(vendor)
                if due is None:
                    due = now if not pace_ms else max(now, pace_ms + self.conn.execute(
                        "SELECT coalesce(max(next_attempt_ms), 0) FROM deliveries WHERE "
                        "state = 'pending' AND vendor = ?", (vendor,)).fetchone()[0])
                made = self.conn.execute(_BACKFILL_DELIVERY, (site_id, vendor, key, seq, visitor,
                                                              request, due, now,
                                                              request_id)).rowcount
                tally = planned if made else already
                tally[vendor] = tally.get(vendor, 0) + 1
                next_due[vendor] = due + pace_ms if made else due
        row = self.conn.execute("SELECT counts FROM backfill_runs WHERE id = ?",
                                (run_id,)).fetchone()
        counts = rules.add_backfill_counts(loads(row[0]) if row is not None else {}, planned,
                                           already, skipped, known)
        self.conn.execute(
            "UPDATE backfill_runs SET lines_done = ?, counts = CAST(? AS TEXT), updated_ms = ?, "
            "finished_ms = CASE WHEN ? THEN ? END WHERE id = ?",
            (lines_done, encode(counts), now, finished, now, run_id))
        return planned, already, known


# A backfilled delivery: pending, created now (?8) and due at ?7 (its retry window starts
# then), unless a row of any kind (a live one, a claim, an earlier run's) holds its key. A
# ``backfill-<run>`` request id names the run that planned it.
_BACKFILL_DELIVERY = (
    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, next_attempt_ms, retry_from_ms, created_ms, updated_ms, request_id) "
    "SELECT ?1, ?2, ?3, 0, ?4, ?5, 'pending', CAST(?6 AS TEXT), ?7, ?7, ?8, ?8, ?9 "
    "WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE site_id = ?1 AND vendor = ?2 "
    "AND dedup_key = ?3)")


class ThreadWriter:
    """The writer in a thread of this process: aiosqlite's connection thread.

    For tools and tests that open the store briefly; ``onetag serve`` uses a process.
    """

    depth = 1  # one batch at a time: the next one grows while this one commits
    frame_jobs = 256  # jobs a batch
    pid = None

    def __init__(self, path: str, sites: Mapping[str, Any], hold_ms: int, browser_grace_ms: int,
                 timeout_s: float = 0):
        self.args = (path, sites, hold_ms, browser_grace_ms)
        self._conn: Any = None
        self._ops: WriteOps | None = None
        self.on_exit: Any = None  # never called: a thread writer does not die on its own
        self.on_commit: Any = None  # called with the jobs of each committed transaction

    async def start(self) -> None:
        import aiosqlite

        path, sites, hold_ms, grace_ms = self.args
        self._conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await self._conn._execute(self._setup, sites, hold_ms, grace_ms)
        except BaseException:
            await self._conn.close()
            self._conn = None
            raise

    def _setup(self, sites: Mapping[str, Any], hold_ms: int, grace_ms: int) -> None:
        self._ops = WriteOps(configure(self._conn._conn), sites, hold_ms, grace_ms)
        probe_write(self._ops.conn)

    @property
    def alive(self) -> bool:
        return self._conn is not None

    @property
    def transactions(self) -> int:
        """Transactions committed so far."""
        return self._ops.transactions if self._ops is not None else 0

    def submit(self, jobs: list[tuple[str, tuple[Any, ...]]]) -> asyncio.Future[list[Any]]:
        """One group commit: its answers, in order, once committed."""
        # One hop into the connection's thread per group commit, not one per statement.
        answer = asyncio.ensure_future(self._conn._execute(self._ops.run, jobs))  # type: ignore[union-attr]
        if self.on_commit is not None:  # one batch at a time (depth 1): one transaction
            before = self.transactions
            answer.add_done_callback(
                lambda _: self.transactions > before and self.on_commit(len(jobs)))
        return answer

    async def stop(self, grace_s: float = 10) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


class ProcessWriter(WriterProcess):
    """SQLite's writer in a process of its own (``python -m server.store.sqlite_writer``)."""

    def __init__(self, path: str, sites: Mapping[str, Any], hold_ms: int, browser_grace_ms: int,
                 timeout_s: float = 10.0):
        super().__init__("server.store.sqlite_writer",
                         (path, dict(sites), hold_ms, browser_grace_ms), timeout_s)


def probe_write(conn: sqlite3.Connection) -> None:
    """One committed write, so a database that can't be written is found at start."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def check_writable(path: str) -> str | None:
    """Why the database at ``path`` can't be opened, migrated and written; None if it can.
    ``onetag serve`` asks before serving anything: a read-only file used to start, then
    answer 500 from the first write."""
    try:
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            probe_write(configure(conn))
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class Checkpointer(threading.Thread):
    """Copies the WAL into the database from a connection of its own, off the commit path.

    With SQLite's automatic checkpoint, the commit that crosses the threshold does the copy
    and every request of its batch waits for it; a passive checkpoint here takes no lock a
    commit needs, and sqlite3 releases the GIL while it runs.

    A passive pass can't copy what is committed while it runs, and SQLite starts the WAL
    over only when a write transaction begins with every frame copied; under steady load
    that never happened, and the WAL grew by every page every commit wrote (180 MB in 10 s
    of ``bench/ingest.py``). A growing file costs each commit's fsync a journal commit for
    its new size: appending 30 pages and syncing took about twice the time and CPU of
    overwriting them. So after each pass, the writer copies the few frames committed
    meanwhile itself, between two of its transactions (``catch_up``), and its next
    transaction starts the WAL over, overwriting the file's blocks.
    """

    def __init__(self, path: str, every_s: float = CHECKPOINT_EVERY_S):
        super().__init__(name="onetag-checkpointer", daemon=True)
        self.path = path
        self.every_s = every_s
        self.stopped = threading.Event()
        self.passed = threading.Event()  # a pass finished: the writer may catch up

    def catch_up(self, conn: sqlite3.Connection) -> None:
        """In the writer, between transactions, after a pass: copy the rest of the WAL."""
        if not self.passed.is_set():
            return
        self.passed.clear()
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            pass  # a full disk or a busy reader: after the next pass, again

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=1000")
        except sqlite3.Error as exc:
            print(f"onetag writer: checkpointer not started: {exc}", file=sys.stderr)
            return
        try:
            while not self.stopped.wait(self.every_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    continue  # a full disk or a busy reader: the next round tries again
                self.passed.set()
        finally:
            conn.close()




def _take(frames: list[Any], limit: int) -> tuple[list[Any], list[Any]]:
    """The first frames, up to the one whose jobs reach ``limit``; and the rest."""
    jobs = 0
    for i, (_, frame) in enumerate(frames):
        jobs += len(frame)
        if jobs >= limit:
            return frames[:i + 1], frames[i + 1:]
    return frames, []


def _reply(ops: WriteOps, frames: list[tuple[int, list[Any]]]) -> bytes:
    """Read ``frames`` (``WriteOps.read``) and apply them in one transaction; one reply per
    frame, under its id. A frame whose jobs can't be read fails alone."""
    read = _read_frames(ops, frames)
    jobs = [job for _, frame in read if frame is not None for job in frame]
    answers = ops.run_read(jobs) if jobs else []
    replies = []
    for frame_id, frame in read:
        if frame is None:
            replies.append(encode_frame(frame_id, (ops.transactions, UNREADABLE_FAILURE)))
            continue
        mine, answers = answers[:len(frame)], answers[len(frame):]
        replies.append(reply_frame(frame_id, ops.transactions, mine))
    return b"".join(replies)


def _read_frames(ops: WriteOps, frames: list[tuple[int, list[Any]]]
                 ) -> list[tuple[int, list[ReadJob] | None]]:
    """Each frame's jobs read; None for a frame whose jobs aren't ``(op, args)`` pairs."""
    read: list[tuple[int, list[ReadJob] | None]] = []
    for frame_id, frame in frames:
        try:
            read.append((frame_id, [ops.read(op, args) for op, args in frame]))
        except Exception:
            read.append((frame_id, None))
    return read


def main() -> None:
    """The writer process: set up from the first frame, then one commit per read.

    The frames waiting in the pipe go into one transaction, up to ``TRANSACTION_JOBS``
    jobs; each frame gets its own reply, under its id.
    """
    stdout, reader = child_pipes()
    frames = reader.next()
    if not frames:
        return
    setup_id, setup = frames.pop(0)
    try:
        path, sites, hold_ms, grace_ms = setup
        conn = configure(sqlite3.connect(path, isolation_level=None))
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's job
        probe_write(conn)
        ops = WriteOps(conn, sites, hold_ms, grace_ms)
    except Exception as exc:
        failure = commit_failure(exc)
        stdout.write(encode_frame(setup_id, (0, failure)))
        stdout.flush()
        return
    # What is here now lives as long as the process: out of the collector's full passes,
    # which walked these 44,000 objects each time (5-30 ms, a whole batch waiting).
    gc.freeze()
    checkpointer = Checkpointer(path)
    checkpointer.start()
    stdout.write(encode_frame(setup_id, (0, "ready")))
    stdout.flush()
    while frames or (frames := reader.next()):
        unreadable = [(i, f) for i, f in frames if f is UNREADABLE or not isinstance(f, list)]
        frames = [(i, f) for i, f in frames if f is not UNREADABLE and isinstance(f, list)]
        replies = b"".join(encode_frame(i, (ops.transactions, UNREADABLE_FAILURE))
                           for i, _ in unreadable)
        if frames:
            frames, later = _take(frames, TRANSACTION_JOBS)
            replies += _reply(ops, frames)
        else:
            later = []
        try:
            stdout.write(replies)
            stdout.flush()
        except BrokenPipeError:
            break
        checkpointer.catch_up(conn)
        frames = later + reader.waiting() if later else []
    checkpointer.stopped.set()


if __name__ == "__main__":
    main()
