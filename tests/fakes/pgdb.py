"""A PostgreSQL database of its own per test, on the local server (``ONETAG_TEST_PG``,
default ``postgresql://postgres@127.0.0.1:5432/postgres``): created with the store's
migrations, dropped afterwards. Tests skip, saying why, when no server answers."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import AsyncIterator

import pytest

ADMIN_URL = os.environ.get("ONETAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

def with_database(url: str, name: str) -> str:
    return re.sub(r"/[^/?]*(\?|$)", f"/{name}\\1", url.split("://", 1)[1], count=1).join(
        [url.split("://", 1)[0] + "://", ""])


async def apply_schema(conn) -> None:
    """Every migration, as ``onetag migrate`` applies them (recorded: the store checks)."""
    from server.store import pg_migrate

    await pg_migrate.migrate(conn)


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
