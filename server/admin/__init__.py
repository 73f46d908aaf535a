"""The operator console under ``/admin/`` (docs/console.md).

``admin_app(settings, store)`` is what ``server/app.py`` mounts at ``/admin``: the routes of
``admin_routes(settings, store)``, every answer with ``SECURITY_HEADERS``. Each page
module exports ``routes(console) -> list[Route]``; adding a page is adding its module's
name to ``PAGE_MODULES``. Without ``[server] admin_token`` every console URL answers a 404
page saying how to turn the console on, and nothing else is served.
"""

from __future__ import annotations

import importlib
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import Message, Receive, Scope, Send

from .web import SECURITY_HEADERS, Console

PAGE_MODULES = (
    "login",  # /admin/login, /admin/logout, /admin/ itself
    # console-a's pages:
    "live",  # /admin/live, /admin/live/stream
    "events",  # /admin/events/{seq}, /admin/deliveries/{id} (+ /replay)
    "search",  # /admin/search
    "install",  # /admin/install, /admin/install/check.json

    # console-b's pages:
    "vendors",  # /admin/vendors
    "dead_letters",  # /admin/deadletters, /admin/deadletters/replay
    "reconcile",  # /admin/reconcile

)


def admin_routes(settings: Any, store: Any) -> list[BaseRoute]:
    console = Console(settings, store)
    if not console.enabled:
        async def off(request: Request) -> Response:
            return console.render(request, "admin/off.html", status_code=404)
        return [Route("/{path:path}", off, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]
    routes: list[BaseRoute] = []
    for name in PAGE_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        routes.extend(module.routes(console))

    async def not_found(request: Request) -> Response:
        return console.render(request, "admin/message.html", status_code=404,
                              heading="Not found", message="No console page has this address.")
    # Last: any other address under /admin/ asks for a login too, then answers 404.
    routes.append(console.route("/{path:path}", not_found, methods=["GET", "POST"]))
    return routes


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` (those a response has not set) to every answer of ``app``:
    the pages set them, but the router's 405 (PUT, OPTIONS, TRACE on a page) and a handler's
    ``HTTPException`` (503: the store is not open) are answered as exceptions, outside them."""

    def __init__(self, app: Router):
        self.app = app

    @property
    def routes(self) -> list[BaseRoute]:  # what Mount.routes shows
        return self.app.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except HTTPException as exc:
            response = PlainTextResponse(exc.detail, status_code=exc.status_code,
                                         headers={**(exc.headers or {}), **SECURITY_HEADERS})
            await response(scope, receive, send)


def admin_app(settings: Any, store: Any) -> SecurityHeaders:
    return SecurityHeaders(Router(routes=admin_routes(settings, store)))


__all__ = ["Console", "SECURITY_HEADERS", "admin_app", "admin_routes", "PAGE_MODULES"]
