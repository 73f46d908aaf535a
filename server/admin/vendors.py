"""``/admin/vendors``: how each vendor is doing, per site.

Row counts by state and the oldest pending row's age (the outbox now), and over the chosen
range (24 h hourly, 30 d daily) the attempts' success rate and p50/p95 latency, drawn as
SVG on the server (``chart.py``), with the last errors grouped by status and message.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..store.console_ops import RANGES, bucket_starts
from .chart import Series, line_chart
from .scrub import scrub, secret_values
from .web import Console, now_ms

STATES = ("delivered", "pending", "failing", "held", "dead", "ignored", "browser", "expired")


def duration_text(seconds: float | None) -> str:
    """``95`` → ``1 min 35 s``; None → ``–``."""
    if seconds is None:
        return "–"
    whole = int(seconds)
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                          ("min", 60, "s", 1)):
        if whole >= size:
            rest = whole % size // small_size
            return f"{whole // size} {unit}" + (f" {rest} {small}" if rest else "")
    return f"{whole} s"


def bucket_label(start_ms: int, range_name: str) -> str:
    moment = dt.datetime.fromtimestamp(start_ms / 1000, tz=dt.timezone.utc)
    return moment.strftime("%H:00" if range_name == "24h" else "%m-%d")


def charts(item: dict[str, Any], range_name: str) -> dict[str, Markup]:
    """The latency and success-rate charts of one (site, vendor), as trusted SVG markup
    (``line_chart`` escapes every text it draws)."""
    buckets = item["buckets"]
    labels = [bucket_label(b["start_ms"], range_name) for b in buckets]
    where = f"{item['vendor']} on {item['site_id']}"
    latency = line_chart([Series("p50", [b["p50_ms"] for b in buckets]),
                          Series("p95", [b["p95_ms"] for b in buckets])], labels,
                         title=f"{where}: latency (ms), p50 and p95", unit=" ms")
    success = line_chart([Series("success", [None if b["success_rate"] is None
                                             else round(100 * b["success_rate"], 1)
                                             for b in buckets])], labels,
                         title=f"{where}: attempts answered 2xx (%)", unit="%", y_max=100)
    return {"latency": Markup(latency), "success": Markup(success)}


def routes(console: Console) -> list[Route]:
    secrets = secret_values(console.settings)

    async def show(request: Request) -> Response:
        range_name = request.query_params.get("range") or "24h"
        site = request.query_params.get("site") or None
        problem = None
        if range_name not in RANGES:
            problem, range_name = f"range: one of {', '.join(RANGES)}", "24h"
        if site is not None and site not in console.settings.sites:
            problem, site = f"site: one of {', '.join(console.settings.sites)}, or blank", None
        now = now_ms()
        overview = await console.reads().vendor_overview(now, range_name, site)
        configured = {(s.id, name) for s in console.settings.sites.values()
                      for name in s.vendors if site is None or s.id == site}
        seen = {(item["site_id"], item["vendor"]) for item in overview}
        for site_id, vendor in sorted(configured - seen):  # configured, nothing stored yet
            overview.append(empty_overview(now, range_name, site_id, vendor))
        overview.sort(key=lambda item: (item["site_id"], item["vendor"]))
        for item in overview:
            item["charts"] = charts(item, range_name)
            item["configured"] = (item["site_id"], item["vendor"]) in configured
            item["oldest_pending"] = duration_text(item["oldest_pending_age_s"])
            for error in item["errors"]:
                error["message"] = scrub(error["message"], secrets)
        return console.render(request, "admin/vendors.html", status_code=400 if problem else 200,
                              overview=overview, range=range_name, ranges=list(RANGES),
                              site=site or "", states=STATES, problem=problem, now=now)

    return [console.route("/vendors", show)]


def empty_overview(now: int, range_name: str, site_id: str, vendor: str) -> dict[str, Any]:
    """A configured vendor with no rows yet: zero counts, empty series (shown, not hidden)."""
    width, _, starts = bucket_starts(now, range_name)
    return {"site_id": site_id, "vendor": vendor, **{state: 0 for state in STATES},
            "oldest_pending_age_s": None, "settled_window": None, "range": range_name,
            "bucket_ms": width,
            "buckets": [{"start_ms": s, "attempts": 0, "succeeded": 0, "success_rate": None,
                         "p50_ms": None, "p95_ms": None} for s in starts],
            "attempts": 0, "success_rate": None, "errors": []}
