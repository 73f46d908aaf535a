-- previous release: compatible
-- Compatible: an index. A node of an earlier release keeps running beside one that prunes:
-- a session or event gone is to its ingest what it is to this one (a new session), and
-- the rows it finishes enter the index as any do.
-- [server] keep_events_days (server/store/retention.py), as SQLite's migration 022: the
-- retention pass deletes the finished deliveries (delivered, browser, expired, ignored)
-- planned and last changed before the period, oldest first, through this partial index of
-- those rows alone. On created_ms, not updated_ms: a claim sets updated_ms and is a HOT
-- update (postgres_outbox.py), which an index on that column would end; state is indexed
-- already (deliveries_due), so a finish was never HOT. Events and sessions are walked by
-- their primary keys and need none. Building it reads the deliveries table once:
-- CONCURRENTLY, so ingest's inserts go on meanwhile (a plain CREATE INDEX holds a SHARE lock
-- on deliveries for the whole build, which they wait for), hence outside a transaction
-- (server/store/pg_migrate.py: a re-run after an interrupted build drops the INVALID index
-- it left and builds it again; one already built, by hand under this name too, is kept).
-- onetag migrate: outside a transaction
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_finished ON deliveries (created_ms)
    WHERE state IN ('delivered', 'browser', 'expired', 'ignored');
