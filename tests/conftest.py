"""Marks the slow groups, so ``pytest -m "not slow"`` is the quick loop.

Slow: real Chromium (tests/browser/), building and installing a wheel, and tests that run
``onetag`` as processes of its own (the CLI, fault injection, benchmarks' smoke runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import backend, pg_database, pg_template  # noqa: F401 (fixtures: tests/backends.py)
from fakes.vendor_server import FakeVendors

SLOW_FILES = {"test_packaging.py", "test_cli.py", "test_cli_deliveries.py", "test_faults.py",
              "test_bench.py", "test_bench_poison.py", "test_reply_alignment.py",
              "test_trust.py", "test_coupons_cli.py", "test_metrics_serve.py",
              "test_backfill_process.py", "test_pg_multinode.py",
              "test_admin_serve.py", "test_cli_mistakes.py", "test_cli_startup.py",
              "test_split_secrets.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if "browser" in path.parts or path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def fake():
    """The fake vendor server (real HTTP on loopback; records requests, fails on demand)."""
    with FakeVendors() as server:
        yield server
