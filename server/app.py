"""``create_app(settings)``: routes and the lifespan that owns the store and the forwarder."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .assets import static_dir
from .demo import Demo
from .forwarder import Forwarder, ForwarderOptions
from .ingest import Ingest
from .script import ScriptServer
from .store import open_store

log = logging.getLogger("onetag")


def create_app(settings: Any, store: Any = None,
               forward_options: ForwarderOptions | None = None) -> Starlette:
    """``forward_options``: the forwarder's tuning (default: ``ONETAG_FORWARD_*`` env)."""
    store = store if store is not None else open_store(settings)
    scripts = ScriptServer(settings)
    ingest = Ingest(settings, store)
    forwarder = None
    if settings.server.forward:
        forwarder = Forwarder(settings, store, forward_options or ForwarderOptions.from_env())
        ingest.on_stored = forwarder.wake

    async def healthz(request: Request) -> Response:
        try:
            await store.ping()
        except Exception as exc:  # any failure to read means "not ready"
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route(settings.server.script_path, scripts.endpoint, methods=["GET"]),
        Route(settings.server.event_path, ingest.browser_events, methods=["POST"]),
        Route(settings.server.event_path, ingest.preflight, methods=["OPTIONS"]),
        Route("/api/v1/sites/{site_id}/events", ingest.backend_events, methods=["POST"]),
        # Compressed here and on the demo page only: the event endpoint answers 204s, and
        # the script is stored gzipped; a middleware on every route costs /e ~7 µs a request.
        Mount("/static", GZipMiddleware(StaticFiles(directory=str(static_dir())),
                                        minimum_size=1024), name="static"),
    ]
    if settings.is_demo:
        demo = Demo(settings, store, scripts.env)
        routes += [
            Route("/", lambda request: RedirectResponse("/demo/"), methods=["GET"]),
            Route("/demo", lambda request: RedirectResponse("/demo/"), methods=["GET"]),
            Route("/demo/session", demo.session, methods=["GET"]),
            Route("/demo/sink", demo.sink_list, methods=["GET"]),
            Route("/demo/sink/{vendor}{rest:path}", demo.sink_record, methods=["POST", "PUT"]),
            Route("/demo/{path:path}", GZipMiddleware(demo.page_app, minimum_size=1024),
                  methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        try:
            if forwarder is not None:
                await forwarder.start()
            try:
                yield
            finally:
                if forwarder is not None:
                    await forwarder.stop()  # stop claiming; in-flight sends finish or stay leased
        finally:
            await store.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.forwarder = forwarder
    return app
