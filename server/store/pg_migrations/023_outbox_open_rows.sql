-- previous release: compatible
-- Compatible: the same indexes, partial.
-- The outbox's two working indexes hold the rows still in the outbox only (issue 15).
--
-- deliveries_due (the claim's walk, the console's dead letters, /metrics' depth, replays)
-- and deliveries_visitor (the claim's per-visitor probe, the held rows of a visitor) are
-- only ever asked about rows that are pending, held, dead or expired. The other states
-- (delivered, browser, ignored) are final, are what months of traffic leave behind, and
-- are read through the primary key, the dedup key and deliveries_event. As full indexes,
-- every finish wrote a new entry into both for the row it delivered (a state change is
-- never a HOT update), entries no claim would read; as partial indexes, the delivered row
-- leaves them (its old entry goes with the next vacuum), and a million delivered rows
-- take no room in them.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (state, vendor, next_attempt_ms, id)
    WHERE state IN ('pending', 'held', 'dead', 'expired');
DROP INDEX deliveries_visitor;
CREATE INDEX deliveries_visitor ON deliveries (site_id, vendor, visitor, state, id)
    WHERE state IN ('pending', 'held', 'dead', 'expired');
