-- previous release: compatible
-- Compatible: a new table.
-- Wrong secrets by client address (server/admin/auth.py, ``SharedThrottle``): one row a wrong
-- guess, so that every node on this database, and the next after a restart, add up an
-- address's guesses for one bound (``scope``: the console's login, the metrics token, api
-- keys, feed tokens, the coupon key). Each wrong guess prunes its scope's rows older than
-- the bound's window (a minute): a refused address writes nothing, so the table holds at
-- most a few rows per address guessing in the last minute.
CREATE TABLE guess_failures (
    scope   TEXT NOT NULL,
    address TEXT NOT NULL,
    at_ms   BIGINT NOT NULL
);
CREATE INDEX guess_failures_address ON guess_failures (scope, address, at_ms);
CREATE INDEX guess_failures_age ON guess_failures (scope, at_ms);
