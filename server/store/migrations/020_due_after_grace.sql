-- previous release: compatible
-- Compatible: a nullable column; a row an earlier release holds meanwhile counts its
-- oldest pending age from created_ms, as it did (and that release's own
-- oldest pending read no longer matches the index: slower, not wrong).
-- When a row planned to wait falls due: a backend fact on a `fallback` route waits
-- [server] browser_grace_s for the page's own copy (outbox.plan's delay), due at
-- next_attempt_ms = created_ms + the grace; NULL: due when made. The oldest pending age
-- (deadletters.OLDEST_PENDING, /metrics, `onetag deliveries`, the Vendors page) counted such
-- a row from created_ms, late for the whole grace while it was only waiting its turn; it now
-- counts from coalesce(retry_from_ms, due_ms, created_ms). Rows still waiting (pending, never
-- tried, no replay, due after they were made: paced history has retry_from_ms) get theirs.
-- The partial index of the pending rows (014) is made again on the new expression: building
-- it reads the deliveries table once.
ALTER TABLE deliveries ADD COLUMN due_ms INTEGER;
UPDATE deliveries SET due_ms = next_attempt_ms
    WHERE state = 'pending' AND attempts = 0 AND retry_from_ms IS NULL
    AND next_attempt_ms > created_ms;
DROP INDEX deliveries_oldest_pending;
CREATE INDEX deliveries_oldest_pending
    ON deliveries (vendor, coalesce(retry_from_ms, due_ms, created_ms))
    WHERE state = 'pending'
