"""The demo storefront at ``/demo/``, and the local stand-ins it forwards to.

``/demo/session`` shows what onetag stored for the visitor; ``/demo/sink/{vendor}`` plays
each vendor's server API (it answers 200 and remembers the last requests, listed at
``GET /demo/sink``), so the demo shows the whole road without reaching the internet.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .sessions import COOKIE_NAME, valid_sc

SINK_KEEP = 200


class Demo:
    def __init__(self, settings: Any, store: Any, env: Any, site_id: str = "demo"):
        self.settings = settings
        self.store = store
        self.env = env
        self.site_id = site_id
        self.sink: collections.deque[dict[str, Any]] = collections.deque(maxlen=SINK_KEEP)

    async def page(self, request: Request) -> Response:
        html = self.env.get_template("demo/index.html").render(
            script_src=self.settings.server.script_path.format(site_id=self.site_id),
            site_id=self.site_id, public_url=self.settings.server.public_url)
        return HTMLResponse(html)

    async def page_app(self, scope: Any, receive: Any, send: Any) -> None:
        """``page`` as an ASGI app, so a middleware (gzip) can wrap this one route."""
        response = await self.page(Request(scope, receive))
        await response(scope, receive, send)

    async def session(self, request: Request) -> Response:
        sc = valid_sc(request.cookies.get(COOKIE_NAME))
        if sc is None:
            return JSONResponse({"sc": None, "identity": None, "cart": None, "events": [],
                                 "deliveries": []})
        return JSONResponse(await self.store.session_view(self.site_id, sc))

    async def sink_record(self, request: Request) -> Response:
        body = await request.body()
        try:
            payload: Any = json.loads(body) if body else None
        except ValueError:
            payload = body.decode("utf-8", "replace")
        self.sink.appendleft({
            "vendor": request.path_params["vendor"], "method": request.method,
            "path": request.url.path, "query": request.url.query, "time_ms": int(time.time() * 1000),
            "headers": {k: v for k, v in request.headers.items()
                        if k.lower() in ("content-type", "x-event-type")},
            "json": payload})
        return JSONResponse({"status": "success"})

    async def sink_list(self, request: Request) -> Response:
        return JSONResponse(list(self.sink))
