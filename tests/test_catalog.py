"""The product catalog: kept inside the ingest transaction, claims fill gaps, facts win.

Real SQLite through the real app (its writer, its cache); the rules themselves
(``server/catalog.py``) also by property: whatever order claims and facts arrive in, a
field ends as the backend's last word, else the pages' last word.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from server import catalog, cli, events
from server.catalog import merge
from backends import Backend
from support import ORIGIN, running, settings_for

API_KEY = "secret-key-0123456789"
URL = "https://shop.example/p/mug"
IMAGE = "https://shop.example/i/mug.jpg"


def item(item_id: str = "SKU-1", price: Any = "29.99", **extra: Any) -> dict[str, Any]:
    return {"item_id": item_id, "price": price, "quantity": 1, **extra}


def view(*items: dict[str, Any], name: str = "view_item", currency: str = "USD") -> dict:
    return {"event": name, "event_id": str(uuid.uuid4()),
            "ecommerce": {"currency": currency, "items": list(items)}}


def update(*items: dict[str, Any], currency: str = "USD") -> dict:
    return {"event": "product_updated", "event_id": str(uuid.uuid4()),
            "ecommerce": {"currency": currency, "items": list(items)}}


async def browser(client: Any, *evts: dict) -> None:
    body = json.dumps({"site_id": "shop1", "events": list(evts)})
    answer = await client.post("/e", content=body, headers={"content-type": "text/plain",
                                                            "origin": ORIGIN})
    assert answer.status_code == 204, answer.text


async def backend_api(client: Any, *evts: dict, status: int = 202) -> Any:
    answer = await client.post("/api/v1/sites/shop1/events", json=list(evts),
                               headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == status, answer.text
    return answer.json()


def sqlite_at(tmp_path: Path) -> Backend:
    return Backend("sqlite", f"sqlite:///{tmp_path}/onetag.db")


async def product(store: Any, item_id: str = "SKU-1") -> dict[str, Any] | None:
    """The product's row, from either backend (``store``: tests/backends.py's Backend)."""
    rows = await store.dicts("SELECT * FROM products WHERE site_id = 'shop1' AND item_id = ?",
                             item_id)
    if not rows:
        return None
    found = rows[0]
    found["sources"] = json.loads(found["sources"])
    found["categories"] = json.loads(found["categories"]) if found["categories"] else None
    return found


async def test_a_page_view_makes_a_product_of_claims(backend):  # both backends
    async with running(backend.settings()) as (_, client):
        await browser(client, view(item(item_name="Mug", item_url=URL, image_url=IMAGE,
                                        item_category="Kitchen", item_category2="Mugs",
                                        item_brand="Acme", item_variant="Blue", in_stock=False,
                                        item_sku="M-1", description="A mug",
                                        item_group_id="MUG")))
    row = (await product(backend))
    assert row is not None
    assert {k: row[k] for k in ("title", "item_url", "image_url", "price_minor", "currency",
                                "availability", "categories", "brand", "variant", "sku",
                                "description", "item_group_id", "source", "deleted")} == {
        "title": "Mug", "item_url": URL, "image_url": IMAGE, "price_minor": 2999,
        "currency": "USD", "availability": "out_of_stock", "categories": ["Kitchen", "Mugs"],
        "brand": "Acme", "variant": "Blue", "sku": "M-1", "description": "A mug",
        "item_group_id": "MUG", "source": "browser", "deleted": 0}
    assert set(row["sources"].values()) == {"browser"}
    assert row["first_seen_ms"] == row["last_seen_ms"] == row["changed_ms"]
    assert row["fact_version"] == 0 and row["fact_ms"] is None


async def test_a_browser_view_never_overwrites_a_backend_product_and_fills_its_gaps(backend):  # both backends
    async with running(backend.settings()) as (_, client):
        await backend_api(client, update(item(price="12.00", item_name="Mug", item_url=URL)))
        await browser(client, view(item(price="0.01", item_name="FREE MUG",
                                        item_url="https://evil.example/p",
                                        image_url=IMAGE, item_brand="Acme"), currency="EUR"))
        await browser(client, view(item(price="0.02"), name="add_to_cart"))
    row = (await product(backend))
    assert row is not None
    # The backend's facts stand, in the backend's currency ...
    assert (row["title"], row["item_url"], row["price_minor"], row["currency"]) == (
        "Mug", URL, 1200, "USD")
    # ... and the page filled what the backend never said.
    assert (row["image_url"], row["brand"]) == (IMAGE, "Acme")
    assert row["sources"] == {"title": "backend", "item_url": "backend", "price": "backend",
                              "image_url": "browser", "brand": "browser"}
    assert row["source"] == "backend"


async def test_the_backend_overwrites_claims_and_claims_refresh_claims(backend):  # both backends
    async with running(backend.settings()) as (_, client):
        await browser(client, view(item(price="10.00", item_name="Old name", image_url=IMAGE)))
        await browser(client, view(item(price="11.00"), name="view_item_list"))
        assert (await product(backend))["price_minor"] == 1100  # a page's newer claim
        await backend_api(client, update(item(price="12.50", item_name="Mug")))
        await browser(client, view(item(price="9.00", item_name="Cheap")))
    row = (await product(backend))
    assert (row["price_minor"], row["title"], row["image_url"]) == (1250, "Mug", IMAGE)
    assert row["sources"]["price"] == row["sources"]["title"] == "backend"


async def test_only_the_backend_deletes_and_restores_a_product(backend):  # both backends
    async with running(backend.settings()) as (_, client):
        await backend_api(client, update(item(item_name="Mug", item_url=URL, image_url=IMAGE)))
        await backend_api(client, update({"item_id": "SKU-1", "deleted": True}))
        assert (await product(backend))["deleted"] == 1
        await browser(client, view(item(item_name="Mug", deleted=False)))  # a page can't
        assert (await product(backend))["deleted"] == 1
        await backend_api(client, update({"item_id": "SKU-1", "deleted": False}))
        assert (await product(backend))["deleted"] == 0
        await backend_api(client, update({"item_id": "SKU-1", "deleted": "yes"}), status=422)


async def test_an_unchanged_product_is_not_written_again(backend):  # both backends
    """The hot path: a view of a known, unchanged product writes no row (the writer's
    product cache), also after a restart (the row is read once, then compared)."""
    settings = backend.settings()
    async with running(settings) as (_, client):
        await browser(client, view(item(item_name="Mug")))
        first = (await product(backend))
        for _ in range(3):
            await browser(client, view(item(item_name="Mug"), name="add_to_cart"))
        assert (await product(backend)) == first
    async with running(settings) as (_, client):
        await browser(client, view(item(item_name="Mug")))
        assert (await product(backend)) == first
        await browser(client, view(item(item_name="Mug", item_brand="Acme")))
    changed = (await product(backend))
    assert changed["version"] == first["version"] + 1 and changed["brand"] == "Acme"
    assert changed["changed_ms"] >= first["changed_ms"]


async def test_a_failed_batch_leaves_the_cache_and_the_table_alike(tmp_path):
    """A request refused in the writer (a cart over the site's limit) rolls back its batch:
    the catalog change it made is gone from the table and from the writer's cache."""
    async with running(settings_for(tmp_path, max_cart_lines=1)) as (_, client):
        body = json.dumps({"site_id": "shop1", "sc": "ABCDEFGH-0000-0000-0000-000000000001",
                           "events": [view(item("SKU-1"), item("SKU-2"), name="view_cart")]})
        answer = await client.post("/e", content=body, headers={"content-type": "text/plain",
                                                                "origin": ORIGIN})
        assert answer.status_code == 422
        assert (await product(sqlite_at(tmp_path), "SKU-1")) is None
        await browser(client, view(item("SKU-1", item_name="Mug")))
    assert (await product(sqlite_at(tmp_path), "SKU-1"))["title"] == "Mug"


async def test_catalog_events_without_items_change_nothing(tmp_path):
    async with running(settings_for(tmp_path)) as (_, client):
        await browser(client, {"event": "view_item_list", "event_id": str(uuid.uuid4())},
                      view(name="view_cart"))
        await backend_api(client, {"event": "view_item_list", "event_id": str(uuid.uuid4()),
                               "user": {"email": "ann@example.com"}})
    assert (await product(sqlite_at(tmp_path))) is None


async def test_a_browser_cannot_send_product_updated(tmp_path):
    async with running(settings_for(tmp_path)) as (_, client):
        body = json.dumps({"site_id": "shop1", "events": [update(item(item_name="X"))]})
        answer = await client.post("/e", content=body, headers={"content-type": "text/plain",
                                                                "origin": ORIGIN})
        assert answer.status_code == 422
    assert (await product(sqlite_at(tmp_path))) is None


async def test_bad_catalog_fields_are_refused_naming_the_field(tmp_path):
    async with running(settings_for(tmp_path)) as (_, client):
        got = await backend_api(client, update(item(availability="sometimes")), status=422)
        assert got["errors"][0]["field"] == "body[0].ecommerce.items[0].availability"
        got = await backend_api(client, update(item(item_group_id=["a"])), status=422)
        assert got["errors"][0]["field"] == "body[0].ecommerce.items[0].item_group_id"
        assert (await product(sqlite_at(tmp_path))) is None  # nothing of a refused request is stored
        await backend_api(client, update(item(availability="Pre Order")), status=422)
        await backend_api(client, update(item(availability="in stock")))
        assert (await product(sqlite_at(tmp_path)))["availability"] == "in_stock"
        await backend_api(client, update(item(availability="PREORDER")))
    assert (await product(sqlite_at(tmp_path)))["availability"] == "preorder"


def test_onetag_catalog_counts_products_and_what_the_feeds_leave_out(tmp_path, capsys):
    import asyncio

    config_path = tmp_path / "onetag.toml"
    config_path.write_text(
        f'[server]\ndatabase = "sqlite:///{tmp_path}/onetag.db"\nforward = false\n'
        'public_url = "https://data.shop.example"\n\n[[sites]]\nid = "shop1"\n'
        f'api_key = "{API_KEY}"\nfeed_token = "env:FEED_TOKEN_UNSET_HERE"\n\n'
        '[[sites]]\nid = "shop2"\nfeed_token = "a-feed-token-0123456789"\n')

    async def fill() -> None:
        async with running(settings_for(tmp_path)) as (_, client):
            await backend_api(client, update(item("A", item_name="A", item_url=URL, image_url=IMAGE),
                                         item("B", item_name="B", item_url=URL),
                                         item("C", item_name="C", image_url=IMAGE),
                                         item("D", item_name="D", item_url=URL, image_url=IMAGE),
                                         item("-F", item_name="F", item_url=URL, image_url=IMAGE)))
            await backend_api(client, update({"item_id": "D", "deleted": True}))
            await browser(client, view(item("E", item_name="E", item_url=URL, image_url=IMAGE)))

    asyncio.run(fill())
    assert cli.main(["catalog", "--config", str(config_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    shop1 = next(site for site in report["sites"] if site["site"] == "shop1")
    assert (shop1["products"], shop1["in_feed"], shop1["backend"], shop1["browser_only"]) == (
        6, 3, 5, 1)
    assert shop1["left_out"] == {"no image_url": 1, "no item_url": 1, "deleted": 1}
    # "-F" is in products.xml, not products.csv (an id that opens as a spreadsheet formula).
    assert shop1["not_in_csv"] == 1
    assert shop1["feeds"] is None  # its token's variable is unset here: no feed
    shop2 = next(site for site in report["sites"] if site["site"] == "shop2")
    assert shop2["products"] == 0
    assert shop2["feeds"]["xml"] == ("https://data.shop.example/feeds/shop2/products.xml"
                                     "?token=<feed_token>")
    assert cli.main(["catalog", "--config", str(config_path), "--site", "shop2"]) == 0
    text = capsys.readouterr().out
    assert "a-feed-token-0123456789" not in text and "shop2: 0 products" in text
    assert cli.main(["catalog", "--config", str(config_path)]) == 0
    text = capsys.readouterr().out
    assert "shop1: 6 products (5 from the backend, 1 seen only in pages); 3 in the feeds " \
           "(1 of them not in products.csv: its id, sku or item_group_id opens as a " \
           "spreadsheet formula); 3 left out (1 deleted, 1 no image_url, 1 no item_url)" in text
    assert "no feed: set sites[shop1].feed_token" in text


# The rules, by property ------------------------------------------------------------------

FIELD_VALUES = {"title": st.sampled_from(["Mug", "Cup", "Bowl"]),
                "price": st.tuples(st.integers(0, 5000), st.sampled_from(["USD", "EUR"])),
                "availability": st.sampled_from(catalog.AVAILABILITY),
                "brand": st.sampled_from(["Acme", "Other"])}
OBSERVATION = st.tuples(st.booleans(), st.fixed_dictionaries(
    {}, optional={name: values for name, values in FIELD_VALUES.items()}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OBSERVATION, max_size=12))
def test_a_field_ends_as_the_backends_last_word_else_the_pages(observations):
    product = None
    for now, (fact, fields) in enumerate(observations, start=1):
        before = None if product is None else dict(product.fields)
        product, write = merge(product, dict(fields), fact, None, now)
        if before is not None and product.fields != before:
            assert write
    for name in FIELD_VALUES:
        facts = [fields[name] for fact, fields in observations if fact and name in fields]
        claims = [fields[name] for fact, fields in observations if not fact and name in fields]
        expected = facts[-1] if facts else (claims[-1] if claims else None)
        assert (product.fields.get(name) if product else None) == expected
        if product is not None and name in product.fields:
            assert product.sources[name] == ("backend" if facts else "browser")


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["availability", "deleted", "item_group_id",
                            "google_product_category"]), value=ANY_JSON)
def test_catalog_item_fields_are_normalised_or_refused_naming_the_field(key, value):
    origin = events.Origin(site_id="shop1", source="backend", currency="USD",
                           received_ms=1_800_000_000_000)
    raw = update(item(**{key: value}))
    try:
        event = events.normalise(raw, "events[0]", origin)
    except events.Invalid as exc:
        assert exc.field.startswith(f"events[0].ecommerce.items[0].{key}"), exc.field
        return
    normalised = event["ecommerce"]["items"][0]
    if key == "availability":
        assert normalised.get("availability") in (None, *catalog.AVAILABILITY)
    elif key == "deleted":
        assert normalised.get("deleted") in (None, True, False)
    else:
        assert normalised.get(key) is None or isinstance(normalised[key], str)


def test_last_seen_is_written_once_an_hour_not_per_view():
    product, write = merge(None, {"title": "Mug"}, False, None, 1_000)
    assert write
    product.stored = True
    assert merge(product, {"title": "Mug"}, False, None, 2_000)[1] is False
    later = 1_000 + catalog.LAST_SEEN_STEP_MS
    product, write = merge(product, {"title": "Mug"}, False, None, later)
    assert write and product.last_seen_ms == later and product.version == 1


@pytest.mark.parametrize("row, problem", [
    ({"deleted": 1}, "deleted"), ({"item_url": None}, "no item_url"),
    ({"image_url": ""}, "no image_url"), ({"title": None}, "no title"),
    ({"price_minor": None}, "no price"), ({}, None),
    # Stored before events refused them: a script or a document is no link or image.
    ({"item_url": "javascript:alert(document.domain)"}, "no item_url"),
    ({"image_url": "data:text/html,<script>alert(1)</script>"}, "no image_url"),
    # The same rule as events' (events.is_http_url): a host, and no control character.
    ({"item_url": "https://"}, "no item_url"), ({"image_url": "http:///mug.png"}, "no image_url"),
    ({"item_url": "https://shop.example/p\nX-Injected: 1"}, "no item_url"),
    ({"image_url": "http://[::1/mug.png"}, "no image_url"),
    ({"item_url": "HTTP://shop.example/p"}, None)])
def test_what_the_feeds_leave_out(row, problem):
    base = {"deleted": 0, "item_url": URL, "image_url": IMAGE, "title": "Mug",
            "price_minor": 100, "currency": "USD"}
    assert catalog.feed_problem({**base, **row}) == problem
