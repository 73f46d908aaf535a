-- previous release: compatible
-- Compatible: the release before had no outbox on PostgreSQL, and its ingest writes
-- deliveries by column.
-- The outbox shared by several workers (issue 15; docs/architecture.md, "The claim protocol").
--
-- A claim leases its rows: lease_until is when a dead worker's row is due again, and
-- claim_token, a new number from delivery_claims, names the claim. A worker's finish names
-- the token it claimed with and changes the row only while it is still that claim's, so a
-- late outcome (the lease ran out, another worker took the row over) never overwrites a
-- newer one. (The attempt number is not enough: a replay starts it again at 0.)
-- Neither column is indexed, and a claim changes nothing else that is (SQLite's claim moves
-- next_attempt_ms instead): so a claim is a HOT update, one heap tuple and no index entry,
-- where moving next_attempt_ms would add an entry to each of the table's five indexes.
-- fillfactor leaves the room on each page that a HOT update needs.
CREATE SEQUENCE delivery_claims;
ALTER TABLE deliveries ADD COLUMN claim_token bigint, ADD COLUMN lease_until bigint;
ALTER TABLE deliveries SET (fillfactor = 85);

-- The claim walks deliveries_due in its order, due longest ago first and by id among rows
-- due the same millisecond (all the rows one group commit planned), and stops at its LIMIT.
-- Migration 001's (state, vendor, next_attempt_ms) gives the first order only: PostgreSQL
-- then read every pending row due in the same millisecond to sort them by id before the
-- LIMIT (a claim on a backlog planned in one burst read the whole backlog: ~190 rows
-- fetched per delivery, measured). With id in the key the index gives the claim's order
-- and the walk stops after the rows it takes. The per-visitor probe uses 001's
-- deliveries_visitor (site_id, vendor, visitor, state, id). Both lead with the state, so
-- delivered rows, however many, are never walked (bench/pg_claim_plan.py prints the plan).
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (state, vendor, next_attempt_ms, id);

-- Claims and finishes update pending rows all the time; with millions of delivered rows
-- the default (vacuum after 20 % of the table changed) would let dead versions pile up in
-- the claim indexes for hours. Vacuum after 10,000 changed rows instead.
ALTER TABLE deliveries SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                            autovacuum_analyze_scale_factor = 0.01);

-- A vendor's 429 / Retry-After pause, honoured by every worker: the forwarder reads it
-- before claiming for that vendor (Store.paused_until) and writes it when a vendor asks
-- to be left alone (Store.pause_vendor). One row per vendor: the lane is per vendor.
CREATE TABLE vendor_pauses (
    vendor     text PRIMARY KEY,
    until_ms   bigint NOT NULL,
    updated_ms bigint NOT NULL
);
