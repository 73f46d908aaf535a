"""The Remarkety Coupons bridge over real HTTP: Remarkety's call to
``POST /remarkety/{site}/discounts`` answered in its format, with the store's coupon webhook
a real loopback server (the fake vendor server under ``/store``): a good key creates the
coupon through a signed, idempotent call; a wrong key, a malformed request, a store that is
down, slow, refusing or answering garbage each get a clear error, never a hang; every call
is kept in ``coupon_calls``; no secret reaches a log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from typing import Any, AsyncIterator
from urllib.parse import quote_from_bytes, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from server import config, coupons, logs
from server.app import create_app
from server.store import open_store

from fakes.harness import free_port

SITE = "shop1"
RM_KEY = "rk-remarkety-coupon-key-0123"
WEBHOOK_SECRET = "whsec-store-coupon-secret-4567"
SITE_API_KEY = "site-api-key-89ab"
SECRETS = (RM_KEY, WEBHOOK_SECRET, SITE_API_KEY)
PATH = f"/remarkety/{SITE}/discounts"
GOOD = {"code": "WELCOME-7F3A", "templateId": "12", "expiration": "2026-12-31T23:59:59Z",
        "email": "jim@example.com"}
CREATED = '{"is_success": true}'


def coupon_settings(tmp_path, webhook_url: str, timeout_s: float = 5.0, **extra: Any
                    ) -> config.Settings:
    data = {"server": {"database": f"sqlite:///{tmp_path}/onetag.db",
                       "public_url": "https://data.shop.example", "forward": False},
            "sites": [{"id": SITE, "api_key": SITE_API_KEY,
                       "coupons": {"remarkety_api_key": RM_KEY, "webhook_url": webhook_url,
                                   "webhook_secret": WEBHOOK_SECRET, "timeout_s": timeout_s,
                                   **extra}},
                      {"id": "plain", "api_key": SITE_API_KEY}]}
    return config.parse(data, env={})


@contextlib.asynccontextmanager
async def bridge(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (thread writer, real SQLite file), spoken to over ASGI; the webhook it
    calls is real HTTP on loopback."""
    app = create_app(settings, store=open_store(settings, writer="thread"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://data.shop.example",
                                     timeout=60) as client:
            yield client


def calls(tmp_path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(tmp_path / "onetag.db")) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM coupon_calls ORDER BY id")]


def remarkety_url(key: str | None = RM_KEY, **params: str) -> str:
    query = ({coupons.KEY_PARAM: key} if key is not None else {}) | params
    return f"{PATH}?{urlencode(query)}"


@pytest.fixture
def store_ok(fake):
    """The store's webhook creates every coupon it is asked for."""
    fake.fail("store", 200, body=CREATED, times=None)
    return fake


# The good path ----------------------------------------------------------------------------


async def test_good_key_creates_the_coupon_through_a_signed_idempotent_call(tmp_path, store_ok):
    fake = store_ok
    async with bridge(coupon_settings(tmp_path, fake.url("store"))) as client:
        response = await client.post(remarkety_url(**GOOD))
    assert response.status_code == 200, response.text
    assert response.json() == {"is_success": True}
    rid = response.headers["x-request-id"]

    [sent] = fake.requests("store")
    assert sent.method == "POST" and sent.path == "/store"
    assert sent.headers["content-type"] == "application/json"
    # Signed over the exact bytes received, with the site's webhook secret, recently.
    assert coupons.verify(WEBHOOK_SECRET, sent.headers["x-onetag-signature"], sent.body)
    assert not coupons.verify("another-secret-of-16+", sent.headers["x-onetag-signature"],
                              sent.body)
    assert not coupons.verify(WEBHOOK_SECRET, sent.headers["x-onetag-signature"],
                              sent.body.replace(b"WELCOME", b"WELCOMF"))
    key = sent.headers["idempotency-key"]
    assert sent.json == {"type": "coupon.create", "source": "remarkety", "site_id": SITE,
                         "idempotency_key": key, "request_id": rid,
                         "coupon": {"code": "WELCOME-7F3A", "template_id": "12",
                                    "expiration": "2026-12-31T23:59:59Z",
                                    "email": "jim@example.com"}}
    assert sent.headers["x-request-id"] == rid
    assert not any(secret in json.dumps(sent.headers) + sent.body.decode() for secret in
                   (RM_KEY, WEBHOOK_SECRET))  # the store never sees a secret in clear

    [call] = calls(tmp_path)
    assert (call["site_id"], call["result"], call["status"], call["store_status"]) == (
        SITE, "created", 200, 200)
    assert (call["code"], call["template_id"], call["expiration"], call["email"]) == (
        "WELCOME-7F3A", "12", "2026-12-31T23:59:59Z", "jim@example.com")
    assert call["request_id"] == rid and call["idempotency_key"] == key
    assert call["error"] is None and call["duration_ms"] >= 0


async def test_a_retry_of_the_same_request_gets_the_same_idempotency_key(tmp_path, store_ok):
    """However Remarkety sends the parameters (query, JSON, form; any order), the same
    coupon is the same key; another coupon is another key; a caller's own key is kept."""
    fake = store_ok
    body = {"email": GOOD["email"], "expiration": GOOD["expiration"],
            "templateId": 12, "code": GOOD["code"]}
    async with bridge(coupon_settings(tmp_path, fake.url("store"))) as client:
        answers = [await client.post(remarkety_url(**GOOD)),
                   await client.post(remarkety_url(), json=body),
                   await client.post(remarkety_url(), data=GOOD),
                   await client.post(remarkety_url(**{**GOOD, "code": "OTHER-1"})),
                   await client.post(remarkety_url(**GOOD),
                                     headers={"Idempotency-Key": "remarkety-req-000123"})]
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    keys = [r.headers["idempotency-key"] for r in fake.requests("store")]
    assert keys[0] == keys[1] == keys[2]
    assert keys[3] != keys[0]
    assert keys[4] == "remarkety-req-000123"
    assert [c["idempotency_key"] for c in calls(tmp_path)] == keys


async def test_a_date_only_expiration_and_no_email_are_passed_as_such(tmp_path, store_ok):
    fake = store_ok
    async with bridge(coupon_settings(tmp_path, fake.url("store"))) as client:
        response = await client.post(remarkety_url(code="C1", templateId="rule-7",
                                                   expiration="2027-01-15"))
        local = await client.post(remarkety_url(code="C2", templateId="7",
                                                expiration="2027-01-15 10:00:00+02:00"))
    assert response.status_code == local.status_code == 200
    first, second = [r.json["coupon"] for r in fake.requests("store")]
    assert first == {"code": "C1", "template_id": "rule-7", "expiration": "2027-01-15",
                     "email": None}
    assert second["expiration"] == "2027-01-15T08:00:00Z"  # normalised to UTC


# Keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, status", [(None, 401), ("", 401), ("wrong-key-0123456789", 403),
                                         (RM_KEY + "x", 403), (RM_KEY[:-1], 403)])
