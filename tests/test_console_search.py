"""The console's read queries (server/store/console_search.py), on SQLite and on PostgreSQL:
what they find, and that each uses an index or a seq range, never a scan of a whole table
(their plans: SQLite's ``EXPLAIN QUERY PLAN``; PostgreSQL's ``EXPLAIN`` with sequential
scans priced out, so a ``Seq Scan`` left in a plan is one no index can avoid)."""

from __future__ import annotations

import sqlite3
from typing import Any

from hypothesis import given, settings as hsettings, strategies as st

from fakes.harness import ORIGIN, SC
from server.admin import live
from server.admin.web import Console
from server.store import console_search as q
from server.store.pg_console import numbered
from support import running, settings_for

EMAIL = "ann@example.com"
TABLES = ("events", "deliveries", "identities", "sessions", "attempts")
ALIASES = ("e", "d", "i", "s", "p")


def plan_scans(db_path: str, statements: list[tuple[str, list[Any]]]) -> list[tuple[str, str]]:
    """(statement, plan line) for every plan line that scans a table whole: ``SCAN <table
    or alias>`` (a rowid range or an index shows as ``SEARCH``)."""
    conn = sqlite3.connect(db_path)
    try:
        found = []
        for sql, params in statements:
            for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params):
                words = row[3].split()
                if words[0] == "SCAN" and words[1] in (*TABLES, *ALIASES):
                    found.append((sql, row[3]))
        return found
    finally:
        conn.close()


