"""``/admin/reconcile``: the orders the shop's backend sent against what each vendor took.

Per site and vendor over a chosen range: orders received (backend ``purchase`` events,
one per ``transaction_id``), orders the vendor accepted (its purchase delivery delivered,
or taken by its library in the page), and the rest listed with their delivery's state and
last error, or why no delivery was planned; each links to Search by order id.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..store.console_ops import MAX_MISSING_LISTED
from ..vendors import VENDORS
from .dead_letters import BadFilter, iso_ms, parse_time
from .scrub import scrub, secret_values
from .web import Console, now_ms

DEFAULT_SINCE = "7d"


def routes(console: Console) -> list[Route]:
    settings = console.settings
    secrets = secret_values(settings)

    async def show(request: Request) -> Response:
        params = request.query_params
        form = {name: (params.get(name) or "")[:64] for name in ("site", "vendor", "since", "until")}
        form["since"] = form["since"] or DEFAULT_SINCE
        now = now_ms()
        report, problem = None, None
        try:
            if form["site"] and form["site"] not in settings.sites:
                raise BadFilter("site", f"one of {', '.join(settings.sites)}, or blank for all")
            if form["vendor"] and form["vendor"] not in VENDORS:
                raise BadFilter("vendor", f"one of {', '.join(sorted(VENDORS))}, or blank")
            since = parse_time(form["since"], now, "since")
            until = parse_time(form["until"], now, "until")
            since = 0 if since is None else since
            until = now + 1 if until is None else until
            if until <= since:
                raise BadFilter("until", "must be later than since")
            report = await console.reads().reconcile(settings.sites, since, until,
                                                     form["site"] or None, form["vendor"] or None)
        except BadFilter as exc:
            problem = str(exc)
        except ValueError as exc:  # too many orders in the range: narrow it
            problem = str(exc)
        for entry in report or ():
            for missing in entry["missing"]:
                missing["last_error"] = scrub(missing["last_error"], secrets)
        return console.render(
            request, "admin/reconcile.html", status_code=400 if problem else 200, form=form,
            vendors=sorted(VENDORS), report=report, problem=problem,
            range_text=None if report is None else f"{iso_ms(since)} to {iso_ms(until)}",
            listed=MAX_MISSING_LISTED)

    return [console.route("/reconcile", show)]
