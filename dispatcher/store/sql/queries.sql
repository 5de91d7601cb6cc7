-- Named statements of the SQLite store. Each block starts with `-- name: NAME`.
-- Parameters are named (:now) and bound by the driver; no value is ever formatted in.
-- A list parameter (:ids, :blocked_gates) is one JSON array expanded with json_each.

-- name: migrations_create_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);

-- name: migrations_current
SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations;

-- name: migrations_record
INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :now);

-- name: insert_dispatch
-- NULL keys never conflict, so a keyless submission always inserts.
INSERT INTO dispatches (task, params, key, fingerprint, priority, status, gate_key,
                        created_at, updated_at)
VALUES (:task, :params, :key, :fingerprint, :priority, 'queued', :gate_key, :now, :now)
ON CONFLICT (key) DO NOTHING
RETURNING id, status;

-- name: dispatch_by_key
SELECT id, status, fingerprint FROM dispatches WHERE key = :key;

-- name: save_plan
UPDATE dispatches
SET plan = :plan, status = 'running', current_step = 0, updated_at = :now
WHERE id = :id;

-- name: advance
UPDATE dispatches SET current_step = :next_step, updated_at = :now WHERE id = :id;

-- name: requeue
UPDATE dispatches
SET status = 'queued', instance_id = NULL, not_before = :not_before, updated_at = :now
WHERE id = :id AND status IN ('planning', 'running');

-- name: finish_dispatch
-- :plan and :current_step are a save_plan and an advance that were still queued
-- (NULL: none was); a plan saved here starts at step 0 like save_plan's.
UPDATE dispatches
SET status = :status, error = :error, finished_at = :now, updated_at = :now,
    plan = COALESCE(:plan, plan),
    current_step = COALESCE(:current_step, CASE WHEN :plan IS NULL THEN current_step ELSE 0 END)
WHERE id = :id AND status NOT IN ('succeeded', 'failed', 'cancelled');

-- name: request_cancel
-- The right-hand sides see the row as it was before this update.
UPDATE dispatches
SET status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
    finished_at = CASE status WHEN 'queued' THEN :now ELSE finished_at END,
    error = CASE status WHEN 'queued' THEN :error ELSE error END,
    cancel_requested = CASE WHEN status IN ('planning', 'running') THEN 1
                            ELSE cancel_requested END,
    updated_at = :now
WHERE id = :id AND status IN ('queued', 'planning', 'running')
RETURNING *;

-- name: cancel_requests
SELECT id FROM dispatches
WHERE cancel_requested = 1 AND id IN (SELECT value FROM json_each(:ids))
ORDER BY id;

-- name: get_dispatch
SELECT * FROM dispatches WHERE id = :id;

-- name: list_dispatches
SELECT * FROM dispatches ORDER BY id DESC LIMIT :limit;

-- name: list_dispatches_by_status
SELECT * FROM dispatches WHERE status = :status ORDER BY id DESC LIMIT :limit;

-- name: count_by_status
SELECT status, COUNT(*) AS n FROM dispatches GROUP BY status;

-- name: max_attempt_id
-- The highest attempt id ever given (AUTOINCREMENT never reuses one), 0 for none.
SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'attempts'), 0),
           COALESCE((SELECT max(id) FROM attempts), 0)) AS id;

-- name: start_attempt
INSERT INTO attempts (id, dispatch_id, step_index, step, runner, attempt, status,
                      started_at, instance_id)
VALUES (:id, :dispatch_id, :step_index, :step, :runner, :attempt, 'running', :now,
        :instance_id);

-- name: insert_finished_attempt
INSERT INTO attempts (id, dispatch_id, step_index, step, runner, attempt, status,
                      started_at, ended_at, exit_code, error, output, instance_id)
VALUES (:id, :dispatch_id, :step_index, :step, :runner, :attempt, :status, :now,
        :ended_at, :exit_code, :error, :output, :instance_id);

-- name: finish_attempt
UPDATE attempts
SET status = :status, ended_at = :ended_at, exit_code = :exit_code, error = :error,
    output = :output
WHERE id = :id AND status = 'running';

-- name: step_attempts
SELECT * FROM attempts
WHERE dispatch_id = :dispatch_id AND step_index = :step_index
ORDER BY id;

-- name: list_attempts
SELECT * FROM attempts WHERE dispatch_id = :dispatch_id ORDER BY id;

-- name: open_slot
INSERT INTO gates (gate, holder, instance_id, acquired_at)
VALUES (:gate, :holder, :instance_id, :now)
RETURNING id;

-- name: close_slot
-- Release exactly once: only an unreleased row matches, so a late second call is a no-op.
UPDATE gates SET released_at = :now WHERE id = :id AND released_at IS NULL RETURNING id;

-- name: held_slots
SELECT * FROM gates WHERE released_at IS NULL ORDER BY id;

-- name: gate_row_counts
SELECT (SELECT COUNT(*) FROM gates WHERE released_at IS NULL) AS held,
       (SELECT COUNT(*) FROM gates WHERE released_at IS NOT NULL) AS released;

