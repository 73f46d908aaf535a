"""Search: one customer or order, everything onetag knows of it.

By email, ``sc``, order id (``transaction_id``) or event id: the identity, its sessions,
its timeline of events (newest first, bounded), the latest cart, and every delivery of
those events with its attempts (the request beside the vendor's answer). An event id
matching more events than a page (one per browser session) says "showing 20 of N" and
links the older ones (``before``: the seq the next page starts below).
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..store import console_search as q
from .web import PREFIX, Console

MAX_QUERY_CHARS = 254


def routes(console: Console) -> list[Route]:
    async def page(request: Request) -> Response:
        query = (request.query_params.get("q") or "").strip()
        if len(query) > MAX_QUERY_CHARS:
            return console.render(request, "admin/search.html", status_code=400, query="",
                                  result=None,
                                  error=f"q: at most {MAX_QUERY_CHARS} characters")
        before = request.query_params.get("before") or None
        if before is not None and not (before.isdigit() and len(before) <= 18):
            return console.render(request, "admin/search.html", status_code=400, query=query,
                                  result=None, error="before: an event's seq (a number)")
        result = None
        if query:
            result = await console.reads().search(
                list(console.settings.sites), query,
                before=None if before is None else int(before))
        older_href = None
        if result and result["event_ids"] and result["event_ids"]["next_before"] is not None:
            older_href = f"{PREFIX}/search?" + urlencode(
                {"q": query, "before": result["event_ids"]["next_before"]})
        return console.render(request, "admin/search.html", query=query, result=result,
                              error=None, timeline_limit=q.TIMELINE_LIMIT, before=before,
                              older_href=older_href,
                              newest_href=f"{PREFIX}/search?" + urlencode({"q": query}))

    return [console.route("/search", page)]
