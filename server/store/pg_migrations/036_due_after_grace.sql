-- previous release: compatible
-- Compatible: a nullable column and 030's index rebuilt; a row an earlier release holds
-- meanwhile counts its oldest pending age from created_ms, as it did (and that release's
-- own oldest pending read no longer matches the index: slower, not wrong).
-- When a row planned to wait falls due (SQLite's migration 020): a backend fact on a
-- `fallback` route waits [server] browser_grace_s for the page's own copy (outbox.plan's
-- delay), due at next_attempt_ms = created_ms + the grace; NULL: due when made. The oldest
-- pending age (deadletters.OLDEST_PENDING, /metrics, `onetag deliveries`, the Vendors page)
-- counted such a row from created_ms, late for the whole grace while it was only waiting its
-- turn; it now counts from coalesce(retry_from_ms, due_ms, created_ms). Rows still waiting
-- (pending, never tried, no replay, due after they were made: paced history has
-- retry_from_ms) get theirs. The partial index of the pending rows (030) is made again on
-- the new expression (the same text the query compares, so the planner matches it).
-- Adding the column rewrites nothing; building the index reads the deliveries table once,
-- holding off the forwarder's claims and finishes meanwhile: run `onetag migrate` when a
-- short pause of forwarding is acceptable.
ALTER TABLE deliveries ADD COLUMN due_ms BIGINT;
UPDATE deliveries SET due_ms = next_attempt_ms
    WHERE state = 'pending' AND attempts = 0 AND retry_from_ms IS NULL
    AND next_attempt_ms > created_ms;
DROP INDEX deliveries_oldest_pending;
CREATE INDEX deliveries_oldest_pending
    ON deliveries (vendor, (coalesce(retry_from_ms, due_ms, created_ms)))
    WHERE state = 'pending';
