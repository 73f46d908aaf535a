"""Forwarding throughput: drain a backlog of stored events to vendors that answer after 50 ms.

    python bench/forward.py                         # 50,000 events (~200,000 deliveries)
    python bench/forward.py --events 5000           # a quick look
    python bench/forward.py --latency 0.2 --json    # slower vendors, machine-readable

What runs, all on 127.0.0.1:

1. The fake vendor API (``tests/fakes/vendor_server.py``) in its own process, answering every
   request 200 after ``--latency`` seconds; it serves all four vendors under path prefixes.
2. Seeding, in this process, through the store's real ingest path (``SQLiteStore.ingest``:
   one writer, group commit, delivery planning in the same transaction): backend
   ``identify`` and ``purchase`` events spread over ``--visitors`` customers, each planned for
   all four vendors (Rejoiner, Remarkety, eSputnik, Sendlane), so about 4 deliveries an event.
3. Draining: ``onetag worker`` (``python -m server worker``), the real forwarder in its own
   process, with its defaults (32 in flight per vendor) and no per-vendor rate caps (real
   vendors have their own limits; this measures onetag). The backlog is there before it
   starts, as after an outage.

Figures:

- ``deliveries/s sustained`` — the fake's request rate between 10% and 90% of the backlog.
- ``drain`` — worker start to the last delivery recorded ``delivered`` in the database.
- ``RSS peak / end`` — the worker's VmHWM and VmRSS (``/proc/PID/status``) while draining.
- ``CPU`` — the worker's CPU seconds (all threads) and per delivery; the fake's, for context.
- ``check`` — every planned delivery is ``delivered`` in the database and the fake received
  exactly that many requests (no duplicates, none lost); the script exits 1 otherwise.

The target is >= 1,000 deliveries/s sustained on a 2-core machine. The script stops by
itself: ``--timeout`` (default 900 s) bounds the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench._util` and `server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import REPO, machine, process_cpu_seconds, python

TARGET_PER_S = 1000
FAKE = REPO / "tests" / "fakes" / "vendor_server.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events to seed (50000)")
    parser.add_argument("--visitors", type=int, default=10_000,
                        help="customers the events are spread over (10000)")
    parser.add_argument("--latency", type=float, default=0.05,
                        help="seconds the fake vendor waits before answering (0.05)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="in flight per vendor (default: the forwarder's default)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds the whole run may take (900)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "bench/forward.py"]
    defaults = parse_args([])
    for name in ("events", "visitors", "latency", "concurrency", "timeout"):
        value = getattr(args, name)
        if value != getattr(defaults, name):
            parts += [f"--{name}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    except OSError:
        pass
    return found


def write_config(folder: Path, port: int) -> Path:
    base = f"http://127.0.0.1:{port}"
    text = f"""
[server]
database = "sqlite:///{folder}/onetag.db"
public_url = "http://127.0.0.1:8000"
forward = false

[[sites]]
id = "bench"
origins = ["https://shop.bench.example"]
api_key = "bench-api-key-0123456789"
currency = "USD"

[sites.rejoiner]
site_id = "RJBENCH"
api_key = "rj-key"
api_base = "{base}/rejoiner"

[sites.remarkety]
store_id = "RMBENCH"
api_key = "rm-key"
webhook_url = "{base}/remarkety?storeId=RMBENCH"

[sites.esputnik]
site_id = "ESBENCH"
api_key = "es-key"
tracker_url = "{base}/esputnik"

