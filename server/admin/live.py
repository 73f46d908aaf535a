"""Live: events as they arrive, over Server-Sent Events (``/admin/live/stream``).

The stream tails the events table by ``seq`` on the store's read connection, every
``POLL_S``, so it shows events written by any process (another ``onetag serve`` on the same
file, a worker, a backfill). The filters are applied in the query; each message carries at
most ``ROWS_PER_MESSAGE`` rows; a comment every ``HEARTBEAT_S`` keeps proxies from closing
an idle stream; the loop ends when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, AsyncIterator
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..store import sqlite_console_search as q
from .web import PREFIX, SECURITY_HEADERS, Console, format_ms, now_ms

POLL_S = 0.4
HEARTBEAT_S = 15.0
ROWS_PER_MESSAGE = 100
FIRST_ROWS = 50
FILTERS = ("site", "name", "source", "email", "sc")
MAX_FILTER_CHARS = {"site": 64, "name": 64, "source": 20, "email": 254, "sc": 64}
# A seq: ASCII digits that fit SQLite's integers (str.isdigit also takes "²", which int()
# refuses, and any length, which SQLite refuses).
SEQ_RE = re.compile(r"[0-9]{1,18}")


class BadFilter(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def read_filters(console: Console, params: Any) -> dict[str, str]:
    """The Live filters from a query string; a bad one raises ``BadFilter`` naming it."""
    found = {}
    for name in FILTERS:
        value = (params.get(name) or "").strip()
        if not value:
            continue
        if len(value) > MAX_FILTER_CHARS[name]:
            raise BadFilter(name, f"at most {MAX_FILTER_CHARS[name]} characters")
        if name == "site" and value not in console.settings.sites:
            raise BadFilter(name, f"no site {value!r} is configured")
        if name == "source" and value not in q.SOURCES:
            raise BadFilter(name, f"must be one of {', '.join(q.SOURCES)}")
        found[name] = value
    return found


def row_json(row: dict[str, Any]) -> dict[str, Any]:
    """What the page's script puts in a table row (as text, never as HTML)."""
    return {"seq": row["seq"], "time": format_ms(row["received_ms"]), "site": row["site_id"],
            "name": row["name"], "source": row["source"], "email": row.get("email") or "",
            "sc": row.get("sc") or "", "summary": row.get("summary") or "",
            "href": f"{PREFIX}/events/{row['seq']}"}


async def tail(console: Console, request: Request, filters: dict[str, str], after: int,
               poll_s: float = POLL_S, heartbeat_s: float = HEARTBEAT_S,
               until_ms: int | None = None) -> AsyncIterator[str]:
    """SSE text: ``event: events`` messages (``id:`` the last seq scanned, data a JSON list
    of rows), heartbeat comments, until the client disconnects or ``until_ms`` (the
    session's expiry: an open page does not outlive its login)."""
    where = q.live_filter(**filters)
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        if await request.is_disconnected() or (until_ms is not None and now_ms() >= until_ms):
            return
        db = console.db()
        top = await q.latest_seq(db)
        if top > after:
            rows = await q.tail_events(db, after, top, where, ROWS_PER_MESSAGE)
            # All of (after, top] was scanned unless the rows filled the message.
            after = rows[-1]["seq"] if len(rows) == ROWS_PER_MESSAGE else top
            if rows:
                yield (f"id: {after}\nevent: events\n"
                       f"data: {json.dumps([row_json(r) for r in rows])}\n\n")
                last_sent = time.monotonic()
                if len(rows) == ROWS_PER_MESSAGE:
                    continue  # more are waiting: no pause
        if time.monotonic() - last_sent >= heartbeat_s:
            yield ": heartbeat\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(poll_s)


def routes(console: Console) -> list[Route]:
    async def page(request: Request) -> Response:
        """The latest events (filtered) and the stream's address for what comes next."""
        try:
            filters = read_filters(console, request.query_params)
        except BadFilter as exc:
            return console.render(request, "admin/live.html", status_code=400, error=str(exc),
                                  filters={}, rows=[], stream="", after=0, sources=q.SOURCES)
        db = console.db()
        # The stream starts after the newest event shown: none falls between the two.
        after = await q.latest_seq(db)
        rows = await q.recent_events(db, q.live_filter(**filters), FIRST_ROWS,
                                     before_seq=after + 1)
        stream = f"{PREFIX}/live/stream?{urlencode({**filters, 'after': after})}"
        return console.render(request, "admin/live.html", filters=filters,
                              rows=[row_json(r) for r in rows], stream=stream, after=after,
                              sources=q.SOURCES, error=None)

    async def stream(request: Request) -> Response:
        try:
            filters = read_filters(console, request.query_params)
        except BadFilter as exc:
            return Response(str(exc), status_code=400, media_type="text/plain",
                            headers=SECURITY_HEADERS)
        given = request.headers.get("last-event-id") or request.query_params.get("after")
        if given is not None and not SEQ_RE.fullmatch(given):
            return Response("after: must be an event seq (digits)", status_code=400,
                            media_type="text/plain", headers=SECURITY_HEADERS)
        after = int(given) if given else await q.latest_seq(console.db())
        operator = console.operator(request)
        return StreamingResponse(tail(console, request, filters, after,
                                      until_ms=operator.expires_ms if operator else None),
                                 media_type="text/event-stream",
                                 headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"})

    return [console.route("/live", page), console.route("/live/stream", stream)]
