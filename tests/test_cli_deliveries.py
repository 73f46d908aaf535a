"""`onetag deliveries` and `onetag replay` as an operator runs them, on a database holding
rows in every state (pending, failing, held, delivered, dead, browser, expired, ignored)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone

import httpx
import pytest

from server import config
from server.cli import format_report, parse_since
from server.store.base import Outcome
from server.store.sqlite import SQLiteStore

from fakes.harness import (ALL, API_KEY, FORWARD_ENV, REPO, SECRETS, SITE, browser, item, rows,
                           serve, settings_data, states, until, write_config)
from fakes.vendor_server import FakeVendors

COLUMNS = ["pending", "failing", "held", "delivered", "dead", "browser", "expired", "ignored"]
SC_A, SC_B, SC_C = ("AAAAAAAA-0000-0000-0000-000000000001", "BBBBBBBB-0000-0000-0000-000000000002",
                    "CCCCCCCC-0000-0000-0000-000000000003")


def onetag(*args: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


IDENTITY_SECRET = "cli-test-identity-secret-0123456789"


def signed(email: str) -> str:
    from server import trust

    return trust.signature(IDENTITY_SECRET, email)


def purchase(event_id: str, loaded) -> dict:
    return {"event": "purchase", "event_id": event_id, "loaded": loaded,
            "ecommerce": {"currency": "USD", "transaction_id": event_id, "value": "29.99",
                          "items": [item()]}}


async def backend_knows(settings, email: str, customer_id: str) -> None:
    """The shop's backend stated ``email``'s customer id before the pages' events (a page's
    ``customer_id`` is never kept, signed or not: docs/trust.md): its identity row, as a
    backend identify leaves it, without that identify's own deliveries (the counts and row
    ids these tests check are those of the browser events)."""
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    await store.open()  # the schema
    await store.close()
    now = int(time.time() * 1000)
    with sqlite3.connect(settings.server.sqlite_path) as db:
        db.execute("INSERT INTO identities (site_id, email, customer_id, created_ms, updated_ms) "
                   "VALUES (?, ?, ?, ?, ?)", (SITE, email, customer_id, now, now))
    db.close()


async def store_events(settings, *batches) -> None:
    """POST beacons to the real app with forwarding off: rows are planned, nothing is sent."""
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        for sc, events in batches:
            await browser(client, *events, sc=sc)


@pytest.fixture(scope="module")
def shop_template(tmp_path_factory):
    """A config file and a database with rows in every state, made once for the module
    (two app starts and three store opens); each test gets a copy (``shop``)."""
    tmp_path = tmp_path_factory.mktemp("shop")
    with FakeVendors() as fake:  # only for its URLs: nothing is sent in this file
        data = settings_data(tmp_path, fake, forward=False)
        # Browser purchases are forwarded (a site without a backend integration), so they
        # reach every state; an unverified unsubscribe gives the `ignored` rows.
        data["sites"][0]["order_source"] = "browser"
        # A's identify is signed (a verified identity); A's customer id, which Sendlane's
        # customer-added requires, comes from the backend (``backend_knows``).
        data["sites"][0]["identity_secret"] = IDENTITY_SECRET
        config_path = write_config(tmp_path / "onetag.toml", data)
    settings = config.load(config_path, env={})

    async def fill() -> None:
        await backend_knows(settings, "a@example.com", "A-1")
        # Visitor C bought anonymously; the hold window passes: expired.
        await store_events(settings, (SC_C, [purchase("anon-order", [])]))
        store = SQLiteStore(settings.server.sqlite_path, settings.sites)
        await store.open()
        now = int(time.time() * 1000)
        await store.expire_held(now + 1, now)
        await store.close()
        # Visitor A identifies (four rows), buys with every library loaded (browser rows for
        # Rejoiner and eSputnik); visitor B adds to cart anonymously (held).
        await store_events(settings,
                           (SC_A, [{"event": "identify", "event_id": "id-a", "loaded": [],
                                    "user": {"email": "a@example.com",
                                             "signature": signed("a@example.com")}},
                                   purchase("order-a", ALL)]),
                           (SC_B, [{"event": "add_to_cart", "event_id": "cart-b", "loaded": [],
                                    "ecommerce": {"currency": "USD", "items": [item()]}},
                                   {"event": "unsubscribe", "event_id": "unsub-b", "loaded": [],
                                    "user": {"email": "someone@example.com"}}]))
        # A forwarder's outcomes for A's identify: delivered, dead, failing; eSputnik's stays due.
        store = SQLiteStore(settings.server.sqlite_path, settings.sites)
        await store.open()
        now = int(time.time() * 1000)
        outcomes = {"rejoiner": ("delivered", 0, None),
                    "sendlane": ("dead", 0, 'HTTP 422: {"message":"invalid email"}'),
                    "remarkety": ("pending", now + 3_600_000, "HTTP 503: try later")}
        for vendor, (state, next_ms, error) in outcomes.items():
            [claimed] = await store.claim(now, 60_000, 1, vendors=(vendor,))
            await store.finish([Outcome(claimed.id, state, next_ms, error)], now)
        await store.close()

    asyncio.run(fill())
    return tmp_path


@pytest.fixture
def shop(shop_template, tmp_path):
    """The module's shop, copied for this test alone: its config (pointing at the copy) and
    its database, closed (so checkpointed) when the template was made."""
    text = (shop_template / "onetag.toml").read_text()
    config_path = tmp_path / "onetag.toml"
    config_path.write_text(text.replace(str(shop_template), str(tmp_path)))
    for name in ("onetag.db", "onetag.db-wal"):
        if (shop_template / name).exists():
            shutil.copyfile(shop_template / name, tmp_path / name)
    return tmp_path, config_path, config.load(config_path, env={})


def db_counts(db) -> dict[str, dict[str, int]]:
    counts = {vendor: dict.fromkeys(COLUMNS, 0) for vendor in ALL}
    for row in rows(db):
        state = row["state"]
        if state == "pending" and row["last_error"]:
            state = "failing"
        counts[row["vendor"]][state] += 1
    return counts


async def test_the_table_shows_every_state_per_vendor(shop) -> None:
    tmp_path, config_path, _ = shop
    expected = db_counts(tmp_path / "onetag.db")
    for column in COLUMNS:  # the fixture really has every state
        assert sum(counts[column] for counts in expected.values()) > 0, column
    result = onetag("deliveries", "--config", str(config_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("deliveries in ")
    assert lines[1].split() == ["vendor", *COLUMNS, "oldest", "pending"]
    table = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(table) == {*ALL, "total"}
    for vendor in ALL:
        numbers = [int(n) for n in table[vendor][:len(COLUMNS)]]
        assert numbers == [expected[vendor][c] for c in COLUMNS], vendor
        has_pending = expected[vendor]["pending"] + expected[vendor]["failing"]
        age = table[vendor][len(COLUMNS)]
        assert (age != "-") == bool(has_pending) and (age == "-" or age[-1] in "smhd")
    totals = [int(n) for n in table["total"][:len(COLUMNS)]]
    assert totals == [sum(expected[v][c] for v in ALL) for c in COLUMNS]
    assert expected["sendlane"]["dead"] == 1 and expected["remarkety"]["failing"] == 1
    assert expected["rejoiner"]["browser"] == 1 and expected["rejoiner"]["expired"] == 1
    assert expected["rejoiner"]["ignored"] == 1 and expected["remarkety"]["ignored"] == 1


async def test_json_and_the_list_of_dead_rows(shop) -> None:
    tmp_path, config_path, _ = shop
    result = onetag("deliveries", "--config", str(config_path), "--json", "--state", "dead",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = db_counts(tmp_path / "onetag.db")
    assert {r["vendor"]: {c: r[c] for c in COLUMNS} for r in report["vendors"]} == expected
    [dead] = report["rows"]
    assert (dead["vendor"], dead["state"]) == ("sendlane", "dead")
    assert dead["last_error"] == 'HTTP 422: {"message":"invalid email"}'
    text = onetag("deliveries", "--config", str(config_path), "--state", "dead", "--vendor",
                  "sendlane", cwd=tmp_path).stdout
    assert "latest dead deliveries for sendlane:" in text and "invalid email" in text
    assert [line.split()[0] for line in text.splitlines()[2:3]] == ["sendlane"]


async def test_replay_dead_by_default_then_expired_once_identified(shop) -> None:
    tmp_path, config_path, settings = shop
    db = tmp_path / "onetag.db"
    before = states(db)
    # Nothing matches: wrong vendor, or created before the window asked for.
    assert "0 deliveries" in onetag("replay", "--config", str(config_path), "--vendor",
                                    "rejoiner", cwd=tmp_path).stdout
    future = datetime.now(timezone.utc).replace(year=datetime.now().year + 1).isoformat()
    assert "0 deliveries" in onetag("replay", "--config", str(config_path), "--since", future,
                                    cwd=tmp_path).stdout
    result = onetag("replay", "--config", str(config_path), "--since", "1h", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "onetag: 1 deliveries made due again (dead" in result.stdout
    # Its times say their zone (UTC, as the logs'): "created since 2026-01-31 13:00:00 UTC".
    assert re.search(r"created since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", result.stdout), \
        result.stdout
    [row] = rows(db, "d.vendor = 'sendlane' AND e.event_id = 'id-a'")
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert row["retry_from_ms"] >= row["created_ms"]  # a fresh retry window
    after = states(db)
    assert before["dead"] == 1 and "dead" not in after and after["expired"] == before["expired"]

    # Expired rows: nothing to send them with while visitor C has no email ...
    assert "0 deliveries" in onetag("replay", "--config", str(config_path), "--expired",
                                    cwd=tmp_path).stdout
    expired = rows(db, "d.state = 'expired'")
    # ... C identifies later (too late for the hold window), and replay plans them again.
    await store_events(settings, (SC_C, [{"event": "identify", "event_id": "id-c",
                                          "loaded": [], "user": {"email": "c@example.com"}}]))
    assert rows(db, "d.state = 'expired'") == expired
    result = onetag("replay", "--config", str(config_path), "--expired", cwd=tmp_path)
    assert f"{len(expired)} deliveries made due again (expired)" in result.stdout
    assert rows(db, "d.state = 'expired'") == []
    replanned = [r for r in rows(db, "e.event_id = 'anon-order'") if r["id"] > expired[-1]["id"]]
    assert sorted((r["vendor"], r["dedup_key"], r["state"]) for r in replanned) == sorted(
        (r["vendor"], r["dedup_key"], "pending") for r in expired)
    convert = [r for r in replanned if r["vendor"] == "rejoiner"][0]["request"]
    assert convert["json"]["email"] == "c@example.com"


async def test_worker_forwards_what_the_server_stored_and_stops_on_sigterm(tmp_path) -> None:
    with FakeVendors() as fake:
        config_path = write_config(tmp_path / "onetag.toml",
                                   settings_data(tmp_path, fake, only=("sendlane",), forward=False,
                                                 site={"order_source": "browser",
                                                       "identity_secret": IDENTITY_SECRET}))
        settings = config.load(config_path, env={})
        await backend_knows(settings, "a@example.com", "A-1")
        await store_events(settings, (SC_A, [{"event": "identify", "event_id": "id-a",
                                              "loaded": [], "user": {"email": "a@example.com",
                                                                     "signature": signed(
                                                                         "a@example.com")}},
                                             purchase("order-a", [])]))
        db = tmp_path / "onetag.db"
        assert states(db) == {"pending": 2}  # the server only stored them (forward = false)
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "worker", "--config", str(config_path), cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), **FORWARD_ENV},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await until(lambda: states(db) == {"delivered": 2}, what="the worker to deliver",
                        describe=lambda: states(db))
        finally:
            worker.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(worker.communicate(), 60)
        assert worker.returncode == 0, out.decode()
        assert "forwarding deliveries from" in out.decode()
        # One line says it stopped, and why (it ended without a word).
        stopped = [line for line in out.decode().splitlines() if "worker stopped" in line]
        assert len(stopped) == 1 and "SIGTERM" in stopped[0], out.decode()
        assert [r.path for r in fake.requests()] == ["/sendlane/tracking/customer-added",
                                                     "/sendlane/tracking/order-placed"]


def test_since_takes_relative_and_iso_times() -> None:
    now = 1_800_000_000.0
    assert parse_since("2h", now) == (now - 7200) * 1000
    assert parse_since("3d", now) == (now - 3 * 86400) * 1000
    assert parse_since("30m", now) == (now - 1800) * 1000
    assert parse_since("1w", now) == (now - 7 * 86400) * 1000
    assert parse_since("2026-01-31T14:00:00+00:00") == int(
        datetime(2026, 1, 31, 14, tzinfo=timezone.utc).timestamp() * 1000)
    assert parse_since("2026-01-31") == int(datetime(2026, 1, 31).astimezone().timestamp() * 1000)
    with pytest.raises(argparse.ArgumentTypeError, match="relative time"):
        parse_since("yesterday")


def test_bad_since_and_missing_database_are_reported(tmp_path) -> None:
    with FakeVendors() as fake:
        config_path = write_config(tmp_path / "onetag.toml", settings_data(tmp_path, fake))
    result = onetag("deliveries", "--config", str(config_path), cwd=tmp_path)
    assert result.returncode == 2 and "no database at" in result.stderr
    result = onetag("replay", "--config", str(config_path), "--since", "soon", cwd=tmp_path)
    assert result.returncode == 2 and "neither a relative time" in result.stderr


def test_format_report_aligns_columns() -> None:
    report = [{"vendor": "rejoiner", **dict.fromkeys(COLUMNS, 0), "delivered": 12345,
               "oldest_pending_age_s": None},
              {"vendor": "sendlane", **dict.fromkeys(COLUMNS, 0), "pending": 3,
               "oldest_pending_age_s": 3725.0}]
    lines = format_report(report).splitlines()
    assert len({len(line) for line in lines}) == 1  # one width: a readable table
    assert lines[2].split()[-1] == "1h02m" and lines[1].split()[-1] == "-"
    assert lines[3].split()[0] == "total" and lines[3].split()[4] == "12345"


async def test_ignored_rows_are_listed_with_their_reason(shop) -> None:
    tmp_path, config_path, _ = shop
    text = onetag("deliveries", "--config", str(config_path), "--state", "ignored", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "latest ignored deliveries:" in text.stdout
    assert "unverified: unsubscribe needs the backend or a verified identity" in text.stdout


async def test_one_delivery_by_id_shows_its_whole_last_error(shop) -> None:
    """docs/commands.md: ``--id`` shows the whole delivery; only the lists shorten a long
    last_error to a line."""
    tmp_path, config_path, _ = shop
    [row] = [r for r in rows(tmp_path / "onetag.db") if r["state"] == "ignored"][:1]
    long = ("skipped: Sendlane customer-added requires the platform's customer_id "
            "(user.customer_id); and so on, well past a hundred characters, to its very END")
    with sqlite3.connect(tmp_path / "onetag.db") as conn:
        conn.execute("UPDATE deliveries SET last_error = ? WHERE id = ?", (long, row["id"]))
    conn.close()
    one = onetag("deliveries", "--config", str(config_path), "--id", str(row["id"]), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert long in one.stdout and "…" not in one.stdout
    listed = onetag("deliveries", "--config", str(config_path), "--state", "ignored",
                    cwd=tmp_path)
    assert listed.returncode == 0 and long[:60] in listed.stdout and long not in listed.stdout


# Item 5: read-only commands without secrets, replay --dry-run / --id / --json, why rows wait.

def secrets_from_env(config_path) -> list[str]:
    """The shop's config with every secret as "env:NAME" (none of them set); the names."""
    text = config_path.read_text()
    names = []
    for value in (API_KEY, *SECRETS.values()):
        name = "ONETAG_TEST_UNSET_" + value.replace("-", "_")
        assert f'"{value}"' in text and name not in os.environ
        text = text.replace(f'"{value}"', f'"env:{name}"')
        names.append(name)
    config_path.write_text(text)
    return names


