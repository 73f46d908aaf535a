-- previous release: compatible
-- Compatible: new tables; what an earlier node ingests meanwhile is not in the catalog
-- (a later page view adds it).
-- The product catalog (server/catalog.py), one row per (site, item_id), kept inside the
-- ingest transaction from what pages show (view_item, view_item_list, cart items: claims)
-- and what the backend states (product_updated: facts). Money is integer minor units of
-- `currency`, as everywhere. `sources` is JSON {field: "backend" | "browser"}: who set each
-- field; a browser claim never replaces a field the backend set. `source` is the row's:
-- "backend" once the backend stated anything about it. `version` counts changes of any
-- field (and of `deleted`), `changed_ms` is when the last one was made: the feeds' ETag and
-- Last-Modified. `fact_version`/`fact_ms` count and date the changes of backend-stated
-- fields alone: the Sendlane product sync plans from them (server/product_sync.py), except
-- the version whose own event already planned Sendlane's product-added (`planned_version`).
-- `last_seen_ms` is written at most once an hour a product (catalog.LAST_SEEN_STEP_MS), so
-- a page view of a known product writes nothing.
CREATE TABLE products (
    site_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    title TEXT,
    item_url TEXT,
    image_url TEXT,
    price_minor INTEGER,
    currency TEXT,
    availability TEXT,
    categories TEXT,
    brand TEXT,
    variant TEXT,
    item_group_id TEXT,
    sku TEXT,
    description TEXT,
    google_product_category TEXT,
    sources TEXT NOT NULL,
    source TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    changed_ms INTEGER NOT NULL,
    version INTEGER NOT NULL,
    fact_version INTEGER NOT NULL DEFAULT 0,
    fact_ms INTEGER,
    planned_version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site_id, item_id)
) WITHOUT ROWID;
-- The product sync's change pass: a site's backend changes since its cursor.
CREATE INDEX products_fact ON products (site_id, fact_ms);
-- Where each site's product sync is, per vendor: (`fact_ms`, `fact_after`) the change cursor
-- (every change up to that product at that time was planned); `night` the UTC date (YYYY-MM-DD) of the last nightly pass
-- finished, `night_after` the item_id a nightly pass in progress has planned up to.
CREATE TABLE product_sync (
    site_id TEXT NOT NULL,
    vendor TEXT NOT NULL,
    fact_ms INTEGER NOT NULL DEFAULT 0,
    fact_after TEXT NOT NULL DEFAULT '',
    night TEXT,
    night_after TEXT,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (site_id, vendor)
)
