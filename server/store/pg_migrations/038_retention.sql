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
-- their primary keys and need none. Building it reads the deliveries table once.
CREATE INDEX deliveries_finished ON deliveries (created_ms)
    WHERE state IN ('delivered', 'browser', 'expired', 'ignored');