async def test_a_wrong_or_missing_key_is_refused_and_the_store_never_called(
        tmp_path, store_ok, key, status):
    fake = store_ok
    async with bridge(coupon_settings(tmp_path, fake.url("store"))) as client:
        response = await client.post(remarkety_url(key, **GOOD))
    assert response.status_code == status
    body = response.json()
    assert body["is_success"] is False
    assert body["error_message"].startswith("remarkety_api_key: ")
    assert fake.requests("store") == []
    [call] = calls(tmp_path)
    assert (call["result"], call["status"], call["code"], call["idempotency_key"]) == (
        "unauthorized", status, None, None)


async def test_a_field_in_the_query_and_the_body_counts_once_when_they_agree(tmp_path, store_ok):
    async with bridge(coupon_settings(tmp_path, store_ok.url("store"))) as client:
        agree = await client.post(remarkety_url(templateId="12", code="A1"),
                                  json={"templateId": 12, "code": "A1"})
        differ = await client.post(remarkety_url(templateId="12", code="A1"),
                                   json={"templateId": 13})
        twice = await client.post(remarkety_url() + "&code=A1&code=A2&templateId=1")
    assert agree.status_code == 200, agree.text
    assert [r.json["coupon"]["template_id"] for r in store_ok.requests("store")] == ["12"]
    assert (differ.status_code, twice.status_code) == (400, 400)
    assert differ.json()["error_message"].startswith("templateId: is given more than once")
    assert twice.json()["error_message"].startswith("code: is given more than once")


