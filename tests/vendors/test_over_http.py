"""Issue 12's fixes end to end: the real app, a real SQLite file and the fake vendors over
loopback. One eSputnik cart GUID from the browser's event to the server's StatusCart and
PurchasedItems; Remarkety retried on any non-2xx, a refused key named in `onetag deliveries`;
ignored rows carrying their reason."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import httpx
import pytest

from server import cli, config

from fakes.harness import (ORIGIN, SC, SITE, backend, browser, item, rows, serve,
                           settings_data, until, write_config)

GUID_X = "0F8FAD5B-D9CB-469F-A165-70867728950E"


def stored_cart_guid(db) -> str | None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT cart_guid FROM sessions WHERE sc = ?", (SC,)).fetchone()[0]


async def settled(db) -> None:
    await until(lambda: not rows(db, "d.state = 'pending'"), what="deliveries to settle",
                describe=lambda: rows(db, "d.state = 'pending'"))


async def test_the_browsers_cart_guid_is_the_one_both_paths_quote(tmp_path, fake) -> None:
    """ES REST StatusCart GUID: "Should be identical to the GUID of the PurchasedItems event".
    eS.js is blocked here (``loaded: []``), so the server sends both, under the GUID the
    browser used."""
    # The browser's purchase goes server-side: a site whose orders come from the browser
    # (order_source = "browser"; with "backend" only the backend API's orders are sent).
    settings = config.parse(settings_data(tmp_path, fake, only=("esputnik",),
                                          site={"order_source": "browser"}), env={})
    db = tmp_path / "onetag.db"
    add = {"event": "add_to_cart", "event_id": "a-1", "loaded": [], "cart_guid": GUID_X.lower(),
           "ecommerce": {"currency": "USD", "items": [item("SKU-1", "29.99")]}}
    view = {"event": "view_cart", "event_id": "v-1", "loaded": [],
            "ecommerce": {"currency": "USD", "items": [item("SKU-1", "29.99")]}}
    buy = {"event": "purchase", "event_id": "p-1", "loaded": [],
           "ecommerce": {"currency": "USD", "transaction_id": "1001", "value": "29.99",
                         "items": [item("SKU-1", "29.99")]}}
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await browser(client, add)
        await settled(db)
        assert stored_cart_guid(db) == GUID_X  # uppercased, as the store's own GUIDs
        await browser(client, view)  # the same content: the same cart state
        await browser(client, buy)
        await settled(db)
    sent = [r.json for r in fake.requests("esputnik")]
    assert [body["GeneralInfo"]["eventName"] for body in sent] == ["StatusCart", "PurchasedItems"]
    assert sent[0]["StatusCart"]["GUID"] == GUID_X
    assert sent[1]["PurchasedItems"] == {"GUID": GUID_X, "OrderNumber": "1001"}


async def test_a_changed_cart_gets_a_new_guid_unless_the_browser_names_one(tmp_path,
                                                                           fake) -> None:
    settings = config.parse(settings_data(tmp_path, fake, only=("esputnik",)), env={})
    db = tmp_path / "onetag.db"

    def add(event_id: str, **extra) -> dict:
        return {"event": "add_to_cart", "event_id": event_id, "loaded": [], **extra,
                "ecommerce": {"currency": "USD", "items": [item("SKU-1", "29.99")]}}

    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await browser(client, add("a-1", cart_guid=GUID_X))
        await browser(client, add("a-2"))  # an older page: no cart_guid
        await settled(db)
        generated = stored_cart_guid(db)
        assert generated not in (None, GUID_X)
        await browser(client, add("a-3", cart_guid="11111111-2222-3333-4444-555555555555"))
        await settled(db)
        assert stored_cart_guid(db) == "11111111-2222-3333-4444-555555555555"
    guids = [r.json["StatusCart"]["GUID"] for r in fake.requests("esputnik")]
    assert guids == [GUID_X, generated, "11111111-2222-3333-4444-555555555555"]


@pytest.mark.parametrize("bad", ["short", "has spaces in it", "x" * 65, 12345678])
async def test_a_malformed_cart_guid_is_refused_by_name(tmp_path, fake, bad) -> None:
    settings = config.parse(settings_data(tmp_path, fake, only=("esputnik",)), env={})
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        body = {"site_id": SITE, "sc": SC, "events": [
            {"event": "add_to_cart", "event_id": "a-1", "cart_guid": bad,
             "ecommerce": {"items": [item()]}}]}
        response = await client.post("/e", json=body, headers={"origin": ORIGIN})
        assert response.status_code == 422
        assert "events[0].cart_guid" in response.text
    assert rows(tmp_path / "onetag.db") == []


async def test_remarkety_is_retried_on_any_non_2xx(tmp_path, fake) -> None:
    """RM guide, "Important note about retrying webhooks": retry whenever the endpoint "does
    not respond with HTTP 200 status code" (a 400 and a 404 are dead at once elsewhere)."""
    fake.fail("remarkety", 400, times=1)
    fake.fail("remarkety", 404, times=1)
    settings = config.parse(settings_data(tmp_path, fake, only=("remarkety",)), env={})
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, {"event": "purchase", "event_id": "o-1",
                               "user": {"email": "jim@example.com"},
                               "ecommerce": {"transaction_id": "1001", "items": [item()]}})
        await until(lambda: rows(db) and rows(db)[0]["state"] == "delivered",
                    what="the order delivered", describe=lambda: rows(db))
    [row] = rows(db)
    assert (row["attempts"], row["last_error"]) == (3, None)
    assert [r.answer for r in fake.requests("remarkety")] == ["400", "404", "200"]


