"""Ingest throughput: ``POST /e`` under concurrent clients, against a bare Starlette baseline.

    python bench/ingest.py                      # 32 connections, 10 rounds of 3 s a target
    python bench/ingest.py --batch 10 --json    # 10 events a request, machine-readable

Two servers are measured in the same run, each in its own subprocess with the same uvicorn
settings (127.0.0.1, log level warning, proxy_headers, no server header):

- ``onetag``: the real server (``python -m server serve --config <tmp>/onetag.toml``) on a
  fresh SQLite file, one site ``bench`` with no vendors and the forwarder off (``--forwarder``
  turns it on), so only ingest is measured: read body, parse, validate, group-commit (WAL,
  synchronous=FULL), answer 204.
- ``baseline``: a Starlette app whose ``POST /e`` reads the body, ``json.loads`` it and
  answers 204 — the floor any Python ingest on this stack pays.

The client is one asyncio process keeping N HTTP/1.1 keep-alive connections busy (default:
a small raw-socket client; ``--client httpx`` uses httpx.AsyncClient — measurably slower, so
on a small machine it steals CPU from the server). Each request is what the browser runtime
sends: ``text/plain``, an ``Origin`` the site allows, a unique UUIDv7 ``event_id`` per event, a
``sc`` drawn from many sessions. Requests still in flight at the end are awaited, never
cut, so every 204 the client saw can be checked against ``SELECT count(*) FROM events``.

Client and server share the machine's cores; the report says how many there are and how
much CPU each side used, so a client-bound run is visible as such.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `bench` and `server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (HOST, ServerProcess, free_port, load_average, machine,
                         machine_busy_seconds, percentile, process_cpu_seconds, python,
                         thread_cpu_seconds)
from server.events import new_event_id  # the event ids the runtime makes

ORIGIN = "https://shop.bench.example"
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/126.0.0.0 Safari/537.36")
RATIO_TARGET = 0.7  # issue 10

PRODUCTS = [  # (item_id, item_name, price, category)
    ("SKU-1", "Mug", "29.99", "Kitchen"),
    ("SKU-2", "Teapot", "45.00", "Kitchen"),
    ("SKU-3", "Tea towel", "4.35", "Kitchen"),
    ("SKU-4", "Candle", "12.50", "Home"),
    ("SKU-5", "Cushion", "24.99", "Home"),
    ("SKU-6", "Notebook", "7.95", "Stationery"),
    ("SKU-7", "Fountain pen", "89.00", "Stationery"),
    ("SKU-8", "Tote bag", "15.00", "Accessories"),
]


# ---------------------------------------------------------------------------------------
# Servers


def baseline_server(port: int) -> None:
    """The bare endpoint: read the body, parse the JSON, answer 204. Same uvicorn settings."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def events(request: Request) -> Response:
        json.loads(await request.body())
        return Response(status_code=204)

    app = Starlette(routes=[Route("/e", events, methods=["POST"])])
    uvicorn.run(app, host=HOST, port=port, log_level="warning", proxy_headers=True,
                server_header=False)


def onetag_server(argv: list[str], stats_path: str) -> int:
    """``onetag <argv>`` exactly as ``python -m server`` runs it, then the store's commit count.

    The only addition is keeping a reference to the app ``create_app`` builds, so after
    uvicorn's graceful shutdown we can write ``store.commits`` (group commits) to a file.
    """
    import server.app as app_module
    from server.cli import main

    made: list[Any] = []
    real_create_app = app_module.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = real_create_app(*args, **kwargs)
        made.append(app)
        return app

    app_module.create_app = create_app
    code = main(argv)
    if made:
        store = made[0].state.store
        Path(stats_path).write_text(json.dumps({"commits": getattr(store, "commits", None)}))
    return code


