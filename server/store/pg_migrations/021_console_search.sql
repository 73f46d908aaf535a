-- previous release: compatible
-- Compatible: indexes.
-- The operator console's Search on PostgreSQL (server/store/console_search.py). Two of its
-- questions have no index on SQLite and read at most the latest 200,000 events; here each
-- gets a partial index that only the events it is about are written to, so the rest of
-- ingest pays nothing for it:
-- - an order id: the transaction_id inside an order event's JSON (purchase, refund,
--   order_status; the same expression the query compares, so the planner matches it);
-- - a customer's events without a session (backend events sent without an sc).
-- Building them reads the events table once, holding off writes to it meanwhile (about a
-- second per million events): run `onetag migrate` when a pause of ingest is acceptable.
CREATE INDEX events_order_id ON events (((data::json #>> '{ecommerce,transaction_id}')))
    WHERE name IN ('purchase', 'refund', 'order_status');
CREATE INDEX events_sessionless ON events (identity_id, seq) WHERE sc IS NULL;
