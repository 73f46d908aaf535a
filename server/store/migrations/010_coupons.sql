-- previous release: compatible
-- Compatible: a new table.
-- Every call Remarkety makes to the Coupons bridge (server/coupons.py), answered or not:
-- when, which site, what was asked (never the remarkety_api_key, the webhook secret or the
-- signature), what the store's webhook answered and what Remarkety was told. `onetag
-- coupons` lists them, latest first.
CREATE TABLE coupon_calls (
    id              INTEGER PRIMARY KEY,
    created_ms      INTEGER NOT NULL,
    site_id         TEXT NOT NULL,
    request_id      TEXT,             -- the HTTP request's id (X-Request-Id, server/logs.py)
    idempotency_key TEXT,             -- sent to the store; NULL when nothing was sent
    code            TEXT,             -- the coupon code asked for (NULL: not read)
    template_id     TEXT,
    expiration      TEXT,             -- ISO 8601, as normalised
    email           TEXT,
    status          INTEGER NOT NULL, -- what onetag answered Remarkety
    result          TEXT NOT NULL,    -- created, refused, invalid, unauthorized, store_down, ...
    store_status    INTEGER,          -- the webhook's HTTP status; NULL: no answer
    duration_ms     INTEGER NOT NULL, -- the whole call, body read to answer
    error           TEXT              -- why it failed, for the operator
);
CREATE INDEX coupon_calls_site ON coupon_calls (site_id, id)
