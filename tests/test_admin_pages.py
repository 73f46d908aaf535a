"""The console's pages against the real app (uvicorn on loopback, the forwarder sending to
the fake vendors): Live (page and its Server-Sent Events stream), Search, the event and
delivery pages with a replay, Install; and no secret on any of them."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from console_support import ADMIN_TOKEN, csrf_of
from fakes.harness import (API_KEY, ORIGIN, SC, SECRETS, backend, browser, item, purchase, rows,
                           serve, settings_data, until)
from server import config

EMAIL = "ann@example.com"
IDENTITY_SECRET = "identity-secret-for-console-tests"
ALL_SECRETS = [ADMIN_TOKEN, API_KEY, IDENTITY_SECRET, *SECRETS.values()]
PRE_RE = re.compile(r'<pre class="body">(.*?)</pre>', re.S)


def console_settings(tmp_path, fake) -> config.Settings:
    data = settings_data(tmp_path, fake, site={"identity_secret": IDENTITY_SECRET})
    data["server"]["admin_token"] = ADMIN_TOKEN
    return config.parse(data, env={})


class Console:
    """A logged-in operator's HTTP client; remembers every page it fetched."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.seen: dict[str, str] = {}

    async def get(self, path: str, status: int = 200) -> str:
        answer = await self.client.get(path)
        assert answer.status_code == status, (path, answer.status_code, answer.text[:500])
        self.seen[path] = answer.text
        return answer.text

    async def csrf(self) -> str:
        return csrf_of(await self.get("/admin/install"))


async def log_in(client: httpx.AsyncClient) -> Console:
    page = await client.get("/admin/login")
    answer = await client.post("/admin/login", data={"csrf_token": csrf_of(page.text),
                                                      "token": ADMIN_TOKEN})
    assert answer.status_code == 303
    return Console(client)


def bodies(page: str) -> list[Any]:
    """The request and answer bodies a page shows, parsed back from their <pre>."""
    found = []
    for text in PRE_RE.findall(page):
        try:
            found.append(json.loads(html.unescape(text)))
        except ValueError:
            found.append(html.unescape(text))
    return found


async def shop_activity(client: httpx.AsyncClient) -> None:
    """A visitor browses, identifies and adds to the cart; the backend reports the order."""
    await browser(client, {"event": "page_view", "event_id": "pv-1",
                           "page": {"location": ORIGIN + "/p/mug", "title": "Mug"}},
                  {"event": "identify", "event_id": "id-1", "user": {"email": EMAIL}},
                  {"event": "add_to_cart", "event_id": "atc-1",
                   "page": {"location": ORIGIN + "/p/mug"},
                   "ecommerce": {"currency": "USD", "value": "29.99", "items": [item()]}})
    await backend(client, purchase("1001", email=EMAIL))


@pytest.fixture
async def running(tmp_path, fake):
    async with serve(console_settings(tmp_path, fake)) as app:
        async with httpx.AsyncClient(base_url=app.state.base_url, timeout=30) as client:
            yield app, client, tmp_path / "onetag.db"


async def settled(db) -> None:
    await until(lambda: rows(db) and not rows(db, "d.state = 'pending'"),
                what="deliveries to settle")


async def test_search_by_email_shows_each_delivery_with_its_request_and_answer(running, fake):
    app, client, db = running
    fake.fail("sendlane", 500)  # its first request fails, the retry succeeds
    await shop_activity(client)
    await settled(db)
    console = await log_in(client)
    page = await console.get(f"/admin/search?q={EMAIL}")
    assert EMAIL in page and SC in page and "order 1001" in page
    shown = bodies(page)
    sent = [r for r in fake.requests() if r.body]
    assert sent
    for recorded in sent:  # every request a vendor got is on the page, exactly
        assert json.loads(recorded.body) in shown, recorded.path
    assert {"status": "success"} in shown  # the vendors' answers
    assert {"error": "fake 500"} in shown and "HTTP 500" in page and "HTTP 200" in page
    for vendor in ("rejoiner", "remarkety", "esputnik", "sendlane"):
        assert vendor in page
    # The cart and the timeline.
    assert "SKU-1" in page and "add_to_cart" in page and "identify" in page
    # The same customer by sc, by order id, by event id.
    for query in (SC, "1001", "order-1001"):
        found = await console.get(f"/admin/search?q={query}")
        assert EMAIL in found and "order 1001" in found, query
    assert "Nothing found" in await console.get("/admin/search?q=nobody@example.com")
    assert "Nothing found" in await console.get("/admin/search?q=no-such-order")
    assert "q: at most" in await console.get("/admin/search?q=" + "x" * 300, status=400)
    assert_no_secrets(console)


