"""The catalog on PostgreSQL: products kept inside each node's ingest transaction, the
feeds' reads, and the Sendlane product sync's planning step.

The rules are ``server/catalog.py``'s (``merge``) and the row shape ``sqlite_catalog``'s
(``from_row``, ``to_row``: pure). Without a cache (other nodes write ``products`` too), a
batch reads the products its events name, and locks ``FOR UPDATE`` (in (site_id, item_id)
order, after its sessions and identities, ``pg_ingest``) only those it will write: two
nodes merging into one product wait for each other instead of one overwriting the other,
and a batch that changes nothing takes no lock on the shop's hottest rows. A product both believed new is inserted
by one; the other's insert fails on the primary key and its transaction is run again,
finding it.
"""

from __future__ import annotations

from typing import Any, Mapping

from .. import catalog
from ..catalog import Product
from ..jsontext import encode
from .sqlite_catalog import _WRITTEN, FEED_COLUMNS, as_dict, from_row, sync_requests, to_row

_ROW = ("item_id", *catalog.COLUMNS, "sources", "deleted", "first_seen_ms", "last_seen_ms",
        "changed_ms", "version", "fact_version", "fact_ms", "planned_version")
_PRODUCT = f"SELECT {', '.join(_ROW)} FROM products"  # sqlite_catalog.from_row's, after item_id
_MARKS = ", ".join(f"${i}" for i in range(1, len(_WRITTEN) + 1))
_INSERT = f"INSERT INTO products ({', '.join(_WRITTEN)}) VALUES ({_MARKS})"
_UPDATE = (f"UPDATE products SET "
           + ", ".join(f"{name} = ${i + 1}" for i, name in enumerate(_WRITTEN)
                       if name not in ("site_id", "item_id"))
           + " WHERE site_id = $1 AND item_id = $2")


