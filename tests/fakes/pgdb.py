"""A PostgreSQL database of its own per test, on the local server (``ONETAG_TEST_PG``,
default ``postgresql://postgres@127.0.0.1:5432/postgres``): created with the store's
migrations, dropped afterwards. Tests skip, saying why, when no server answers."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import AsyncIterator

import pytest

ADMIN_URL = os.environ.get("ONETAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
MIGRATIONS = Path(__file__).resolve().parent.parent.parent / "server" / "store" / "pg_migrations"

# Until the PostgreSQL skeleton's own migration 001 is there: the outbox's tables, as the
# SQLite schema has them (what the outbox half reads and writes).
_OUTBOX_TABLES = """
CREATE TABLE identities (id bigserial PRIMARY KEY, site_id text NOT NULL, email text,
    customer_id text, first_name text, last_name text, phone text, accepts_marketing int,
    created_ms bigint NOT NULL, updated_ms bigint NOT NULL);
CREATE TABLE sessions (site_id text NOT NULL, sc text NOT NULL, identity_id bigint,
    first_ms bigint NOT NULL, last_ms bigint NOT NULL, PRIMARY KEY (site_id, sc));
CREATE TABLE events (seq bigserial PRIMARY KEY, site_id text NOT NULL, event_id text NOT NULL,
    name text NOT NULL, source text NOT NULL, sc text, identity_id bigint,
    received_ms bigint NOT NULL, raw text NOT NULL, data text NOT NULL);
CREATE TABLE deliveries (id bigserial PRIMARY KEY, site_id text NOT NULL, vendor text NOT NULL,
    dedup_key text NOT NULL, claim int NOT NULL DEFAULT 0,
    event_seq bigint NOT NULL REFERENCES events (seq), visitor text NOT NULL,
    state text NOT NULL, request text NOT NULL, attempts int NOT NULL DEFAULT 0,
    next_attempt_ms bigint NOT NULL DEFAULT 0, last_error text, created_ms bigint NOT NULL,
    updated_ms bigint NOT NULL, delivered_ms bigint, retry_from_ms bigint, request_id text,
    UNIQUE (site_id, vendor, dedup_key, claim));
CREATE INDEX deliveries_due ON deliveries (state, vendor, next_attempt_ms);
CREATE INDEX deliveries_visitor ON deliveries (site_id, vendor, visitor, state, id);
CREATE TABLE attempts (id bigserial PRIMARY KEY, delivery_id bigint NOT NULL, attempt int NOT NULL,
    started_ms bigint NOT NULL, duration_ms bigint NOT NULL, request text NOT NULL, status int,
    answer text, error text);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
CREATE INDEX attempts_started ON attempts (started_ms);
CREATE TABLE replays (id bigserial PRIMARY KEY, at_ms bigint NOT NULL, who text NOT NULL,
    filter text NOT NULL, dry_run_count int, replayed int NOT NULL, ids text);
"""


def with_database(url: str, name: str) -> str:
    return re.sub(r"/[^/?]*(\?|$)", f"/{name}\\1", url.split("://", 1)[1], count=1).join(
        [url.split("://", 1)[0] + "://", ""])


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql"))


async def apply_schema(conn) -> None:
    """Every migration in order; the outbox's tables first when there is no 001 yet."""
    files = migration_files()
    if not files or files[0].name[:3] != "001":
        await conn.execute(_OUTBOX_TABLES)
    for path in files:
        await conn.execute(path.read_text(encoding="utf-8"))


async def reachable() -> str | None:
    """None when the server answers; else why not (the skip reason)."""
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed"
    try:
        conn = await asyncpg.connect(ADMIN_URL, timeout=3)
    except Exception as exc:
        return (f"no PostgreSQL at {ADMIN_URL} ({type(exc).__name__}: {exc}); start it with "
                "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
                "or set ONETAG_TEST_PG")
    await conn.close()
    return None


@contextlib.asynccontextmanager
async def fresh_database(schema: bool = True) -> AsyncIterator[str]:
    """A new database (its URL), with the schema unless ``schema=False``; dropped after."""
    import asyncpg

    why = await reachable()
    if why:
        pytest.skip(why)
    name = f"onetag_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(ADMIN_URL, name)
    try:
        if schema:
            conn = await asyncpg.connect(url)
            try:
                await apply_schema(conn)
            finally:
                await conn.close()
        yield url
    finally:
        admin = await asyncpg.connect(ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
