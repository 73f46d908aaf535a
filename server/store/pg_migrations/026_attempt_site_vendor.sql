-- previous release: compatible
-- Compatible: nullable columns, and onetag_finish replaced with the same arguments
-- (an earlier worker's attempts are labelled by it too).
-- Each attempt carries its delivery's site and vendor (SQLite's migration 013): the
-- console's Vendors page reads its latency series (p50/p95 and success per hour or day) from
-- the range's attempts alone, through attempts_started. It joined each attempt to its
-- delivery, and the planner hashed the whole deliveries table for it, a sequential scan of
-- every delivery ever kept on each page view (87 ms at 400,000 deliveries, growing with the
-- table; bench/pg_console_plan.py), where the range's attempts are a few pages.
--
-- Adding the columns rewrites nothing (NULL, no default), and the partial index holds only
-- the rows from before this migration (new rows are written labelled and never enter it):
-- building it reads attempts once, holding off its writes meanwhile (about a second per
-- million attempts, kept keep_attempts_days). The old rows are not updated here, in one
-- transaction holding this migration's lock on attempts: the forwarder's retention pass
-- labels them, newest first, a bounded batch at a time (Store.label_attempts, through
-- attempts_unlabelled), and until then the series joins those rows, and only those (found
-- by time through the same index), to their deliveries.
ALTER TABLE attempts ADD COLUMN site_id text, ADD COLUMN vendor text;
CREATE INDEX attempts_unlabelled ON attempts (started_ms, id) WHERE site_id IS NULL;

-- Migration 022's finish, its attempts now labelled from their deliveries (the rows the
-- UPDATE above it just wrote, probed by primary key; an attempt is kept even without one).
CREATE OR REPLACE FUNCTION onetag_finish(ids bigint[], states text[], next_ms bigint[],
                                         errors text[], leases bigint[], now_ms bigint,
                                         attempt_ids bigint[], attempt_numbers integer[],
                                         started bigint[], durations bigint[],
                                         requests text[], statuses integer[],
                                         answers text[], attempt_errors text[])
RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    UPDATE deliveries d SET state = u.state, next_attempt_ms = u.next_ms, last_error = u.error,
        updated_ms = now_ms, lease_until = NULL,
        delivered_ms = CASE WHEN u.state = 'delivered' THEN now_ms ELSE d.delivered_ms END
    FROM unnest(ids, states, next_ms, errors, leases) AS u(id, state, next_ms, error, lease)
    WHERE d.id = u.id AND d.state = 'pending' AND (u.lease = 0 OR d.claim_token = u.lease);
    INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request, status,
                          answer, error, site_id, vendor)
    SELECT u.*, d.site_id, d.vendor
    FROM unnest(attempt_ids, attempt_numbers, started, durations, requests, statuses,
                answers, attempt_errors) AS u(delivery_id, attempt, started_ms, duration_ms,
                                              request, status, answer, error)
    LEFT JOIN deliveries d ON d.id = u.delivery_id;
END $$;