[sites.sendlane]
integration_token = "slbenchtoken"
api_token = "sl-key"
api_base = "{base}/sendlane"
"""
    path = folder / "onetag.toml"
    path.write_text(text, encoding="utf-8")
    return path


def raw_events(count: int, visitors: int) -> list[dict[str, Any]]:
    """Per customer: an identify, then purchases; as the shop's backend sends them."""
    products = [("SKU-1", "Mug", "29.99"), ("SKU-2", "Teapot", "45.00"),
                ("SKU-3", "Tea towel", "4.35"), ("SKU-4", "Candle", "12.50")]
    events = []
    for n in range(count):
        customer = n % visitors
        email = f"customer{customer}@bench.example"
        if n < visitors:
            events.append({"event": "identify", "event_id": f"id-{n}",
                           "user": {"email": email, "customer_id": f"C{customer}",
                                    "first_name": f"Name{customer}"}})
            continue
        sku, name, price = products[n % len(products)]
        events.append({"event": "purchase", "event_id": f"order-{n}", "user": {"email": email},
                       "ecommerce": {"currency": "USD", "transaction_id": f"{n}",
                                     "value": price, "tax": "1.00",
                                     "items": [{"item_id": sku, "item_name": name,
                                                "price": price, "quantity": 1}]}})
    return events


async def seed(config_path: Path, count: int, visitors: int) -> dict[str, Any]:
    from server import config
    from server.events import Origin, normalise_batch
    from server.store.base import SessionInfo
    from server.store.sqlite import SQLiteStore

    settings = config.load(config_path, env={})
    site = settings.sites["bench"]
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    await store.open()
    started = time.perf_counter()
    try:
        events = raw_events(count, visitors)
        batches = [events[i:i + 100] for i in range(0, len(events), 100)]
        origin = Origin(site_id="bench", source="backend", currency=site.currency,
                        received_ms=int(time.time() * 1000))
        queue = list(reversed(batches))

        async def writer() -> None:
            while queue:
                raws = queue.pop()
                normalised = normalise_batch(json.loads(json.dumps(raws)), "events", origin)
                await store.ingest("bench", normalised, raws, SessionInfo())

        await asyncio.gather(*(writer() for _ in range(8)))
    finally:
        await store.close()
    seconds = time.perf_counter() - started
    with sqlite3.connect(settings.server.sqlite_path) as db:
        planned = db.execute(
            "SELECT count(*) FROM deliveries WHERE state = 'pending'").fetchone()[0]
        by_vendor = dict(db.execute("SELECT vendor, count(*) FROM deliveries GROUP BY vendor"))
    return {"events": count, "seconds": round(seconds, 2), "events_per_s": round(count / seconds),
            "deliveries": planned, "by_vendor": by_vendor}


