"""``Console``: what every console page shares — templates, the login check, CSRF.

A page module builds its routes with ``console.route(path, handler, methods=[...])``; the
route's handler then runs only for a logged-in operator (else 303 to the login page), and
a POST reaches it only with the CSRF token of the operator's session (else 403). Handlers
render with ``console.render(request, "admin/x.html", **context)`` and read a POST's form
with ``await console.form(request)``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qsl, quote, urlsplit

import jinja2
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import money
from ..assets import templates_dir
from ..store.base import StoreUnavailable
from . import auth
from .scrub import scrub, secret_values

PREFIX = "/admin"
SESSION_COOKIE = "onetag_admin"
LOGIN_COOKIE = "onetag_admin_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
CSRF_REFUSED = "CSRF token missing or wrong"
MAX_FORM_BYTES = 64 * 1024  # a console form is a few fields
MAX_FORM_FIELDS = 100
NAV = (("Live", "/live"), ("Search", "/search"), ("Vendors", "/vendors"),
       ("Dead letters", "/deadletters"), ("Reconciliation", "/reconcile"),
       ("Install", "/install"))
# Every console answer: never cached, never framed, scripts only from our own origin.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
}

Handler = Callable[[Request], Awaitable[Response]]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Operator:
    """The logged-in session, as templates see it (``user``)."""

    nonce: str
    expires_ms: int


class Console:
    """Shared by the console's page modules; one per app."""

    def __init__(self, settings: Any, store: Any):
        self.settings = settings
        self.store = store
        self.token: str = settings.server.admin_token or ""
        self.enabled = bool(self.token)
        self.body_timeout_s: float = settings.server.body_timeout_s  # a form's, as a body's
        self.key = auth.derive_key(self.token) if self.enabled else b""
        self.revoked = auth.Revoked()
        self.throttle = auth.shared_throttle(store, "admin_token")  # /metrics' too
        self.secure_always = settings.server.public_url.startswith("https://")
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates_dir())),
            autoescape=True, trim_blocks=True,
            lstrip_blocks=True)
        secrets = secret_values(settings)
        # ``|scrub`` on whatever a vendor wrote (answers, errors): a configured secret it
        # echoes is shown as [redacted] (``scrub.py``).
        self.env.filters.update(when=format_ms, age=format_age, pretty=pretty_json,
                                money=money.display_or_minor,
                                scrub=lambda text: scrub(text, secrets))
        self.env.globals.update(prefix=PREFIX)
        # Set by the Dead letters page module (console-b) when it keeps a record of replays:
        # ``await replay_recorder(request, rows, scope)`` after every replay made from a page
        # (rows: what ``store.replay_rows`` returned; scope: what was asked, e.g. {"ids": [7]}).
        self.replay_recorder: Callable[..., Awaitable[Any]] | None = None

    def reads(self) -> Any:
        """The store's read-only queries for the console (``Store.console()``: the same
        queries on SQLite and PostgreSQL). 503 while the store is not open."""
        try:
            return self.store.console()
        except StoreUnavailable:
            raise HTTPException(503, "the store is not open") from None

    # Sessions ---------------------------------------------------------------------------

    def _signed_session(self, request: Request) -> Operator | None:
        """The request's session cookie if it is signed with our key, unexpired and not
        logged out in this process; the database is not asked (``session``)."""
        if not self.enabled:
            return None
        value = request.cookies.get(SESSION_COOKIE)
        nonce = auth.read_signed(self.key, "session", value, now_ms())
        if nonce is None or nonce in self.revoked:
            return None
        return Operator(nonce, int(value.split(".", 1)[0]))

    async def session(self, request: Request) -> Operator | None:
        """The valid session of this request, or None, cached on the request: a signed,
        unexpired cookie whose session was not logged out, by any process or node on this
        database (``Store.session_revoked``, read only for a cookie whose signature is
        right: a made-up cookie costs no query). Every console route calls it first
        (``route``). 503 while the database can't be read."""
        if "operator" in request.scope.get("state", {}):
            return request.state.operator
        found = self._signed_session(request)
        if found is not None and await self.logged_out(found):
            found = None
        request.state.operator = found
        return found

    async def logged_out(self, operator: Operator) -> bool:
        """Whether the session was logged out: in this process (``revoked``, no query),
        else in the database (kept across restarts, seen by every node)."""
        if operator.nonce in self.revoked:
            return True
        try:
            found = await self.store.session_revoked(operator.nonce)
        except StoreUnavailable:
            raise HTTPException(503, "the store is not open") from None
        if found:  # asked once: this process remembers it
            self.revoked.add(operator.nonce, operator.expires_ms)
        return found

    def operator(self, request: Request) -> Operator | None:
        """The session ``session`` found for this request (every console route awaits it
        before its handler runs)."""
        if "operator" in request.scope.get("state", {}):
            return request.state.operator
        return None

    def secure(self, request: Request) -> bool:
        """Cookies get ``Secure`` when the request came over https or public_url is https."""
        return self.secure_always or request.url.scheme == "https"

    def set_cookie(self, request: Request, response: Response, name: str, value: str,
                   max_age_s: int) -> None:
        response.set_cookie(name, value, max_age=max_age_s, path=PREFIX, httponly=True,
                            samesite="strict", secure=self.secure(request))

    def clear_cookie(self, request: Request, response: Response, name: str) -> None:
        response.delete_cookie(name, path=PREFIX, httponly=True, samesite="strict",
                               secure=self.secure(request))

    def csrf_token(self, request: Request) -> str:
        """The token this request's pages put in their forms: the session's, else the login
        form's (``request.state.login_nonce``, set by the login page)."""
        operator = self.operator(request)
        if operator is not None:
            return auth.csrf_token(self.key, operator.nonce)
        nonce = getattr(request.state, "login_nonce", None)
        return auth.csrf_token(self.key, nonce) if nonce else ""

    # Rendering --------------------------------------------------------------------------

    def render(self, request: Request, template: str, status_code: int = 200,
               headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
        """``template`` under templates/, autoescaped, with the shared context: csrf_token,
        nav, sites, user, path."""
        path = request.url.path
        shared = {
            "csrf_token": self.csrf_token(request),
            "nav": [{"label": label, "href": PREFIX + href,
                     "active": path == PREFIX + href or path.startswith(PREFIX + href + "/")}
                    for label, href in NAV],
            "sites": list(self.settings.sites),
            "user": self.operator(request),
            "path": path,
        }
        html = self.env.get_template(template).render({**shared, **context})
        return HTMLResponse(html, status_code=status_code,
                            headers={**SECURITY_HEADERS, **(headers or {})})

    # Routes -----------------------------------------------------------------------------

    def route(self, path: str, handler: Handler, methods: Iterable[str] = ("GET",), *,
              login: bool = True, name: str | None = None,
              refused: Handler | None = None) -> Route:
        """A console route: with ``login`` (the default) a request without a session is sent
        to the login page (303, or 401 for a POST or a fetch asking for JSON: a form posted
        after the session expired says so, not "CSRF"); then a POST must carry the CSRF
        token (else 403, or what ``refused`` answers) before the handler runs."""
        console = self

        async def endpoint(request: Request) -> Response:
            operator = await console.session(request)
            if login and operator is None:
                return console.login_redirect(request)
            if request.method == "POST" and not await console.csrf_valid(request):
                return await refused(request) if refused is not None else forbidden()
            response = await handler(request)
            for header, value in SECURITY_HEADERS.items():
                response.headers.setdefault(header, value)
            return response

        endpoint.__name__ = getattr(handler, "__name__", "console_page")
        endpoint.__doc__ = handler.__doc__
        return Route(path, endpoint, methods=list(methods), name=name)

    def login_redirect(self, request: Request) -> Response:
        if request.method != "GET" or "application/json" in request.headers.get("accept", ""):
            return PlainTextResponse("log in first: " + PREFIX + "/login", status_code=401,
                                     headers=SECURITY_HEADERS)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PREFIX}/login?next={quote(target, safe='')}", status_code=303,
                                headers=SECURITY_HEADERS)

    async def csrf_valid(self, request: Request) -> bool:
        """The POST's token (form field ``csrf_token`` or header ``X-CSRF-Token``) against
        the session's, or, on the login page, the login cookie's."""
        if not self.enabled:
            return False
        operator = self.operator(request)
        if operator is not None:
            nonce = operator.nonce
        else:
            nonce = auth.read_signed(self.key, "login", request.cookies.get(LOGIN_COOKIE),
                                     now_ms())
        given = request.headers.get(CSRF_HEADER)
        if given is None:
            given = (await read_form(request, self.body_timeout_s)).get(CSRF_FIELD)
        return auth.csrf_ok(self.key, nonce, given)

    async def form(self, request: Request) -> FormData:
        """The POST's form, only when its CSRF token is right (else HTTPException 403,
        answered as the plain page "CSRF token missing or wrong")."""
        if not await self.csrf_valid(request):
            raise HTTPException(403, CSRF_REFUSED)
        return await read_form(request, self.body_timeout_s)


