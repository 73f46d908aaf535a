"""Instructions per ``POST /e``, counted by callgrind: a figure the machine's load can't move.

Throughput on this shared two-core machine drifts by 10-20 % between runs an hour apart, so
``ingest.py``'s ratio can't tell a 3 % regression from the weather. Instructions executed
can: callgrind counts them exactly (the same binary, inputs and environment give the same
count whatever else the machine is doing). This script drives N browser beacons (the
``add_to_cart`` bodies of ``ingest.py``) through the app's ASGI interface in-process, 32 at a
time, with the writer in its own process as ``onetag serve`` runs it, under
``valgrind --tool=callgrind --trace-children=yes``, once with N requests and once with none;
the difference over N is the cost of one request, for the server process and the writer
process separately. With ``--base REV`` it measures that revision too (exported with
``git archive`` into a temporary folder) and reports the ratio.

    python bench/instructions.py                    # this checkout, 2,000 requests (~2 min)
    python bench/instructions.py --base 1d7ab8c     # and a revision to compare with (~4 min)

What it leaves out: uvicorn's HTTP parsing and the socket work (the same for every revision,
and what ``ingest.py`` measures), and the disk (fsync is not an instruction). Needs valgrind
(Debian's ``valgrind`` package).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One beacon at a time by default: each is its own frame and transaction, so the count
# doesn't depend on how requests happened to group (with 32 at a time, how many share a
# frame follows the machine's timing, and the server's count moved by 10 %).
CONCURRENCY = 1
_COLLECTED = re.compile(r"==(\d+)== Collected : (\d+)")


# ---------------------------------------------------------------------------------------
# The driver: runs inside callgrind, with the measured code first on sys.path.


async def drive(requests: int, concurrency: int = CONCURRENCY) -> None:
    from bench.ingest import ORIGIN, Bodies, write_config
    from server import config
    from server.app import create_app

    folder = Path(tempfile.mkdtemp(prefix="onetag-instr-"))
    try:
        app = create_app(config.load(write_config(folder, 8999)))
        bodies = Bodies(1, 2000)
        async with app.router.lifespan_context(app):
            for _ in range(20):  # imports and caches warm in both runs alike
                await _beacon(app, bodies.make(), ORIGIN)
            done = 0
            while done < requests:
                wave = min(concurrency, requests - done)
                await asyncio.gather(*(_beacon(app, bodies.make(), ORIGIN) for _ in range(wave)))
                done += wave
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _beacon(app, body: bytes, origin: str) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/e", "raw_path": b"/e",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8999),
             "headers": [(b"host", b"127.0.0.1:8999"), (b"origin", origin.encode()),
                         (b"content-type", b"text/plain;charset=UTF-8"),
                         (b"content-length", str(len(body)).encode()),
                         (b"user-agent", b"bench/instructions")]}
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # no disconnect while the answer is written

    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [204]:
        raise SystemExit(f"a beacon was answered {statuses}, not 204")


# ---------------------------------------------------------------------------------------
# The measurement: callgrind around the driver, for one code tree.


def count(code: Path, requests: int, concurrency: int) -> dict[str, int]:
    """Instructions of the server process and of all its children (the writer)."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": f"{code}{os.pathsep}{REPO}",
           "ONETAG_WRITER": "process", "ONETAG_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory(prefix="onetag-cg-") as out:
        command = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                   f"--callgrind-out-file={out}/cg.%p", sys.executable, __file__,
                   "--drive", str(requests), "--code", str(code),
                   "--concurrency", str(concurrency)]
        # Run from an empty folder: before ``-P``, a writer started with ``-m`` from this
        # checkout's root would import this checkout's writer instead of the measured one.
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=out)
        _, stderr = run.communicate()
    if run.returncode != 0:
        raise SystemExit(f"callgrind run failed ({run.returncode}):\n{stderr[-3000:]}")
    totals = {int(pid): int(n) for pid, n in _COLLECTED.findall(stderr)}
    server = totals.pop(run.pid, None)
    if server is None:
        raise SystemExit("callgrind reported nothing for the server process:\n" + stderr[-2000:])
    return {"server": server, "writer": sum(totals.values())}


def per_request(code: Path, requests: int, concurrency: int, label: str) -> dict[str, float]:
    started = time.monotonic()
    idle = count(code, 0, concurrency)
    busy = count(code, requests, concurrency)
    figures = {part: (busy[part] - idle[part]) / requests for part in ("server", "writer")}
    figures["total"] = figures["server"] + figures["writer"]
    print(f"  {label:<10} server {figures['server']:>10,.0f}   writer {figures['writer']:>10,.0f}"
          f"   total {figures['total']:>10,.0f} instructions a request "
          f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    return figures


def export(revision: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="beacons measured (2000)")
    parser.add_argument("--base", help="a git revision to measure beside this checkout")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help="beacons in flight at once (1: repeatable; more: group commit "
                             "as under load, but the count then follows the timing)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:  # inside callgrind
        sys.path[:0] = [args.code, str(REPO)]
        asyncio.run(drive(args.drive, args.concurrency))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
    print(f"callgrind: {args.requests} beacons of one add_to_cart event, {args.concurrency} at a time",
          file=sys.stderr)
    report: dict[str, object] = {"requests": args.requests,
                                 "command": " ".join(["python", "bench/instructions.py",
                                                      *sys.argv[1:]])}
    report["head"] = per_request(REPO, args.requests, args.concurrency, "this tree")
    if args.base:
        with tempfile.TemporaryDirectory(prefix="onetag-base-") as folder:
            export(args.base, Path(folder))
            report["base"] = per_request(Path(folder), args.requests, args.concurrency,
                                         args.base[:10])
        ratio = report["head"]["total"] / report["base"]["total"]
        report["ratio"] = ratio
        print(f"  this tree / {args.base}: {ratio:.3f} of the instructions a request "
              f"({(ratio - 1) * 100:+.1f} %)", file=sys.stderr)
    print(f"reproduce: {report['command']}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
