"""POST /e and the backend API over HTTP: CORS, the sc cookie, dedup, and every kind of bad input.

On both store backends (the ``backend`` fixture, tests/backends.py)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from server.admin import auth
from support import ORIGIN, beacon, item, running, settings_for

TEXT = {"content-type": "text/plain;charset=UTF-8", "origin": ORIGIN}


async def count(backend, table: str = "events") -> int:
    return (await backend.rows(f"SELECT count(*) FROM {table}"))[0][0]


async def test_batch_is_stored_and_answered_204_with_cookie_and_cors(backend) -> None:
    settings = backend.settings()
    async with running(settings) as (_, client):
        body = beacon([{"event_id": "e1", "event": "page_view", "page": {"location": "https://shop.example/"}},
                       {"event_id": "e2", "event": "view_item", "ecommerce": {"items": [item()]}}])
        response = await client.post("/e", content=body, headers=TEXT)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    cookie = response.headers["set-cookie"]
    sc = cookie.split(";")[0].split("=")[1]
    assert sc == sc.upper() and len(sc) == 36
    assert "Max-Age=31536000" in cookie and "SameSite=Lax" in cookie and "Secure" in cookie
    assert "HttpOnly" not in cookie
    rows = await backend.rows("SELECT event_id, name, sc FROM events ORDER BY seq")
    [session] = await backend.rows("SELECT sc, user_agent, last_page FROM sessions")
    assert rows == [("e1", "page_view", sc), ("e2", "view_item", sc)]
    assert session[0] == sc and session[2] == "https://shop.example/"


async def test_an_existing_sc_is_reused_from_body_or_cookie(backend) -> None:
    settings = backend.settings()
    async with running(settings) as (_, client):
        first = await client.post("/e", content=beacon([{"event_id": "e1", "event": "page_view"}],
                                  sc="cda68358-94fb-4d83-9655-3feb3c4114a3"), headers=TEXT)
        assert "sc=CDA68358-94FB-4D83-9655-3FEB3C4114A3" in first.headers["set-cookie"]
        client.cookies.set("sc", "11111111-2222-3333-4444-555555555555")
        second = await client.post("/e", content=beacon([{"event_id": "e2", "event": "page_view"}]),
                                   headers=TEXT)
        assert "sc=11111111-2222-3333-4444-555555555555" in second.headers["set-cookie"]


async def test_repeated_event_id_is_stored_once(backend) -> None:
    settings = backend.settings()
    body = beacon([{"event_id": "same", "event": "add_to_cart", "ecommerce": {"items": [item()]}}],
                  sc="AAAAAAAA-0000-0000-0000-000000000000")
    async with running(settings) as (_, client):
        for _ in range(3):
            assert (await client.post("/e", content=body, headers=TEXT)).status_code == 204
    assert await count(backend) == 1
    # The cart delta was applied once, not three times.
    items = json.loads((await backend.rows("SELECT cart_items FROM sessions"))[0][0])
    assert items[0]["quantity"] == 1


async def test_json_content_type_and_preflight(backend) -> None:
    settings = backend.settings()
    async with running(settings) as (_, client):
        pre = await client.options("/e", headers={"origin": ORIGIN,
                                                  "access-control-request-method": "POST"})
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        bad_pre = await client.options("/e", headers={"origin": "https://evil.example"})
        assert bad_pre.status_code == 403 and "access-control-allow-origin" not in bad_pre.headers
        response = await client.post("/e", content=beacon([{"event_id": "e1", "event": "page_view"}]),
                                     headers={"content-type": "application/json", "origin": ORIGIN})
        assert response.status_code == 204


@pytest.mark.parametrize("body, headers, status, field", [
    (b"{nope", TEXT, 400, "body"),
    (b"[]", TEXT, 422, "body"),
    (beacon([], site_id="shop1"), TEXT, 422, "events"),
    (beacon([{"event_id": "e1", "event": "page_view"}], site_id="nosuch"), TEXT, 404, "site_id"),
    (beacon([{"event_id": "e1", "event": "page_view"}]), {**TEXT, "origin": "https://evil.example"},
     403, "origin"),
    (beacon([{"event_id": "e1", "event": "page_view"}]), {**TEXT, "content-type": "application/xml"},
     415, "content-type"),
    (beacon([{"event_id": "ok", "event": "page_view"},
             {"event_id": "e2", "event": "view_item", "ecommerce": {"items": [item(price="abc")]}}]),
     TEXT, 422, "events[1].ecommerce.items[0].price"),
    (beacon([{"event_id": f"e{i}", "event": "page_view"} for i in range(501)]), TEXT, 413, "events"),
    (b'{"site_id": "shop1", "events": [{"event_id": "e1", "event": "x", "pad": "' + b"y" * (1024 * 1024)
     + b'"}]}', TEXT, 413, "body"),
])
async def test_bad_input_is_refused_naming_the_field_and_stores_nothing(
        backend, body: bytes, headers: dict, status: int, field: str) -> None:
    settings = backend.settings()
    async with running(settings) as (_, client):
        response = await client.post("/e", content=body, headers=headers)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["errors"][0]["field"] == field
    assert payload["errors"][0]["problem"]
    assert await count(backend) == 0 and await count(backend, "sessions") == 0


DOCS = Path(__file__).resolve().parent.parent / "docs"


async def test_the_body_docs_operations_shows_is_taken_and_its_refusals_are_as_it_says(
        backend) -> None:
    """docs/operations.md, "The browser's body": its example is stored (204); as a form's
    content type it is a 415 naming content-type; without an event_id, the 422 it quotes."""
    page = (DOCS / "operations.md").read_text(encoding="utf-8")
    section = page.split("## The browser's body: `POST /e`", 1)[1].split("\n## ", 1)[0]
    example = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    quoted = json.loads(section.split("its body names the field:\n\n", 1)[1].split("\n\n", 1)[0])
    settings = backend.settings()
    async with running(settings) as (_, client):
        body = json.dumps(example).encode()
        for kind in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            form = await client.post("/e", content=body, headers={**TEXT, "content-type": kind})
            assert form.status_code == 415, form.text
            assert form.json()["errors"][0]["field"] == "content-type"
        del example["events"][0]["event_id"]
        missing = await client.post("/e", content=json.dumps(example).encode(), headers=TEXT)
        assert missing.status_code == 422
        assert missing.json()["message"] == quoted["message"]
        assert missing.json()["errors"][0]["field"] == quoted["errors"][0]["field"]
        example["events"][0]["event_id"] = "doc-example"
        stored = await client.post("/e", content=json.dumps(example).encode(), headers=TEXT)
        assert stored.status_code == 204, stored.text
        assert "sc=CDA68358-94FB-4D83-9655-3FEB3C4114A3" in stored.headers["set-cookie"]
    assert await count(backend) == 1


async def test_backend_api_auth(backend) -> None:
    settings = backend.settings()
    event = {"event": "identify", "user": {"email": "a@b.co"}}
    async with running(settings) as (_, client):
        url = "/api/v1/sites/shop1/events"
        missing = await client.post(url, json=event)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.post(url, json=event, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["errors"][0]["field"] == "authorization"
        unknown = await client.post("/api/v1/sites/other/events", json=event,
                                    headers={"authorization": "Bearer secret-key-0123456789"})
        assert unknown.status_code == 404
        ok = await client.post(url, json=event, headers={"authorization": "Bearer secret-key-0123456789"})
        assert ok.status_code == 202
    assert await count(backend) == 1


def from_address(app, client: httpx.AsyncClient, host: str) -> httpx.AsyncClient:
    """A client of the same app whose requests come from ``host``."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 40000)),
                             base_url=client.base_url)


