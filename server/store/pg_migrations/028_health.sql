-- previous release: compatible
-- Compatible: a new table.
-- The health check's write (GET /healthz, and serve / worker at start): one row, updated
-- and committed, so that a 200 means this node commits to this database. It was
-- ``SELECT pg_current_xact_id()``, which a read-only database (a standby, or
-- default_transaction_read_only) answers too: /healthz said 200 while every event got 503.
CREATE TABLE health (
    id    SMALLINT PRIMARY KEY CHECK (id = 1),
    at_ms BIGINT NOT NULL
);
