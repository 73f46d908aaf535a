"""The two ways events come in: the browser's beacon and the store's backend.

Thin handlers. ``POST /e`` does HTTP only — headers, the body within its limit, CORS,
the cookie, the answer — and hands the body as received to the store, which reads it
(``envelope``) where it stores it, off the event loop. The backend API reads its body here
(``events`` validates) and lets the store commit. Any problem is a 4xx whose JSON body
names the field, and nothing is stored from a rejected body.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

from starlette.requests import ClientDisconnect, Request, cookie_parser
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from . import events as vocabulary
from .admin.auth import client_address, shared_throttle
from . import logs
from .envelope import BrowserFacts, Problem, Refused, event_list
from .events import Invalid, Origin
from .metrics import Metrics
from .sessions import COOKIE_NAME, cookie_header
from .store.base import SessionInfo, StoreUnavailable

log = logging.getLogger("onetag.ingest")

MAX_BODY_BYTES = 1024 * 1024
BROWSER_TYPES = ("text/plain", "application/json", "")
CORS_MAX_AGE = "86400"
# The 204's headers as raw ASGI pairs, in the order the Starlette Response had them.
_VARY = (b"vary", b"Origin")
_CREDENTIALS = ((b"access-control-allow-credentials", b"true"), _VARY)
_NO_STORE = (b"cache-control", b"no-store")


class HTTPProblem(Exception):
    def __init__(self, status: int, error: str, field: str, problem: str,
                 headers: dict[str, str] | None = None):
        super().__init__(problem)
        self.status, self.error, self.field, self.problem = status, error, field, problem
        self.headers = headers or {}

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": self.error, "message": f"{self.field}: {self.problem}",
                "errors": [{"field": self.field, "problem": self.problem}]}
        return JSONResponse(body, status_code=self.status,
                            headers={**self.headers, **(extra_headers or {})})


def unavailable(exc: StoreUnavailable) -> HTTPProblem:
    """503 for a write the store did not make: the client retries after ``Retry-After``."""
    return HTTPProblem(503, "unavailable", exc.kind, exc.message,
                       {"Retry-After": str(exc.retry_after_s)})


class BodyDeadlines:
    """The body read timeout (408) of every request, with one timer a period, not one each.

    500 slow senders held 40 s before there was a timeout. ``asyncio.timeout`` around each
    read cost the event loop, the busier process, 3.3 µs a request (a ``Timeout``, a timer
    on the loop's heap, its cancel); here a read puts its task and deadline in a dict, and
    a sweep every ``period`` (up to 1 s; none while nothing is being read) cancels the
    reads past their deadline, so a 408 comes up to a period late."""

    def __init__(self) -> None:
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None  # a closed one's never fires
        self._period = 1.0

    async def receive(self, receive: Receive, declared: str | None,
                      timeout_s: float) -> bytes | None:
        """The request body within its size and time limits; None if the client disconnected."""
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise HTTPProblem(413, "too_large", "body", f"is {declared} bytes; the limit is "
                              f"{MAX_BODY_BYTES} bytes a request")
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self._deadlines[task] = loop.time() + timeout_s
        if self._sweep is None or self._sweep_loop is not loop:
            self._period = min(1.0, timeout_s / 4)
            self._sweep, self._sweep_loop = loop.call_later(self._period, self._cancel_late,
                                                            loop), loop
        try:
            return await _receive_chunks(receive)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()  # ours: the request goes on, to answer 408
            raise HTTPProblem(408, "timeout", "body", f"was not received within {timeout_s:g} s",
                              {"Connection": "close"}) from None
        finally:
            del self._deadlines[task]
            if self._expired:
                self._expired.discard(task)

    def _cancel_late(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._sweep = (loop.call_later(self._period, self._cancel_late, loop)
                       if self._deadlines else None)


async def _receive_chunks(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPProblem(413, "too_large", "body",
                              f"is over the limit of {MAX_BODY_BYTES} bytes a request")
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk  # usually one message
        chunks.append(chunk)


def _cookie(headers: list[str]) -> str | None:
    """The ``sc`` cookie, as ``Request.cookies`` reads it (a later header wins)."""
    cookies: dict[str, str] = {}
    for header in headers:
        cookies.update(cookie_parser(header))
    return cookies.get(COOKIE_NAME)


def _as_sent(problem: Problem, where: str | None) -> Problem:
    """A store's refusal naming the field as the body was sent, as ``events.normalise``'s
    do: the store names the request's events ``events[i]`` (a browser's body is always
    ``{"events": [...]}``), a backend's array is ``body[i]``, its single object ``body``."""
    field = problem.field
    if where == "events" or not field.startswith("events"):
        return problem
    if where is None:  # one event: events[0].x is body.x, events is body
        field = "body" + re.sub(r"^events(\[0\])?", "", field)
    else:
        field = where + field[len("events"):]
    return problem._replace(field=field)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class Ingest:
    """Handlers bound to the running app's settings and store."""

    def __init__(self, settings: Any, store: Any, metrics: Any = None):
        self.settings = settings
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics(settings, store)
        self.on_stored: Callable[[], None] | None = None  # the forwarder's wake-up
        self.secure_cookie = settings.server.public_url.startswith("https://")
        self.all_origins = frozenset(o for s in settings.sites.values() for o in s.origins)
        self.body_timeout_s = settings.server.body_timeout_s
        self.bodies = BodyDeadlines()
        # Wrong api keys on the backend API, per site and client address (``_authorise``).
        self.key_guesses = shared_throttle(store, "api_key")

    # Browser ----------------------------------------------------------------------------

    def _cors(self, origin: str | None, allowed: bool, rid: str | None = None) -> dict[str, str]:
        headers = {logs.REQUEST_ID_HEADER: rid} if rid else {}
        if not origin or not allowed:
            return {**headers, "Vary": "Origin"}
        return {**headers, "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}

    async def preflight(self, request: Request) -> Response:
        """Only needed for application/json senders; the runtime sends text/plain."""
        origin = request.headers.get("origin")
        allowed = origin in self.all_origins
        headers = self._cors(origin, allowed)
        if allowed:
            headers.update({"Access-Control-Allow-Methods": "POST, OPTIONS",
                            "Access-Control-Allow-Headers": "Content-Type",
                            "Access-Control-Max-Age": CORS_MAX_AGE})
        return Response(status_code=204 if allowed else 403, headers=headers)

    async def browser_events(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /e`` as a plain ASGI app: the hot path, without a Request or a Response.

        ``create_app`` sends it every ``POST /e`` straight from the top of the app; it
        answers exactly what a Starlette endpoint would (the 4xx bodies are JSONResponses).
        """
        started = time.perf_counter()
        origin = content_type = declared = user_agent = given_id = None
        cookies: list[str] = []
        for name, value in scope["headers"]:
            if name == b"origin":
                if origin is None:
                    origin = value.decode("latin-1")
            elif name == b"content-type":
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"content-length":
                if declared is None:
                    declared = value.decode("latin-1")
            elif name == b"cookie":
                cookies.append(value.decode("latin-1"))
            elif name == b"user-agent":
                if user_agent is None:
                    user_agent = value.decode("latin-1")
            elif name == b"x-request-id":
                if given_id is None:
                    given_id = value
        rid = logs.request_id(given_id)
        logs.REQUEST_ID.set(rid)  # this request's task only: its log lines, uvicorn's access line
        rid_header = (b"x-request-id", rid.encode("latin-1"))
        # Whether the answer carries CORS headers for this origin. A refused request is
        # answered with them too when the origin is any site's, so a page can read why.
        allowed = origin in self.all_origins
        try:
            if (content_type or "").split(";", 1)[0].strip().lower() not in BROWSER_TYPES:
                raise HTTPProblem(415, "unsupported_media_type", "content-type",
                                  "must be text/plain or application/json")
            data = await self.bodies.receive(receive, declared, self.body_timeout_s)
        except HTTPProblem as exc:
            self.metrics.rejected("browser", exc.error)
            await exc.response(self._cors(origin, allowed, rid))(scope, receive, send)
            return
        if data is None:
            return  # the client went away: nothing to answer, nothing stored
        facts = BrowserFacts(origin, _cookie(cookies) if cookies else None, user_agent,
                             int(time.time() * 1000))
        try:
            # Read (parsed, validated, normalised) and stored by the store, off this loop.
            answer = await self.store.ingest_browser(data, facts, rid)
        except StoreUnavailable as exc:  # not stored: the runtime retries it
            self.metrics.rejected("browser", "unavailable", exc.kind)
            await unavailable(exc).response(self._cors(origin, allowed, rid))(scope, receive, send)
            return
        except Exception:  # what Starlette's ServerErrorMiddleware answers, then re-raises
            self.metrics.rejected("browser", "internal_error")
            await PlainTextResponse("Internal Server Error", status_code=500,
                                    headers={logs.REQUEST_ID_HEADER: rid})(scope, receive, send)
            raise
        if isinstance(answer, Problem):
            self.metrics.rejected("browser", answer.error)
            await HTTPProblem(*answer).response(self._cors(origin, allowed, rid))(
                scope, receive, send)
            return
        self._stored(answer.results)
        if origin and allowed:
            headers = [(b"access-control-allow-origin", origin.encode("latin-1")), *_CREDENTIALS]
        else:
            headers = [_VARY]
        headers.append((b"set-cookie", cookie_header(answer.sc, self.secure_cookie).encode("latin-1")))
        headers.append(_NO_STORE)
        headers.append(rid_header)
        await send({"type": "http.response.start", "status": 204,
                    "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        self.metrics.received(answer.site_id, "browser", answer.names,
                              time.perf_counter() - started)

    # Backend ----------------------------------------------------------------------------

    async def _authorise(self, request: Request, site: Any) -> None:
        """The site's api_key, compared in constant time. Wrong keys are bounded per site
        and client address (an IPv6 /64) as the console's login is (``key_guesses``): each
        is answered after the throttle's delay, and an address with 5 wrong keys for the
        site within a minute gets 429 and ``Retry-After`` (its right key too) until the
        window has passed, on every node of the database (``SharedThrottle``). Only wrong
        keys count: a right one is never delayed and clears nothing, so a busy backend
        posting with its key stays about as fast as without the bound (one indexed read a
        second), another address's guesses never refuse it, and a flood of them takes none
        of the writes its events need (one-off guesses write nothing, the rest are
        budgeted and kept off the ingest queue)."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPProblem(401, "unauthorized", "authorization",
                              "send \"Authorization: Bearer <the site's api_key>\"",
                              {"WWW-Authenticate": "Bearer"})
        expected = site.api_key
        if not expected:
            raise HTTPProblem(403, "forbidden", "authorization",
                              "this site has no api_key configured, so its backend API is off")
        guess = await self.key_guesses.check(client_address(request), token.strip(), expected,
                                             site.id)
        if guess.wait:
            raise HTTPProblem(429, "too_many_requests", "authorization",
                              f"too many wrong api keys from your address; try again in "
                              f"{guess.wait} s", {"Retry-After": str(guess.wait)})
        if not guess.right:
            raise HTTPProblem(403, "forbidden", "authorization", "the api key is not this site's")

    async def backend_events(self, request: Request) -> Response:
        """The backend API: every answer carries the request's ``X-Request-Id``."""
        started = time.perf_counter()
        rid = logs.request_id(request.headers.get("x-request-id"))
        logs.REQUEST_ID.set(rid)
        try:
            response = await self._backend_events(request, rid, started)
        except ClientDisconnect:
            raise
        except Exception:  # answered here, so that the 500 names its request id too
            log.exception("the backend API failed a request")
            self.metrics.rejected("backend", "internal_error")
            response = PlainTextResponse("Internal Server Error", status_code=500)
        response.headers[logs.REQUEST_ID_HEADER] = rid
        return response

    async def _backend_events(self, request: Request, rid: str, started: float) -> Response:
        try:
            site_id = request.path_params["site_id"]
            site = self.settings.sites.get(site_id)
            if site is None:
                raise HTTPProblem(404, "unknown_site", "site_id",
                                  f"no site {vocabulary.echo(site_id)} here")
            await self._authorise(request, site)
            if _media_type(request) != "application/json":
                raise HTTPProblem(415, "unsupported_media_type", "content-type",
                                  "must be application/json")
            data = await self.bodies.receive(request.receive, request.headers.get("content-length"),
                                             self.body_timeout_s)
            if data is None:
                raise ClientDisconnect()
            body = vocabulary.parse_json(data)
            if isinstance(body, dict) and "events" in body and "event" not in body:
                raws, where = event_list(body["events"], "events"), "events"
                normalised = vocabulary.normalise_batch(raws, where, self._origin(site))
            elif isinstance(body, list):
                raws, where = event_list(body, "body"), "body"
                normalised = vocabulary.normalise_batch(raws, "body", self._origin(site))
            else:
                raws, where = [body], None
                normalised = [vocabulary.normalise(body, "body", self._origin(site))]
        except Invalid as exc:
            return self._refused(HTTPProblem(*Problem.invalid(exc)))
        except Refused as exc:
            return self._refused(HTTPProblem(*exc.problem))
        except HTTPProblem as exc:
            return self._refused(exc)
        try:
            results = await self.store.ingest(site.id, normalised, raws, SessionInfo(), rid)
        except StoreUnavailable as exc:
            return self._refused(unavailable(exc))
        if isinstance(results, Problem):  # refused by the store (a cart rule): stored nothing
            return self._refused(HTTPProblem(*_as_sent(results, where)))
        self._stored(results)
        self.metrics.received(site.id, "backend", [event["name"] for event in normalised],
                              time.perf_counter() - started)
        return JSONResponse(
            {"event_ids": [r.event_id for r in results],
             "duplicates": [r.event_id for r in results if r.duplicate]}, status_code=202)

    def _refused(self, problem: HTTPProblem) -> Response:
        """A backend request's refusal, counted (``/metrics``)."""
        self.metrics.rejected("backend", problem.error, problem.field)
        return problem.response()

    def _stored(self, results: Any) -> None:
        if self.on_stored is not None and any(not r.duplicate for r in results):
            self.on_stored()

    @staticmethod
    def _origin(site: Any) -> Origin:
        return Origin(site_id=site.id, source="backend", currency=site.currency,
                      received_ms=int(time.time() * 1000))
