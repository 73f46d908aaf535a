"""A rolling upgrade on PostgreSQL with real ``onetag serve`` processes: a newer release
migrates the database while a node of this one runs (docs/postgresql.md,
"Upgrading"). Its compatible migration leaves the node in rotation, taking events, and saying
once that a restart is due; a breaking one takes it out (/healthz 503) and a node starting
on it refuses to. Real processes, real PostgreSQL, a database of its own."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import asyncpg
import httpx
import pytest
from fakes.harness import (API_KEY, REPO, SITE, FORWARD_ENV, free_port, healthz, purchase,
                           server_process, settings_data, write_config)
from fakes.vendor_server import FakeVendors

pytestmark = pytest.mark.slow


def health_answer(port: int) -> tuple[int, dict]:
    """/healthz's status and JSON, whatever the status."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


async def migrated_by_a_newer_release(url: str, version: int, floor: int) -> None:
    """A newer release's ``onetag migrate``: an expand-only change and its record."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE TABLE future_{version} (id BIGINT PRIMARY KEY)")
        await conn.execute("ALTER TABLE events ADD COLUMN IF NOT EXISTS future_note TEXT")
        await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, 0, $3)",
                           version, f"{version}_future.sql", floor)
    finally:
        await conn.close()


async def test_a_node_stays_in_rotation_through_a_compatible_migration_only(
        tmp_path, pg_database) -> None:
    with FakeVendors() as fake:
        data = settings_data(tmp_path, fake, forward=False)
        data["server"]["database"] = pg_database
        config = write_config(tmp_path / "onetag.toml", data)
        env = {**os.environ, "PYTHONPATH": str(REPO), **FORWARD_ENV}
        port = free_port()
        log = tmp_path / "node.log"
        with server_process(config, port, env, log=log):
            await migrated_by_a_newer_release(pg_database, 999, 0)
            for _ in range(3):  # health checks after it: still 200
                assert healthz(f"http://127.0.0.1:{port}") is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                answer = await client.post(f"/api/v1/sites/{SITE}/events",
                                           json=[purchase("5001")],
                                           headers={"Authorization": f"Bearer {API_KEY}"})
            assert answer.status_code == 202, answer.text
            # A second node starts on it (start-up check) and serves as well.
            other = free_port()
            with server_process(config, other, env, log=tmp_path / "other.log"):
                assert healthz(f"http://127.0.0.1:{other}") is not None
            # Then a breaking one: out of rotation, saying which and what to do.
            await migrated_by_a_newer_release(pg_database, 1000, 1000)
            deadline = time.monotonic() + 10
            while (status := health_answer(port))[0] == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert status[0] == 503, status
            assert "1000_future.sql" in status[1]["message"], status
            assert "999_future.sql" not in status[1]["message"], status
            # A node starting now refuses to, naming it (exit 2, one line, no traceback).
            started = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "server", "serve", "--config",
                                 str(config), "--port", str(free_port())],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            assert started.returncode == 2, started.stderr
            assert "1000_future.sql" in started.stderr and "Traceback" not in started.stderr
        said = log.read_text()  # said once, however many health checks
        assert said.count("(999_future.sql), each declared compatible with it") == 1, said
        assert "restart it on that release" in said, said
    conn = await asyncpg.connect(pg_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await conn.close()
