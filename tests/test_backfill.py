"""``onetag backfill`` and ``onetag export remarkety-orders``: every bad line reported with
its file and line and nothing planned; a dry run that changes nothing; history planned for
Sendlane (``initial_sync``, past ``time``) and sent over real HTTP to the fake vendor, and
for no vendor without a historical path; a second run plans nothing; the Remarkety CSV
parsed back. The line readers are property-tested (never a crash; a problem names its line).
The 2,000-line run killed with -9 and resumed: tests/test_backfill_process.py (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from server import cli
from server.backfill import (MAX_LINE_BYTES, Backfill, Progress, Reader, Unit, check_unit,
                             parse_jsonl_line)
from server.events import Origin
from server.remarkety_export import COLUMNS, COLUMNS_DOCUMENTED
from server.store.sqlite import SQLiteStore

from fakes.harness import (ALL, SITE, backend, make_settings, rows, serve, settings_data, until,
                           write_config)

PAST = 1_704_103_200_000  # 2024-01-01T10:00:00Z


def history(orders: int = 3) -> list[dict]:
    """A small shop's history: a customer, a product, orders and a status change each."""
    lines: list[dict] = [
        {"event": "identify", "time": "2024-01-01T09:00:00Z",
         "user": {"email": "ann@example.com", "customer_id": "C1", "first_name": "Ann"}},
        {"event": "product_updated", "time": PAST,
         "ecommerce": {"items": [{"item_id": "SKU-1", "item_name": "Mug", "price": "9.50",
                                  "item_url": "https://shop.example/p/1",
                                  "image_url": "https://shop.example/i/1.jpg"}]}},
    ]
    for n in range(orders):
        lines.append({"event": "purchase", "time": PAST + n * 60_000, "transaction_id": f"O{n}",
                      "user": {"email": f"buyer{n}@example.com", "customer_id": f"C{n}"},
                      "ecommerce": {"currency": "USD", "value": "19.00",
                                    "items": [{"item_id": "SKU-1", "item_name": "Mug",
                                               "price": "9.50", "quantity": 2}]}})
        lines.append({"event": "order_status", "time": PAST + n * 60_000 + 3_600_000,
                      "transaction_id": f"O{n}", "status": "fulfilled",
                      "user": {"customer_id": f"C{n}"}})  # the buyer's email: from the purchase
    return lines


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def shop(tmp_path, fake):
    """A config file for one site with all four vendors on the fake; the database path."""
    data = settings_data(tmp_path, fake)
    config = write_config(tmp_path / "onetag.toml", data)
    return config, tmp_path / "onetag.db"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def table_counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("events", "deliveries", "backfill_runs")}


# Validation ---------------------------------------------------------------------------


