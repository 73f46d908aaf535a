"""The console's data side on a real database, SQLite and PostgreSQL (``backend``): the
operator filter (one WHERE for the list, the dry run and the replay), replays recorded, the
vendor overview (counts, latency percentiles, success rate, errors), dead letters paginated,
and order reconciliation."""

from __future__ import annotations

import getpass
import json
import math
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from console_support import console_settings
from server import cli, config
from server.store import deadletters
from server.store.deadletters import ReplayFilter, escape_like, fingerprint, where
from server.store.console_ops import PURCHASE_KEYS, bucket_starts, purchase_key
from server.store.sqlite_writer import WriteOps, configure
from support import running

HOUR = 3_600_000
NOW = 1_800_000_000_000  # a fixed "now" (2027-01-15), whole hours from the epoch
NOW -= NOW % HOUR
NOW += 30 * 60_000  # half past


EVENT_SQL = ("INSERT INTO events (seq, site_id, event_id, name, source, received_ms, raw, "
             "data) VALUES (?, ?, ?, ?, ?, ?, '{}', ?)")
DELIVERY_SQL = (
    "INSERT INTO deliveries (id, site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, attempts, next_attempt_ms, last_error, created_ms, updated_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, 'sc:V', ?, '{}', 1, 0, ?, ?, ?)")
ATTEMPT_SQL = ("INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request, "
               "status, answer, error) VALUES (?, 1, ?, ?, '{}', ?, ?, ?)")


def event_row(seq: int, *, site: str = "shop1", name: str = "purchase", source: str = "backend",
              received_ms: int = NOW, order: str | None = None) -> tuple[str, tuple]:
    data = {"name": name, "source": source, "ecommerce": {"transaction_id": order}}
    return EVENT_SQL, (seq, site, f"ev-{seq}", name, source, received_ms, json.dumps(data))


def delivery_row(id: int, *, site: str = "shop1", vendor: str = "sendlane", state: str = "dead",
                 error: str | None = None, created_ms: int = NOW, updated_ms: int | None = None,
                 key: str | None = None, claim: int = 0, event_seq: int = 1
                 ) -> tuple[str, tuple]:
    return DELIVERY_SQL, (id, site, vendor, key or f"k{id}", claim, event_seq, state, error,
                          created_ms, created_ms if updated_ms is None else updated_ms)


def attempt_row(delivery_id: int, started_ms: int, duration_ms: int, status: int | None,
                error: str | None = None, body: str = "") -> tuple[str, tuple]:
    answer = None if status is None else json.dumps({"headers": {}, "body": body,
                                                     "truncated": False})
    return ATTEMPT_SQL, (delivery_id, started_ms, duration_ms, status, answer, error)


def add_event(conn, seq: int, **kwargs) -> None:
    conn.execute(*event_row(seq, **kwargs))


def add_delivery(conn, id: int, **kwargs) -> None:
    conn.execute(*delivery_row(id, **kwargs))


async def seed(backend, *rows: tuple[str, tuple]) -> None:
    """Rows written beside the store, on a connection of their own (either backend)."""
    for sql, params in rows:
        await backend.rows(sql, *params)


def writer_db(path: Path) -> sqlite3.Connection:
    """The writer's own connection set-up (WAL, migrations) on a real file."""
    return configure(sqlite3.connect(path, isolation_level=None))


@pytest.fixture
async def store(backend, tmp_path):
    settings = console_settings(tmp_path, database=backend.database)
    opened = await backend.open(settings)
    opened.settings = settings
    opened.backend = backend
    yield opened
    await opened.close()


async def states_of(store) -> dict[int, str]:
    return dict(await store.backend.rows("SELECT id, state FROM deliveries"))


# The filter ------------------------------------------------------------------------------

TEXT = st.text(alphabet="ab%_\\ZQ'\"", max_size=6)


@given(needle=TEXT.filter(bool), haystack=TEXT)
@hsettings(max_examples=300, deadline=None)
def test_error_text_matches_literally_whatever_it_contains(needle, haystack) -> None:
    conn = sqlite3.connect(":memory:")
    [(matched,)] = conn.execute("SELECT ? LIKE ? ESCAPE '\\'", (haystack, escape_like(needle)))
    # SQLite's LIKE folds ASCII letters only; so does this oracle.
    assert bool(matched) == (needle.lower() in haystack.lower())


def test_filters_that_cannot_be_asked_are_refused_naming_the_field() -> None:
    assert deadletters.check(ReplayFilter(states=("held",)), replay=True).startswith("states:")
    assert deadletters.check(ReplayFilter(states=("failing",)), replay=True).startswith("states:")
    assert deadletters.check(ReplayFilter(states=("held",))) is None  # listed, not replayed
    assert deadletters.check(ReplayFilter(states=("delivered",))).startswith("states:")
    assert deadletters.check(ReplayFilter(states=())).startswith("states:")
    assert deadletters.check(ReplayFilter(since_ms=5, until_ms=5)).startswith("until:")
    assert deadletters.check(ReplayFilter(error="x" * 201)).startswith("error:")
    assert deadletters.check(ReplayFilter(time_field="sent")).startswith("time_field:")
    assert deadletters.check(ReplayFilter(ids=tuple(range(1001)))).startswith("ids:")