class PgCatalogBatch:
    """One ingest transaction's product observations, merged and written by ``flush``."""

    def __init__(self, conn: Any, now: int):
        self.conn = conn
        self.now = now
        self.work: list[tuple[str, str, dict[str, Any], bool, bool | None, bool]] = []
        # Committed prices this batch already knows (None: no price), so that a product is
        # read at most once a batch, and not at all when the batch's unlocked read had it.
        self._prices: dict[tuple[str, str], tuple[int, str] | None] = {}

    def know_prices(self, products: Mapping[tuple[str, str], Product | None]) -> None:
        """The prices of products the batch read as last committed (``products_read``)."""
        for key, product in products.items():
            price = product.fields.get("price") if product is not None else None
            self._prices[key] = price if price is not None and price[1] else None

    def observe(self, site_id: str, event: dict[str, Any],
                planned: frozenset[str] = frozenset()) -> None:
        """As ``sqlite_catalog.CatalogBatch.observe``."""
        if event["source"] != catalog.BACKEND:
            ecommerce = event.get("ecommerce")
            if not ecommerce:
                return
            currency = ecommerce["currency"]
            for item in ecommerce["items"]:
                self.work.append((site_id, item["item_id"], catalog.stated(item, currency),
                                  False, None, False))
            return
        for item_id, fields, fact, deleted in catalog.observations(event):
            self.work.append((site_id, item_id, fields, fact, deleted, item_id in planned))

    async def prices(self, site_id: str, item_ids: list[str]) -> dict[str, tuple[int, str]]:
        """As ``sqlite_catalog.CatalogBatch.prices``: the committed products' prices, read
        without a lock, once a batch (an optimistic batch's connection refuses a read it
        did not already make: the run is locked)."""
        missing = sorted({item_id for item_id in item_ids
                          if (site_id, item_id) not in self._prices})
        if missing:
            rows = await self.conn.fetch(
                "SELECT item_id, price_minor, currency FROM products WHERE site_id = $1 AND "
                "item_id = ANY($2::text[]) AND price_minor IS NOT NULL AND currency IS NOT NULL",
                site_id, missing)
            self._prices.update(dict.fromkeys((site_id, item_id) for item_id in missing))
            for row in rows:
                self._prices[(site_id, row["item_id"])] = (row["price_minor"], row["currency"])
        return {item_id: price for item_id in item_ids
                if (price := self._prices[(site_id, item_id)]) is not None}

    def keys(self) -> list[tuple[str, str]]:
        """The (site_id, item_id) of every product observed, in order."""
        return sorted({(site_id, item_id) for site_id, item_id, *_ in self.work})

    async def flush(self, read: dict[tuple[str, str], Product | None] | None = None) -> int:
        """Merge what was observed; write the changed rows. Returns how many were written.
        ``read``: the products of ``keys()`` as ``products_read`` made them from a read
        the caller already did (``pg_ingest`` does it in its last write, saving a round
        trip); else they are read here.

        Most observations change nothing (a browser naming a product as it is stored), and
        the products a shop's visitors name are few and hot: locking each one named would
        make every ingest transaction of every node wait for the previous one's commit. So
        the products are read first without a lock and merged; only those the merge would
        write are then locked (``FOR UPDATE``, in key order), read again as the last commit
        left them, and merged again from that. A product left unwritten was merged against
        a committed state, which is what a serial order with this batch first would do.
        """
        if not self.work:
            return 0
        products = (read if read is not None
                    else await self._read(self.keys(), lock=False))
        wanted = self.writes(products)
        if not wanted:
            self.work.clear()
            return 0
        locked = await self._read(wanted, lock=True)
        merged = self._merged(locked)
        self.work.clear()
        rows = [(key, to_row(*key, product, self.now))
                for key, (product, write) in sorted(merged.items()) if write]
        inserts = [row for key, row in rows if locked[key] is None]
        updates = [row for key, row in rows if locked[key] is not None]
        if inserts:
            await self.conn.executemany(_INSERT, inserts)
        if updates:
            await self.conn.executemany(_UPDATE, updates)
        return len(rows)

    async def _read(self, keys: list[tuple[str, str]], lock: bool
                    ) -> dict[tuple[str, str], Product | None]:
        rows = await self.conn.fetch(read_statement(1, lock), [k[0] for k in keys],
                                     [k[1] for k in keys])
        return products_read(keys, rows)

    def writes(self, products: dict[tuple[str, str], Product | None]) -> list[tuple[str, str]]:
        """The products the batch's observations would write, merged against ``products``
        (as read, unlocked), in key order."""
        return sorted(key for key, (_, write) in self._merged(products).items() if write)

    def _merged(self, products: dict[tuple[str, str], Product | None]
                ) -> dict[tuple[str, str], tuple[Product, bool]]:
        """The batch's observations of ``products`` merged in order: (product, written)."""
        merged: dict[tuple[str, str], tuple[Product, bool]] = {}
        for site_id, item_id, fields, fact, deleted, planned in self.work:
            key = (site_id, item_id)
            if key not in products:
                continue
            before, written = merged.get(key, (products[key], False))
            product, write = catalog.merge(before, fields, fact, deleted, self.now, planned)
            merged[key] = (product, written or write)
        return merged


def read_statement(first: int, lock: bool) -> str:
    """The products named by two arrays (site ids ``$first``, item ids after it; in key
    order), ``FOR UPDATE`` if ``lock``: a probe of the primary key a pair (LATERAL; LIMIT 1
    keeps the planner from flattening it into a join), locking in the arrays' order. As a
    join, the writer's generic plan (``pg_writer.create_pool``) made while the table was
    small hashed a scan of the whole table."""
    columns, source = read_parts(first, lock)
    return f"SELECT {columns}{source}"


def read_parts(first: int, lock: bool) -> tuple[str, str]:
    """``read_statement``'s select list and its FROM clause, for a statement to embed."""
    return ("u.s, " + ", ".join(f"p.{c}" for c in _ROW),
            f" FROM unnest(${first}::text[], ${first + 1}::text[]) AS u(s, i) CROSS JOIN "
            "LATERAL (SELECT * FROM products WHERE site_id = u.s AND item_id = u.i"
            + " LIMIT 1" + (" FOR UPDATE" if lock else "") + ") AS p")


