"""The nightly Sendlane product sync, through the outbox to the fake Sendlane (real HTTP).

The app takes events (its forwarder off); a forwarder of the test's own, with an injected
clock, runs the sync passes when the test says (``sync_products``) and sends what they plan.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import time
import uuid
from typing import Any

import httpx
import pytest
from hypothesis import given, settings, strategies as st

from fakes.harness import API_KEY, FAST, ORIGIN, SITE, make_settings, serve, until
from server import config, product_sync
from server.forwarder import Forwarder

URL = "https://shop.example/p/"
IMAGE = "https://shop.example/i/"
OPTIONS = dataclasses.replace(FAST, product_sync_every_s=0)  # passes only when the test says


def item(item_id: str, price: str = "10.00", full: bool = True, **extra: Any) -> dict:
    found = {"item_id": item_id, "item_name": f"Product {item_id}", "price": price, **extra}
    if full:
        found.update(item_url=URL + item_id, image_url=IMAGE + item_id)
    return found


def update(*items: dict) -> dict:
    return {"event": "product_updated", "event_id": str(uuid.uuid4()),
            "ecommerce": {"currency": "USD", "items": list(items)}}


class Clock:
    """Wall time moved to a chosen UTC time of day of a day after today, running on from
    there: always later than the real time the app stamps rows with, and never back."""

    def __init__(self, hour: int, minute: int = 0):
        tomorrow = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)
        self.base = dt.datetime(tomorrow.year, tomorrow.month, tomorrow.day,
                                tzinfo=dt.timezone.utc)
        self.offset = 0.0
        self.at(hour, minute)

    def at(self, hour: int, minute: int = 0, days: int = 0) -> None:
        target = self.base + dt.timedelta(days=days, hours=hour, minutes=minute)
        self.offset = target.timestamp() - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset


class Shop:
    def __init__(self, tmp_path: Any, fake: Any, clock: Clock, **site: Any):
        self.db = tmp_path / "onetag.db"
        self.fake = fake
        self.clock = clock
        self.settings = make_settings(tmp_path, fake, only=("sendlane",), forward=False,
                                      site=site or None)

    async def __aenter__(self) -> "Shop":
        self._serve = serve(self.settings)
        app = await self._serve.__aenter__()
        self.client = httpx.AsyncClient(base_url=app.state.base_url, timeout=30)
        self.forwarder = Forwarder(self.settings, app.state.store, OPTIONS, clock=self.clock)
        await self.forwarder.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.forwarder.stop()
        await self.client.aclose()
        await self._serve.__aexit__(*exc)

    async def backend(self, *events: dict) -> None:
        answer = await self.client.post(f"/api/v1/sites/{SITE}/events", json=list(events),
                                        headers={"Authorization": f"Bearer {API_KEY}"})
        assert answer.status_code == 202, answer.text

    async def browser(self, *events: dict) -> None:
        body = {"site_id": SITE, "events": [{"event_id": str(uuid.uuid4()), **e} for e in events]}
        answer = await self.client.post("/e", json=body, headers={"origin": ORIGIN})
        assert answer.status_code == 204, answer.text

    def products_sent(self) -> list[tuple[str, Any]]:
        return [(r.json["product_id"], r.json.get("item_price")) for r in self.fake.requests("sendlane")
                if r.path.endswith("/product-added")]

    async def settle(self, count: int) -> list[tuple[str, Any]]:
        """Wait until no Sendlane row is pending and ``count`` product-added arrived (a page's
        product view waits for an email: held)."""
        def done() -> bool:
            with sqlite3.connect(self.db) as db:
                waiting = db.execute("SELECT count(*) FROM deliveries WHERE vendor = 'sendlane' "
                                     "AND state = 'pending'").fetchone()[0]
            return waiting == 0 and len(self.products_sent()) >= count
        await until(done, what=f"{count} product-added delivered",
                    describe=lambda: self.products_sent())
        return self.products_sent()


@pytest.fixture
def clock() -> Clock:
    return Clock(1, 0)  # 01:00 UTC: before the default nightly time


async def test_each_changed_product_is_sent_once_and_not_again(tmp_path, fake, clock):
    async with Shop(tmp_path, fake, clock) as shop:
        assert (await shop.forwarder.sync_products()) == {"changes": 0, "nightly": 0}
        # Its own event carries the whole product: Sendlane gets it from the mapping, once.
        await shop.backend(update(item("P1")))
        await shop.backend(update(item("P2", "20.00")))
        assert await shop.settle(2) == [("P1", 10), ("P2", 20)]
        assert (await shop.forwarder.sync_products()) == {"changes": 0, "nightly": 0}
        # A price-only change (no URL or image in the event): the sync sends the product as
        # the backend knows it. P3 changes twice before the pass: one delivery, the last.
        await shop.backend(update(item("P2", "21.00", full=False)))
        await shop.backend(update(item("P3", "30.00")), update(item("P3", "31.00", full=False)))
        await shop.backend(update(item("P3", "32.00", full=False)))
        # Pages viewing and carting them change nothing Sendlane gets.
        for _ in range(3):
            await shop.browser({"event": "view_item", "ecommerce": {"currency": "USD", "items": [
                item("P2", "1.00", item_brand="Forged")]}})
        assert (await shop.settle(3))[2] == ("P3", 30)  # P3's first event carried it whole
        fake.clear()
        assert (await shop.forwarder.sync_products()) == {"changes": 2, "nightly": 0}
        sent = await shop.settle(2)
        assert sorted(sent) == [("P2", 21), ("P3", 32)]
        p2 = next(r.json for r in fake.requests("sendlane") if r.json["product_id"] == "P2")
        assert p2 == {"token": "SLTOKEN123", "product_id": "P2", "sku": "P2",
                      "product_name": "Product P2", "item_price": 21,
                      "product_url": URL + "P2", "image_url": IMAGE + "P2"}  # no "Forged" brand
        # The next tick: nothing new.
        assert (await shop.forwarder.sync_products()) == {"changes": 0, "nightly": 0}
        assert await shop.settle(2) == sent


async def test_every_product_goes_at_the_nightly_time_once_a_night(tmp_path, fake, clock):
    async with Shop(tmp_path, fake, clock) as shop:
        await shop.backend(update(*[item(f"P{n}", f"{n}.00") for n in range(1, 6)]))
        await shop.backend(update(item("NO-IMAGE", full=False, item_url=URL + "x")))
        await shop.backend(update(item("GONE")), update({"item_id": "GONE", "deleted": True}))
        await shop.browser({"event": "view_item", "ecommerce": {"currency": "USD",
                                                                "items": [item("PAGE-ONLY")]}})
        await shop.settle(6)  # P1..P5 and GONE, from their events
        await shop.forwarder.sync_products()
        fake.clear()
        clock.at(3, 0)  # the default product_sync_time
        assert (await shop.forwarder.sync_products())["nightly"] == 5
        assert sorted(p for p, _ in await shop.settle(5)) == ["P1", "P2", "P3", "P4", "P5"]
        # The same night again (a second pass, a restart): nothing.
        clock.at(3, 30)
        assert (await shop.forwarder.sync_products()) == {"changes": 0, "nightly": 0}
        # The next night: all of them again.
        fake.clear()
        clock.at(3, 1, days=1)
        assert (await shop.forwarder.sync_products())["nightly"] == 5
        assert len(await shop.settle(5)) == 5
        with sqlite3.connect(shop.db) as db:
            keys = [row[0] for row in db.execute(
                "SELECT dedup_key FROM deliveries WHERE dedup_key LIKE '%:night:%' "
                "AND dedup_key LIKE 'product-added:P1:%' ORDER BY id")]
        assert len(keys) == 2 and keys[0] != keys[1] and all(k.startswith("product-added:P1:v1:night:")
                                                             for k in keys)


async def test_a_sites_own_sync_time(tmp_path, fake):
    clock = Clock(4, 0)
    async with Shop(tmp_path, fake, clock, product_sync_time="05:30") as shop:
        await shop.backend(update(item("P1")))
        await shop.settle(1)
        await shop.forwarder.sync_products()
        assert (await shop.forwarder.sync_products())["nightly"] == 0  # 04:00: not yet
        clock.at(5, 31)
        assert (await shop.forwarder.sync_products())["nightly"] == 1


async def test_a_nightly_pass_larger_than_a_page(tmp_path, fake, clock, monkeypatch):
    monkeypatch.setattr(product_sync, "PAGE", 7)
    async with Shop(tmp_path, fake, clock) as shop:
        await shop.backend(update(*[item(f"P{n:02d}") for n in range(20)]))
        await shop.settle(20)
        fake.clear()
        clock.at(3, 5)
        assert (await shop.forwarder.sync_products()) == {"changes": 0, "nightly": 20}
        assert sorted(p for p, _ in await shop.settle(20)) == [f"P{n:02d}" for n in range(20)]


async def test_the_forwarder_runs_the_passes_by_itself(tmp_path, fake, clock, monkeypatch):
    monkeypatch.setattr("test_product_sync.OPTIONS",
                        dataclasses.replace(OPTIONS, product_sync_every_s=0.05))
    async with Shop(tmp_path, fake, clock) as shop:
        await shop.backend(update(item("P1")))
        await shop.settle(1)
        await shop.backend(update(item("P1", "11.00", full=False)))  # the pass sends it
        assert await shop.settle(2) == [("P1", 10), ("P1", 11)]


def test_no_sync_for_a_site_whose_route_is_off(tmp_path, fake):
    settings = make_settings(tmp_path, fake, only=("sendlane",),
                             routes={"sendlane": {"product_updated": "off"}})
    assert not product_sync.enabled(settings.sites[SITE])
    assert product_sync.enabled(make_settings(tmp_path, fake, only=("sendlane",)).sites[SITE])
    assert not product_sync.enabled(make_settings(tmp_path, fake, only=("remarkety",)).sites[SITE])


@pytest.mark.parametrize("now, minute, due", [
    ("2026-03-01T02:59:59", 180, None), ("2026-03-01T03:00:00", 180, "2026-03-01"),
    ("2026-03-01T23:59:00", 180, "2026-03-01"), ("2026-03-02T00:00:00", 0, "2026-03-02")])
def test_nightly_date(now, minute, due):
    at = dt.datetime.fromisoformat(now).replace(tzinfo=dt.timezone.utc)
    assert product_sync.nightly_date(int(at.timestamp() * 1000), minute) == due


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=8))
def test_product_sync_time_is_hh_mm_or_refused(text):
    minute = config.parse_sync_time(text)
    if minute is None:
        data = {"sites": [{"id": "s", "product_sync_time": text}]}
        with pytest.raises(config.ConfigError) as raised:
            config.parse(data, env={})
        assert "sites[s].product_sync_time" in str(raised.value)
    else:
        assert 0 <= minute < 1440 and text == f"{minute // 60:02d}:{minute % 60:02d}"


def test_config_keys():
    site = config.parse({"sites": [{"id": "s", "feed_token": "env:FT",
                                    "product_sync_time": "23:59"}]},
                        env={"FT": "t" * 20}).sites["s"]
    assert (site.feed_token, site.product_sync_minute) == ("t" * 20, 23 * 60 + 59)
    assert config.parse({"sites": [{"id": "s"}]}, env={}).sites["s"].product_sync_minute == 180
    with pytest.raises(config.ConfigError, match=r"sites\[s\]\.feed_token: must be at least 16"):
        config.parse({"sites": [{"id": "s", "feed_token": "short"}]}, env={})
