"""One test suite, two backends: the ``backend`` fixture runs a store test on SQLite and on
PostgreSQL.

PostgreSQL: ``$ONETAG_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
names a server where the tests may create databases. The session migrates one template
database (``onetag_test_tpl_<random>``); each test gets its own copy
(``onetag_test_<random>``, ``CREATE DATABASE ... TEMPLATE``: a file copy, not 10 migrations)
and drops it after. No server reachable: the PostgreSQL half is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from typing import Any

import pytest

from server import config

PG_ADMIN_URL = os.environ.get("ONETAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgresql"]


def _url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


async def _admin(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _pg_problem() -> str | None:
    """Why no PostgreSQL can be used here, or None."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[test]')"
    try:
        asyncio.run(_admin("SELECT 1"))
    except Exception as exc:
        return (f"no PostgreSQL reachable at {config.database_label(PG_ADMIN_URL)} "
                f"({type(exc).__name__}: {exc}); .ci/run starts the local cluster, or set "
                "$ONETAG_TEST_PG")
    return None


class Backend:
    """A store backend under test: its settings, stores, and a way to read its tables."""

    def __init__(self, name: str, database: str):
        self.name = name
        self.database = database

    def settings(self, tmp_path: Any = None, **site: Any) -> config.Settings:
        """One site ``shop1`` on this backend's database (as ``support.settings_for``)."""
        data = {"server": {"database": self.database,
                           "public_url": "https://data.shop.example", "forward": False},
                "sites": [{"id": "shop1", "origins": ["https://shop.example"],
                           "api_key": "secret-key-0123456789", **site}]}
        return config.parse(data, env={})

    def store(self, settings: config.Settings, **options: Any) -> Any:
        """A store (not opened): SQLite with its thread writer, or PostgreSQL."""
        if self.name == "sqlite":
            from server.store.sqlite import SQLiteStore

            return SQLiteStore(settings.server.sqlite_path, settings.sites, **options)
        from server.store.postgres import PostgresStore

        return PostgresStore(settings.server.database, settings.sites, **options)

    async def open(self, settings: config.Settings, **options: Any) -> Any:
        store = self.store(settings, **options)
        await store.open()
        return store

    async def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """``sql`` (``?`` placeholders) on a connection of its own, as tuples."""
        return [tuple(row) for row in await self._fetch(sql, params)]

    async def dicts(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        """``sql`` (``?`` placeholders) on a connection of its own, as dicts by column."""
        return [dict(row) for row in await self._fetch(sql, params)]

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        if self.name == "sqlite":
            import sqlite3

            with sqlite3.connect(config.sqlite_path(self.database)) as db:
                db.row_factory = sqlite3.Row
                return db.execute(sql, params).fetchall()
        import asyncpg

        counter = iter(range(1, 1000))
        sql = re.sub(r"\?", lambda _: f"${next(counter)}", sql)
        conn = await asyncpg.connect(self.database)
        try:
            return await conn.fetch(sql, *params)
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def pg_template() -> Any:
    """The migrated template database, once per session (None: no PostgreSQL, and why)."""
    problem = _pg_problem()
    if problem is not None:
        yield None, problem
        return
    from server.store.pg_migrate import migrate_url

    name = f"onetag_test_tpl_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        asyncio.run(migrate_url(_url(name)))
        yield name, None
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def pg_database(pg_template: Any) -> Any:
    """A fresh migrated PostgreSQL database for one test, dropped after it."""
    template, problem = pg_template
    if template is None:
        pytest.skip(problem)
    name = f"onetag_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {name} TEMPLATE {template}"))
    try:
        yield _url(name)
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path}/onetag.db")
    return Backend("postgresql", request.getfixturevalue("pg_database"))