def start_fake(latency: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([python(), str(FAKE), "--delay", str(latency)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"the fake vendor server did not start (said {line!r})")
    return proc, int(line.split()[1])


def fake_count(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as answer:
        return json.loads(answer.read())["count"]


def delivered_count(db_path: str) -> int:
    with sqlite3.connect(db_path, timeout=30) as db:
        return db.execute("SELECT count(*) FROM deliveries WHERE state = 'delivered'").fetchone()[0]


def drain(config_path: Path, folder: Path, port: int, total: int, deadline: float,
          args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ONETAG_FORWARD_RATES": "none"}
    if args.concurrency:
        env["ONETAG_FORWARD_CONCURRENCY"] = str(args.concurrency)
    db_path = str(folder / "onetag.db")
    log = open(folder / "worker.log", "wb")
    started = time.perf_counter()
    worker = subprocess.Popen([python(), "-m", "server", "worker", "--config", str(config_path),
                               "--log-level", "warning"], cwd=folder, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    timeline: list[tuple[float, int]] = []  # (seconds since start, requests the fake saw)
    peak_rss = end_rss = 0
    done_at = None
    try:
        while time.perf_counter() < deadline:
            time.sleep(0.25)
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}: "
                                   f"{(folder / 'worker.log').read_text()[-2000:]}")
            seen = fake_count(port)
            now = time.perf_counter() - started
            timeline.append((now, seen))
            status = proc_status(worker.pid)
            peak_rss = max(peak_rss, status.get("VmHWM", 0))
            end_rss = status.get("VmRSS", end_rss)
            if seen >= total and delivered_count(db_path) >= total:
                done_at = now
                break
        worker_cpu = process_cpu_seconds(worker.pid)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGINT)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
        log.close()
    return {"timeline": timeline, "done_at": done_at, "peak_rss_kb": peak_rss,
            "end_rss_kb": end_rss, "worker_cpu_s": worker_cpu}


def sustained_rate(timeline: list[tuple[float, int]], total: int) -> float | None:
    """Requests per second between 10% and 90% of the backlog (interpolated)."""
    def when(count: float) -> float | None:
        previous = (0.0, 0)
        for point in timeline:
            if point[1] >= count:
                t0, c0 = previous
                t1, c1 = point
                return t0 + (t1 - t0) * ((count - c0) / (c1 - c0) if c1 > c0 else 1.0)
            previous = point
        return None

    start, end = when(0.1 * total), when(0.9 * total)
    if start is None or end is None or end <= start:
        return None
    return 0.8 * total / (end - start)


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    deadline = time.perf_counter() + args.timeout
    fake, port = start_fake(args.latency)
    try:
        config_path = write_config(folder, port)
        seeded = asyncio.run(seed(config_path, args.events, args.visitors))
        total = seeded["deliveries"]
        drained = drain(config_path, folder, port, total, deadline, args)
        fake_cpu = process_cpu_seconds(fake.pid)
        received = fake_count(port)
    finally:
        fake.kill()
        fake.wait(10)
    db_path = folder / "onetag.db"
    with sqlite3.connect(db_path) as db:
        by_state = dict(db.execute("SELECT state, count(*) FROM deliveries GROUP BY state"))
    rate = sustained_rate(drained["timeline"], total)
    ok = (drained["done_at"] is not None and by_state.get("delivered") == total
          and received == total)
    cpu = drained["worker_cpu_s"]
    return {
        "command": reproduce_command(args),
        "machine": machine(),
        "latency_s": args.latency,
        "seed": seeded,
        "deliveries": total,
        "drain_s": None if drained["done_at"] is None else round(drained["done_at"], 2),
        "deliveries_per_s_sustained": None if rate is None else round(rate),
        "deliveries_per_s_overall": (None if drained["done_at"] is None
                                     else round(total / drained["done_at"])),
        "worker_rss_peak_mb": round(drained["peak_rss_kb"] / 1024, 1),
        "worker_rss_end_mb": round(drained["end_rss_kb"] / 1024, 1),
        "worker_cpu_s": cpu,
        "worker_cpu_ms_per_delivery": None if not cpu else round(cpu * 1000 / total, 3),
        "fake_cpu_s": fake_cpu,
        "fake_requests": received,
        "states": by_state,
        "check": "ok" if ok else "FAILED",
        "target_per_s": TARGET_PER_S,
        "target_met": bool(rate and rate >= TARGET_PER_S),
    }


def report_text(report: dict[str, Any]) -> str:
    seed = report["seed"]
    m = report["machine"]
    lines = [
        f"forward: {report['deliveries']} deliveries from {seed['events']} events, vendor "
        f"latency {report['latency_s'] * 1000:.0f} ms, {m['nproc']} cores, Python {m['python']}",
        f"  seed     {seed['seconds']} s through SQLiteStore.ingest ({seed['events_per_s']} "
        f"events/s); planned per vendor: {seed['by_vendor']}",
        f"  drain    {report['drain_s']} s   sustained {report['deliveries_per_s_sustained']} "
        f"deliveries/s (10%-90%), overall {report['deliveries_per_s_overall']}/s",
        f"  worker   RSS peak {report['worker_rss_peak_mb']} MB, end {report['worker_rss_end_mb']}"
        f" MB; CPU {report['worker_cpu_s']} s ({report['worker_cpu_ms_per_delivery']} ms a "
        f"delivery); fake vendor CPU {report['fake_cpu_s']} s",
        f"  check    {report['check']}: states {report['states']}, the fake received "
        f"{report['fake_requests']} requests",
        f"  target   >= {report['target_per_s']}/s sustained: "
        f"{'met' if report['target_met'] else 'NOT met'}",
        f"  reproduce: {report['command']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="onetag-bench-forward-"))
    try:
        report = run(args, folder)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0 if report["check"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
