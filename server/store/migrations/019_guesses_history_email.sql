-- previous release: compatible
-- Compatible: a new table and an index.
-- Wrong secrets by client address (server/admin/auth.py, ``SharedThrottle``): one row a wrong
-- guess, so that every process and node on this database, and the next after a restart, add
-- up an address's guesses for one bound (``scope``: the console's login, the metrics token,
-- api keys, feed tokens, the coupon key). Each wrong guess prunes its scope's rows older than
-- the bound's window (a minute): a refused address writes nothing, so the table holds at
-- most a few rows per address guessing in the last minute.
CREATE TABLE guess_failures (
    scope   TEXT NOT NULL,
    address TEXT NOT NULL,
    at_ms   INTEGER NOT NULL
);
CREATE INDEX guess_failures_address ON guess_failures (scope, address, at_ms);
CREATE INDEX guess_failures_age ON guess_failures (scope, at_ms);

-- The operator console's Search by email (server/store/console_search.py, history_events),
-- as PostgreSQL's 029: backfilled history (`onetag backfill --send`) is kept apart from
-- sessions and identities (no sc, no identity_id), so a customer's history is found by the
-- email inside the event's JSON (user.email, else the order's buyer: identity.email; the
-- same expression the query compares, so the planner matches it). Only events without a
-- session and an identity are written to it: history, nothing live. The search read the
-- latest 200,000 events instead, and missed older history.
-- Building it reads the events table once (about a second per million events, at the
-- first start of this onetag or `onetag migrate`).
CREATE INDEX events_history_email ON events
    (coalesce(json_extract(data, '$.user.email'), json_extract(data, '$.identity.email')), seq)
    WHERE sc IS NULL AND identity_id IS NULL