async def test_the_key_counts_only_in_the_query_string_and_only_once(tmp_path, store_ok):
    fake = store_ok
    async with bridge(coupon_settings(tmp_path, fake.url("store"))) as client:
        in_body = await client.post(remarkety_url(None), json={**GOOD, "remarkety_api_key": RM_KEY})
        twice = await client.post(f"{remarkety_url(**GOOD)}&remarkety_api_key=other-key-000000")
    assert (in_body.status_code, twice.status_code) == (401, 403)
    assert fake.requests("store") == []


async def test_an_unknown_site_or_one_without_the_bridge_is_404(tmp_path, store_ok):
    async with bridge(coupon_settings(tmp_path, store_ok.url("store"))) as client:
        unknown = await client.post(f"/remarkety/nosuch/discounts?remarkety_api_key={RM_KEY}")
        plain = await client.post(f"/remarkety/plain/discounts?remarkety_api_key={RM_KEY}")
    for response in (unknown, plain):
        assert response.status_code == 404
        assert response.json()["error_message"].startswith("site_id: ")
    assert store_ok.requests("store") == [] and calls(tmp_path) == []


# A store that can't create coupons ---------------------------------------------------------


async def test_a_store_that_is_down_is_a_502(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/coupons?token=abc"  # nothing listens there
    async with bridge(coupon_settings(tmp_path, down)) as client:
        response = await client.post(remarkety_url(**GOOD))
    assert response.status_code == 502
    assert response.json()["is_success"] is False
    assert "could not be reached" in response.json()["error_message"]
    [call] = calls(tmp_path)
    assert (call["result"], call["store_status"]) == ("store_down", None)
    assert "ConnectError" in call["error"] and "token=abc" not in call["error"]


async def test_a_slow_store_is_a_504_within_the_timeout(tmp_path, fake):
    """The store holds the request forever: Remarkety is answered once ``timeout_s`` is up
    (the test's own client would give up after 60 s, so a hang fails it)."""
    fake.hang("store", times=None)
    async with bridge(coupon_settings(tmp_path, fake.url("store"), timeout_s=1)) as client:
        started = time.monotonic()
        response = await client.post(remarkety_url(**GOOD))
        waited = time.monotonic() - started
    assert response.status_code == 504
    assert response.json() == {"is_success": False, "error_message":
                               "the store did not answer within 1 s; the coupon may not exist"}
    assert waited >= 0.9  # it did wait for the store (a lower bound: never flaky)
    [call] = calls(tmp_path)
    assert call["result"] == "store_timeout" and call["duration_ms"] >= 900
    # onetag hung up on the store (the fake sees the connection close), leaving nothing open.
    await fake.until(lambda: fake.in_flight.get("store") == 0, what="onetag to hang up")


@pytest.mark.parametrize("status, body, expect, result, message", [
    (422, '{"is_success": false, "error_message": "unknown template 12"}', 422, "refused",
     "unknown template 12"),
    (409, '{"error": "code WELCOME-7F3A exists"}', 422, "refused", "code WELCOME-7F3A exists"),
    (404, "Not Found", 422, "refused", "the store refused the coupon (HTTP 404)"),
    (200, '{"is_success": false, "error_message": "template disabled"}', 422, "refused",
     "template disabled"),
    (200, "<html>oops</html>", 502, "store_garbage", "the store's answer could not be read"),
    (200, '{"ok": true}', 502, "store_garbage", "the store's answer could not be read"),
    (200, "", 502, "store_garbage", "the store's answer could not be read"),
    (500, '{"error": "db down"}', 502, "store_error",
     "the store failed to create the coupon (HTTP 500); try again later"),
    (401, '{"error": "bad signature"}', 502, "store_auth", None),
])
async def test_a_store_that_refuses_or_answers_garbage_is_a_clear_error(
        tmp_path, fake, status, body, expect, result, message):
    fake.fail("store", status, body=body or b"", times=None)
    async with bridge(coupon_settings(tmp_path, fake.url("store"))) as client:
        response = await client.post(remarkety_url(**GOOD))
    assert response.status_code == expect
    answer = response.json()
    assert answer["is_success"] is False
    if message is not None:
        assert answer["error_message"] == message
    [call] = calls(tmp_path)
    assert (call["result"], call["status"], call["store_status"]) == (result, expect, status)
    assert call["error"]


async def test_a_store_answer_too_large_is_garbage(tmp_path, fake):
    fake.fail("store", 200, body=b'{"is_success": true, "pad": "' + b"x" * 70_000 + b'"}',
              times=None)
    async with bridge(coupon_settings(tmp_path, fake.url("store"))) as client:
        response = await client.post(remarkety_url(**GOOD))
    assert response.status_code == 502
    assert calls(tmp_path)[0]["result"] == "store_garbage"


# Malformed requests -----------------------------------------------------------------------


@pytest.mark.parametrize("params, field", [
    ({"templateId": "12"}, "code"),
    ({"code": "", "templateId": "12"}, "code"),
    ({"code": "HAS SPACE", "templateId": "12"}, "code"),
    ({"code": "X" * 101, "templateId": "12"}, "code"),
    ({"code": "A1"}, "templateId"),
    ({"code": "A1", "templateId": "12; DROP"}, "templateId"),
    ({"code": "A1", "template_id": "x" * 65}, "template_id"),
    ({"code": "A1", "templateId": "12", "expiration": "tomorrow"}, "expiration"),
    ({"code": "A1", "templateId": "12", "expiration": "2026-02-30"}, "expiration"),
    ({"code": "A1", "templateId": "12", "email": "not-an-email"}, "email"),
    ({"code": "A1", "templateId": "12", "email": "a@b.c" + "x" * 260}, "email"),
    # an email onetag would refuse in an event (a zero-width space: a look-alike customer)
    ({"code": "A1", "templateId": "12", "email": "ann\u200b@example.com"}, "email"),
])
async def test_a_malformed_query_is_a_400_naming_the_field(tmp_path, store_ok, params, field):
    async with bridge(coupon_settings(tmp_path, store_ok.url("store"))) as client:
        response = await client.post(remarkety_url(**params))
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["is_success"] is False and answer["error_message"].startswith(f"{field}: ")
    assert store_ok.requests("store") == []
    [call] = calls(tmp_path)
    assert (call["result"], call["status"]) == ("invalid", 400)


@pytest.mark.parametrize("body, content_type, status, field", [
    (b"{not json", "application/json", 400, "body"),
    (b"[1, 2]", "application/json", 400, "body"),
    (b'{"code": 5, "templateId": 1}', "application/json", 400, "code"),
    (b'{"code": "A", "templateId": true}', "application/json", 400, "templateId"),
    (b'{"code": "A", "templateId": 1, "email": ["x"]}', "application/json", 400, "email"),
    (b'{"code": "A\\ud800", "templateId": 1}', "application/json", 400, "code"),
    (b'{"code": "WELCOME-7F3A", "templateId": 99}', "application/json", 400, "templateId"),
    (b"\xff\xfe", "application/json", 400, "body"),
    (b"code=A&templateId=%FF", "application/x-www-form-urlencoded", 400, "body"),
    (b"<coupon/>", "application/xml", 415, "content-type"),
    (b"{" + b" " * 20_000 + b"}", "application/json", 413, "body"),
])
async def test_a_malformed_body_is_a_4xx_naming_the_field(tmp_path, store_ok, body,
                                                           content_type, status, field):
    # The last but one conflicts with the query's templateId=12.
    url = remarkety_url(templateId="12") if b"99" in body else remarkety_url()
    async with bridge(coupon_settings(tmp_path, store_ok.url("store"))) as client:
        response = await client.post(url, content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["is_success"] is False and answer["error_message"].startswith(f"{field}: ")
    assert store_ok.requests("store") == []


# The parser never fails but with a 4xx (hypothesis) ----------------------------------------

PROPS = hsettings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["code", "templateId", "template_id", "expiration", "email",
                               "remarkety_api_key", "other"]) | st.text(max_size=12)
bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(field_names, json_values, max_size=6).map(
        lambda d: json.dumps(d).encode()),
    st.lists(st.tuples(field_names, st.text(max_size=30)), max_size=6).map(
        lambda pairs: urlencode(pairs).encode()))
