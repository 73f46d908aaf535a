"""``create_app(settings)``: routes and the lifespan that owns the store and the forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from . import connections
from .admin import admin_app
from .assets import static_dir
from .coupons import PATH as COUPONS_PATH, Coupons
from .demo import Demo
from .feeds import Feeds
from .forwarder import Forwarder, ForwarderOptions
from .ingest import Ingest
from .metrics import Metrics
from .script import ScriptServer
from .store import StoreUnavailable, open_store

log = logging.getLogger("onetag")
HEALTH_PROBLEMS = ("writer", "disk", "database")


class _Endpoint:
    """A plain ASGI app as a Route's endpoint (a bound method would get a Request)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class _App(Starlette):
    """``POST <event_path>`` goes straight to its ASGI handler; everything else through
    Starlette's middleware and router. The handler answers what the route would, 500
    included; skipping the layers saves the hot path ~20 µs a request."""

    fast_post: tuple[str, Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_post
        if (fast is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] == fast[0] and not scope.get("root_path")):
            scope["app"] = self
            await fast[1](scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Any, store: Any = None,
               forward_options: ForwarderOptions | None = None) -> Starlette:
    """``forward_options``: the forwarder's tuning (default: ``ONETAG_FORWARD_*`` env)."""
    store = store if store is not None else open_store(settings)
    scripts = ScriptServer(settings)
    metrics = Metrics(settings, store)  # GET /metrics; the handlers below count into it
    store.on_commit = metrics.committed
    ingest = Ingest(settings, store, metrics)
    feeds = Feeds(settings, store)
    coupons = Coupons(settings, store)
    forwarder = None
    if settings.server.forward:
        forwarder = Forwarder(settings, store, forward_options or ForwarderOptions.from_env(),
                              metrics=metrics)
        ingest.on_stored = forwarder.wake

    async def healthz(request: Request) -> Response:
        """200 only when the store takes writes: a committed write through the writer,
        within 2 s. Otherwise 503 naming the problem: ``writer``, ``disk`` or ``database``."""
        try:
            pid = await store.ping()
        except StoreUnavailable as exc:
            kind = exc.kind if exc.kind in HEALTH_PROBLEMS else "writer"
            return JSONResponse({"status": "unavailable", "problem": kind, "message": exc.message},
                                status_code=503, headers={"Retry-After": str(exc.retry_after_s),
                                                          "Cache-Control": "no-store"})
        except Exception as exc:  # anything else is the database's problem
            return JSONResponse({"status": "unavailable", "problem": "database",
                                 "message": f"{type(exc).__name__}: {exc}"}, status_code=503,
                                headers={"Cache-Control": "no-store"})
        return JSONResponse({"status": "ok", "writer_pid": pid},
                            headers={"Cache-Control": "no-store"})

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route(settings.server.script_path, scripts.endpoint, methods=["GET"]),
        Route(settings.server.event_path, _Endpoint(ingest.browser_events), methods=["POST"]),
        Route(settings.server.event_path, ingest.preflight, methods=["OPTIONS"]),
        Route("/api/v1/sites/{site_id}/events", ingest.backend_events, methods=["POST"]),
        # The product feeds the vendors fetch (server/feeds.py); ?token= the site's feed_token.
        Route("/feeds/{site_id}/products.xml", feeds.xml, methods=["GET"]),
        Route("/feeds/{site_id}/products.csv", feeds.csv, methods=["GET"]),
        # Remarkety's Coupons API: the Discounts endpoint it calls (server/coupons.py).
        Route(COUPONS_PATH, coupons.discounts, methods=["POST"]),
        # Compressed here and on the demo page only: the event endpoint answers 204s, and
        # the script is stored gzipped; a middleware on every route costs /e ~7 µs a request.
        Mount("/static", GZipMiddleware(StaticFiles(directory=str(static_dir())),
                                        minimum_size=1024), name="static"),
        # The operator console (server/admin/): off, saying how to turn it on, without
        # [server] admin_token.
        Mount("/admin", app=admin_app(settings, store)),
    ]
    if settings.is_demo:
        demo = Demo(settings, store, scripts.env,
                    on_stored=lambda: ingest.on_stored and ingest.on_stored())
        routes += [
            Route("/demo/identity", demo.identity, methods=["POST"]),  # the shop's server:
            Route("/demo/order", demo.order, methods=["POST"]),  # docs/security.md
            Route("/", lambda request: RedirectResponse("/demo/"), methods=["GET"]),
            Route("/demo", lambda request: RedirectResponse("/demo/"), methods=["GET"]),
            Route("/demo/session", demo.session, methods=["GET"]),
            Route("/demo/sink", demo.sink_list, methods=["GET"]),
            Route("/demo/sink/{vendor}{rest:path}", demo.sink_record, methods=["POST", "PUT"]),
            Route("/demo/{path:path}", GZipMiddleware(demo.page_app, minimum_size=1024),
                  methods=["GET"]),
        ]

    # SIGTERM: uvicorn gives open requests half the grace period (``cli.cmd_serve``), the
    # forwarder and the store share the other half, so the process is gone within it even
    # with a dead or wedged writer.
    half_grace = settings.server.shutdown_grace_s / 2

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # A failed accept (out of file descriptors) is counted, not logged each time.
        restore = connections.handle_accept_errors(asyncio.get_running_loop())
        try:
            await store.open()
            try:
                if forwarder is not None:
                    await forwarder.start()
                try:
                    yield
                finally:
                    if forwarder is not None:
                        try:  # stop claiming; in-flight sends finish or stay leased
                            await asyncio.wait_for(forwarder.stop(), half_grace)
                        except asyncio.TimeoutError:
                            log.warning("the forwarder did not stop within %g s", half_grace)
            finally:
                await store.close(grace_s=min(5.0, half_grace))
        finally:
            restore()

    app = _App(routes=routes, lifespan=lifespan)
    app.fast_post = (settings.server.event_path, ingest.browser_events)
    app.state.settings = settings
    app.state.store = store
    app.state.forwarder = forwarder
    app.state.metrics = metrics
    app.state.coupons = coupons
    return app
