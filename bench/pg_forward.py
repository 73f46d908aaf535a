"""Forwarding on PostgreSQL with 1 and 2 workers: deliveries/s at 50 ms vendor latency.

    python bench/pg_forward.py                          # 10,000 events (~40,000 deliveries) a run
    python bench/pg_forward.py --events 4000 --json     # a quick look, machine-readable
    python bench/pg_forward.py --workers 1,2,3          # other worker counts

Per worker count, on a database of its own (``--dsn``, default the local server):

1. ``onetag migrate``'s migrations, then seeding through the store's real ingest path
   (``PostgresStore.ingest``: group commit, delivery planning in the same transaction), the
   same backend identify/purchase events as ``bench/forward.py``, about 4 deliveries each.
2. The fake vendor API (``tests/fakes/vendor_server.py --delay``) in its own process.
3. ``onetag worker`` (``python -m server worker``) N times, real processes with the
   forwarder's defaults, all draining the one backlog (claims with ``FOR UPDATE SKIP
   LOCKED``, leases, one row in flight per visitor: docs/architecture.md, "The claim
   protocol").

Figures per run: sustained deliveries/s (the fake's request rate between 10 % and 90 % of
the backlog), the workers' CPU seconds (summed) and per delivery, where the machine's CPU
went during the drain (``CpuLedger``: workers, the fake vendor, this database's PostgreSQL
backends, PostgreSQL's own processes, this script, and every other process), and the check:
every row ``delivered`` and the fake received exactly that many requests (no duplicates,
none lost). Then the 2-worker/1-worker ratio. Targets (issue 15): 2 workers >= 1.6x one,
worker CPU <= 1 ms a delivery. The machine is shared: read CPU per delivery beside the rate
(bench/README.md says how the ratio follows from the breakdown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench._util` and `server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (REPO, load_average, machine, machine_busy_seconds,
                         own_cpu_seconds, process_cpu_seconds, python)
from bench.forward import (fake_count, proc_status, raw_events, start_fake, sustained_rate,
                           write_config)

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATIO = 1.6
TARGET_CPU_MS = 1.0
# Where the machine's CPU went while a drain ran ("rest": every other process on it).
CPU_KINDS = ("workers", "fake", "postgres", "postgres_server", "bench", "rest")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("ONETAG_BENCH_PG", DEFAULT_DSN),
                        help="a PostgreSQL database to create the bench databases from")
    parser.add_argument("--events", type=int, default=10_000, help="events to seed (10000)")
    parser.add_argument("--visitors", type=int, default=2_000,
                        help="customers the events are spread over (2000)")
    parser.add_argument("--latency", type=float, default=0.05,
                        help="seconds the fake vendor waits before answering (0.05)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run (1,2)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="in flight per vendor per worker (default: the forwarder's, 32)")
    parser.add_argument("--seed", choices=["ingest", "sql"], default="ingest",
                        help="plan the backlog through PostgresStore.ingest (the default), or "
                             "insert ~4 rows an event with SQL (forwarding alone, quicker)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds the whole run may take (900)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "bench/pg_forward.py"]
    defaults = parse_args([])
    for name in ("events", "visitors", "latency", "workers", "concurrency", "seed", "timeout"):
        value = getattr(args, name)
        if value != getattr(defaults, name):
            parts += [f"--{name}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def database_url(dsn: str, name: str) -> str:
    scheme, rest = dsn.split("://", 1)
    head, _, tail = rest.partition("/")
    query = tail.partition("?")[2]
    return f"{scheme}://{head}/{name}" + (f"?{query}" if query else "")


async def create_database(dsn: str, name: str) -> str:
    import asyncpg

    from server.store import pg_migrate

    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = database_url(dsn, name)
    conn = await asyncpg.connect(url)
    try:
        await pg_migrate.migrate(conn)
    finally:
        await conn.close()
    return url


async def drop_database(dsn: str, name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def pg_config(folder: Path, port: int, url: str) -> Path:
    path = write_config(folder, port)
    text = path.read_text(encoding="utf-8")
    start = text.index('database = "')
    end = text.index("\n", start)
    path.write_text(text[:start] + f'database = "{url}"' + text[end:], encoding="utf-8")
    return path


async def seed(config_path: Path, count: int, visitors: int) -> dict[str, Any]:
    from server import config
    from server.events import Origin, normalise_batch
    from server.store.base import SessionInfo
    from server.store.postgres import PostgresStore

    settings = config.load(config_path, env={})
    site = settings.sites["bench"]
    store = PostgresStore(settings.server.database, settings.sites)
    await store.open()
    started = time.perf_counter()
    try:
        events = raw_events(count, visitors)
        queue = list(reversed([events[i:i + 100] for i in range(0, len(events), 100)]))
        origin = Origin(site_id="bench", source="backend", currency=site.currency,
                        received_ms=int(time.time() * 1000))

        async def writer() -> None:
            while queue:
                raws = queue.pop()
                normalised = normalise_batch(json.loads(json.dumps(raws)), "events", origin)
                await store.ingest("bench", normalised, raws, SessionInfo())

        await asyncio.gather(*(writer() for _ in range(8)))
        seconds = time.perf_counter() - started
        planned = await store.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE state = 'pending'")
        by_vendor = dict(await store.pool.fetch(
            "SELECT vendor, count(*) FROM deliveries GROUP BY vendor"))
        await store.pool.execute("VACUUM ANALYZE deliveries")
    finally:
        await store.close()
    return {"events": count, "seconds": round(seconds, 2), "events_per_s": round(count / seconds),
            "deliveries": planned, "by_vendor": by_vendor}


async def seed_sql(url: str, port: int, count: int, visitors: int) -> dict[str, Any]:
    """~4 pending rows an event (one per vendor), each a small JSON body to the fake, spread
    over ``visitors``: the backlog without the ingest path."""
    import asyncpg

    base = f"http://127.0.0.1:{port}"
    urls = {"esputnik": f"{base}/esputnik", "rejoiner": f"{base}/rejoiner",
            "remarkety": f"{base}/remarkety?storeId=RMBENCH", "sendlane": f"{base}/sendlane"}
    conn = await asyncpg.connect(url)
    started = time.perf_counter()
    try:
        now = int(time.time() * 1000)
        await conn.execute(
            "INSERT INTO events (site_id, event_id, name, source, received_ms, raw, data) "
            "SELECT 'bench', 'order-' || n, 'purchase', 'backend', $1::bigint, '{}', '{}' "
            "FROM generate_series(1, $2::int) AS n", now, count)
        await conn.execute(
            "INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, state, "
            "request, next_attempt_ms, created_ms, updated_ms) "
            "SELECT 'bench', v.vendor, 'orders:' || e.seq, e.seq, "
            "'email:customer' || (e.seq % $1::int), 'pending', "
            "json_build_object('method', 'POST', 'url', v.url, 'json', "
            "json_build_object('order_id', e.seq::text, 'email', "
            "'customer' || (e.seq % $1::int) || '@bench.example', 'total', '29.99'))::text, "
            "0, $2::bigint, $2::bigint FROM events e, "
            "unnest($3::text[], $4::text[]) AS v(vendor, url) ORDER BY e.seq, v.vendor",
            visitors, now, list(urls), list(urls.values()))
        await conn.execute("VACUUM ANALYZE deliveries")
        planned = await conn.fetchval("SELECT count(*) FROM deliveries")
        by_vendor = dict(await conn.fetch("SELECT vendor, count(*) FROM deliveries GROUP BY vendor"))
    finally:
        await conn.close()
    seconds = time.perf_counter() - started
    return {"events": count, "seconds": round(seconds, 2), "events_per_s": round(count / seconds),
            "deliveries": planned, "by_vendor": by_vendor}


# PostgreSQL's own processes (not a session's backend): the postmaster and its workers.
SERVER_PROCESSES = ("checkpointer", "background writer", "walwriter", "autovacuum",
                    "logical replication", "archiver", "stats collector")


def postgres_pids(database: str) -> tuple[list[int], list[int]]:
    """The PostgreSQL processes on this machine: the backends serving ``database``, and the
    server's own (postmaster, WAL writer, checkpointer, autovacuum, ...), which write what
    every backend commits."""
    backends, server = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith("postgres:") and f" {database} " in cmdline:
            backends.append(int(entry))
        elif (cmdline.startswith("postgres:") and any(name in cmdline
                                                       for name in SERVER_PROCESSES)) or (
                "/bin/postgres " in cmdline and not cmdline.startswith("postgres:")):
            server.append(int(entry))
    return backends, server


class CpuLedger:
    """CPU seconds per kind of process while a drain runs, from /proc: a process's figure is
    its last reading minus its first (processes come and go: a backend's last reading is
    kept), so only the drain's CPU is counted. One read of /proc per process (none of these
    has children), so the bench's own polling stays cheap."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}

    def read(self, kind: str, pids: list[int], own: bool = False) -> None:
        for pid in pids:
            seconds = own_cpu_seconds(pid) if not own else time.process_time()
            if seconds is None:
                continue
            self.first.setdefault((kind, pid), seconds)
            self.last[(kind, pid)] = seconds

    def seconds(self, kind: str) -> float:
        return sum(value - self.first[key] for key, value in self.last.items() if key[0] == kind)


