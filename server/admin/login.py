"""``/admin/login`` and ``/admin/logout``: the token in, a signed session cookie out.

The login form is CSRF-checked like every console POST: its token is signed over the nonce
of a short-lived pre-session cookie (``onetag_admin_login``) that the login page sets.
Wrong tokens are slowed and bounded per client address, every node's counted together
(``auth.SharedThrottle``).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..store.base import StoreUnavailable
from . import auth
from .web import (LOGIN_COOKIE, PREFIX, SECURITY_HEADERS, SESSION_COOKIE, Console, forbidden,
                  now_ms, safe_next)


def routes(console: Console) -> list[Route]:
    def login_page(request: Request, status_code: int = 200, message: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
        """The form, with a token tied to the login cookie (a fresh one unless it holds one)."""
        nonce = auth.read_signed(console.key, "login", request.cookies.get(LOGIN_COOKIE),
                                 now_ms())
        fresh = None
        if nonce is None:
            fresh, nonce = auth.make_signed(console.key, "login", now_ms(), auth.LOGIN_TTL_MS)
        request.state.login_nonce = nonce
        response = console.render(request, "admin/login.html", status_code=status_code,
                                  headers=headers, message=message,
                                  next=safe_next(request.query_params.get("next")))
        if fresh is not None:
            console.set_cookie(request, response, LOGIN_COOKIE, fresh,
                               auth.LOGIN_TTL_MS // 1000)
        return response

    async def login(request: Request) -> Response:
        """GET: the form (or straight on, when logged in already). POST: check the token."""
        if request.method == "GET":
            if console.operator(request) is not None:
                return RedirectResponse(safe_next(request.query_params.get("next")), 303,
                                        headers=SECURITY_HEADERS)
            return login_page(request)
        form = await console.form(request)
        address = auth.client_address(request)
        token = form.get("token")
        given = token if isinstance(token, str) and len(token) <= 1024 else None  # token_ok's
        guess = await console.throttle.check(address, given, console.token)
        if guess.wait:
            return login_page(request, 429, f"Too many wrong tokens from your address; try "
                              f"again in {guess.wait} s.",
                              headers={"Retry-After": str(guess.wait)})
        if not guess.right:
            return login_page(request, 401, "That is not the admin token.")
        await console.throttle.right(address)
        value, _ = auth.make_signed(console.key, "session", now_ms(), auth.SESSION_TTL_MS)
        response = RedirectResponse(safe_next(form.get("next")), 303, headers=SECURITY_HEADERS)
        console.set_cookie(request, response, SESSION_COOKIE, value, auth.SESSION_TTL_MS // 1000)
        console.clear_cookie(request, response, LOGIN_COOKIE)
        return response

    async def logout(request: Request) -> Response:
        """End the session: its nonce is kept in the database until the cookie would expire
        (``Store.revoke_session``), so a copy of the cookie is refused by every process and
        node, restarts included; then the cookie is cleared."""
        operator = console.operator(request)
        if operator is not None:
            console.revoked.add(operator.nonce, operator.expires_ms)
            try:  # in the database: refused after a restart, and by every node
                await console.store.revoke_session(operator.nonce, operator.expires_ms,
                                                   now_ms())
            except StoreUnavailable:  # the cookie stays: say so, the operator tries again
                raise HTTPException(503, "the store is not open: the logout was not "
                                         "recorded; try again") from None
        response = RedirectResponse(PREFIX + "/login", 303, headers=SECURITY_HEADERS)
        console.clear_cookie(request, response, SESSION_COOKIE)
        return response

    async def refused(request: Request) -> Response:
        """A login POST without its token. With no login cookie left (the form sat open for
        over an hour, or cookies were cleared) that is an expired form: the form again,
        with a fresh token and saying so. Otherwise the plain 403 of any console POST."""
        login_cookie = auth.read_signed(console.key, "login", request.cookies.get(LOGIN_COOKIE),
                                        now_ms())
        if login_cookie is not None or console.operator(request) is not None:
            return forbidden()
        return login_page(request, 403, "This login form has expired (a form lasts an hour): "
                                        "enter the token again.")

    async def index(request: Request) -> Response:
        return RedirectResponse(PREFIX + "/live", 303, headers=SECURITY_HEADERS)

    return [
        console.route("/", index),
        console.route("/login", login, methods=["GET", "POST"], login=False, refused=refused),
        console.route("/logout", logout, methods=["POST"]),
    ]
