-- previous release: compatible
-- Compatible: an index.
-- The operator console's Search by email on PostgreSQL (server/store/console_search.py,
-- history_events): backfilled history (`onetag backfill --send`) is kept apart from
-- sessions and identities (no sc, no identity_id), so a customer's history is found by the
-- email inside the event's JSON (user.email, else the order's buyer: identity.email; the
-- same expression the query compares, so the planner matches it). Only events without a
-- session and an identity are written to it: history, nothing live.
-- Building it reads the events table once, holding off writes to it meanwhile (about a
-- second per million events): run `onetag migrate` when a pause of ingest is acceptable.
CREATE INDEX events_history_email ON events
    ((coalesce(data::json #>> '{user,email}', data::json #>> '{identity,email}')), seq)
    WHERE sc IS NULL AND identity_id IS NULL;