def db_rows(db) -> list[dict]:
    return sorted(rows(db), key=lambda r: r["id"])


async def test_read_only_commands_run_without_the_vendor_secrets(shop) -> None:
    tmp_path, config_path, _ = shop
    names = secrets_from_env(config_path)
    result = onetag("deliveries", "--config", str(config_path), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {r["vendor"]: {c: r[c] for c in COLUMNS} for r in report["vendors"]} == db_counts(
        tmp_path / "onetag.db")
    dry = onetag("replay", "--config", str(config_path), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 1 deliveries would be made due again (dead)" in dry.stdout
    # The commands that send, or vouch for the config, still need every secret.
    check = onetag("check", "--config", str(config_path), cwd=tmp_path)
    assert check.returncode == 2
    for name in names:
        assert f"environment variable {name} is not set" in check.stderr
    # A worker names the vendors' secrets it sends with, not the site's key (the nodes'):
    # docs/postgresql.md, "What each process needs".
    worker = onetag("worker", "--config", str(config_path), cwd=tmp_path)
    assert worker.returncode == 2
    assert all(name in worker.stderr for name in names[1:]) and names[0] not in worker.stderr


async def test_failing_and_pending_rows_say_why_they_wait(shop) -> None:
    tmp_path, config_path, settings = shop
    db = tmp_path / "onetag.db"
    by_id = {row["id"]: row for row in rows(db)}
    failing = [r for r in by_id.values() if r["state"] == "pending" and r["last_error"]]
    result = onetag("deliveries", "--config", str(config_path), "--state", "failing", "--json",
                    cwd=tmp_path, env={"ONETAG_FORWARD_MAX_ATTEMPTS": "8"})
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["rows"]
    assert [r["id"] for r in listed] == [r["id"] for r in failing] and len(failing) == 1
    [row] = listed
    due = datetime.fromtimestamp(failing[0]["next_attempt_ms"] / 1000, timezone.utc)
    assert row["why"] == f"retry 2 of 8 at {due:%H:%M:%S} UTC after HTTP 503"
    assert row["next_attempt_ms"] == failing[0]["next_attempt_ms"]

    # Lease one due row as a forwarder would, without finishing it: in flight.
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    await store.open()
    now = int(time.time() * 1000)
    [leased] = await store.claim(now, 45_000, 1, vendors=("sendlane",))
    await store.close()
    result = onetag("deliveries", "--config", str(config_path), "--state", "pending", "--json",
                    "--limit", "100", cwd=tmp_path)
    listed = {r["id"]: r for r in json.loads(result.stdout)["rows"]}
    pending = {i for i, r in by_id.items() if r["state"] == "pending"}
    assert set(listed) == pending  # failing rows are pending too
    for row_id, row in listed.items():
        stored = by_id[row_id]
        earlier = [r["id"] for r in by_id.values() if r["state"] == "pending" and r["id"] < row_id
                   and (r["site_id"], r["vendor"], r["visitor"]) == (
                       stored["site_id"], stored["vendor"], stored["visitor"])]
        if row_id == leased.id:
            until_ = datetime.fromtimestamp((now + 45_000) / 1000, timezone.utc)
            assert row["why"].startswith("in flight: attempt 1 of 20 claimed at ")
            assert row["why"].endswith(f"lease until {until_:%H:%M:%S} UTC")
        elif earlier:
            assert row["why"].startswith(f"waiting for the visitor's earlier row #{earlier[0]} ")
        elif stored["last_error"]:
            assert row["why"].startswith("retry 2 of 20 at ")
        else:
            assert row["why"].startswith("due now (since ")
    whys = [r["why"].split()[0] for r in listed.values()]
    assert {"in", "waiting", "retry", "due"} <= set(whys)  # the fixture has every kind
    text = onetag("deliveries", "--config", str(config_path), "--state", "pending",
                  cwd=tmp_path).stdout
    assert "waits: waiting for the visitor's earlier row #" in text
    assert "waits: retry 2 of 20 at " in text


def test_pending_reason_for_a_row_held_back_for_the_browser_copy() -> None:
    from server.cli import pending_reason

    now = 1_800_000_000_000
    row = {"next_attempt_ms": now + 600_000, "attempts": 0, "last_error": None,
           "updated_ms": now, "waits_for": None}
    when = datetime.fromtimestamp((now + 600_000) / 1000, timezone.utc)
    assert pending_reason(row, now, 20, 60_000) == (
        f"held back until {when:%H:%M:%S} UTC for the browser's own copy ([server] browser_grace_s)")
    row = {**row, "next_attempt_ms": now - 1000, "last_error": "connection refused",
           "attempts": 3}
    assert pending_reason(row, now, 20, 60_000).startswith(
        "retry 4 of 20 due now (since ") and row["last_error"] in pending_reason(row, now, 20, 1)


async def test_replay_dry_run_names_exactly_what_replay_then_does(shop) -> None:
    tmp_path, config_path, settings = shop
    db = tmp_path / "onetag.db"
    before = db_rows(db)
    args = ("--config", str(config_path), "--since", "1h", "--vendor", "sendlane", "--json")
    dry = onetag("replay", *args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True and planned["count"] == 1
    assert db_rows(db) == before  # nothing changed
    done = json.loads(onetag("replay", *args, cwd=tmp_path).stdout)
    assert done["dry_run"] is False
    assert done["count"] == planned["count"] and done["rows"] == planned["rows"]
    [dead] = [r for r in before if r["state"] == "dead"]
    assert [r["id"] for r in done["rows"]] == [dead["id"]]
    assert {r["id"]: r["state"] for r in db_rows(db)}[dead["id"]] == "pending"

    # Expired rows are planned again once the visitor has an email: the dry run counts them
    # by doing it in a savepoint it rolls back.
    await store_events(settings, (SC_C, [{"event": "identify", "event_id": "id-c",
                                          "loaded": [], "user": {"email": "c@example.com"}}]))
    expired = [r["id"] for r in db_rows(db) if r["state"] == "expired"]
    before = db_rows(db)
    dry = json.loads(onetag("replay", "--config", str(config_path), "--expired", "--dry-run",
                            "--json", cwd=tmp_path).stdout)
    assert db_rows(db) == before
    assert dry["count"] == len(expired) > 0
    assert sorted(i for r in dry["rows"] for i in r["replaces"]) == expired
    assert all(r["id"] is None for r in dry["rows"])  # new rows: not made by a dry run
    text = onetag("replay", "--config", str(config_path), "--expired", "--dry-run",
                  cwd=tmp_path).stdout
    assert f"dry run: {len(expired)} deliveries would be made due again (expired)" in text
    assert "planned again" in text
    done = json.loads(onetag("replay", "--config", str(config_path), "--expired", "--json",
                             cwd=tmp_path).stdout)
    assert done["count"] == dry["count"]
    strip = [{k: v for k, v in r.items() if k != "id"} for r in done["rows"]]
    assert strip == [{k: v for k, v in r.items() if k != "id"} for r in dry["rows"]]
    assert not [r for r in db_rows(db) if r["state"] == "expired"]


async def test_replay_one_delivery_by_id(shop) -> None:
    tmp_path, config_path, settings = shop
    db = tmp_path / "onetag.db"
    before = db_rows(db)
    by_state: dict[str, list[dict]] = {}
    for row in before:
        by_state.setdefault(row["state"], []).append(row)

    def replay_id(row_id: int, *extra: str) -> subprocess.CompletedProcess:
        return onetag("replay", "--config", str(config_path), "--id", str(row_id), *extra,
                      cwd=tmp_path)

    missing = replay_id(999_999)
    assert missing.returncode == 1 and "no delivery #999999 in " in missing.stderr
    refused = {"delivered": "onetag never sends a delivered delivery again",
               "pending": "is pending already: ",
               "held": "waits for the visitor's email",
               "browser": "the vendor's own library took it",
               "ignored": "planned but never sent on purpose (unverified: ",
               "expired": "the visitor still has none: nothing to send it with"}
    for state, message in refused.items():
        row = by_state[state][0]
        result = replay_id(row["id"])
        assert result.returncode == 1, (state, result.stdout)
        assert f"delivery #{row['id']} ({row['vendor']})" in result.stderr
        assert message in result.stderr, (state, result.stderr)
    assert db_rows(db) == before  # every refusal changed nothing
    assert onetag("replay", "--config", str(config_path), "--id", "1", "--dead",
                  cwd=tmp_path).returncode == 2

    [dead] = by_state["dead"]
    dry = replay_id(dead["id"], "--dry-run")
    assert dry.returncode == 0 and f"#{dead['id']}  sendlane" in dry.stdout
    assert db_rows(db) == before
    result = replay_id(dead["id"], "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["count"] == 1 and out["rows"][0]["id"] == dead["id"]
    assert out["rows"][0]["from_state"] == "dead"
    after = {r["id"]: r for r in db_rows(db)}
    assert (after[dead["id"]]["state"], after[dead["id"]]["attempts"]) == ("pending", 0)
    assert [r for r in db_rows(db) if r["id"] != dead["id"]] == [
        r for r in before if r["id"] != dead["id"]]

    # An expired row replays by id once its visitor has an email; only that one.
    await store_events(settings, (SC_C, [{"event": "identify", "event_id": "id-c",
                                          "loaded": [], "user": {"email": "c@example.com"}}]))
    expired = [r for r in db_rows(db) if r["state"] == "expired"]
    result = replay_id(expired[0]["id"], "--json")
    assert result.returncode == 0, result.stderr
    [made] = json.loads(result.stdout)["rows"]
    assert made["replaces"] == [expired[0]["id"]] and made["vendor"] == expired[0]["vendor"]
    assert [r["id"] for r in db_rows(db) if r["state"] == "expired"] == [
        r["id"] for r in expired[1:]]


def test_an_attempts_cut_answer_says_whether_its_whole_length_is_known() -> None:
    from server.cli import format_attempts
    base = {"attempt": 1, "started_ms": 0, "duration_ms": 5, "status": 500, "error": None,
            "request": {"method": "POST", "url": "https://vendor.example/x", "headers": {}}}
    longer = format_attempts([{**base, "answer": {"headers": {}, "body": "x", "truncated": True,
                                                  "length": 5000}}])
    assert "(truncated: 5000 characters in all)" in longer
    cut = format_attempts([{**base, "answer": {"headers": {}, "body": "x", "truncated": True,
                                               "length": 65536, "length_known": False}}])
    assert "(truncated: over 65536 characters; read no further)" in cut