STATES = ["dead", "pending", "held", "delivered", "expired", "ignored", "browser"]
ROW = st.fixed_dictionaries({
    "site": st.sampled_from(["shop1", "shop2"]),
    "vendor": st.sampled_from(["sendlane", "remarkety", "rejoiner"]),
    "state": st.sampled_from(STATES),
    "error": st.one_of(st.none(), st.sampled_from(["HTTP 500: boom", "HTTP 400: 100% bad_x",
                                                   "timeout: read", "key rejected (401)"])),
    "created": st.integers(0, 3),  # few distinct times: the filter's bounds land on rows
    "updated": st.integers(0, 3),
})
FILTER = st.builds(
    ReplayFilter,
    states=st.sampled_from([("dead",), ("dead", "expired"), ("expired",)]),
    vendor=st.one_of(st.none(), st.sampled_from(["sendlane", "remarkety", "esputnik"])),
    site_id=st.one_of(st.none(), st.sampled_from(["shop1", "shop2"])),
    since_ms=st.one_of(st.none(), st.integers(0, 3).map(lambda h: NOW + h * HOUR)),
    until_ms=st.one_of(st.none(), st.integers(1, 4).map(lambda h: NOW + h * HOUR)),
    error=st.one_of(st.none(), st.sampled_from(["500", "100%", "_x", "%", "TIMEOUT", "nope"])),
    ids=st.one_of(st.none(), st.lists(st.integers(1, 40), max_size=8).map(tuple)),
    time_field=st.sampled_from(["created", "updated"]),
).filter(lambda f: deadletters.check(f, replay=True) is None)


def oracle(rows: list[dict], f: ReplayFilter) -> set[int]:
    """What a filter means, written out in Python: the dead rows it names."""
    picked = set()
    for row in rows:
        when = NOW + (row["created"] if f.time_field == "created" else row["updated"]) * HOUR
        if (row["state"] == "dead" and "dead" in f.states
                and (f.vendor is None or row["vendor"] == f.vendor)
                and (f.site_id is None or row["site"] == f.site_id)
                and (f.since_ms is None or when >= f.since_ms)
                and (f.until_ms is None or when < f.until_ms)
                and (not f.error or f.error.lower() in (row["error"] or "").lower())
                and (f.ids is None or row["id"] in f.ids)):
            picked.add(row["id"])
    return picked


BOUNDARY_ROWS = [{"site": "shop1", "vendor": "sendlane", "state": "dead", "error": None,
                  "created": h, "updated": 3 - h} for h in range(4)]


@given(rows=st.lists(ROW, max_size=40), selection=FILTER)
@example(rows=BOUNDARY_ROWS, selection=ReplayFilter(since_ms=NOW + HOUR, until_ms=NOW + 3 * HOUR))
@example(rows=BOUNDARY_ROWS, selection=ReplayFilter(since_ms=NOW + HOUR, until_ms=NOW + 2 * HOUR,
                                                    time_field="updated"))
@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_dry_run_names_exactly_the_rows_the_replay_then_makes_due(rows, selection) -> None:
    with tempfile.TemporaryDirectory() as folder:
        conn = writer_db(Path(folder) / "onetag.db")
        try:
            add_event(conn, 1, name="page_view", source="browser")
            for i, row in enumerate(rows, start=1):
                row["id"] = i
                add_delivery(conn, i, site=row["site"], vendor=row["vendor"], state=row["state"],
                             error=row["error"], created_ms=NOW + row["created"] * HOUR,
                             updated_ms=NOW + row["updated"] * HOUR)
            condition, params = where(selection)
            listed = {r[0] for r in conn.execute(
                f"SELECT id FROM deliveries WHERE {condition}", params) if r[0] in {
                x["id"] for x in rows if x["state"] == "dead"}}
            ops = WriteOps(conn, console_settings(folder).sites, 7 * 86_400_000, 0)
            conn.execute("BEGIN")
            dry = ops.replay_rows(NOW + 20 * HOUR, selection, True)
            preview = ops.replay_preview(NOW + 20 * HOUR, selection)  # what the console shows
            before = conn.execute("SELECT id, state, attempts FROM deliveries ORDER BY id").fetchall()
            made = ops.replay_rows(NOW + 20 * HOUR, selection, False)
            after = {r[0]: r[1] for r in conn.execute("SELECT id, state FROM deliveries")}
            conn.execute("COMMIT")
        finally:
            conn.close()
    expected = oracle(rows, selection)
    assert {r["id"] for r in dry} == {r["id"] for r in made} == expected
    assert fingerprint(dry) == fingerprint(made)
    assert preview == (len(made), fingerprint(made))
    assert listed == expected  # the console's list: the same WHERE
    # The dry run changed nothing; the replay changed exactly its rows.
    assert [(r[0], r[1]) for r in before] == [(x["id"], x["state"]) for x in rows]
    assert {i for i, state in after.items() if state == "pending"} == expected | {
        x["id"] for x in rows if x["state"] == "pending"}


