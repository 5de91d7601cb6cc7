-- How many times a daemon has claimed each dispatch: a dispatch claimed for the first
-- time has no earlier attempts, so the pipeline need not read them (issue 7).
ALTER TABLE dispatches ADD COLUMN claims INTEGER NOT NULL DEFAULT 0 CHECK (claims >= 0);
