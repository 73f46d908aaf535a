-- previous release: compatible
-- Compatible: an index.
-- The oldest pending delivery of each vendor (/metrics' onetag_outbox_oldest_pending_age_
-- seconds, read on every scrape: SQLiteStore.outbox_depth): deliveries_due found the pending
-- rows, but when each fell due (deadletters.OLDEST_PENDING: coalesce(retry_from_ms,
-- created_ms)) is not in it, so every pending row was read from the table, a backlog (paced
-- history) being all of them. This partial index holds only the pending rows, ordered by
-- that expression within each vendor: the oldest is one seek per vendor.
-- Building it reads the deliveries table once.
CREATE INDEX deliveries_oldest_pending ON deliveries (vendor, coalesce(retry_from_ms, created_ms))
    WHERE state = 'pending'
