-- previous release: breaks
-- Breaks: the carts table an earlier release writes is dropped.
-- Sessions become a rowid table that also holds the session's cart (cart_items NULL: none).
-- Measured with bench/ingest.py's load (WAL frames per event): as rows of two WITHOUT ROWID
-- tables, session and cart each cost every cart event a random page, and their rows, once
-- over ~1,000 bytes (an index b-tree's limit for a row kept on its page; a cart of a few
-- items is that big), an overflow page each as well. A rowid table keeps rows of up to
-- ~4,000 bytes on their page, and its rowids follow first visits, so the sessions active
-- now sit together at its end; (site_id, sc) is found through the UNIQUE index, which
-- changes only when a session is new.
CREATE TABLE sessions_new (
    id              INTEGER PRIMARY KEY,
    site_id         TEXT NOT NULL,
    sc              TEXT NOT NULL,
    identity_id     INTEGER REFERENCES identities (id),
    first_ms        INTEGER NOT NULL,
    last_ms         INTEGER NOT NULL,
    user_agent      TEXT,
    last_page       TEXT,
    first_seq       INTEGER,
    last_seq        INTEGER,
    cart_guid       TEXT,
    cart_currency   TEXT,
    cart_items      TEXT,              -- JSON list of normalised items
    cart_updated_ms INTEGER,
    UNIQUE (site_id, sc)
);
INSERT INTO sessions_new (site_id, sc, identity_id, first_ms, last_ms, user_agent, last_page,
                          first_seq, last_seq, cart_guid, cart_currency, cart_items,
                          cart_updated_ms)
SELECT s.site_id, s.sc, s.identity_id, s.first_ms, s.last_ms, s.user_agent, s.last_page,
       s.first_seq, s.last_seq, c.guid, c.currency, c.items, c.updated_ms
FROM sessions s LEFT JOIN carts c ON c.site_id = s.site_id AND c.sc = s.sc
ORDER BY s.first_ms, s.site_id, s.sc;
INSERT INTO sessions_new (site_id, sc, first_ms, last_ms, cart_guid, cart_currency, cart_items,
                          cart_updated_ms)
SELECT c.site_id, c.sc, c.updated_ms, c.updated_ms, c.guid, c.currency, c.items, c.updated_ms
FROM carts c
WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.site_id = c.site_id AND s.sc = c.sc);
DROP TABLE sessions;
DROP TABLE carts;
ALTER TABLE sessions_new RENAME TO sessions;
CREATE INDEX sessions_identity ON sessions (identity_id)
