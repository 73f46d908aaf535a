-- previous release: breaks
-- Breaks: an earlier release would plan a browser's claims as facts (claim 0) and keep
-- the old event-id index's meaning.
-- Browser events are claims, backend events are facts (docs/security.md).
-- 1. An event id is unique per kind of sender: a browser's id never suppresses a backend
--    event. Still one index on events (bench/ingest.py pays for each): (site, id, backend?).
-- 2. A delivery's dedup key is unique per kind too: what a browser claimed never holds the
--    key a backend fact needs. ``claim`` is 1 for rows planned from a browser event.
-- 3. A session remembers whether its identity is verified: bound by an identify signed
--    with the site's identity_secret (1), or not (NULL).
CREATE TABLE events_new (
    seq         INTEGER PRIMARY KEY,   -- arrival order
    site_id     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    name        TEXT NOT NULL,
    source      TEXT NOT NULL,         -- browser | backend | verified browser
    sc          TEXT,
    identity_id INTEGER REFERENCES identities (id),
    received_ms INTEGER NOT NULL,
    raw         TEXT NOT NULL,         -- the event as sent
    data        TEXT NOT NULL          -- the normalised event (docs/architecture.md)
);
INSERT INTO events_new SELECT seq, site_id, event_id, name, source, sc, identity_id, received_ms,
                              raw, data FROM events ORDER BY seq;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
CREATE UNIQUE INDEX events_id ON events (site_id, event_id, source = 'backend');
CREATE TABLE deliveries_new (
    id              INTEGER PRIMARY KEY,
    site_id         TEXT NOT NULL,
    vendor          TEXT NOT NULL,
    dedup_key       TEXT NOT NULL,
    claim           INTEGER NOT NULL DEFAULT 0,  -- 1: planned from a browser event
    event_seq       INTEGER NOT NULL REFERENCES events (seq),
    visitor         TEXT NOT NULL,
    state           TEXT NOT NULL,     -- held | pending | delivered | dead | browser | expired | ignored
    request         TEXT NOT NULL,     -- JSON {method, url, json, headers}; no secrets
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    delivered_ms    INTEGER,
    retry_from_ms   INTEGER,
    UNIQUE (site_id, vendor, dedup_key, claim)
);
INSERT INTO deliveries_new (id, site_id, vendor, dedup_key, claim, event_seq, visitor, state,
                            request, attempts, next_attempt_ms, last_error, created_ms,
                            updated_ms, delivered_ms, retry_from_ms)
SELECT d.id, d.site_id, d.vendor, d.dedup_key,
       coalesce((SELECT e.source != 'backend' FROM events e WHERE e.seq = d.event_seq), 0),
       d.event_seq, d.visitor, d.state, d.request, d.attempts, d.next_attempt_ms, d.last_error,
       d.created_ms, d.updated_ms, d.delivered_ms, d.retry_from_ms
FROM deliveries d ORDER BY d.id;
DROP TABLE deliveries;
ALTER TABLE deliveries_new RENAME TO deliveries;
CREATE INDEX deliveries_due ON deliveries (state, vendor, next_attempt_ms);
CREATE INDEX deliveries_visitor ON deliveries (site_id, vendor, visitor, state, id);
CREATE INDEX deliveries_event ON deliveries (event_seq);
ALTER TABLE sessions ADD COLUMN verified INTEGER
