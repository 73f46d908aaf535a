"""The console's Vendors, Dead letters and Reconciliation pages, in process over a real SQLite
file (and over PostgreSQL where a test takes ``backend``): what they show, the replay
(dry-run count = replayed, recorded, refused when the set changed, CSRF), bad filters
answered 400 naming the field, and no configured secret shown."""

from __future__ import annotations

import re
import sqlite3
import time

import httpx
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from console_support import SECRETS, assert_no_secret, console_settings, login
from server.admin.dead_letters import BadFilter, iso_ms, parse_filter, parse_time
from server.store import console_ops, deadletters
from server.store.deadletters import check
from support import running

SITES = {"shop1": None}


def seed_rows(now: int) -> list[tuple[str, tuple]]:
    """Orders, deliveries in every state, attempts with answers (one echoing a secret)."""
    rows: list[tuple[str, tuple]] = []
    for seq, order in enumerate(("A-1", "A-2"), start=1):
        rows.append(("INSERT INTO events (seq, site_id, event_id, name, source, received_ms, "
                     "raw, data) VALUES (?, 'shop1', ?, 'purchase', 'backend', ?, '{}', ?)",
                     (seq, f"order-{order}", now - 60_000,
                      f'{{"ecommerce": {{"transaction_id": "{order}"}}}}')))
    deliveries = [
        (1, "sendlane", "order-placed:A-1", "delivered", None),
        (2, "sendlane", "order-placed:A-2", "dead", "HTTP 500: boom"),
        (3, "remarkety", "orders/create:A-1", "dead",
         f"HTTP 401: key {SECRETS['remarkety api_key']} refused"),
        (4, "remarkety", "orders/create:A-2", "dead", "HTTP 400: 100% bad_field"),
        (5, "esputnik", "PurchasedItems:A-1", "pending", "HTTP 503: later"),
        (6, "esputnik", "PurchasedItems:A-2", "held", None),
    ]
    for id_, vendor, key, state, error in deliveries:
        rows.append((
            "INSERT INTO deliveries (id, site_id, vendor, dedup_key, claim, event_seq, visitor, "
            "state, request, attempts, next_attempt_ms, last_error, created_ms, updated_ms) "
            "VALUES (?, 'shop1', ?, ?, 0, 1, 'sc:V', ?, '{}', 1, 0, ?, ?, ?)",
            (id_, vendor, key, state, error, now - 120_000, now - 60_000)))
    for delivery, duration, status, body in [
            (1, 40, 200, "ok"), (2, 900, 500, "boom"), (2, 800, 500, "boom"),
            (3, 20, 401, f"bad key {SECRETS['remarkety api_key']}")]:
        rows.append(("INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, "
                     "request, status, answer, error) VALUES (?, 1, ?, ?, '{}', ?, ?, NULL)",
                     (delivery, now - 30_000, duration, status,
                      f'{{"headers": {{}}, "body": "{body}", "truncated": false}}')))
    return rows


def seed(path: str, now: int) -> None:
    with sqlite3.connect(path) as conn:
        for sql, params in seed_rows(now):
            conn.execute(sql, params)


