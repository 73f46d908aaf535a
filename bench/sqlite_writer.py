"""The SQLite writer alone: ``WriteOps`` fed group commits of browser bodies, no HTTP.

What a writer process does with its frames, in this bench's own process: each transaction
is ``--per`` ``ingest_browser`` jobs (``ingest.py``'s bodies, read, applied, committed with
``synchronous=FULL``), then the ``Checkpointer``'s catch-up, as ``sqlite_writer.main`` runs
them; the checkpointer thread copies the WAL once a second. Per round, on a fresh database:
transactions and requests a second, a transaction's wall time (p50, p99), CPU a request of
this process (the writer and the checkpointer thread) and the kernel's part of it (writes,
fsyncs),
and the WAL's size at the end.

    python bench/sqlite_writer.py                 # 13 requests a transaction, 2 rounds of 5 s
    python bench/sqlite_writer.py --per 16 --batch 2 --json
    python bench/sqlite_writer.py --instructions  # callgrind: instructions a request (~2 min)

``--instructions`` counts what the machine's load can't move: the writer's instructions a
request under callgrind (300 transactions, minus the same run without them; no
checkpointer thread, whose work follows the wall clock). Kernel work (page writes, fsync)
is not an instruction: the timed rounds show it.

CPU a request moves far less with the machine's load than throughput does: to judge a
change, run the base (exported with ``git archive``, this script copied in) and the change
back to back, twice each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import ORIGIN, Bodies, write_config  # noqa: E402
from server import config  # noqa: E402
from server.envelope import BrowserFacts  # noqa: E402
from server.store.sqlite import SQLiteStore  # noqa: E402
from server.store.sqlite_writer import Checkpointer, WriteOps, configure  # noqa: E402


def one_round(per: int, seconds: float, batch: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="onetag-writer-bench-"))
    settings = config.load(write_config(folder, 8999))
    path = settings.server.sqlite_path
    conn = configure(sqlite3.connect(path, isolation_level=None))
    conn.execute("PRAGMA wal_autocheckpoint=0")  # as the writer process: the checkpointer's job
    ops = WriteOps(conn, dict(settings.sites), 0, 0)
    bodies = Bodies(batch, 2000)

    def jobs() -> list:
        facts = BrowserFacts(ORIGIN, None, "bench/sqlite_writer", int(time.time() * 1000))
        return [("ingest_browser", (bodies.make(), facts, f"r{i}")) for i in range(per)]

    for _ in range(50):  # imports, caches, the first pages
        ops.run(jobs())
    checkpointer = Checkpointer(path)
    checkpointer.start()
    work = [jobs() for _ in range(int(seconds * 20_000 / per) + 1)]  # more than can be done
    walls = []
    usage, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    end = started + seconds
    for frame in work:
        if time.perf_counter() >= end:
            break
        before = time.perf_counter()
        ops.run(frame)
        walls.append(time.perf_counter() - before)
        checkpointer.catch_up(conn)
    elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    checkpointer.stopped.set()
    checkpointer.join()
    wal = os.path.getsize(path + "-wal")
    conn.close()
    walls.sort()
    n = len(walls)
    return {"transactions_per_s": n / elapsed, "requests_per_s": n * per / elapsed,
            "tx_p50_ms": walls[n // 2] * 1000, "tx_p99_ms": walls[int(n * 0.99)] * 1000,
            "cpu_us_per_request": (user + system) / (n * per) * 1e6,
            "kernel_us_per_request": system / (n * per) * 1e6, "wal_mib": wal / 2**20}


def transactions(count: int, per: int, batch: int) -> None:
    """``count`` transactions after a warm-up, nothing timed: what callgrind counts."""
    import random

    folder = Path(tempfile.mkdtemp(prefix="onetag-writer-bench-"))
    settings = config.load(write_config(folder, 8999))
    conn = configure(sqlite3.connect(settings.server.sqlite_path, isolation_level=None))
    conn.execute("PRAGMA wal_autocheckpoint=0")
    ops = WriteOps(conn, dict(settings.sites), 0, 0)
    random.seed(1)
    bodies = Bodies(batch, 2000)
    plain = getattr(SQLiteStore, "plain_facts", False)

    def jobs() -> list:
        facts = BrowserFacts(ORIGIN, None, "bench/sqlite_writer", int(time.time() * 1000))
        facts = tuple(facts) if plain else facts  # as the store sends them
        return [("ingest_browser", (bodies.make(), facts, f"r{i}")) for i in range(per)]

    for _ in range(60):
        ops.run(jobs())
    work = [jobs() for _ in range(300)]  # made in both runs alike
    gc.freeze()  # collections walk what is here in proportion to what else was imported
    answers = [ops.run(frame) for frame in work[:count]]
    if any(not isinstance(a, tuple) for frame in answers for a in frame):
        raise SystemExit(f"a request was not stored: {answers[0][:2]}")


def instructions(per: int, batch: int) -> float:
    import re
    import subprocess

    counts = []
    for count in (0, 300):
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             __file__, "--transactions", str(count), "--per", str(per), "--batch", str(batch)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or found is None:
            raise SystemExit(f"callgrind run failed:\n{run.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (300 * per)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per", type=int, default=13, help="requests a transaction (13: "
                        "ingest.py's group commits at 32 connections)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds a round (5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each on a fresh file (2)")
    parser.add_argument("--batch", type=int, default=1, help="events a request (1)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions a request under callgrind instead of timed rounds")
    parser.add_argument("--transactions", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.transactions is not None:  # inside callgrind
        transactions(args.transactions, args.per, args.batch)
        return 0
    if args.instructions:
        count = instructions(args.per, args.batch)
        print(f"writer: {count:,.0f} instructions a request ({args.per} a transaction)",
              file=sys.stderr)
        if args.json:
            print(json.dumps({"instructions_per_request": count}))
        return 0
    rounds = []
    for i in range(args.rounds):
        figures = one_round(args.per, args.seconds, args.batch)
        rounds.append(figures)
        print(f"round {i + 1}: {figures['requests_per_s']:7.0f} req/s "
              f"({figures['transactions_per_s']:.0f} tx/s), tx p50 {figures['tx_p50_ms']:.2f} ms "
              f"p99 {figures['tx_p99_ms']:.2f} ms, CPU {figures['cpu_us_per_request']:.1f} us a "
              f"request ({figures['kernel_us_per_request']:.1f} in the kernel), WAL {figures['wal_mib']:.1f} MiB", file=sys.stderr)
    cpu = statistics.median(r["cpu_us_per_request"] for r in rounds)
    print(f"median CPU a request: {cpu:.1f} us", file=sys.stderr)
    print("reproduce: python bench/sqlite_writer.py " + " ".join(sys.argv[1:]), file=sys.stderr)
    if args.json:
        print(json.dumps({"rounds": rounds, "cpu_us_per_request": cpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