# Replays recorded ------------------------------------------------------------------------

async def test_a_replay_is_recorded_with_who_what_and_how_many(store) -> None:
    await seed(store.backend, event_row(1), delivery_row(1, error="HTTP 500: boom"),
               delivery_row(2, error="HTTP 400: bad field"),
               delivery_row(3, vendor="remarkety", error="HTTP 500: boom"))
    selection = ReplayFilter(("dead",), vendor="sendlane", error="500")
    dry = await store.replay_rows(NOW, vendor="sendlane", error="500", dry_run=True)
    assert [r["id"] for r in dry] == [1]
    done = await store.replay_recorded(NOW + 1, selection, "console:127.0.0.1",
                                       expect=fingerprint(dry), shown=len(dry))
    assert done["changed"] is False and [r["id"] for r in done["rows"]] == [1]
    [replay] = await store.console().recent_replays()
    assert (replay["who"], replay["dry_run_count"], replay["replayed"], replay["ids"]) == (
        "console:127.0.0.1", 1, 1, [1])
    assert replay["filter"] == {"states": ["dead"], "vendor": "sendlane", "error": "500"}
    assert replay["at_ms"] == NOW + 1


async def test_a_set_that_changed_since_the_dry_run_is_not_replayed(store) -> None:
    await seed(store.backend, event_row(1), delivery_row(1))
    selection = ReplayFilter(("dead",))
    dry = await store.replay_rows(NOW, dry_run=True)
    await seed(store.backend, delivery_row(2))  # another delivery dies meanwhile
    answer = await store.replay_recorded(NOW, selection, "console:10.0.0.1",
                                         expect=fingerprint(dry), shown=len(dry))
    assert answer["changed"] is True and [r["id"] for r in answer["rows"]] == [1, 2]
    assert set((await states_of(store)).values()) == {"dead"}
    assert await store.console().recent_replays() == []
    # With the new set's fingerprint it goes ahead.
    again = await store.replay_recorded(NOW, selection, "console:10.0.0.1",
                                        expect=answer["fingerprint"], shown=2)
    assert again["changed"] is False and len(again["rows"]) == 2


async def test_held_and_failing_rows_are_listed_but_never_replayed(store) -> None:
    await seed(store.backend, event_row(1), delivery_row(1, state="held"),
               delivery_row(2, state="pending", error="HTTP 503"),
               delivery_row(3, state="pending"))  # due, never failed: not a dead letter
    listed = await store.console().dead_letters(ReplayFilter(("held", "failing")))
    assert [(r["id"], r["state"]) for r in listed["rows"]] == [(2, "failing"), (1, "held")]
    with pytest.raises(ValueError, match="states: held"):
        await store.replay_recorded(NOW, ReplayFilter(("held",)), "cli:x")
    with pytest.raises(ValueError, match="states: failing"):
        await store.replay_rows(NOW, states=("failing",), dry_run=True)


def test_onetag_replay_filters_by_site_until_and_error_and_records_it(tmp_path, capsys,
                                                                     monkeypatch) -> None:
    settings = console_settings(tmp_path)
    store_db = writer_db(Path(settings.server.sqlite_path))
    add_event(store_db, 1)
    add_delivery(store_db, 1, error="HTTP 500: boom", created_ms=NOW - 5 * HOUR)
    add_delivery(store_db, 2, error="HTTP 500: boom", created_ms=NOW - HOUR)
    add_delivery(store_db, 3, error="HTTP 400: nope", created_ms=NOW - 5 * HOUR)
    add_delivery(store_db, 4, site="shop2", error="HTTP 500: boom", created_ms=NOW - 5 * HOUR)
    store_db.close()
    (tmp_path / "onetag.toml").write_text(
        f'[server]\ndatabase = "sqlite:///{tmp_path}/onetag.db"\n'
        '[[sites]]\nid = "shop1"\n[[sites]]\nid = "shop2"\n')
    until = cli.datetime.fromtimestamp((NOW - 2 * HOUR) / 1000).astimezone().isoformat()
    args = ["replay", "--config", str(tmp_path / "onetag.toml"), "--site", "shop1",
            "--until", until, "--error", "500", "--json"]
    assert cli.main([*args, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in dry["rows"]] == [1] and dry["dry_run"] is True
    assert cli.main(args) == 0
    done = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in done["rows"]] == [1]
    with sqlite3.connect(tmp_path / "onetag.db") as conn:
        [(who, replayed, ids, shown)] = conn.execute(
            "SELECT who, replayed, ids, dry_run_count FROM replays").fetchall()
        states = dict(conn.execute("SELECT id, state FROM deliveries"))
    assert (who, replayed, json.loads(ids)) == (f"cli:{getpass.getuser()}", 1, [1])
    assert states == {1: "pending", 2: "dead", 3: "dead", 4: "dead"}
    assert cli.main([*args[:3], "--until", "2h", "--since", "1h"]) == 2  # until before since
    assert "--until must be later" in capsys.readouterr().err
    monkeypatch.setitem(deadletters.MAX_REPLAY_ROWS, "dead", 2)  # 3 dead rows left
    assert cli.main(args[:3]) == 2
    assert "more than 2 dead deliveries match" in capsys.readouterr().err
    with sqlite3.connect(tmp_path / "onetag.db") as conn:
        assert conn.execute("SELECT count(*) FROM deliveries WHERE state = 'dead'").fetchone() == (3,)