async def test_event_and_delivery_pages_and_a_replay(running, fake):
    app, client, db = running
    fake.fail("remarkety", 400, times=None)  # a permanent refusal: dead at once
    await backend(client, purchase("2002", email=EMAIL))
    await until(lambda: rows(db, "d.vendor = 'remarkety' AND d.state = 'dead'"),
                what="remarkety's delivery to die")
    await settled(db)
    console = await log_in(client)
    [dead] = rows(db, "d.vendor = 'remarkety' AND d.state = 'dead'")
    event_page = await console.get(f"/admin/events/{dead['event_seq']}")
    assert "purchase" in event_page and "As sent" in event_page and "Normalised" in event_page
    assert f'/admin/deliveries/{dead["id"]}"' in event_page
    assert '"transaction_id": "2002"' in html.unescape(event_page)
    page = await console.get(f"/admin/deliveries/{dead['id']}")
    assert "dead" in page and "HTTP 400" in page and "Replay this delivery" in page
    assert {"error": "fake 400"} in bodies(page)
    # The replay form needs its token; with it, the row is due again and gets delivered.
    refused = await client.post(f"/admin/deliveries/{dead['id']}/replay")
    assert refused.status_code == 403
    fake.heal("remarkety")
    answer = await client.post(f"/admin/deliveries/{dead['id']}/replay",
                               data={"csrf_token": await console.csrf()})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/admin/deliveries/{dead['id']}?replayed=1"
    assert "is due again" in await console.get(answer.headers["location"])
    await until(lambda: rows(db, "d.id = ? AND d.state = 'delivered'", (dead["id"],)),
                what="the replayed delivery to be delivered")
    # A delivered one is never sent again: refused, with the reason.
    again = await client.post(f"/admin/deliveries/{dead['id']}/replay",
                              data={"csrf_token": await console.csrf()})
    assert again.status_code == 409 and "never sends a delivered delivery again" in again.text
    await console.get("/admin/deliveries/999999", status=404)
    await console.get("/admin/events/999999", status=404)
    assert_no_secrets(console)


