-- previous release: compatible
-- Compatible: a new table.
-- `onetag backfill --send`: one row per run over a set of files, so a run that was
-- interrupted (kill -9, a reboot) resumes where its last committed batch ended. The rows a
-- batch plans, the events it stores and this row's progress are committed together, in one
-- transaction, so lines_done never counts a line whose rows were not written (and a line
-- written twice plans nothing twice: deliveries are unique per site, vendor and dedup key).
CREATE TABLE backfill_runs (
    id          INTEGER PRIMARY KEY,
    site_id     TEXT NOT NULL,
    files       TEXT NOT NULL,         -- JSON list of the file names, as given
    files_hash  TEXT NOT NULL,         -- sha256 of the files' bytes, in order
    lines_total INTEGER NOT NULL,
    lines_done  INTEGER NOT NULL DEFAULT 0,
    counts      TEXT NOT NULL DEFAULT '{}',  -- JSON: planned, already done, skipped per vendor
    started_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX backfill_runs_files ON backfill_runs (site_id, files_hash)