async def test_wrong_api_keys_lock_their_address_out(tmp_path, monkeypatch) -> None:
    """100 wrong keys in a row all got 403 in 3.7 s: the api_key could be guessed without
    limit. Now as at the console's login: 5 wrong within a minute from one address, then
    429 with Retry-After (the right key too) until the window has passed. Only wrong keys
    count, and only their address is locked."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    event = {"event": "identify", "user": {"email": "a@b.co"}}
    url = "/api/v1/sites/shop1/events"
    right = {"authorization": "Bearer secret-key-0123456789"}
    async with running(settings_for(tmp_path)) as (app, guesser):
        async with from_address(app, guesser, "10.0.0.7") as shop:
            for _ in range(20):  # right keys never count
                assert (await guesser.post(url, json=event, headers=right)).status_code == 202
            for n in range(5):
                wrong = await guesser.post(url, json=event,
                                           headers={"authorization": f"Bearer guess{n}"})
                assert wrong.status_code == 403, n
            for headers in ({"authorization": "Bearer guess5"}, right):
                locked = await guesser.post(url, json=event, headers=headers)
                assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60
                assert locked.json()["error"] == "too_many_requests"
                assert locked.json()["errors"][0]["field"] == "authorization"
            # Without a key it is not a guess: still the 401 saying what to send.
            assert (await guesser.post(url, json=event)).status_code == 401
            # Another address, the shop's backend: untouched.
            assert (await shop.post(url, json=event, headers=right)).status_code == 202
        rejected = app.state.metrics.rejections.labels("backend", "too_many_requests")
        assert rejected._value.get() == 2  # /metrics counts them by their own reason


async def test_a_right_api_key_is_never_slowed_by_wrong_ones(tmp_path, monkeypatch) -> None:
    """Each wrong key is answered late (here 5 s); the shop's backend posting with the right
    key meanwhile, from its own address, is answered at once, every time."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 5)
    event = {"event": "identify", "user": {"email": "a@b.co"}}
    url = "/api/v1/sites/shop1/events"
    async with running(settings_for(tmp_path)) as (app, guesser):
        async with from_address(app, guesser, "10.0.0.7") as shop:
            guesses = [asyncio.create_task(guesser.post(
                url, json=event, headers={"authorization": f"Bearer guess{n}"}))
                for n in range(5)]
            await asyncio.sleep(0)
            for _ in range(10):
                ok = await shop.post(url, json=event, headers={"authorization": "Bearer secret-key-0123456789"})
                assert ok.status_code == 202
            assert not any(task.done() for task in guesses)  # still waiting out their delay
            assert [(await task).status_code for task in guesses] == [403] * 5