async def onetag(capsys, *args: str) -> str:
    """``onetag <args>`` in this process (in a thread: the command runs its own event loop);
    its standard output."""
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, list(args)) == 0
    return capsys.readouterr().out


async def test_a_refused_remarkety_key_shows_in_onetag_deliveries(tmp_path, fake,
                                                                  capsys) -> None:
    fake.fail("remarkety", 401, times=None)
    path = write_config(tmp_path / "onetag.toml",
                        settings_data(tmp_path, fake, only=("remarkety",)))
    settings = config.load(path, env={})
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, {"event": "purchase", "event_id": "o-1",
                               "user": {"email": "jim@example.com"},
                               "ecommerce": {"transaction_id": "1001", "items": [item()]}})
        # Retried (FAST: 5 attempts), each time with the key named, then dead.
        await until(lambda: rows(db) and rows(db)[0]["state"] == "dead", what="the row dead",
                    describe=lambda: rows(db))
    [row] = rows(db)
    assert row["attempts"] == 5
    assert row["last_error"].startswith(
        "gave up after 5 attempts; last: key rejected (401): check sites[shop1].remarkety.api_key")
    out = await onetag(capsys, "deliveries", "--config", str(path))
    assert ("  remarkety: key rejected (401): check sites[shop1].remarkety.api_key "
            "(1 delivery dead)") in out.splitlines()


async def test_ignored_rows_keep_their_reason_and_block_nothing(tmp_path, fake,
                                                                capsys) -> None:
    """A backend identify of a customer never seen in a browser: eSputnik's CustomerData has
    no cookie to send (ignored, with why); once he has a session, it is sent."""
    settings = config.parse(settings_data(tmp_path, fake, only=("esputnik",)), env={})
    db = tmp_path / "onetag.db"
    who = {"email": "jim@example.com", "customer_id": "C-1"}
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, {"event": "identify", "event_id": "crm-1", "user": who})
        await settled(db)
        [ignored] = rows(db)
        assert ignored["state"] == "ignored" and ignored["attempts"] == 0
        assert ignored["dedup_key"].startswith("skipped:CustomerData:")
        assert ignored["last_error"] == ("skipped: eSputnik CustomerData requires cookies.sc, "
                                         "and no browser session of this customer is known yet")
        await browser(client, {"event": "identify", "event_id": "id-1", "user": who})
        await backend(client, {"event": "identify", "event_id": "crm-2", "user": who})
        await settled(db)
    sent = [r.json["GeneralInfo"] for r in fake.requests("esputnik")]
    assert [info.get("cookies") for info in sent] == [{"sc": SC}]  # the browser's and the
    assert len(rows(db, "d.state = 'delivered'")) == 1  # backend's copy are one fact
    path = write_config(tmp_path / "onetag.toml", settings_data(tmp_path, fake,
                                                                only=("esputnik",)))
    out = await onetag(capsys, "deliveries", "--state", "ignored", "--config", str(path))
    assert "skipped: eSputnik CustomerData requires cookies.sc" in out


async def test_a_purchase_without_a_stored_cart_keeps_the_browsers_guid(tmp_path, fake) -> None:
    """The cart's pages were on another session (or before onetag): the browser's purchase
    names the GUID eS.js last sent, and the server's PurchasedItems quotes it."""
    # The browser's purchase goes server-side: a site whose orders come from the browser
    # (order_source = "browser"; with "backend" only the backend API's orders are sent).
    settings = config.parse(settings_data(tmp_path, fake, only=("esputnik",),
                                          site={"order_source": "browser"}), env={})
    db = tmp_path / "onetag.db"
    buy = {"event": "purchase", "event_id": "p-1", "loaded": [], "cart_guid": GUID_X,
           "ecommerce": {"currency": "USD", "transaction_id": "1002", "value": "29.99",
                         "items": [item("SKU-1", "29.99")]}}
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await browser(client, buy)
        await settled(db)
    [sent] = [r.json for r in fake.requests("esputnik")]
    assert sent["PurchasedItems"] == {"GUID": GUID_X, "OrderNumber": "1002"}


