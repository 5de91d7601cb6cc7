-- Issue 18: schedules, delayed dispatches and retry (as SQLite's 0021).
--
-- `series`: how many times `dispatcher retry` (or a submission with key_reuse =
-- "after_failure") started a failed or cancelled dispatch again; each attempt records
-- the series it belongs to, so a step's retries and interruptions are counted anew in
-- each series while attempt numbers go on.
ALTER TABLE dispatches ADD COLUMN series INTEGER NOT NULL DEFAULT 0 CHECK (series >= 0);
ALTER TABLE attempts ADD COLUMN series INTEGER NOT NULL DEFAULT 0 CHECK (series >= 0);
-- `follows`: a dispatch that may start only once this one has ended (a schedule's fire
-- with overlap = "queue" follows the schedule's previous dispatch).
ALTER TABLE dispatches ADD COLUMN follows BIGINT;
-- The dispatch loop's timer: the earliest `not_before` of a waiting dispatch.
CREATE INDEX dispatches_due ON dispatches (not_before)
    WHERE status = 'queued' AND not_before IS NOT NULL;

-- One row per schedule that ever fired: the latest fire time handled (dispatched, or
-- skipped because of its overlap policy) and the dispatch of the latest dispatched fire.
-- Several daemons fire the same schedule: they serialize on this row (FOR UPDATE).
CREATE TABLE schedules (
    name             TEXT        PRIMARY KEY,
    last_fire        TIMESTAMPTZ NOT NULL,
    last_outcome     TEXT        NOT NULL DEFAULT 'none'
        CHECK (last_outcome IN ('none', 'dispatched', 'skipped')),
    last_dispatch_id BIGINT,
    updated_at       TIMESTAMPTZ NOT NULL
);
