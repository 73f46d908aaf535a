-- previous release: compatible
-- Compatible: a new function.
-- A lane's claim carries the outcomes that piled up since the last write (issue 15;
-- docs/architecture.md, "The claim protocol"): onetag_finish then onetag_claim, in one
-- call, one transaction and one commit where a finish and a claim each had their own
-- (a commit is a WAL flush: on this machine about 55 microseconds of the backend's CPU).
-- The claim runs after the finish in the same transaction, so it sees its outcomes: a
-- visitor whose row was just finished has its next row claimable in the same call.
CREATE FUNCTION onetag_finish_claim(ids bigint[], states text[], next_ms bigint[],
                                    errors text[], leases bigint[], now_ms bigint,
                                    attempt_ids bigint[], attempt_numbers integer[],
                                    started bigint[], durations bigint[], requests text[],
                                    statuses integer[], answers text[], attempt_errors text[],
                                    for_vendor text, wanted integer, lease_ms bigint)
RETURNS TABLE (id bigint, site_id text, vendor text, dedup_key text, visitor text,
               request text, attempts integer, created_ms bigint, retry_from_ms bigint,
               request_id text, claim_token bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    PERFORM onetag_finish(ids, states, next_ms, errors, leases, now_ms, attempt_ids,
                          attempt_numbers, started, durations, requests, statuses, answers,
                          attempt_errors);
    RETURN QUERY SELECT * FROM onetag_claim(now_ms, for_vendor, wanted, lease_ms);
END $$;