async def test_a_purchase_of_a_session_that_never_had_a_cart_is_the_one_click_form(
        tmp_path, fake) -> None:
    """No StatusCart was ever sent, so no GUID could match one: ES REST "PurchasedItems (One
    Click)" with the lines."""
    # The browser's purchase goes server-side: a site whose orders come from the browser
    # (order_source = "browser"; with "backend" only the backend API's orders are sent).
    settings = config.parse(settings_data(tmp_path, fake, only=("esputnik",),
                                          site={"order_source": "browser"}), env={})
    db = tmp_path / "onetag.db"
    buy = {"event": "purchase", "event_id": "p-1", "loaded": [],
           "ecommerce": {"currency": "USD", "transaction_id": "1003", "value": "8.70",
                         "items": [item("SKU-435", "4.35", 2)]}}
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await browser(client, buy)
        await settled(db)
    [sent] = [r.json for r in fake.requests("esputnik")]
    assert sent["PurchasedItems"] == {"Products": [
        {"product_id": "SKU-435", "unit_price": "4.35", "quantity": 2}], "OrderNumber": "1003"}


async def test_a_backend_order_of_a_customer_never_seen_waits_for_his_session(
        tmp_path, fake, capsys) -> None:
    """ES REST PurchasedItems (One Click): ``cookies`` ("Cookie sc is a cookie generated by
    our script") is Required; ``user_email`` and ``externalCustomerId`` are Optional and
    stand in for nothing, and the tracker creates no contact from them. A backend order of
    a customer onetag never saw in a browser (no sc anywhere) is held, its last_error saying
    why, and goes with the customer's sc once a browser session of his is identified; an
    order that names the sc itself goes at once."""
    data = settings_data(tmp_path, fake, only=("esputnik",))
    path = write_config(tmp_path / "onetag.toml", data)
    settings = config.load(path, env={})
    db = tmp_path / "onetag.db"
    who = {"email": "new@example.com", "customer_id": "C-9"}
    buy = {"event": "purchase", "event_id": "order-1001", "user": who,
           "ecommerce": {"currency": "USD", "transaction_id": "1001", "value": "50.00",
                         "items": [item("SKU-1", "10.00", 5)]}}
    with_sc = {**buy, "event_id": "order-1002", "sc": GUID_X,
               "user": {"email": "other@example.com"},
               "ecommerce": {**buy["ecommerce"], "transaction_id": "1002"}}
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, buy, with_sc)
        await settled(db)
        [held] = rows(db, "d.state = 'held'")
        assert (held["dedup_key"], held["attempts"]) == ("PurchasedItems:1001", 0)
        assert held["last_error"] == (
            "waiting: eSputnik PurchasedItems requires cookies.sc, and no browser session of "
            "this customer is known yet; held until one is identified (hold_days)")
        out = await onetag(capsys, "deliveries", "--state", "held", "--config", str(path))
        assert "waiting: eSputnik PurchasedItems requires cookies.sc" in out
        [sent] = [r.json for r in fake.requests("esputnik")]  # the order naming its sc
        assert sent["GeneralInfo"]["cookies"] == {"sc": GUID_X}
        await browser(client, {"event": "identify", "event_id": "id-1",
                               "user": {"email": who["email"]}})
        await until(lambda: len(fake.requests("esputnik")) == 2, what="the held order sent",
                    describe=lambda: rows(db))
        await settled(db)
    order = fake.requests("esputnik")[1].json
    assert order["GeneralInfo"]["cookies"] == {"sc": SC}
    assert order["GeneralInfo"]["user_email"] == who["email"]
    assert order["GeneralInfo"]["externalCustomerId"] == "C-9"
    assert order["PurchasedItems"] == {"Products": [
        {"product_id": "SKU-1", "unit_price": "10.00", "quantity": 5}], "OrderNumber": "1001"}
    assert [(r["dedup_key"], r["state"]) for r in rows(db, "d.vendor = 'esputnik'")
            if r["event_name"] == "purchase"] == [("PurchasedItems:1002", "delivered"),
                                                  ("PurchasedItems:1001", "delivered")]


async def test_a_held_order_that_finds_no_session_expires_saying_why(tmp_path, fake) -> None:
    settings = config.parse(settings_data(tmp_path, fake, only=("esputnik",), hold_days=2e-5),
                            env={})
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, httpx.AsyncClient(base_url=app.state.base_url) as client:
        await backend(client, {"event": "purchase", "event_id": "order-1001",
                               "user": {"email": "new@example.com"},
                               "ecommerce": {"currency": "USD", "transaction_id": "1001",
                                             "items": [item("SKU-1", "10.00")]}})
        await until(lambda: rows(db, "d.state = 'expired'"), what="the held order expired",
                    describe=lambda: rows(db))
    [expired] = rows(db)
    assert expired["last_error"].startswith("waiting: eSputnik PurchasedItems requires "
                                            "cookies.sc")
    assert not fake.requests("esputnik")
