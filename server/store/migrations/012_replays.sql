-- previous release: compatible
-- Compatible: a new table and a partial index.
-- Every replay an operator made (console or `onetag replay`): who, when, what filter, how
-- many the dry run showed and how many were made due again, and their ids when few.
-- Written in the same transaction as the replay itself (sqlite_writer.replay_recorded).
CREATE TABLE replays (
    id            INTEGER PRIMARY KEY,
    at_ms         INTEGER NOT NULL,
    who           TEXT NOT NULL,     -- "console:<client ip>" | "cli:<os user>"
    filter        TEXT NOT NULL,     -- JSON: deadletters.ReplayFilter.describe()
    dry_run_count INTEGER,           -- what the operator was shown before replaying
    replayed      INTEGER NOT NULL,  -- rows made due again
    ids           TEXT               -- JSON list of the rows made due, when at most 100
);
CREATE INDEX replays_at ON replays (at_ms);
-- Reconciliation (the console's /admin/reconcile) reads a site's backend orders by time;
-- a partial index: only backend purchases pay for it at ingest, not every page view.
CREATE INDEX events_backend_orders ON events (site_id, received_ms)
    WHERE source = 'backend' AND name = 'purchase'
