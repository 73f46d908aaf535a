-- previous release: compatible
-- Compatible: new functions, the claim and finish statements unchanged.
-- The forwarder's claim and finish as functions planned once per connection (issue 15;
-- docs/architecture.md, "The claim protocol"). Run as statements, asyncpg's prepared
-- statements were planned again on every execution: PostgreSQL's plan cache kept choosing
-- a custom plan for the parameters at hand, and planning was a fifth of the claim's CPU and
-- a sixth of the finish's (measured: ~0.2 ms a claim of 8 rows). A PL/pgSQL function keeps
-- its statements' plans for the session, and plan_cache_mode = force_generic_plan makes
-- that plan the generic one: the claim's walk of deliveries_due in its order and the
-- finish's id probes are the same whatever the parameters, so nothing is lost by it
-- (bench/pg_claim_plan.py prints the plan, with a million delivered rows).
--
-- The claim is postgres_outbox.claim_sql's statement for one vendor, its NOT EXISTS
-- outbox_rules.CLAIMABLE, with the parameters named (tests/test_pg_outbox.py holds this
-- text to them: a change there needs a migration that replaces the function).

CREATE FUNCTION onetag_claim(now_ms bigint, for_vendor text, wanted integer, lease_ms bigint)
RETURNS TABLE (id bigint, site_id text, vendor text, dedup_key text, visitor text,
               request text, attempts integer, created_ms bigint, retry_from_ms bigint,
               request_id text, claim_token bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH picked AS (SELECT d.id FROM deliveries d
        WHERE d.state = 'pending' AND d.next_attempt_ms <= now_ms AND d.vendor = for_vendor
          AND (d.lease_until IS NULL OR d.lease_until <= now_ms)
          AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.site_id = d.site_id AND p.vendor = d.vendor AND p.visitor = d.visitor AND p.state = 'pending' AND p.id < d.id)
        ORDER BY d.next_attempt_ms, d.id LIMIT wanted
        FOR UPDATE OF d SKIP LOCKED)
    UPDATE deliveries d SET attempts = d.attempts + 1, lease_until = now_ms + lease_ms,
        updated_ms = now_ms, claim_token = nextval('delivery_claims')
    FROM picked WHERE d.id = picked.id
    RETURNING d.id, d.site_id, d.vendor, d.dedup_key, d.visitor, d.request, d.attempts,
        d.created_ms, coalesce(d.retry_from_ms, d.created_ms) AS retry_from_ms,
        d.request_id, d.claim_token;
END $$;

-- An outcome batch: the rows' new states (the late-outcome guard: only a row still pending
-- under the claim that sent it changes) and every attempt, in one call and transaction.
CREATE FUNCTION onetag_finish(ids bigint[], states text[], next_ms bigint[], errors text[],
                              leases bigint[], now_ms bigint, attempt_ids bigint[],
                              attempt_numbers integer[], started bigint[], durations bigint[],
                              requests text[], statuses integer[], answers text[],
                              attempt_errors text[])
RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    UPDATE deliveries d SET state = u.state, next_attempt_ms = u.next_ms, last_error = u.error,
        updated_ms = now_ms, lease_until = NULL,
        delivered_ms = CASE WHEN u.state = 'delivered' THEN now_ms ELSE d.delivered_ms END
    FROM unnest(ids, states, next_ms, errors, leases) AS u(id, state, next_ms, error, lease)
    WHERE d.id = u.id AND d.state = 'pending' AND (u.lease = 0 OR d.claim_token = u.lease);
    INSERT INTO attempts (delivery_id, attempt, started_ms, duration_ms, request, status,
                          answer, error)
    SELECT * FROM unnest(attempt_ids, attempt_numbers, started, durations, requests, statuses,
                         answers, attempt_errors);
END $$;
