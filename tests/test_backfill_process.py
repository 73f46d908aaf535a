"""A 2,000-line history through real processes: ``onetag backfill --send`` killed with -9
a fifth of the way in (its writer with it), after 20 committed batches and with 80 still to
go, run again, while ``onetag worker`` sends to the fake Sendlane over HTTP. Every customer,
product, order and status change reaches Sendlane exactly once, as history
(``initial_sync``, its own past ``time``); no other vendor gets anything. (It was 10,000
lines: five times the deliveries through the fake, for nothing the kill, the resumption or
exactly-once proves more; the volume is ``bench/backfill.py``'s.) Slow: it starts onetag
processes (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fakes.harness import ALL, FORWARD_ENV, REPO, SITE, settings_data, wait_sync, write_config

START = 1_672_531_200_000  # 2023-01-01T00:00:00Z
CUSTOMERS, PRODUCTS, ORDERS, STATUSES = 200, 40, 1200, 560
LINES = CUSTOMERS + PRODUCTS + ORDERS + STATUSES  # 2,000
KILL_AFTER = LINES // 5  # lines committed (20 batches of 20) before the kill -9


def history_lines(path: Path) -> dict[tuple[str, str], int]:
    """The history file, and what Sendlane must receive: (kind, key) -> its time in s."""
    expected: dict[tuple[str, str], int] = {}
    lines = []
    minute = 60_000
    for n in range(CUSTOMERS):
        when = START + n * minute
        lines.append({"event": "identify", "time": when,
                      "user": {"email": f"c{n}@example.com", "customer_id": f"C{n}"}})
        expected[("customer-added", f"C{n}")] = when // 1000
    for n in range(PRODUCTS):
        when = START + n * minute
        lines.append({"event": "product_updated", "time": when, "ecommerce": {"items": [
            {"item_id": f"SKU-{n}", "item_name": f"Item {n}", "price": "9.99",
             "item_url": f"https://shop.example/p/{n}",
             "image_url": f"https://shop.example/i/{n}.jpg"}]}})
        expected[("product-added", f"SKU-{n}")] = when // 1000
    for n in range(ORDERS):
        when = START + n * minute
        lines.append({"event": "purchase", "time": when, "transaction_id": f"O{n}",
                      "user": {"email": f"c{n % CUSTOMERS}@example.com",
                               "customer_id": f"C{n % CUSTOMERS}"},
                      "ecommerce": {"currency": "USD", "value": "19.98", "items": [
                          {"item_id": f"SKU-{n % PRODUCTS}", "price": "9.99", "quantity": 2}]}})
        expected[("order-placed", f"O{n}:completed")] = when // 1000
        if n < STATUSES:
            lines.append({"event": "order_status", "time": when + 86_400_000,
                          "transaction_id": f"O{n}", "status": "fulfilled",
                          "user": {"customer_id": f"C{n % CUSTOMERS}"}})
            expected[("order-placed", f"O{n}:fulfilled")] = (when + 86_400_000) // 1000
    assert len(lines) == LINES == 2_000
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return expected


def onetag(*args: str, cwd: Path, log: str | None = None) -> subprocess.Popen:
    """``python -m server ARGS`` in a session of its own (so kill -9 takes its writer too);
    its output to ``log`` in ``cwd``, else to pipes."""
    out = open(cwd / log, "w") if log else subprocess.PIPE
    try:
        return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=cwd,
                                env={**os.environ, "PYTHONPATH": str(REPO), **FORWARD_ENV},
                                stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                                text=True, start_new_session=True)
    finally:
        if log:
            out.close()


def run_state(db: Path) -> tuple[int, int | None] | None:
    """(lines done, finished) of the latest run, once there is one."""
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            row = conn.execute("SELECT lines_done, finished_ms FROM backfill_runs "
                               "ORDER BY id DESC LIMIT 1").fetchone()
        except sqlite3.OperationalError:  # not migrated yet
            return None
    return row


def test_two_thousand_lines_killed_part_way_and_resumed_reach_sendlane_once(tmp_path, fake):
    expected = history_lines(tmp_path / "history.jsonl")
    config = write_config(tmp_path / "onetag.toml", settings_data(tmp_path, fake, forward=False))
    db = tmp_path / "onetag.db"
    worker = onetag("worker", "--config", str(config), "--log-level", "warning", cwd=tmp_path,
                    log="worker.log")
    try:
        first = onetag("backfill", "--config", str(config), "--site", SITE, "--send",
                       "--batch-lines", "20", "--pace", "0", "history.jsonl", cwd=tmp_path,
                       log="first.log")
        wait_sync(lambda: (state := run_state(db)) and state[0] >= KILL_AFTER
                  or first.poll() is not None,
                  timeout=300, what=f"the first run to commit {KILL_AFTER:,} lines")
        os.killpg(first.pid, signal.SIGKILL)  # kill -9: the backfill and its writer process
        first.wait(30)
        done, finished = run_state(db)
        assert first.returncode == -signal.SIGKILL and finished is None and done < LINES, (
            "the first run ended before it could be killed", first.returncode, done)

        second = onetag("backfill", "--config", str(config), "--site", SITE, "--send",
                        "--pace", "0", "history.jsonl", cwd=tmp_path)
        out, err = second.communicate(timeout=600)
        assert second.returncode == 0, err
        assert f"resumed after line {done:,}" in out, out
        assert run_state(db)[0] == LINES and run_state(db)[1] is not None

        fake.wait_until(lambda: len(fake.delivered("sendlane")) >= len(expected), timeout=600,
                        what="every line at Sendlane")
        wait_sync(lambda: not _pending(db), timeout=120, what="the outbox to empty")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)

    sent = fake.requests("sendlane")
    got: Counter = Counter()
    for request in sent:
        body = request.json
        kind = request.path.rsplit("/", 1)[1]
        key = {"customer-added": lambda: body["customer_id"],
               "product-added": lambda: body["product_id"],
               "order-placed": lambda: f"{body['order_id']}:{body['status']}"}[kind]()
        got[(kind, key)] += 1
        assert body["initial_sync"] is True, body
        assert body["time"] == expected[(kind, key)], (kind, key, body["time"])
        assert body["time"] * 1000 < time.time() * 1000
    assert not [key for key, count in got.items() if count > 1], "sent twice"
    assert set(got) == set(expected) and len(sent) == len(expected) == LINES
    assert not any(fake.requests(vendor) for vendor in ALL if vendor != "sendlane")


def _pending(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM deliveries WHERE state = 'pending'").fetchone()[0]


def test_the_backfill_bench_runs():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "backfill.py"), "--lines", "300",
                          "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["lines"] == 300
    for mode in ("dry_run", "send"):
        assert report[mode]["lines_per_s"] > 0 and report[mode]["peak_rss_mb"] > 0
    assert "300 events valid" in report["send"]["summary"]
