"""Attempt history over real HTTP: every try of a delivery kept with its request (minus
secrets) and the vendor's answer, after the row is delivered; pruned after
[server] keep_attempts_days; shown by `onetag deliveries --id N`."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys

import httpx
import pytest

from server import config, forwarder as forwarder_module
from server.forwarder import ANSWER_BODY_LIMIT, Forwarder
from server.store.base import Attempt, Outcome
from server.store.sqlite import SQLiteStore

from fakes.harness import (ALL, FAST, REPO, SECRETS, backend, make_settings, purchase, rows, serve,
                           settings_data, until, write_config)


def stored_attempts(db) -> list[dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM attempts ORDER BY id")]


def onetag(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONETAG_")}
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**env, "PYTHONPATH": str(REPO)})


async def test_three_failures_then_a_success_keep_four_attempts(tmp_path, fake) -> None:
    fake.fail("sendlane", 500, body='{"error":"boom"}')
    fake.fail("sendlane", 503, headers={"Retry-After": "1", "X-Request-Id": "req-503"})
    fake.hang("sendlane")  # the third try times out
    options = dataclasses.replace(FAST, read_timeout_s=1.0)
    db = tmp_path / "onetag.db"
    data = settings_data(tmp_path, fake, only=("sendlane",))
    async with serve(config.parse(data, env={}), options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001"))
        await until(lambda: rows(db) and rows(db)[0]["state"] == "delivered",
                    what="the order delivered", describe=lambda: rows(db))
    [row] = rows(db)
    assert (row["attempts"], row["last_error"]) == (4, None)  # last_error: latest only
    assert [r.answer for r in fake.requests("sendlane")] == ["500", "503", "hung", "200"]

    kept = stored_attempts(db)
    assert [a["delivery_id"] for a in kept] == [row["id"]] * 4
    assert [a["attempt"] for a in kept] == [1, 2, 3, 4]
    assert [a["status"] for a in kept] == [500, 503, None, 200]
    assert kept[2]["error"].startswith("timeout") and kept[2]["answer"] is None
    assert kept[2]["duration_ms"] >= 900  # the read timeout was 1 s
    assert all(a["duration_ms"] >= 0 for a in kept)
    assert [a["started_ms"] for a in kept] == sorted(a["started_ms"] for a in kept)
    answers = [json.loads(a["answer"]) if a["answer"] else None for a in kept]
    assert answers[0]["body"] == '{"error":"boom"}' and answers[0]["truncated"] is False
    assert answers[1]["headers"]["retry-after"] == "1"
    assert answers[1]["headers"]["x-request-id"] == "req-503"
    assert answers[1]["headers"]["content-type"] == "application/json"
    assert answers[3]["body"] == '{"status":"success"}'
    # The request as sent: the body the vendor got, byte for byte the same JSON.
    # The store's read path and the CLI show the same history.
    store = SQLiteStore(str(db), {})
    await store.open()
    try:
        history = await store.attempts(row["id"])
    finally:
        await store.close()
    assert [a["status"] for a in history] == [500, 503, None, 200]
    sent = fake.requests("sendlane")
    for attempt, request in zip(history, sent):
        stored = attempt["request"]
        assert stored["method"] == "POST" and stored["url"] == fake.url("sendlane") + request.path[
            len("/sendlane"):]
        assert stored["body"] == request.json and stored["body"]["order_id"] == "1001"
        assert stored["headers"]["content-type"] == "application/json"
        assert "authorization" not in {name.lower() for name in stored["headers"]}
    assert history[1]["answer"]["headers"]["retry-after"] == "1"

    cfg = write_config(tmp_path / "onetag.toml", {**data, "sites": [
        {**site, "sendlane": {k: v for k, v in site["sendlane"].items() if k != "api_token"}}
        for site in data["sites"]]})
    shown = onetag("deliveries", "--config", str(cfg), "--id", str(row["id"]), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "attempt 1" in shown.stdout and "HTTP 500" in shown.stdout
    assert "HTTP 503" in shown.stdout and "retry-after: 1" in shown.stdout
    assert "attempt 3" in shown.stdout and "timeout" in shown.stdout
    assert '"order_id": "1001"' in shown.stdout and '{"status":"success"}' in shown.stdout
    assert "delivered" in shown.stdout
    as_json = onetag("deliveries", "--config", str(cfg), "--attempts", str(row["id"]), "--json",
                     cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["delivery"]["state"] == "delivered"
    assert [a["status"] for a in out["attempts"]] == [500, 503, None, 200]
    missing = onetag("deliveries", "--config", str(cfg), "--id", "999", cwd=tmp_path)
    assert missing.returncode == 1 and "no delivery #999" in missing.stderr


async def test_no_attempt_holds_a_secret_and_long_answers_are_truncated(tmp_path, fake) -> None:
    long_body = "x" * (ANSWER_BODY_LIMIT * 3)
    for vendor in ALL:
        fake.fail(vendor, 500, body=long_body, headers={"X-Api-Key-Echo": SECRETS[vendor]})
    db = tmp_path / "onetag.db"
    async with serve(make_settings(tmp_path, fake), FAST) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("2002", sc="JIM-0000-CHECKOUT"))  # eSputnik's cookies.sc
        await until(lambda: rows(db) and all(r["state"] == "delivered" for r in rows(db)),
                    what="every vendor's delivery", describe=lambda: rows(db))
    # The vendors did get their credentials (added at send time, some base64-encoded) ...
    sent_credentials = {value for r in fake.requests() for name, value in r.headers.items()
                        if name in ("authorization", "x-token")}
    assert len(sent_credentials) == len(ALL)
    kept = stored_attempts(db)
    assert len(kept) == 2 * len(rows(db))
    # ... and none is kept, not even one the vendor echoed back in a header.
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    assert "INSERT INTO \"attempts\"" in dump
    for secret in [*SECRETS.values(), *sent_credentials]:
        assert secret not in dump
    failed = [json.loads(a["answer"]) for a in kept if a["status"] == 500]
    assert failed and all(a["truncated"] is True and a["body"] == "x" * ANSWER_BODY_LIMIT
                          and a["length"] == len(long_body) for a in failed)
    delivered = [json.loads(a["answer"]) for a in kept if a["status"] == 200]
    assert all(a["truncated"] is False for a in delivered)


def attempt(started_ms: int, n: int = 1) -> Attempt:
    return Attempt(n, started_ms, 5, {"method": "POST", "url": "http://x/", "headers": {},
                                     "body": {}}, 200, {"headers": {}, "body": "", "truncated": False})


async def test_pruning_removes_only_attempts_older_than_keep_attempts_days(
        tmp_path, fake, monkeypatch) -> None:
    data = settings_data(tmp_path, fake)
    data["server"]["keep_attempts_days"] = 2
    settings = config.parse(data, env={})
    assert settings.server.keep_attempts_days == 2.0
    day = 86_400_000
    now_ms = 1_800_000_000_000
    store = SQLiteStore(str(tmp_path / "onetag.db"), settings.sites)
    await store.open()
    try:
        old = [now_ms - 2 * day - 1 - i for i in range(25)]
        new = [now_ms - 2 * day + 1, now_ms - day, now_ms]
        await store.finish([Outcome(i + 1, "delivered", attempt=attempt(t))
                            for i, t in enumerate(old + new)], now_ms)
        monkeypatch.setattr(forwarder_module, "PRUNE_BATCH", 4)
        monkeypatch.setattr(forwarder_module, "PRUNE_BATCHES", 3)
        fwd = Forwarder(settings, store, FAST, clock=lambda: now_ms / 1000)
        # Bounded work per pass: 3 batches of 4, then the next passes take the rest.
        assert await fwd.prune_attempts() == 12
        assert await fwd.prune_attempts() == 12
        assert await fwd.prune_attempts() == 1
        assert await fwd.prune_attempts() == 0
        left = []
        for i in range(len(old + new)):
            left += [a["started_ms"] for a in await store.attempts(i + 1)]
        assert sorted(left) == sorted(new)
    finally:
        await store.close()


async def test_attempts_from_before_migration_013_are_labelled_in_bounded_passes(
        tmp_path, fake, monkeypatch) -> None:
    """The retention pass labels attempts without their delivery's site and vendor, newest
    first, at most PRUNE_BATCHES batches of PRUNE_BATCH a pass; an attempt whose delivery is
    gone is passed over, and once none is left a pass labels nothing."""
    settings = config.parse(settings_data(tmp_path, fake), env={})
    store = SQLiteStore(str(tmp_path / "onetag.db"), settings.sites)
    await store.open()
    try:
        with sqlite3.connect(tmp_path / "onetag.db") as db:
            db.executemany(
                "INSERT INTO deliveries (id, site_id, vendor, dedup_key, claim, event_seq, "
                "visitor, state, request, attempts, next_attempt_ms, created_ms, updated_ms) "
                "VALUES (?, 'shop1', ?, ?, 0, 1, 'v', 'delivered', '{}', 1, 0, 0, 0)",
                [(i, "sendlane" if i % 2 else "rejoiner", f"k{i}") for i in range(1, 26)])
            db.executemany(  # as written before migration 013: no site, no vendor
                "INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request) "
                "VALUES (?, 1, ?, 5, '{}')", [(i, 1000 + i) for i in [*range(1, 26), 99]])
        monkeypatch.setattr(forwarder_module, "PRUNE_BATCH", 4)
        monkeypatch.setattr(forwarder_module, "PRUNE_BATCHES", 3)
        fwd = Forwarder(settings, store, FAST)
        # Each pass looks at 12, newest first: the newest has no delivery and is looked at
        # again by every pass (a pass starts from the newest), never labelled.
        assert await fwd.label_attempts() == 11
        assert await fwd.label_attempts() == 11
        assert await fwd.label_attempts() == 3
        assert await fwd.label_attempts() == 0
        with sqlite3.connect(tmp_path / "onetag.db") as db:
            labels = db.execute("SELECT delivery_id, site_id, vendor FROM attempts").fetchall()
        assert ((3, "shop1", "sendlane") in labels and (4, "shop1", "rejoiner") in labels
                and (99, None, None) in labels)
        assert sum(1 for _, site, _ in labels if site is None) == 1
    finally:
        await store.close()


def test_keep_attempts_days_is_validated(tmp_path, fake) -> None:
    for bad in (0, -1, "ten", True):
        data = settings_data(tmp_path, fake)
        data["server"]["keep_attempts_days"] = bad
        with pytest.raises(config.ConfigError) as caught:
            config.parse(data, env={})
        assert "server.keep_attempts_days" in str(caught.value)
    assert config.parse(settings_data(tmp_path, fake), env={}).server.keep_attempts_days == 30.0


def test_redaction_of_credential_like_headers_and_query_parameters() -> None:
    assert forwarder_module.redact_headers(
        {"Authorization": "Bearer s", "X-Api-Key": "s", "api-token": "s", "Accept": "a"}) == {
        "Authorization": "[redacted]", "X-Api-Key": "[redacted]", "api-token": "[redacted]",
        "Accept": "a"}
    url = forwarder_module.redact_url("https://v.example/x?storeId=S&api_key=s&token=t")
    assert "storeId=S" in url and "=s" not in url and "=t" not in url


async def test_a_reset_connection_is_kept_as_an_attempt_with_its_error(tmp_path, fake) -> None:
    fake.reset("rejoiner")  # the first request opens a fresh connection: no silent resend
    db = tmp_path / "onetag.db"
    async with serve(make_settings(tmp_path, fake, only=("rejoiner",)), FAST) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("3003"))
        await until(lambda: rows(db) and all(r["state"] == "delivered" for r in rows(db)),
                    what="the rejoiner deliveries", describe=lambda: rows(db))
    assert [r.answer for r in fake.requests("rejoiner")][0] == "reset"
    kept = stored_attempts(db)
    assert len(kept) == len(fake.requests("rejoiner"))
    first = kept[0]
    assert first["status"] is None and first["answer"] is None and first["error"]
    store = SQLiteStore(str(db), {})
    await store.open()
    try:
        history = await store.attempts(first["delivery_id"])
    finally:
        await store.close()
    assert history[0]["error"] == first["error"]
    assert history[0]["request"]["body"] == fake.requests("rejoiner")[0].json
    assert all(a["status"] == 200 for a in kept[1:])