def write_config(folder: Path, port: int, forwarder: bool = False) -> Path:
    db = folder / "onetag.db"
    path = folder / "onetag.toml"
    path.write_text(
        "# onetag ingest bench: one site, no vendors — ingest only.\n"
        "[server]\n"
        f'database   = "sqlite:///{db}"\n'
        f'public_url = "http://{HOST}:{port}"\n'
        'event_path = "/e"\n'
        f"forward    = {'true' if forwarder else 'false'}\n\n"
        "[[sites]]\n"
        'id       = "bench"\n'
        f'origins  = ["{ORIGIN}", "http://{HOST}:{port}"]\n'
        'currency = "USD"\n', encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# Request bodies


class Bodies:
    """Request bodies as the runtime's ``sendBeacon`` sends them: compact JSON, text/plain."""

    def __init__(self, batch: int, sessions: int, seed: int = 1):
        self.batch = batch
        self.rng = random.Random(seed)
        self.scs = [str(uuid.UUID(int=self.rng.getrandbits(128), version=4)).upper()
                    for _ in range(sessions)]
        self.templates = []
        for item_id, name, price, category in PRODUCTS:
            page = json.dumps({"location": f"{ORIGIN}/p/{item_id.lower()}",
                               "referrer": f"{ORIGIN}/c/{category.lower()}",
                               "title": f"{name} — Bench Shop"}, separators=(",", ":"),
                              ensure_ascii=False)
            ecommerce = (f'{{"currency":"USD","value":{price},"items":[{{"item_id":"{item_id}",'
                         f'"item_name":"{name}","price":{price},"quantity":1,'
                         f'"item_category":"{category}"}}]}}')
            self.templates.append(
                '{"event_id":"%s","event":"add_to_cart","time":%d,"page":' + page.replace("%", "%%")
                + ',"loaded":[],"ecommerce":' + ecommerce + "}")
        self.events_made = 0

    def make(self) -> bytes:
        now = int(time.time() * 1000)
        choice = self.rng.choice
        # Event ids as the runtime makes them: UUIDv7, led by the Unix milliseconds.
        events = ",".join(choice(self.templates) % (new_event_id(), now)
                          for _ in range(self.batch))
        self.events_made += self.batch
        return ('{"site_id":"bench","sc":"%s","events":[%s]}' % (choice(self.scs), events)
                ).encode()


# ---------------------------------------------------------------------------------------
# Clients: one coroutine per connection; each records (start, latency, status) per request.
# status 0 = the request failed at the transport level (its outcome is unknown).


@dataclass
class WorkerResult:
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        key = type(exc).__name__
        self.errors[key] = self.errors.get(key, 0) + 1


async def raw_worker(port: int, bodies: Bodies, stop_at: float, out: WorkerResult) -> None:
    """HTTP/1.1 keep-alive over asyncio streams: just enough HTTP for this server's answers."""
    head = (f"POST /e HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: text/plain;charset=UTF-8\r\nOrigin: {ORIGIN}\r\n"
            f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\nContent-Length: %d\r\n\r\n").encode()
    clock = time.perf_counter
    samples = out.samples
    reader = writer = None
    try:
        while clock() < stop_at:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            body = bodies.make()
            start = clock()
            try:
                writer.write(head % len(body) + body)
                header = await reader.readuntil(b"\r\n\r\n")
                status = int(header[9:12])
                lower = header.lower()
                at = lower.find(b"\r\ncontent-length:")
                if at >= 0:
                    end = lower.index(b"\r\n", at + 2)
                    length = int(lower[at + 17:end])
                    if length:
                        await reader.readexactly(length)
                elif b"transfer-encoding: chunked" in lower:
                    raise RuntimeError("chunked answers are not expected from /e")
                if b"\r\nconnection: close" in lower:
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, RuntimeError) as exc:
                out.error(exc)
                samples.append((start, clock() - start, 0))
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
                continue
            samples.append((start, clock() - start, status))
    finally:
        if writer is not None:
            writer.close()


async def httpx_worker(client: Any, port: int, bodies: Bodies, stop_at: float,
                       out: WorkerResult) -> None:
    import httpx

    url = f"http://{HOST}:{port}/e"
    headers = {"Content-Type": "text/plain;charset=UTF-8", "Origin": ORIGIN,
               "User-Agent": USER_AGENT, "Accept": "*/*"}
    clock = time.perf_counter
    while clock() < stop_at:
        body = bodies.make()
        start = clock()
        try:
            response = await client.post(url, content=body, headers=headers)
            status = response.status_code
        except httpx.HTTPError as exc:
            out.error(exc)
            out.samples.append((start, clock() - start, 0))
            await asyncio.sleep(0.01)
            continue
        out.samples.append((start, clock() - start, status))


@dataclass
class Slice:
    """One measured window against one target."""

    elapsed: float
    requests: int
    acked: int
    latencies: list[float]
    error_kinds: dict[str, int]
    server_cpu: float | None
    client_cpu: float
    machine_busy: float | None
    server_threads_cpu: tuple[float, float] | None
    all_requests: int
    all_acked: int
    all_unknown: int


async def drive(port: int, server_pid: int, args: argparse.Namespace, bodies: Bodies,
                on_measure: Callable[[], None] | None = None) -> Slice:
    """Warm up, measure, drain: N connections busy until the deadline, nothing cut short."""
    loop_start = time.perf_counter()
    measure_from = loop_start + args.warmup
    stop_at = measure_from + args.duration
    results = [WorkerResult() for _ in range(args.conns)]
    marks: dict[str, Any] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        if on_measure is not None:
            on_measure()
        marks[0] = (process_cpu_seconds(server_pid), time.process_time(), machine_busy_seconds(),
                    thread_cpu_seconds(server_pid))
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        marks[1] = (process_cpu_seconds(server_pid), time.process_time(), machine_busy_seconds(),
                    thread_cpu_seconds(server_pid))

    client = None
    if args.client == "httpx":
        import httpx

        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=args.conns, max_keepalive_connections=args.conns),
            timeout=httpx.Timeout(30.0), trust_env=False)
        workers = [httpx_worker(client, port, bodies, stop_at, r) for r in results]
    else:
        workers = [raw_worker(port, bodies, stop_at, r) for r in results]
    tasks = [asyncio.create_task(w) for w in workers]
    sampler = asyncio.create_task(sample_cpu())
    # Bounded: in-flight requests get up to 30 s after the deadline, then are cut.
    done, pending = await asyncio.wait(tasks, timeout=args.warmup + args.duration + 30)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await sampler
    if client is not None:
        await client.aclose()
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    samples = [s for r in results for s in r.samples]
    measured = [s for s in samples if measure_from <= s[0] < stop_at]
    last_end = max((s[0] + s[1] for s in measured), default=stop_at)
    kinds: dict[str, int] = {}
    for s in measured:
        if s[2] != 204:
            key = str(s[2]) if s[2] else "transport"
            kinds[key] = kinds.get(key, 0) + 1
    for r in results:
        for key, count in r.errors.items():
            kinds[f"exc:{key}"] = kinds.get(f"exc:{key}", 0) + count

    def delta(i: int) -> float | None:
        a, b = marks[0][i], marks[1][i]
        return None if a is None or b is None else b - a

    threads0, threads1 = marks[0][3], marks[1][3]
    threads = (None if threads0 is None or threads1 is None else
               (threads1[0] - threads0[0], threads1[1] - threads0[1]))

    return Slice(
        elapsed=max(last_end, stop_at) - measure_from,
        requests=len(measured),
        acked=sum(1 for s in measured if s[2] == 204),
        latencies=[s[1] for s in measured if s[2] == 204],
        error_kinds=kinds,
        server_cpu=delta(0), client_cpu=delta(1) or 0.0, machine_busy=delta(2),
        server_threads_cpu=threads,
        all_requests=len(samples),
        all_acked=sum(1 for s in samples if s[2] == 204),
        all_unknown=sum(1 for s in samples if s[2] == 0) + len(pending))