async def read_form(request: Request, timeout_s: float) -> FormData:
    """An ``application/x-www-form-urlencoded`` body as a FormData (read once, then kept on
    the request); anything else, or a body over ``MAX_FORM_BYTES``, is an empty form. The
    console's forms are small and never upload files, so this needs no multipart parser.
    A body not received within ``timeout_s`` (``[server] body_timeout_s``, as the ingest's)
    is HTTPException 408, closing the connection: the login form is open to anyone, and a
    body trickled a byte a second held its request for as long as the client liked."""
    cached = getattr(request.state, "console_form", None)
    if cached is not None:
        return cached
    form = FormData()
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if request.method == "POST" and content_type == "application/x-www-form-urlencoded":
        body = bytearray()
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > MAX_FORM_BYTES:
                        break
                else:
                    form = parse_form(bytes(body))
        except TimeoutError:
            raise HTTPException(408, f"the form was not received within {timeout_s:g} s",
                                headers={"Connection": "close"}) from None
    request.state.console_form = form
    return form


def parse_form(body: bytes) -> FormData:
    """urlencoded bytes → FormData: at most ``MAX_FORM_FIELDS`` fields; bytes that are not
    UTF-8 are replaced, never an error (a broken form simply lacks what it should carry)."""
    text = body.decode("utf-8", errors="replace")
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                          errors="replace")
    except ValueError:  # more fields than allowed
        return FormData()
    return FormData(pairs)


def forbidden() -> Response:
    return PlainTextResponse(CSRF_REFUSED, status_code=403, headers=SECURITY_HEADERS)


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only a path inside the console (no open redirect)."""
    if not target:
        return PREFIX + "/live"
    parts = urlsplit(target)
    if (parts.scheme or parts.netloc or not target.startswith(PREFIX + "/")
            or "\\" in target or target.startswith("//") or "/../" in parts.path + "/"
            or "%2e" in target.lower()):
        return PREFIX + "/live"
    return target


def format_ms(ms: Any) -> str:
    """Unix ms → ``2026-11-29 12:04:05.123Z`` (UTC), blank for none."""
    if ms is None or ms == "":
        return ""
    moment = dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_age(ms: Any, now: int | None = None) -> str:
    """How long ago Unix ms ``ms`` was: ``4 s``, ``3 min``, ``2 h``, ``5 d``."""
    if ms is None or ms == "":
        return "never"
    seconds = max(0, ((now or now_ms()) - int(ms)) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def pretty_json(value: Any) -> str:
    """Stored JSON (text or parsed) as indented text for a <pre>."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)