async def count_delivered(url: str) -> tuple[int, dict[str, int]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        by_state = dict(await conn.fetch("SELECT state, count(*) FROM deliveries GROUP BY state"))
    finally:
        await conn.close()
    return by_state.get("delivered", 0), by_state


def drain(config_path: Path, folder: Path, port: int, url: str, database: str, total: int,
          workers: int, deadline: float, fake_pid: int,
          concurrency: int | None = None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ONETAG_FORWARD_RATES": "none"}
    if concurrency:
        env["ONETAG_FORWARD_CONCURRENCY"] = str(concurrency)
    ledger = CpuLedger()

    def read_all() -> None:
        """Every kind's reading but the workers' (theirs is read once, at the end)."""
        ledger.read("postgres", backends)
        ledger.read("postgres_server", server)
        ledger.read("fake", [fake_pid])
        ledger.read("bench", [os.getpid()], own=True)

    backends, server = postgres_pids(database)
    read_all()
    busy_before = machine_busy_seconds()
    logs = [open(folder / f"worker{n}.log", "wb") for n in range(workers)]
    started = time.perf_counter()
    procs = [subprocess.Popen([python(), "-m", "server", "worker", "--config", str(config_path),
                               "--log-level", "warning"], cwd=folder, env=env, stdout=log,
                              stderr=subprocess.STDOUT) for log in logs]
    timeline: list[tuple[float, int]] = []
    peak_rss = 0
    done_at = None
    ticks = 0
    try:
        while time.perf_counter() < deadline:
            time.sleep(0.25)
            for n, proc in enumerate(procs):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {n} exited with {proc.returncode}: "
                                       f"{(folder / f'worker{n}.log').read_text()[-2000:]}")
            seen = fake_count(port)
            timeline.append((time.perf_counter() - started, seen))
            peak_rss = max([peak_rss] + [proc_status(p.pid).get("VmHWM", 0) for p in procs])
            if ticks % 4 == 0:  # the workers' backends come and go: look for them each second
                backends, server = postgres_pids(database)
            ticks += 1
            ledger.read("postgres", backends)
            ledger.read("postgres_server", server)
            if seen >= total and asyncio.run(count_delivered(url))[0] >= total:
                done_at = time.perf_counter() - started
                break
        worker_cpu = sum(process_cpu_seconds(p.pid) or 0.0 for p in procs)
        backends, server = postgres_pids(database)
        read_all()
        busy_after = machine_busy_seconds()
        elapsed = time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in logs:
            log.close()
    cpu = {"workers": worker_cpu, **{kind: ledger.seconds(kind) for kind in
                                     ("fake", "postgres", "postgres_server", "bench")}}
    if busy_before is not None and busy_after is not None:
        cpu["machine"] = busy_after - busy_before
        cpu["rest"] = max(0.0, cpu["machine"] - sum(cpu[kind] for kind in CPU_KINDS[:-1]))
    busy = (None if busy_before is None or busy_after is None
            else round((busy_after - busy_before) / elapsed / (os.cpu_count() or 1), 2))
    return {"timeline": timeline, "done_at": done_at, "peak_rss_kb": peak_rss,
            "worker_cpu_s": worker_cpu, "cpu_s": cpu, "elapsed_s": elapsed,
            "machine_busy": busy}


def run_one(args: argparse.Namespace, workers: int, deadline: float) -> dict[str, Any]:
    name = f"onetag_bench_fwd_{uuid.uuid4().hex[:8]}"
    url = asyncio.run(create_database(args.dsn, name))
    fake, port = start_fake(args.latency)
    try:
        with tempfile.TemporaryDirectory(prefix="onetag-bench-pgfwd-") as tmp:
            folder = Path(tmp)
            config_path = pg_config(folder, port, url)
            seeded = asyncio.run(
                seed(config_path, args.events, args.visitors) if args.seed == "ingest"
                else seed_sql(url, port, args.events, args.visitors))
            total = seeded["deliveries"]
            drained = drain(config_path, folder, port, url, name, total, workers, deadline,
                            fake.pid, args.concurrency)
        received = fake_count(port)
        _, by_state = asyncio.run(count_delivered(url))
    finally:
        fake.kill()
        fake.wait(10)
        asyncio.run(drop_database(args.dsn, name))
    rate = sustained_rate(drained["timeline"], total)
    cpu = drained["worker_cpu_s"]
    return {
        "workers": workers,
        "seed": seeded,
        "deliveries": total,
        "drain_s": None if drained["done_at"] is None else round(drained["done_at"], 2),
        "deliveries_per_s_sustained": None if rate is None else round(rate),
        "worker_cpu_s": round(cpu, 2),
        "worker_cpu_ms_per_delivery": round(cpu * 1000 / total, 3) if total else None,
        "cpu_ms_per_delivery": {kind: round(seconds * 1000 / total, 3) if total else None
                                for kind, seconds in drained["cpu_s"].items()},
        "cpu_share": {kind: round(seconds / drained["cpu_s"]["machine"], 3)
                      for kind, seconds in drained["cpu_s"].items()
                      if kind != "machine" and drained["cpu_s"].get("machine")},
        "worker_rss_peak_mb": round(drained["peak_rss_kb"] / 1024, 1),
        "machine_busy": drained["machine_busy"],
        "fake_requests": received,
        "states": by_state,
        "check": ("ok" if drained["done_at"] is not None and by_state.get("delivered") == total
                  and received == total else "FAILED"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + args.timeout
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    runs = [run_one(args, n, deadline) for n in counts]
    by_count = {r["workers"]: r for r in runs}
    ratio = None
    if 1 in by_count and 2 in by_count:
        one, two = (by_count[n]["deliveries_per_s_sustained"] for n in (1, 2))
        ratio = round(two / one, 3) if one and two else None  # judged unrounded: 1.595 is not 1.6
    cpu = [r["worker_cpu_ms_per_delivery"] for r in runs if r["worker_cpu_ms_per_delivery"]]
    return {"command": reproduce_command(args), "machine": machine(), "load_1m": load_average(),
            "seed": args.seed,
            "latency_s": args.latency, "runs": runs, "ratio_2_to_1": ratio,
            "target_ratio_met": bool(ratio and ratio >= TARGET_RATIO),
            "target_cpu_met": bool(cpu and max(cpu) <= TARGET_CPU_MS),
            "check": "ok" if all(r["check"] == "ok" for r in runs) else "FAILED"}


def report_text(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"pg_forward: vendor latency {report['latency_s'] * 1000:.0f} ms, {m['nproc']} "
             f"cores, load {report['load_1m']}, Python {m['python']}"]
    for r in report["runs"]:
        seed = r["seed"]
        lines += [
            f"  {r['workers']} worker(s): {r['deliveries']} deliveries from {seed['events']} events "
            f"(seeded at {seed['events_per_s']} events/s, {report['seed']})",
            f"    sustained {r['deliveries_per_s_sustained']} deliveries/s (10%-90%), drain "
            f"{r['drain_s']} s",
            f"    worker CPU {r['worker_cpu_s']} s = {r['worker_cpu_ms_per_delivery']} ms a "
            f"delivery; worker RSS peak {r['worker_rss_peak_mb']} MB; the machine's cores were "
            f"{r['machine_busy']} busy (all processes, 1.0 = every core)",
            "    CPU a delivery (share of the machine's busy time): " + ", ".join(
                f"{kind} {r['cpu_ms_per_delivery'].get(kind)} ms "
                f"({100 * r['cpu_share'].get(kind, 0):.0f} %)" for kind in CPU_KINDS),
            f"    check {r['check']}: {r['states']}, the fake received {r['fake_requests']}"]
    lines += [f"  2 workers / 1 worker: {report['ratio_2_to_1']} (target >= {TARGET_RATIO}: "
              f"{'met' if report['target_ratio_met'] else 'NOT met'}); worker CPU <= "
              f"{TARGET_CPU_MS} ms a delivery: {'met' if report['target_cpu_met'] else 'NOT met'}",
              f"  reproduce: {report['command']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0 if report["check"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