def summarise(target: str, slices: list[Slice], args: argparse.Namespace) -> dict[str, Any]:
    elapsed = sum(s.elapsed for s in slices)
    window = args.duration * len(slices)  # the CPU figures were sampled over the nominal window
    requests = sum(s.requests for s in slices)
    acked = sum(s.acked for s in slices)
    latencies = sorted(x for s in slices for x in s.latencies)
    kinds: dict[str, int] = {}
    for s in slices:
        for key, count in s.error_kinds.items():
            kinds[key] = kinds.get(key, 0) + count

    def cores(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else round(sum(values) / window, 2)

    server = cores([s.server_cpu for s in slices])
    client = cores([s.client_cpu for s in slices])
    busy = cores([s.machine_busy for s in slices])
    others = None if None in (server, client, busy) else round(max(0.0, busy - server - client), 2)
    # Server CPU per request: unlike throughput, barely moved by other load on the machine.
    per_request = None
    if requests and all(s.server_threads_cpu is not None for s in slices):
        main = sum(s.server_threads_cpu[0] for s in slices)  # type: ignore[index]
        rest = sum(s.server_threads_cpu[1] for s in slices)  # type: ignore[index]
        per_request = {"total": round((main + rest) / requests * 1e6, 1),
                       "event_loop_thread": round(main / requests * 1e6, 1),
                       "other_threads": round(rest / requests * 1e6, 1)}
    return {
        "target": target,
        "conns": args.conns,
        "duration_s": round(elapsed, 2),
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 1),
        "events_per_s": round(acked * args.batch / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
        "errors": requests - acked,
        "error_kinds": kinds,
        "cpu_cores": {"server": server, "client": client, "other_processes": others},
        "server_cpu_us_per_request": per_request,
        # the whole run (warm-up and drain included), for the durability check
        "all_requests": sum(s.all_requests for s in slices),
        "all_acked_requests": sum(s.all_acked for s in slices),
        "all_unknown_outcome": sum(s.all_unknown for s in slices),
    }


# ---------------------------------------------------------------------------------------
# The run: both servers up for its whole length, measured in turn, then checked


def run(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    targets = ["baseline", "onetag"] if args.target == "both" else [args.target]
    servers: dict[str, ServerProcess] = {}
    stats_path = folder / "store-stats.json"
    slices: dict[str, list[Slice]] = {t: [] for t in targets}
    profiler: dict[str, Any] | None = None
    exit_codes: dict[str, int | None] = {}
    try:
        for target in targets:
            port = free_port()
            if target == "baseline":
                argv = [python(), str(Path(__file__).resolve()), "--baseline-server", str(port)]
            else:
                config = write_config(folder, port, args.forwarder)
                serve = ["serve", "--config", str(config), "--host", HOST, "--port", str(port),
                         "--log-level", "warning"]
                argv = ([python(), "-m", "server", *serve] if args.plain_serve else
                        [python(), str(Path(__file__).resolve()), "--onetag-server",
                         str(stats_path), "--", *serve])
            servers[target] = ServerProcess(argv, port, log_path=folder / f"{target}.log").start()
        bodies = Bodies(args.batch, args.sessions)
        for round_no in range(args.rounds):
            for target in targets:
                server = servers[target]
                hook = None
                if target == "onetag" and args.py_spy and round_no == 0:
                    def hook(pid: int = server.pid) -> None:
                        nonlocal profiler
                        profiler = start_py_spy(pid, args)
                slices[target].append(asyncio.run(drive(server.port, server.pid, args, bodies, hook)))
    finally:
        for target, server in servers.items():
            exit_codes[target] = server.stop()
        if profiler is not None:
            finish_py_spy(profiler)

    results = []
    round_ratios = None
    if len(targets) == 2:  # each round measured both targets back to back
        round_ratios = [round((o.acked / o.elapsed) / (b.acked / b.elapsed), 3) if b.acked else None
                        for b, o in zip(slices["baseline"], slices["onetag"])]
    for target in targets:
        row = summarise(target, slices[target], args)
        if target == "onetag" and round_ratios is not None:
            row["round_ratios"] = round_ratios
        if target == "onetag":
            row.update(check_onetag(folder, stats_path, row, args))
            if exit_codes.get("onetag") not in (0, None):
                row["server_log_tail"] = servers["onetag"].log_tail(10)
        results.append(row)
    return results


def check_onetag(folder: Path, stats_path: Path, row: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Any]:
    """Every acknowledged event committed: 204s seen by the client vs rows in ``events``."""
    with sqlite3.connect(f"file:{folder / 'onetag.db'}?mode=ro", uri=True) as conn:
        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        stored_sessions = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
    acked_events = row["all_acked_requests"] * args.batch
    commits = json.loads(stats_path.read_text()).get("commits") if stats_path.exists() else None
    group_commit = None
    if commits:
        group_commit = {"commits": commits,
                        "requests_per_commit": round(row["all_acked_requests"] / commits, 2),
                        "events_per_commit": round(acked_events / commits, 2)}
    return {"durability": {"acked_events": acked_events, "stored_events": stored,
                           "stored_sessions": stored_sessions,
                           "unknown_outcome_requests": row["all_unknown_outcome"],
                           "ok": stored == acked_events},
            "group_commit": group_commit}


def start_py_spy(pid: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Sample the onetag server (all threads) for the measured window, if py-spy exists."""
    import shutil
    import subprocess

    exe = shutil.which("py-spy")
    if exe is None:
        print("bench: --py-spy given but py-spy is not installed (pip install py-spy); "
              "running without it", file=sys.stderr)
        return None
    out = Path(args.py_spy)
    fmt = "raw" if out.suffix in (".txt", ".folded") else "speedscope"
    cmd = [exe, "record", "--pid", str(pid), "--threads", "--rate", "250",
           "--duration", str(max(1, int(args.duration))), "--format", fmt, "--output", str(out),
           *shlex.split(args.py_spy_args)]
    return {"proc": subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)}


def finish_py_spy(profiler: dict[str, Any]) -> None:
    proc = profiler["proc"]
    try:
        _, err = proc.communicate(timeout=30)
    except Exception:
        proc.kill()
        proc.wait(5)
        err = b""
    if proc.returncode not in (0, None):
        print(f"bench: py-spy exited {proc.returncode}: {err.decode(errors='replace')[-500:]}",
              file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Report


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "bench/ingest.py", "--conns", str(args.conns), "--duration",
             f"{args.duration:g}", "--warmup", f"{args.warmup:g}", "--batch", str(args.batch),
             "--sessions", str(args.sessions), "--client", args.client]
    if args.rounds != 1:
        parts += ["--rounds", str(args.rounds)]
    if args.target != "both":
        parts += ["--target", args.target]
    if args.plain_serve:
        parts.append("--plain-serve")
    if args.forwarder:
        parts.append("--forwarder")
    return shlex.join(parts)


def report_text(report: dict[str, Any]) -> str:
    m = report["machine"]
    a = report["settings"]
    impl = ("httptools" if m.get("httptools") else "h11") + ", " + (
        "uvloop" if m.get("uvloop") else "asyncio loop")
    rounds = f", {a['rounds']} alternating rounds" if a["rounds"] > 1 else ""
    lines = [
        f"onetag ingest bench: POST /e, {a['batch']} event(s)/request, {a['conns']} connections, "
        f"{a['duration_s']:g} s a target (+{a['warmup_s']:g} s warm-up){rounds}; "
        f"client: {a['client_desc']}",
        f"machine: {m['nproc']} CPU(s), Python {m['python']}, uvicorn {m['uvicorn']} ({impl}), "
        f"starlette {m['starlette']}, {m['platform']}; load average before: "
        f"{_fmt(report['load_before'])}",
        f"note: client and server share these {m['nproc']} CPU(s). cpu columns are cores used "
        "during the measured window (1.00 = one core): srv = the server process (all threads), "
        "cli = this client, other = every other process on the machine; us/req = server CPU "
        "microseconds per request (all threads), steadier than throughput on a busy machine.",
        "",
        f"{'target':<9} {'conns':>5} {'dur s':>6} {'req/s':>8} {'events/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'errors':>6} {'srv':>5} {'cli':>5} {'other':>5} {'us/req':>6}",
    ]
    for row in report["results"]:
        cpu = row["cpu_cores"]
        lines.append(
            f"{row['target']:<9} {row['conns']:>5} {row['duration_s']:>6.1f} "
            f"{row['requests_per_s']:>8.1f} {row['events_per_s']:>8.1f} {row['p50_ms']:>7.2f} "
            f"{row['p99_ms']:>7.2f} {row['errors']:>6} {_fmt(cpu['server']):>5} "
            f"{_fmt(cpu['client']):>5} {_fmt(cpu['other_processes']):>5} "
            f"{_us(row['server_cpu_us_per_request']):>6}")
        if row["error_kinds"]:
            lines.append(f"          errors by kind: {row['error_kinds']}")
    lines.append("")
    ratio = report.get("ratio")
    if ratio is not None:
        verdict = "meets" if ratio >= RATIO_TARGET else "BELOW"
        lines.append(f"ratio onetag/baseline (events/s): {ratio:.2f} — {verdict} the "
                     f"{RATIO_TARGET} target (set for 32 connections)")
        rounds = report.get("round_ratios") or []
        if len(rounds) > 1:
            lines.append(f"ratio per round: {' '.join(f'{r:.2f}' for r in rounds if r)}; "
                         f"median {report['ratio_median']:.2f}")
    busy = [r["cpu_cores"]["other_processes"] for r in report["results"]]
    if any(b is not None and b > 0.25 for b in busy):
        lines.append("warning: other processes used a noticeable share of the CPUs during the "
                     "run; the figures (and the ratio) are less trustworthy — run again on a "
                     "quiet machine, or with --rounds 3")
    for row in report["results"]:
        per = row["server_cpu_us_per_request"]
        if per and per["other_threads"] >= 1:
            lines.append(f"{row['target']}: server CPU {per['total']:.0f} us/request = event-loop "
                         f"thread {per['event_loop_thread']:.0f} + other threads and the writer process "
                         f"{per['other_threads']:.0f}")
    for row in report["results"]:
        if row["target"] != "onetag":
            continue
        d = row["durability"]
        verdict = "OK, equal" if d["ok"] else "MISMATCH"
        lines.append(f"durability: {d['acked_events']} events acknowledged with 204 (whole run, "
                     f"warm-up included), {d['stored_events']} rows in events after stopping "
                     f"the server — {verdict}"
                     + (f"; {d['unknown_outcome_requests']} request(s) with unknown outcome"
                        if d["unknown_outcome_requests"] else ""))
        g = row["group_commit"]
        if g:
            lines.append(f"group commit: {g['commits']} commits, {g['requests_per_commit']} "
                         f"requests/commit ({g['events_per_commit']} events/commit), whole run")
        if row.get("server_log_tail"):
            lines.append("server log tail:\n" + row["server_log_tail"])
    if report.get("workdir"):
        lines.append(f"kept: {report['workdir']}")
    lines.append(f"reproduce: {report['command']}")
    return "\n".join(lines)


def _median(values: list[float | None] | None) -> float | None:
    values = sorted(v for v in values or [] if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else round((values[middle - 1] + values[middle]) / 2, 3)


def _us(per_request: dict[str, float] | None) -> str:
    return "-" if per_request is None else f"{per_request['total']:.0f}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ingest throughput of POST /e against a bare Starlette endpoint.")
    parser.add_argument("--conns", type=int, default=32, help="concurrent connections (32)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="measured seconds a target and round (3)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds before each measured window (1)")
    parser.add_argument("--batch", type=int, default=1, help="events per request (1)")
    parser.add_argument("--sessions", type=int, default=2000, help="distinct sc values (2000)")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="raw asyncio HTTP/1.1 keep-alive client (default) or httpx")
    parser.add_argument("--target", choices=["both", "onetag", "baseline"], default="both")
    parser.add_argument("--rounds", type=int, default=10,
                        help="measure the targets in turn this many times, each round "
                             "--duration a target (10); the report sums them and gives the "
                             "median of the rounds' ratios, steadier on a noisy machine")
    parser.add_argument("--forwarder", action="store_true",
                        help="run onetag's forwarder inside serve, as by default in production "
                             "(off here: no vendors, ingest only)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (config, database, server logs)")
    parser.add_argument("--plain-serve", action="store_true",
                        help="start onetag as plain `python -m server serve` (no commit count)")
    parser.add_argument("--py-spy", metavar="FILE",
                        help="profile the onetag server with py-spy during the measured window "
                             "(.txt = collapsed stacks, else speedscope JSON)")
    parser.add_argument("--py-spy-args", default="--idle --nonblocking", metavar="ARGS",
                        help="extra py-spy record flags (default: '--idle --nonblocking'; "
                             "'--gil' keeps only GIL-holding samples, '--native' adds C frames)")
    # internal: the servers' own entry points
    parser.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--onetag-server", metavar="STATS", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.conns < 1 or args.batch < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--conns and --batch must be >= 1, --duration > 0, --warmup >= 0")
    if args.batch > 500:
        parser.error("--batch is at most 500 (the server's limit per request)")
    if args.duration > 300 or not 1 <= args.rounds <= 30:
        parser.error("--duration is at most 300 s, --rounds 1 to 30")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_server:
        baseline_server(args.baseline_server)
        return 0
    if args.onetag_server:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return onetag_server(rest, args.onetag_server)

    folder = Path(tempfile.mkdtemp(prefix="onetag-bench-"))
    load_before = load_average()
    try:
        results = run(args, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    by_target = {r["target"]: r for r in results}
    ratio = None
    if "onetag" in by_target and "baseline" in by_target and by_target["baseline"]["events_per_s"]:
        ratio = round(by_target["onetag"]["events_per_s"] / by_target["baseline"]["events_per_s"], 3)
    report = {
        "settings": {"conns": args.conns, "duration_s": args.duration, "warmup_s": args.warmup,
                     "batch": args.batch, "sessions": args.sessions, "client": args.client,
                     "rounds": args.rounds, "forwarder": args.forwarder,
                     "client_desc": ("raw asyncio streams, HTTP/1.1 keep-alive"
                                     if args.client == "raw" else "httpx.AsyncClient, HTTP/1.1")},
        "machine": machine(),
        "load_before": load_before,
        "results": results,
        "ratio": ratio,
        # Each round measures baseline then onetag back to back; on a machine whose speed
        # drifts, the median of the rounds' ratios is steadier than the ratio of the sums.
        "round_ratios": by_target.get("onetag", {}).get("round_ratios"),
        "ratio_median": _median(by_target.get("onetag", {}).get("round_ratios")),
        "ratio_target": RATIO_TARGET,
        "command": reproduce_command(args),
        "workdir": str(folder) if args.keep else None,
    }
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    onetag = by_target.get("onetag")
    if onetag is not None and not onetag["durability"]["ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
