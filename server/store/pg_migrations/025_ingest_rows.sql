-- previous release: compatible
-- Compatible: new types no earlier release uses.
-- The rows an ingest transaction writes, as composite types (server/store/pg_ingest.py): the
-- writer sends a batch's new events as one array of ingest_event rows and the sessions it
-- changed as one array of ingest_session rows, where it sent one array per column. asyncpg
-- checks each element of an array (is it a nested array?) with an isinstance against an
-- abstract class, a Python call: about 55 of them per request, the largest single cost of
-- the writer process that is its own (cProfile under bench/pg_ingest.py); a row of a
-- composite type is one element, its fields encoded without that check. Measured, 11 events
-- a statement: 66 -> 51 us of the writer's CPU, 34 -> 28 us of the database's.
-- The fields follow the columns they are written to, in order.
CREATE TYPE ingest_event AS (
    seq         BIGINT,
    site_id     TEXT,
    event_id    TEXT,
    name        TEXT,
    source      TEXT,
    sc          TEXT,
    identity_id BIGINT,
    received_ms BIGINT,
    raw         TEXT,
    data        TEXT
);
CREATE TYPE ingest_session AS (
    id              BIGINT,
    identity_id     BIGINT,
    last_ms         BIGINT,
    user_agent      TEXT,
    last_page       TEXT,
    first_seq       BIGINT,
    last_seq        BIGINT,
    cart_guid       TEXT,
    cart_currency   TEXT,
    cart_items      TEXT,
    cart_updated_ms BIGINT,
    verified        SMALLINT
);
