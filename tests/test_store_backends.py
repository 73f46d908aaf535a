"""The store contract (server/store/base.py) on both backends: SQLite and PostgreSQL.

Every test here goes through the ``Store`` interface only, and reads the tables with plain
SQL both databases speak (``Backend.rows``). PostgreSQL-only: two nodes on one database.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server import vendors
from server.envelope import BrowserFacts, Problem
from server.events import Origin, normalise
from server.store.base import SessionInfo

from support import item
from test_store import _held_vendor


def event(raw: dict, sc: str | None = "SC-AAAA-0001", source: str = "browser") -> dict:
    origin = Origin(site_id="shop1", source=source, currency="USD", received_ms=1, sc=sc)
    return normalise(raw, "e", origin)


async def ingest(store, *events: dict):
    return await store.ingest("shop1", list(events), list(events), SessionInfo(user_agent="UA"))


async def test_requests_share_commits_all_land_and_a_repeated_id_is_a_duplicate(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        batches = [[event({"event": "page_view", "event_id": f"e{i}-{j}"}, sc=f"SC-{i:04d}-XXXX")
                    for j in range(3)] for i in range(60)]
        results = await asyncio.gather(*(store.ingest("shop1", b, b, SessionInfo())
                                         for b in batches))
        assert [[r.event_id for r in rows] for rows in results] == [
            [e["event_id"] for e in b] for b in batches]
        assert len({r.seq for rows in results for r in rows}) == 180
        assert store.commits < 60  # grouped
        again = await ingest(store, event({"event": "page_view", "event_id": "e0-1"},
                                          sc="SC-0000-XXXX"))
        first = next(r for r in results[0] if r.event_id == "e0-1")
        assert again[0].duplicate and again[0].seq == first.seq
    finally:
        await store.close()
    assert await backend.rows("SELECT count(*) FROM events") == [(180,)]
    assert await backend.rows("SELECT count(*) FROM sessions") == [(60,)]


async def test_a_failing_request_fails_alone(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        good = [event({"event": "page_view", "event_id": "good"})]
        bad = [event({"event": "page_view", "event_id": "bad"}, sc="SC-BBBB-0002")]
        bad[0]["user"] = {"email": object()}  # cannot be stored: the job raises
        outcome = await asyncio.gather(store.ingest("shop1", good, good, SessionInfo()),
                                       store.ingest("shop1", bad, bad, SessionInfo()))
        assert isinstance(outcome[0], list) and isinstance(outcome[1], Problem)
        assert outcome[1].status == 422 and outcome[1].field == "events"
    finally:
        await store.close()
    assert await backend.rows("SELECT event_id FROM events") == [("good",)]


async def test_a_cart_over_its_bound_is_refused_and_nothing_of_the_request_is_stored(
        backend) -> None:
    store = await backend.open(backend.settings(max_cart_lines=2))
    try:
        answer = await ingest(store, event({"event": "page_view", "event_id": "p"}),
                              event({"event": "add_to_cart", "event_id": "c", "ecommerce": {
                                  "items": [item("A"), item("B"), item("C")]}}))
    finally:
        await store.close()
    assert isinstance(answer, Problem) and answer.field == "events[1].ecommerce.items"
    assert await backend.rows("SELECT count(*) FROM events") == [(0,)]


async def test_one_email_on_two_devices_is_one_identity(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        await ingest(store, event({"event": "identify", "event_id": "a",
                                   "user": {"email": "Ann@Example.com", "first_name": "Ann"}},
                                  sc="SC-PHONE-01"))
        await ingest(store, event({"event": "identify", "event_id": "b",
                                   "user": {"email": "ann@example.com", "customer_id": "42"}},
                                  sc="SC-LAPTOP-1", source="backend"))
        await ingest(store, event({"event": "view_item", "event_id": "c",
                                   "ecommerce": {"items": [item()]}}, sc="SC-LAPTOP-1"))
        view = await store.session_view("shop1", "SC-LAPTOP-1")
    finally:
        await store.close()
    assert view["identity"] == {"id": 1, "email": "ann@example.com", "customer_id": "42",
                                "first_name": "Ann"}
    assert view["events"][0]["identity"]["email"] == "ann@example.com"
    assert await backend.rows("SELECT count(*) FROM identities") == [(1,)]
    assert sorted(await backend.rows("SELECT sc, identity_id FROM sessions")) == [
        ("SC-LAPTOP-1", 1), ("SC-PHONE-01", 1)]


async def test_a_browser_never_sets_a_customer_id_nor_consent(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        await ingest(store, event({"event": "identify", "event_id": "a", "user": {
            "email": "eve@example.com", "customer_id": "7", "phone": "+15550001"}}))
        await ingest(store, event({"event": "opt_in", "event_id": "b",
                                   "user": {"email": "eve@example.com"}}))
    finally:
        await store.close()
    assert await backend.rows("SELECT email, customer_id, phone, accepts_marketing "
                              "FROM identities") == [("eve@example.com", None, "+15550001", None)]


async def test_sendlane_says_a_browsers_customer_id_was_dropped(backend) -> None:
    """A page sent user.customer_id in an unsigned identify: Sendlane's customer-added row
    says why it has none (a browser's is never kept: it comes from the backend), not that
    none is known (signed: tests/test_trust_customer_id.py)."""
    store = await backend.open(backend.settings(
        sendlane={"integration_token": "t", "api_token": "k"}))
    try:
        await ingest(store, event({"event": "identify", "event_id": "a", "user": {
            "email": "ann@example.com", "customer_id": "C-42"}}))
        await ingest(store, event({"event": "identify", "event_id": "b", "user": {
            "email": "bob@example.com"}}, sc="SC-BBBB-0002"))
    finally:
        await store.close()
    rows = await backend.rows("SELECT e.event_id, d.state, d.last_error FROM deliveries d "
                              "JOIN events e ON e.seq = d.event_seq "
                              "WHERE d.dedup_key LIKE '%customer-added:%' ORDER BY e.event_id")
    [(_, unsigned_state, unsigned), (_, plain_state, plain)] = rows
    assert unsigned_state == plain_state == "ignored"
    assert "never kept, signed or not" in unsigned
    assert "backend" in unsigned and "C-42" not in unsigned
    assert plain.endswith("and none is known")
    assert await backend.rows("SELECT customer_id FROM identities") == [(None,), (None,)]


async def test_session_view_lists_its_own_events_newest_first(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        for i in range(6):
            sc = "SC-AAAA-0001" if i % 2 else "SC-BBBB-0002"
            await ingest(store, event({"event": "page_view", "event_id": f"p{i}"}, sc=sc))
        await ingest(store, event({"event": "page_view", "event_id": "late"}, sc="SC-CCCC-0003"))
        view = await store.session_view("shop1", "SC-AAAA-0001")
        short = await store.session_view("shop1", "SC-AAAA-0001", limit=2)
        unknown = await store.session_view("shop1", "SC-NONE-0000")
    finally:
        await store.close()
    assert [e["event_id"] for e in view["events"]] == ["p5", "p3", "p1"]
    assert [e["event_id"] for e in short["events"]] == ["p5", "p3"]
    assert view["session"]["user_agent"] == "UA"
    assert unknown["session"] is None and unknown["events"] == [] == unknown["deliveries"]
    assert sorted(await backend.rows("SELECT sc, first_seq, last_seq FROM sessions")) == [
        ("SC-AAAA-0001", 2, 6), ("SC-BBBB-0002", 1, 5), ("SC-CCCC-0003", 7, 7)]


async def test_cart_state_and_guid_per_state(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        await ingest(store, event({"event": "add_to_cart", "event_id": "1",
                                   "ecommerce": {"items": [item("A", 19.99, 3)]}}))
        first = (await store.session_view("shop1", "SC-AAAA-0001"))["cart"]
        await ingest(store, event({"event": "view_cart", "event_id": "2",
                                   "ecommerce": {"items": [item("A", 19.99, 3)]}}))
        same = (await store.session_view("shop1", "SC-AAAA-0001"))["cart"]
        await ingest(store, event({"event": "add_to_cart", "event_id": "3",
                                   "ecommerce": {"items": [item("B", 4.35, 1)]}}))
        second = (await store.session_view("shop1", "SC-AAAA-0001"))["cart"]
        await ingest(store, event({"event": "purchase", "event_id": "4",
                                   "ecommerce": {"transaction_id": "T1", "items": []}}))
        view = await store.session_view("shop1", "SC-AAAA-0001")
    finally:
        await store.close()
    assert first["value_minor"] == 5997 and first["item_count"] == 3
    assert same["guid"] == first["guid"]
    assert second["guid"] != first["guid"] and second["value_minor"] == 5997 + 435
    assert view["cart"] is None
    purchase_event = view["events"][0]
    assert purchase_event["cart"]["guid"] == second["guid"]
    assert purchase_event["cart"]["value_minor"] == 6432


async def test_a_session_switching_identity_is_written_with_its_new_identity(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        await ingest(store, event({"event": "identify", "event_id": "a",
                                   "user": {"email": "a@example.com"}}))
        await ingest(store, event({"event": "add_to_cart", "event_id": "c",
                                   "ecommerce": {"items": [item()]}}))
        await ingest(store, event({"event": "identify", "event_id": "b",
                                   "user": {"email": "b@example.com"}}))
    finally:
        await store.close()
    assert await backend.rows("SELECT i.email, s.cart_items FROM sessions s JOIN identities i "
                              "ON i.id = s.identity_id") == [("b@example.com", None)]


async def test_browser_bodies_are_read_and_a_refused_one_fails_alone(backend) -> None:
    import json

    store = await backend.open(backend.settings())
    facts = BrowserFacts("https://shop.example", None, "UA", 1)
    try:
        good = json.dumps({"site_id": "shop1", "sc": "SC-GOOD-0001",
                           "events": [{"event": "page_view", "event_id": "g"}]}).encode()
        answers = await asyncio.gather(store.ingest_browser(good, facts),
                                       store.ingest_browser(b"{not json", facts))
    finally:
        await store.close()
    assert answers[0].sc == "SC-GOOD-0001" and answers[0].names == ("page_view",)
    assert isinstance(answers[1], Problem) and answers[1].status == 400
    assert await backend.rows("SELECT event_id, sc FROM events") == [("g", "SC-GOOD-0001")]


# Deliveries -------------------------------------------------------------------------------

@pytest.fixture
def held_vendor(monkeypatch):
    monkeypatch.setitem(vendors.VENDORS, "heldvendor", _held_vendor())


async def test_anonymous_activity_is_held_then_released_on_identify(backend, held_vendor) -> None:
    store = await backend.open(backend.settings(heldvendor={}))
    try:
        await ingest(store, event({"event": "view_item", "event_id": "v1",
                                   "ecommerce": {"items": [item("A")]}}))
        await ingest(store, event({"event": "view_item", "event_id": "v2",
                                   "ecommerce": {"items": [item("B")]}}))
        assert await backend.rows("SELECT dedup_key FROM deliveries WHERE state = 'held' "
                                  "ORDER BY id") == [("v:v1",), ("v:v2",)]
        await ingest(store, event({"event": "identify", "event_id": "i",
                                   "user": {"email": "a@b.co"}}))
    finally:
        await store.close()
    rows = await backend.rows("SELECT dedup_key, state, request FROM deliveries ORDER BY id")
    assert [(key, state) for key, state, _ in rows] == [
        ("c:a@b.co", "pending"), ("v:v1", "pending"), ("v:v2", "pending")]
    assert all('"email":"a@b.co"' in request for key, _, request in rows if key.startswith("v:"))


async def test_held_rows_past_the_window_expire_instead(backend, held_vendor) -> None:
    store = await backend.open(backend.settings(heldvendor={}), hold_ms=0)
    try:
        await ingest(store, event({"event": "view_item", "event_id": "v1",
                                   "ecommerce": {"items": [item("A")]}}))
        await asyncio.sleep(0.01)
        await ingest(store, event({"event": "identify", "event_id": "i",
                                   "user": {"email": "a@b.co"}}))
    finally:
        await store.close()
    assert dict(await backend.rows("SELECT dedup_key, state FROM deliveries")) == {
        "v:v1": "expired", "c:a@b.co": "pending"}


async def test_a_switch_leaves_what_the_session_held_unsent(backend, held_vendor) -> None:
    store = await backend.open(backend.settings(heldvendor={}))
    try:
        await ingest(store, event({"event": "identify", "event_id": "a", "source": "backend",
                                   "user": {"email": "a@b.co"}}, source="backend"))
        await ingest(store, event({"event": "view_item", "event_id": "v1",
                                   "ecommerce": {"items": [item("A")]}}, sc="SC-ANON-0009"))
        await ingest(store, event({"event": "identify", "event_id": "b",
                                   "user": {"email": "b@b.co"}}, sc="SC-ANON-0009"))
    finally:
        await store.close()
    states = dict(await backend.rows("SELECT dedup_key, state FROM deliveries"))
    assert states["v:v1"] == "pending"  # the session's first identity: released, not switched


def purchase(order: str, source: str, loaded: list[str] | None = None) -> dict:
    raw = {"event": "purchase", "event_id": f"{source}-{order}", "user": {"email": "a@b.co"},
           "ecommerce": {"transaction_id": order, "value": 4.35, "items": [item("A", 4.35)]}}
    if loaded is not None:
        raw["loaded"] = loaded
    return event(raw, sc=None if source == "backend" else "SC-AAAA-0001", source=source)


async def test_a_browser_copy_under_a_key_a_backend_fact_holds_is_not_sent(backend) -> None:
    settings = backend.settings(order_source="browser",
                                rejoiner={"site_id": "ABC1234", "api_key": "k"})
    store = await backend.open(settings)
    try:
        await ingest(store, purchase("2001", "backend"))
        await ingest(store, purchase("2001", "browser", loaded=[]))
        await ingest(store, purchase("2002", "browser", loaded=[]))
        await ingest(store, purchase("2002", "backend"))
    finally:
        await store.close()
    rows = {(key, claim): (state, error) for key, claim, state, error in await backend.rows(
        "SELECT dedup_key, claim, state, last_error FROM deliveries")}
    assert rows == {("convert:2001", 0): ("pending", None),
                    ("convert:2001", 1): ("ignored", "a backend fact holds this key"),
                    ("convert:2002", 1): ("ignored", "superseded by the backend's fact"),
                    ("convert:2002", 0): ("pending", None)}


async def test_a_browser_copy_of_a_backend_cart_event_is_not_sent(backend) -> None:
    """The backend's add_to_cart and the page's copy of it (one event id) plan one key: the
    copy is not sent. On PostgreSQL the copy is written by the one-statement write, which
    applies ``rules.claim_taken`` in SQL."""
    store = await backend.open(backend.settings(
        sendlane={"integration_token": "t", "api_token": "k"}))
    cart = {"event": "add_to_cart", "event_id": "c1", "ecommerce": {"items": [item("A")]}}
    try:
        await ingest(store, event(cart, source="backend"))
        await ingest(store, event(cart))
    finally:
        await store.close()
    assert sorted(await backend.rows("SELECT claim, state, last_error FROM deliveries")) == [
        (0, "held", None), (1, "ignored", "a backend fact holds this key")]


async def test_a_fallback_order_the_browser_delivered_first_is_not_sent_again(backend) -> None:
    settings = backend.settings(rejoiner={"site_id": "ABC1234", "api_key": "k"})
    store = await backend.open(settings, browser_grace_ms=600_000)
    try:
        await ingest(store, purchase("1001", "backend"))  # waits out the grace
        await ingest(store, purchase("1001", "browser", loaded=["rejoiner"]))
        await ingest(store, purchase("1002", "browser", loaded=["rejoiner"]))
        await ingest(store, purchase("1002", "backend"))
        forged = purchase("1005", "browser", loaded=["rejoiner"])
        forged["ecommerce"]["value_minor"] = 1  # another order under the same id
        await ingest(store, forged)
        await ingest(store, purchase("1005", "backend"))
    finally:
        await store.close()
    rows = {(key, claim): state for key, claim, state in await backend.rows(
        "SELECT dedup_key, claim, state FROM deliveries WHERE vendor = 'rejoiner'")}
    assert rows == {("convert:1001", 0): "browser", ("convert:1001", 1): "browser",
                    ("convert:1002", 1): "browser", ("convert:1002", 0): "browser",
                    ("convert:1005", 1): "browser", ("convert:1005", 0): "pending"}


async def test_coupon_calls_are_kept_and_listed_latest_first(backend) -> None:
    store = await backend.open(backend.settings())
    try:
        first = await store.record_coupon_call({"created_ms": 1, "site_id": "shop1",
                                                "status": 200, "result": "created",
                                                "duration_ms": 5, "code": "SAVE10"})
        second = await store.record_coupon_call({"created_ms": 2, "site_id": "shop2",
                                                 "status": 502, "result": "store_down",
                                                 "duration_ms": 7, "error": "refused"})
        every = await store.coupon_calls()
        one_site = await store.coupon_calls(site_id="shop1", limit=5)
    finally:
        await store.close()
    assert second > first
    assert [(c["id"], c["result"]) for c in every] == [(second, "store_down"), (first, "created")]
    assert [c["code"] for c in one_site] == ["SAVE10"]


async def test_coupon_calls_past_the_retention_are_pruned_in_bounded_passes(backend,
                                                                            monkeypatch) -> None:
    """They hold shoppers' emails: kept ``keep_attempts_days``, like delivery attempts."""
    from server import forwarder as forwarder_module
    from server.forwarder import Forwarder, ForwarderOptions

    day = 86_400_000
    now_ms = 1_800_000_000_000
    settings = backend.settings()
    store = await backend.open(settings)
    try:
        # Made in this order; one old call made after a young one (another node's clock).
        times = [now_ms - 40 * day - i for i in range(7)] + [now_ms - day, now_ms - 31 * day,
                                                              now_ms]
        for i, created in enumerate(times):
            await store.record_coupon_call({"created_ms": created, "site_id": "shop1",
                                            "status": 200, "result": "created",
                                            "duration_ms": 5, "code": f"C{i}"})
        monkeypatch.setattr(forwarder_module, "PRUNE_BATCH", 3)
        monkeypatch.setattr(forwarder_module, "PRUNE_BATCHES", 2)
        fwd = Forwarder(settings, store, ForwarderOptions(), clock=lambda: now_ms / 1000)
        assert settings.server.keep_attempts_days == 30
        # A pass looks at PRUNE_BATCH of the oldest at a time, at most PRUNE_BATCHES times.
        assert await fwd.prune_coupon_calls() == 6
        # The next 3 oldest: C6 and C8 are old, C7 young (fewer than 3 went: the pass stops).
        assert await fwd.prune_coupon_calls() == 2
        assert await fwd.prune_coupon_calls() == 0
        left = [c["code"] for c in await store.coupon_calls(limit=20)]
        await fwd.prune()  # the scheduled pass: attempts (none here) and coupon calls
        assert [c["code"] for c in await store.coupon_calls(limit=20)] == left
    finally:
        await store.close()
    assert left == ["C9", "C7"]


async def test_products_kept_by_ingest_feed_the_catalog_reads_and_the_product_sync(
        backend) -> None:
    settings = backend.settings(sendlane={"integration_token": "SLTOKEN123", "api_token": "k"})
    store = await backend.open(settings)

    def product_event(event_id: str, price: str, full: bool = True) -> dict:
        line = {"item_id": "P1", "price": price, "quantity": 1}
        if full:
            line.update(item_name="Mug", item_url="https://shop.example/p/P1",
                        image_url="https://shop.example/i/P1.jpg")
        return event({"event": "product_updated", "event_id": event_id,
                      "ecommerce": {"currency": "USD", "items": [line]}}, sc=None,
                     source="backend")

    try:
        await ingest(store, product_event("u1", "10.00"))
        await ingest(store, event({"event": "view_item", "event_id": "v1", "ecommerce": {
            "items": [{"item_id": "P1", "price": "0.01", "item_brand": "Acme"}]}}))
        first_state = await store.catalog_state("shop1")
        await ingest(store, product_event("u2", "12.00", full=False))  # a price-only change
        page = await store.catalog_page("shop1", None, 10)
        assert await store.catalog_sites() == ["shop1"]
        assert await store.catalog_state("shop1") != first_state
        changes = await store.plan_product_sync("shop1", 10**13, None, 100)
        again = await store.plan_product_sync("shop1", 10**13, None, 100)
        nightly = await store.plan_product_sync("shop1", 10**13, "2026-01-01", 100)
        same_night = await store.plan_product_sync("shop1", 10**13, "2026-01-01", 100)
    finally:
        await store.close()
    [product] = page
    assert (product["item_id"], product["price_minor"], product["brand"]) == ("P1", 1200, "Acme")
    assert changes == {"changes": 1, "nightly": 0, "more": False}
    assert again["changes"] == 0 and nightly["nightly"] == 1 and same_night["nightly"] == 0
    synced = await backend.rows("SELECT visitor, state FROM deliveries WHERE event_seq = 0")
    assert synced == [("product:P1", "pending"), ("product:P1", "pending")]


async def test_a_backfill_plans_history_once_and_a_second_run_finds_it_there(
        backend, tmp_path) -> None:
    from server.backfill import Backfill

    from test_backfill import history, write_jsonl

    settings = backend.settings(sendlane={"integration_token": "SLTOKEN123", "api_token": "k"})
    site = settings.sites["shop1"]
    path = write_jsonl(tmp_path / "h.jsonl", history(3))
    store = await backend.open(settings)
    try:
        first = await Backfill(site, [path], send=True, batch_lines=3, pace=0).run(store)
        again = await Backfill(site, [path], send=True, pace=0).run(store)
        paced = await Backfill(site, [write_jsonl(tmp_path / "more.jsonl", history(5)[-4:])],
                               send=True, pace=60).run(store)
    finally:
        await store.close()
    assert first.planned == {"sendlane": 8}  # 1 customer, 1 product, 3 orders, 3 statuses
    assert again.planned == {} and again.already == {"sendlane": 8}
    assert paced.planned == {"sendlane": 4}
    assert await backend.rows("SELECT count(*), count(DISTINCT source), max(sc) FROM events"
                              ) == [(12, 1, None)]
    assert await backend.rows("SELECT request_id, count(*) FROM deliveries GROUP BY request_id "
                              "ORDER BY request_id") == [("backfill-1", 8), ("backfill-3", 4)]
    dues = [due for (due,) in await backend.rows(
        "SELECT next_attempt_ms FROM deliveries WHERE request_id = 'backfill-3' ORDER BY id")]
    assert [b - a for a, b in zip(dues, dues[1:])] == [1000] * 3
    assert await backend.rows("SELECT count(*) FROM backfill_runs WHERE finished_ms IS NULL"
                              ) == [(0,)]


async def test_the_remarkety_orders_export_reads_either_database(backend, tmp_path,
                                                                 capsys) -> None:
    import csv

    from server import cli
    from server.backfill import Backfill

    from test_backfill import history, write_jsonl

    settings = backend.settings()
    store = await backend.open(settings)
    try:
        await Backfill(settings.sites["shop1"], [write_jsonl(tmp_path / "h.jsonl", history(2))],
                       send=True, pace=0).run(store)
    finally:
        await store.close()
    config = tmp_path / "onetag.toml"
    config.write_text(f'[server]\ndatabase = "{backend.database}"\n\n[[sites]]\nid = "shop1"\n'
                      'origins = ["https://shop.example"]\n', encoding="utf-8")
    out = tmp_path / "orders.csv"
    code = await asyncio.to_thread(cli.main, ["export", "remarkety-orders", "--site", "shop1",
                                              "--config", str(config), "--out", str(out)])
    assert code == 0 and "wrote 2 orders" in capsys.readouterr().out
    with open(out, encoding="utf-8") as f:
        exported = list(csv.DictReader(f))
    assert len(exported) == 2 and {row["order_id"] for row in exported} == {"O0", "O1"}


# NUL characters ---------------------------------------------------------------------------

NUL_PROBLEM = "contains a NUL character (\\u0000), which onetag does not store or send"


async def test_a_nul_character_is_refused_alike_by_every_intake_on_either_backend(
        backend, tmp_path) -> None:
    """PostgreSQL text can't hold U+0000; SQLite can, and stored and forwarded it. Every
    intake refuses it as bad input, naming its field, before anything is stored: the same
    answer whatever the database (docs/operations.md, "Bad input and faults")."""
    import json

    from server.backfill import Backfill
    from support import ORIGIN, running

    from test_backfill import write_jsonl

    mug = {"event": "add_to_cart", "event_id": "b1", "ecommerce": {
        "currency": "USD", "items": [{"item_id": "M1", "item_name": "Mug\x00 big", "price": 5}]}}
    custom = {"event": "c_note", "event_id": "b2", "k\x00": "v"}
    person = {"event": "identify", "event_id": "n1",
              "user": {"email": "nul@example.com", "first_name": "Nu\x00ll"}}
    note = {"event": "c_note", "event_id": "n2", "user": {"email": "nul@example.com"},
            "note": "a\x00b"}
    browser = {"content-type": "text/plain", "origin": ORIGIN}
    api = {"authorization": "Bearer secret-key-0123456789"}
    settings = backend.settings()
    answers = []
    async with running(settings) as (_, client):
        for one, field in ((mug, "events[0].ecommerce.items[0].item_name"),
                           (custom, "events[0].'k\\x00'")):
            body = json.dumps({"site_id": "shop1", "events": [one]}).encode()
            assert b"\\u0000" in body
            answers.append((await client.post("/e", content=body, headers=browser), field))
        answers.append((await client.post("/api/v1/sites/shop1/events", json=person,
                                          headers=api), "body.user.first_name"))
        answers.append((await client.post("/api/v1/sites/shop1/events", json=[person, note],
                                          headers=api), "body[0].user.first_name"))
        answers.append((await client.post("/api/v1/sites/shop1/events", json=[note],
                                          headers=api), "body[0].note"))
    for answer, field in answers:
        assert answer.status_code == 422, (field, answer.text)
        assert answer.json()["error"] == "invalid_event", answer.text
        assert answer.json()["errors"] == [{"field": field, "problem": NUL_PROBLEM}]
    history = write_jsonl(tmp_path / "nul.jsonl", [
        {**person, "time": "2024-01-01T09:00:00Z"},
        {"event": "product_updated", "time": "2024-01-01T09:00:00Z",
         "ecommerce": {"items": [{"item_id": "M1", "item_name": "Mug\x00", "price": "9.50"}]}},
        {"event": "identify", "time": "2024-01-01T09:00:00Z",
         "user": {"email": "ok@example.com", "first_name": "Ok"}}])
    customers = tmp_path / "customers.csv"
    customers.write_text("email,first_name,time\nann@example.com,An\x00n,2024-01-01T09:00:00Z\n",
                         encoding="utf-8")
    store = await backend.open(backend.settings(
        sendlane={"integration_token": "SLTOKEN123", "api_token": "k"}))
    try:
        summary = await Backfill(settings.sites["shop1"], [history, customers], send=True,
                                 pace=0).run(store)
    finally:
        await store.close()
    assert summary.invalid == 3 and summary.valid == 1, summary.problems
    assert summary.problems == [
        f"nul.jsonl:1: event.user.first_name: {NUL_PROBLEM}",
        f"nul.jsonl:2: event.ecommerce.items[0].item_name: {NUL_PROBLEM}",
        f"customers.csv:2: event.user.first_name: {NUL_PROBLEM}"]
    # A run with an invalid line plans nothing (docs/backfill.md).
    assert await backend.rows("SELECT count(*) FROM events") == [(0,)]
    assert await backend.rows("SELECT count(*) FROM deliveries") == [(0,)]


async def test_the_oldest_pending_age_is_an_index_lookup_per_vendor(backend) -> None:
    """``outbox_depth``'s oldest pending age (``/metrics``, each scrape) read every pending
    row: ``deliveries_due`` finds them, but ``coalesce(retry_from_ms, created_ms)`` is not in
    it, so each was read from the table. Now a partial index on the pending rows' (vendor,
    that expression) answers it with one seek per vendor (SQLite migration 014, PostgreSQL
    030; on ``coalesce(retry_from_ms, due_ms, created_ms)`` since SQLite's 020 and
    PostgreSQL's 036); the ages are what they were: held and dead rows not counted, a
    replayed row's age from its replay, a row that waited out a grace from when it fell due."""
    import sqlite3

    from server.store.pg_console import numbered

    store = await backend.open(backend.settings())
    rows = [("sendlane", "pending", 1000, None), ("sendlane", "pending", 500, 3000),
            ("rejoiner", "pending", 2000, None), ("rejoiner", "held", 100, None),
            ("rejoiner", "dead", 50, None), ("remarkety", "delivered", 10, None),
            ("esputnik", "pending", 700, 800), ("remarkety", "pending", 100, None, 10_000)]
    rows += [("sendlane", "delivered", 5, None)] * 50 + [("sendlane", "pending", 9000, None)] * 50
    for n, (vendor, state, created, retry_from, *due) in enumerate(rows):
        await backend.rows(
            "INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, state, "
            "request, created_ms, updated_ms, retry_from_ms, due_ms) "
            "VALUES ('shop1', ?, ?, 1, 'v', ?, '{}', ?, ?, ?, ?)",
            vendor, f"k{n}", state, created, created, retry_from, due[0] if due else None)
    asked: list[tuple[str, tuple]] = []
    if backend.name == "sqlite":
        read = store._reader.execute_fetchall

        async def traced(sql: str, params: Any = ()) -> Any:
            asked.append((sql, tuple(params)))
            return await read(sql, params)
        store._reader.execute_fetchall = traced
    else:
        fetch = store._fetch

        async def traced(sql: str, *params: Any) -> Any:
            asked.append((sql, params))
            return await fetch(sql, *params)
        store._fetch = traced
    try:
        depth, oldest = await store.outbox_depth(11_000)
    finally:
        await store.close()
    assert oldest == {"sendlane": 10.0, "rejoiner": 9.0, "esputnik": 10.2, "remarkety": 1.0}
    assert ("sendlane", "pending", 52) in depth
    [(sql, params)] = [(sql, params) for sql, params in asked if "min(" in sql]
    if backend.name == "sqlite":
        with sqlite3.connect(backend.database.removeprefix("sqlite:///")) as conn:
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        on_deliveries = [line for line in plan if " deliveries " in f"{line} "]
        assert on_deliveries and all(
            line.startswith("SEARCH deliveries USING INDEX deliveries_oldest_pending (vendor=?)")
            for line in on_deliveries), plan
    else:
        import asyncpg

        conn = await asyncpg.connect(backend.database)
        try:
            await conn.execute("SET enable_seqscan = off")
            plan = [row[0] for row in await conn.fetch("EXPLAIN " + sql, *params)]
        finally:
            await conn.close()
        text = "\n".join(plan)
        assert "deliveries_oldest_pending" in text and "deliveries_due" not in text, text
        assert "Seq Scan on deliveries" not in text and "Limit" in text, text  # one seek


async def test_a_row_waiting_out_the_browser_grace_is_not_late_until_it_falls_due(
        backend) -> None:
    """A backend purchase's Rejoiner convert and eSputnik PurchasedItems wait
    ``browser_grace_s`` for the page's own copy: not late meanwhile. Their oldest pending
    age (``/metrics``, ``onetag deliveries``, the console's Vendors page) counted from when
    they were made, 209 s and climbing to 9m55s for rows delivered on time; it counts from
    when they fall due."""
    settings = backend.settings(rejoiner={"site_id": "ABC1234", "api_key": "k"},
                                esputnik={"site_id": "DEMO", "api_key": "demo"})
    store = await backend.open(settings, browser_grace_ms=600_000)
    try:
        order = purchase("3001", "backend")
        order["sc"] = "SC-AAAA-0003"  # eSputnik's PurchasedItems needs the visitor's cookie
        await ingest(store, order)
        rows = await backend.rows("SELECT vendor, created_ms, next_attempt_ms FROM deliveries "
                                  "WHERE state = 'pending' ORDER BY vendor")
        assert [vendor for vendor, _, _ in rows] == ["esputnik", "rejoiner"]
        made, due = rows[0][1], rows[0][2]
        assert due == made + 600_000
        for now in (made + 209_000, made + 595_000, due):  # held: not late
            _, oldest = await store.outbox_depth(now)
            stats = {s["vendor"]: s["oldest_pending_age_s"]
                     for s in await store.delivery_stats(now)}
            overview = {v["vendor"]: v["oldest_pending_age_s"]
                        for v in await store.console().vendor_overview(now)}
            assert oldest == stats == overview == {"esputnik": 0, "rejoiner": 0}, now
        _, oldest = await store.outbox_depth(due + 5_000)  # due, not sent: late from then
        stats = {s["vendor"]: s["oldest_pending_age_s"]
                 for s in await store.delivery_stats(due + 5_000)}
        assert oldest == stats == {"esputnik": 5.0, "rejoiner": 5.0}
    finally:
        await store.close()


async def test_the_migration_gives_rows_already_waiting_out_a_grace_their_due_time(
        backend) -> None:
    """Rows planned before SQLite's migration 020 (PostgreSQL's 036) have no ``due_ms``: the
    migration gives it to those still waiting (pending, never tried, no replay, due after
    they were made), and to no other row."""
    from server.store import pg_migrate
    from server.store.sqlite import migrations

    store = await backend.open(backend.settings())
    await store.close()
    number, files = (20, migrations()) if backend.name == "sqlite" else (
        36, pg_migrate.migrations())
    [sql] = [sql for version, _, sql in files if version == number]
    before = ["DROP INDEX deliveries_oldest_pending",  # back to the schema before it
              "ALTER TABLE deliveries DROP COLUMN due_ms",
              "CREATE INDEX deliveries_oldest_pending ON deliveries "
              "(vendor, (coalesce(retry_from_ms, created_ms))) WHERE state = 'pending'"]
    for statement in before:
        await backend.rows(statement)
    rows = {  # dedup key: state, attempts, next attempt, created, retry from
        "grace": ("pending", 0, 601_000, 1_000, None),
        "due-when-made": ("pending", 0, 1_000, 1_000, None),
        "paced": ("pending", 0, 61_000, 1_000, 61_000),
        "replayed": ("pending", 0, 90_000, 1_000, 90_000),
        "in-flight": ("pending", 1, 31_000, 1_000, None),
        "retrying": ("pending", 2, 95_000, 1_000, None),
        "held": ("held", 0, 1_000, 1_000, None),
        "browser": ("browser", 0, 601_000, 1_000, None)}
    for key, (state, attempts, due, created, retry_from) in rows.items():
        await backend.rows(
            "INSERT INTO deliveries (site_id, vendor, dedup_key, event_seq, visitor, state, "
            "request, attempts, next_attempt_ms, created_ms, updated_ms, retry_from_ms) "
            "VALUES ('shop1', 'rejoiner', ?, 1, 'v', ?, '{}', ?, ?, ?, ?, ?)",
            key, state, attempts, due, created, created, retry_from)
    if backend.name == "sqlite":
        import sqlite3

        with sqlite3.connect(backend.database.removeprefix("sqlite:///")) as conn:
            for statement in sql.split(";\n"):
                conn.execute(statement)
    else:
        import asyncpg

        conn = await asyncpg.connect(backend.database)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    assert dict(await backend.rows("SELECT dedup_key, due_ms FROM deliveries")) == {
        **{key: None for key in rows}, "grace": 601_000}
    store = await backend.open(backend.settings())
    try:
        _, oldest = await store.outbox_depth(100_000)
    finally:
        await store.close()
    assert oldest == {"rejoiner": 99.0}  # due-when-made, in flight and retrying: since 1 s


# Whose event id is whose ------------------------------------------------------------------

ATTACKER, VICTIM = "0C0C0C0C-0000-4000-8000-00000000000C", "0D0D0D0D-0000-4000-8000-00000000000D"


async def test_a_browser_event_id_never_blocks_another_visitors_event(backend) -> None:
    """An attacker who predicts a page's event id ("purchase-5001") and sends it first from
    its own session: the victim's purchase is still stored and planned."""
    settings = backend.settings(order_source="browser",
                                rejoiner={"site_id": "ABC1234", "api_key": "k"},
                                sendlane={"integration_token": "t", "api_token": "k"})
    store = await backend.open(settings)
    order = {"event": "purchase", "event_id": "purchase-5001", "ecommerce": {
        "transaction_id": "5001", "currency": "USD", "value": 50,
        "items": [item("A", 50)]}}
    try:
        first = await ingest(store, event({"event": "page_view", "event_id": "purchase-5001"},
                                          sc=ATTACKER))
        victim = [event({"event": "identify", "event_id": "vic-id-5001",
                         "user": {"email": "buyer@example.com"}}, sc=VICTIM),
                  event(order, sc=VICTIM)]
        answer = await ingest(store, *victim)
        again = [event({"event": "identify", "event_id": "vic-id-5001",
                        "user": {"email": "buyer@example.com"}}, sc=VICTIM),
                 event(order, sc=VICTIM)]
        retried = await ingest(store, *again)  # the same beacon again: duplicates
    finally:
        await store.close()
    assert not first[0].duplicate
    assert [r.duplicate for r in answer] == [False, False]
    assert answer[1].seq != first[0].seq
    assert [r.duplicate for r in retried] == [True, True]
    assert [r.seq for r in retried] == [r.seq for r in answer]
    assert sorted(await backend.rows("SELECT name, sc FROM events WHERE event_id = ?",
                                     "purchase-5001")) == [("page_view", ATTACKER),
                                                           ("purchase", VICTIM)]
    planned = await backend.rows(
        "SELECT d.vendor, d.state FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        "WHERE e.name = 'purchase'")
    assert sorted(planned) == [("rejoiner", "pending"), ("sendlane", "pending")]


async def test_a_delivery_key_made_of_a_browser_event_id_is_the_visitors_own(backend) -> None:
    """Sendlane's added-to-cart key is made of the event id: two visitors' add_to_cart with
    one id are two deliveries, and one visitor's retry is still one."""
    store = await backend.open(backend.settings(
        sendlane={"integration_token": "t", "api_token": "k"}))
    cart = {"event": "add_to_cart", "event_id": "atc-1", "user": {"email": "a@b.co"},
            "ecommerce": {"items": [item("A")]}}
    victim_cart = {**cart, "user": {"email": "v@b.co"}}
    try:
        await ingest(store, event(cart, sc=ATTACKER))
        await ingest(store, event(victim_cart, sc=VICTIM))
        await ingest(store, event(victim_cart, sc=VICTIM))
    finally:
        await store.close()
    rows = await backend.rows("SELECT d.visitor, d.state FROM deliveries d "
                              "WHERE d.vendor = 'sendlane' AND d.request LIKE '%added-to-cart%'")
    assert sorted(rows) == [(f"sc:{ATTACKER}", "pending"), (f"sc:{VICTIM}", "pending")]


async def test_which_repeated_event_id_is_a_duplicate(backend) -> None:
    """Every pair of senders, one id each pair: a duplicate only when both are the backend
    (its ids are its own, whatever sc it names) or both the same browser session."""
    senders = [("browser", "SC-AAAA-0001"), ("browser", "SC-BBBB-0002"), ("backend", None),
               ("backend", "SC-AAAA-0001"), ("backend", "SC-BBBB-0002")]
    store = await backend.open(backend.settings())
    seen = {}
    try:
        for a, first in enumerate(senders):
            for b, second in enumerate(senders):
                event_id = f"pair-{a}-{b}"
                answers = []
                for source, sc in (first, second):
                    raw = {"event": "page_view", "event_id": event_id}
                    if sc is None:  # a backend event names its session or its customer
                        raw["user"] = {"customer_id": "C1"}
                    answers += await ingest(store, event(raw, sc=sc, source=source))
                seen[(first, second)] = answers[1].duplicate
                if answers[1].duplicate:
                    assert answers[1].seq == answers[0].seq
    finally:
        await store.close()
    expected = {(first, second): (first[0] == second[0] == "backend" or first == second)
                for first in senders for second in senders}
    assert seen == expected
    duplicates = sum(expected.values())
    assert await backend.rows("SELECT count(*) FROM events") == [(50 - duplicates,)]


# A browser's cart lines never block the backend's -----------------------------------------

async def test_a_cart_filled_by_the_browser_never_refuses_the_backends_add(backend) -> None:
    """The browser fills the session's cart to its limit; the backend's add_to_cart for that
    sc is stored, the browser's oldest lines dropped to make room. A browser's add over the
    limit is still refused, and so is a backend add its own lines overflow."""
    store = await backend.open(backend.settings(max_cart_lines=3))
    sc = "SC-CART-0001"

    def add(event_id: str, source: str, *skus: str) -> dict:
        return event({"event": "add_to_cart", "event_id": event_id,
                      "ecommerce": {"items": [item(s) for s in skus]}}, sc=sc, source=source)

    try:
        assert not isinstance(await ingest(store, add("b1", "browser", "A", "B")), Problem)
        assert not isinstance(await ingest(store, add("b2", "browser", "C")), Problem)
        fact = await ingest(store, add("f1", "backend", "X"))
        claim = await ingest(store, add("b3", "browser", "D"))
        facts = await ingest(store, add("f2", "backend", "Y", "Z"))
        over = await ingest(store, add("f3", "backend", "W"))
        view = await store.session_view("shop1", sc)
    finally:
        await store.close()
    assert not isinstance(fact, Problem) and not isinstance(facts, Problem)
    assert isinstance(claim, Problem) and claim.field == "events[0].ecommerce.items"
    assert isinstance(over, Problem) and "limit is 3" in over.problem
    assert [(line["item_id"], line.get("fact")) for line in view["cart"]["items"]] == [
        ("X", True), ("Y", True), ("Z", True)]
    assert sorted(await backend.rows("SELECT event_id FROM events")) == [
        ("b1",), ("b2",), ("f1",), ("f2",)]


async def test_a_line_without_a_price_takes_the_catalogs_for_esputnik(backend) -> None:
    """eSputnik requires a price wherever it names a product ("Transferring Website Behavior
    Data via REST API": ProductPage ``price``, PurchasedItems (One Click) ``unit_price``).
    The store adds the catalog's price to a line that came without one, in the ingest
    transaction (stored with the event, so a replay plans the same); a line the catalog has
    no price for either is left out, as an ignored row."""
    import json

    settings = backend.settings(esputnik={"site_id": "8A412DC"})
    store = await backend.open(settings)
    try:
        # The catalog learns SKU-7's price from a page; the page's session is Ann's.
        await ingest(store, event({"event": "view_item", "event_id": "v1",
                                   "user": {"email": "ann@example.com"},
                                   "ecommerce": {"currency": "USD",
                                                 "items": [item("SKU-7", "12.50")]}}))
        # Another page view of it without a price, eS.js blocked: the tracker's copy.
        await ingest(store, event({"event": "view_item", "event_id": "v2", "loaded": [],
                                   "ecommerce": {"currency": "USD", "items": [
                                       {"item_id": "SKU-7", "item_name": "Seven"}]}}))
        # The backend's order names SKU-7 and SKU-8 without prices; SKU-8 is unknown.
        await ingest(store, event({"event": "purchase", "event_id": "b1",
                                   "user": {"email": "ann@example.com"},
                                   "ecommerce": {"currency": "USD", "transaction_id": "T1",
                                                 "items": [{"item_id": "SKU-7", "quantity": 2},
                                                           {"item_id": "SKU-8"}]}},
                                  sc=None, source="backend"))
    finally:
        await store.close()
    rows = {key: (state, json.loads(request)["json"]) for key, state, request in await backend.rows(
        "SELECT dedup_key, state, request FROM deliveries WHERE vendor = 'esputnik'")}
    state, page = rows["ProductPage:SC-AAAA-0001/v2"]
    assert (state, page["ProductPage"]) == (
        "pending", {"Product": {"productKey": "SKU-7", "price": "12.50"}})
    state, order = rows["PurchasedItems:T1"]
    assert (state, order["PurchasedItems"]) == ("pending", {"Products": [
        {"product_id": "SKU-7", "unit_price": "12.50", "quantity": 2}], "OrderNumber": "T1"})
    assert order["GeneralInfo"]["cookies"] == {"sc": "SC-AAAA-0001"}
    assert rows["skipped:PurchasedItems:T1:1"][0] == "ignored"
    [(data,)] = await backend.rows("SELECT data FROM events WHERE event_id = 'b1'")
    lines = json.loads(data)["ecommerce"]["items"]
    assert [(line.get("catalog_price_minor"), line.get("catalog_currency")) for line in lines] == [
        (1250, "USD"), (None, None)]
