-- previous release: compatible
-- Compatible: a nullable column; no earlier release reads it.
-- A delivery's retry window starts when it was planned (created_ms) or, once an operator
-- replays it, at the replay: NULL means created_ms.
ALTER TABLE deliveries ADD COLUMN retry_from_ms INTEGER
