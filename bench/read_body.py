"""Instructions to read one browser body (``envelope.read_browser_body``), counted by callgrind.

The writer reads every ``POST /e`` body itself: parse, site, origin, ``sc``, bounds,
validate and normalise each event. That is pure CPU, about a third of the writer's per
request, and no part of it waits. This script counts only that: it reads one fixed body
N times in a loop (after a warm-up) under ``valgrind --tool=callgrind``, subtracts a run that
builds the same bodies and reads none, and divides by N. The bodies, their event ids and
times and the server's clock are fixed, so the count repeats run to run whatever the machine
is doing. Three shapes:

- ``bench``: ``ingest.py``'s beacon (one ``add_to_cart``, one item), what the ingest
  benchmarks send;
- ``checkout10``: one ``begin_checkout`` of 10 items (brand, variant, two categories, URL),
  with a user email, a coupon and the vendors loaded;
- ``batch5``: five events in one body (page_view, view_item, add_to_cart, view_cart of three
  items, identify).

    python bench/read_body.py                  # this checkout, 2,000 reads a shape (~2 min)
    python bench/read_body.py --base main      # and a revision beside it, with the ratio
    python bench/read_body.py --json

Prints, for each shape, its size in bytes and the instructions one read costs (and, with
``--base``, the base revision's figure and this tree's over it). Needs valgrind (Debian's
``valgrind`` package).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.instructions import _COLLECTED, REPO, export  # noqa: E402

RECEIVED_MS = 1_764_400_000_000  # the server's clock, fixed: an event's time is bounded by it
WARM_UP = 200
SHAPES = ("bench", "checkout10", "batch5")


def bodies() -> dict[str, bytes]:
    """Each shape's body, the same bytes on every run."""
    from bench.ingest import ORIGIN, Bodies

    ids = iter(f"0193a1b2-c3d4-7e5f-8a9b-{n:012x}" for n in range(100))
    at = RECEIVED_MS - 1500
    sc = "5F0C6A8E-2B1D-4E7A-9C3F-1A2B3C4D5E6F"
    beacon = Bodies(1, 1).templates[0] % (next(ids), at)
    page = {"location": f"{ORIGIN}/checkout", "referrer": f"{ORIGIN}/cart",
            "title": "Checkout — Bench Shop"}
    items = [{"item_id": f"SKU-{n}", "item_name": f"Product number {n}", "item_brand": "Bench",
              "item_variant": "Blue / L", "price": n * 10 + 9.95, "quantity": 1 + n % 3,
              "item_category": "Home", "item_category2": "Kitchen",
              "item_url": f"{ORIGIN}/p/sku-{n}"} for n in range(1, 11)]

    def event(name: str, **fields) -> dict:
        return {"event_id": next(ids), "event": name, "time": at, "page": page,
                "loaded": ["esputnik", "rejoiner"], **fields}

    checkout = event("begin_checkout", user={"email": "Shopper@Example.com"},
                     ecommerce={"currency": "USD", "value": 549.5, "coupon": "WELCOME10",
                                "items": items})
    batch = [event("page_view"),
             event("view_item", ecommerce={"currency": "USD", "value": 19.95,
                                           "items": items[:1]}),
             event("add_to_cart", ecommerce={"currency": "USD", "value": 19.95,
                                             "items": items[:1]}),
             event("view_cart", ecommerce={"currency": "USD", "value": 89.85,
                                           "items": items[:3]}),
             event("identify", user={"email": "shopper@example.com", "first_name": "Sam"})]

    def body(events: str) -> bytes:
        return ('{"site_id":"bench","sc":"%s","events":[%s]}' % (sc, events)).encode()

    def compact(value) -> str:  # prices as floats: JSON writes their shortest repr
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    return {"bench": body(beacon), "checkout10": body(compact(checkout)),
            "batch5": body(",".join(compact(one) for one in batch))}


def drive(shape: str | None, reads: int) -> None:
    """Inside callgrind: build every body, warm up, then read ``shape``'s ``reads`` times."""
    from bench.ingest import ORIGIN, USER_AGENT
    from server import config
    from server.envelope import BrowserBatch, BrowserFacts, read_browser_body

    sites = config.parse({"server": {"public_url": "http://127.0.0.1"}, "sites": [
        {"id": "bench", "origins": [ORIGIN], "currency": "USD"}]}, env={}).sites
    facts = BrowserFacts(ORIGIN, None, USER_AGENT, RECEIVED_MS)
    made = bodies()
    for name, data in made.items():
        for _ in range(WARM_UP):
            answer = read_browser_body(data, facts, sites)
        if not isinstance(answer, BrowserBatch):
            raise SystemExit(f"the {name} body was refused: {answer}")
    # Everything made so far out of the collector's way: a full collection walks every
    # object the process holds, and whether one falls inside the loop depended on N.
    gc.collect()
    gc.freeze()
    if shape is not None:
        data = made[shape]
        for _ in range(reads):
            read_browser_body(data, facts, sites)


def count(code: Path, shape: str | None, reads: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": f"{code}{os.pathsep}{REPO}"}
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
               __file__, "--drive", shape or "-", "--reads", str(reads), "--code", str(code)]
    with tempfile.TemporaryDirectory(prefix="onetag-cg-") as empty:  # not this tree's server/
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=empty)
    found = _COLLECTED.findall(run.stderr)
    if run.returncode != 0 or not found:
        raise SystemExit(f"callgrind run failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return int(found[-1][1])


def per_read(code: Path, reads: int, label: str) -> dict[str, float]:
    idle = count(code, None, 0)
    figures = {shape: (count(code, shape, reads) - idle) / reads for shape in SHAPES}
    print(f"  {label:<10} " + "   ".join(f"{shape} {figures[shape]:>9,.0f}" for shape in SHAPES)
          + "  instructions a read", file=sys.stderr, flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=2000, help="reads of each body (2000)")
    parser.add_argument("--base", help="a git revision to measure beside this checkout")
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:  # inside callgrind, the measured code first on sys.path
        sys.path[:0] = [args.code]
        drive(None if args.drive == "-" else args.drive, args.reads)
        return 0
    sizes = {shape: len(data) for shape, data in bodies().items()}
    print("callgrind: read_browser_body, " + ", ".join(f"{shape} {size} B"
                                                        for shape, size in sizes.items()),
          file=sys.stderr)
    report: dict[str, object] = {"reads": args.reads, "bytes": sizes,
                                 "head": per_read(REPO, args.reads, "this tree")}
    if args.base:
        with tempfile.TemporaryDirectory(prefix="onetag-base-") as folder:
            export(args.base, Path(folder))
            report["base"] = base = per_read(Path(folder), args.reads, args.base[:10])
        head = report["head"]
        report["ratio"] = ratio = {shape: head[shape] / base[shape] for shape in SHAPES}
        print(f"  this tree / {args.base}: " + "   ".join(
            f"{shape} {ratio[shape]:.3f}" for shape in SHAPES), file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
