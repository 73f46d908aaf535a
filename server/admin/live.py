"""Live: events as they arrive, over Server-Sent Events (``/admin/live/stream``).

The stream tails the events table by ``seq`` through the store's console reads, every
``POLL_S``, so it shows events written by any process (another ``onetag serve`` on the same
file or database, a worker, a backfill). Where rows can become visible after higher seqs
(PostgreSQL: several nodes commit in any order), ``LateRows`` looks again for the seqs
it found missing, for a few seconds, and sends those that turn up. The filters are applied in the query; each message carries at
most ``ROWS_PER_MESSAGE`` rows; a comment every ``HEARTBEAT_S`` keeps proxies from closing
an idle stream; the loop ends when the client goes away, or when its login expires or logs
out. At most ``MAX_STREAMS_PER_SESSION`` streams per login and ``MAX_STREAMS`` in all are
open at once (each polls the database); more are answered 429.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, AsyncIterator
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..events import echo
from ..store import console_search as q
from .web import PREFIX, SECURITY_HEADERS, Console, Operator, format_ms, now_ms

POLL_S = 0.4
HEARTBEAT_S = 15.0
# How often an open stream asks the database whether its login was logged out elsewhere
# (another node, another process); a logout in this process ends it within a poll.
LOGOUT_CHECK_S = 2.0
ROWS_PER_MESSAGE = 100
FIRST_ROWS = 50
FILTERS = ("site", "name", "source", "email", "sc")
MAX_FILTER_CHARS = {"site": 64, "name": 64, "source": 20, "email": 254, "sc": 64}
# A seq: ASCII digits that fit SQLite's integers (str.isdigit also takes "²", which int()
# refuses, and any length, which SQLite refuses).
SEQ_RE = re.compile(r"[0-9]{1,18}")
# Each open stream polls the database every POLL_S: at most this many per login and in all
# (more answer 429). A Live tab holds one; a browser allows ~6 connections per host anyway.
MAX_STREAMS_PER_SESSION = 4
MAX_STREAMS = 32


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
            raise BadFilter(name, f"no site {echo(value)} is configured")
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


class Streams:
    """The open streams, by session nonce: what the bounds are checked against."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def refusal(self, nonce: str) -> str | None:
        """Why one more stream for this session may not open, or None."""
        if self.open.get(nonce, 0) >= MAX_STREAMS_PER_SESSION:
            return (f"too many Live streams open for this login (at most "
                    f"{MAX_STREAMS_PER_SESSION}): close a Live tab")
        if sum(self.open.values()) >= MAX_STREAMS:
            return f"too many Live streams open (at most {MAX_STREAMS} in all); try later"
        return None

    def opened(self, nonce: str) -> None:
        self.open[nonce] = self.open.get(nonce, 0) + 1

    def closed(self, nonce: str) -> None:
        left = self.open.get(nonce, 0) - 1
        if left > 0:
            self.open[nonce] = left
        else:
            self.open.pop(nonce, None)


