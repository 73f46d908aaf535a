-- previous release: compatible
-- Compatible: a nullable column; rows without it are expected (NULL: no request).
-- The HTTP request that planned a delivery (its X-Request-Id, or the id onetag gave it):
-- shown by `onetag deliveries --json` and on the forwarder's log lines for that delivery,
-- so one request can be followed from the access log to the vendor. NULL for rows planned
-- before this migration or outside a request (a replay of expired rows keeps the old one).
ALTER TABLE deliveries ADD COLUMN request_id TEXT;
