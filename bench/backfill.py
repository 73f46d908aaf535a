"""How fast ``onetag backfill`` reads, checks and plans a history.

    python bench/backfill.py                 # 100,000 lines: a dry run, then --send
    python bench/backfill.py --lines 20000   # a smaller history
    python bench/backfill.py --json          # machine-readable

Writes a history of customers, products, orders and status changes (JSONL) and a config
with one site whose Sendlane section points at an unreachable address (nothing is sent:
``backfill`` only plans), then runs ``python -m server backfill`` on it twice, as its own
process: a dry run (both passes, keys looked up read-only), then ``--send --pace 0`` into a
fresh SQLite file (both passes, every batch committed through the writer process). Prints
wall-clock seconds, lines a second and the peak RSS of each run's CLI process (the
writer process of ``--send`` is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
START = 1_672_531_200_000  # 2023-01-01T00:00:00Z


def history(lines: int) -> Iterator[dict]:
    """10% customers, 2% products, then orders, the last ones with a status change each."""
    customers, products = max(lines // 10, 1), max(lines // 50, 1)
    orders_alone = (lines - customers - products) * 60 // 88
    made = 0
    for n in range(customers):
        made += 1
        yield {"event": "identify", "time": START + n * 1000,
               "user": {"email": f"c{n}@example.com", "customer_id": f"C{n}"}}
    for n in range(products):
        made += 1
        yield {"event": "product_updated", "time": START + n * 1000, "ecommerce": {
            "items": [{"item_id": f"SKU-{n}", "item_name": f"Item {n}", "price": "9.99",
                       "item_url": f"https://shop.example/p/{n}",
                       "image_url": f"https://shop.example/i/{n}.jpg"}]}}
    n = 0
    while made < lines:
        when = START + n * 60_000
        made += 1
        yield {"event": "purchase", "time": when, "transaction_id": f"O{n}",
               "user": {"email": f"c{n % customers}@example.com",
                        "customer_id": f"C{n % customers}"},
               "ecommerce": {"currency": "USD", "value": "19.98", "items": [
                   {"item_id": f"SKU-{n % products}", "price": "9.99", "quantity": 2}]}}
        if n >= orders_alone and made < lines:
            made += 1
            yield {"event": "order_status", "time": when + 86_400_000,
                   "transaction_id": f"O{n}", "status": "fulfilled",
                   "user": {"customer_id": f"C{n % customers}"}}
        n += 1


# The CLI in a process that reports its own peak RSS (the writer process's is not in it).
_WRAPPER = ("import resource, runpy, sys\n"
            "sys.argv = ['onetag', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_module('server', run_name='__main__')\n"
            "finally:\n"
            "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,\n"
            "          file=sys.stderr)\n")


def run(args: list[str], cwd: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, "backfill", *args], cwd=cwd,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"backfill failed ({done.returncode}): {done.stderr[-2000:]}")
    rss = [int(line.split()[1]) for line in done.stderr.splitlines()
           if line.startswith("PEAK_RSS_KB ")]
    out = done.stdout.splitlines()
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(rss[-1] / 1024, 1) if rss else None,
            "summary": out[1] if len(out) > 1 else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        # Written as made, never held: a forked child starts with this process's peak RSS.
        with open(cwd / "history.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps(line) + "\n" for line in history(options.lines))
        (cwd / "onetag.toml").write_text(
            '[server]\ndatabase = "sqlite:///onetag.db"\n\n[[sites]]\nid = "bench"\n'
            'api_key = "bench-api-key-0123456789"\n\n[sites.sendlane]\nintegration_token = "T"\napi_token = "x"\n'
            'api_base = "http://127.0.0.1:9/sendlane"\n', encoding="utf-8")
        common = ["--config", "onetag.toml", "--site", "bench"]
        report = {"lines": options.lines,
                  "dry_run": run([*common, "history.jsonl"], cwd),
                  "send": run([*common, "--send", "--pace", "0", "history.jsonl"], cwd)}
    for mode in ("dry_run", "send"):
        report[mode]["lines_per_s"] = round(options.lines / report[mode]["seconds"])
    if options.json:
        print(json.dumps(report, indent=2))
        return
    print(f"onetag backfill, {options.lines:,} lines ({report['send']['summary']})")
    for mode, label in (("dry_run", "dry run"), ("send", "--send --pace 0")):
        figures = report[mode]
        print(f"  {label:16} {figures['seconds']:7.2f} s  {figures['lines_per_s']:>7,} lines/s"
              f"  peak RSS {figures['peak_rss_mb']} MB")
    print(f"reproduce: python bench/backfill.py --lines {options.lines}")


if __name__ == "__main__":
    main()
