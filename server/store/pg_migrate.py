"""PostgreSQL migrations: ``pg_migrations/NNN_name.sql``, applied in order, each in its own
transaction and recorded in ``schema_migrations`` as SQLite's are.

A file with the line ``-- onetag migrate: outside a transaction`` (``OUTSIDE``) is run
statement by statement outside one, for what PostgreSQL refuses inside a transaction block:
``CREATE INDEX CONCURRENTLY``, which builds an index on a big table without the SHARE lock
a plain ``CREATE INDEX`` holds for the whole build (inserts, so ingest, wait for it). Such a
file holds plain statements separated by ``;``, comments only on lines of their own (no
comment after a statement, no function bodies, no ``;`` in a literal: ``statements``, which
refuses such a file), each safe to run again, since a crash or an error between two of them
leaves the file half applied and unrecorded: ``CREATE INDEX CONCURRENTLY IF NOT EXISTS``
(an index already built, by an earlier run or by hand under the same name, is kept). A
concurrent build that failed leaves its index behind INVALID (never used, but maintained on
every insert), which IF NOT EXISTS would keep too: before the file runs again, each index it
creates that exists INVALID is dropped (``DROP INDEX CONCURRENTLY``). The file is recorded
in a transaction of its own once every statement succeeded.

Two migrators at once take turns on ``MIGRATE_LOCK``, a session-level advisory lock held
for the whole run and polled (``pg_try_advisory_lock``, one autocommitted statement at a
time) rather than waited for inside a transaction: a concurrent build waits for every
transaction that had a snapshot older than it to end, so a second migrator waiting for the
lock inside a transaction and the first one's build would wait for each other. PostgreSQL
detects that deadlock (tried on PostgreSQL 15: the waiting migrator fails with 40P01 after
``deadlock_timeout``, and the build goes on), so the second would fail instead of waiting
its turn; polled, it waits, saying after ``LOCK_SAY_AFTER_S`` whom for (``_lock``). A
lost connection does not release the lock while the server still runs the migrator's
statement (a concurrent build goes on to its end): the next migrator waits for it.

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
import sys
import time
from importlib import resources
from typing import Any

from . import compat
from .base import SchemaNotCurrent, newer_schema

# Any constant of our own: every migrator takes this session-level advisory lock, so two
# ``onetag migrate`` run at once apply each file once (the second waits, then sees it done).
MIGRATE_LOCK = 0x0_07E7A6_15
LOCK_POLL_S = 0.05
LOCK_SAY_AFTER_S = 3.0  # a wait for another migrator longer than this is said (``_lock``)

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
    """A file run outside a transaction as its statements: whole comment lines (``--`` first
    on the line) dropped, the rest split on every ``;``. That is all it knows of SQL, so such
    a file holds no comment after a statement on its line (``SELECT 1; -- a; b``), no block
    comment, no function body (``$$``) and no ``;`` inside a literal or a quoted name: a
    file with one is refused (``ValueError``, naming it) rather than split wrongly."""
    lines = re.split(r"[\n\r]", sql)  # where PostgreSQL ends a comment (not splitlines)
    text = "\n".join(line for line in lines if not line.lstrip(" \t").startswith("--"))
    for found in _TOKEN.finditer(text):
        token = found.group()
        if token[:2] in ("--", "/*") or token[0] == "$" or (
                token[0] in "'\"" and (";" in token or len(token) < 2 or token[-1] != token[0])):
            raise ValueError(
                "a migration run outside a transaction is split on ';' alone "
                f"(pg_migrate.statements), and cannot hold {text[found.start():][:40]!r}")
    return [part.strip() for part in text.split(";") if part.strip()]


# ``statements``' check: quoted literals and names (whole, or an unterminated quote to its
# end), comment starts, dollar quotes; the rest skipped.
_TOKEN = re.compile(r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|--|/\*|\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$""")


async def _lock(conn: Any, say: Any = None) -> None:
    """``MIGRATE_LOCK`` for the session, polled by single statements outside a transaction
    (module docstring). Still waiting after ``LOCK_SAY_AFTER_S``, it says so once, naming
    the holder (``holder``) through ``say`` (default: stderr, where ``onetag migrate``
    reports): a wait can be long (another migrator's concurrent index build, which a lost
    connection does not stop) and was silent."""
    started = time.monotonic()
    said = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATE_LOCK):
        if not said and time.monotonic() - started >= LOCK_SAY_AFTER_S:
            said = True
            (say or _stderr)(f"onetag migrate: waiting for another onetag migrate "
                             f"({await holder(conn)}) to finish ...")
        await asyncio.sleep(LOCK_POLL_S)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def holder(conn: Any) -> str:
    """Who holds ``MIGRATE_LOCK`` in this database: its server process's pid and what it
    runs, as far as this role may see it (``pg_stat_activity`` hides another role's query)."""
    row = await conn.fetchrow(
        "SELECT l.pid, a.application_name, a.state, left(a.query, 80) AS query "
        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 AND l.objid = $2 "
        "AND l.objsubid = 1 AND l.database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())",
        MIGRATE_LOCK >> 32, MIGRATE_LOCK & 0xFFFF_FFFF)
    if row is None:
        return "its pid not found: it may just have finished"
    said = [f"pid {row['pid']}"]
    if row["application_name"]:
        said.append(row["application_name"])
    if row["query"] and row["query"] != "<insufficient privilege>":
        said.append(f"{row['state']}: {' '.join(row['query'].split())}")
    return ", ".join(said)


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
    missing applies nothing, nor does a file outside a transaction that ``statements``
    refuses. The session holds ``MIGRATE_LOCK`` throughout: a second migrator waits, then
    finds them applied."""
    declared = {version: compat.compatible_from(name, sql)
                for version, name, sql in migrations()}
    for _, name, sql in migrations():
        if outside_transaction(sql):
            try:
                statements(sql)  # one it would split wrongly is refused before anything runs
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
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