def states_of(path: str) -> dict[int, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, state FROM deliveries"))


async def logged_in(client: httpx.AsyncClient) -> None:
    answer = await login(client)
    assert answer.status_code == 303, answer.text


async def test_pages_need_a_login_and_show_no_secret(tmp_path) -> None:
    settings = console_settings(tmp_path)
    async with running(settings) as (app, client):
        seed(settings.server.sqlite_path, int(time.time() * 1000))
        for path in ("/admin/vendors", "/admin/deadletters", "/admin/reconcile"):
            answer = await client.get(path)
            assert answer.status_code == 303 and "/admin/login" in answer.headers["location"]
        await logged_in(client)
        for path in ("/admin/vendors", "/admin/vendors?range=30d", "/admin/deadletters",
                     "/admin/deadletters?vendor=remarkety&error=401", "/admin/reconcile"):
            page = await client.get(path)
            assert page.status_code == 200, (path, page.text)
            assert_no_secret(path, page.text)
        page = await client.get("/admin/deadletters?vendor=remarkety&error=401")
        assert "HTTP 401: key [redacted] refused" in page.text
        posted = await client.post("/admin/deadletters/replay", data={"state": "dead"})
        assert posted.status_code == 403  # no CSRF token


async def test_vendors_page_shows_counts_charts_and_grouped_errors(tmp_path) -> None:
    settings = console_settings(tmp_path)
    async with running(settings) as (app, client):
        seed(settings.server.sqlite_path, int(time.time() * 1000))
        await logged_in(client)
        page = (await client.get("/admin/vendors")).text
    sendlane = page[page.index('id="vendor-shop1-sendlane"'):]
    sendlane = sendlane[:sendlane.index("</section>")]
    assert sendlane.count("<svg") == 2 and 'viewBox="0 0 360 180"' in sendlane
    assert 'data-series="p50"' in sendlane or "<circle" in sendlane  # one bucket: a dot
    assert "33.3 %" in sendlane  # 1 of 3 attempts answered 2xx
    assert re.search(r"<td>500</td>\s*<td[^>]*>boom</td><td>2</td>", sendlane)
    assert 'href="/admin/deadletters?state=dead&amp;vendor=sendlane&amp;site=shop1"' in sendlane
    # A configured vendor with nothing stored yet is shown with zeros.
    assert 'id="vendor-shop1-rejoiner"' in page
    assert "[redacted]" in page[page.index('id="vendor-shop1-remarkety"'):]
    assert "settled-window" not in page  # every row counted
    async with running(settings) as (app, client):
        await logged_in(client)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(console_ops, "SETTLED_WINDOW", 1)
            windowed = (await client.get("/admin/vendors")).text
    assert "delivered, ignored, browser and expired: among the latest 1 deliveries" in windowed
    async with running(settings) as (app, client):
        await logged_in(client)
        bad = await client.get("/admin/vendors?range=1y")
        assert bad.status_code == 400 and "range: one of 24h, 30d" in bad.text


async def test_dead_letters_dry_run_then_replay_exactly_that_set_and_record_it(backend,
                                                                             tmp_path):
    settings = console_settings(tmp_path, database=backend.database)

    async def states() -> dict[int, str]:
        return dict(await backend.rows("SELECT id, state FROM deliveries"))

    async with running(settings) as (app, client):
        for sql, params in seed_rows(int(time.time() * 1000)):
            await backend.rows(sql, *params)
        await logged_in(client)
        page = await client.get("/admin/deadletters?state=dead&error=HTTP+40")
        assert page.status_code == 200
        assert re.search(r"<strong>2</strong> deliveries match", page.text)
        assert "Replay these 2" in page.text
        assert 'href="/admin/deliveries/3"' in page.text and 'href="/admin/deliveries/4"' in page.text
        assert 'href="/admin/deliveries/2"' not in page.text  # HTTP 500: not matched
        form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                               page.text[page.text.index('id="replay"'):]))
        assert form["shown"] == "2" and form["error"] == "HTTP 40"
        done = await client.post("/admin/deadletters/replay", data=form)
        assert done.status_code == 303 and "replayed=1" in done.headers["location"]
        assert await states() == {1: "delivered", 2: "dead", 3: "pending", 4: "pending",
                                  5: "pending", 6: "held"}
        after = await client.get(done.headers["location"])
        assert "Replayed 2 deliveries (replay #1)" in after.text
        replays = after.text[after.text.index('id="replays"'):]
        assert re.search(r"<td>1</td>\s*<td>[^<]+</td>\s*<td>console:127\.0\.0\.1</td>\s*"
                         r"<td>2</td>\s*<td>2</td>", replays)
        assert "dead · error contains &#39;HTTP 40&#39;</td>" in replays
        assert await backend.rows("SELECT who, replayed, ids FROM replays") == [
            ("console:127.0.0.1", 2, "[3,4]")]


async def test_a_replay_whose_set_changed_says_so_and_replays_nothing(tmp_path) -> None:
    settings = console_settings(tmp_path)
    db = settings.server.sqlite_path
    async with running(settings) as (app, client):
        seed(db, int(time.time() * 1000))
        await logged_in(client)
        page = await client.get("/admin/deadletters?vendor=sendlane")
        form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                               page.text[page.text.index('id="replay"'):]))
        assert form["shown"] == "1"
        with sqlite3.connect(db) as conn:  # another sendlane delivery dies meanwhile
            conn.execute("UPDATE deliveries SET vendor = 'sendlane' WHERE id = 4")
        answer = await client.post("/admin/deadletters/replay", data=form)
        assert answer.status_code == 409
        assert "it had\n  1 delivery, it has\n  2 now" in answer.text
        assert "Replay these 2" in answer.text  # the new set, with its own fingerprint
        assert states_of(db)[2] == "dead" and states_of(db)[4] == "dead"
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM replays").fetchone() == (0,)
        # Without the fingerprint, or for a state that is not replayed: 400, nothing done.
        assert (await client.post("/admin/deadletters/replay",
                                  data={**form, "expect": ""})).status_code == 400
        held = await client.post("/admin/deadletters/replay", data={**form, "state": "held"})
        assert held.status_code == 400 and "held deliveries are not replayed" in held.text
        assert states_of(db)[6] == "held"


