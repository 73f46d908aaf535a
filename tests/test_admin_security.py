"""The console and /metrics as an attacker meets them: bounds on what a URL may ask (never a
500), the security headers on every answer under /admin, no secret a vendor echoes on any
page, the Live stream's limits and its end at logout, and /metrics' bound on token guesses."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from console_support import ADMIN_TOKEN, console_settings, csrf_of, login
from fakes.harness import (API_KEY, SECRETS, backend, browser, purchase, rows, serve,
                           settings_data, until)
from server import config
from server.admin import auth, live
from server.admin.dead_letters import MAX_MS, BadFilter, iso_ms, parse_time
from server.admin.web import SECURITY_HEADERS, SESSION_COOKIE
from support import running

EMAIL = "ann@example.com"
HUGE = "9" * 30  # past SQLite's 64-bit integers


async def bounded_get(client: httpx.AsyncClient, path: str, **kwargs) -> httpx.Response:
    """A GET that may hit the Live stream: the in-process transport reads a response whole,
    so a stream that was wrongly started would hang the test (a deadline, not a timing)."""
    return await asyncio.wait_for(client.get(path, **kwargs), 60)


async def test_ids_past_sqlite_integers_are_404_not_500(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        token = csrf_of((await client.get("/admin/nowhere")).text)
        for path in (f"/admin/events/{HUGE}", f"/admin/deliveries/{HUGE}"):
            answer = await client.get(path)
            assert answer.status_code == 404, (path, answer.status_code)
        answer = await client.post(f"/admin/deliveries/{HUGE}/replay",
                                   headers={"X-CSRF-Token": token})
        assert answer.status_code == 404


@pytest.mark.parametrize("path, field", [
    ("/admin/live/stream?after=%C2%B2", "after"),  # "²" is a digit to str.isdigit, not to int()
    (f"/admin/live/stream?after={HUGE}", "after"),
    ("/admin/deadletters?before=%C2%B2", "before"),
    ("/admin/deadletters?since=999999w", "since"),  # 19,000 years ago: before year 1
    ("/admin/deadletters?state=dead&until=999999w", "until"),
    ("/admin/reconcile?since=999999w", "since"),
])
async def test_numbers_in_the_query_that_cannot_be_read_are_400_naming_the_field(
        tmp_path, path, field):
    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        answer = await bounded_get(client, path)
        assert answer.status_code == 400, (path, answer.status_code)
        assert f"{field}:" in answer.text


@hsettings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=70),
                 st.from_regex(r"\A[0-9]{1,6} ?[mhdw]\Z"),
                 st.datetimes().map(lambda d: d.isoformat()),
                 st.from_regex(r"\A-?[0-9]{1,6}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2})?Z?\Z")))
def test_any_time_text_is_an_instant_the_pages_can_write_or_names_its_field(text):
    now = 1_800_000_000_000
    try:
        ms = parse_time(text, now, "since")
    except BadFilter as exc:
        assert exc.field == "since"
        return
    if ms is not None:
        assert 0 <= ms <= MAX_MS
        assert parse_time(iso_ms(ms), now, "since") == ms  # written back, read the same


async def test_a_last_event_id_that_is_not_a_seq_is_400(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        for value in (b"\xb2", HUGE, "-1"):  # b"\xb2": "\u00b2" as the server reads it
            answer = await bounded_get(client, "/admin/live/stream",
                                       headers={"Last-Event-ID": value})
            assert answer.status_code == 400 and "after:" in answer.text, value


async def test_every_answer_under_admin_carries_the_security_headers(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        requests = [("PUT", "/admin/live"), ("OPTIONS", "/admin/live"), ("TRACE", "/admin/"),
                    ("DELETE", "/admin/deliveries/1/replay"), ("GET", "/admin/nowhere")]
        for logged_in in (False, True):
            if logged_in:
                await login(client)
            for method, path in requests:
                answer = await client.request(method, path)
                for header, value in SECURITY_HEADERS.items():
                    assert answer.headers.get(header) == value, (method, path, header)
    async with running(console_settings(tmp_path, admin_token=None)) as (app, client):
        answer = await client.request("OPTIONS", "/admin/live")
        assert answer.headers.get("content-security-policy") == \
            SECURITY_HEADERS["Content-Security-Policy"]


# Pages with what vendors answered --------------------------------------------------------


def real_settings(tmp_path, fake) -> config.Settings:
    data = settings_data(tmp_path, fake, only=("rejoiner",))
    data["server"]["admin_token"] = ADMIN_TOKEN
    return config.parse(data, env={})


async def log_in(client: httpx.AsyncClient) -> None:
    page = await client.get("/admin/login")
    answer = await client.post("/admin/login", data={"csrf_token": csrf_of(page.text),
                                                      "token": ADMIN_TOKEN})
    assert answer.status_code == 303


async def test_a_vendor_answer_that_echoes_its_key_is_scrubbed_on_every_page(tmp_path, fake):
    secret = SECRETS["rejoiner"]
    echo = json.dumps({"error": f"bad api key {secret}", "key": secret})
    fake.fail("rejoiner", 400, body=echo, headers={"X-Echo": secret}, times=None)
    db = tmp_path / "onetag.db"
    async with serve(real_settings(tmp_path, fake)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url, timeout=30) as client:
        await backend(client, purchase("1001", email=EMAIL))
        [dead] = await until(lambda: rows(db, "d.state = 'dead'"), what="a dead delivery")
        await log_in(client)
        pages = [f"/admin/deliveries/{dead['id']}", f"/admin/events/{dead['event_seq']}",
                 f"/admin/search?q={EMAIL}", "/admin/search?q=1001",
                 "/admin/deadletters", "/admin/vendors", "/admin/reconcile"]
        for path in pages:
            page = await client.get(path)
            assert page.status_code == 200, path
            assert secret not in page.text, f"{path} shows the rejoiner api_key"
        delivery = (await client.get(pages[0])).text
        assert "bad api key [redacted]" in delivery  # the answer is still shown, scrubbed


# The Live stream -------------------------------------------------------------------------


async def test_logging_out_ends_the_sessions_open_streams(tmp_path, fake):
    async with serve(real_settings(tmp_path, fake)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url, timeout=30) as client:
        await log_in(client)
        token = csrf_of((await client.get("/admin/live")).text)
        async with client.stream("GET", "/admin/live/stream") as stream:
            assert stream.status_code == 200
            chunks = stream.aiter_text()
            assert (await anext(chunks)).startswith("retry:")
            out = await client.post("/admin/logout", headers={"X-CSRF-Token": token})
            assert out.status_code == 303

            async def rest() -> str:
                return "".join([chunk async for chunk in chunks])
            # The stream ends by itself (it would otherwise run until the session expires).
            await asyncio.wait_for(rest(), 30)


async def test_a_logout_on_one_node_ends_the_sessions_stream_on_another(tmp_path, fake,
                                                                        pg_database):
    """Two nodes on one PostgreSQL database: a Live stream open on one ran on after the
    session logged out on the other (each node knew only its own logouts)."""
    data = settings_data(tmp_path, fake, only=("rejoiner",))
    data["server"].update(admin_token=ADMIN_TOKEN, database=pg_database, forward=False)
    settings = config.parse(data, env={})
    async with serve(settings) as one, serve(settings) as two, \
            httpx.AsyncClient(base_url=one.state.base_url, timeout=30) as first, \
            httpx.AsyncClient(base_url=two.state.base_url, timeout=30) as second:
        await log_in(first)
        second.cookies.set(SESSION_COOKIE, first.cookies[SESSION_COOKIE])
        token = csrf_of((await first.get("/admin/live")).text)
        async with second.stream("GET", "/admin/live/stream") as stream:
            assert stream.status_code == 200
            chunks = stream.aiter_text()
            assert (await anext(chunks)).startswith("retry:")
            out = await first.post("/admin/logout", headers={"X-CSRF-Token": token})
            assert out.status_code == 303

            async def rest() -> str:
                return "".join([chunk async for chunk in chunks])
            await asyncio.wait_for(rest(), 30)  # ends by itself: live.LOGOUT_CHECK_S
        assert (await second.get("/admin/live")).status_code == 303


async def test_open_streams_are_bounded_per_session_and_in_all(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(live, "MAX_STREAMS_PER_SESSION", 2)
    monkeypatch.setattr(live, "MAX_STREAMS", 3)
    async with serve(real_settings(tmp_path, fake)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url, timeout=30) as one, \
            httpx.AsyncClient(base_url=app.state.base_url, timeout=30) as two:
        await log_in(one)
        await log_in(two)
        async with one.stream("GET", "/admin/live/stream") as a, \
                one.stream("GET", "/admin/live/stream") as b:
            assert a.status_code == b.status_code == 200
            refused = await one.get("/admin/live/stream")
            assert refused.status_code == 429 and "Retry-After" in refused.headers
            assert "streams" in refused.text
            async with two.stream("GET", "/admin/live/stream") as c:
                assert c.status_code == 200
                assert (await two.get("/admin/live/stream")).status_code == 429  # all: 3
        # Closed streams are given back (the server notices within a poll or two).
        async def reopened() -> bool:
            async with one.stream("GET", "/admin/live/stream") as again:
                return again.status_code == 200
        deadline = asyncio.get_running_loop().time() + 30
        while not await reopened():
            assert asyncio.get_running_loop().time() < deadline, "streams were not given back"
            await asyncio.sleep(0.1)


# /metrics ---------------------------------------------------------------------------------


async def test_metrics_bounds_token_guesses_like_the_login(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (app, client):
        for _ in range(5):
            answer = await client.get("/metrics", headers={"Authorization": "Bearer guess"})
            assert answer.status_code == 401
        locked = await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
        assert locked.json()["errors"][0]["field"] == "authorization"
        assert "onetag_" not in locked.text and ADMIN_TOKEN not in locked.text


async def test_metrics_without_a_header_is_not_a_guess(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (app, client):
        for _ in range(10):
            assert (await client.get("/metrics")).status_code == 401
        ok = await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert ok.status_code == 200


# What an operator meets when a form outlived its token --------------------------------------


async def test_an_expired_login_form_says_so_and_offers_a_fresh_one(tmp_path):
    from server.admin.web import LOGIN_COOKIE
    async with running(console_settings(tmp_path)) as (app, client):
        stale = csrf_of((await client.get("/admin/login")).text)
        client.cookies.delete(LOGIN_COOKIE)  # what an hour does to it
        answer = await client.post("/admin/login", data={"csrf_token": stale,
                                                          "token": ADMIN_TOKEN})
        assert answer.status_code == 403 and SESSION_COOKIE not in client.cookies
        assert "login form has expired" in answer.text and 'type="password"' in answer.text
        fresh = csrf_of(answer.text)  # the page set a new login cookie with its token
        again = await client.post("/admin/login", data={"csrf_token": fresh,
                                                         "token": ADMIN_TOKEN})
        assert again.status_code == 303 and SESSION_COOKIE in client.cookies


async def test_a_form_posted_after_the_session_ended_asks_for_a_login(tmp_path):
    async with running(console_settings(tmp_path)) as (app, client):
        await login(client)
        token = csrf_of((await client.get("/admin/nowhere")).text)
        client.cookies.delete(SESSION_COOKIE)  # expired
        answer = await client.post("/admin/deliveries/1/replay", data={"csrf_token": token})
        assert answer.status_code == 401 and "log in first" in answer.text
