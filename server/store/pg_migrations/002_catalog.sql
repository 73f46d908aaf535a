-- previous release: compatible
-- Compatible: new tables, and a foreign key dropped (fewer refusals).
-- The product catalog (server/catalog.py): SQLite's migration 009, in PostgreSQL's dialect.
-- One row per (site, item_id), kept inside the ingest transaction (pg_catalog.py); `sources`
-- and `categories` are JSON text, as everywhere in this schema (001 says why).
CREATE TABLE products (
    site_id                 TEXT NOT NULL,
    item_id                 TEXT NOT NULL,
    title                   TEXT,
    item_url                TEXT,
    image_url               TEXT,
    price_minor             BIGINT,
    currency                TEXT,
    availability            TEXT,
    categories              TEXT,
    brand                   TEXT,
    variant                 TEXT,
    item_group_id           TEXT,
    sku                     TEXT,
    description             TEXT,
    google_product_category TEXT,
    sources                 TEXT NOT NULL,
    source                  TEXT NOT NULL,
    deleted                 SMALLINT NOT NULL DEFAULT 0,
    first_seen_ms           BIGINT NOT NULL,
    last_seen_ms            BIGINT NOT NULL,
    updated_ms              BIGINT NOT NULL,
    changed_ms              BIGINT NOT NULL,
    version                 INTEGER NOT NULL,
    fact_version            INTEGER NOT NULL DEFAULT 0,
    fact_ms                 BIGINT,
    planned_version         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site_id, item_id)
);
CREATE INDEX products_fact ON products (site_id, fact_ms);
CREATE TABLE product_sync (
    site_id     TEXT NOT NULL,
    vendor      TEXT NOT NULL,
    fact_ms     BIGINT NOT NULL DEFAULT 0,
    fact_after  TEXT NOT NULL DEFAULT '',
    night       TEXT,
    night_after TEXT,
    updated_ms  BIGINT NOT NULL,
    PRIMARY KEY (site_id, vendor)
);
-- The product sync's deliveries belong to no event (event_seq 0, as in SQLite, which never
-- enforced this reference): the foreign key goes.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_event_seq_fkey;
