"""PostgreSQL store: many ``onetag serve`` nodes and ``onetag worker`` processes, one database.

Each node group-commits its own ingest through a writer, as SQLite does: the requests that
arrive in one turn of the writer's event loop are applied together in one transaction and
committed once with ``synchronous_commit = on``, and only then answered
(``pg_writer.PgWriteOps``). ``onetag serve`` runs that writer in a process of its own, fed
the browser bodies as received (``writer="process"``); tools and tests run it in this
process (``writer="inline"``). Either way the server's side — frames, backpressure,
supervision and replacement of a writer that dies or hangs — is ``WriterSupervisor``, the
one SQLite uses. Nodes never share memory: what two nodes do to one visitor is ordered by
the database's row locks (``pg_ingest`` says which, in which order), and a transaction that
loses a race (a deadlock, a unique key another node took first) is run again from the start.

The rules are the SQLite store's (``store/rules.py``, ``outbox.plan``); the outbox half
(claims, outcomes, replays) is ``postgres_outbox.PostgresOutbox``; the reads, the catalog,
the coupons bridge and backfills use this process's own pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping, Sequence

from ..envelope import Problem
from ..jsontext import loads
from ..sessions import cart_snapshot
from . import compat, pg_migrate
from .base import Store, StoreUnavailable
from .pg_writer import (InlineWriter, PgProcessWriter, PgWriteOps, RETRIES, RETRYABLE,
                        create_pool, is_database_failure, sqlstate, stored_json, unavailable)
from .postgres_outbox import PostgresOutbox
from .rules import identity_fields
from .writer_supervisor import (DEFAULT_MAX_PENDING_BYTES, DEFAULT_MAX_PENDING_WRITES,
                                DEFAULT_WRITER_TIMEOUT_S, WriterSupervisor)

log = logging.getLogger("onetag.store")

POOL_SIZE = 8  # this process's own pool: reads, the outbox, backfills (and inline ingest)
WRITERS = ("process", "inline")


class PostgresStore(WriterSupervisor, PostgresOutbox, Store):
    """``Store`` on PostgreSQL through an asyncpg pool (``self.pool``), ingest through a
    writer (``pg_writer``)."""

    def __init__(self, dsn: str, sites: Mapping[str, Any], hold_ms: int = 7 * 86_400_000,
                 browser_grace_ms: int = 0, writer: str = "inline",
                 writer_timeout_s: float = DEFAULT_WRITER_TIMEOUT_S,
                 max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
                 pool_size: int = POOL_SIZE, check_schema: bool = True):
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {', '.join(WRITERS)}, not {writer!r}")
        self.dsn = dsn
        self.sites = sites
        self.hold_ms = hold_ms
        self.browser_grace_ms = browser_grace_ms
        self.writer_kind = writer
        self.writer_timeout_s = writer_timeout_s
        self.max_pending_writes = max_pending_writes
        self.max_pending_bytes = max_pending_bytes
        self.pool_size = pool_size
        self.check_schema = check_schema
        self.pool: Any = None
        self._init_supervisor()

    # Life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, then start the writer; ``pg_migrate.SchemaNotCurrent`` when the schema
        lacks migrations (the nodes never migrate by themselves: ``onetag migrate`` does)."""
        self._closing = False
        self.pool = await create_pool(self.dsn, self.pool_size)
        try:
            if self.check_schema:
                async with self.pool.acquire() as conn:
                    compat.say_newer(log, await pg_migrate.check(conn))
            self._writer = await self._start_writer()
        except BaseException:
            await self.pool.close()
            self.pool = None
            raise

    def _new_writer(self) -> PgProcessWriter | InlineWriter:
        if self.writer_kind == "process":
            return PgProcessWriter(self.dsn, self.sites, self.hold_ms, self.browser_grace_ms,
                                   self.writer_timeout_s)
        return InlineWriter(PgWriteOps(self.dsn, self.sites, self.hold_ms,
                                       self.browser_grace_ms, pool=self.pool))

    async def migrate(self) -> list[str]:
        """Apply the pending migrations (``onetag migrate``); their names."""
        async with self.pool.acquire() as conn:
            return await pg_migrate.migrate(conn)

    async def close(self, grace_s: float = 10) -> None:
        """Batches already sent to the writer are committed and answered (within
        ``grace_s``); requests still waiting fail with 503."""
        await self._stop_writer(grace_s)
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), grace_s)
            except asyncio.TimeoutError:
                pool.terminate()

    def _stored_json(self, raws: Sequence[Any]) -> list[bytes] | Problem:
        return stored_json(raws)

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
            items, currency, guid, cart_id = (fields.pop(f"cart_{k}", None)
                                              for k in ("items", "currency", "guid", "id"))
            fields.pop("cart_updated_ms", None)
            cart = (cart_snapshot(loads(items), currency, guid, cart_id) if items is not None
                    else None)
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

    # A shopper's data (store/person.py) --------------------------------------------------

    async def person(self, who: Any) -> Any:
        """In one read-only snapshot (REPEATABLE READ) on this node's pool."""
        from . import person

        async def run(conn: Any) -> Any:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await person.run_async(person.gather(person.POSTGRESQL, who),
                                              person.asyncpg_execute(conn))
        return await self._on_pool(run)

    async def forget_person(self, who: Any, dry_run: bool = True) -> dict[str, Any]:
        """One transaction: the person's sessions and identities locked as ingest locks them
        (``person.gather(lock=True)``) before their events are read, then erased. One that
        loses a race with ingest (a deadlock, or an event naming the identity committed
        meanwhile: a foreign key) is run again from the start."""
        from . import person

        if dry_run:  # one read-only snapshot: a dry run locks nothing
            return person.forget_report(await self.person(who), True, None)

        async def run(conn: Any) -> dict[str, Any]:
            for attempt in range(RETRIES):
                try:
                    async with conn.transaction():
                        execute = person.asyncpg_execute(conn)
                        found = await person.run_async(
                            person.gather(person.POSTGRESQL, who, lock=True), execute)
                        done = await person.run_async(
                            person.erase(person.POSTGRESQL, found, int(time.time() * 1000)),
                            execute)
                        return person.forget_report(found, False, done)
                except Exception as exc:
                    if sqlstate(exc) not in (*RETRYABLE, "23503") or attempt == RETRIES - 1:
                        raise
                    await asyncio.sleep(0.01 * (attempt + 1))
            raise AssertionError("unreachable")
        return await self._on_pool(run)

    def console(self) -> Any:
        """The console's queries on this node's pool (``pg_console.py``)."""
        from .pg_console import PgConsole

        if self.pool is None:
            raise StoreUnavailable("database", "the store is not open")
        return PgConsole(self.pool)

    # The console's logouts (pg_migrations/032) -----------------------------------------

    async def revoke_session(self, nonce: str, expires_ms: int, now_ms: int) -> None:
        """On this node's pool, committed before it returns: every node reads it there."""
        from .sqlite_writer import CONSOLE_LOGOUT_PRUNE_SQL, CONSOLE_LOGOUT_SQL

        if self.pool is None:
            raise StoreUnavailable("database", "the store is not open")
        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute(CONSOLE_LOGOUT_SQL.format(nonce="$1", expires="$2"),
                                       nonce, int(expires_ms))
                    await conn.execute(CONSOLE_LOGOUT_PRUNE_SQL.format(now="$1"), int(now_ms))
        except Exception as exc:
            if is_database_failure(exc):
                raise unavailable(exc) from None
            raise

    async def session_revoked(self, nonce: str) -> bool:
        if self.pool is None:
            raise StoreUnavailable("database", "the store is not open")
        try:
            return await self.pool.fetchval(
                "SELECT true FROM console_logouts WHERE nonce = $1", nonce) is not None
        except Exception as exc:
            if is_database_failure(exc):
                raise unavailable(exc) from None
            raise

    # Wrong guesses of a secret (pg_migrations/035) ----------------------------------------

    async def guess_failed(self, scope: str, address: str, now_ms: int, window_ms: int,
                           earlier_ms: Sequence[int] = ()) -> list[int]:
        """On this node's pool (not the writer's queue), committed before it returns: every
        node reads it there. The callers' ``GuessBudget`` keeps it to a few connections."""
        from .sqlite_writer import GUESS_PRUNE_SQL, GUESS_READ_SQL, GUESS_SQL

        async def run(conn: Any) -> list[int]:
            async with conn.transaction():
                await conn.executemany(GUESS_SQL.format(scope="$1", address="$2", at="$3"),
                                       [(scope, address, int(at))
                                        for at in (*earlier_ms, now_ms)])
                await conn.execute(GUESS_PRUNE_SQL.format(scope="$1", before="$2"),
                                   scope, int(now_ms) - int(window_ms))
                rows = await conn.fetch(GUESS_READ_SQL.format(scope="$1", address="$2",
                                                              since="$3"),
                                        scope, address, int(now_ms) - int(window_ms))
            return [row[0] for row in rows]
        return await self._on_pool(run)

    async def guess_failures(self, scope: str, address: str, since_ms: int) -> list[int]:
        from .sqlite_writer import GUESS_READ_SQL

        async def run(conn: Any) -> list[int]:
            rows = await conn.fetch(GUESS_READ_SQL.format(scope="$1", address="$2", since="$3"),
                                    scope, address, int(since_ms))
            return [row[0] for row in rows]
        return await self._on_pool(run)

    async def guesses_cleared(self, scope: str, address: str) -> None:
        from .sqlite_writer import GUESS_CLEAR_SQL

        async def run(conn: Any) -> None:
            await conn.execute(GUESS_CLEAR_SQL.format(scope="$1", address="$2"), scope, address)
        await self._on_pool(run)

    async def _on_pool(self, run: Any) -> Any:
        """``run(conn)`` on a connection of this node's pool; a database that fails is
        ``StoreUnavailable``."""
        if self.pool is None:
            raise StoreUnavailable("database", "the store is not open")
        try:
            async with self.pool.acquire() as conn:
                return await run(conn)
        except Exception as exc:
            if is_database_failure(exc):
                raise unavailable(exc) from None
            raise

    # The Remarkety Coupons bridge (server/coupons.py) -----------------------------------

    async def record_coupon_call(self, call: Mapping[str, Any]) -> int:
        from .sqlite_writer import COUPON_CALL_COLUMNS as columns

        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                f"INSERT INTO coupon_calls ({', '.join(columns)}) VALUES ({marks}) RETURNING id",
                *(call.get(column) for column in columns))

    async def prune_coupon_calls(self, before_ms: int, limit: int) -> int:
        from .sqlite_writer import COUPON_PRUNE_SQL

        async with self.pool.acquire() as conn:
            status = await conn.execute(COUPON_PRUNE_SQL.format(limit="$1", before="$2"),
                                        limit, before_ms)
        return int(status.split()[-1])

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

    async def known_orders(self, wanted: Sequence[tuple[str, str, str]]) -> Any:
        """``pg_ingest.load_orders`` in a transaction of its own: the keys' advisory locks
        make a purchase another node is committing wait to be read, as in ingest."""
        from .pg_ingest import load_orders

        async def run(conn: Any) -> Any:
            async with conn.transaction():
                return await load_orders(conn, list(wanted))

        return await self._on_pool(run)

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
                if sqlstate(exc) not in RETRYABLE or attempt > RETRIES:
                    if is_database_failure(exc):
                        raise unavailable(exc) from None
                    raise
                await asyncio.sleep(0.005 * attempt)
