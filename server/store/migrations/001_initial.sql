-- previous release: breaks
-- Breaks: the first migration: no release runs without it.
-- Sessions, identities, events, carts and the delivery outbox.
CREATE TABLE identities (
    id                INTEGER PRIMARY KEY,
    site_id           TEXT NOT NULL,
    email             TEXT,
    customer_id       TEXT,
    first_name        TEXT,
    last_name         TEXT,
    phone             TEXT,
    accepts_marketing INTEGER,
    created_ms        INTEGER NOT NULL,
    updated_ms        INTEGER NOT NULL
);
CREATE UNIQUE INDEX identities_email ON identities (site_id, email) WHERE email IS NOT NULL;
CREATE UNIQUE INDEX identities_customer ON identities (site_id, customer_id) WHERE customer_id IS NOT NULL;

CREATE TABLE sessions (
    site_id     TEXT NOT NULL,
    sc          TEXT NOT NULL,
    identity_id INTEGER REFERENCES identities (id),
    first_ms    INTEGER NOT NULL,
    last_ms     INTEGER NOT NULL,
    user_agent  TEXT,
    last_page   TEXT,
    PRIMARY KEY (site_id, sc)
) WITHOUT ROWID;
CREATE INDEX sessions_identity ON sessions (identity_id);

CREATE TABLE carts (
    site_id    TEXT NOT NULL,
    sc         TEXT NOT NULL,
    guid       TEXT NOT NULL,
    currency   TEXT NOT NULL,
    items      TEXT NOT NULL,          -- JSON list of normalised items
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (site_id, sc)
) WITHOUT ROWID;

CREATE TABLE events (
    seq         INTEGER PRIMARY KEY,   -- arrival order
    site_id     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    name        TEXT NOT NULL,
    source      TEXT NOT NULL,
    sc          TEXT,
    identity_id INTEGER REFERENCES identities (id),
    received_ms INTEGER NOT NULL,
    raw         TEXT NOT NULL,         -- the event as sent
    data        TEXT NOT NULL,         -- the normalised event (docs/architecture.md)
    UNIQUE (site_id, event_id)
);
CREATE INDEX events_session ON events (site_id, sc, seq);

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    site_id         TEXT NOT NULL,
    vendor          TEXT NOT NULL,
    dedup_key       TEXT NOT NULL,
    event_seq       INTEGER NOT NULL REFERENCES events (seq),
    visitor         TEXT NOT NULL,
    state           TEXT NOT NULL,     -- held | pending | delivered | dead | browser | expired
    request         TEXT NOT NULL,     -- JSON {method, url, json, headers}; no secrets
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    delivered_ms    INTEGER,
    UNIQUE (site_id, vendor, dedup_key)
);
CREATE INDEX deliveries_due ON deliveries (state, vendor, next_attempt_ms);
CREATE INDEX deliveries_visitor ON deliveries (site_id, vendor, visitor, state, id);
CREATE INDEX deliveries_event ON deliveries (event_seq);