-- name: recover_slots
UPDATE gates SET released_at = :now, recovered = 1
WHERE released_at IS NULL AND instance_id IS NOT :instance_id
RETURNING id;

-- name: recover_attempts
UPDATE attempts SET status = 'interrupted', ended_at = :now
WHERE status = 'running' AND instance_id IS NOT :instance_id
RETURNING id;

-- name: recover_dispatches
UPDATE dispatches SET status = 'queued', instance_id = NULL, updated_at = :now
WHERE status IN ('planning', 'running') AND instance_id IS NOT :instance_id
RETURNING id;

-- name: register_instance
INSERT INTO instances (id, hostname, pid, version, started_at, heartbeat_at, stopped_at)
VALUES (:id, :hostname, :pid, :version, :started_at, :heartbeat_at, :stopped_at);

-- name: heartbeat
UPDATE instances SET heartbeat_at = :now WHERE id = :id;

-- name: stop_instance
UPDATE instances SET stopped_at = :now WHERE id = :id AND stopped_at IS NULL;

-- name: live_instances
SELECT * FROM instances
WHERE stopped_at IS NULL AND heartbeat_at >= :since
ORDER BY started_at, id;

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
    SELECT id FROM dispatches
    WHERE status = 'queued'
      AND (not_before IS NULL OR not_before <= :now)
      AND (gate_key IS NULL
           OR gate_key NOT IN (SELECT value FROM json_each(:blocked_gates)))
    ORDER BY priority DESC, id
    LIMIT :limit
)
RETURNING *;

-- name: mirror_open
-- A gate row queued by the gate; `released_at` is set when it was released before the
-- insert was written.
INSERT INTO gates (gate, holder, instance_id, acquired_at, released_at)
VALUES (:gate, :holder, :instance_id, :now, :released_at)
RETURNING id;

-- name: mirror_close
UPDATE gates SET released_at = :now WHERE id = :id AND released_at IS NULL;

-- name: purge_released
-- One batch of the purge: the oldest released rows before the cutoff. The inner SELECT
-- is a range scan of gates_released_at; `released_at < :before` never matches a held
-- row (NULL compares as unknown).
DELETE FROM gates
WHERE id IN (
    SELECT id FROM gates
    WHERE released_at < :before
    ORDER BY released_at
    LIMIT :batch_size
);

-- name: count_purgeable
SELECT COUNT(*) AS n FROM gates WHERE released_at < :before;

-- name: retention_attempts
-- The attempts of the batch that retention_dispatches deletes next, in the same
-- transaction (same ORDER BY and LIMIT, so the same dispatches). `+status` keeps the
-- planner off dispatches_status (it would sort every finished dispatch): the range
-- scan of dispatches_finished_at is the cheap plan, already in order.
DELETE FROM attempts
WHERE dispatch_id IN (
    SELECT id FROM dispatches
    WHERE finished_at < :before AND +status IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at, id
    LIMIT :batch_size
);

-- name: retention_dispatches
DELETE FROM dispatches
WHERE id IN (
    SELECT id FROM dispatches
    WHERE finished_at < :before AND +status IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at, id
    LIMIT :batch_size
);

-- name: count_expired
SELECT COUNT(*) AS dispatches,
       COALESCE(SUM((SELECT COUNT(*) FROM attempts WHERE attempts.dispatch_id = d.id)), 0)
           AS attempts
FROM dispatches AS d
WHERE finished_at < :before AND +status IN ('succeeded', 'failed', 'cancelled');

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

-- name: gate_held_count
SELECT COUNT(*) AS n FROM gates WHERE gate = :gate AND released_at IS NULL;

-- name: reap_slots
-- Rows of instances that are neither :keep nor live (heartbeat at or after :since).
UPDATE gates SET released_at = :now, recovered = 1
WHERE released_at IS NULL AND instance_id IS NOT :keep
  AND NOT EXISTS (SELECT 1 FROM instances i
                  WHERE i.id = gates.instance_id AND i.stopped_at IS NULL
                    AND i.heartbeat_at >= :since)
RETURNING id;

-- name: reap_attempts
UPDATE attempts SET status = 'interrupted', ended_at = :now
WHERE status = 'running' AND instance_id IS NOT :keep
  AND NOT EXISTS (SELECT 1 FROM instances i
                  WHERE i.id = attempts.instance_id AND i.stopped_at IS NULL
                    AND i.heartbeat_at >= :since)
RETURNING id;

-- name: reap_dispatches
UPDATE dispatches SET status = 'queued', instance_id = NULL, updated_at = :now
WHERE status IN ('planning', 'running') AND instance_id IS NOT :keep
  AND NOT EXISTS (SELECT 1 FROM instances i
                  WHERE i.id = dispatches.instance_id AND i.stopped_at IS NULL
                    AND i.heartbeat_at >= :since)
RETURNING id;

-- name: reap_instances
UPDATE instances SET stopped_at = :now
WHERE stopped_at IS NULL AND heartbeat_at < :since AND id IS NOT :keep;