async def pg_plan_scans(url: str, statements: list[tuple[str, list[Any]]]
                        ) -> list[tuple[str, str]]:
    """The same on PostgreSQL: ``Seq Scan on <table>`` lines of each plan, sequential scans
    priced out (``enable_seqscan = off``) so that a tiny test table still shows the index
    path a large one takes."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET enable_seqscan = off")
        found = []
        for sql, params in statements:
            for row in await conn.fetch("EXPLAIN " + numbered(sql), *params):
                line = row[0]
                if "Seq Scan on" in line and line.split("Seq Scan on ")[1].split()[0] in TABLES:
                    found.append((sql, line))
        return found
    finally:
        await conn.close()


def traced(reads: Any) -> list[tuple[str, list[Any]]]:
    """Every query ``reads`` asks from now on, with its parameters."""
    asked: list[tuple[str, list[Any]]] = []
    ask = reads.rows

    async def rows(sql: str, params: Any = ()) -> list[dict[str, Any]]:
        asked.append((sql, list(params)))
        return await ask(sql, params)

    reads.rows = rows
    return asked


async def test_each_query_finds_its_rows_through_an_index(backend, tmp_path):
    settings = backend.settings(tmp_path, rejoiner={
        "site_id": "RJ", "domain": "shop.example", "api_key": "k",
        "api_base": "http://127.0.0.1:9/rejoiner"})
    async with running(settings) as (app, client):
        answer = await client.post("/e", content=(
            '{"site_id": "shop1", "sc": "%s", "events": ['
            '{"event_id": "pv-1", "event": "page_view", "page": {"location": "%s/p/1"}},'
            '{"event_id": "id-1", "event": "identify", "user": {"email": "%s"}}]}'
            % (SC, ORIGIN, EMAIL)), headers={"content-type": "text/plain", "origin": ORIGIN})
        assert answer.status_code == 204, answer.text
        answer = await client.post("/api/v1/sites/shop1/events", json=[
            {"event": "purchase", "event_id": "order-77", "user": {"email": EMAIL},
             "ecommerce": {"currency": "USD", "transaction_id": "77", "value": "5",
                           "items": [{"item_id": "A", "price": "5", "quantity": 1}]}}],
            headers={"Authorization": "Bearer secret-key-0123456789"})
        assert answer.status_code == 202, answer.text
        reads = app.state.store.console()
        statements = traced(reads)
        sites = ["shop1"]
        by_email = await reads.search(sites, EMAIL.upper())
        assert [i["email"] for i in by_email["identities"]] == [EMAIL]
        assert {e["name"] for e in by_email["events"]} == {"page_view", "identify", "purchase"}
        assert {d["vendor"] for d in by_email["deliveries"]} == {"rejoiner"}
        by_sc = await reads.search(sites, SC.lower())
        assert by_sc["kinds"] == ["sc"] and by_sc["identities"][0]["email"] == EMAIL
        by_order = await reads.search(sites, "77")
        assert [e["name"] for e in by_order["events"]][0] == "purchase"
        by_id = await reads.search(sites, "pv-1")
        assert any(e["event_id"] == "pv-1" for e in by_id["events"])
        nothing = await reads.search(sites, "nobody@example.com")
        assert not (nothing["identities"] or nothing["events"] or nothing["deliveries"])
        seen = await reads.last_from_origin("shop1", ORIGIN)
        assert seen and seen["location"] == ORIGIN + "/p/1"
        assert await reads.last_from_origin("shop1", ORIGIN + ".evil.example") is None
        top = await reads.latest_seq()
        everything = await reads.tail_events(0, top, reads.live_filter(sites), 100)
        assert [e["seq"] for e in everything] == sorted(e["seq"] for e in everything)
        assert await reads.seqs_between(0, top, 100) == [e["seq"] for e in everything]
        assert await reads.seqs_in([top, top + 1]) == [top]
        only = await reads.tail_events(0, top, reads.live_filter(sites, email=EMAIL, name="purchase"), 100)
        assert [e["name"] for e in only] == ["purchase"]
        assert await reads.events_at([e["seq"] for e in everything],
                                     reads.live_filter(sites, name="purchase")) == only
        assert await reads.recent_events(reads.live_filter(sites, source="backend"), 10) == only
        delivery = by_email["deliveries"][0]
        assert (await reads.delivery(delivery["id"]))["vendor"] == "rejoiner"
        await reads.attempts_of([delivery["id"]])
        assert (await reads.event(everything[0]["seq"]))["session"]["sc"] == SC
    assert len(statements) > 15
    if backend.name == "sqlite":
        path = settings.server.sqlite_path
        assert plan_scans(path, statements) == []
        # The check itself sees a scan when there is one.
        assert plan_scans(path, [("SELECT * FROM events e WHERE e.name = ?", ["x"])])
    else:
        assert await pg_plan_scans(backend.database, statements) == []
        assert await pg_plan_scans(backend.database, [
            ("SELECT * FROM events e WHERE e.name = ?", ["x"])])


FILTER_TEXT = st.one_of(st.none(), st.text(max_size=300), st.sampled_from(
    ["shop1", "browser", "backend", "verified browser", "ann@example.com", SC]))


@hsettings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({name: FILTER_TEXT for name in live.FILTERS}))
def test_live_filters_are_accepted_within_bounds_or_refused_naming_the_field(params):
    from server.store.pg_console import PgConsole
    from server.store.sqlite_console import SQLiteConsole

    console = Console(settings_for("/nonexistent"), store=None)
    try:
        filters = live.read_filters(console, params)
    except live.BadFilter as exc:
        assert exc.field in live.FILTERS and str(exc).startswith(exc.field + ":")
        return
    for name, value in filters.items():
        assert value and len(value) <= live.MAX_FILTER_CHARS[name]
    assert filters.get("site") in (None, "shop1")
    assert filters.get("source") in (None, *q.SOURCES)
    for reads in (SQLiteConsole(db=None), PgConsole(pool=None)):
        where, values = reads.live_filter(["shop1"], **filters)
        assert where.count("?") == len(values)  # every value bound, none spliced into the SQL


async def test_a_search_shows_the_latest_attempts_of_a_delivery(tmp_path, fake):
    """Four failures then a success: the latest ``per_delivery`` are kept, in order."""
    from fakes.harness import backend, make_settings, purchase, rows, serve, until
    import httpx

    fake.fail("sendlane", 503, times=4)
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    async with serve(settings) as app:
        async with httpx.AsyncClient(base_url=app.state.base_url) as client:
            await backend(client, purchase("9009", email=EMAIL))
        db_path = tmp_path / "onetag.db"
        await until(lambda: rows(db_path, "d.state = 'delivered'"), what="the delivery")
        reads = app.state.store.console()
        result = await reads.search(["shop1"], EMAIL)
        [delivery] = [d for d in result["deliveries"] if d["state"] == "delivered"]
        latest = (await reads.attempts_of([delivery["id"]], per_delivery=3))[delivery["id"]]
    assert delivery["attempts"] == 5
    assert [a["status"] for a in delivery["attempt_list"]] == [503] * 4 + [200]
    assert [(a["attempt"], a["status"]) for a in latest] == [(3, 503), (4, 503), (5, 200)]


async def test_a_backfilled_customer_is_found_by_email(backend, tmp_path):
    """History from ``onetag backfill --send`` is kept apart from sessions and identities
    (docs/backfill.md): a search by its customer's email still finds it, by
    the email inside each event (a status change: its order's buyer's), beside the live
    events of an identity with that email, which history leaves as it was. PostgreSQL
    reads it through its partial index (pg_migrations/029), not the whole window."""
    from console_support import console_settings
    from test_console_ops import HISTORY_2023, backfill_history

    settings = console_settings(tmp_path, database=backend.database)
    async with running(settings) as (app, client):
        sent = await client.post(
            "/api/v1/sites/shop1/events",
            json=[{"event": "identify", "user": {"email": "dora@example.com",
                                                  "first_name": "Dora"}}],
            headers={"Authorization": f"Bearer {settings.sites['shop1'].api_key}"})
        assert sent.status_code == 202, sent.text
        dora = [{"event": "purchase", "time": "2023-05-01T10:00:00Z", "transaction_id": "2002",
                 "user": {"email": "dora@example.com", "first_name": "Old"},
                 "ecommerce": {"currency": "USD", "value": "5.00", "items": []}}]
        await backfill_history(app.state.store, settings.sites["shop1"], tmp_path,
                               HISTORY_2023 + dora)
        reads = app.state.store.console()
        statements = traced(reads)
        carl = await reads.search(["shop1"], " Carl@Example.com")
        found = await reads.search(["shop1"], "dora@example.com")
        elsewhere = await reads.search(["shop2"], "carl@example.com")
    assert carl["identities"] == []  # history made no profile
    assert sorted(e["name"] for e in carl["events"]) == [
        "identify", "purchase", "purchase", "purchase", "refund"]
    assert all(e["email"] == "carl@example.com" for e in carl["events"])
    assert {d["vendor"] for d in carl["deliveries"]} == {"sendlane"}  # what history planned
    [identity] = found["identities"]
    assert identity["first_name"] == "Dora"  # the live identity, untouched by history
    assert sorted(e["name"] for e in found["events"]) == ["identify", "purchase"]
    assert elsewhere["events"] == []
    history_sql = [(sql, params) for sql, params in statements if "e.identity_id IS NULL" in sql]
    assert history_sql
    if backend.name == "sqlite":
        assert plan_scans(settings.server.sqlite_path, history_sql) == []
    else:
        import asyncpg

        conn = await asyncpg.connect(backend.database)
        try:
            await conn.execute("SET enable_seqscan = off")
            sql, params = history_sql[0]
            plan = "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + numbered(sql),
                                                                 *params))
        finally:
            await conn.close()
        assert "events_history_email" in plan, plan


async def test_the_live_email_filter_finds_what_the_email_search_finds(backend, tmp_path):
    """The Live page's email filter matched only events whose identity has the email: a
    customer's backfilled history (no identity, the email inside the event) and a
    session's events from before its visitor was identified were found by Search and not
    by Live. Both now find the same events, on the page, in the stream's query and in a
    second look (``events_at``), each query still through an index or a seq range."""
    import re

    from console_support import console_settings, login
    from test_console_ops import HISTORY_2023, backfill_history

    settings = console_settings(tmp_path, database=backend.database)
    async with running(settings) as (app, client):
        answer = await client.post("/e", content=(
            '{"site_id": "shop1", "sc": "%s", "events": ['
            '{"event_id": "pv-1", "event": "page_view", "page": {"location": "%s/p/1"}},'
            '{"event_id": "id-1", "event": "identify", "user": {"email": "%s"}},'
            '{"event_id": "pv-2", "event": "page_view", "page": {"location": "%s/p/2"}}]}'
            % (SC, ORIGIN, EMAIL, ORIGIN)),
            headers={"content-type": "text/plain", "origin": ORIGIN})
        assert answer.status_code == 204, answer.text
        sent = await client.post(
            "/api/v1/sites/shop1/events",
            json=[{"event": "identify", "user": {"email": "dora@example.com"}}],
            headers={"Authorization": f"Bearer {settings.sites['shop1'].api_key}"})
        assert sent.status_code == 202, sent.text
        dora = [{"event": "purchase", "time": "2023-05-01T10:00:00Z", "transaction_id": "2002",
                 "user": {"email": "dora@example.com"},
                 "ecommerce": {"currency": "USD", "value": "5.00", "items": []}}]
        await backfill_history(app.state.store, settings.sites["shop1"], tmp_path,
                               HISTORY_2023 + dora)
        reads = app.state.store.console()
        sites = ["shop1"]
        top = await reads.latest_seq()
        assert (await login(client)).status_code == 303
        statements = traced(reads)
        for email, count in ((EMAIL, 3), ("carl@example.com", 5), ("dora@example.com", 2)):
            searched = sorted(e["seq"] for e in (await reads.search(["shop1"], email))["events"])
            assert len(searched) == count, (email, searched)
            where = reads.live_filter(sites, email=email.upper())
            tailed = [e["seq"] for e in await reads.tail_events(0, top, where, 100)]
            recent = [e["seq"] for e in await reads.recent_events(where, 50)]
            looked = [e["seq"] for e in await reads.events_at(range(1, top + 1), where)]
            assert tailed == looked == searched and recent == searched[::-1], email
            page = await client.get("/admin/live", params={"email": email})
            assert page.status_code == 200, page.text
            shown = [int(seq) for seq in re.findall(r'data-seq="(\d+)"', page.text)]
            assert shown == searched[::-1], (email, shown)
        assert [e["seq"] for e in await reads.tail_events(
            0, top, reads.live_filter(sites, email="nobody@example.com"), 100)] == []
        assert {e["name"] for e in await reads.tail_events(
            0, top, reads.live_filter(sites, email="carl@example.com", name="refund"), 100)} == {
            "refund"}
    live_sql = [(sql, params) for sql, params in statements if "e.seq > ? AND e.seq <=" in sql]
    assert live_sql
    if backend.name == "sqlite":
        assert plan_scans(settings.server.sqlite_path, live_sql) == []
    else:
        assert await pg_plan_scans(backend.database, live_sql) == []


async def test_an_event_id_matching_more_than_a_page_says_how_many_and_pages(backend, tmp_path):
    """A browser event id is its session's (``rules.event_scope``): ``pv-1`` of 25 sessions
    is 25 events. The search listed 20 with no sign of the other 5; now it says "showing 20
    of 25" and the next page (``before``, a seq) lists the rest, on both backends, through
    the index."""
    import uuid

    from console_support import console_settings, login

    settings = console_settings(tmp_path, database=backend.database)
    async with running(settings) as (app, client):
        for _ in range(q.MATCHES_LIMIT + 5):
            client.cookies.clear()
            sc = str(uuid.uuid4()).upper()
            answer = await client.post("/e", content=(
                '{"site_id": "shop1", "sc": "%s", "events": [{"event_id": "pv-1", '
                '"event": "page_view", "page": {"location": "%s/p/1"}}]}' % (sc, ORIGIN)),
                headers={"content-type": "text/plain", "origin": ORIGIN})
            assert answer.status_code == 204, answer.text
        reads = app.state.store.console()
        statements = traced(reads)
        first = await reads.search(["shop1"], "pv-1")
        assert first["event_ids"]["shown"] == q.MATCHES_LIMIT
        assert first["event_ids"]["total"] == q.MATCHES_LIMIT + 5
        before = first["event_ids"]["next_before"]
        assert before == min(e["seq"] for e in first["events"])
        rest = await reads.search(["shop1"], "pv-1", before=before)
        assert rest["event_ids"]["shown"] == 5 and rest["event_ids"]["next_before"] is None
        assert {e["seq"] for e in first["events"]}.isdisjoint(e["seq"] for e in rest["events"])
        few = await reads.search(["shop1"], "pv-2")
        assert few["event_ids"] == {"shown": 0, "total": 0, "next_before": None}

        client.cookies.clear()
        await login(client)
        page = await client.get("/admin/search", params={"q": "pv-1"})
        assert page.status_code == 200
        assert f"showing {q.MATCHES_LIMIT} of {q.MATCHES_LIMIT + 5}" in page.text
        assert f"before={before}" in page.text
        older = await client.get("/admin/search", params={"q": "pv-1", "before": str(before)})
        assert older.status_code == 200 and "showing 5 of 25" in older.text
        assert "before=" not in older.text.split("showing 5 of 25")[1].split("</p>")[0]
        bad = await client.get("/admin/search", params={"q": "pv-1", "before": "x"})
        assert bad.status_code == 400 and "before" in bad.text
    if backend.name == "sqlite":
        assert plan_scans(settings.server.sqlite_path, statements) == []
    else:
        assert await pg_plan_scans(backend.database, statements) == []


async def test_backfilled_history_older_than_the_scan_window_is_found(backend, tmp_path,
                                                                      monkeypatch):
    """A customer's backfilled history is found by the email inside it through an index on
    both backends (SQLite 019 mirrors PostgreSQL 029), so however many events came after
    it: SQLite read only the latest ``SCAN_WINDOW`` events and missed older history."""
    from console_support import console_settings
    from test_console_ops import HISTORY_2023, backfill_history

    monkeypatch.setattr(q, "SCAN_WINDOW", 3)  # stands for 200,000 newer events
    settings = console_settings(tmp_path, database=backend.database)
    async with running(settings) as (app, client):
        await backfill_history(app.state.store, settings.sites["shop1"], tmp_path,
                               HISTORY_2023)
        for n in range(5):  # newer than the history, beyond the window
            client.cookies.clear()
            answer = await client.post("/e", content=(
                '{"site_id": "shop1", "events": [{"event_id": "pv-%d", "event": "page_view", '
                '"page": {"location": "%s/p/1"}}]}' % (n, ORIGIN)),
                headers={"content-type": "text/plain", "origin": ORIGIN})
            assert answer.status_code == 204, answer.text
        reads = app.state.store.console()
        statements = traced(reads)
        carl = await reads.search(["shop1"], "carl@example.com")
    assert sorted(e["name"] for e in carl["events"]) == [
        "identify", "purchase", "purchase", "purchase", "refund"]
    history_sql = [(sql, params) for sql, params in statements if "e.identity_id IS NULL" in sql]
    assert history_sql
    if backend.name == "sqlite":
        conn = sqlite3.connect(settings.server.sqlite_path)
        try:
            sql, params = history_sql[0]
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        finally:
            conn.close()
        assert "events_history_email" in plan, plan


def test_amounts_show_as_money_by_their_currencys_digits() -> None:
    """"2999 minor USD" was the store's integer: the console says $29.99, 29.99 EUR, and
    ¥-style currencies without a fraction (ISO 4217 exponent 0, 3 ...)."""
    from server.money import display

    assert display(2999, "USD") == "$29.99"
    assert display(2999, "EUR") == "29.99 EUR"
    assert display(2999, "jpy") == "2,999 JPY"
    assert display(1234567, "KWD") == "1,234.567 KWD"
    assert display(-500, "USD") == "-$5.00"
    assert display(123456789, "USD") == "$1,234,567.89"
    assert q.summary({"ecommerce": {"transaction_id": "1001", "value_minor": 2999,
                                    "currency": "USD"}}) .startswith("order 1001 · $29.99")
    assert "29.99 EUR" in q.summary({"ecommerce": {"value_minor": 2999, "currency": "EUR"}})


def test_the_cart_shows_its_value_and_prices_as_money(tmp_path) -> None:
    settings = settings_for(tmp_path)
    console = Console(settings, store=None)
    html = console.env.from_string(
        '{% from "admin/_macros.html" import cart_table %}{{ cart_table(cart) }}').render(
        cart={"item_count": 2, "value_minor": 5998, "currency": "EUR", "guid": None,
              "items": [{"item_id": "SKU-1", "quantity": 2, "price_minor": 2999}]})
    assert "2 item(s), 59.98 EUR" in html and "<td>29.99 EUR</td>" in html
    assert "minor" not in html
