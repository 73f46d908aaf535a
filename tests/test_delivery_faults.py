"""Vendors misbehaving, over real HTTP: 500s, 429 with Retry-After, timeouts, reset
connections, permanent 4xx, a vendor down for good, and the server killed mid-delivery."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import signal
import sys
import time
from collections import Counter

import httpx
import pytest

from server import config

from fakes.harness import (API_KEY, FAST, REPO, SITE, backend, free_port, make_settings, purchase,
                           rows, server_process, serve, settings_data, states, until, wait_sync,
                           write_config)


async def send_order(tmp_path, fake, vendor: str, options=FAST, order: str = "1001") -> list:
    """One backend order to one vendor; returns its delivery row once it is decided."""
    db = tmp_path / "onetag.db"
    async with serve(make_settings(tmp_path, fake, only=(vendor,)), options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase(order, sc="JIM-0000-CHECKOUT"))  # eSputnik's cookies.sc
        await until(lambda: rows(db) and rows(db)[0]["state"] in ("delivered", "dead"),
                    what=f"the {vendor} delivery to be decided", describe=lambda: rows(db))
    return rows(db)


async def test_a_500_is_retried_and_the_order_delivered_once(tmp_path, fake) -> None:
    fake.fail("sendlane", 500)
    [row] = await send_order(tmp_path, fake, "sendlane")
    assert (row["state"], row["attempts"], row["last_error"]) == ("delivered", 2, None)
    sent = fake.requests("sendlane")
    assert [r.answer for r in sent] == ["500", "200"]
    assert sent[0].json == sent[1].json and sent[1].json["order_id"] == "1001"


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_429_retry_after_is_honoured_for_the_whole_lane(tmp_path, fake, form) -> None:
    wait = 2
    value = str(wait) if form == "seconds" else email.utils.formatdate(time.time() + wait + 1,
                                                                       usegmt=True)
    fake.fail("remarkety", 429, headers={"Retry-After": value})
    options = dataclasses.replace(FAST, concurrency=1)  # one at a time: the order is clear
    db = tmp_path / "onetag.db"
    async with serve(make_settings(tmp_path, fake, only=("remarkety",)), options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001", "a@example.com"), purchase("1002", "b@example.com"))
        await until(lambda: states(db) == {"delivered": 2}, what="both orders",
                    describe=lambda: rows(db))
    sent = fake.requests("remarkety")
    assert sent[0].answer == "429"
    not_before = (sent[0].received + wait if form == "seconds"
                  else email.utils.parsedate_to_datetime(value).timestamp())
    # Nothing more went to Remarkety before the time it named: not the retry, not the others.
    assert all(r.received >= not_before for r in sent[1:])
    assert Counter(r.answer for r in sent) == {"429": 1, "200": 2}


async def test_a_timeout_is_retried(tmp_path, fake) -> None:
    fake.hang("esputnik")
    options = dataclasses.replace(FAST, read_timeout_s=1.0)
    [row] = await send_order(tmp_path, fake, "esputnik", options)
    assert (row["state"], row["attempts"]) == ("delivered", 2)
    assert [r.answer for r in fake.requests()] == ["hung", "200"]


async def test_a_reset_connection_is_retried(tmp_path, fake) -> None:
    fake.reset("rejoiner", times=2)
    [row] = await send_order(tmp_path, fake, "rejoiner")
    assert (row["state"], row["attempts"]) == ("delivered", 3)
    assert [r.answer for r in fake.requests()] == ["reset", "reset", "200"]
    assert len({json.dumps(r.json, sort_keys=True) for r in fake.requests()}) == 1


async def test_an_unreachable_vendor_is_retried_then_dead(tmp_path, fake) -> None:
    data = settings_data(tmp_path, fake, only=("sendlane",))
    data["sites"][0]["sendlane"]["api_base"] = f"http://127.0.0.1:{free_port()}/v2"  # refused
    options = dataclasses.replace(FAST, max_attempts=2)
    db = tmp_path / "onetag.db"
    async with serve(config.parse(data, env={}), options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001"))
        [row] = await until(lambda: rows(db, "state = 'dead'"), what="the row to die",
                            describe=lambda: rows(db))
    assert row["attempts"] == 2
    assert row["last_error"].startswith("gave up after 2 attempts; last: ConnectError")


async def test_invalid_data_is_dead_at_once_with_the_vendors_reason(tmp_path, fake) -> None:
    reason = '{"data":{"message":"The given data was invalid.","errors":{"email":["invalid"]}}}'
    fake.fail("sendlane", 422, body=reason)
    [row] = await send_order(tmp_path, fake, "sendlane")
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["last_error"] == f"HTTP 422: {reason}"
    assert len(fake.requests()) == 1


async def test_sendlane_blocked_403_is_temporary(tmp_path, fake) -> None:
    fake.fail("sendlane", 403, times=2)
    [row] = await send_order(tmp_path, fake, "sendlane")
    assert (row["state"], row["attempts"]) == ("delivered", 3)


async def test_attempt_limit_then_dead_then_replay_delivers(tmp_path, fake) -> None:
    fake.fail("sendlane", 500, times=None)
    options = dataclasses.replace(FAST, max_attempts=3)
    config_path = write_config(tmp_path / "onetag.toml",
                               settings_data(tmp_path, fake, only=("sendlane",)))
    settings = config.load(config_path, env={})
    db = tmp_path / "onetag.db"
    async with serve(settings, options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, purchase("1001"))
        [dead] = await until(lambda: rows(db, "state = 'dead'"), what="the row to die",
                             describe=lambda: rows(db))
        assert dead["attempts"] == 3 and dead["last_error"].startswith("gave up after 3 attempts")
        assert [r.answer for r in fake.requests()] == ["500"] * 3
        fake.heal()
        # The operator's command, beside the live server, on the same database.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "replay", "--config", str(config_path), "--dead",
            cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "1 deliveries made due again" in out.decode()
        [row] = await until(lambda: rows(db, "state = 'delivered'"), what="the replayed row",
                            describe=lambda: rows(db))
    assert row["attempts"] == 1 and row["last_error"] is None
    assert [r.answer for r in fake.requests()] == ["500"] * 3 + ["200"]


async def test_one_vendor_timing_out_never_holds_up_the_others(tmp_path, fake) -> None:
    fake.hang("esputnik", times=None)  # eSputnik accepts connections and never answers
    options = dataclasses.replace(FAST, concurrency=2, read_timeout_s=120.0)
    db = tmp_path / "onetag.db"
    orders = 15
    async with serve(make_settings(tmp_path, fake), options) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        # Each buyer's own checkout sc (eSputnik requires cookies.sc).
        await backend(client, *(purchase(f"{n}", f"buyer{n}@example.com", sc=f"BUYER-{n:04d}")
                                for n in range(orders)))
        # Each eSputnik request would hold its slot for 120 s: if the others waited on it, this
        # could not finish within the deadline.
        await until(lambda: len(rows(db, "vendor != 'esputnik' AND state = 'delivered'"))
                    == 3 * orders, timeout=60, what="the other vendors to deliver",
                    describe=lambda: states(db))
        assert rows(db, "vendor = 'esputnik' AND state = 'delivered'") == []
        assert fake.in_flight["esputnik"] == 2 and fake.max_in_flight["esputnik"] == 2
        fake.release()
        await until(lambda: states(db) == {"delivered": 4 * orders}, timeout=60,
                    what="eSputnik to catch up", describe=lambda: states(db))


def test_kill_9_mid_delivery_loses_nothing_and_repeats_only_the_leased(tmp_path, fake) -> None:
    """The server dies (SIGKILL) while Sendlane holds requests open; a new server on the same
    database delivers everything: each acknowledged order reaches each vendor, the only repeats
    are the requests that were in flight at the kill, and they carry the same order id."""
    orders = 20
    port = free_port()
    config_path = write_config(tmp_path / "onetag.toml",
                               settings_data(tmp_path, fake, only=("rejoiner", "sendlane"),
                                             port=port))
    db = tmp_path / "onetag.db"
    env = {"ONETAG_FORWARD_LEASE_S": "2", "ONETAG_FORWARD_CONCURRENCY": "8"}
    fake.hang("sendlane", times=None)
    with server_process(config_path, port, env, log=tmp_path / "serve-1.log") as proc:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for n in range(orders):  # each 202 means durably stored
                answer = client.post(f"/api/v1/sites/{SITE}/events",
                                     json=purchase(f"{n}", f"buyer{n}@example.com"),
                                     headers={"Authorization": f"Bearer {API_KEY}"})
                assert answer.status_code == 202, answer.text
        wait_sync(lambda: len(rows(db, "vendor = 'rejoiner' AND state = 'delivered'")) == orders,
                  what="rejoiner deliveries", describe=lambda: states(db))
        wait_sync(lambda: len(fake.requests("sendlane", answer="hung")) == 8,
                  what="8 sendlane sends held open")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    in_flight_at_kill = {r.json["order_id"] for r in fake.requests("sendlane")}
    assert len(in_flight_at_kill) == 8
    assert states(db) == {"delivered": orders, "pending": orders}  # nothing acknowledged lost
    fake.heal()
    with server_process(config_path, port, env, log=tmp_path / "serve-2.log"):
        wait_sync(lambda: states(db) == {"delivered": 2 * orders}, timeout=60,
                  what="everything delivered after the restart", describe=lambda: states(db))
    for vendor in ("rejoiner", "sendlane"):
        key = "order_number" if vendor == "rejoiner" else "order_id"
        def order_of(r):
            return r.json["cart_data"][key] if vendor == "rejoiner" else r.json[key]
        delivered = Counter(order_of(r) for r in fake.delivered(vendor))
        assert delivered == {f"{n}": 1 for n in range(orders)}, vendor  # each once, acknowledged
    sent = Counter(r.json["order_id"] for r in fake.requests("sendlane"))
    repeated = {order for order, count in sent.items() if count > 1}
    assert repeated == in_flight_at_kill  # only the leased-at-kill ones, same natural key
    for order in repeated:
        bodies = [r.json for r in fake.requests("sendlane") if r.json["order_id"] == order]
        assert bodies[0] == bodies[1]
    assert len(fake.requests("rejoiner")) == orders  # delivered before the kill: never again


async def test_rejoiner_profile_for_an_unknown_customer_is_created_after_a_404(tmp_path, fake) -> None:
    """REFERENCE.md 6: update by email with PUT customers/{email}/, create with POST
    customers/ when Rejoiner has no such customer (404) — in the same delivery."""
    fake.fail("rejoiner/RJSITE1/customers/new%40example.com", 404)
    db = tmp_path / "onetag.db"
    async with serve(make_settings(tmp_path, fake, only=("rejoiner",)), FAST) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, {"event": "identify",
                               "user": {"email": "new@example.com", "first_name": "Nia"}})
        await until(lambda: states(db) == {"delivered": 1}, what="the profile delivery",
                    describe=lambda: rows(db))
    sent = fake.requests("rejoiner")
    assert [(r.method, r.path, r.answer) for r in sent] == [
        ("PUT", "/rejoiner/RJSITE1/customers/new%40example.com/", "404"),
        ("POST", "/rejoiner/RJSITE1/customers/", "200")]
    assert sent[1].json == {"email": "new@example.com", "first_name": "Nia"}
    assert sent[1].headers["authorization"].startswith("Rejoiner ")
    assert rows(db)[0]["attempts"] == 1