def test_every_bad_line_is_reported_with_its_number_and_nothing_is_planned(shop, tmp_path,
                                                                          capsys):
    config, db = shop
    good = history(1)
    jsonl = write_jsonl(tmp_path / "h.jsonl", [
        good[0],                                                       # 1 fine
        "{not json",                                                   # 2
        {"event": "purchase", "transaction_id": "X", "user": {"email": "a@example.com"}},  # 3
        {**good[2], "time": int(time.time() * 1000) + 3_600_000},      # 4 the future
        {"event": "page_view", "time": PAST, "user": {"email": "a@example.com"}},  # 5
        {"event": "identify", "time": PAST, "user": {"email": "not-an-email"}},    # 6
        "",                                                            # 7 blank: ignored
        {**good[2], "ecommerce": {"items": [{"item_id": "S", "price": "abc"}]}},    # 8
        "[1, 2]",                                                      # 9
        json.dumps({"event": "identify", "time": PAST, "user": {"email": "x@example.com"},
                    "pad": "x" * MAX_LINE_BYTES}),                     # 10 too long
        {"event": "identify", "time": "yesterday", "user": {"email": "b@example.com"}},  # 11
    ])
    orders = tmp_path / "o.csv"
    orders.write_text("order_id,time,email,currency,value,item_id,price,quantity\n"
                      "A1,2024-02-01T09:00:00Z,a@example.com,USD,10,SKU-1,10,1\n"
                      "A2,2024-02-01T09:00:00Z,a@example.com,USD,10,SKU-1,ten,1\n"
                      "A3,2024-02-01T09:00:00,a@example.com,USD,10,SKU-1,10,1\n"
                      "A4,2024-02-01T09:00:00Z,a@example.com\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "backfill", "--config", str(config), "--site", SITE,
                             "--send", str(jsonl), str(orders))
    assert code == 1
    for where, field in [("h.jsonl:2:", "line"), ("h.jsonl:3:", "event.time"),
                         ("h.jsonl:4:", "event.time"), ("h.jsonl:5:", "event.event"),
                         ("h.jsonl:6:", "event.user.email"),
                         ("h.jsonl:8:", "event.ecommerce.items[0].price"),
                         ("h.jsonl:9:", "line"), ("h.jsonl:10:", "line"),
                         ("h.jsonl:11:", "event.time"),
                         ("o.csv:3:", "event.ecommerce.items[0].price"),
                         ("o.csv:4:", "event.time"), ("o.csv:5:", "row")]:
        assert any(line.startswith(f"{where} {field}:") for line in err.splitlines()), (where, err)
    assert "h.jsonl:1:" not in err and "h.jsonl:7:" not in err and "o.csv:2:" not in err
    assert "12 of 14 events invalid; nothing was planned" in err
    assert table_counts(db) == {"events": 0, "deliveries": 0, "backfill_runs": 0}

    # --skip-invalid: the valid ones go, the rest are counted.
    code, out, err = run_cli(capsys, "backfill", "--config", str(config), "--site", SITE,
                             "--send", "--skip-invalid", str(jsonl), str(orders))
    assert code == 0, err
    assert "2 events valid" in out and "12 invalid (skipped: --skip-invalid)" in out
    assert table_counts(db)["events"] == 2


def test_an_order_with_a_refused_row_is_refused_whole(tmp_path):
    """With --skip-invalid too, an order never goes with one of its lines missing."""
    path = tmp_path / "o.csv"
    path.write_text("order_id,time,email,item_id,price,quantity\n"
                    "B1,2024-02-01T09:00:00Z,b@example.com,SKU-1,10,1\n"
                    "B1,2024-02-01T09:00:00Z,b@example.com,SKU-2\n"
                    "B1,2024-02-01T09:00:00Z,b@example.com,SKU-3,5,1\n"
                    "C1,2024-02-01T09:00:00Z,c@example.com,SKU-1,10,1\n"
                    "C2,2024-02-01T09:00:00Z,c@example.com,SKU-1,10,1\n"
                    '"C2,broken\n', encoding="utf-8")
    found = {}
    for unit in Reader([path]).units():
        event = check_unit(unit, ORIGIN)
        found[unit.where] = event["ecommerce"]["transaction_id"] if event else unit.problems
    assert found == {
        "o.csv:3": ["o.csv:3: row: has 4 cells; the header has 6"],
        "o.csv:2-4": ["o.csv:2-4: order B1: its row at line 3 is invalid, so the whole order "
                      "is left out"],
        "o.csv:5": "C1",
        "o.csv:7": ["o.csv:7: row: is not valid CSV (unexpected end of data)"],
        "o.csv:6": ["o.csv:6: order C2: its row at line 7 is invalid, so the whole order is "
                    "left out"]}


def test_a_dry_run_changes_nothing_in_the_database(shop, tmp_path, capsys):
    config, db = shop
    lines = history(3)
    first = write_jsonl(tmp_path / "first.jsonl", lines[:4])
    code, _, err = run_cli(capsys, "backfill", "--config", str(config), "--site", SITE, "--send",
                           str(first))
    assert code == 0, err
    before = snapshot(db)

    everything = write_jsonl(tmp_path / "all.jsonl", lines)
    code, out, err = run_cli(capsys, "backfill", "--config", str(config), "--site", SITE,
                             str(everything))
    assert code == 0, err
    # The file's bytes, and no frame in its WAL (a reader leaves an empty one behind).
    assert snapshot(db) == before
    # What it says: the 4 new lines would go, the 4 of the first run are done already.
    assert "(dry run)" in out and "sendlane: 4 would plan" in out and "4 already done" in out
    for vendor in ("rejoiner", "remarkety", "esputnik"):
        assert f"\n{vendor}: nothing — " in out
    assert "Nothing was written" in out

    # No database yet: a dry run does not make one.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    data = json.loads(json.dumps(settings_data(fresh, _NoFake())))
    code, out, _ = run_cli(capsys, "backfill", "--config",
                           str(write_config(fresh / "onetag.toml", data)), "--site", SITE,
                           str(everything))
    assert code == 0 and "sendlane: 8 would plan" in out
    assert not list(fresh.glob("onetag.db*"))


