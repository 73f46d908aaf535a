"""A/B ingest throughput: this checkout against another revision, both driven at once.

    python bench/ab.py                     # the working tree against HEAD, 6 rounds of 10 s
    python bench/ab.py --base HEAD~3       # against an older revision
    python bench/ab.py --json

``ingest.py`` measures its targets one after the other; on a shared machine whose speed
drifts by tens of percent within a minute, two versions measured that way differ by more
than most changes do. Here both onetag servers run side by side (each on a fresh SQLite
file, each in its own process with its own writer), and two client processes drive them
at the same moment with the same load, so a pause or a busy neighbour hits both alike.

Side by side is not quite symmetric either: an A/A run (the same code twice) shows a few
percent in favour of one position. So each round swaps which client starts first, and
the report gives every round's ratio and their geometric mean: B/A = this checkout's events/s over the base's. Every 204 is checked
against the rows each server stored, as in ``ingest.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import REPO, HOST, ServerProcess, free_port, machine, python
from bench.ingest import Bodies, drive, write_config


def export(rev: str, folder: Path) -> Path:
    """The files of ``rev`` (no .git), as a checkout of that revision would have them."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def start(tree: Path, folder: Path) -> ServerProcess:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(folder, port)
    argv = [python(), "-m", "server", "serve", "--config", str(config), "--host", HOST,
            "--port", str(port), "--log-level", "warning"]
    return ServerProcess(argv, port, log_path=folder / "server.log", cwd=tree).start()


def client_main(port: int, pid: int, conns: int, duration: float, warmup: float,
                seed: int) -> None:
    """One client process: drive one server, print what it saw as JSON."""
    args = argparse.Namespace(conns=conns, duration=duration, warmup=warmup, client="raw")
    result = asyncio.run(drive(port, pid, args, Bodies(1, 2000, seed=seed)))
    print(json.dumps({"acked": result.acked, "elapsed": result.elapsed,
                      "all_acked": result.all_acked, "errors": result.error_kinds}))


def client(server: ServerProcess, args: argparse.Namespace, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [python(), str(Path(__file__).resolve()), "--client-of", str(server.port), str(server.pid),
         str(args.conns), str(args.duration), str(args.warmup), str(seed)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)


def stored(folder: Path) -> int:
    with sqlite3.connect(folder / "onetag.db") as db:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    trees = {"A": export(args.base, work / "base"), "B": REPO}
    servers: dict[str, ServerProcess] = {}
    acked = {"A": 0, "B": 0}
    rounds = []
    try:
        for side in ("A", "B"):
            servers[side] = start(trees[side], work / f"data-{side}")
        for round_no in range(args.rounds):
            order = ("A", "B") if round_no % 2 == 0 else ("B", "A")
            procs = {side: client(servers[side], args, seed=round_no * 2 + i)
                     for i, side in enumerate(order)}
            seen = {side: json.loads(proc.communicate()[0]) for side, proc in procs.items()}
            for side in seen:
                acked[side] += seen[side]["all_acked"]
            rate = {side: seen[side]["acked"] / seen[side]["elapsed"] for side in seen}
            rounds.append({"first": order[0], "A": round(rate["A"], 1), "B": round(rate["B"], 1),
                           "ratio": round(rate["B"] / rate["A"], 3) if rate["A"] else None,
                           "errors": {side: seen[side]["errors"] for side in seen
                                      if seen[side]["errors"]}})
            print(f"round {round_no + 1}/{args.rounds}: A {rate['A']:.0f} events/s, "
                  f"B {rate['B']:.0f} events/s, B/A {rounds[-1]['ratio']} "
                  f"({order[0]}'s client first)", file=sys.stderr)
    finally:
        codes = {side: server.stop() for side, server in servers.items()}
    ratios = [r["ratio"] for r in rounds if r["ratio"]]
    return {
        "base": args.base, "conns": args.conns, "duration": args.duration,
        "machine": machine(), "rounds": rounds,
        "ratio_geomean": round(math.exp(statistics.fmean(math.log(r) for r in ratios)), 3)
        if ratios else None,
        "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "durability": {side: {"acknowledged": acked[side], "stored": stored(work / f"data-{side}"),
                              "exit_code": codes[side]} for side in ("A", "B")},
    }


def report_text(report: dict[str, Any]) -> str:
    lines = [f"onetag A/B ingest: A = {report['base']}, B = this checkout; "
             f"{report['conns']} connections each, {report['duration']} s rounds, both at once",
             f"{'round':>5} {'first':>5} {'A ev/s':>8} {'B ev/s':>8} {'B/A':>6}"]
    for i, r in enumerate(report["rounds"], 1):
        lines.append(f"{i:>5} {r['first']:>5} {r['A']:>8.0f} {r['B']:>8.0f} {r['ratio']:>6}")
    lines.append(f"B/A: geometric mean {report['ratio_geomean']}, median {report['ratio_median']}")
    for side, d in report["durability"].items():
        ok = "OK" if d["acknowledged"] == d["stored"] else "MISMATCH"
        lines.append(f"durability {side}: {d['acknowledged']} acknowledged, {d['stored']} stored "
                     f"— {ok}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client-of"]:
        port, pid, conns = (int(v) for v in argv[1:4])
        client_main(port, pid, conns, float(argv[4]), float(argv[5]), int(argv[6]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the revision to compare with (HEAD)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, first client swapped "
                        "each round (6)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds a round (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds a round (1)")
    parser.add_argument("--conns", type=int, default=32, help="connections per server (32)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onetag-ab-") as tmp:
        report = run(args, Path(tmp))
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    bad = [s for s, d in report["durability"].items() if d["acknowledged"] != d["stored"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