async def test_backend_api_takes_one_event_or_a_list_and_dedups(backend) -> None:
    settings = backend.settings()
    auth = {"authorization": "Bearer secret-key-0123456789"}
    order = {"event": "purchase", "event_id": "order-1001", "user": {"email": "A@b.co"},
             "ecommerce": {"transaction_id": "1001", "value": 8.70, "items": [item(price=4.35, quantity=2)]},
             "billing_address": {"first_name": "Ann", "city": "Kyiv"}, "status": "processing"}
    async with running(settings) as (_, client):
        one = await client.post("/api/v1/sites/shop1/events", json=order, headers=auth)
        assert one.status_code == 202 and one.json() == {"event_ids": ["order-1001"], "duplicates": []}
        many = await client.post("/api/v1/sites/shop1/events", headers=auth, json=[
            order, {"event": "order_status", "transaction_id": "1001", "status": "fulfilled",
                    "user": {"email": "a@b.co"}}])
        assert many.status_code == 202
        assert many.json()["duplicates"] == ["order-1001"] and len(many.json()["event_ids"]) == 2
        bad = await client.post("/api/v1/sites/shop1/events", headers=auth, json=[
            {"event": "identify", "user": {"email": "c@d.co"}}, {"event": "purchase", "user": {"email": "c@d.co"}}])
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "body[1].ecommerce.transaction_id"
        text = await client.post("/api/v1/sites/shop1/events", headers={**auth, "content-type": "text/plain"},
                                 content=json.dumps(order))
        assert text.status_code == 415
    assert await count(backend) == 2
    assert await backend.rows("SELECT email FROM identities") == [("a@b.co",)]
    assert await backend.rows("SELECT count(*) FROM events WHERE data LIKE '%c@d.co%'") == [(0,)]


async def test_healthz(backend) -> None:
    async with running(backend.settings()) as (_, client):
        response = await client.get("/healthz")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    # The app's default store, on either backend: the writer in a process of its own, whose
    # committed write the answer waited for.
    assert isinstance(body["writer_pid"], int) and body["writer_pid"] != os.getpid()


async def test_origins_written_with_capitals_or_a_default_port_match_what_browsers_send(
        backend) -> None:
    """Browsers send ``Origin`` lowercase and without the default port: origins written
    ``https://Shop.Example`` or ``https://b.example:443`` refused every event 403."""
    settings = backend.settings(origins=["https://Shop.Example", "https://b.example:443",
                                         "http://C.example:8080/"])
    body = beacon([{"event_id": "e1", "event": "page_view"}])
    async with running(settings) as (_, client):
        for origin in ("https://shop.example", "https://b.example", "http://c.example:8080"):
            response = await client.post("/e", content=body, headers={**TEXT, "origin": origin})
            assert response.status_code == 204, (origin, response.text)
            assert response.headers["access-control-allow-origin"] == origin
            pre = await client.options("/e", headers={"origin": origin,
                                                      "access-control-request-method": "POST"})
            assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == origin
        refused = await client.post("/e", content=body,
                                    headers={**TEXT, "origin": "https://b.example:8443"})
        assert refused.status_code == 403
    assert await count(backend) == 1  # one event id, stored once
