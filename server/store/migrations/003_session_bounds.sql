-- previous release: breaks
-- Breaks: an earlier release writes sessions without first_seq/last_seq, which the
-- session's event list then needs; it also dropped the index that release reads by.
-- A session row keeps the first and last seq of its events. They bound the scan that lists a
-- session's events, and replace the events_session index: keyed by (site, sc), which is
-- random, it cost every ingested event a write to a random index page (bench/ingest.py).
ALTER TABLE sessions ADD COLUMN first_seq INTEGER;
ALTER TABLE sessions ADD COLUMN last_seq INTEGER;
UPDATE sessions SET
    first_seq = (SELECT min(e.seq) FROM events e WHERE e.site_id = sessions.site_id AND e.sc = sessions.sc),
    last_seq  = (SELECT max(e.seq) FROM events e WHERE e.site_id = sessions.site_id AND e.sc = sessions.sc);
DROP INDEX events_session
