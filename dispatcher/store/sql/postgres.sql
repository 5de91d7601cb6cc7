-- Named statements of the PostgreSQL store. Each block starts with `-- name: NAME`.
-- Parameters are named (:now) and turned into positional ones ($1) when loaded; a list
-- parameter is one array (:blocked_gates::text[]). No value is ever formatted in.

-- name: migrations_lock
-- Concurrent starters wait here, so only one of them applies the migrations.
SELECT pg_advisory_xact_lock(hashtext('dispatcher:migrate'));

-- name: migrations_create_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL
);

-- name: migrations_current
SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations;

-- name: migrations_record
INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :now);

-- name: insert_dispatch
INSERT INTO dispatches (task, params, key, fingerprint, priority, status, gate_key,
                        created_at, updated_at)
VALUES (:task, :params, :key, :fingerprint, :priority, 'queued', :gate_key, :now, :now)
ON CONFLICT (key) DO NOTHING
RETURNING id, status;

-- name: dispatch_by_key
SELECT id, status, fingerprint FROM dispatches WHERE key = :key;

-- name: claim_many
-- SKIP LOCKED: concurrent claimers (several daemons) pass over each other's rows
-- instead of waiting. The pick is a CTE so it runs once, before the update.
WITH picked AS (
    SELECT id FROM dispatches
    WHERE status = 'queued'
      AND (not_before IS NULL OR not_before <= :now)
      AND (gate_key IS NULL OR NOT (gate_key = ANY(:blocked_gates::text[])))
    ORDER BY priority DESC, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE dispatches d
SET status = CASE WHEN d.plan IS NULL THEN 'planning' ELSE 'running' END,
    instance_id = :instance_id,
    started_at = COALESCE(d.started_at, :now),
    claims = d.claims + 1,
    updated_at = :now
FROM picked
WHERE d.id = picked.id
RETURNING d.*;

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
UPDATE dispatches
SET status = :status, error = :error, finished_at = :now, updated_at = :now
WHERE id = :id AND status NOT IN ('succeeded', 'failed', 'cancelled');

-- name: request_cancel
-- The right-hand sides see the row as it was before this update.
UPDATE dispatches
SET status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
    finished_at = CASE status WHEN 'queued' THEN :now ELSE finished_at END,
    error = CASE status WHEN 'queued' THEN :error ELSE error END,
    cancel_requested = (status IN ('planning', 'running')) OR cancel_requested,
    updated_at = :now
WHERE id = :id AND status IN ('queued', 'planning', 'running')
RETURNING *;

-- name: cancel_requests
SELECT id FROM dispatches
WHERE cancel_requested AND id = ANY(:ids::bigint[])
ORDER BY id;

-- name: get_dispatch
SELECT * FROM dispatches WHERE id = :id;

-- name: list_dispatches
SELECT * FROM dispatches ORDER BY id DESC LIMIT :limit;

-- name: list_dispatches_by_status
SELECT * FROM dispatches WHERE status = :status ORDER BY id DESC LIMIT :limit;

-- name: count_by_status
SELECT status, COUNT(*) AS n FROM dispatches GROUP BY status;

-- name: start_attempt
INSERT INTO attempts (dispatch_id, step_index, step, runner, attempt, status, started_at,
                      instance_id)
VALUES (:dispatch_id, :step_index, :step, :runner, :attempt, 'running', :now, :instance_id)
RETURNING id;

-- name: finish_attempt
UPDATE attempts
SET status = :status, ended_at = :now, exit_code = :exit_code, error = :error,
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
-- Release exactly once: only an unreleased row matches.
UPDATE gates SET released_at = :now WHERE id = :id AND released_at IS NULL RETURNING id;

-- name: held_slots
SELECT * FROM gates WHERE released_at IS NULL ORDER BY id;

-- name: gate_row_counts
SELECT (SELECT COUNT(*) FROM gates WHERE released_at IS NULL) AS held,
       (SELECT COUNT(*) FROM gates WHERE released_at IS NOT NULL) AS released;

-- name: gate_lock
-- Serializes the slot takers of one gate across every daemon until the commit.
SELECT pg_advisory_xact_lock(hashtext('dispatcher:gate:' || :gate));

-- name: gate_held_count
SELECT COUNT(*) AS n FROM gates WHERE gate = :gate AND released_at IS NULL;

-- name: reap_slots
-- Rows of instances that are neither `keep` nor live (heartbeat at or after :since).
UPDATE gates g SET released_at = :now, recovered = TRUE
WHERE g.released_at IS NULL
  AND g.instance_id IS DISTINCT FROM :keep
  AND NOT EXISTS (SELECT 1 FROM instances i
                  WHERE i.id = g.instance_id AND i.stopped_at IS NULL
                    AND i.heartbeat_at >= :since)
RETURNING id;

-- name: reap_attempts
UPDATE attempts a SET status = 'interrupted', ended_at = :now
WHERE a.status = 'running'
  AND a.instance_id IS DISTINCT FROM :keep
  AND NOT EXISTS (SELECT 1 FROM instances i
                  WHERE i.id = a.instance_id AND i.stopped_at IS NULL
                    AND i.heartbeat_at >= :since)
RETURNING id;

-- name: reap_dispatches
UPDATE dispatches d SET status = 'queued', instance_id = NULL, updated_at = :now
WHERE d.status IN ('planning', 'running')
  AND d.instance_id IS DISTINCT FROM :keep
  AND NOT EXISTS (SELECT 1 FROM instances i
                  WHERE i.id = d.instance_id AND i.stopped_at IS NULL
                    AND i.heartbeat_at >= :since)
RETURNING id;

-- name: reap_instances
-- A reaped instance is marked stopped, so it is reaped once.
UPDATE instances SET stopped_at = :now
WHERE stopped_at IS NULL AND heartbeat_at < :since AND id IS DISTINCT FROM :keep;

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

-- name: mirror_close
UPDATE gates SET released_at = :now WHERE id = :id AND released_at IS NULL;

-- name: maintenance_try_lock
SELECT pg_try_advisory_lock(hashtext('dispatcher:maintenance:' || :name)) AS locked;

-- name: maintenance_unlock
SELECT pg_advisory_unlock(hashtext('dispatcher:maintenance:' || :name));

-- name: purge_released
-- One batch of the purge: the oldest released rows before the cutoff (a range scan of
-- gates_released_at; a held row has released_at NULL and never matches).
DELETE FROM gates
WHERE id IN (
    SELECT id FROM gates
    WHERE released_at < :before
    ORDER BY released_at
    LIMIT :batch_size
)
RETURNING 1;

-- name: count_purgeable
SELECT COUNT(*) AS n FROM gates WHERE released_at < :before;

-- name: retention_attempts
-- The attempts of the batch that retention_dispatches deletes next (same ORDER BY and
-- LIMIT, in the same transaction).
DELETE FROM attempts
WHERE dispatch_id IN (
    SELECT id FROM dispatches
    WHERE finished_at < :before AND status IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at, id
    LIMIT :batch_size
)
RETURNING 1;

-- name: retention_dispatches
DELETE FROM dispatches
WHERE id IN (
    SELECT id FROM dispatches
    WHERE finished_at < :before AND status IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at, id
    LIMIT :batch_size
)
RETURNING 1;

-- name: count_expired
SELECT COUNT(*) AS dispatches,
       COALESCE(SUM((SELECT COUNT(*) FROM attempts WHERE attempts.dispatch_id = d.id)), 0)
           AS attempts
FROM dispatches AS d
WHERE finished_at < :before AND status IN ('succeeded', 'failed', 'cancelled');

-- name: optimize
ANALYZE gates, dispatches, attempts;
