-- previous release: compatible
-- Compatible: an index. A node of an earlier release keeps running beside one that prunes:
-- a session or event gone is to its ingest what it is to this one (a new session), and
-- the rows it finishes enter the index as any do.
-- [server] keep_events_days (server/store/retention.py): the retention pass deletes the
-- finished deliveries (delivered, browser, expired, ignored) planned and last changed before
-- the period, oldest first. This partial index holds only those rows, by created_ms (which
-- never changes; updated_ms changes at every claim): a pass reads what it deletes, never the
-- pending, held or dead rows it keeps. Events and sessions are walked by their primary keys
-- and need none. Building it reads the deliveries table once.
CREATE INDEX deliveries_finished ON deliveries (created_ms)
    WHERE state IN ('delivered', 'browser', 'expired', 'ignored')