queries = st.lists(st.tuples(field_names, st.text(max_size=40)), max_size=6).map(
    lambda pairs: urlencode(pairs).encode()) | st.binary(max_size=200)
content_types = st.sampled_from(["application/json", "", "application/x-www-form-urlencoded",
                                 "text/plain", "application/json; charset=utf-8"])


@PROPS
@given(queries, bodies, content_types)
def test_the_parser_answers_every_input_with_a_request_or_a_4xx(query, body, content_type):
    try:
        request = coupons.parse_request(coupons.query_pairs(query), body, content_type)
    except coupons.Invalid as exc:
        assert 400 <= exc.status < 500 and exc.field and exc.problem
        return
    assert coupons.CODE_RE.fullmatch(request.code)
    assert coupons.TEMPLATE_RE.fullmatch(request.template_id)
    json.dumps(request.as_dict()).encode("utf-8")  # what the store is sent can be sent


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One app for every hypothesis example: its own event loop, the store answering yes.
    Its wrong keys (a query may carry a second one) are not bounded: the examples are about
    reading the request, and the bound (tests/test_guess_bounds.py) would refuse the rest."""
    from fakes.vendor_server import FakeVendors
    from server.admin import auth

    def unbounded(store, scope):
        return auth.SharedThrottle(None, scope, auth.LoginThrottle(max_failures=10**9, delay_s=0))

    tmp_path = tmp_path_factory.mktemp("coupons-props")
    with FakeVendors() as fake, pytest.MonkeyPatch.context() as patch:
        patch.setattr(coupons, "shared_throttle", unbounded)
        fake.fail("store", 200, body=CREATED, times=None)
        loop = asyncio.new_event_loop()
        context = bridge(coupon_settings(tmp_path, fake.url("store")))
        client = loop.run_until_complete(context.__aenter__())
        try:
            yield loop, client, fake
        finally:
            loop.run_until_complete(context.__aexit__(None, None, None))
            loop.close()


@hsettings(max_examples=80, deadline=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(query=queries, body=bodies, content_type=content_types)
def test_the_endpoint_never_answers_a_5xx_to_any_request(live, query, body, content_type):
    loop, client, fake = live
    before = len(fake.requests("store"))
    # What a URL can't carry raw (controls, non-ASCII) goes %-escaped, as a client sends it.
    keyed = f"remarkety_api_key={RM_KEY}&" + quote_from_bytes(query, safe="!$&'()*+,/:;=?@~%")
    response = loop.run_until_complete(client.post(
        f"{PATH}?{keyed}", content=body,
        headers={"content-type": content_type} if content_type else {}))
    assert response.status_code in (200, 400, 401, 403, 413, 414, 415), response.text
    answer = response.json()
    assert answer["is_success"] is (response.status_code == 200)
    called = len(fake.requests("store")) - before
    assert called == (1 if response.status_code == 200 else 0)


# Logs and the call log ---------------------------------------------------------------------


async def test_no_secret_reaches_a_log_line(tmp_path, store_ok, caplog):
    caplog.set_level(logging.DEBUG)
    async with bridge(coupon_settings(tmp_path, store_ok.url("store"))) as client:
        await client.post(remarkety_url(**GOOD))
        await client.post(remarkety_url("wrong-key-0123456789", **GOOD))
    text = logs.TextFormatter()
    # Every logger but the test's own HTTP client (httpx says each URL it requests).
    lines = [text.format(record) for record in caplog.records
             if not record.name.startswith(("httpx", "httpcore"))]
    assert any("coupon call for site shop1: created (200)" in line for line in lines)
    assert any("unauthorized (403)" in line for line in lines)
    assert not [line for line in lines if any(s in line for s in SECRETS)]
    # uvicorn's access line names the path with its query: the key is redacted there.
    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "POST", remarkety_url(**GOOD), "1.1", 200), None)
    for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
        line = formatter.format(access)
        assert RM_KEY not in line and "remarkety_api_key=[redacted]" in line
        assert "code=WELCOME-7F3A" in line


def test_the_config_reads_the_bridge_and_names_every_problem(tmp_path):
    with pytest.raises(config.ConfigError) as caught:
        config.parse({"sites": [{"id": SITE, "coupons": {
            "remarkety_api_key": "short", "webhook_url": "ftp://x", "webhook_secret": "s",
            "timeout_s": 99, "webhok": 1}}]}, env={})
    problems = "\n".join(map(str, caught.value.problems))
    for where in ("coupons.remarkety_api_key", "coupons.webhook_url",
                  "coupons.webhook_secret", "coupons.timeout_s"):
        assert where in problems
    assert "did you mean 'webhook_url'?" in problems or "webhok" in problems
    settings = config.parse({"sites": [{"id": SITE, "coupons": {
        "remarkety_api_key": "env:RK", "webhook_url": "https://shop.example/c",
        "webhook_secret": "env:WS"}}]}, env={"RK": RM_KEY, "WS": WEBHOOK_SECRET})
    bridge_config = settings.sites[SITE].coupons
    assert (bridge_config.remarkety_api_key, bridge_config.webhook_secret,
            bridge_config.timeout_s) == (RM_KEY, WEBHOOK_SECRET, 5.0)
    assert RM_KEY not in repr(bridge_config) and WEBHOOK_SECRET not in repr(settings)
    with pytest.raises(config.ConfigError, match="RK is not set"):
        config.parse({"sites": [{"id": SITE, "coupons": {
            "remarkety_api_key": "env:RK", "webhook_url": "https://shop.example/c",
            "webhook_secret": WEBHOOK_SECRET}}]}, env={})


def test_a_signature_from_another_time_is_refused():
    body = b'{"type":"coupon.create"}'
    header = coupons.signature(WEBHOOK_SECRET, 1_700_000_000, body)
    assert coupons.verify(WEBHOOK_SECRET, header, body, now=1_700_000_100)
    assert not coupons.verify(WEBHOOK_SECRET, header, body, now=1_700_000_000 + 301)
    assert not coupons.verify(WEBHOOK_SECRET, "v1=" + header.split("v1=")[1], body)
    assert not coupons.verify(WEBHOOK_SECRET, "garbage", body)
    assert not coupons.verify(WEBHOOK_SECRET, "t=1700000000,v1=é", body, now=1_700_000_000)


def test_the_readme_snippet_verifies_what_onetag_signs():
    """The store's verification as docs/coupons.md shows it, run as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "docs" / "coupons.md").read_text(
        encoding="utf-8")
    section = readme.split("**Verifying the signature.**", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(snippet, "docs/coupons.md", "exec"), scope)
    body = b'{"type":"coupon.create","coupon":{"code":"A"}}'
    header = coupons.signature(WEBHOOK_SECRET, int(time.time()), body)
    assert scope["verify"](WEBHOOK_SECRET, header, body)
    assert not scope["verify"](WEBHOOK_SECRET, header, body + b" ")
    assert not scope["verify"]("another-secret-0123456", header, body)
    old = coupons.signature(WEBHOOK_SECRET, int(time.time()) - 301, body)
    assert not scope["verify"](WEBHOOK_SECRET, old, body)
    assert not scope["verify"](WEBHOOK_SECRET, header.split("v1=")[0] + "v1=é", body)


