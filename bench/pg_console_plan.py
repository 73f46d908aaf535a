"""The operator console's queries on PostgreSQL against a realistic table: their plans and times.

    python bench/pg_console_plan.py                   # 400,000 events, 160,000 deliveries
    python bench/pg_console_plan.py --events 100000   # quicker
    python bench/pg_console_plan.py --json
    python bench/pg_console_plan.py --plan "WITH timed"   # and that statement's whole plan

Builds a database of its own (``--dsn``; migrated as ``onetag migrate`` does) with
``generate_series``: ``--events`` events (~700 bytes of JSON each; sessions of 8 events in a
row, one event in 10 a backend purchase), identities, sessions, four deliveries per order
(one in 50 dead) and an attempt for each, labelled with its delivery's site and vendor as
the forwarder writes it (migration 026), spread over 30 days. Then asks every console page's
questions through ``PgConsole`` (the console's own code), records each statement, and prints
for each its ``EXPLAIN ANALYZE`` time and whether its plan reads a big table whole
(``Seq Scan``): only the reconciliation of an unbounded range may (SQLite's plans are the
same); every other query uses an index, a seq range or an id range (the Vendors page's
settled counts: the latest 200,000 deliveries; its latency series: the range's attempts,
through attempts_started). Below 200,000 deliveries the settled counts' id range is the
whole table, and PostgreSQL reads it with a Seq Scan; that is the window, not a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import load_average, machine
from bench.pg_forward import DEFAULT_DSN, create_database, drop_database

DAY = 86_400_000
PAD = "x" * 400  # an event's JSON is ~700 bytes: items, page, identity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("ONETAG_BENCH_PG", DEFAULT_DSN))
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plan", metavar="TEXT", default="",
                        help="also print the whole plan of each statement containing TEXT")
    return parser.parse_args(argv)


async def build(conn: Any, events: int, now: int) -> None:
    sessions = events // 8
    identities = max(1, sessions // 3)
    await conn.execute(
        "INSERT INTO identities (id, site_id, email, created_ms, updated_ms) "
        "SELECT n, 'shop1', 'c' || n || '@example.com', $1::bigint, $1::bigint "
        "FROM generate_series(1, $2::int) AS n", now - 30 * DAY, identities)
    await conn.execute(
        "INSERT INTO sessions (id, site_id, sc, identity_id, first_ms, last_ms, first_seq, "
        "last_seq) SELECT n, 'shop1', upper(md5(n::text)::uuid::text), "
        "CASE WHEN n % 2 = 0 THEN 1 + n % $3::int END, $1::bigint, $1::bigint, "
        "(n - 1) * 8 + 1, n * 8 FROM generate_series(1, $2::int) AS n",
        now - 30 * DAY, sessions, identities)
    await conn.execute(
        "INSERT INTO events (seq, site_id, event_id, name, source, sc, identity_id, "
        "received_ms, raw, data) SELECT n, 'shop1', 'ev-' || n, "
        "CASE WHEN n % 10 = 0 THEN 'purchase' WHEN n % 3 = 0 THEN 'add_to_cart' "
        "ELSE 'page_view' END, CASE WHEN n % 10 = 0 THEN 'backend' ELSE 'browser' END, "
        "CASE WHEN n % 10 = 0 THEN NULL ELSE s.sc END, s.identity_id, "
        "$1::bigint + n::bigint * (30::bigint * 86400000 / $2::int), '{}', "
        "json_build_object('page', json_build_object('location', "
        "'https://shop.example/p/' || n), 'ecommerce', json_build_object("
        "'transaction_id', CASE WHEN n % 10 = 0 THEN 'T' || n END, 'currency', 'USD', "
        "'value_minor', 2999, 'items', json_build_array(json_build_object('item_id', "
        "'SKU-' || n % 500, 'price_minor', 2999, 'quantity', 1))), 'pad', $3::text)::text "
        "FROM generate_series(1, $2::int) AS n JOIN sessions s ON s.id = (n - 1) / 8 + 1",
        now - 30 * DAY, events, PAD)
    await conn.execute(
        "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
        "request, attempts, next_attempt_ms, last_error, created_ms, updated_ms) "
        "SELECT 'shop1', v.vendor, v.key || 'T' || e.seq, 0, e.seq, 'email:c@example.com', "
        "CASE WHEN e.seq % 500 = 0 THEN 'dead' ELSE 'delivered' END, '{}', 1, 0, "
        "CASE WHEN e.seq % 500 = 0 THEN 'HTTP 500: boom' END, e.received_ms, e.received_ms "
        "FROM events e CROSS JOIN (VALUES ('rejoiner', 'convert:'), ('remarkety', "
        "'orders/create:'), ('esputnik', 'PurchasedItems:'), ('sendlane', 'order-placed:')) "
        "AS v(vendor, key) WHERE e.name = 'purchase'")
    await conn.execute(
        "INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request, status, "
        "answer, site_id, vendor) SELECT id, 1, created_ms + 50, 40 + id % 300, '{}', "
        "CASE WHEN state = 'dead' THEN 500 ELSE 200 END, "
        "'{\"headers\": {}, \"body\": \"ok\", \"truncated\": false}', site_id, vendor "
        "FROM deliveries")
    for table in ("identities", "sessions", "events", "deliveries", "attempts"):
        await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', "
                           f"'{'seq' if table == 'events' else 'id'}'), "
                           f"(SELECT max({'seq' if table == 'events' else 'id'}) FROM {table}))")
    await conn.execute("ANALYZE")


async def questions(reads: Any, now: int, sites: Any) -> None:
    """What the console's pages ask, as they ask it."""
    from server.store.deadletters import ReplayFilter

    found = await reads.search(["shop1"], "c7@example.com")
    assert found["events"], "the bench's customer has events"
    sc = (await reads.rows("SELECT sc FROM sessions WHERE id = 14"))[0]["sc"]
    await reads.search(["shop1"], sc)
    await reads.search(["shop1"], "T" + str((await reads.latest_seq()) // 10 * 10 - 1000))
    await reads.search(["shop1"], "ev-12345")
    await reads.last_from_origin("shop1", "https://shop.example", window=50_000)
    top = await reads.latest_seq()
    await reads.tail_events(top - 200, top, reads.live_filter(["shop1"]), 100)
    await reads.tail_events(top - 200, top, reads.live_filter(["shop1"], name="purchase",
                                                             email="c7@example.com"), 100)
    await reads.recent_events(reads.live_filter(["shop1"], source="backend"), 50,
                              before_seq=top + 1)
    await reads.seqs_between(top - 200, top, 20_000)
    await reads.event(top)
    await reads.delivery(1)
    await reads.vendor_overview(now, "24h")
    await reads.vendor_overview(now, "30d")
    await reads.dead_letters(ReplayFilter(("dead",)), 50)
    await reads.dead_letters(ReplayFilter(("dead",), vendor="sendlane", error="500"), 50)
    await reads.recent_replays(10)
    # Two days: within the 20,000 orders a reconcile takes, even at 1,000,000 events.
    await reads.reconcile(sites, now - 2 * DAY, now + 1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from server.store.pg_console import PgConsole, numbered

    name = f"onetag_bench_console_{uuid.uuid4().hex[:8]}"
    url = await create_database(args.dsn, name)
    now = int(time.time() * 1000)
    try:
        conn = await asyncpg.connect(url)
        try:
            started = time.perf_counter()
            await build(conn, args.events, now)
            built_s = time.perf_counter() - started
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            reads = PgConsole(pool)
            asked: list[tuple[str, list[Any]]] = []
            ask = reads.rows

            async def traced(sql: str, params: Any = ()) -> list[dict[str, Any]]:
                asked.append((sql, list(params)))
                return await ask(sql, params)

            reads.rows = traced  # type: ignore[method-assign]
            from types import SimpleNamespace

            route = SimpleNamespace(route=lambda name: "on")
            sites = {"shop1": SimpleNamespace(id="shop1", vendors={
                v: route for v in ("rejoiner", "remarkety", "esputnik", "sendlane")})}
            await questions(reads, now, sites)
            reads.rows = ask  # type: ignore[method-assign]
            plans = []
            async with pool.acquire() as conn:
                seen = set()
                for sql, params in asked:
                    if sql in seen:
                        continue
                    seen.add(sql)
                    lines = [row[0] for row in await conn.fetch(
                        "EXPLAIN (ANALYZE, BUFFERS) " + numbered(sql), *params)]
                    took = next((float(line.split()[2]) for line in lines
                                 if line.startswith("Execution Time")), 0.0)
                    scans = sorted({line.split("Seq Scan on ")[1].split()[0] for line in lines
                                    if "Seq Scan on" in line})
                    plans.append({"sql": " ".join(sql.split())[:150], "ms": took,
                                  "seq_scans": scans, "plan": lines[0].strip()[:100],
                                  **({"lines": lines} if args.plan and args.plan in sql
                                     else {})})
        finally:
            await pool.close()
    finally:
        await drop_database(args.dsn, name)
    return {"events": args.events, "build_s": round(built_s, 1), "queries": plans,
            "load_average": load_average(), "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['events']:,} events (built in {result['build_s']} s); "
          f"{len(result['queries'])} distinct statements:")
    for item in sorted(result["queries"], key=lambda item: -item["ms"]):
        scans = f"  SEQ SCAN: {', '.join(item['seq_scans'])}" if item["seq_scans"] else ""
        print(f"{item['ms']:9.2f} ms  {item['sql'][:110]}{scans}")
    for item in result["queries"]:
        if "lines" in item:
            print("\n" + item["sql"] + "\n" + "\n".join(item["lines"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
