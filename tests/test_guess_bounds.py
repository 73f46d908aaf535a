"""Wrong secrets are bounded per client address across every node on one database and
across restarts: the console's login, the metrics token, the sites' api keys, feed tokens
and the Remarkety coupon key. Each node used to count in its own memory, so N nodes (or a
restart) gave an attacker N times the guesses; the feed token and the coupon key had no
bound at all."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import httpx

from console_support import ADMIN_TOKEN, SECRETS, console_settings, login
from server.admin import auth
from support import running

API = "/api/v1/sites/shop1/events"
EVENT = {"event": "identify", "user": {"email": "a@b.co"}}
FEED = "/feeds/shop1/products.xml"
COUPONS = "/remarkety/shop1/discounts"


@contextlib.asynccontextmanager
async def two_nodes(settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two apps (two `onetag serve` nodes) on one database, one client each, from the
    same address."""
    async with running(settings) as (_, one), running(settings) as (_, two):
        yield one, two


async def test_the_store_keeps_wrong_guesses_for_every_node_and_prunes_them(backend, tmp_path):
    settings = backend.settings(tmp_path)
    store = await backend.open(settings)
    try:
        assert await store.guess_failures("login", "10.0.0.1", 0) == []
        assert await store.guess_failed("login", "10.0.0.1", 1_000, 60_000) == [1_000]
        assert await store.guess_failed("login", "10.0.0.2", 2_000, 60_000) == [2_000]
        assert await store.guess_failed("api_key", "10.0.0.1", 3_000, 60_000) == [3_000]
        other = await backend.open(settings)  # another node on the same database
        try:
            assert await other.guess_failed("login", "10.0.0.1", 4_000, 60_000) == [1_000, 4_000]
            assert await other.guess_failures("login", "10.0.0.1", 0) == [1_000, 4_000]
            assert await other.guess_failures("login", "10.0.0.1", 1_000) == [4_000]
        finally:
            await other.close()
        # A minute on: the next wrong guess prunes its bound's rows that left the window.
        assert await store.guess_failed("login", "10.0.0.3", 62_000, 60_000) == [62_000]
        assert await backend.rows("SELECT scope, address, at_ms FROM guess_failures "
                                  "ORDER BY at_ms") == [
            ("api_key", "10.0.0.1", 3_000), ("login", "10.0.0.1", 4_000),
            ("login", "10.0.0.3", 62_000)]
        await store.guesses_cleared("login", "10.0.0.1")
        assert await store.guess_failures("login", "10.0.0.1", 0) == []
        assert await store.guess_failures("api_key", "10.0.0.1", 0) == [3_000]
    finally:
        await store.close()


async def test_console_logins_add_up_across_nodes(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with two_nodes(console_settings(tmp_path, database=backend.database)) as (one, two):
        for client in (one, one, one, two, two):
            assert (await login(client, token="guess")).status_code == 401
        for client in (one, two):  # both nodes refuse the address now, the right token too
            locked = await login(client, token=ADMIN_TOKEN)
            assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60


async def test_wrong_api_keys_add_up_across_nodes_and_outlive_a_restart(backend, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    settings = console_settings(tmp_path, database=backend.database)
    right = {"authorization": f"Bearer {SECRETS['site api_key']}"}
    async with two_nodes(settings) as (one, two):
        for n, client in enumerate((one, two, one, two)):
            wrong = await client.post(API, json=EVENT, headers={"authorization": f"Bearer g{n}"})
            assert wrong.status_code == 403
    async with running(settings) as (_, restarted):
        assert (await restarted.post(API, json=EVENT, headers={
            "authorization": "Bearer g4"})).status_code == 403
        locked = await restarted.post(API, json=EVENT, headers=right)
        assert locked.status_code == 429 and locked.json()["error"] == "too_many_requests"


async def test_wrong_metrics_tokens_add_up_across_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with two_nodes(console_settings(tmp_path)) as (one, two):
        for client in (one, two, one, two, one):
            wrong = await client.get("/metrics", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
        locked = await two.get("/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert locked.status_code == 429


async def test_wrong_feed_tokens_are_bounded_per_address(backend, tmp_path, monkeypatch):
    """A feed token could be guessed without limit (every wrong one a quick 403)."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    token = SECRETS["feed_token"]
    async with two_nodes(console_settings(tmp_path, database=backend.database)) as (one, two):
        for n, client in enumerate((one, two, one, two, one)):
            assert (await client.get(f"{FEED}?token=guess{n}")).status_code == 403
        for client in (one, two):
            locked = await client.get(f"{FEED}?token={token}")
            assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60
            assert locked.json()["errors"][0]["field"] == "token"
            assert token not in locked.text


async def test_wrong_coupon_keys_are_bounded_per_address(tmp_path, monkeypatch):
    """The Remarkety coupon key could be guessed without limit (every wrong one a quick
    403); a call without any key is not a guess."""
    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    key = SECRETS["coupons remarkety_api_key"]
    async with two_nodes(console_settings(tmp_path)) as (one, two):
        for n, client in enumerate((one, two, one, two, one)):
            wrong = await client.post(f"{COUPONS}?remarkety_api_key=guess{n}", json={})
            assert wrong.status_code == 403
        assert (await one.post(COUPONS, json={})).status_code == 401
        locked = await two.post(f"{COUPONS}?remarkety_api_key={key}", json={})
        assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60
        body = locked.json()
        assert body["is_success"] is False
        assert body["error_message"].startswith("remarkety_api_key: too many wrong keys")


def test_the_throttle_takes_the_larger_count_of_its_own_and_the_shared_one():
    throttle = auth.LoginThrottle(max_failures=3, window_s=60, delay_s=0)
    throttle.failed("a", now=10)
    throttle.merge("a", [1.0, 5.0, 10.0], now=11)  # two more by other nodes
    assert throttle.retry_after("a", now=12) == 49
    throttle.merge("a", [10.0], now=13)  # a stale answer never lowers what is counted here
    assert throttle.retry_after("a", now=14) == 47
    throttle.merge("a", [0.0, 1.0, 2.0], now=61)  # all outside the window
    assert throttle.retry_after("a", now=61) == 0


async def test_concurrent_guesses_on_one_node_get_no_more_than_the_bound(tmp_path, monkeypatch):
    """The database is asked before the compare; the last look is the process's own count,
    with no wait between it and counting the wrong key, so a burst can't slip past."""
    import asyncio

    monkeypatch.setattr(auth, "LOGIN_DELAY_S", 0)
    async with running(console_settings(tmp_path)) as (_, client):
        answers = await asyncio.gather(*(client.post(
            API, json=EVENT, headers={"authorization": f"Bearer g{n}"}) for n in range(20)))
    assert sorted(a.status_code for a in answers) == [403] * 5 + [429] * 15
