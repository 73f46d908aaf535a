"""Ingest with poison: valid ``POST /e`` traffic with 1% bad bodies, against a clean run.

    python bench/poison.py                  # 32 connections, 6 rounds of 3 s each way (~50 s)
    python bench/poison.py --rate 0.05      # 5% poison
    python bench/poison.py --json           # the report as JSON

One ``onetag serve`` (the real server, its writer in a process of its own, on a fresh SQLite
file) and one client, as in ``bench/ingest.py`` (its bodies, connections and measurement are
reused). Rounds alternate: a clean window (valid bodies only) and a poisoned window, where
every ``1/rate``-th request is a bad body from a rotating set of the inputs that stopped
intake before (issue 10: lone surrogates, raw invalid UTF-8, huge numbers and exponents,
deep nesting, too many keys, newlines in names and ids, an over-long cart). Each pair of
rounds swaps which goes first, so drift and the growing database hit both alike.

Reported: valid events/s and p50/p99 of the 204s for each, their ratio (poisoned / clean,
target >= 0.9), how the poison was answered (each must be a 4xx), and the durability check
(every 204 a stored event). Exits 1 when a poison body is not refused with a 4xx, a valid
request is not answered 204, or an acknowledged event is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ingest
from bench._util import HOST, ServerProcess, free_port, load_average, machine, python
from server.events import new_event_id

RATIO_TARGET = 0.9


def _nest(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _event(rest: str, name: str = "add_to_cart") -> str:
    """One event as JSON text with a fresh id in place of ``@ID@``."""
    return '{"event":"%s","event_id":"@ID@",%s}' % (name, rest)


ITEM = '{"item_id":"SKU-1","item_name":"Mug","price":29.99,"quantity":1}'
# (name, body template): each must be refused with a 4xx and change nothing.
POISON: list[tuple[str, bytes]] = [(name, ('{"site_id":"bench","events":[%s]}' % event)
                                    .encode("utf-8", "surrogatepass"))
                                   for name, event in [
    ("surrogate in page.title", _event('"page":{"title":"\\ud800"}', "page_view")),
    ("surrogate in a key", _event('"\\udfff":1', "c_custom")),
    ("raw ED A0 80", _event('"page":{"title":"\ud800"}', "page_view")),  # a raw lone surrogate: bytes ED A0 80
    ("price 1e30", _event('"ecommerce":{"items":[{"item_id":"A","price":1e30}]}')),
    ("time 1e17", _event('"time":1e17', "page_view")),
    ("quantity 1e5000", _event('"ecommerce":{"items":[{"item_id":"A","quantity":1e5000}]}')),
    ("quantity 1e300000",
     _event('"ecommerce":{"items":[{"item_id":"A","quantity":1e300000}]}')),
    ("4,400-digit integer", _event('"n":%s' % ("7" * 4400), "c_custom")),
    ("nesting 1,000", _event('"p":%s' % _nest(1000), "c_custom")),
    ("nesting 50,000", _event('"p":%s' % ("[" * 50000 + "]" * 50000), "c_custom")),
    ("too many keys", _event('"p":{%s}' % ",".join(f'"k{i}":1' for i in range(500)),
                             "c_custom")),
    ("event name with a newline", _event('"page":{}', "page_view\\n")),
    ("event id with a newline", '{"event":"page_view","event_id":"@ID@\\n"}'),
    ("cart of 201 lines", _event('"ecommerce":{"items":[%s]}' % ",".join(
        ITEM.replace("SKU-1", f"SKU-{i}") for i in range(201)))),
]]


class PoisonedBodies:
    """``ingest.Bodies``, with every ``every``-th body a poison one (0: none)."""

    def __init__(self, valid: ingest.Bodies, every: int):
        self.valid, self.every = valid, every
        self.batch = valid.batch
        self.made = 0
        self.poison_made: dict[str, int] = {}

    def make(self) -> bytes:
        self.made += 1
        if not self.every or self.made % self.every:
            return self.valid.make()
        name, template = POISON[sum(self.poison_made.values()) % len(POISON)]
        self.poison_made[name] = self.poison_made.get(name, 0) + 1
        return template.replace(b"@ID@", new_event_id().encode())


def read_costs(batch: int, repeat: int = 200) -> dict[str, float]:
    """CPU microseconds to read each body (parse, bounds, validate, normalise: what the
    writer does before storing), in this process, best of 3: a throughput-free view of
    what a poison body costs against a valid one. Cart rules apply later, at store time."""
    import time

    from server import config
    from server.envelope import BrowserFacts, read_browser_body

    sites = config.parse({"server": {"public_url": "http://127.0.0.1"}, "sites": [
        {"id": "bench", "origins": [ingest.ORIGIN], "currency": "USD"}]}, env={}).sites
    facts = BrowserFacts(ingest.ORIGIN, None, ingest.USER_AGENT, int(time.time() * 1000))
    bodies = [("valid", ingest.Bodies(batch, 10).make())] + [
        (name, template.replace(b"@ID@", new_event_id().encode())) for name, template in POISON]
    costs = {}
    for name, body in bodies:
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for _ in range(repeat):
                read_browser_body(body, facts, sites)
            best = min(best, (time.process_time() - started) / repeat)
        costs[name] = round(best * 1e6, 1)
    return costs


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    port = free_port()
    config = ingest.write_config(folder, port)
    argv = [python(), "-m", "server", "serve", "--config", str(config), "--host", HOST,
            "--port", str(port), "--log-level", "warning"]
    valid = ingest.Bodies(args.batch, args.sessions)
    clean, poisoned = PoisonedBodies(valid, 0), PoisonedBodies(valid, round(1 / args.rate))
    slices: dict[str, list[ingest.Slice]] = {"clean": [], "poisoned": []}
    server = ServerProcess(argv, port, log_path=folder / "onetag.log")
    try:
        server.start()
        for round_no in range(args.rounds):
            order = ["clean", "poisoned"] if round_no % 2 == 0 else ["poisoned", "clean"]
            for target in order:
                bodies = clean if target == "clean" else poisoned
                slices[target].append(asyncio.run(ingest.drive(port, server.pid, args, bodies)))
    finally:
        exit_code = server.stop()
    rows = {target: ingest.summarise(target, slices[target], args) for target in slices}
    refused = rows["poisoned"]["all_requests"] - rows["poisoned"]["all_acked_requests"]
    poison_sent = sum(poisoned.poison_made.values())
    both = {"all_acked_requests": sum(r["all_acked_requests"] for r in rows.values()),
            "all_unknown_outcome": sum(r["all_unknown_outcome"] for r in rows.values())}
    checked = ingest.check_onetag(folder, folder / "no-stats.json", both, args)
    round_ratios = [round((p.acked / p.elapsed) / (c.acked / c.elapsed), 3) if c.acked else None
                    for c, p in zip(slices["clean"], slices["poisoned"])]
    clean_rate = rows["clean"]["events_per_s"]
    poison_codes = {k: v for k, v in rows["poisoned"]["error_kinds"].items()}
    return {
        "results": list(rows.values()),
        "ratio": round(rows["poisoned"]["events_per_s"] / clean_rate, 3) if clean_rate else None,
        "round_ratios": round_ratios,
        "ratio_median": ingest._median(round_ratios),
        "p99_ratio": (round(rows["poisoned"]["p99_ms"] / rows["clean"]["p99_ms"], 2)
                      if rows["clean"]["p99_ms"] else None),
        "poison": {"sent": poison_sent, "by_kind": poisoned.poison_made,
                   "non_204_answers": refused, "answers_in_window": poison_codes,
                   "clean_window_errors": rows["clean"]["error_kinds"]},
        "durability": checked["durability"],
        "server_exit_code": exit_code,
        "server_log_tail": server.log_tail(15),
    }


def problems(report: dict[str, Any]) -> list[str]:
    """What makes the run a failure, beyond the ratio (which is only reported)."""
    found = []
    poison = report["poison"]
    if poison["non_204_answers"] != poison["sent"]:
        found.append(f"{poison['sent']} poison bodies sent, {poison['non_204_answers']} requests "
                     "not answered 204: a valid request failed, or a poison body was accepted")
    bad_codes = {k: v for k, v in poison["answers_in_window"].items()
                 if not (k.isdigit() and 400 <= int(k) < 500)}
    if bad_codes or poison["clean_window_errors"]:
        found.append(f"answers other than 204 and 4xx: poisoned {bad_codes}, "
                     f"clean {poison['clean_window_errors']}")
    if not report["durability"]["ok"]:
        found.append(f"durability: {report['durability']}")
    return found


def reproduce_command(args: argparse.Namespace) -> str:
    return shlex.join(["python", "bench/poison.py", "--conns", str(args.conns), "--duration",
                       f"{args.duration:g}", "--warmup", f"{args.warmup:g}", "--rounds",
                       str(args.rounds), "--rate", f"{args.rate:g}", "--batch", str(args.batch)])


def report_text(report: dict[str, Any]) -> str:
    a, m = report["settings"], report["machine"]
    lines = [f"onetag poison bench: POST /e, {a['conns']} connections, {a['batch']} event(s) a "
             f"valid request, {a['rate']:.0%} poison bodies, {a['rounds']} alternating rounds of "
             f"{a['duration_s']:g} s each way (+{a['warmup_s']:g} s warm-up)",
             f"machine: {m['nproc']} CPU(s), Python {m['python']}; load average before: "
             f"{ingest._fmt(report['load_before'])}", "",
             f"{'run':<9} {'valid events/s':>14} {'p50 ms':>7} {'p99 ms':>7} {'non-204':>8}"]
    for row in report["results"]:
        lines.append(f"{row['target']:<9} {row['events_per_s']:>14.1f} {row['p50_ms']:>7.2f} "
                     f"{row['p99_ms']:>7.2f} {row['errors']:>8}")
    lines.append("")
    ratio = report["ratio"]
    if ratio is not None:
        verdict = "meets" if ratio >= RATIO_TARGET else "BELOW"
        lines.append(f"ratio poisoned/clean (valid events/s): {ratio:.2f} — {verdict} the "
                     f"{RATIO_TARGET} target; per round: "
                     f"{' '.join(f'{r:.2f}' for r in report['round_ratios'] if r is not None)} "
                     f"(median {ingest._fmt(report['ratio_median'])}); p99 poisoned/clean: "
                     f"{ingest._fmt(report['p99_ratio'])}")
    poison = report["poison"]
    lines.append(f"poison: {poison['sent']} bodies sent ({len(poison['by_kind'])} kinds), "
                 f"{poison['non_204_answers']} requests not answered 204; answers in the "
                 f"measured windows: {poison['answers_in_window']}")
    costs = report["read_costs_us"]
    lines.append(f"read cost a body (CPU us, this process, best of 3): valid {costs['valid']:.0f}; "
                 + ", ".join(f"{name} {us:.0f}" for name, us in costs.items() if name != "valid"))
    d = report["durability"]
    lines.append(f"durability: {d['acked_events']} events acknowledged, {d['stored_events']} "
                 f"stored — {'OK, equal' if d['ok'] else 'MISMATCH'}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    if report["problems"]:
        lines.append("server log tail:\n" + report["server_log_tail"])
    lines.append(f"reproduce: {report['command']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Valid ingest beside poison bodies, against "
                                                 "a clean run of the same server.")
    parser.add_argument("--conns", type=int, default=32, help="concurrent connections (32)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="measured seconds a run and round (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds (1)")
    parser.add_argument("--rounds", type=int, default=6, help="clean/poisoned pairs (6)")
    parser.add_argument("--rate", type=float, default=0.01,
                        help="share of poisoned requests in the poisoned run (0.01)")
    parser.add_argument("--batch", type=int, default=1, help="events a valid request (1)")
    parser.add_argument("--sessions", type=int, default=2000, help="distinct sc values (2000)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 0.5 or args.conns < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rate in (0, 0.5], --conns >= 1, --duration > 0, --warmup >= 0")
    if not 1 <= args.rounds <= 30 or not 1 <= args.batch <= 500:
        parser.error("--rounds 1 to 30, --batch 1 to 500")
    args.client = "raw"  # what ingest.drive reads
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="onetag-poison-"))
    load_before = load_average()
    try:
        report = run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report.update({
        "settings": {"conns": args.conns, "duration_s": args.duration, "warmup_s": args.warmup,
                     "rounds": args.rounds, "rate": args.rate, "batch": args.batch},
        "machine": machine(), "load_before": load_before, "ratio_target": RATIO_TARGET,
        "command": reproduce_command(args), "read_costs_us": read_costs(args.batch)})
    report["problems"] = problems(report)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
