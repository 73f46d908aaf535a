"""The catalog's side of an ingest transaction: products read once, merged, written if changed.

``server/catalog.py`` has the rules; this keeps ``products`` rows. A batch collects what its
events say about products (``CatalogBatch.observe``), then reads the products it lacks in
one query per site, merges every observation in order, and writes only the rows that
changed (``flush``) with one ``executemany``. The writer keeps the products it has read or
written (``ProductCache``, held by the ``SessionCache`` and emptied with it: on a rollback,
or when another connection committed), so a page view of a known, unchanged product costs
a dictionary look-up and a comparison, and no write.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Iterable, Mapping, Sequence

from .. import catalog
from ..catalog import Product
from ..jsontext import encode, loads

CHUNK = 400

_SELECT = ("SELECT item_id, " + ", ".join(catalog.COLUMNS) + ", sources, deleted, first_seen_ms, "
           "last_seen_ms, changed_ms, version, fact_version, fact_ms, planned_version FROM products "
           "WHERE site_id = ? AND item_id IN ")
_WRITTEN = ("site_id", "item_id", *catalog.COLUMNS, "sources", "source", "deleted",
            "first_seen_ms", "last_seen_ms", "updated_ms", "changed_ms", "version",
            "fact_version", "fact_ms", "planned_version")
_UPSERT = (f"INSERT INTO products ({', '.join(_WRITTEN)}) VALUES ({', '.join('?' * len(_WRITTEN))}) "
           "ON CONFLICT (site_id, item_id) DO UPDATE SET "
           + ", ".join(f"{name} = excluded.{name}" for name in _WRITTEN[2:]
                       if name != "first_seen_ms"))


def from_row(row: Sequence[Any]) -> Product:
    """A ``products`` row (``_SELECT``'s columns after item_id) as a ``Product``."""
    (title, item_url, image_url, price_minor, currency, availability, categories, brand,
     variant, group, sku, description, google_category, sources, deleted, first_seen,
     last_seen, changed, version, fact_version, fact_ms, planned_version) = row
    values = {"title": title, "item_url": item_url, "image_url": image_url,
              "price": (price_minor, currency) if price_minor is not None else None,
              "availability": availability,
              "categories": tuple(loads(categories)) if categories else None,
              "brand": brand, "variant": variant, "item_group_id": group, "sku": sku,
              "description": description, "google_product_category": google_category}
    fields = {name: value for name, value in values.items() if value is not None}
    return Product(fields, loads(sources) if sources else {}, bool(deleted), first_seen,
                   last_seen, changed, version, fact_version, fact_ms, planned_version)


def to_row(site_id: str, item_id: str, product: Product, now: int) -> tuple[Any, ...]:
    f = product.fields
    price_minor, currency = f.get("price") or (None, None)
    categories = f.get("categories")
    return (site_id, item_id, f.get("title"), f.get("item_url"), f.get("image_url"),
            price_minor, currency, f.get("availability"),
            encode(list(categories)).decode() if categories else None,
            f.get("brand"), f.get("variant"), f.get("item_group_id"), f.get("sku"),
            f.get("description"), f.get("google_product_category"),
            encode(product.sources).decode(), product.source, int(product.deleted),
            product.first_seen_ms, product.last_seen_ms, now, product.changed_ms,
            product.version, product.fact_version, product.fact_ms, product.planned_version)


class ProductCache:
    """The products this writer has read or written, by (site_id, item_id); None marks one
    the database does not have. Right only while this connection is the only writer and
    every change it saw was committed: ``SessionCache`` empties it with its own state."""

    def __init__(self, limit: int = 50_000):
        self.limit = limit
        self.products: dict[tuple[str, str], Product | None] = {}

    def clear(self) -> None:
        self.products.clear()

    def trim(self) -> None:
        if len(self.products) > self.limit:
            self.products.clear()


class CatalogBatch:
    """One ingest batch's product observations, applied at its end (``flush``)."""

    def __init__(self, conn: sqlite3.Connection, cache: ProductCache, now: int):
        self.conn = conn
        self.cache = cache
        self.now = now
        self.work: list[tuple[str, str, dict[str, Any], bool, bool | None, bool]] = []

    def observe(self, site_id: str, event: dict[str, Any],
                planned: frozenset[str] = frozenset()) -> None:
        """``planned``: the item_ids whose Sendlane product-added the event's own deliveries
        carry (``product_sync.planned_by_event``)."""
        if event["source"] != catalog.BACKEND:  # the hot path: a page's items, inline
            ecommerce = event.get("ecommerce")
            if not ecommerce:
                return  # (a view_item_list may come without)
            currency = ecommerce["currency"]
            append = self.work.append
            for item in ecommerce["items"]:
                append((site_id, item["item_id"], catalog.stated(item, currency), False, None,
                        False))
            return
        for item_id, fields, fact, deleted in catalog.observations(event):
            self.work.append((site_id, item_id, fields, fact, deleted, item_id in planned))

    def flush(self) -> int:
        """Merge what was observed; write the changed rows. Returns how many were written."""
        if not self.work:
            return 0
        products = self.cache.products
        self._load({(site_id, item_id) for site_id, item_id, *_ in self.work} - products.keys())
        dirty: dict[tuple[str, str], Product] = {}
        for site_id, item_id, fields, fact, deleted, planned in self.work:
            key = (site_id, item_id)
            product, write = catalog.merge(products.get(key), fields, fact, deleted, self.now,
                                           planned)
            products[key] = product
            if write:
                dirty[key] = product
        self.work.clear()
        if dirty:
            self.conn.executemany(_UPSERT, [to_row(site_id, item_id, product, self.now)
                                            for (site_id, item_id), product in dirty.items()])
            for product in dirty.values():
                product.stored = True
        self.cache.trim()
        return len(dirty)

    def prices(self, site_id: str, item_ids: Iterable[str]) -> dict[str, tuple[int, str]]:
        """The catalog's price (minor units, currency) of each of ``item_ids`` that has one,
        as committed (the cache, else the database; what this batch observed is merged
        only at its end), for lines that came without one (``catalog.add_prices``)."""
        products = self.cache.products
        wanted = {(site_id, item_id) for item_id in item_ids}
        self._load(wanted - products.keys())
        found = {}
        for key in wanted:
            product = products.get(key)
            price = product.fields.get("price") if product is not None else None
            if price is not None and price[1]:
                found[key[1]] = price
        return found

    def _load(self, keys: Iterable[tuple[str, str]]) -> None:
        by_site: dict[str, list[str]] = {}
        for site_id, item_id in keys:
            by_site.setdefault(site_id, []).append(item_id)
            self.cache.products[(site_id, item_id)] = None
        for site_id, item_ids in by_site.items():
            for start in range(0, len(item_ids), CHUNK):
                chunk = item_ids[start:start + CHUNK]
                for row in self.conn.execute(_SELECT + f"({','.join('?' * len(chunk))})",
                                             (site_id, *chunk)):
                    self.cache.products[(site_id, row[0])] = from_row(tuple(row)[1:])


# Reads (the feeds, `onetag catalog`, the product sync) ---------------------------------

FEED_COLUMNS = ("item_id", *catalog.COLUMNS, "deleted", "source", "changed_ms")


# Up to a page of a site's products after an item_id (item_id order: keyset paging, so a
# page costs the same at the end of a large catalog as at its start).
FEED_PAGE_SQL = (f"SELECT {', '.join(FEED_COLUMNS)} FROM products WHERE site_id = ? "
                 "AND item_id > ? ORDER BY item_id LIMIT ?")


def as_dict(row: Sequence[Any]) -> dict[str, Any]:
    item = dict(zip(FEED_COLUMNS, row))
    item["categories"] = loads(item["categories"]) if item["categories"] else []
    return item


STATE_SQL = ("SELECT count(*), coalesce(max(changed_ms), 0), coalesce(sum(version), 0) "
             "FROM products WHERE site_id = ?")


def stats(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for ``onetag catalog``: products, how many the feed has, left out and why."""
    out: dict[str, Any] = {"products": 0, "in_feed": 0, "left_out": {},
                           "backend": 0, "browser_only": 0, "last_change_ms": None}
    for row in rows:
        out["products"] += 1
        out["backend" if row["source"] == catalog.BACKEND else "browser_only"] += 1
        problem = catalog.feed_problem(row)
        if problem is None:
            out["in_feed"] += 1
        else:
            out["left_out"][problem] = out["left_out"].get(problem, 0) + 1
        if out["last_change_ms"] is None or row["changed_ms"] > out["last_change_ms"]:
            out["last_change_ms"] = row["changed_ms"]
    return out


# The Sendlane product sync's writer job (server/product_sync.py) --------------------------

_PRODUCT = _SELECT.split(" WHERE ")[0]  # the same columns, any condition
_SYNC_INSERT = (
    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, next_attempt_ms, created_ms, updated_ms) "
    "VALUES (?, ?, ?, 0, 0, ?, 'pending', CAST(? AS TEXT), ?, ?, ?) "
    "ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING")


def sync_requests(site: Any, changed: Iterable[Any], nightly: Iterable[Any],
                  night: str | None) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The deliveries one product-sync pass plans from the product rows it read (item_id, then
    ``from_row``'s columns), the same on both backends: ``(item_id, VendorRequest)`` for each
    changed product whose version its own event did not already send, then for each product of
    the night's pass. A product with no item to send (``product_sync.item_of``) is skipped."""
    from .. import product_sync  # the rules; imported here, as they import the vendors

    def planned(rows: Iterable[Any], key: Callable[[str, Product], str | None]
                ) -> list[tuple[str, Any]]:
        out = []
        for row in rows:
            item_id, product = row[0], from_row(tuple(row)[1:])
            dedup = key(item_id, product)
            item = product_sync.item_of(item_id, product) if dedup is not None else None
            if item is not None:
                out.append((item_id, product_sync.request_for(site, item, dedup)))
        return out

    changes = planned(changed, lambda item_id, product: product_sync.change_key(item_id, product)
                      if product.planned_version != product.fact_version else None)
    return changes, planned(nightly, lambda item_id, product: product_sync.night_key(
        item_id, product, night))


def plan_sync(conn: sqlite3.Connection, site: Any, now: int, night: str | None,
              limit: int) -> dict[str, Any]:
    """Plan up to ``limit`` changed products and ``limit`` of the nightly pass, for one site.

    Changes: the products whose backend facts changed after the cursor (fact_ms, item_id),
    in that order, except a version its own event already sent (``planned_version``). The
    nightly pass: when ``night`` is a date whose pass has not finished, the products after
    ``night_after`` in item_id order. Delivery rows have no event (``event_seq`` 0) and
    queue per product (visitor ``product:<item_id>``). ``more``: call again.
    """
    from .. import product_sync  # the rules; imported here, as they import the vendors

    vendor = product_sync.VENDOR
    conn.execute("INSERT INTO product_sync (site_id, vendor, updated_ms) VALUES (?, ?, ?) "
                 "ON CONFLICT (site_id, vendor) DO NOTHING", (site.id, vendor, now))
    cursor_ms, cursor_item, done_night, night_after = conn.execute(
        "SELECT fact_ms, fact_after, night, night_after FROM product_sync "
        "WHERE site_id = ? AND vendor = ?", (site.id, vendor)).fetchone()
    changed = conn.execute(
        f"{_PRODUCT} WHERE site_id = ? AND fact_ms IS NOT NULL AND (fact_ms, item_id) > (?, ?) "
        "ORDER BY fact_ms, item_id LIMIT ?", (site.id, cursor_ms, cursor_item, limit)).fetchall()
    if changed:
        cursor_ms, cursor_item = changed[-1]["fact_ms"], changed[-1][0]
    more = len(changed) == limit
    nightly: list[Any] = []
    if night is not None and done_night != night:
        nightly = conn.execute(f"{_PRODUCT} WHERE site_id = ? AND item_id > ? AND deleted = 0 "
                               "ORDER BY item_id LIMIT ?",
                               (site.id, night_after or "", limit)).fetchall()
        if len(nightly) == limit:
            night_after, more = nightly[-1][0], True
        else:
            done_night, night_after = night, None
    changes, nights = sync_requests(site, changed, nightly, night)
    rows = [(site.id, vendor, request.dedup_key, f"product:{item_id}", encode(request.to_row()),
             now, now, now) for item_id, request in changes + nights]
    if rows:
        conn.executemany(_SYNC_INSERT, rows)
    conn.execute("UPDATE product_sync SET fact_ms = ?, fact_after = ?, night = ?, "
                 "night_after = ?, updated_ms = ? WHERE site_id = ? AND vendor = ?",
                 (cursor_ms, cursor_item, done_night, night_after, now, site.id, vendor))
    return {"changes": len(changes), "nightly": len(nights), "more": more}