# Dead letters ----------------------------------------------------------------------------

async def test_dead_letters_are_paginated_with_an_exact_count(store) -> None:
    await seed(store.backend, event_row(1), *(
        delivery_row(i, vendor="sendlane" if i % 2 else "remarkety",
                     error=f"HTTP {500 if i % 3 else 400}: x", created_ms=NOW + i)
        for i in range(1, 24)))
    reads = store.console()
    selection = ReplayFilter(("dead",), vendor="sendlane", error="500")
    expected = [i for i in range(23, 0, -1) if i % 2 and i % 3]
    seen, before = [], None
    while True:
        page = await reads.dead_letters(selection, limit=3, before_id=before)
        assert page["total"] == len(expected)
        seen += [r["id"] for r in page["rows"]]
        before = page["next_before_id"]
        if before is None:
            break
    assert seen == expected
    by_time = await reads.dead_letters(ReplayFilter(("dead",), since_ms=NOW + 20,
                                                    until_ms=NOW + 23))
    assert [r["id"] for r in by_time["rows"]] == [22, 21, 20]
    with pytest.raises(ValueError, match="limit"):
        await reads.dead_letters(selection, limit=201)


# Vendor overview -------------------------------------------------------------------------

def percentile(values: list[int], p: float) -> int | None:
    """Nearest rank, written out: the ceil(p * n)-th smallest."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered))) - 1]


@given(st.lists(st.tuples(st.sampled_from([0, 1, 22, 23]), st.integers(0, 5000),
                         st.sampled_from([200, 204, 400, 500, None])), max_size=120))
@example([(23, d, 200) for d in range(20, 0, -1)] + [(0, d, None) for d in range(11)])
@hsettings(max_examples=40, deadline=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_each_buckets_percentiles_and_success_are_exact(backend, tmp_path, attempts) -> None:
    """The database's ranking (a window function) against nearest rank done by hand; one
    database for every example, its attempts replaced each time."""
    import asyncio

    async def overview():
        settings = console_settings(tmp_path, database=backend.database)
        store = await backend.open(settings)
        try:
            await backend.rows("DELETE FROM attempts")
            if not await backend.rows("SELECT 1 FROM deliveries"):
                await seed(backend, event_row(1), delivery_row(1))
            first = bucket_starts(NOW, "24h")[1]
            await seed(backend, *(attempt_row(1, first + bucket * HOUR + duration % HOUR,
                                              duration, status)
                                  for bucket, duration, status in attempts))
            return await store.console().vendor_overview(NOW, "24h")
        finally:
            await store.close()

    found = asyncio.run(overview())
    buckets = found[0]["buckets"] if found else []
    for index in range(24):
        mine = [(d, s) for b, d, s in attempts if b == index]
        durations = [d for d, _ in mine]
        got = buckets[index]
        assert got["attempts"] == len(mine)
        assert got["p50_ms"] == percentile(durations, 0.5)
        assert got["p95_ms"] == percentile(durations, 0.95)
        assert got["succeeded"] == sum(1 for _, st_ in mine if st_ in (200, 204))


async def test_vendor_counts_read_open_rows_whole_and_settled_ones_in_a_window(store,
                                                                              monkeypatch) -> None:
    """Rows still in the outbox are counted however old; delivered, ignored, browser and
    expired ones only among the latest SETTLED_WINDOW deliveries (ids), and the page is told
    when that window cut."""
    from server.store import console_ops

    await seed(store.backend, event_row(1),
               delivery_row(1, state="delivered"), delivery_row(2, state="pending",
                                                               created_ms=NOW - 60_000),
               delivery_row(3, state="dead"), delivery_row(4, state="delivered"),
               delivery_row(5, state="ignored"), delivery_row(6, state="browser"),
               delivery_row(7, vendor="remarkety", state="held"))
    reads = store.console()
    [remarkety, sendlane] = await reads.vendor_overview(NOW, "24h")
    assert {k: sendlane[k] for k in console_ops.STATE_COUNTS} == {
        "delivered": 2, "pending": 1, "failing": 0, "held": 0, "dead": 1, "ignored": 1,
        "browser": 1, "expired": 0}
    assert sendlane["settled_window"] is None and sendlane["oldest_pending_age_s"] == 60
    monkeypatch.setattr(console_ops, "SETTLED_WINDOW", 3)  # ids 5, 6, 7 of 7
    [remarkety, sendlane] = await reads.vendor_overview(NOW, "24h")
    assert {k: sendlane[k] for k in console_ops.STATE_COUNTS} == {
        "delivered": 0, "pending": 1, "failing": 0, "held": 0, "dead": 1, "ignored": 1,
        "browser": 1, "expired": 0}
    assert sendlane["settled_window"] == 3 and remarkety["held"] == 1
    one_site = {item["vendor"]: item
                for item in await reads.vendor_overview(NOW, "24h", site_id="shop1")}
    assert (one_site["sendlane"]["dead"], one_site["sendlane"]["ignored"]) == (1, 1)


async def test_vendor_overview_counts_latency_success_and_errors(store) -> None:
    hour = NOW - NOW % HOUR
    await seed(
        store.backend, event_row(1), delivery_row(1, state="delivered"),
        delivery_row(2, state="pending", created_ms=NOW - 90_000),
        delivery_row(3, state="pending", error="HTTP 503"),
        delivery_row(4, state="dead", error="HTTP 400: bad"),
        delivery_row(5, vendor="remarkety", state="held"),
        # this hour: 10 attempts, 10..100 ms, 8 ok
        *(attempt_row(1, hour + ms, ms, 200 if ms <= 80 else 503, body="busy")
          for ms in range(10, 110, 10)),
        attempt_row(4, hour - 2 * HOUR + 5, 1000, 400, body='{"error":"bad field"}'),
        attempt_row(4, hour - 2 * HOUR + 9, 1000, 400, body='{"error":"bad field"}'),
        attempt_row(3, hour - 3 * HOUR, 5000, None, error="timeout: ReadTimeout"),
        attempt_row(3, hour - 30 * HOUR, 1, 500))  # outside the 24 h range
    reads = store.console()
    [remarkety, sendlane] = await reads.vendor_overview(NOW, "24h")
    assert (remarkety["vendor"], remarkety["held"], remarkety["attempts"]) == ("remarkety", 1, 0)
    assert (sendlane["delivered"], sendlane["pending"], sendlane["failing"], sendlane["dead"]) \
        == (1, 1, 1, 1)
    assert sendlane["oldest_pending_age_s"] == 90
    assert sendlane["attempts"] == 13 and sendlane["success_rate"] == pytest.approx(8 / 13)
    buckets = sendlane["buckets"]
    assert len(buckets) == 24 and buckets[-1]["start_ms"] == NOW - NOW % HOUR
    assert (buckets[-1]["p50_ms"], buckets[-1]["p95_ms"], buckets[-1]["success_rate"]) == (
        50, 100, 0.8)
    assert buckets[-3]["p50_ms"] == 1000 and buckets[-3]["success_rate"] == 0
    assert buckets[-4]["attempts"] == 1 and buckets[0]["p50_ms"] is None
    errors = {(e["status"], e["message"]): e for e in sendlane["errors"]}
    assert set(errors) == {(503, "busy"), (400, '{"error":"bad field"}'),
                           (None, "timeout: ReadTimeout")}
    assert errors[(400, '{"error":"bad field"}')]["count"] == 2
    assert errors[(400, '{"error":"bad field"}')]["last_ms"] == hour - 2 * HOUR + 9
    assert sendlane["errors"][0]["status"] == 503  # latest first
    monthly = await reads.vendor_overview(NOW, "30d")
    assert len(monthly[1]["buckets"]) == 30 and monthly[1]["attempts"] == 14
    with pytest.raises(ValueError, match="range"):
        await reads.vendor_overview(NOW, "1y")


async def test_latency_series_is_the_same_from_labelled_and_unlabelled_attempts(store) -> None:
    """The series reads the site and vendor an attempt carries (migration 013, PostgreSQL's
    026) and joins only the attempts written before they did to their deliveries: the same
    figures before, during and after ``label_attempts`` labels them, and attempts a finish
    writes carry them already. An attempt without a delivery counts nowhere, as the join
    made it, and is never labelled (the pass goes past it)."""
    from server.forwarder import LATEST
    from server.store.base import Attempt, Outcome

    hour = NOW - NOW % HOUR
    await seed(
        store.backend, event_row(1),
        delivery_row(1, state="delivered"), delivery_row(2, vendor="remarkety", state="dead"),
        delivery_row(3, site="shop2", state="delivered"), delivery_row(4, state="pending"),
        *(attempt_row(1, hour + ms, ms, 200 if ms <= 80 else 503) for ms in range(10, 110, 10)),
        *(attempt_row(2, hour - 5 * HOUR + ms, ms, 400) for ms in (7, 700, 70)),
        attempt_row(3, hour - 2 * HOUR, 33, 204), attempt_row(3, hour - 2 * HOUR + 1, 44, None,
                                                              error="timeout"),
        attempt_row(99, hour + 95, 5, 200),  # no such delivery
        attempt_row(1, hour - 40 * HOUR, 1, 200))  # outside the 24 h range
    reads = store.console()

    async def series() -> dict:
        found = {}
        for range_name, site in (("24h", None), ("30d", None), ("24h", "shop2")):
            for item in await reads.vendor_overview(NOW, range_name, site_id=site):
                found[(range_name, site, item["site_id"], item["vendor"])] = (
                    item["attempts"], item["success_rate"], item["buckets"])
        return found

    before = await series()
    sendlane = before[("24h", None, "shop1", "sendlane")]
    assert (sendlane[0], sendlane[1]) == (10, 0.8)
    assert (sendlane[2][-1]["p50_ms"], sendlane[2][-1]["p95_ms"]) == (50, 100)
    remarkety = before[("24h", None, "shop1", "remarkety")][2][-6]
    assert (remarkety["attempts"], remarkety["p50_ms"], remarkety["p95_ms"],
            remarkety["succeeded"]) == (3, 70, 700, 0)
    shop2 = before[("24h", "shop2", "shop2", "sendlane")]
    assert (shop2[0], shop2[1], shop2[2][-3]["p50_ms"]) == (2, 0.5, 33)
    assert set(before) == {("24h", None, "shop1", "sendlane"), ("24h", None, "shop1",
                                                                 "remarkety"),
                           ("24h", None, "shop2", "sendlane"), ("30d", None, "shop1",
                                                                "sendlane"),
                           ("30d", None, "shop1", "remarkety"), ("30d", None, "shop2",
                                                                 "sendlane"),
                           ("24h", "shop2", "shop2", "sendlane")}
    assert before[("30d", None, "shop1", "sendlane")][0] == 11

    newest = (LATEST, LATEST)
    # Newest first: the one without a delivery (id 16, this hour) is looked at, not labelled.
    assert await store.label_attempts(newest, 4) == (3, (hour + 80, 8))
    assert await series() == before  # 3 of 17 labelled, the rest joined
    labelled, before_key = 3, (hour + 80, 8)
    while True:
        done, last = await store.label_attempts(before_key, 4)
        if last is None:
            break
        labelled, before_key = labelled + done, last
    assert labelled == 16 and await series() == before
    assert await store.backend.rows(
        "SELECT delivery_id FROM attempts WHERE site_id IS NULL") == [(99,)]
    assert await store.label_attempts(newest, 4) == (0, (hour + 95, 16))

    # Written by a finish: labelled at once (SQLite's writer; PostgreSQL's onetag_finish).
    await store.finish([Outcome(4, "delivered", attempt=Attempt(1, hour + 1, 60, {}, 200))],
                       NOW)
    assert await store.backend.rows(
        "SELECT site_id, vendor FROM attempts WHERE delivery_id = 4") == [("shop1", "sendlane")]
    assert (await series())[("24h", None, "shop1", "sendlane")][0] == 11


def test_buckets_are_whole_hours_or_days_ending_with_now() -> None:
    width, first, starts = bucket_starts(NOW, "30d")
    assert width == 86_400_000 and len(starts) == 30 and starts[-1] <= NOW < starts[-1] + width
    assert first % width == 0


# Reconciliation --------------------------------------------------------------------------

def order(order_id: str, email: str = "ann@example.com", event_id: str | None = None) -> dict:
    # The backend names the checkout's sc cookie: eSputnik requires one (cookies.sc).
    return {"event": "purchase", "event_id": event_id or f"order-{order_id}",
            "user": {"email": email}, "sc": "ANN-0000-CHECKOUT",
            "ecommerce": {"currency": "USD", "transaction_id": order_id, "value": "10.00",
                          "items": [{"item_id": "SKU-1", "item_name": "Mug", "price": "10.00",
                                     "quantity": 1}]}}


async def test_reconciliation_matches_backend_orders_to_each_vendors_purchase_row(backend,
                                                                                 tmp_path):
    data = {"server": {"database": backend.database, "forward": False,
                       "public_url": "http://console.example"},
            "sites": [{"id": "shop1", "api_key": "k-1-0123456789abcd",
                       "sendlane": {"integration_token": "t", "api_token": "s",
                                    "api_base": "http://127.0.0.1:9/sl"},
                       "remarkety": {"store_id": "s", "api_key": "r",
                                     "webhook_url": "http://127.0.0.1:9/rm",
                                     "routes": {"purchase": "off"}},
                       "esputnik": {"site_id": "ES1", "tracker_url": "http://127.0.0.1:9/es"},
                       "rejoiner": {"site_id": "RJ1", "domain": "shop.example", "api_key": "j",
                                    "api_base": "http://127.0.0.1:9/rj"}}]}
    settings = config.parse(data, env={})
    async with running(settings) as (app, client):
        for events in ([order("1001")], [order("1002")], [order("1003")],
                       [order("1001", event_id="order-1001-again")]):  # re-sent: one order
            sent = await client.post("/api/v1/sites/shop1/events", json=events,
                                     headers={"Authorization": "Bearer k-1-0123456789abcd"})
            assert sent.status_code == 202, sent.text
        store = app.state.store
        # The rule: each vendor's purchase row carries its PURCHASE_KEYS key.
        keys = set(await backend.rows("SELECT vendor, dedup_key FROM deliveries "
                                      "WHERE claim = 0"))
        for vendor in ("sendlane", "esputnik", "rejoiner"):
            for order_id in ("1001", "1002", "1003"):
                assert (vendor, purchase_key(vendor, order_id)) in keys
        assert set(PURCHASE_KEYS) == {"sendlane", "esputnik", "rejoiner", "remarkety"}
        for sql in ("UPDATE deliveries SET state = 'delivered' WHERE vendor = 'sendlane'",
                    "UPDATE deliveries SET state = 'dead', last_error = 'HTTP 400: no' "
                    "WHERE vendor = 'esputnik' AND dedup_key = 'PurchasedItems:1002'",
                    "UPDATE deliveries SET state = 'delivered' WHERE vendor = 'esputnik' "
                    "AND dedup_key != 'PurchasedItems:1002'",
                    "UPDATE deliveries SET state = 'browser' WHERE vendor = 'rejoiner' "
                    "AND dedup_key = 'convert:1003'"):
            await backend.rows(sql)
        reads = store.console()
        report = await reads.reconcile(settings.sites, NOW - 10**13, NOW + 10**13)
        with pytest.raises(ValueError, match="until"):
            await reads.reconcile(settings.sites, NOW, NOW)
    by_vendor = {r["vendor"]: r for r in report}
    assert {v: (r["received"], r["accepted"]) for v, r in by_vendor.items()} == {
        "esputnik": (3, 2), "rejoiner": (3, 1), "remarkety": (3, 0), "sendlane": (3, 3)}
    [esputnik_missing] = by_vendor["esputnik"]["missing"]
    assert (esputnik_missing["order_id"], esputnik_missing["state"],
            esputnik_missing["last_error"]) == ("1002", "dead", "HTTP 400: no")
    assert [m["state"] for m in by_vendor["rejoiner"]["missing"]] == ["pending", "pending"]
    assert all("routes.purchase is off" in m["why"] for m in by_vendor["remarkety"]["missing"])
    assert [m["order_id"] for m in by_vendor["remarkety"]["missing"]] == ["1001", "1002", "1003"]


async def test_a_replay_made_elsewhere_is_recorded_after_the_fact(store) -> None:
    await seed(store.backend, event_row(1), delivery_row(7))
    rows = await store.replay_rows(NOW, states=("dead",), ids=(7,))
    replay_id = await store.record_replay(NOW, "console:10.1.1.1", {"ids": [7]}, rows,
                                          shown=1)
    [replay] = await store.console().recent_replays()
    assert (replay["id"], replay["who"], replay["filter"], replay["replayed"], replay["ids"]) \
        == (replay_id, "console:10.1.1.1", {"ids": [7]}, 1, [7])


def test_a_fingerprint_names_the_set_not_its_order_or_new_ids() -> None:
    dead = [{"id": 3, "replaces": []}, {"id": 9, "replaces": []}]
    replanned = [{"id": None, "replaces": [4, 5]}]  # a dry run's re-planned expired rows
    assert fingerprint(dead) == fingerprint(list(reversed(dead)))
    assert fingerprint(dead + replanned) == fingerprint(
        dead + [{"id": 77, "replaces": [4, 5]}])  # the real replay gives it an id
    assert fingerprint(dead) != fingerprint(dead[:1])
    assert fingerprint(replanned) != fingerprint([{"id": None, "replaces": [4]}])
    assert fingerprint([]) != fingerprint(dead)


# Backfilled history on the console (onetag backfill --send) --------------------------------

HISTORY_2023 = [
    {"event": "identify", "time": "2023-04-01T09:30:00Z",
     "user": {"email": "carl@example.com", "customer_id": "C2", "first_name": "Carl"}},
    *({"event": "purchase", "time": f"2023-04-0{n}T10:00:00Z", "transaction_id": f"100{n}",
       "status": "processing", "user": {"email": "carl@example.com", "customer_id": "C2"},
       "ecommerce": {"currency": "USD", "value": "10.00",
                     "items": [{"item_id": "SKU-1", "price": "10.00", "quantity": 1}]}}
      for n in (1, 2, 3)),
    {"event": "refund", "time": "2023-04-09T10:00:00Z", "transaction_id": "1002",
     "user": {"customer_id": "C2"}},
]


async def backfill_history(store, site, tmp_path: Path, lines: list = HISTORY_2023,
                           pace: float = 0):
    from server.backfill import Backfill

    path = tmp_path / f"history-{len(lines)}-{pace:g}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    summary = await Backfill(site, [path], send=True, pace=pace, stream=open("/dev/null", "w"),
                             tty=False).run(store)
    assert not summary.problems, summary.problems
    return summary


async def test_reconciliation_counts_live_orders_not_backfilled_history(backend, tmp_path):
    """Orders from 2023 backfilled this week are history (docs/backfill.md), not
    orders the backend sent now: they are not counted, nor listed with a false reason."""
    import time as clock

    settings = console_settings(tmp_path, database=backend.database)
    async with running(settings) as (app, client):
        sent = await client.post("/api/v1/sites/shop1/events",
                                 json=[order("2001"), order("1003", event_id="live-1003")],
                                 headers={"Authorization":
                                          f"Bearer {settings.sites['shop1'].api_key}"})
        assert sent.status_code == 202, sent.text
        await backfill_history(app.state.store, settings.sites["shop1"], tmp_path)
        now = int(clock.time() * 1000)
        report = await app.state.store.console().reconcile(settings.sites,
                                                           now - 7 * 24 * HOUR, now + HOUR)
    assert {r["vendor"]: r["received"] for r in report} == {
        "esputnik": 2, "rejoiner": 2, "remarkety": 2, "sendlane": 2}
    listed = {m["order_id"] for r in report for m in r["missing"]}
    assert listed <= {"2001", "1003"}  # 1003 came live too: counted, once
    assert not any("after the order arrived" in (m["why"] or "")
                   for r in report for m in r["missing"])


async def test_paced_history_is_created_when_written_and_due_later(backend, tmp_path):
    """--pace: a backfilled row's created time is when it was written (never after its
    updated time); the pacing is in when it is due, where its retry window starts. The
    readers of created_ms see it so: replay --since/--until, the oldest pending age."""
    import time as clock

    settings = console_settings(tmp_path, database=backend.database)
    store = await backend.open(settings)
    try:
        started = int(clock.time() * 1000)
        summary = await backfill_history(store, settings.sites["shop1"], tmp_path, pace=60)
        written = int(clock.time() * 1000)
        assert summary.planned["sendlane"] >= 4
        listed = await store.list_deliveries(vendor="sendlane", limit=50)
        assert len(listed) == summary.planned["sendlane"]
        dues = sorted(row["next_attempt_ms"] for row in listed)
        assert [b - a for a, b in zip(dues, dues[1:])] == [1000] * (len(dues) - 1)
        for row in listed:
            assert started <= row["created_ms"] <= written
            assert row["created_ms"] <= row["updated_ms"]
            assert row["retry_from_ms"] == row["next_attempt_ms"]  # the window starts when due
        # The oldest pending row fell due just now: not seconds in the future, not older.
        (stats,) = [s for s in await store.delivery_stats(written) if s["vendor"] == "sendlane"]
        assert 0 <= stats["oldest_pending_age_s"] <= (written - started) / 1000 + 1
        _, oldest = await store.outbox_depth(dues[0] + 500)
        assert oldest["sendlane"] == 0.5
        # Made dead, they are found by when they were created: between started and written.
        await backend.rows("UPDATE deliveries SET state = 'dead', last_error = 'x' "
                           "WHERE vendor = 'sendlane'")
        found = await store.replay_rows(written, vendor="sendlane", since_ms=started,
                                        until_ms=written + 1, dry_run=True)
        assert len(found) == len(listed)
        page = await store.console().dead_letters(
            ReplayFilter(("dead",), "sendlane", None, started, written + 1, None, None,
                         "created"))
        assert page["total"] == len(listed)
        # Paced behind those (pending again), then alone: rows not due yet are not late.
        await backend.rows("UPDATE deliveries SET state = 'pending', last_error = NULL")
        more = [{**HISTORY_2023[1], "transaction_id": f"300{n}"} for n in (1, 2)]
        await backfill_history(store, settings.sites["shop1"], tmp_path, more, pace=60)
        await backend.rows("UPDATE deliveries SET state = 'delivered' "
                           "WHERE request_id = 'backfill-1'")
        later = await store.list_deliveries(state="pending", vendor="sendlane")
        assert min(row["next_attempt_ms"] for row in later) == dues[-1] + 1000
        assert max(row["created_ms"] for row in later) < dues[-1]
        _, oldest = await store.outbox_depth(dues[-1])
        (stats,) = [s for s in await store.delivery_stats(dues[-1]) if s["vendor"] == "sendlane"]
        assert oldest["sendlane"] == stats["oldest_pending_age_s"] == 0
        overview = await store.console().vendor_overview(dues[-1])
        assert [v["oldest_pending_age_s"] for v in overview if v["vendor"] == "sendlane"] == [0]
    finally:
        await store.close()
