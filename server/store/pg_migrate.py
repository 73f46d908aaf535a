"""PostgreSQL migrations: ``pg_migrations/NNN_name.sql``, applied in order, each in its own
transaction and recorded in ``schema_migrations`` as SQLite's are.

A file with the line ``-- onetag migrate: outside a transaction`` (``OUTSIDE``) is run
statement by statement outside one, for what PostgreSQL refuses inside a transaction block:
``CREATE INDEX CONCURRENTLY``, which builds an index on a big table without the SHARE lock
a plain ``CREATE INDEX`` holds for the whole build (inserts, so ingest, wait for it). Such a
file holds plain statements separated by ``;`` (no function bodies, no ``;`` in a literal:
``statements``), each safe to run again, since a crash or an error between two of them
leaves the file half applied and unrecorded: ``CREATE INDEX CONCURRENTLY IF NOT EXISTS``
(an index already built, by an earlier run or by hand under the same name, is kept). A
concurrent build that failed leaves its index behind INVALID (never used, but maintained on
every insert), which IF NOT EXISTS would keep too: before the file runs again, each index it
creates that exists INVALID is dropped (``DROP INDEX CONCURRENTLY``). The file is recorded
in a transaction of its own once every statement succeeded.

Two migrators at once take turns on ``MIGRATE_LOCK``, a session-level advisory lock held
for the whole run and polled (``pg_try_advisory_lock``, one autocommitted statement at a
time) rather than waited for inside a transaction: a concurrent build waits for every
transaction that had a snapshot older than it to end, and a second migrator's transaction
left open while it waits for the lock would never end, an undetected deadlock.

Not applied by ``onetag serve`` or ``worker`` at start (several of them may start at once
against one database, and a schema change is the operator's step): they ``check`` and
refuse to run on a schema that is not current; ``onetag migrate`` applies what is pending.
A newer release's migrations are run on when each is recorded compatible with this code
(``compat.py``: a rolling upgrade), refused otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from importlib import resources
from typing import Any

from . import compat
from .base import SchemaNotCurrent, newer_schema

# Any constant of our own: every migrator takes this session-level advisory lock, so two
# ``onetag migrate`` run at once apply each file once (the second waits, then sees it done).
MIGRATE_LOCK = 0x0_07E7A6_15
LOCK_POLL_S = 0.05

# A migration file run outside a transaction (module docstring): a comment line of its own.
OUTSIDE = re.compile(r"^--\s*onetag migrate:\s*outside a transaction\s*$", re.MULTILINE)
# The indexes such a file builds concurrently: only IF NOT EXISTS, so a re-run skips one built.
CONCURRENT_INDEX = re.compile(
    r"\bCREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+([a-z_][a-z0-9_]*)\b",
    re.IGNORECASE)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in ``pg_migrations/``, in order."""
    found = []
    for entry in (resources.files(__package__) / "pg_migrations").iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.name,
                          entry.read_text(encoding="utf-8")))
    return sorted(found)


_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
          "name TEXT NOT NULL, applied_ms BIGINT NOT NULL)")


async def applied(conn: Any) -> dict[int, str]:
    """The versions this database has, with their names ({} when it has none)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    return {row[0]: row[1] for row in await conn.fetch(
        "SELECT version, name FROM schema_migrations")}


async def pending(conn: Any) -> list[str]:
    """The names of the migrations not applied yet."""
    done = await applied(conn)
    return [name for version, name, _ in migrations() if version not in done]


async def check(conn: Any) -> list[str]:
    """``SchemaNotCurrent`` naming what is missing, and the command that applies it; or
    naming the migrations this code does not know that it does not run with
    (``compat.sort_unknown``). Else the ones it runs with (a newer release's compatible
    migrations: [] when none)."""
    missing = await pending(conn)
    if missing:
        raise SchemaNotCurrent(
            f"the PostgreSQL schema is not current: {len(missing)} migration(s) not applied "
            f"({', '.join(missing)}); run `onetag migrate --config <file>` first")
    # Every migration this code has is applied: compatible_from (040) is there.
    unknown = compat.sort_unknown(await conn.fetch(
        "SELECT version, name, compatible_from FROM schema_migrations"), known_versions())
    if unknown.refused:
        raise SchemaNotCurrent(newer_schema(unknown.refused))
    return unknown.tolerated


async def plan(conn: Any) -> compat.Plan:
    """What ``migrate`` would apply, with each file's declaration (``migrate --check``)."""
    return compat.plan(await applied(conn), migrations(), await _declared(conn))