@PROPS
@given(header=st.text(max_size=120), body=st.binary(max_size=100))
def test_verify_reads_any_header_without_failing(header, body):
    """The signature check parses a header a stranger may write: it answers, never raises,
    and only onetag's own signature of these bytes passes."""
    now = 1_700_000_000
    assert coupons.verify(WEBHOOK_SECRET, header, body, now=now) is False
    assert coupons.verify(WEBHOOK_SECRET, f"t={now},v1={header}", body, now=now) is False
    assert coupons.verify(WEBHOOK_SECRET, coupons.signature(WEBHOOK_SECRET, now, body), body,
                          now=now)


async def test_calls_without_the_key_are_kept_only_up_to_a_bound_a_minute(tmp_path, store_ok,
                                                                         monkeypatch, caplog):
    """Anyone can call without the key: each call kept is a writer transaction, a row and a
    warning line, so a flood of them is answered but not all kept. (Wrong keys are besides
    bounded per address: tests/test_guess_bounds.py.)"""
    monkeypatch.setattr(coupons, "UNAUTHORIZED_KEPT_PER_MINUTE", 3)
    caplog.set_level(logging.INFO, logger="onetag.coupons")
    async with bridge(coupon_settings(tmp_path, store_ok.url("store"))) as client:
        for _ in range(10):
            refused = await client.post(remarkety_url(None, **GOOD))
            assert refused.status_code == 401
        created = await client.post(remarkety_url(**GOOD))
        assert created.status_code == 200, created.text
    assert [call["result"] for call in calls(tmp_path)] == ["unauthorized"] * 3 + ["created"]
    warned = [r for r in caplog.records if "unauthorized (401)" in r.getMessage()]
    assert len(warned) == 3
    assert any("the rest of the minute's are answered" in r.getMessage() for r in caplog.records)
