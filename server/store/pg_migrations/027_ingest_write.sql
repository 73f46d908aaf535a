-- previous release: breaks
-- Breaks: ingest_session gets three attributes: the earlier ingest statement passes
-- rows of twelve.
-- The one-statement write of an optimistic ingest batch (server/store/pg_ingest.py,
-- docs/architecture.md "PostgreSQL"). Most batches (browser events of visitors whose
-- identity they don't change, no order, no backend fact) read their sessions without a
-- lock, apply the rules, then write everything here, outside any transaction block: the
-- statement is its own transaction, committed before its answer. Two round trips a batch
-- where a locked transaction takes four (BEGIN, read and lock, write, COMMIT) or more.
--
-- A session is written only if it is still the version the batch read (its xmin, which
-- every update of the row changes); a session the batch believed new is created only if
-- no other transaction created it meanwhile. Otherwise nothing of the batch is written
-- (serialization_failure, 40001) and the writer runs it again in a locked transaction.

-- The version a changed session was read at; the key of a session to create.
ALTER TYPE ingest_session ADD ATTRIBUTE version BIGINT, ADD ATTRIBUTE site_id TEXT,
    ADD ATTRIBUTE sc TEXT;

CREATE FUNCTION ingest_write(
    changed ingest_session[],  -- stored sessions, with the version read, in (site_id, sc) order
    created ingest_session[],  -- sessions to create, with their key, in (site_id, sc) order
    added ingest_event[],
    -- the batch's claims (deliveries planned from browser events), one array a column:
    c_site TEXT[], c_vendor TEXT[], c_key TEXT[], c_seq BIGINT[], c_visitor TEXT[],
    c_state TEXT[], c_request TEXT[], c_next BIGINT[], c_error TEXT[], c_request_id TEXT[],
    -- rules.claim_taken: a claim in one of these states, under a key a backend fact holds,
    -- is stored in state taken_state with taken_error
    taken_states TEXT[], taken_state TEXT, taken_error TEXT,
    now_ms BIGINT
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    written BIGINT;
BEGIN
    -- (a statement of a PL/pgSQL function costs its executor start even with nothing to
    -- do: those with nothing to write are skipped)
    UPDATE sessions s SET identity_id = u.identity_id, last_ms = u.last_ms,
           user_agent = u.user_agent, last_page = u.last_page, first_seq = u.first_seq,
           last_seq = u.last_seq, cart_guid = u.cart_guid, cart_currency = u.cart_currency,
           cart_items = u.cart_items, cart_updated_ms = u.cart_updated_ms,
           verified = u.verified
      FROM unnest(changed) AS u
     WHERE s.id = u.id AND s.xmin::text::bigint = u.version;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written <> cardinality(changed) THEN
        RAISE EXCEPTION 'a session this batch read was changed before its write'
            USING ERRCODE = 'serialization_failure';
    END IF;
    IF cardinality(created) > 0 THEN
        INSERT INTO sessions (site_id, sc, first_ms, last_ms, identity_id, user_agent, last_page,
                              first_seq, last_seq, cart_guid, cart_currency, cart_items,
                              cart_updated_ms, verified)
        SELECT u.site_id, u.sc, now_ms, u.last_ms, u.identity_id, u.user_agent, u.last_page,
               u.first_seq, u.last_seq, u.cart_guid, u.cart_currency, u.cart_items,
               u.cart_updated_ms, u.verified
          FROM unnest(created) AS u
        ON CONFLICT (site_id, sc) DO NOTHING;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written <> cardinality(created) THEN
            RAISE EXCEPTION 'a session this batch created was created by another transaction'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
    INSERT INTO events (seq, site_id, event_id, name, source, sc, identity_id, received_ms,
                        raw, data)
    SELECT * FROM unnest(added);
    IF cardinality(c_site) > 0 THEN
        INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state,
                                request, next_attempt_ms, last_error, created_ms, updated_ms,
                                request_id)
        SELECT c.s, c.v, c.k, 1, c.q, c.w, CASE WHEN c.taken THEN taken_state ELSE c.st END,
               c.r, c.n, CASE WHEN c.taken THEN taken_error ELSE c.e END, now_ms, now_ms, c.rid
          FROM (SELECT u.*, u.st = ANY(taken_states) AND EXISTS (
                       SELECT 1 FROM deliveries d WHERE d.site_id = u.s AND d.vendor = u.v
                          AND d.dedup_key = u.k AND d.claim = 0) AS taken
                  FROM unnest(c_site, c_vendor, c_key, c_seq, c_visitor, c_state, c_request,
                              c_next, c_error, c_request_id) WITH ORDINALITY
                       AS u(s, v, k, q, w, st, r, n, e, rid, ord)) AS c
         ORDER BY c.ord
        ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING;
    END IF;
END
$$;
