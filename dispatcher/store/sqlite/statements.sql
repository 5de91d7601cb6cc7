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
