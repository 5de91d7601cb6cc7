-- Named statements of the SQLite store that its dialect spells its own way (the rest is
-- in `sql/common.sql`). A list parameter (:ids, :keep, :blocked_gates) is one JSON array
-- expanded with json_each.

-- name: migrations_create_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);

-- name: claim_many
-- One statement, so the pick and the update are atomic: a write statement takes the
-- write lock before it reads, and two claimers can never take the same row. RETURNING
-- gives no order, so the caller sorts by (priority DESC, id).
UPDATE dispatches
SET status = CASE WHEN plan IS NULL THEN 'planning' ELSE 'running' END,
    instance_id = :instance_id,
    started_at = COALESCE(started_at, :now),
    claims = claims + 1,
    updated_at = :now
WHERE id IN (
    SELECT q.id FROM dispatches AS q
    WHERE q.status = 'queued'
      AND (q.not_before IS NULL OR q.not_before <= :now)
      AND (q.gate_key IS NULL
           OR q.gate_key NOT IN (SELECT value FROM json_each(:blocked_gates)))
      AND (q.follows IS NULL
           OR NOT EXISTS (SELECT 1 FROM dispatches AS p WHERE p.id = q.follows
                            AND p.status IN ('queued', 'planning', 'running')))
    ORDER BY q.priority DESC, q.id
    LIMIT :limit
)
RETURNING *;

-- name: insert_attempt_rows
-- The queued writes of a batch, one statement for many rows of a kind (`<kind>_rows`).
-- The store puts the rows first: WITH r (<the kind's fields, writes.FIELDS>) AS
-- (VALUES (?, ...), (?, ...), ...). SQLite binds them in one call and runs them in one
-- step, so the connection's thread needs the GIL once, not once a row, and can write
-- while the event loop is busy.
-- Attempts: the id is handed out by the store before the insert; an attempt that ended
-- before its row was written is inserted complete.
INSERT INTO attempts (id, dispatch_id, step_index, step, runner, attempt, status,
                      started_at, ended_at, exit_code, error, output, instance_id, result,
                      series)
SELECT id, dispatch_id, step_index, step, runner, attempt, status, started_at, ended_at,
       exit_code, error, output, instance_id, result, series
FROM r;

-- name: finish_attempt_rows
UPDATE attempts
SET status = r.status, ended_at = r.ended_at, exit_code = r.exit_code, error = r.error,
    output = r.output, result = r.result
FROM r
WHERE attempts.id = r.id AND attempts.status = 'running';

-- name: insert_slot_rows
-- A gate row; `released_at` is set when it was released before the insert was written.
INSERT INTO gates (id, gate, holder, instance_id, acquired_at, released_at)
SELECT id, gate, holder, instance_id, now, released_at FROM r;

-- name: release_slot_rows
UPDATE gates SET released_at = r.now
FROM r
WHERE gates.id = r.id AND gates.released_at IS NULL;

-- name: write_progress_rows
-- A queued change of an in-flight dispatch: plan, step and final status merged into one
-- row (NULL: not changed). A dispatch already final is left alone. Fenced: only the
-- instance that holds the dispatch changes it (instance_id NULL: no fence, the CLI).
UPDATE dispatches
SET plan = COALESCE(r.plan, dispatches.plan),
    current_step = COALESCE(r.current_step, dispatches.current_step),
    status = COALESCE(r.status, dispatches.status),
    error = CASE WHEN r.final THEN r.error ELSE dispatches.error END,
    finished_at = CASE WHEN r.final THEN r.now ELSE dispatches.finished_at END,
    updated_at = r.now
FROM r
WHERE dispatches.id = r.id AND dispatches.status NOT IN ('succeeded', 'failed', 'cancelled')
  AND (CAST(r.instance_id AS TEXT) IS NULL OR dispatches.instance_id = r.instance_id);

-- name: requeue_abandoned
UPDATE dispatches SET status = 'queued', instance_id = NULL, updated_at = :now
WHERE instance_id = :instance_id AND status IN ('planning', 'running')
  AND id NOT IN (SELECT value FROM json_each(:keep))
RETURNING id;

-- name: cancel_requests
SELECT id FROM dispatches
WHERE cancel_requested = 1 AND id IN (SELECT value FROM json_each(:ids));

-- name: max_id
-- The highest id ever given in :table (AUTOINCREMENT never reuses one), 0 for none. The
-- instance lock makes the daemon the only writer of attempts and gate rows, so it hands
-- out the ids that follow itself. (:table is one of two fixed names, see the store.)
SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = :table), 0),
           COALESCE((SELECT max(id) FROM attempts WHERE :table = 'attempts'), 0),
           COALESCE((SELECT max(id) FROM gates WHERE :table = 'gates'), 0)) AS id;

-- name: freelist_count
PRAGMA freelist_count;

-- name: incremental_vacuum
-- Returns up to 1000 free pages (4 MB at the default page size) to the file system.
-- Run with executescript: a plain execute steps this PRAGMA once, freeing one page.
-- A no-op unless the database has auto_vacuum = INCREMENTAL.
PRAGMA incremental_vacuum(1000);

-- name: optimize
PRAGMA optimize;

-- name: auto_vacuum_incremental
-- Takes effect only on a database without tables (a new one), and must come before
-- journal_mode = WAL; on an existing database it only takes effect after a VACUUM.
PRAGMA auto_vacuum = INCREMENTAL;

-- name: quick_check
-- A bounded check at start (no full index cross-check): stops at the first problem.
PRAGMA quick_check(1);

-- name: retry_dispatch
-- A failed or cancelled dispatch queued again, its plan, done steps and claim count
-- kept (a resumed dispatch reads its attempts: the steps that succeeded stay done); a
-- new series of attempts begins.
UPDATE dispatches
SET status = 'queued', error = NULL, finished_at = NULL, cancel_requested = 0,
    not_before = NULL, instance_id = NULL, series = series + 1, updated_at = :now
WHERE id = :id AND status IN ('failed', 'cancelled')
RETURNING *;

-- name: schedule_for_update
-- The schedule's row (see schedule_ensure). The transaction's write lock serializes
-- fires (one daemon per file).
SELECT last_fire, last_dispatch_id FROM schedules WHERE name = :name;
