"""PostgreSQL migrations: ``pg_migrations/NNN_name.sql``, applied in order, each in its own
transaction and recorded in ``schema_migrations`` as SQLite's are.

Not applied by ``onetag serve`` or ``worker`` at start (several of them may start at once
against one database, and a schema change is the operator's step): they ``check`` and
refuse to run on a schema that is not current; ``onetag migrate`` applies what is pending.
"""

from __future__ import annotations

import functools
import time
from importlib import resources
from typing import Any

from .base import SchemaNotCurrent, newer_schema

# Any constant of our own: every migrator takes this transaction-level advisory lock, so two
# ``onetag migrate`` run at once apply each file once (the second waits, then sees it done).
MIGRATE_LOCK = 0x0_07E7A6_15


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


async def check(conn: Any) -> None:
    """``SchemaNotCurrent`` naming what is missing, and the command that applies it."""
    missing = await pending(conn)
    if missing:
        raise SchemaNotCurrent(
            f"the PostgreSQL schema is not current: {len(missing)} migration(s) not applied "
            f"({', '.join(missing)}); run `onetag migrate --config <file>` first")
    done = await applied(conn)
    newer = [done[version] for version in sorted(set(done) - set(known_versions()))]
    if newer:
        raise SchemaNotCurrent(newer_schema(newer))


@functools.cache
def known_versions() -> tuple[int, ...]:
    """The versions this code has (read once: the health check sends them every time)."""
    return tuple(version for version, _, _ in migrations())


async def migrate(conn: Any) -> list[str]:
    """Apply the pending migrations, each in a transaction with its record; their names."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute(_TABLE)
    made = []
    for version, name, sql in migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1",
                                   version):
                continue
            await conn.execute(sql)  # several statements: the simple query protocol
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                               version, name, int(time.time() * 1000))
        made.append(name)
    return made


def create_hint(role: str) -> str:
    """What lets ``role`` create onetag's tables (README "Running on PostgreSQL", step 2)."""
    return (f"since PostgreSQL 15 only the database's owner may create in schema public: "
            f"make {role} the database's owner (ALTER DATABASE ... OWNER TO {role}), or, in "
            f"that database, GRANT CREATE ON SCHEMA public TO {role};")


async def migrate_url(dsn: str) -> list[str]:
    """``migrate`` over a connection of its own to ``dsn`` (``onetag migrate``). A role that
    may not create in ``public`` gets the error with ``create_hint`` appended (``hint``):
    "permission denied for schema public" alone left the fix to be looked up."""
    import asyncpg

    from . import application_name

    conn = await asyncpg.connect(
        dsn, server_settings={"application_name": application_name()})
    try:
        return await migrate(conn)
    except asyncpg.InsufficientPrivilegeError as exc:
        if "schema public" in str(exc):
            exc.hint = create_hint(await conn.fetchval("SELECT current_user"))
        raise
    finally:
        await conn.close()
