-- previous release: compatible
-- Compatible: a new table.
-- Console sessions logged out before they expired (server/admin/login.py): the session
-- cookie's nonce until the cookie's own expiry, so that a kept copy of the cookie stays
-- refused after a restart and in every process on this database. Each logout prunes the
-- rows past their expiry: at most the logouts of the last 12 hours (a session's life).
CREATE TABLE console_logouts (
    nonce      TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX console_logouts_expiry ON console_logouts (expires_ms)
