-- previous release: compatible
-- Compatible: an earlier release keeps its stricter duplicate check while it runs; it
-- inserts events by column, whichever unique index there is.
-- A browser's event id is its session's (server/store/rules.py, event_scope): pages may set
-- their own event_id, so under (site, event id) an attacker who predicted one
-- ("purchase-5001") and sent it first from its own session made another visitor's event a
-- duplicate, answered 204 and never stored. A duplicate is now the same (site, event id,
-- scope): the backend's ids stay one space a site (scope ''), a browser's are scoped to
-- its sc (a retried beacon is still a duplicate). Every stored row stays valid: the old
-- index, (site, event id, backend?), was stricter. Still one index every event pays for;
-- pg_ingest.py's lookups name the same expression, so each probes the whole index.
DROP INDEX events_id;
CREATE UNIQUE INDEX events_id ON events (site_id, event_id,
                                         (CASE WHEN source = 'backend' THEN '' ELSE sc END));