async def test_bad_filters_are_400_naming_the_field(tmp_path) -> None:
    settings = console_settings(tmp_path)
    async with running(settings) as (app, client):
        await logged_in(client)
        for query, field in [("state=delivered", "state:"), ("vendor=mailchimp", "vendor:"),
                             ("site=nope", "site:"), ("since=yesterday", "since:"),
                             ("since=1h&until=2h", "until:"), ("error=" + "x" * 201, "error:"),
                             ("before=abc", "before:")]:
            page = await client.get(f"/admin/deadletters?{query}")
            assert page.status_code == 400, query
            assert field in page.text, query
        page = await client.get("/admin/reconcile?since=soon")
        assert page.status_code == 400 and "since:" in page.text


async def test_reconciliation_lists_missing_orders_linked_to_search(backend, tmp_path) -> None:
    settings = console_settings(tmp_path, database=backend.database)
    async with running(settings) as (app, client):
        for sql, params in seed_rows(int(time.time() * 1000)):
            await backend.rows(sql, *params)
        await logged_in(client)
        vendors = await client.get("/admin/vendors")
        assert vendors.status_code == 200 and "33.3 %" in vendors.text
        assert_no_secret("vendors", vendors.text)
        page = (await client.get("/admin/reconcile?since=1d")).text
    summary = page[page.index('id="summary"'):page.index("</table>", page.index('id="summary"'))]
    rows = re.findall(r"<tr><td>shop1</td><td>(\w+)</td><td>(\d+)</td>\s*<td[^>]*>(\d+)</td>",
                      summary)
    assert sorted(rows) == [("esputnik", "2", "0"), ("rejoiner", "2", "0"),
                            ("remarkety", "2", "0"), ("sendlane", "2", "1")]
    missing = page[page.index('id="missing-shop1-sendlane"'):]
    assert 'href="/admin/search?q=A-2"' in missing and "HTTP 500: boom" in missing
    rejoiner = page[page.index('id="missing-shop1-rejoiner"'):]
    assert "no delivery planned" in rejoiner
    assert_no_secret("reconcile", page)


# The filter parser -----------------------------------------------------------------------

FIELD = st.one_of(st.just(""), st.text(max_size=80),
                  st.sampled_from(["dead", "expired", "held", "failing", "sendlane", "shop1",
                                   "2h", "3d", "2026-01-31", "2026-01-31T14:00Z", "created",
                                   "updated"]))


@given(st.dictionaries(st.sampled_from(["state", "vendor", "site", "since", "until", "error",
                                        "time", "other"]), FIELD))
@hsettings(max_examples=300, deadline=None)
def test_any_query_is_a_valid_filter_or_names_its_field(params) -> None:
    now = 1_800_000_000_000
    try:
        selection = parse_filter(params, SITES, now)
    except BadFilter as exc:
        assert exc.field in ("state", "vendor", "site", "since", "until", "error", "time")
        return
    assert check(selection) is None
    # The exact instants the replay form carries read back to the same filter.
    for name, ms in (("since", selection.since_ms), ("until", selection.until_ms)):
        assert parse_time(iso_ms(ms), now, name) == ms


async def test_more_rows_than_one_replay_may_take_are_listed_not_replayed(tmp_path, monkeypatch):
    monkeypatch.setitem(deadletters.MAX_REPLAY_ROWS, "dead", 2)
    settings = console_settings(tmp_path)
    db = settings.server.sqlite_path
    async with running(settings) as (app, client):
        seed(db, int(time.time() * 1000))
        await logged_in(client)
        page = await client.get("/admin/deadletters")
        assert re.search(r"<strong>3</strong> deliveries match", page.text)
        assert "more than 2 dead deliveries match" in page.text
        assert 'id="replay"' not in page.text
        narrowed = await client.get("/admin/deadletters?vendor=remarkety")
        assert "Replay these 2" in narrowed.text
        form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                               narrowed.text[narrowed.text.index('id="replay"'):]))
        answer = await client.post("/admin/deadletters/replay", data={**form, "vendor": ""})
        assert answer.status_code == 400 and "more than 2 dead deliveries" in answer.text
        assert set(states_of(db).values()) == {"delivered", "dead", "pending", "held"}
        assert list(states_of(db).values()).count("dead") == 3


def test_every_configured_secret_is_known_to_the_scrubber(tmp_path) -> None:
    from server.admin.scrub import REDACTED, scrub, secret_values

    secrets = secret_values(console_settings(tmp_path))
    assert set(secrets) == set(SECRETS.values())
    text = " and ".join(SECRETS.values())
    assert scrub(text, secrets) == " and ".join([REDACTED] * len(SECRETS))
