"""The claim query's plan and time on PostgreSQL with 1,000,000 delivered rows.

    python bench/pg_claim_plan.py                      # 1,000,000 delivered + 20,000 pending
    python bench/pg_claim_plan.py --delivered 200000   # quicker
    python bench/pg_claim_plan.py --json

Builds a database of its own (``--dsn``; migrated as ``onetag migrate`` does) with
``generate_series``: ``--delivered`` delivered rows over four vendors (what months of
traffic leave behind) and ``--pending`` pending rows, several per visitor, due now. Then,
for the forwarder's claim (``postgres_outbox.CLAIM_ONE_VENDOR``: one vendor, ``--limit``
rows, due longest ago first, one in flight per visitor, ``FOR UPDATE SKIP LOCKED``; the
function ``onetag_claim`` of migration 022 runs it with a generic plan):

- ``EXPLAIN (ANALYZE, BUFFERS)`` of the statement the function runs, planned as the
  function plans it (``plan_cache_mode = force_generic_plan``: the plan it keeps for
  every call, whatever the parameters), in a transaction rolled back;
- the time of ``--repeat`` claims (calls of the function, as the forwarder makes them),
  each rolled back (so every one sees the same backlog): median and p90, in ms, measured
  in this client (a loopback round trip included);
- the same before the delivered rows were added (the backlog alone), to show what a million
  old rows cost a claim: the indexes it walks lead with the state, so next to nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import load_average, machine
from bench.pg_forward import DEFAULT_DSN, create_database, drop_database

VENDORS = ("esputnik", "rejoiner", "remarkety", "sendlane")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("ONETAG_BENCH_PG", DEFAULT_DSN))
    parser.add_argument("--delivered", type=int, default=1_000_000)
    parser.add_argument("--pending", type=int, default=20_000)
    parser.add_argument("--limit", type=int, default=8, help="rows a claim takes (8: a quarter "
                        "of the forwarder's 32 slots, its batch under a backlog)")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


async def build_backlog(conn: Any, pending: int, now: int) -> None:
    await conn.execute(
        "INSERT INTO events (site_id, event_id, name, source, received_ms, raw, data) "
        "SELECT 'bench', 'e' || n, 'purchase', 'backend', $1::bigint, '{}', '{}' "
        "FROM generate_series(1, 1000) AS n", now)
    # The backlog: due now, four rows per visitor per vendor (only the first is claimable),
    # planned in bursts: 100 rows share each millisecond, as one group commit's rows do.
    await conn.execute(
        "INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, state, request, "
        "attempts, next_attempt_ms, created_ms, updated_ms) "
        "SELECT 'bench', ($2::text[])[1 + n % 4], 'new-' || n, 1 + n % 1000, "
        "'v' || ((n / 4) % ($3::int / 16 + 1)), 'pending', "
        "'{\"method\": \"POST\", \"url\": \"http://127.0.0.1:9/x\", \"json\": {}}', "
        "0, $1::bigint - 60000 + n / 100, $1::bigint - 60000, $1::bigint - 60000 "
        "FROM generate_series(1, $3::int) AS n", now, list(VENDORS), pending)
    await conn.execute("VACUUM ANALYZE deliveries")


async def build_delivered(conn: Any, delivered: int, now: int) -> None:
    # Delivered long ago, over four vendors and 200,000 visitors.
    await conn.execute(
        "INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, state, request, "
        "attempts, next_attempt_ms, created_ms, updated_ms, delivered_ms) "
        "SELECT 'bench', ($2::text[])[1 + n % 4], 'old-' || n, 1 + n % 1000, 'v' || (n % 200000), "
        "'delivered', '{\"method\": \"POST\", \"url\": \"http://127.0.0.1:9/x\", \"json\": {}}', "
        "1, 0, $1::bigint - 86400000 + n, $1::bigint - 86400000 + n, $1::bigint - 86400000 + n "
        "FROM generate_series(1, $3::int) AS n", now, list(VENDORS), delivered)
    await conn.execute("VACUUM ANALYZE deliveries")


async def measure(conn: Any, sql: str, args: tuple[Any, ...], repeat: int
                  ) -> tuple[list[str], dict[str, float], int]:
    from server.store.postgres_outbox import CLAIM_ONE_VENDOR_STATEMENT

    transaction = conn.transaction()
    await transaction.start()
    # EXPLAIN of a statement with parameters plans it for their values; a PREPAREd one run
    # by EXPLAIN EXECUTE under force_generic_plan shows the generic plan (the $n stay).
    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    await conn.execute("PREPARE generic_claim (bigint, text, integer, bigint) AS "
                       + CLAIM_ONE_VENDOR_STATEMENT)
    now, vendor, limit, lease = args  # EXECUTE takes no bound parameters: literals
    plan = [row[0] for row in await conn.fetch(
        f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE generic_claim ({int(now)}, "
        f"'{vendor.replace(chr(39), chr(39) * 2)}', {int(limit)}, {int(lease)})")]
    await transaction.rollback()
    await conn.execute("DEALLOCATE generic_claim")
    times, claimed = [], 0
    for _ in range(repeat):
        transaction = conn.transaction()
        await transaction.start()
        started = time.perf_counter()
        rows = await conn.fetch(sql, *args)
        times.append((time.perf_counter() - started) * 1000)
        claimed = len(rows)
        await transaction.rollback()
    times.sort()
    return plan, {"median_ms": round(statistics.median(times), 3),
                  "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}, claimed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from server.store.postgres_outbox import CLAIM_ONE_VENDOR

    name = f"onetag_bench_claim_{uuid.uuid4().hex[:8]}"
    url = await create_database(args.dsn, name)
    try:
        conn = await asyncpg.connect(url)
        try:
            now = int(time.time() * 1000)
            sql_args = (now, "sendlane", args.limit, 60_000)
            await build_backlog(conn, args.pending, now)
            _, alone, _ = await measure(conn, CLAIM_ONE_VENDOR, sql_args, args.repeat)
            started = time.perf_counter()
            await build_delivered(conn, args.delivered, now)
            built_s = time.perf_counter() - started
            counts = dict(await conn.fetch("SELECT state, count(*) FROM deliveries GROUP BY state"))
            plan, timing, claimed = await measure(conn, CLAIM_ONE_VENDOR, sql_args, args.repeat)
            size = await conn.fetchval(
                "SELECT pg_size_pretty(pg_total_relation_size('deliveries'))")
        finally:
            await conn.close()
    finally:
        await drop_database(args.dsn, name)
    return {"machine": machine(), "load_1m": load_average(), "rows": counts,
            "build_s": round(built_s, 1), "limit": args.limit, "claimed": claimed,
            "claim": timing, "plan": plan, "table_size": size,
            "backlog_alone": {"claim": alone},
            "command": "python bench/pg_claim_plan.py" + "".join(
                f" --{k} {getattr(args, k)}" for k in ("delivered", "pending", "limit", "repeat")
                if getattr(args, k) != getattr(parse_args([]), k))}


def report_text(report: dict[str, Any]) -> str:
    lines = [f"pg_claim_plan: deliveries {report['rows']} (built in {report['build_s']} s), "
             f"load {report['load_1m']}",
             f"  claim of {report['limit']} sendlane rows (took {report['claimed']}): median "
             f"{report['claim']['median_ms']} ms, p90 {report['claim']['p90_ms']} ms "
             "(client-side, loopback round trip included, rolled back)",
             "  plan (EXPLAIN ANALYZE, BUFFERS; generic, as onetag_claim keeps it):"]
    lines += [f"    {line}" for line in report["plan"]]
    alone = report["backlog_alone"]["claim"]
    lines += [f"  the same claim before the delivered rows were added: median "
              f"{alone['median_ms']} ms, p90 {alone['p90_ms']} ms; deliveries now take "
              f"{report['table_size']} with indexes"]
    lines.append(f"  reproduce: {report['command']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
