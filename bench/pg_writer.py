"""The PostgreSQL writer alone: ``PgWriteOps`` driven in this process, CPU a request.

    python bench/pg_writer.py                  # 32 submitters, 3 rounds of 4 s
    python bench/pg_writer.py --profile 20     # and cProfile's top 20 (cumulative)

No HTTP, no node: ``--conns`` coroutines each submit one ``ingest_browser`` job (a body
as ``bench/ingest.py`` makes them: one ``add_to_cart`` event) and submit the next once it
is answered, as a node's writer process is fed. Figures a request: this process's CPU
(reading bodies, the rules, asyncpg) and the database's backends' CPU (from /proc),
transactions and requests a transaction. For judging a change to ``pg_writer`` or
``pg_ingest`` on a noisy machine: CPU a request moves less than throughput does; run
the base and the change back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import HOST, process_cpu_seconds
from bench.ingest import ORIGIN, Bodies, write_config
from bench.pg_forward import create_database, drop_database, postgres_pids
from bench.pg_ingest import load_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = load_parser(__doc__)
    parser.set_defaults(duration=4.0, rounds=3)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile the rounds (CPU time); print the top N functions")
    return parser.parse_args(argv)


async def measure(args: argparse.Namespace, url: str, database: str) -> None:
    from server import config
    from server.envelope import BrowserFacts
    from server.store.pg_writer import PgWriteOps

    with tempfile.TemporaryDirectory(prefix="onetag-bench-pgwriter-") as tmp:
        sites = config.load(write_config(Path(tmp), 1)).sites
    ops = PgWriteOps(url, sites, 3_600_000, 5000)
    await ops.open()
    bodies = Bodies(args.batch, args.sessions)
    answered = [0]

    async def submitter(stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            facts = BrowserFacts(ORIGIN, None, "bench", int(time.time() * 1000))
            (answer,) = await ops.submit([("ingest_browser", (bodies.make(), facts,
                                                              uuid.uuid4().hex))])
            if not isinstance(answer, tuple):
                raise SystemExit(f"not stored: {answer!r}")
            answered[0] += 1

    profile = cProfile.Profile(time.process_time) if args.profile else None  # CPU, not wall
    try:
        await asyncio.gather(*(submitter(time.perf_counter() + args.warmup)
                               for _ in range(args.conns)))  # warm-up
        for round_ in range(args.rounds):
            answered[0], commits = 0, ops.commits
            pids = postgres_pids(database)[0]  # the backends serving it
            pg0 = sum(process_cpu_seconds(pid) or 0.0 for pid in pids)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profile:
                profile.enable()
            await asyncio.gather(*(submitter(wall0 + args.duration)
                                   for _ in range(args.conns)))
            if profile:
                profile.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            pg = sum(process_cpu_seconds(pid) or 0.0 for pid in pids) - pg0
            n = max(1, answered[0])
            transactions = max(1, ops.commits - commits)
            print(f"  round {round_ + 1}: {answered[0] / wall:8.1f} requests/s; CPU a request: "
                  f"writer {cpu * 1e3 / n:.3f} ms, PostgreSQL {pg * 1e3 / n:.3f} ms, "
                  f"sum {(cpu + pg) * 1e3 / n:.3f} ms; {transactions} transactions, "
                  f"{answered[0] / transactions:.1f} requests each", flush=True)
    finally:
        await ops.close()
    print("  ways: " + ", ".join(f"{way} {count}" for way, count in sorted(ops.paths.items())))
    if profile:
        out = io.StringIO()
        order = os.environ.get("PG_WRITER_SORT", "cumulative")
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(args.profile)
        print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = f"onetag_bench_writer_{uuid.uuid4().hex[:8]}"
    url = asyncio.run(create_database(args.dsn, name))
    print(f"pg_writer: PgWriteOps alone, {args.conns} submitters, {args.batch} add_to_cart "
          f"a request (host {HOST}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    try:
        asyncio.run(measure(args, url, name))
    finally:
        asyncio.run(drop_database(args.dsn, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
