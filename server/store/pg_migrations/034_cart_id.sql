-- previous release: breaks
-- Breaks: ingest_session gets cart_id: the earlier ingest statement passes rows
-- without it (asyncpg refuses them).
-- A session's cart gets an id of its own (SQLite's 018; rules.cart_step): the GUID of the
-- cart's first state, kept while its lines change and replaced when a purchase (or an
-- identity switch) closes the cart. Remarkety keys carts by id ("keep the same id so that
-- carts don't get duplicated"): the visitor's year-long sc made a shopper's next cart the
-- converted one. A cart open now keeps the id it was sent under until now, its session's sc.
ALTER TABLE sessions ADD COLUMN cart_id TEXT;
UPDATE sessions SET cart_id = sc WHERE cart_guid IS NOT NULL;

-- The optimistic write (027) carries it: the last field of an ingest_session row.
ALTER TYPE ingest_session ADD ATTRIBUTE cart_id TEXT;

CREATE OR REPLACE FUNCTION ingest_write(
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
           verified = u.verified, cart_id = u.cart_id
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
                              cart_updated_ms, verified, cart_id)
        SELECT u.site_id, u.sc, now_ms, u.last_ms, u.identity_id, u.user_agent, u.last_page,
               u.first_seq, u.last_seq, u.cart_guid, u.cart_currency, u.cart_items,
               u.cart_updated_ms, u.verified, u.cart_id
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