def snapshot(db: Path) -> tuple[str, int]:
    """The database file's hash once every committed page is in it, and its WAL's size."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = Path(f"{db}-wal")
        size = wal.stat().st_size if wal.exists() else 0
        return hashlib.sha256(db.read_bytes()).hexdigest(), size


class _NoFake:
    """URLs for a config whose vendors are never called (a dry run sends nothing)."""

    @staticmethod
    def url(vendor: str, rest: str = "") -> str:
        return f"http://127.0.0.1:9/{vendor}{rest}"


# Sending ------------------------------------------------------------------------------


async def test_history_reaches_sendlane_once_with_initial_sync_and_its_past_time(tmp_path,
                                                                                 fake):
    settings = make_settings(tmp_path, fake)
    site = settings.sites[SITE]
    lines = history(5)
    path = write_jsonl(tmp_path / "h.jsonl", lines)
    async with serve(settings) as app:
        summary = await Backfill(site, [path], send=True, batch_lines=3, pace=0).run(
            app.state.store)
        assert summary.planned == {"sendlane": 12}  # 1 customer, 1 product, 5 orders, 5 statuses
        await until(lambda: len(fake.delivered("sendlane")) == 12
                    and not rows(tmp_path / "onetag.db", "d.state = 'pending'"),
                    what="the history at Sendlane")
        # A second run: everything is there already, nothing new is planned or sent.
        again = await Backfill(site, [path], send=True, pace=0).run(app.state.store)
        assert again.planned == {} and again.already == {"sendlane": 12}
        assert again.events_known == len(lines)
    sent = fake.requests("sendlane")
    assert len(sent) == 12 and not any(fake.requests(v) for v in ALL if v != "sendlane")
    for request in sent:
        body = request.json
        assert body["initial_sync"] is True
        assert isinstance(body["time"], int) and body["time"] * 1000 < PAST + 6 * 3_600_000
        assert request.headers["authorization"] == "Bearer SL-SECRET"
    orders = [r.json for r in sent if r.path.endswith("/order-placed")]
    placed = sorted((b["order_id"], b["status"], b["time"]) for b in orders)
    assert placed == sorted([(f"O{n}", "completed", (PAST + n * 60_000) // 1000) for n in range(5)]
                            + [(f"O{n}", "fulfilled", (PAST + n * 60_000 + 3_600_000) // 1000)
                               for n in range(5)])
    # A status change named only customer_id: its order's buyer's email came from the purchase.
    assert {b["email"] for b in orders if b["status"] == "fulfilled"} == {
        f"buyer{n}@example.com" for n in range(5)}
    customer = next(r.json for r in sent if r.path.endswith("/customer-added"))
    assert customer["customer_id"] == "C1" and customer["time"] == 1_704_099_600
    # History is stored as backend events marked as backfilled; no session, no identity.
    with contextlib.closing(sqlite3.connect(tmp_path / "onetag.db")) as conn:
        stored = conn.execute("SELECT source, sc, identity_id, data FROM events").fetchall()
        assert {(s, sc, i) for s, sc, i, _ in stored} == {("backend", None, None)}
        assert all(json.loads(d)["backfill"] is True for *_, d in stored)
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM identities").fetchone()[0] == 0
        assert conn.execute("SELECT DISTINCT request_id FROM deliveries").fetchall() == [
            ("backfill-1",)]


async def test_a_live_order_is_not_sent_again_by_the_backfill(tmp_path, fake):
    settings = make_settings(tmp_path, fake, only=("sendlane",))
    path = write_jsonl(tmp_path / "h.jsonl", history(2))
    async with serve(settings) as app:
        import httpx

        async with httpx.AsyncClient(base_url=app.state.base_url) as client:
            await backend(client, {"event": "purchase", "event_id": "live-O1",
                                   "transaction_id": "O1", "user": {"email": "buyer1@example.com"},
                                   "ecommerce": {"currency": "USD", "value": "19.00",
                                                 "items": [{"item_id": "SKU-1", "price": "9.50",
                                                            "quantity": 2}]}})
        await until(lambda: len(fake.delivered("sendlane")) == 1, what="the live order")
        summary = await Backfill(settings.sites[SITE], [path], send=True, pace=0).run(
            app.state.store)
        assert summary.already == {"sendlane": 1} and summary.planned == {"sendlane": 5}
        await until(lambda: len(fake.delivered("sendlane")) == 6, what="the history")
    placed = [r.json for r in fake.requests("sendlane") if r.path.endswith("/order-placed")]
    assert sorted(b["order_id"] for b in placed if "initial_sync" not in b) == ["O1"]
    assert [b["order_id"] for b in placed].count("O1") == 2  # the live order and its status


async def test_history_is_paced_so_live_rows_go_first(tmp_path, fake):
    """--pace 60: a vendor's backfilled rows, created when written, fall due a second apart
    (their retry window starting then); a live order planned meanwhile is due at once, so
    it is claimed first."""
    settings = make_settings(tmp_path, fake, only=("sendlane",), forward=False)
    db = tmp_path / "onetag.db"
    path = write_jsonl(tmp_path / "h.jsonl", history(3))
    async with serve(settings) as app:
        started = int(time.time() * 1000)
        summary = await Backfill(settings.sites[SITE], [path], send=True, batch_lines=2,
                                 pace=60).run(app.state.store)
        assert "paced at 60 a minute (--pace), the last due in about 7s" in summary.text()
        import httpx

        async with httpx.AsyncClient(base_url=app.state.base_url) as client:
            await backend(client, {"event": "purchase", "transaction_id": "LIVE",
                                   "user": {"email": "live@example.com"},
                                   "ecommerce": {"value": "1.00", "items": []}})
        history_rows = rows(db, "d.request_id = 'backfill-1'")
        (live,) = rows(db, "d.request_id != 'backfill-1'")
        dues = [row["next_attempt_ms"] for row in history_rows]
        assert len(dues) == 8 and dues[0] >= started
        assert [b - a for a, b in zip(dues, dues[1:])] == [1000] * 7
        # Created when written; the pacing is in when each is due, its retry window too.
        assert all(started <= row["created_ms"] == row["updated_ms"] <= row["next_attempt_ms"]
                   and row["retry_from_ms"] == row["next_attempt_ms"] for row in history_rows)
        assert history_rows[-1]["created_ms"] < dues[-1]
        assert live["next_attempt_ms"] < dues[2]
        reason = cli.pending_reason({**history_rows[-1], "waits_for": None},
                                    dues[0], 20, 60_000)
        assert reason.startswith("paced history (`onetag backfill --pace`): due at ")
        # Another run goes on after the vendor's last pending row, at the same pace.
        more = write_jsonl(tmp_path / "more.jsonl", history(4)[-2:])
        await Backfill(settings.sites[SITE], [more], send=True, pace=60).run(app.state.store)
        later = [row["next_attempt_ms"] for row in rows(db, "d.request_id = 'backfill-2'")]
        assert later == [dues[-1] + 1000, dues[-1] + 2000]


# Remarkety's orders history file ----------------------------------------------------------


async def test_the_remarkety_export_parses_back_to_the_orders(tmp_path, fake, capsys):
    data = settings_data(tmp_path, fake, forward=False)
    config = write_config(tmp_path / "onetag.toml", data)
    settings = make_settings(tmp_path, fake, forward=False)
    csv_orders = tmp_path / "orders.csv"
    csv_orders.write_text(
        "order_id,time,status,email,customer_id,first_name,currency,value,tax,coupon,item_id,"
        "item_name,price,quantity\n"
        "B1,2024-03-01T12:00:00+02:00,completed,cy@example.com,C9,Cy,EUR,25.00,2.00,SPRING,"
        "SKU-1,Mug,10.00,2\n"
        "B1,2024-03-01T12:00:00+02:00,completed,cy@example.com,C9,Cy,EUR,25.00,2.00,SPRING,"
        "SKU-2,Pen,7.50,1\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "statuses.jsonl", [
        {"event": "refund", "time": "2024-03-05T08:00:00Z", "transaction_id": "B1",
         "user": {"email": "cy@example.com"}},
        {"event": "order_status", "time": "2024-03-02T08:00:00Z", "transaction_id": "B1",
         "status": "fulfilled", "user": {"email": "cy@example.com"}},
        {"event": "order_status", "time": "2024-03-02T08:00:00Z", "transaction_id": "NOPE",
         "status": "fulfilled", "user": {"email": "cy@example.com"}},
    ])
    async with serve(settings) as app:
        import httpx

        async with httpx.AsyncClient(base_url=app.state.base_url) as client:
            await backend(client, {"event": "purchase", "transaction_id": "L1",
                                   "user": {"email": "live@example.com"},
                                   "ecommerce": {"currency": "USD", "value": "4.35",
                                                 "items": [{"item_id": "SKU-3", "price": "4.35"}]}})
    await asyncio.to_thread(cli.main, ["backfill", "--config", str(config), "--site", SITE,
                                       "--send", str(csv_orders), str(jsonl)])
    out_file = tmp_path / "export.csv"
    code = await asyncio.to_thread(cli.main, ["export", "remarkety-orders", "--config",
                                              str(config), "--site", SITE, "--out",
                                              str(out_file)])
    assert code == 0
    assert "1 orders have status changes but no purchase" in capsys.readouterr().err
    with open(out_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        assert COLUMNS[:len(COLUMNS_DOCUMENTED)] == COLUMNS_DOCUMENTED
        got = list(reader)
    by_order: dict[str, list[dict]] = {}
    for row in got:
        by_order.setdefault(row["order_id"], []).append(row)
    assert set(by_order) == {"B1", "L1"}
    b1 = by_order["B1"]
    assert [(r["product_id"], r["product_quantity"], r["product_price"]) for r in b1] == [
        ("SKU-1", "2", "10.00"), ("SKU-2", "1", "7.50")]
    for row in b1:  # the order's details repeat on each item's row
        assert row["order_created_at"] == "2024-03-01T10:00:00+00:00"
        assert row["order_status"] == "refunded" and row["order_financial_status"] == "refunded"
        assert row["order_modified_at"] == "2024-03-05T08:00:00+00:00"
        assert (row["order_currency"], row["order_subtotal"], row["order_discount"],
                row["order_tax"], row["order_total"]) == ("EUR", "27.50", "2.50", "2.00", "27.00")
        assert (row["customer_email"], row["customer_id"], row["customer_first_name"],
                row["order_discount_code"]) == ("cy@example.com", "C9", "Cy", "SPRING")
    (l1,) = by_order["L1"]  # the live backend order is in the history too
    assert (l1["order_status"], l1["order_total"], l1["customer_email"]) == (
        "completed", "4.35", "live@example.com")


def test_two_processes_opening_a_new_database_at_once_migrate_it_once(tmp_path):
    """`onetag worker` and `onetag backfill --send` started together on a fresh database:
    each migration is applied by one of them, and neither fails."""
    import threading

    from server.store.sqlite_writer import migrate, migrations

    for attempt in range(8):
        db = tmp_path / f"race{attempt}.db"
        barrier = threading.Barrier(2)
        results: list = []

        def open_and_migrate() -> None:
            conn = sqlite3.connect(db, timeout=30, isolation_level=None)
            try:
                barrier.wait()
                results.append(migrate(conn))
            except Exception as exc:  # noqa: BLE001 (the assertion below names it)
                results.append(exc)
            finally:
                conn.close()

        threads = [threading.Thread(target=open_and_migrate) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not [r for r in results if isinstance(r, Exception)], results
        assert sorted(results[0] + results[1]) == sorted(name for _, name, _ in migrations())


# Progress ---------------------------------------------------------------------------------


def test_the_progress_bar_redraws_on_a_terminal_and_prints_lines_otherwise():
    tty = io.StringIO()
    bar = Progress("planning", 1000, tty, tty=True)
    bar.update(250, 250, force=True)
    bar.update(500, 500, force=True)
    bar.finish()
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "250 lines,  25%" in text and "lines/s" in text and "ETA" in text
    log = io.StringIO()
    plain = Progress("planning", 1000, log, tty=False)
    plain.update(250, 250, force=True)
    plain.finish()
    assert "\r" not in log.getvalue()
    printed = log.getvalue().splitlines()
    assert len(printed) == 2 and all(line.startswith("planning: 250 lines,  25%, ") and
                                     " lines/s, ETA " in line for line in printed)


# The line readers: never a crash, a problem names its line -----------------------------------

ORIGIN = Origin(site_id=SITE, source="backend", currency="USD",
                received_ms=int(time.time() * 1000))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=20)
event_like = st.fixed_dictionaries(
    {"event": st.sampled_from(["identify", "purchase", "order_status", "refund",
                               "product_updated", "page_view"]) | st.text(max_size=5)},
    optional={"time": st.integers() | st.text(max_size=25) | st.sampled_from(
        ["2024-01-01T00:00:00Z", "2024-01-01", PAST]),
              "transaction_id": st.text(max_size=5) | st.integers(),
              "status": st.text(max_size=10) | st.sampled_from(["fulfilled", "refunded"]),
              "user": json_values | st.fixed_dictionaries(
                  {}, optional={"email": st.sampled_from(["a@example.com", "x"]),
                                "customer_id": st.text(max_size=5)}),
              "ecommerce": json_values, "event_id": json_values})


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), event_like.map(lambda e: json.dumps(e).encode()),
                 json_values.map(lambda v: json.dumps(v).encode())))
def test_a_jsonl_line_never_crashes_the_reader_and_a_problem_names_its_line(line):
    unit = parse_jsonl_line(line, "h.jsonl:17")
    event = check_unit(unit, ORIGIN)
    if event is None:
        assert unit.problems and all(p.startswith("h.jsonl:17: ") for p in unit.problems)
    else:
        assert event["time_ms"] <= ORIGIN.received_ms and event["event_id"]


cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.lists(st.sampled_from(["order_id", "time", "email", "item_id", "price",
                                        "quantity", "value", "status", "bogus"]),
                       min_size=1, max_size=6),
       body=st.lists(st.lists(cells, max_size=7), max_size=6),
       raw_tail=st.binary(max_size=40))
def test_a_csv_file_never_crashes_the_reader_and_problems_name_their_lines(header, body,
                                                                          raw_tail):
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(body)
    data = text.getvalue().encode() + raw_tail
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.csv"
        path.write_bytes(data)
        reader = Reader([path])
        units = list(reader.units())
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    assert reader.lines == lines
    for unit in units:
        assert isinstance(unit, Unit) and unit.where.startswith("x.csv:")
        event = check_unit(unit, ORIGIN)
        if event is None:
            assert unit.problems and all(p.startswith(unit.where + ": ") or
                                         p.startswith("x.csv:") for p in unit.problems)
        assert unit.last <= reader.lines


def test_a_paced_row_delivered_first_try_is_not_logged_as_replayed(caplog):
    """A paced row's retry window starts after it was made, as a replayed row's does: only
    the replayed one is logged "delivered after a replay"."""
    import logging

    from server.forwarder import Forwarder, Verdict
    from server.store.base import Delivery, Outcome

    made = 1_800_000_000_000
    for request_id in ("backfill-3", "4f1c2a9be07d3d15"):
        delivery = Delivery(id=7, site_id=SITE, vendor="sendlane", dedup_key="k", visitor="v",
                            request={}, attempts=1, created_ms=made,
                            retry_from_ms=made + 60_000, request_id=request_id)
        with caplog.at_level(logging.INFO, logger="onetag.forwarder"):
            Forwarder._log(delivery, Verdict("delivered", status=200),
                           Outcome(7, "delivered"), made / 1000 + 61)
    assert [r.getMessage() for r in caplog.records] == [
        "delivery 7 to sendlane delivered after a replay (first try)"]
