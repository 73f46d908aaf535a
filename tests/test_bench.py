"""The benchmarks still run: a short ingest run, both targets, its durability check passing.

Figures are not asserted (machines here are shared and noisy); bench/README.md says how to
read them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ingest_bench_runs_and_every_acknowledged_event_is_stored() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ingest.py"), "--json", "--conns", "4",
         "--duration", "0.5", "--warmup", "0.2", "--rounds", "2"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(run.stdout)
    rows = {row["target"]: row for row in report["results"]}
    assert set(rows) == {"baseline", "onetag"}
    assert all(row["errors"] == 0 and row["events_per_s"] > 0 for row in rows.values())
    durability = rows["onetag"]["durability"]
    assert durability["ok"] and durability["stored_events"] == durability["acked_events"] > 0
    assert len(report["round_ratios"]) == 2 and report["ratio_median"] is not None


def test_instructions_bench_driver_gets_a_204_for_every_beacon(tmp_path) -> None:
    """What callgrind wraps: the beacons through the app, the writer in its own process
    (run without valgrind here; the driver exits non-zero on any answer but 204)."""
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "instructions.py"), "--drive", "40",
         "--code", str(REPO), "--concurrency", "4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]


def test_read_body_bench_driver_reads_every_shape(tmp_path) -> None:
    """What callgrind wraps in bench/read_body.py, without valgrind: each shape's body is
    read as a batch (the driver exits non-zero when one is refused)."""
    for shape in ("bench", "checkout10", "batch5"):
        run = subprocess.run(
            [sys.executable, str(REPO / "bench" / "read_body.py"), "--drive", shape,
             "--reads", "5", "--code", str(REPO)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]


def test_console_plan_bench_asks_every_console_question(pg_template) -> None:
    """bench/pg_console_plan.py on a small table: every statement explained (the plans'
    figures are read from its output by people, not asserted)."""
    import pytest

    from backends import PG_ADMIN_URL

    if pg_template[0] is None:
        pytest.skip(pg_template[1])
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pg_console_plan.py"), "--json", "--events",
         "4000", "--dsn", PG_ADMIN_URL], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(run.stdout)
    assert report["events"] == 4000 and len(report["queries"]) > 25
    assert all(query["plan"] for query in report["queries"])


def test_pg_ingest_bench_measures_each_level_and_stores_every_acknowledged_event(pg_template) -> None:
    """bench/pg_ingest.py with two levels of concurrency, briefly: each level has its three
    targets, each node row its per-round ratios, and every acknowledged event is stored."""
    import pytest

    from backends import PG_ADMIN_URL

    if pg_template[0] is None:
        pytest.skip(pg_template[1])
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pg_ingest.py"), "--json", "--dsn", PG_ADMIN_URL,
         "--conns", "2,4", "--rounds", "1", "--duration", "0.3", "--warmup", "0.2"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(run.stdout)
    levels = [(row["conns"], row["target"]) for row in report["rows"]]
    assert levels == [(conns, target) for conns in (2, 4)
                      for target in ("baseline", "1 node", "2 nodes")]
    for row in report["rows"]:
        assert row["errors"] == 0 and row["events_per_s"] > 0
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
        if row["nodes"]:
            assert len(row["round_ratios"]) == 1 and row["ratio_median"] is not None
    assert set(report["target_met_by_conns"]) == {"2", "4"}
    assert report["target_met"] == report["target_met_by_conns"]["2"]
    durability = report["durability"]
    assert durability["ok"] and durability["acked_events"] > 0
    assert "--conns 2,4" in report["command"]
