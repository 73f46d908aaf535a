"""The console's door: off without a token, login, the session cookie, CSRF on every POST,
logout, forged and expired cookies, the login throttle, and no secret on any page."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from starlette.routing import Mount, Route

from console_support import (ADMIN_TOKEN, SECRETS, assert_no_secret, console_settings, csrf_of,
                             login)
from server.admin import auth
from server.admin.web import (LOGIN_COOKIE, SESSION_COOKIE, parse_form, safe_next)
from support import running


def admin_routes_of(app) -> list[Route]:
    [mount] = [r for r in app.routes if isinstance(r, Mount) and r.path == "/admin"]
    return [r for r in mount.routes if isinstance(r, Route)]


def concrete(path: str) -> str:
    """A route path with its parameters filled in."""
    return "/admin" + re.sub(r"\{[^}]+\}", "1", path)


def set_cookie_header(response: httpx.Response, name: str) -> str:
    [header] = [h for h in response.headers.get_list("set-cookie") if h.startswith(name + "=")]
    return header


async def test_without_a_token_the_console_is_off_and_says_how_to_turn_it_on(tmp_path):
    async with running(console_settings(tmp_path, admin_token=None)) as (app, client):
        for path in ("/admin/", "/admin/login", "/admin/live", "/admin/search?q=a"):
            page = await client.get(path)
            assert page.status_code == 404, path
            assert "console is off" in page.text
            assert 'admin_token = "env:ONETAG_ADMIN_TOKEN"' in page.text
            assert "password" not in page.text  # not the login form
        posted = await client.post("/admin/login", data={"token": "", "csrf_token": ""})
        assert posted.status_code == 404 and SESSION_COOKIE not in posted.headers.get(
            "set-cookie", "")


async def test_a_page_without_a_session_redirects_to_the_login(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        for path in ("/admin/", "/admin/live", "/admin/nowhere?x=1"):
            answer = await client.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/admin/login?next=%2Fadmin%2F")
        form = await client.get("/admin/login")
        assert form.status_code == 200 and 'type="password"' in form.text
        assert "no-store" in form.headers["cache-control"]
        assert "frame-ancestors 'none'" in form.headers["content-security-policy"]


async def test_a_wrong_token_is_401_with_the_form_again(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (app, client):
        answer = await login(client, token="not-the-token")
        assert answer.status_code == 401
        assert "not the admin token" in answer.text and 'type="password"' in answer.text
        assert SESSION_COOKIE not in client.cookies
        assert (await client.get("/admin/live")).status_code == 303


async def test_the_right_token_sets_an_httponly_strict_cookie(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        answer = await login(client, next_path="/admin/nowhere")
        assert answer.status_code == 303 and answer.headers["location"] == "/admin/nowhere"
        cookie = set_cookie_header(answer, SESSION_COOKIE).lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/admin" in cookie
        assert "secure" not in cookie  # plain http, public_url http
        assert "max-age=43200" in cookie  # 12 h
        assert (await client.get("/admin/nowhere")).status_code == 404  # in, and no such page
        assert (await client.get("/admin/login")).headers["location"] == "/admin/live"


@pytest.mark.parametrize("public_url, base_url", [
    ("https://data.shop.example", "https://data.shop.example"),  # public_url https
    ("http://console.example", "https://console.example"),  # the request over https
])
async def test_the_cookie_is_secure_on_https(tmp_path, public_url, base_url):
    async with running(console_settings(tmp_path, public_url=public_url)) as (app, client):
        client.base_url = httpx.URL(base_url)
        answer = await login(client)
        assert answer.status_code == 303
        assert "; secure" in set_cookie_header(answer, SESSION_COOKIE).lower()


async def test_login_goes_only_to_console_pages(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        answer = await login(client, next_path="https://evil.example/admin/x")
        assert answer.headers["location"] == "/admin/live"


async def test_every_post_without_its_csrf_token_is_403(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        post_routes = [r for r in admin_routes_of(app) if "POST" in (r.methods or ())]
        assert {"/login", "/logout"} <= {r.path for r in post_routes}
        # Not logged in: the login form itself needs the login cookie's token.
        await client.get("/admin/login")
        refused = await client.post("/admin/login", data={"token": ADMIN_TOKEN})
        assert refused.status_code == 403 and refused.text == "CSRF token missing or wrong"
        assert SESSION_COOKIE not in client.cookies
        assert (await login(client)).status_code == 303
        other = httpx.AsyncClient(transport=client._transport, base_url=client.base_url)
        assert (await login(other)).status_code == 303
        own = csrf_of((await client.get("/admin/nowhere")).text)
        others = csrf_of((await other.get("/admin/nowhere")).text)
        assert own != others
        for route in post_routes:
            path = concrete(route.path)
            for data, headers in (({}, {}), ({"csrf_token": ""}, {}),
                                  ({"csrf_token": "0" * 64}, {}),
                                  ({"csrf_token": others}, {}),  # another session's
                                  ({}, {"X-CSRF-Token": others})):
                answer = await client.post(path, data=data, headers=headers)
                assert answer.status_code == 403, (path, data, headers, answer.status_code)
                assert answer.text == "CSRF token missing or wrong"
            # A JSON body carries no form token either.
            answer = await client.post(path, json={"csrf_token": own})
            assert answer.status_code == 403, path
        # Still logged in: nothing above logged out.
        assert (await client.get("/admin/nowhere")).status_code == 404
        await other.aclose()


async def test_logout_clears_the_cookie_and_refuses_it_after(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        old = client.cookies[SESSION_COOKIE]
        token = csrf_of((await client.get("/admin/nowhere")).text)
        answer = await client.post("/admin/logout", headers={"X-CSRF-Token": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/admin/login"
        assert "max-age=0" in set_cookie_header(answer, SESSION_COOKIE).lower()
        assert (await client.get("/admin/live")).status_code == 303
        client.cookies.set(SESSION_COOKIE, old, domain="console.example", path="/admin")
        assert (await client.get("/admin/live")).status_code == 303  # revoked


async def log_out(client: httpx.AsyncClient) -> None:
    token = csrf_of((await client.get("/admin/nowhere")).text)
    answer = await client.post("/admin/logout", headers={"X-CSRF-Token": token})
    assert answer.status_code == 303 and answer.headers["location"] == "/admin/login"


def keep(client: httpx.AsyncClient, cookie: str) -> None:
    client.cookies.set(SESSION_COOKIE, cookie, domain="console.example", path="/admin")


async def test_a_logout_outlives_a_restart(tmp_path):
    """The logged-out sessions were a list in the process: after a restart a copy of the
    cookie kept from before the logout got 200 again (docs/console.md: "Log out ends it")."""
    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        kept = client.cookies[SESSION_COOKIE]
        await log_out(client)
    async with running(console_settings(tmp_path)) as (app, client):  # the same database
        keep(client, kept)
        assert (await client.get("/admin/live")).status_code == 303
        assert (await client.get("/admin/login")).status_code == 200  # the form, not "in"
        await login(client)  # a new login is a new session: it works
        assert (await client.get("/admin/nowhere")).status_code == 404


async def test_a_logout_on_one_node_is_refused_on_the_other(tmp_path, pg_database):
    """Two app instances on one PostgreSQL database (two ``onetag serve`` nodes): a logout
    on one was never seen by the other, where the same cookie kept working."""
    settings = console_settings(tmp_path, database=pg_database)
    async with running(settings) as (_, one), running(settings) as (_, two):
        await login(one)
        cookie = one.cookies[SESSION_COOKIE]
        keep(two, cookie)
        assert (await two.get("/admin/nowhere")).status_code == 404  # in, on both nodes
        await log_out(one)
        assert (await two.get("/admin/live")).status_code == 303
        keep(one, cookie)
        assert (await one.get("/admin/live")).status_code == 303


async def test_logouts_are_kept_until_their_cookie_expires_then_pruned(backend, tmp_path):
    """The store's record of logouts, on both backends: durable (another store on the same
    database sees it), and the rows whose cookie has expired are pruned by later logouts."""
    settings = backend.settings(tmp_path)
    store = await backend.open(settings)
    try:
        assert not await store.session_revoked("n-1")
        await store.revoke_session("n-1", 5_000, 1_000)
        await store.revoke_session("n-1", 5_000, 1_000)  # twice: two tabs, two nodes
        await store.revoke_session("n-2", 9_000, 1_000)
        assert await store.session_revoked("n-1") and await store.session_revoked("n-2")
        other = await backend.open(settings)
        try:
            assert await other.session_revoked("n-1")
            await other.revoke_session("n-3", 20_000, 6_000)  # n-1's cookie expired at 5,000
        finally:
            await other.close()
        assert not await store.session_revoked("n-1")
        assert await store.session_revoked("n-2") and await store.session_revoked("n-3")
        assert await backend.rows("SELECT nonce FROM console_logouts ORDER BY nonce") == [
            ("n-2",), ("n-3",)]
    finally:
        await store.close()


async def test_a_made_up_cookie_costs_no_query(tmp_path, monkeypatch):
    """Only a cookie signed with the key is looked up: forged ones never reach the
    database, so refusing them costs nothing."""
    async with running(console_settings(tmp_path)) as (app, client):
        store = app.state.store
        asked = []
        real = store.session_revoked

        async def counted(nonce: str) -> bool:
            asked.append(nonce)
            return await real(nonce)
        monkeypatch.setattr(store, "session_revoked", counted)
        for value in ("x", "1." + "a" * 20 + "." + "0" * 64):
            keep(client, value)
            assert (await client.get("/admin/live")).status_code == 303
        assert asked == []
        await login(client)
        assert (await client.get("/admin/nowhere")).status_code == 404
        assert len(asked) >= 1


async def test_a_session_that_cannot_be_checked_is_not_let_in(tmp_path, monkeypatch):
    """The database can't say whether the session logged out: 503, never the page; a
    logout that can't be recorded says so (503) and keeps the cookie, to try again."""
    from server.store.base import StoreUnavailable

    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        token = csrf_of((await client.get("/admin/nowhere")).text)

        async def down(*args, **kwargs):
            raise StoreUnavailable("database", "the database is down")
        monkeypatch.setattr(app.state.store, "revoke_session", down)
        out = await client.post("/admin/logout", headers={"X-CSRF-Token": token})
        assert out.status_code == 503 and "not recorded" in out.text
        assert "max-age=0" not in out.headers.get("set-cookie", "").lower()
        monkeypatch.setattr(app.state.store, "session_revoked", down)
        other = httpx.AsyncClient(transport=client._transport, base_url=client.base_url)
        await login(other)  # the login itself reads no session
        page = await other.get("/admin/live")
        assert page.status_code == 503 and page.headers["cache-control"] == "no-store"
        await other.aclose()


