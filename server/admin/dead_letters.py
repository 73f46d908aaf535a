"""``/admin/deadletters``: find what failed, count what a replay would take, replay exactly that.

The filter form (vendor, site, since/until, state, error text) lists the matching rows and
the dry run's count; "Replay these N" posts the filter with the count shown and the set's
fingerprint (``deadletters.fingerprint``). The store replays only if the set is still that
one, in the same transaction that records the replay; otherwise the page says the set
changed and shows it as it is now. Relative times (``2h``) are resolved once, when the list
is shown: the replay form carries the instants, so a later POST means the same rows.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Mapping
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..store import deadletters
from ..store.deadletters import LISTABLE_STATES, REPLAYABLE_STATES, ReplayFilter
from ..vendors import VENDORS
from . import auth
from .scrub import scrub, secret_values
from .web import PREFIX, SECURITY_HEADERS, Console, now_ms

PAGE_ROWS = 50
RELATIVE_RE = re.compile(r"^([0-9]{1,6})\s*([mhdw])$")
ID_RE = re.compile(r"[0-9]{1,18}")  # a row id: ASCII digits only (isdigit takes "²" too)
UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
MAX_FIELD_CHARS = 64  # a time, a site id, a vendor name
TIME_CHOICES = {"created": "created", "updated": "last attempt"}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last instant iso_ms can write


class BadFilter(ValueError):
    """A filter field the operator must fix: ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_time(text: str, now: int, field: str) -> int | None:
    """``30m``, ``2h``, ``3d``, ``1w`` ago, or an ISO date/time (UTC unless it says
    otherwise, as the console shows UTC) → Unix ms; blank → None."""
    text = text.strip()
    if not text:
        return None
    if len(text) > MAX_FIELD_CHARS:
        raise BadFilter(field, f"at most {MAX_FIELD_CHARS} characters")
    match = RELATIVE_RE.match(text)
    if match:
        return _in_range(now - int(match.group(1)) * UNIT_MS[match.group(2)], field)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        raise BadFilter(field, "a relative time like 2h or 3d, or a UTC date/time like "
                               "2026-01-31 or 2026-01-31T14:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    try:  # integer arithmetic: a float timestamp * 1000 can be a millisecond off
        ms = (when - EPOCH) // dt.timedelta(milliseconds=1)
    except (OverflowError, OSError, ValueError):
        raise BadFilter(field, "out of range") from None
    return _in_range(ms, field)


def _in_range(ms: int, field: str) -> int:
    """``ms`` if it is an instant the pages can show (1970 to 9999, UTC); ``999999w`` ago is
    not, and would fail when the page writes it back."""
    if not 0 <= ms <= MAX_MS:
        raise BadFilter(field, "out of range: from 1970-01-01 to 9999-12-31 (UTC)")
    return ms


def iso_ms(ms: int | None) -> str:
    """Unix ms → an ISO instant ``parse_time`` reads back exactly."""
    if ms is None:
        return ""
    return (EPOCH + dt.timedelta(milliseconds=ms)).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def parse_filter(params: Mapping[str, str], sites: Any, now: int) -> ReplayFilter:
    """The operator's filter from a query string or form; ``BadFilter`` names a bad field."""
    def text(name: str, limit: int = MAX_FIELD_CHARS) -> str:
        value = (params.get(name) or "").strip()
        if len(value) > limit:
            raise BadFilter(name, f"at most {limit} characters")
        return value

    vendor = text("vendor")
    if vendor and vendor not in VENDORS:
        raise BadFilter("vendor", f"one of {', '.join(sorted(VENDORS))}, or blank for all")
    site = text("site")
    if site and site not in sites:
        raise BadFilter("site", f"one of {', '.join(sites)}, or blank for all")
    state = text("state") or "dead"
    if state not in LISTABLE_STATES:
        raise BadFilter("state", f"one of {', '.join(LISTABLE_STATES)}")
    time_field = text("time") or "created"
    if time_field not in TIME_CHOICES:
        raise BadFilter("time", f"one of {', '.join(TIME_CHOICES)}")
    error = text("error", deadletters.MAX_ERROR_TEXT) or None
    selection = ReplayFilter((state,), vendor or None, site or None,
                             parse_time(text("since"), now, "since"),
                             parse_time(text("until"), now, "until"), error, None, time_field)
    problem = deadletters.check(selection)
    if problem:
        field, _, message = problem.partition(": ")
        raise BadFilter(field, message)
    return selection


def query_of(selection: ReplayFilter) -> dict[str, str]:
    """The filter as the form's fields, times as exact instants."""
    fields = {"state": selection.states[0], "vendor": selection.vendor or "",
              "site": selection.site_id or "", "since": iso_ms(selection.since_ms),
              "until": iso_ms(selection.until_ms), "error": selection.error or "",
              "time": selection.time_field}
    return fields


def describe_scope(scope: Mapping[str, Any]) -> str:
    """A replay record's filter as one line: ``dead · vendor sendlane · since 2026-…Z``."""
    parts = []
    for key, value in scope.items():
        if key in ("since_ms", "until_ms") and isinstance(value, int):
            parts.append(f"{key[:-3]} {iso_ms(value)}")
        elif key == "states" and isinstance(value, list):
            parts.append(" and ".join(map(str, value)))
        elif key == "ids" and isinstance(value, list):
            parts.append("#" + ", #".join(map(str, value)))
        elif key == "error":
            parts.append(f"error contains {value!r}")
        elif key == "time_field":
            parts.append("times of last attempt" if value == "updated" else f"times of {value}")
        else:
            parts.append(f"{key.removesuffix('_id')} {value}")
    return " · ".join(parts)


def routes(console: Console) -> list[Route]:
    settings, store = console.settings, console.store
    secrets = secret_values(settings)

    async def page(request: Request, params: Mapping[str, str], status_code: int = 200,
                   notice: str | None = None, changed: dict[str, Any] | None = None) -> Response:
        now = now_ms()
        form = {name: (params.get(name) or "")[:deadletters.MAX_ERROR_TEXT]
                for name in ("state", "vendor", "site", "since", "until", "error", "time")}
        context: dict[str, Any] = {"form": form, "states": LISTABLE_STATES,
                                   "vendors": sorted(VENDORS), "time_choices": TIME_CHOICES,
                                   "notice": notice, "problem": None, "listing": None,
                                   "replayable": None, "changed": changed, "too_many": None,
                                   "replays": await console.reads().recent_replays(10),
                                   "scrub": lambda value: scrub(value, secrets),
                                   "describe": describe_scope}
        try:
            selection = parse_filter(params, settings.sites, now)
            before = params.get("before") or None
            if before is not None and not ID_RE.fullmatch(before):
                raise BadFilter("before", "a delivery id")
        except BadFilter as exc:
            context["problem"] = str(exc)
            return console.render(request, "admin/deadletters.html", status_code=400, **context)
        context["listing"] = await console.reads().dead_letters(
            selection, PAGE_ROWS, None if before is None else int(before))
        context["exact"] = query_of(selection)
        context["next_href"] = None
        if context["listing"]["next_before_id"] is not None:
            context["next_href"] = f"{PREFIX}/deadletters?" + urlencode(
                {**context["exact"], "before": context["listing"]["next_before_id"]})
        if selection.states[0] in REPLAYABLE_STATES:
            try:
                count, fingerprint = await store.replay_preview(now, selection)
            except ValueError as exc:  # more than one replay may take
                context["too_many"] = str(exc)
            else:
                context["replayable"] = {"count": count, "fingerprint": fingerprint}
        return console.render(request, "admin/deadletters.html", status_code=status_code,
                              **context)

    async def show(request: Request) -> Response:
        """The filter form, the matching rows, the dry-run count and recent replays."""
        notice = None
        replayed = request.query_params.get("replayed")
        if replayed and ID_RE.fullmatch(replayed):
            found = [r for r in await console.reads().recent_replays(50)
                     if r["id"] == int(replayed)]
            if found:
                notice = (f"Replayed {found[0]['replayed']} deliveries (replay "
                          f"#{found[0]['id']}); the forwarder sends them within seconds.")
        return await page(request, request.query_params, notice=notice)

    async def replay(request: Request) -> Response:
        """POST: replay exactly the set the operator saw, or say it changed."""
        form = await console.form(request)
        now = now_ms()
        try:
            selection = parse_filter(form, settings.sites, now)
            expect = form.get("expect") or ""
            shown = form.get("shown") or ""
            if not re.fullmatch(r"[0-9a-f]{32}", expect):
                raise BadFilter("expect", "the dry run's fingerprint is missing; list again")
            if not re.fullmatch(r"[0-9]{1,9}", shown):
                raise BadFilter("shown", "the count shown is missing; list again")
            if selection.states[0] not in REPLAYABLE_STATES:
                raise BadFilter("state", f"{selection.states[0]} deliveries are not replayed")
        except BadFilter as exc:
            return await page(request, form, status_code=400, notice=f"Not replayed: {exc}")
        address = auth.client_address(request)
        try:
            result = await store.replay_recorded(now, selection, f"console:{address}",
                                                 expect=expect, shown=int(shown))
        except ValueError as exc:  # grew past what one replay may take
            return await page(request, form, status_code=400, notice=f"Not replayed: {exc}")
        if result["changed"]:
            return await page(request, query_of(selection), status_code=409, changed={
                "shown": int(shown), "now": len(result["rows"])})
        query = urlencode({**query_of(selection), "replayed": result["replay_id"]})
        return RedirectResponse(f"{PREFIX}/deadletters?{query}", 303, headers=SECURITY_HEADERS)

    async def record(request: Request, rows: list[dict[str, Any]], scope: dict[str, Any]
                     ) -> int:
        """``console.replay_recorder``: a replay made from another page (a delivery's own)
        recorded like this page's, as ``console:<client address>``."""
        address = auth.client_address(request)
        return await store.record_replay(now_ms(), f"console:{address}", scope, rows,
                                         shown=len(rows))

    console.replay_recorder = record
    return [
        console.route("/deadletters", show),
        console.route("/deadletters/replay", replay, methods=["POST"]),
    ]