def products_read(keys: list[tuple[str, str]], rows: Any
                  ) -> dict[tuple[str, str], Product | None]:
    """``read_statement``'s rows by key; None for a key no row has."""
    products: dict[tuple[str, str], Product | None] = dict.fromkeys(keys)
    for row in rows:
        products[(row[0], row[1])] = from_row(tuple(row)[2:])
    return products


# Reads ------------------------------------------------------------------------------------

async def catalog_state(conn: Any, site_id: str) -> tuple[int, int, int]:
    count, changed, versions = await conn.fetchrow(
        "SELECT count(*), coalesce(max(changed_ms), 0), coalesce(sum(version), 0) "
        "FROM products WHERE site_id = $1", site_id)
    return int(count), int(changed), int(versions)


async def catalog_page(conn: Any, site_id: str, after: str | None,
                       limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT {', '.join(FEED_COLUMNS)} FROM products WHERE site_id = $1 "
                            "AND item_id > $2 ORDER BY item_id LIMIT $3", site_id, after or "",
                            limit)
    return [as_dict(tuple(row)) for row in rows]


# The Sendlane product sync's planning step (server/product_sync.py) ------------------------

_SYNC_INSERT = (
    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, next_attempt_ms, created_ms, updated_ms) "
    "VALUES ($1, $2, $3, 0, 0, $4, 'pending', $5, $6, $7, $8) "
    "ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING")


async def plan_sync(conn: Any, site: Any, now: int, night: str | None,
                    limit: int) -> dict[str, Any]:
    """``sqlite_catalog.plan_sync`` in one transaction; the site's ``product_sync`` row is
    locked first, so two nodes' product syncs take turns instead of planning twice."""
    from .. import product_sync

    vendor = product_sync.VENDOR
    await conn.execute("INSERT INTO product_sync (site_id, vendor, updated_ms) "
                       "VALUES ($1, $2, $3) ON CONFLICT (site_id, vendor) DO NOTHING",
                       site.id, vendor, now)
    cursor_ms, cursor_item, done_night, night_after = await conn.fetchrow(
        "SELECT fact_ms, fact_after, night, night_after FROM product_sync "
        "WHERE site_id = $1 AND vendor = $2 FOR UPDATE", site.id, vendor)
    changed = await conn.fetch(
        f"{_PRODUCT} WHERE site_id = $1 AND fact_ms IS NOT NULL "
        "AND (fact_ms, item_id) > ($2, $3) ORDER BY fact_ms, item_id LIMIT $4",
        site.id, cursor_ms, cursor_item, limit)
    if changed:
        cursor_ms, cursor_item = changed[-1]["fact_ms"], changed[-1][0]
    more = len(changed) == limit
    nightly: list[Any] = []
    if night is not None and done_night != night:
        nightly = await conn.fetch(f"{_PRODUCT} WHERE site_id = $1 AND item_id > $2 "
                                   "AND deleted = 0 ORDER BY item_id LIMIT $3",
                                   site.id, night_after or "", limit)
        if len(nightly) == limit:
            night_after, more = nightly[-1][0], True
        else:
            done_night, night_after = night, None
    changes, nights = sync_requests(site, changed, nightly, night)
    rows = [(site.id, vendor, request.dedup_key, f"product:{item_id}",
             encode(request.to_row()).decode(), now, now, now)
            for item_id, request in changes + nights]
    if rows:
        await conn.executemany(_SYNC_INSERT, rows)
    await conn.execute("UPDATE product_sync SET fact_ms = $1, fact_after = $2, night = $3, "
                       "night_after = $4, updated_ms = $5 WHERE site_id = $6 AND vendor = $7",
                       cursor_ms, cursor_item, done_night, night_after, now, site.id, vendor)
    return {"changes": len(changes), "nightly": len(nights), "more": more}
