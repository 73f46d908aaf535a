-- previous release: compatible
-- Compatible: nullable columns; an earlier release's attempts are labelled later, as
-- the rows from before.
-- Each attempt carries its delivery's site and vendor (which never change), so the console's
-- Vendors page reads the latency series (p50/p95 and success per hour or day) from the
-- range's attempts alone, through attempts_started, instead of joining each to its delivery
-- (on PostgreSQL that join read the whole deliveries table: pg_migrations/026 says why).
-- Written with the attempt (sqlite_writer.finish). Rows from before this migration are
-- labelled by the forwarder's retention pass, newest first, a bounded batch at a time,
-- through attempts_unlabelled: only unlabelled rows are in it (new rows never enter it), so
-- it is also how the series finds, by time, the ones it still joins to their deliveries
-- (console_ops.OpsReads.vendor_overview).
ALTER TABLE attempts ADD COLUMN site_id TEXT;
ALTER TABLE attempts ADD COLUMN vendor TEXT;
CREATE INDEX attempts_unlabelled ON attempts (started_ms, id) WHERE site_id IS NULL
