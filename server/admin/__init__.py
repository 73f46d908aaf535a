"""The operator console under ``/admin/`` (README, "Operator console").

``admin_routes(settings, store)`` is what ``server/app.py`` mounts at ``/admin``. Each page
module exports ``routes(console) -> list[Route]``; adding a page is adding its module's
name to ``PAGE_MODULES``. Without ``[server] admin_token`` every console URL answers a 404
page saying how to turn the console on, and nothing else is served.
"""

from __future__ import annotations

import importlib
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

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


__all__ = ["Console", "SECURITY_HEADERS", "admin_routes", "PAGE_MODULES"]