async def sse_messages(response: httpx.Response, until_fn, deadline_s: float = 30.0
                       ) -> list[dict[str, Any]]:
    """Read the stream's ``events`` messages until ``until_fn(rows)`` holds."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + deadline_s
    event, data = None, []
    lines = response.aiter_lines()
    while not until_fn(got):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting on the stream; got {got}"
        line = await asyncio.wait_for(lines.__anext__(), remaining)
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "":
            if event == "events" and data:
                got += json.loads("".join(data))
            event, data = None, []
    return got


async def test_live_streams_new_events_with_the_filters_applied(running, fake):
    app, client, db = running
    await shop_activity(client)
    console = await log_in(client)
    page = await console.get("/admin/live")
    assert "identify" in page and "add_to_cart" in page and "/admin/events/" in page
    assert "site: no site" in await console.get("/admin/live?site=nope", status=400)
    assert "source: must be one of" in await console.get("/admin/live?source=x", status=400)
    filtered = await console.get("/admin/live?name=purchase")
    assert "add_to_cart" not in filtered and "order 1001" in filtered
    [after] = re.findall(r'data-live-after="(\d+)"', page)
    # Everything new, then only purchases by this email.
    async with client.stream("GET", f"/admin/live/stream?after={after}") as everything, \
            client.stream("GET", f"/admin/live/stream?after={after}&name=purchase"
                                 f"&email={EMAIL.upper()}") as purchases:
        assert everything.headers["content-type"].startswith("text/event-stream")
        await browser(client, {"event": "view_item", "event_id": "vi-9",
                               "ecommerce": {"currency": "USD", "items": [item("SKU-9")]}})
        await backend(client, purchase("3003", email="other@example.com"),
                      purchase("3004", email=EMAIL))
        seen = await sse_messages(everything, lambda got: len(got) >= 3)
        assert [row["name"] for row in seen[:3]] == ["view_item", "purchase", "purchase"]
        assert seen[0]["href"] == f"/admin/events/{seen[0]['seq']}"
        mine = await sse_messages(purchases, lambda got: len(got) >= 1)
        assert [(row["name"], row["email"]) for row in mine] == [("purchase", EMAIL)]
        assert "order 3004" in mine[0]["summary"]
    bad = await client.get("/admin/live/stream?after=x")
    assert bad.status_code == 400 and "after" in bad.text


async def test_the_stream_needs_a_login(running):
    app, client, db = running
    answer = await client.get("/admin/live/stream", headers={"accept": "text/event-stream"})
    assert answer.status_code == 303


async def test_install_shows_the_tag_and_the_last_event_from_each_origin(running, fake):
    app, client, db = running
    console = await log_in(client)
    page = await console.get("/admin/install")
    public_url = app.state.settings.server.public_url
    assert f'&lt;script async src="{public_url}/s/shop1.js"&gt;' in page
    assert "$SHOP1_API_KEY" in page and "dataLayer.push" in page
    assert "no browser event from this origin yet" in page
    await shop_activity(client)
    checks = (await client.get("/admin/install/check.json")).json()
    assert [(c["site"], c["origin"], c["ok"]) for c in checks] == [("shop1", ORIGIN, True)]
    assert checks[0]["event"].startswith("add_to_cart on https://shop.example/p/mug")
    assert "s ago" in checks[0]["seen"]
    assert_no_secrets(console)


CURL_BODY_RE = re.compile(r"curl -X POST \S+/api/v1/sites/shop1/events.*?-d '(.*?)'", re.S)


async def test_install_shows_the_readmes_backend_purchase_and_it_is_accepted(running, fake):
    """The Install page's backend call is README's first one (with the customer_id README
    says to send), and the API takes it as shown."""
    app, client, db = running
    console = await log_in(client)
    page = html.unescape(await console.get("/admin/install"))
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    shown = json.loads(CURL_BODY_RE.findall(page)[0])
    assert shown == json.loads(CURL_BODY_RE.findall(readme)[0])
    assert shown["user"]["customer_id"]
    answer = await client.post("/api/v1/sites/shop1/events", json=shown,
                               headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 202, answer.text


def assert_no_secrets(console: Console) -> None:
    assert console.seen
    for path, text in console.seen.items():
        for secret in ALL_SECRETS:
            assert secret not in text, f"{path} shows a secret"


class Client:
    """What ``live.tail`` asks of a request: whether the client is still there."""

    def __init__(self, polls_before_leaving: int):
        self.polls = polls_before_leaving

    async def is_disconnected(self) -> bool:
        self.polls -= 1
        return self.polls < 0


async def test_the_stream_bounds_each_message_beats_when_idle_and_ends_with_the_client(
        tmp_path, fake):
    from server.admin import live
    from server.admin.web import Console as PageConsole

    settings = console_settings(tmp_path, fake)
    async with serve(settings) as app:
        async with httpx.AsyncClient(base_url=app.state.base_url, timeout=30) as client:
            await browser(client, *({"event": "page_view", "event_id": f"pv-{n}"}
                                    for n in range(live.ROWS_PER_MESSAGE + 50)))
        console = PageConsole(settings, app.state.store)
        messages = [m async for m in live.tail(console, Client(3), {}, 0, poll_s=0.01,
                                               heartbeat_s=0)]
    assert messages[0].startswith("retry:")
    data = [json.loads(m.split("data: ", 1)[1]) for m in messages if m.startswith("id:")]
    assert [len(rows) for rows in data] == [live.ROWS_PER_MESSAGE, 50]
    assert [row["name"] for rows in data for row in rows] == ["page_view"] * (
        live.ROWS_PER_MESSAGE + 50)
    assert messages[-1] == ": heartbeat\n\n"  # nothing new: a comment, then the client left
    # A session that has expired ends the stream at once, client or not.
    async with serve(settings) as app:
        console = PageConsole(settings, app.state.store)
        ended = [m async for m in live.tail(console, Client(1000), {}, 0, poll_s=0.01,
                                            until_ms=1)]
    assert ended == ["retry: 2000\n\n"]


# On PostgreSQL ----------------------------------------------------------------------------

async def test_the_console_on_postgresql(tmp_path, fake, pg_database):
    """The same console over a PostgreSQL database: log in, Live, Search finds the
    customer and the order, a dead delivery replayed from Dead letters is delivered."""
    from backends import Backend

    db = Backend("postgresql", pg_database)

    async def deliveries(where: str = "true", *params: Any) -> list[dict[str, Any]]:
        return await db.dicts(f"SELECT * FROM deliveries WHERE {where} ORDER BY id", *params)

    async def wait(condition_sql: str, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 30
        while not (found := await deliveries(condition_sql)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)
        return found

    data = settings_data(tmp_path, fake, site={"identity_secret": IDENTITY_SECRET})
    data["server"].update(admin_token=ADMIN_TOKEN, database=pg_database)
    fake.fail("remarkety", 400, times=None)  # a permanent refusal: dead at once
    async with serve(config.parse(data, env={})) as app:
        async with httpx.AsyncClient(base_url=app.state.base_url, timeout=30) as client:
            await shop_activity(client)
            console = await log_in(client)
            live_page = await console.get("/admin/live")
            assert "identify" in live_page and "order 1001" in live_page
            [after] = re.findall(r'data-live-after="(\d+)"', live_page)
            async with client.stream("GET", f"/admin/live/stream?after={after}") as stream:
                await backend(client, purchase("3003", email="other@example.com"))
                seen = await sse_messages(stream, lambda got: len(got) >= 1)
            assert "order 3003" in seen[0]["summary"]
            page = await console.get(f"/admin/search?q={EMAIL}")
            assert EMAIL in page and SC in page and "order 1001" in page and "SKU-1" in page
            assert EMAIL in await console.get("/admin/search?q=1001")  # by order id
            # Every remarkety row dead (none still retrying), so the set listed is the set
            # the replay finds.
            [dead] = await wait("vendor = 'remarkety' AND state = 'dead' "
                                "AND dedup_key = 'orders/create:1001' AND NOT EXISTS (SELECT 1 "
                                "FROM deliveries p WHERE p.vendor = 'remarkety' "
                                "AND p.state = 'pending')", "remarkety to die")
            assert "HTTP 400" in await console.get(f"/admin/deliveries/{dead['id']}")
            listing = await console.get("/admin/deadletters?vendor=remarkety")
            assert f'href="/admin/deliveries/{dead["id"]}"' in listing
            form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                                   listing[listing.index('id="replay"'):]))
            fake.heal("remarkety")
            done = await client.post("/admin/deadletters/replay", data=form)
            assert done.status_code == 303, done.text
            assert "Replayed" in await console.get(done.headers["location"])
            await wait(f"id = {int(dead['id'])} AND state = 'delivered'",
                       "the replayed delivery to be delivered")
            for path in ("/admin/vendors", "/admin/reconcile", "/admin/install"):
                await console.get(path)
            assert (await client.get("/admin/install/check.json")).json()[0]["ok"] is True
    assert_no_secrets(console)


async def test_live_sends_a_row_another_node_committed_after_a_higher_seq(tmp_path,
                                                                          pg_database):
    """Two nodes draw seqs from one sequence and commit in any order: a row that becomes
    visible after a higher seq was streamed is sent when it turns up."""
    import asyncpg

    from server.admin import live
    from server.admin.web import Console as PageConsole
    from server.store.postgres import PostgresStore

    settings = config.parse({
        "server": {"database": pg_database, "admin_token": ADMIN_TOKEN, "forward": False},
        "sites": [{"id": "shop1", "origins": [ORIGIN], "api_key": API_KEY}]}, env={})
    store = PostgresStore(pg_database, settings.sites)
    await store.open()
    first, second = await asyncpg.connect(pg_database), await asyncpg.connect(pg_database)
    insert = ("INSERT INTO events (seq, site_id, event_id, name, source, received_ms, raw, "
              "data) VALUES ($1, 'shop1', $2, 'page_view', 'browser', 0, '{}', '{}')")
    try:
        stream = live.tail(PageConsole(settings, store), Client(1000), {}, 0, poll_s=0.01,
                           heartbeat_s=1000)
        assert await anext(stream) == "retry: 2000\n\n"
        slow = first.transaction()
        await slow.start()
        await first.execute(insert, 1, "slow")  # drew seq 1, not committed yet
        await second.execute(insert, 2, "quick")  # seq 2, committed first
        message = await anext(stream)
        assert message.startswith("id: 2\n") and '"seq": 2' in message
        await slow.commit()
        late = await anext(stream)
        assert late.startswith("id: 2\n") and '"seq": 1' in late and '"seq": 2' not in late
        await stream.aclose()
        # A stream starting above a seq still being committed (the page loaded meanwhile)
        # sends it when it turns up.
        slow = first.transaction()
        await slow.start()
        await first.execute(insert, 3, "slow-2")
        await second.execute(insert, 4, "quick-2")
        stream = live.tail(PageConsole(settings, store), Client(1000), {}, 4, poll_s=0.01,
                           heartbeat_s=1000)
        assert await anext(stream) == "retry: 2000\n\n"

        async def commit_later() -> None:
            await asyncio.sleep(0.3)  # the stream has polled (every 0.01 s) meanwhile
            await slow.commit()

        committing = asyncio.create_task(commit_later())
        late = await anext(stream)
        await committing
        assert late.startswith("id: 4\n") and '"seq": 3' in late and '"seq": 4' not in late
        await stream.aclose()
    finally:
        await first.close()
        await second.close()
        await store.close()
