"""Search: one customer or order, everything onetag knows of it.

By email, ``sc``, order id (``transaction_id``) or event id: the identity, its sessions,
its timeline of events (newest first, bounded), the latest cart, and every delivery of
those events with its attempts (the request beside the vendor's answer).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..store import console_search as q
from .web import Console

MAX_QUERY_CHARS = 254


def routes(console: Console) -> list[Route]:
    async def page(request: Request) -> Response:
        query = (request.query_params.get("q") or "").strip()
        if len(query) > MAX_QUERY_CHARS:
            return console.render(request, "admin/search.html", status_code=400, query="",
                                  result=None,
                                  error=f"q: at most {MAX_QUERY_CHARS} characters")
        result = None
        if query:
            result = await console.reads().search(list(console.settings.sites), query)
        return console.render(request, "admin/search.html", query=query, result=result,
                              error=None, timeline_limit=q.TIMELINE_LIMIT)

    return [console.route("/search", page)]