async def _declared(conn: Any) -> bool:
    """Whether ``schema_migrations`` records declarations yet (migration 040)."""
    return bool(await conn.fetchval(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'schema_migrations' AND column_name = 'compatible_from'"))


@functools.cache
def known_versions() -> tuple[int, ...]:
    """The versions this code has (read once: the health check sends them every time)."""
    return tuple(version for version, _, _ in migrations())


def outside_transaction(sql: str) -> bool:
    """Whether a migration file is run outside a transaction (``OUTSIDE``)."""
    return OUTSIDE.search(sql) is not None


def statements(sql: str) -> list[str]:
    """A file run outside a transaction as its statements: comment lines dropped, split on
    ``;`` (such a file holds no function body and no ``;`` in a literal)."""
    lines = re.split(r"[\n\r]", sql)  # where PostgreSQL ends a comment (not splitlines)
    text = "\n".join(line for line in lines if not line.lstrip(" \t").startswith("--"))
    return [part.strip() for part in text.split(";") if part.strip()]


async def _lock(conn: Any) -> None:
    """``MIGRATE_LOCK`` for the session, polled by single statements outside a transaction
    (module docstring)."""
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATE_LOCK):
        await asyncio.sleep(LOCK_POLL_S)


async def _unlock(conn: Any) -> None:
    if not conn.is_closed():
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)


async def _recorded(conn: Any, version: int) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1",
                                    version))


async def _record(conn: Any, version: int, name: str, declared: int) -> None:
    if await _declared(conn):
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_ms, "
            "compatible_from) VALUES ($1, $2, $3, $4)",
            version, name, int(time.time() * 1000), declared)
    else:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_ms) "
            "VALUES ($1, $2, $3)", version, name, int(time.time() * 1000))


async def _apply_outside(conn: Any, version: int, name: str, sql: str, declared: int) -> None:
    """One file run outside a transaction (module docstring)."""
    for index in (found.lower() for found in CONCURRENT_INDEX.findall(sql)):
        # An interrupted or failed concurrent build's leftover: built again below.
        if await conn.fetchval("SELECT NOT i.indisvalid FROM pg_index i "
                               "WHERE i.indexrelid = to_regclass($1)", index):
            await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{index}"')
    for statement in statements(sql):
        await conn.execute(statement)
    async with conn.transaction():
        await _record(conn, version, name, declared)


async def migrate(conn: Any) -> list[str]:
    """Apply the pending migrations, each in a transaction with its record (and its
    declaration, once migration 040 made the column), or outside one for a file that says
    so (``_apply_outside``); their names. Every file's declaration is read first: one
    missing applies nothing. The session holds ``MIGRATE_LOCK`` throughout: a second
    migrator waits, then finds them applied."""
    declared = {version: compat.compatible_from(name, sql)
                for version, name, sql in migrations()}
    await _lock(conn)
    try:
        async with conn.transaction():
            await conn.execute(_TABLE)
        made = []
        for version, name, sql in migrations():
            if await _recorded(conn, version):
                continue
            if outside_transaction(sql):
                await _apply_outside(conn, version, name, sql, declared[version])
            else:
                async with conn.transaction():
                    await conn.execute(sql)  # several statements: the simple query protocol
                    await _record(conn, version, name, declared[version])
            made.append(name)
        async with conn.transaction():
            # The rows a release without the column wrote get their files' declarations.
            await conn.execute(
                "UPDATE schema_migrations s SET compatible_from = f.floor "
                "FROM unnest($1::int[], $2::text[], $3::int[]) AS f(version, name, floor) "
                "WHERE s.version = f.version AND s.name = f.name "
                "AND s.compatible_from IS NULL",
                [version for version, _, _ in migrations()],
                [name for _, name, _ in migrations()],
                [declared[version] for version, _, _ in migrations()])
        return made
    finally:
        await _unlock(conn)


def create_hint(role: str) -> str:
    """What lets ``role`` create onetag's tables (docs/postgresql.md, step 2)."""
    return (f"since PostgreSQL 15 only the database's owner may create in schema public: "
            f"make {role} the database's owner (ALTER DATABASE ... OWNER TO {role}), or, in "
            f"that database, GRANT CREATE ON SCHEMA public TO {role};")


async def migrate_url(dsn: str, check_only: bool = False,
                      said: Any = None) -> list[str] | compat.Plan:
    """``migrate`` over a connection of its own to ``dsn`` (``onetag migrate``), after
    ``said(plan)`` (the plan printed before anything is applied); with ``check_only`` the
    ``plan`` alone. A role that may not create in ``public`` gets the error with
    ``create_hint`` appended (``hint``): "permission denied for schema public" alone left
    the fix to be looked up."""
    import asyncpg

    from . import application_name

    conn = await asyncpg.connect(
        dsn, server_settings={"application_name": application_name()})
    try:
        if check_only or said is not None:
            found = await plan(conn)
            if check_only:
                return found
            said(found)
        return await migrate(conn)
    except asyncpg.InsufficientPrivilegeError as exc:
        if "schema public" in str(exc):
            exc.hint = create_hint(await conn.fetchval("SELECT current_user"))
        raise
    finally:
        await conn.close()
