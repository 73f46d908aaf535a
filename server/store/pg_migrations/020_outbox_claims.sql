-- The outbox shared by several workers (issue 15; docs/architecture.md, "The claim protocol").
--
-- A claim leases its rows as SQLite does: state stays 'pending' and next_attempt_ms moves
-- to the end of the lease, which is when a dead worker's row is due again. Each claim also
-- takes a token from delivery_claims and writes it on the row: a worker's finish names the
-- token it claimed with and changes the row only while it is still that claim's, so a late
-- outcome (the lease ran out, another worker took the row over) never overwrites a newer
-- one. (The attempt number is not enough: a replay starts it again at 0.)
CREATE SEQUENCE delivery_claims;
ALTER TABLE deliveries ADD COLUMN claim_token bigint;

-- No index of its own: the claim walks deliveries_due (state, vendor, next_attempt_ms) and
-- probes deliveries_visitor (site_id, vendor, visitor, state, id) from migration 001. Both
-- lead with the state, so delivered rows, however many, are never visited: the claim costs
-- the same with a million delivered rows as with none (bench/pg_claim_plan.py prints the
-- plan). A partial index of pending rows was measured and left out: the planner preferred
-- these, and every index is paid for by each ingest.

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