async def test_forged_expired_and_other_token_cookies_are_refused(tmp_path):
    key = auth.derive_key(ADMIN_TOKEN)
    now = auth_now()
    expired, _ = auth.make_signed(key, "session", now - 10_000, 5_000)
    valid, _ = auth.make_signed(key, "session", now, 60_000)
    other_key, _ = auth.make_signed(auth.derive_key("another-token"), "session", now, 60_000)
    login_kind, _ = auth.make_signed(key, "login", now, 60_000)  # the pre-session cookie
    expiry, nonce, mac = valid.split(".")
    later = f"{int(expiry) + 10**9}.{nonce}.{mac}"  # its expiry pushed out: the MAC breaks
    async with running(console_settings(tmp_path)) as (app, client):
        for value in (expired, other_key, login_kind, later, "x", valid + "0", ""):
            client.cookies.set(SESSION_COOKIE, value, domain="console.example", path="/admin")
            assert (await client.get("/admin/live")).status_code == 303, value
        client.cookies.set(SESSION_COOKIE, valid, domain="console.example", path="/admin")
        assert (await client.get("/admin/nowhere")).status_code == 404  # the real one works


async def test_changing_the_token_logs_everyone_out(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        cookie = client.cookies[SESSION_COOKIE]
    async with running(console_settings(tmp_path, admin_token="a-new-token-123456")) as (
            app, client):
        client.cookies.set(SESSION_COOKIE, cookie, domain="console.example", path="/admin")
        assert (await client.get("/admin/live")).status_code == 303


async def test_wrong_tokens_lock_the_address_out(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (app, client):
        for _ in range(5):
            assert (await login(client, token="guess")).status_code == 401
        locked = await login(client)  # even the right token, until the window passes
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
        assert SESSION_COOKIE not in client.cookies


def test_the_throttle_forgets_failures_after_its_window():
    throttle = auth.LoginThrottle(max_failures=2, window_s=60, delay_s=0, max_addresses=2)
    throttle.failed("a", now=0)
    assert throttle.retry_after("a", now=1) == 0
    throttle.failed("a", now=2)
    assert throttle.retry_after("a", now=3) == 57
    assert throttle.retry_after("a", now=61) == 0  # the first failure left the window
    assert throttle.retry_after("a", now=63) == 0
    throttle.failed("b", now=0), throttle.failed("c", now=0), throttle.failed("d", now=0)
    assert len(throttle._failures) == 2  # bounded


async def test_no_console_page_contains_a_secret(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (app, client):
        assert_no_secret("the login page", (await client.get("/admin/login")).text)
        assert_no_secret("a wrong login", (await login(client, token="nope")).text)
        await login(client)
        for route in admin_routes_of(app):
            # Not the Live stream: it never ends (tests/test_admin_pages.py reads it).
            if "GET" in (route.methods or ()) and not route.path.endswith("/stream"):
                page = await client.get(concrete(route.path), follow_redirects=True)
                assert_no_secret(route.path, page.text)
    async with running(console_settings(tmp_path, admin_token=None)) as (app, client):
        assert_no_secret("the off page", (await client.get("/admin/")).text)


def auth_now() -> int:
    from server.admin.web import now_ms
    return now_ms()


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_no_made_up_cookie_is_a_session(value):
    key = auth.derive_key(ADMIN_TOKEN)
    assert auth.read_signed(key, "session", value, 0) is None


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_body_parses_to_a_form_or_an_empty_one(body):
    form = parse_form(body)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.multi_items())


@hsettings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(max_size=40).map(lambda t: "/admin/" + t)))
def test_after_login_only_console_paths(target):
    landing = safe_next(target)
    assert landing.startswith("/admin/") and not landing.startswith("//")
    assert "/../" not in landing + "/" and "\\" not in landing


def test_login_does_not_climb_out_of_the_console():
    for target in ("/admin/../demo/", "/admin/%2e%2e/demo", "/admin/..", "//evil.example/admin/"):
        assert safe_next(target) == "/admin/live", target
    assert safe_next("/admin/search?q=a%40b.c") == "/admin/search?q=a%40b.c"
