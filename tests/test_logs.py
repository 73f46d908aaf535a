"""Logs (issue 13, item 4): timestamps and levels on every line, one JSON object a line with
``--log-format json``, and a request id from the HTTP request through the writer to the
forwarder's line for each delivery it planned."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.harness import (API_KEY, FORWARD_ENV, ORIGIN, REPO, SITE, FakeVendors,
                           free_port, healthz, make_settings, rows, serve, settings_data, until,
                           write_config)
from server import config, logs
from server.envelope import Problem
from server.store import open_store
from server.store.base import SessionInfo

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TEXT_LINE = re.compile(rf"^{ISO_MS.pattern} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
GENERATED = re.compile(r"[0-9a-f]{16}")


def purchase(order: str, email: str = "jim@example.com") -> dict:
    return {"event": "purchase", "event_id": f"order-{order}", "user": {"email": email},
            "ecommerce": {"transaction_id": order, "value": "29.99", "currency": "USD",
                          "items": [{"item_id": "SKU-1", "item_name": "Item", "price": "29.99",
                                     "quantity": 1}]}}


# Request ids and formatting ---------------------------------------------------------------

@pytest.mark.parametrize("given", ["abc-123", "5f0c6f3e-8e1b-4c55-9a5e-2f0d7c1b9e44",
                                   "Root=1-67891233-abcdef012345678912345678", "a" * 64])
def test_a_well_formed_request_id_is_kept(given: str) -> None:
    assert logs.request_id(given) == given
    assert logs.request_id(given.encode()) == given


@pytest.mark.parametrize("given", [None, "", "a" * 65, "two words", "line\nbreak", "\"quoted\"",
                                   "<script>", "é", "-leading-dash", "x;y"])
def test_a_missing_or_malformed_request_id_is_replaced(given: str | None) -> None:
    made = logs.request_id(given)
    assert GENERATED.fullmatch(made) and made != given
    assert logs.request_id(given) != made  # a new one each time


def _record(name: str = "onetag.forwarder", msg: str = "delivery %d sent", args: Any = (7,),
            **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_time_level_logger_message_and_the_extra_fields() -> None:
    formatter = logs.JsonFormatter()
    line = json.loads(formatter.format(_record(vendor="sendlane", delivery_id=7, status=500,
                                               request_id="req-1")))
    assert ISO_MS.fullmatch(line["time"])
    assert line | {"time": None} == {"time": None, "level": "INFO", "logger": "onetag.forwarder",
                                     "message": "delivery 7 sent", "vendor": "sendlane",
                                     "delivery_id": 7, "status": 500, "request_id": "req-1"}
    # The request being handled names itself on lines that don't say.
    token = logs.REQUEST_ID.set("from-context")
    try:
        assert json.loads(formatter.format(_record()))["request_id"] == "from-context"
        assert json.loads(formatter.format(_record(request_id="own")))["request_id"] == "own"
    finally:
        logs.REQUEST_ID.reset(token)
    assert "request_id" not in json.loads(formatter.format(_record()))
    # uvicorn's access line: its values as fields.
    access = json.loads(formatter.format(_record(
        "uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5000", "POST", "/e", "1.1", 204))))
    assert access["message"] == '127.0.0.1:5000 - "POST /e HTTP/1.1" 204'
    assert (access["method"], access["path"], access["status"]) == ("POST", "/e", 204)
    # An exception is kept in the one line.
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record()
        record.exc_info = sys.exc_info()
    failed = formatter.format(record)
    assert "\n" not in failed and "ValueError: boom" in json.loads(failed)["exception"]


def test_text_lines_start_with_a_utc_timestamp_and_the_level() -> None:
    text = logs.TextFormatter().format(_record(vendor="sendlane", request_id="req-1",
                                               error="HTTP 500: oops"))
    assert TEXT_LINE.match(text), text
    assert text.endswith('delivery 7 sent vendor=sendlane request_id=req-1 error="HTTP 500: oops"')
    assert logs.timestamp(0.5) == "1970-01-01T00:00:00.500Z"


def test_log_format_in_the_config() -> None:
    site = {"id": "s", "origins": ["https://a.example"]}
    assert config.parse({"sites": [site]}, env={}).server.log_format == "text"
    assert config.parse({"server": {"log_format": "json"}, "sites": [site]},
                        env={}).server.log_format == "json"
    with pytest.raises(config.ConfigError) as failed:
        config.parse({"server": {"log_format": "xml"}, "sites": [site]}, env={})
    assert "server.log_format" in str(failed.value) and "'xml'" in str(failed.value)


# Through the store ----------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_request_failing_in_the_writer_is_logged_with_its_request_id(
        tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.ENV_FORMAT, "json")  # what `onetag serve --log-format json` sets
    with FakeVendors() as fake:
        settings = make_settings(tmp_path, fake)
    store = open_store(settings, writer)
    await store.open()
    try:
        caplog.set_level(logging.ERROR, logger="onetag.store")
        broken = {"event": "page_view"}  # not normalised: the writer fails on it
        answer = await store.ingest(SITE, [broken], [broken], SessionInfo(), "req-broken")
        assert isinstance(answer, Problem) and answer.status == 422
    finally:
        await store.close()
    if writer == "thread":  # in this process
        [line] = [r for r in caplog.records if "failed alone" in r.getMessage()]
        assert line.request_id == "req-broken" and line.levelno == logging.ERROR
    else:  # the writer process: JSON lines on the server's stderr
        printed = [json.loads(line) for line in capfd.readouterr().err.splitlines()
                   if line.startswith("{")]
        [line] = [p for p in printed if "failed alone" in p["message"]]
        assert line["request_id"] == "req-broken" and line["level"] == "ERROR"
        assert line["logger"] == "onetag.store" and "KeyError" in line["message"]


# Over HTTP (the app under uvicorn in this process) ----------------------------------------

async def test_every_answer_of_post_e_and_the_backend_api_names_its_request_id(
        tmp_path: Path) -> None:
    with FakeVendors() as fake:
        settings = make_settings(tmp_path, fake, only=("sendlane",))
        async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
            beacon = json.dumps({"site_id": SITE, "sc": "LOGS-SESSION-0001", "events": [
                {"event": "add_to_cart", "event_id": "pv-1", "user": {"email": "ann@example.com"},
                 "ecommerce": {"currency": "USD", "items": [{"item_id": "SKU-1",
                                                              "item_name": "Item", "price": "5",
                                                              "quantity": 1}]}}]})
            browser = {"content-type": "text/plain", "origin": ORIGIN}
            kept = await client.post("/e", content=beacon,
                                     headers={**browser, "X-Request-Id": "page-req-1"})
            assert kept.status_code == 204 and kept.headers["x-request-id"] == "page-req-1"
            made = await client.post("/e", content=beacon, headers=browser)
            assert made.status_code == 204 and GENERATED.fullmatch(made.headers["x-request-id"])
            bad = await client.post("/e", content=beacon,
                                    headers={**browser, "X-Request-Id": "no good\tid"})
            assert bad.status_code == 204 and GENERATED.fullmatch(bad.headers["x-request-id"])
            refused = await client.post("/e", content=beacon, headers={
                "content-type": "image/png", "origin": ORIGIN, "X-Request-Id": "refused-1"})
            assert refused.status_code == 415 and refused.headers["x-request-id"] == "refused-1"
            invalid = await client.post("/e", content=b"{not json", headers={
                **browser, "X-Request-Id": "invalid-1"})
            assert invalid.status_code == 400 and invalid.headers["x-request-id"] == "invalid-1"

            api = f"/api/v1/sites/{SITE}/events"
            auth = {"Authorization": f"Bearer {API_KEY}"}
            order = await client.post(api, json=purchase("L1"),
                                      headers={**auth, "X-Request-Id": "order-req-1"})
            assert order.status_code == 202 and order.headers["x-request-id"] == "order-req-1"
            anonymous = await client.post(api, json=purchase("L2"),
                                          headers={"X-Request-Id": "x" * 65})
            assert anonymous.status_code == 401
            assert GENERATED.fullmatch(anonymous.headers["x-request-id"])
            wrong = await client.post(api, json={"event": "purchase"},
                                      headers={**auth, "X-Request-Id": "wrong-1"})
            assert wrong.status_code == 422 and wrong.headers["x-request-id"] == "wrong-1"
        db = tmp_path / "onetag.db"
        # The deliveries each request planned record it.
        order_rows = rows(db, "e.event_id = 'order-L1'")
        assert order_rows and {r["request_id"] for r in order_rows} == {"order-req-1"}
        page_rows = rows(db, "e.event_id = 'pv-1'")
        assert page_rows and {r["request_id"] for r in page_rows} == {"page-req-1"}


async def test_retries_recoveries_and_replays_are_logged_at_info(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="onetag")
    with FakeVendors() as fake:
        settings = make_settings(tmp_path, fake, only=("sendlane",))
        db = tmp_path / "onetag.db"
        async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
            auth = {"Authorization": f"Bearer {API_KEY}"}
            api = f"/api/v1/sites/{SITE}/events"
            fake.fail("sendlane", 503)  # once: a retry, then a success after it
            answer = await client.post(api, json=purchase("R1"),
                                       headers={**auth, "X-Request-Id": "retry-req"})
            assert answer.status_code == 202
            await until(lambda: [r["state"] for r in rows(db)] == ["delivered"],
                        what="delivered after one retry", describe=lambda: rows(db))
            fake.fail("sendlane", 400)  # permanent: dead at once, then replayed
            answer = await client.post(api, json=purchase("R2"),
                                       headers={**auth, "X-Request-Id": "replay-req"})
            await until(lambda: rows(db, "e.event_id = 'order-R2'")[0]["state"] == "dead",
                        what="dead", describe=lambda: rows(db))
            assert await app.state.store.replay(int(time.time() * 1000) + 1) == 1
            app.state.forwarder.wake()
            await until(lambda: rows(db, "e.event_id = 'order-R2'")[0]["state"] == "delivered",
                        what="delivered after the replay", describe=lambda: rows(db))
            await until(lambda: any("after a replay" in r.getMessage() for r in caplog.records),
                        what="the replayed delivery's log line")
    mine = [r for r in caplog.records if r.name == "onetag.forwarder" and hasattr(r, "delivery_id")]
    [retry] = [r for r in mine if r.request_id == "retry-req" and r.state == "pending"]
    assert retry.levelno == logging.INFO and "retrying" in retry.getMessage()
    assert (retry.vendor, retry.attempt, retry.status) == ("sendlane", 1, 503)
    [recovered] = [r for r in mine if r.request_id == "retry-req" and r.state == "delivered"]
    assert recovered.levelno == logging.INFO and "after 2 attempts" in recovered.getMessage()
    assert (recovered.attempt, recovered.status, recovered.delivery_id) == (2, 200,
                                                                            retry.delivery_id)
    [dead] = [r for r in mine if r.request_id == "replay-req" and r.state == "dead"]
    assert dead.levelno == logging.WARNING and dead.status == 400
    [replayed] = [r for r in mine if r.request_id == "replay-req" and r.state == "delivered"]
    assert replayed.levelno == logging.INFO and replayed.replayed and replayed.attempt == 1
    [count] = [r for r in caplog.records if r.getMessage().startswith("replayed 1 deliveries (dead; ")]
    assert count.levelno == logging.INFO and count.name == "onetag.store"


# A real `onetag serve` ---------------------------------------------------------------------

def _serve(tmp_path: Path, fake: FakeVendors, log_format: str | None,
           config_format: str | None) -> tuple[subprocess.Popen, int, Path, Path]:
    port = free_port()
    data = settings_data(tmp_path, fake, only=("sendlane",), port=port)
    if config_format is not None:
        data["server"]["log_format"] = config_format
    if log_format == "json":  # a port mismatch: serve's warning comes as a JSON line too
        data["server"]["public_url"] = f"http://127.0.0.1:{port + 1}"
    config_path = write_config(tmp_path / "onetag.toml", data)
    argv = [sys.executable, "-m", "server", "serve", "--config", str(config_path),
            "--port", str(port), "--log-level", "info"]
    if log_format is not None:
        argv += ["--log-format", log_format]
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **FORWARD_ENV}
    env.pop(logs.ENV_FORMAT, None)
    env.pop(logs.ENV_LEVEL, None)
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL)
    return proc, port, config_path, err


def _wait(what: str, check: Any, proc: subprocess.Popen, err: Path, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen (server exit {proc.poll()}):\n"
                                 f"{err.read_text()[-4000:]}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("log_format,config_format", [("json", None), (None, "text")])
def test_a_request_id_followed_from_the_http_request_to_the_vendor_in_the_log(
        tmp_path: Path, log_format: str | None, config_format: str | None) -> None:
    """``onetag serve`` with a vendor failing once: its log shows the order's request from
    the access line to the retry and the success after it, under one request id."""
    as_json = log_format == "json"
    with FakeVendors() as fake:
        fake.fail("sendlane", 500)
        proc, port, config_path, err = _serve(tmp_path, fake, log_format, config_format)
        try:
            base = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                return healthz(base) is not None
            _wait("/healthz answering 200", healthy, proc, err)
            answer = httpx.post(f"{base}/api/v1/sites/{SITE}/events", json=purchase("J1"),
                                headers={"Authorization": f"Bearer {API_KEY}",
                                         "X-Request-Id": "shop-req-42"})
            assert answer.status_code == 202 and answer.headers["x-request-id"] == "shop-req-42"

            def lines() -> list[Any]:
                text = err.read_text(encoding="utf-8")
                complete = text[:text.rfind("\n") + 1]
                return [json.loads(line) if as_json else line
                        for line in complete.splitlines() if line]

            def about_delivery() -> list[Any]:
                found = [line for line in lines() if "(after 2 attempts)" in str(line)]
                return found and lines()
            every = _wait("the success after the failure", about_delivery, proc, err)
            listed = subprocess.run(
                [sys.executable, "-m", "server", "deliveries", "--config", str(config_path),
                 "--json", "--state", "delivered"], cwd=tmp_path, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
            assert listed.returncode == 0, listed.stderr
        finally:
            proc.terminate()
            proc.wait(30)
    [row] = json.loads(listed.stdout)["rows"]
    assert row["vendor"] == "sendlane" and row["request_id"] == "shop-req-42"

    if as_json:
        for line in every:  # every line on stderr is one object with the four fields
            assert ISO_MS.fullmatch(line["time"]) and line["level"] and line["logger"], line
            assert "message" in line
        assert any(line["logger"] == "uvicorn.error" for line in every)  # uvicorn's own lines
        assert not any(line["logger"].startswith("http") for line in every)  # vendor URLs
        [warning] = [line for line in every if line["level"] == "WARNING"]
        assert warning["logger"] == "onetag" and "public_url" in warning["message"]
        [access] = [line for line in every if line["logger"] == "uvicorn.access"
                    and line.get("path") == f"/api/v1/sites/{SITE}/events"]
        assert access["request_id"] == "shop-req-42" and access["status"] == 202
        forwarder = [line for line in every if line.get("request_id") == "shop-req-42"
                     and line["logger"] == "onetag.forwarder"]
        [retry] = [line for line in forwarder if line["state"] == "pending"]
        assert retry["level"] == "INFO" and "retrying" in retry["message"]
        assert (retry["vendor"], retry["attempt"], retry["status"], retry["site"]) == (
            "sendlane", 1, 500, SITE)
        [success] = [line for line in forwarder if line["state"] == "delivered"]
        assert success["level"] == "INFO" and success["status"] == 200
        assert success["attempt"] == 2 and success["delivery_id"] == row["id"] == retry["delivery_id"]
    else:
        assert every and all(TEXT_LINE.match(line) for line in every if not line.startswith(" ")), \
            every
        assert any("uvicorn.error: Uvicorn running on" in line for line in every)
        [retry] = [line for line in every if "retrying" in line]
        assert " INFO onetag.forwarder: " in retry and "request_id=shop-req-42" in retry
        assert "status=500" in retry and "attempt=1" in retry
        [success] = [line for line in every if "delivered (after 2 attempts)" in line]
        assert "request_id=shop-req-42" in success and "status=200" in success
        access = [line for line in every if "uvicorn.access" in line and "/api/v1/" in line]
        assert access and "request_id=shop-req-42" in access[0]
