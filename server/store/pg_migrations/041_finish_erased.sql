-- previous release: compatible
-- Compatible: onetag_finish replaced with the same arguments and meaning, but for the
-- attempts of erased deliveries, which it no longer keeps (an older node's finish keeps
-- them, as before; an older node's forget does not lock the deliveries first).
-- A forwarder's outcome that comes back after `onetag person forget` erased its delivery
-- (store/person.py: the row kept anonymous, visitor 'erased', its attempts deleted) wrote
-- its attempt anyway: the person's request as sent and the vendor's answer, kept where no
-- later export or forget could reach them (the row names no event). Now no attempt is kept
-- for an erased delivery, as SQLite's finish does.
--
-- The erasure in progress: it locks the person's deliveries (FOR UPDATE, in id order)
-- before it reads their attempts. The finish first locks every row of its batch (the
-- outcomes' and the attempts'), in id order, in one pass (FOR NO KEY UPDATE, the lock its
-- UPDATE takes anyway): a late outcome (its row final, or its lease taken over) changes
-- nothing but holds its row too. Either the erasure committed first, and the INSERT (a
-- statement of its own: it sees what committed) finds the row erased, or the finish did,
-- and the erasure, locking after it, reads and deletes its attempt. One pass in id order,
-- as the erasure's: a batch locking its current rows (the UPDATE) before its late ones
-- deadlocked with an erasure holding a late row below a current one (PostgreSQL then
-- aborted one of them, and the forwarder's whole batch was sent again after its lease).
-- A claim (FOR UPDATE SKIP LOCKED) passes over the locked rows, as over those the UPDATE
-- locks; the UPDATE's guard (pending, under this claim) is read after the locks are held.
-- The lock pass costs the usual batch a lock record a row in the WAL (a batch of 8 rows:
-- about 8.0 KB of WAL where the UPDATE alone wrote 7.6 KB).
CREATE OR REPLACE FUNCTION onetag_finish(ids bigint[], states text[], next_ms bigint[],
                                         errors text[], leases bigint[], now_ms bigint,
                                         attempt_ids bigint[], attempt_numbers integer[],
                                         started bigint[], durations bigint[],
                                         requests text[], statuses integer[],
                                         answers text[], attempt_errors text[])
RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    PERFORM 1 FROM deliveries d WHERE d.id = ANY(ids || attempt_ids)
    ORDER BY d.id FOR NO KEY UPDATE;
    UPDATE deliveries d SET state = u.state, next_attempt_ms = u.next_ms,
        last_error = u.error, updated_ms = now_ms, lease_until = NULL,
        delivered_ms = CASE WHEN u.state = 'delivered' THEN now_ms ELSE d.delivered_ms END
    FROM unnest(ids, states, next_ms, errors, leases) AS u(id, state, next_ms, error, lease)
    WHERE d.id = u.id AND d.state = 'pending' AND (u.lease = 0 OR d.claim_token = u.lease);
    INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request, status,
                          answer, error, site_id, vendor)
    SELECT u.*, d.site_id, d.vendor
    FROM unnest(attempt_ids, attempt_numbers, started, durations, requests, statuses,
                answers, attempt_errors) AS u(delivery_id, attempt, started_ms, duration_ms,
                                              request, status, answer, error)
    LEFT JOIN deliveries d ON d.id = u.delivery_id
    WHERE d.visitor IS DISTINCT FROM 'erased';
END $$;
