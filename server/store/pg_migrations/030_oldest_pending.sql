-- previous release: compatible
-- Compatible: an index.
-- The oldest pending delivery of each vendor (/metrics' onetag_outbox_oldest_pending_age_
-- seconds, read on every scrape: PostgresOutbox.outbox_depth; SQLite's migration 014):
-- deliveries_due found the pending rows, but when each fell due (deadletters.OLDEST_PENDING:
-- coalesce(retry_from_ms, created_ms)) is not in it, so every pending row was read from the
-- heap, a backlog (paced history) being all of them. This partial index holds only the
-- pending rows, ordered by that expression (the same text the query compares, so the
-- planner matches it) within each vendor: the oldest is one seek per vendor.
-- Building it reads the deliveries table once, holding off the forwarder's claims and
-- finishes meanwhile (it writes only the pending rows): run `onetag migrate` when a short
-- pause of forwarding is acceptable.
CREATE INDEX deliveries_oldest_pending ON deliveries (vendor, (coalesce(retry_from_ms, created_ms)))
    WHERE state = 'pending';
