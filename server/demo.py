"""The demo storefront at ``/demo/``, and the local stand-ins it forwards to.

``/demo/session`` shows what onetag stored for the visitor; ``/demo/sink/{vendor}`` plays
each vendor's server API (it answers 200 and remembers the last requests, listed at
``GET /demo/sink``), so the demo shows the whole road without reaching the internet.

It also plays the shop's own server, the trusted side (docs/security.md): ``/demo/identity``
signs an email with the site's ``identity_secret`` (a shop signs its signed-in customer's
email when it renders the page; the demo has no accounts, so it signs the one typed) and
``/demo/order`` reports a placed order through the backend path, as a shop's order webhook
would, so the vendors get it as a fact.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from . import events as vocabulary
from . import trust
from .sessions import COOKIE_NAME, valid_sc
from .store.base import SessionInfo

SINK_KEEP = 200


class Demo:
    def __init__(self, settings: Any, store: Any, env: Any, site_id: str = "demo",
                 on_stored: Any = None):
        self.settings = settings
        self.store = store
        self.env = env
        self.site_id = site_id
        self.on_stored = on_stored  # the forwarder's wake-up
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

    async def identity(self, request: Request) -> Response:
        """``{email}`` → ``{email, signature}``: what a shop's page template puts in
        ``user.signature`` for its signed-in customer."""
        try:
            email = (await request.json()).get("email")
        except (ValueError, AttributeError):
            email = None
        if not isinstance(email, str) or not vocabulary.EMAIL_RE.match(email.strip()):
            return JSONResponse({"error": "invalid_event", "errors": [
                {"field": "email", "problem": "must be an email address"}]}, status_code=422)
        secret = self.settings.sites[self.site_id].identity_secret
        return JSONResponse({"email": email.strip().lower(),
                             "signature": trust.signature(secret, email)})

    async def order(self, request: Request) -> Response:
        """The demo shop's backend reporting an order: ``{user, ecommerce}`` stored as a
        backend ``purchase`` tied to the visitor's session (its sc cookie)."""
        site = self.settings.sites[self.site_id]
        try:
            body = vocabulary.parse_json(await request.body())
            if not isinstance(body, dict):
                raise vocabulary.Invalid("body", "must be an object {user, ecommerce}")
            raw = {"event": "purchase", "user": body.get("user"), "ecommerce": body.get("ecommerce"),
                   "sc": valid_sc(request.cookies.get(COOKIE_NAME))}
            tid = (raw["ecommerce"] or {}).get("transaction_id") if isinstance(
                raw["ecommerce"], dict) else None
            raw["event_id"] = f"demo-order-{tid}" if isinstance(tid, str) else None
            event = vocabulary.normalise(raw, "body", vocabulary.Origin(
                site_id=site.id, source=trust.BACKEND, currency=site.currency,
                received_ms=int(time.time() * 1000)))
        except vocabulary.Invalid as exc:
            return JSONResponse({"error": "invalid_event", "errors": [exc.as_dict()]},
                                status_code=422)
        results = await self.store.ingest(site.id, [event], [raw], SessionInfo())
        if self.on_stored is not None and any(not r.duplicate for r in results):
            self.on_stored()
        return JSONResponse({"event_ids": [r.event_id for r in results]}, status_code=202)

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
