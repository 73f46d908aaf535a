"""Size of the generated script (``GET /s/{site_id}.js``) as browsers receive it.

    python bench/script_size.py            # a table
    python bench/script_size.py --json     # machine-readable
    python bench/script_size.py --check    # exit 1 when a budget is not met
    python bench/script_size.py --parts    # + where each script's gzipped bytes are

Starts the real server (``python -m server serve --config <tmp>/onetag.toml``, forwarder off)
with one site per case: the runtime alone, each vendor alone, all four vendors; every vendor
setting filled (public ones reach the script; secrets must not). Those sites keep the site
defaults (automatic SPA page views, form email capture); ``all-four-lean`` turns both off, to
show what compiling those features out saves (not a budget case). For each it fetches the
script three times over HTTP: plain (raw bytes), with ``Accept-Encoding: gzip`` and with a
current browser's ``gzip, deflate, br`` (the bytes the server actually sends each: zopfli's
gzip, brotli). That is the minified form (templates/*.min.js.j2, made by tools/js/build.py
with terser), what every browser gets unless it asks for debug. The budgets are on gzip
bytes (issue 12), what every browser can take; browsers send ``br`` on https origins only.

--parts: the gzip cost of each part of a script (the config JSON, each included
templates/**/*.min.js.j2: the features, the vendor helpers, each adapter), each measured as
what leaving that part out of the served body saves; ``runtime`` is the rest, so it also holds
what the parts share (a string two parts repeat costs its bytes once, in neither's saving).

Budgets (issue 12): the runtime with all four adapters <= 4,600 B gzipped, with any one
adapter <= 3,300 B. Reference figures, for scale: Plausible's script ~1.9 KB gzipped, Segment's
analytics.js ~29.6 KB.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import HOST, REPO, ServerProcess, free_port, python  # noqa: E402

sys.path.insert(0, str(REPO))
from server.script import compress  # noqa: E402  (the server's own gzip: zopfli)

BUDGET = 4600             # runtime + all four adapters, gzipped bytes
BUDGET_ONE_VENDOR = 3300  # runtime + any one adapter
REFERENCES = {"Plausible (script.js)": 1.9 * 1024, "Segment analytics.js": 29.6 * 1024}
VENDORS = {
    "rejoiner": {"site_id": "AB12CD3", "domain": "shop.example", "api_key": "secret-rj"},
    "remarkety": {"store_id": "remarkety-store-1234", "api_key": "secret-rm"},
    "esputnik": {"site_id": "8A412DC", "script_id": "000000000000000000", "api_key": "secret-es"},
    "sendlane": {"integration_token": "abcdefghijklmnopqrstuvwxyz123456", "api_token": "secret-sl"},
}
CASES = {"runtime-only": [], **{f"{v}-only": [v] for v in VENDORS}, "all-four": list(VENDORS),
         "all-four-lean": list(VENDORS)}
LEAN = {"all-four-lean": ['spa_page_views = "manual"', "capture_form_email = false"]}


def config(database: str, public_url: str) -> str:
    lines = ["[server]", f'database = "{database}"', f'public_url = "{public_url}"',
             "forward = false", ""]
    for site, names in CASES.items():
        lines += ["[[sites]]", f'id = "{site}"', 'origins = ["https://shop.example"]',
                  'api_key = "secret-site-0123456789"', 'currency = "USD"', *LEAN.get(site, []), ""]
        for name in names:
            lines.append(f"[sites.{name}]")
            lines += [f'{k} = "{v}"' for k, v in VENDORS[name].items()]
            lines.append("")
    return "\n".join(lines)


def fetch(url: str, coding: str) -> tuple[bytes, str | None]:
    headers = {"Accept-Encoding": coding}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return r.read(), r.headers.get("Content-Encoding")


def parts() -> dict[str, str]:
    """Each included part's text as the served script holds it: its .min.js.j2 file less the
    generated-file header line (the runtime's own file, with its Jinja tail, is the rest)."""
    templates = REPO / "templates"
    return {path.relative_to(templates).as_posix(): path.read_text(encoding="utf-8").split("\n", 1)[1].rstrip("\n")
            for path in sorted(templates.rglob("*.min.js.j2")) if path.name != "onetag.min.js.j2"}


def part_costs(raw: bytes, texts: dict[str, str]) -> dict[str, int]:
    """Gzipped bytes each part of one served script costs: the whole minus the script without
    it (compressed as the server does, server/script.py compress). ``config`` is the JSON the runtime is called with;
    ``runtime`` is what the other parts leave, their shared bytes included."""
    body = raw.decode("utf-8")
    size = len(compress(raw))

    def without(text: str) -> int:
        return size - len(compress(body.replace(text, "", 1).encode()))

    call = re.search(r"\}\(window,document,(\{.*\})\);\s*$", body, flags=re.S)
    costs = {"config": without(call.group(1)) if call else 0}
    costs.update({name: without(text) for name, text in texts.items() if text in body})
    costs["runtime"] = size - sum(costs.values())
    return costs


def measure(with_parts: bool = False) -> dict[str, object]:
    import brotli

    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://{HOST}:{port}"
        cfg = Path(tmp) / "onetag.toml"
        cfg.write_text(config(f"sqlite:///{tmp}/onetag.db", url), encoding="utf-8")
        argv = [python(), "-m", "server", "serve", "--config", str(cfg),
                "--host", HOST, "--port", str(port)]
        with ServerProcess(argv, port, log_path=Path(tmp) / "server.log", start_timeout=60):
            for site in CASES:
                raw, _ = fetch(f"{url}/s/{site}.js", "identity")
                wire, encoding = fetch(f"{url}/s/{site}.js", "gzip")
                if encoding != "gzip":
                    raise SystemExit(f"/s/{site}.js was not served gzipped (Content-Encoding {encoding!r})")
                if gzip.decompress(wire) != raw:
                    raise SystemExit(f"/s/{site}.js: gzipped and plain bodies differ")
                wire_br, encoding = fetch(f"{url}/s/{site}.js", "gzip, deflate, br")
                if encoding != "br" or brotli.decompress(wire_br) != raw:
                    raise SystemExit(f"/s/{site}.js: not served as brotli to a browser "
                                     "asking for it")
                leaked = [s for s in ("secret-rj", "secret-rm", "secret-es", "secret-sl", "secret-site")
                          if s.encode() in raw]
                results[site] = {
                    "raw": len(raw), "gzip": len(wire),
                    "brotli": len(wire_br),
                    "secrets_in_script": leaked,
                }
                if with_parts:
                    results[site]["parts"] = part_costs(raw, parts())
    runtime = results["runtime-only"]["gzip"]
    for site in CASES:
        results[site]["gzip_over_runtime"] = results[site]["gzip"] - runtime  # type: ignore[operator]
    total = results["all-four"]["gzip"]
    one = max(results[f"{v}-only"]["gzip"] for v in VENDORS)  # type: ignore[type-var]
    return {"budget_gzip": BUDGET, "budget_one_vendor_gzip": BUDGET_ONE_VENDOR,
            "met": total <= BUDGET and one <= BUDGET_ONE_VENDOR,  # type: ignore[operator]
            "met_all_four": total <= BUDGET, "met_one_vendor": one <= BUDGET_ONE_VENDOR,  # type: ignore[operator]
            "references_gzip": REFERENCES, "cases": results}


def kb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1024:.2f} KB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when the budget is not met")
    ap.add_argument("--parts", action="store_true", help="the gzip cost of each part of each script")
    args = ap.parse_args()
    out = measure(with_parts=args.parts)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        cases = out["cases"]
        print(f"{'script':<16}{'raw B':>10}{'gzip':>20}{'brotli B':>12}{'gzip over runtime':>20}")
        for site, r in cases.items():  # type: ignore[union-attr]
            gzip_text = f"{r['gzip']} B ({kb(r['gzip'])})"
            print(f"{site:<16}{r['raw']:>10}{gzip_text:>20}"
                  f"{r['brotli']:>12}"
                  f"{'+' + str(r['gzip_over_runtime']) + ' B' if site != 'runtime-only' else '':>20}")
            if r["secrets_in_script"]:
                print(f"  !! secrets in {site}: {r['secrets_in_script']}")
            for name, cost in r.get("parts", {}).items():
                print(f"    {name:<42}{cost:>6} B")
        print("reference (gzipped): " + ", ".join(f"{k} ~{v / 1024:.1f} KB"
                                                  for k, v in REFERENCES.items()))  # type: ignore[union-attr]
        total = cases["all-four"]["gzip"]  # type: ignore[index]
        one = max(cases[f"{v}-only"]["gzip"] for v in VENDORS)  # type: ignore[index]
        print(f"budget: runtime + four adapters <= {BUDGET} B gzipped: "
              f"{total} B -> {'MET' if out['met_all_four'] else 'NOT MET'}"
              f" ({BUDGET - total:+d} B to spare)")
        print(f"budget: runtime + one adapter <= {BUDGET_ONE_VENDOR} B gzipped: largest {one} B -> "
              f"{'MET' if out['met_one_vendor'] else 'NOT MET'} ({BUDGET_ONE_VENDOR - one:+d} B to spare)")
        total_br = cases["all-four"]["brotli"]  # type: ignore[index]
        one_br = max(cases[f"{v}-only"]["brotli"] for v in VENDORS)  # type: ignore[index]
        print(f"as a browser on https gets it (brotli): four adapters {total_br} B, largest one "
              f"adapter {one_br} B (the budgets are on gzip, which every browser takes)")
    return 1 if args.check and not out["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