class CountedStream(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` once it is over, however it ends (the
    client gone, the stream ended, or cancelled before its first byte)."""

    def __init__(self, *args: Any, on_close: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class LateRows:
    """Live's second look, on a store whose rows can become visible after rows with a
    higher seq (PostgreSQL: nodes draw seqs from one sequence and commit in any order;
    ``ConsoleReads.late_window_s``). Seqs missing from a range the stream has passed are
    kept for ``window_s`` and looked for each poll; one that turns up is sent then (a row
    of another node's commit), one still missing after the window is taken as never
    stored (a rolled back transaction also uses seqs). A stream also looks at the
    ``LOOKBACK`` seqs below its start (below the page's rows). Bounded: a range longer
    than ``MAX_SCAN`` seqs (a stream far behind) is not searched for holes, and at most
    ``MAX_HOLES`` are kept, the newest."""

    MAX_SCAN = 20_000
    MAX_HOLES = 2_000
    LOOKBACK = 1_000  # seqs below a stream's start looked at for holes

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.holes: dict[int, float] = {}  # seq: when it was first found missing

    async def passed(self, reads: Any, after: int, upto: int) -> None:
        """The stream moved from ``after`` to ``upto``: note the seqs not stored there."""
        if upto - after > self.MAX_SCAN:
            return
        present = set(await reads.seqs_between(after, upto, self.MAX_SCAN))
        now = time.monotonic()
        for seq in range(after + 1, upto + 1):
            if seq not in present:
                self.holes[seq] = now
        while len(self.holes) > self.MAX_HOLES:
            self.holes.pop(min(self.holes))

    async def found(self, reads: Any, where: tuple[str, list[Any]]) -> list[dict[str, Any]]:
        """Rows stored since in the holes that pass the filters (the holes they fill, and
        those older than the window, are forgotten)."""
        if not self.holes:
            return []
        seqs = sorted(self.holes)
        stored = set(await reads.seqs_in(seqs))
        rows = await reads.events_at(sorted(stored), where) if stored else []
        cutoff = time.monotonic() - self.window_s
        self.holes = {seq: at for seq, at in self.holes.items()
                      if seq not in stored and at > cutoff}
        return rows


def message(after: int, rows: list[dict[str, Any]]) -> str:
    return (f"id: {after}\nevent: events\n"
            f"data: {json.dumps([row_json(r) for r in rows])}\n\n")


async def tail(console: Console, request: Request, filters: dict[str, str], after: int,
               poll_s: float = POLL_S, heartbeat_s: float = HEARTBEAT_S,
               until_ms: int | None = None, session: str | None = None
               ) -> AsyncIterator[str]:
    """SSE text: ``event: events`` messages (``id:`` the last seq scanned, data a JSON list
    of rows), heartbeat comments, until the client disconnects, ``until_ms`` (the
    session's expiry) or the ``session`` (its nonce) logs out: an open page does not
    outlive its login (a logout in this process ends it within a poll, one on another node
    or before a restart within ``LOGOUT_CHECK_S``)."""
    where = console.reads().live_filter(list(console.settings.sites), **filters)
    last_sent = time.monotonic()
    checked = time.monotonic()
    late: LateRows | None = None
    yield "retry: 2000\n\n"
    while True:
        if await request.is_disconnected() or (until_ms is not None and now_ms() >= until_ms):
            return
        if session is not None and session in console.revoked:
            return
        if session is not None and time.monotonic() - checked >= LOGOUT_CHECK_S:
            checked = time.monotonic()
            try:
                if await console.logged_out(Operator(session, until_ms or 0)):
                    return
            except HTTPException:  # the database can't be read: the page reconnects later
                return
        reads = console.reads()
        if late is None and reads.late_window_s > 0:
            late = LateRows(reads.late_window_s)
            # Seqs just below the start may still be committing (the page showed the rows
            # below it that were stored): look for those too.
            await late.passed(reads, max(0, after - LateRows.LOOKBACK), after)
        top = await reads.latest_seq()
        full = False
        if top > after:
            rows = await reads.tail_events(after, top, where, ROWS_PER_MESSAGE)
            # All of (after, top] was scanned unless the rows filled the message.
            full = len(rows) == ROWS_PER_MESSAGE
            scanned = rows[-1]["seq"] if full else top
            if late is not None:
                await late.passed(reads, after, scanned)
            after = scanned
            if rows:
                yield message(after, rows)
                last_sent = time.monotonic()
        if late is not None:
            found = await late.found(reads, where)
            for start in range(0, len(found), ROWS_PER_MESSAGE):
                yield message(after, found[start:start + ROWS_PER_MESSAGE])
                last_sent = time.monotonic()
        if full:
            continue  # more are waiting: no pause
        if time.monotonic() - last_sent >= heartbeat_s:
            yield ": heartbeat\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(poll_s)


def routes(console: Console) -> list[Route]:
    streams = Streams()

    async def page(request: Request) -> Response:
        """The latest events (filtered) and the stream's address for what comes next."""
        try:
            filters = read_filters(console, request.query_params)
        except BadFilter as exc:
            return console.render(request, "admin/live.html", status_code=400, error=str(exc),
                                  filters={}, rows=[], stream="", after=0, sources=q.SOURCES)
        reads = console.reads()
        # The stream starts after the newest event shown: none falls between the two.
        after = await reads.latest_seq()
        where = reads.live_filter(list(console.settings.sites), **filters)
        rows = await reads.recent_events(where, FIRST_ROWS, before_seq=after + 1)
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
        after = int(given) if given else await console.reads().latest_seq()
        operator = console.operator(request)  # the route asks for a login: never None here
        refusal = streams.refusal(operator.nonce)
        if refusal is not None:
            return Response(refusal, status_code=429, media_type="text/plain",
                            headers={**SECURITY_HEADERS, "Retry-After": "10"})
        streams.opened(operator.nonce)
        return CountedStream(tail(console, request, filters, after, until_ms=operator.expires_ms,
                                  session=operator.nonce),
                             media_type="text/event-stream",
                             headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"},
                             on_close=lambda: streams.closed(operator.nonce))

    return [console.route("/live", page), console.route("/live/stream", stream)]
