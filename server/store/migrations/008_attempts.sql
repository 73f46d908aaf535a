-- previous release: compatible
-- Compatible: a new table; an earlier release's attempts are not kept, as before.
-- Every delivery attempt, kept after the row is delivered (last_error only says the latest
-- failure, and a success clears it): when it started, how long it took, the request as
-- sent minus its secrets (JSON: method, url, headers, body), the vendor's HTTP status and
-- answer (JSON: headers worth keeping, body up to 4 KiB, truncated) or the transport error.
-- Written by the forwarder's finish batch; pruned after [server] keep_attempts_days.
CREATE TABLE attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    request TEXT NOT NULL,
    status INTEGER,
    answer TEXT,
    error TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
-- Pruning walks the oldest first.
CREATE INDEX attempts_started ON attempts (started_ms);
