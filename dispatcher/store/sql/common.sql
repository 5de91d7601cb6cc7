-- Named statements that SQLite and PostgreSQL both understand. Each block starts with
-- `-- name: NAME`. Parameters are named (:now) and bound by the driver (PostgreSQL's
-- store turns them into $1, $2 ...); no value is ever formatted in. A backend's own
-- `statements.sql` adds what its dialect spells differently; a name is defined once.
-- (TRUE is 1 in SQLite; `x || ''` keeps either planner off an index on x.)

-- name: migrations_current
SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations;

-- name: migrations_record
INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :now);

-- name: insert_dispatch
-- NULL keys never conflict, so a keyless submission always inserts.
INSERT INTO dispatches (task, params, key, fingerprint, priority, status, gate_key,
                        not_before, follows, created_at, updated_at)
VALUES (:task, :params, :key, :fingerprint, :priority, 'queued', :gate_key,
        :not_before, :follows, :now, :now)
ON CONFLICT (key) DO NOTHING
RETURNING id, status;

-- name: dispatch_by_key
SELECT id, status, fingerprint FROM dispatches WHERE key = :key;

-- name: next_due
-- When the dispatch loop's timer must go off: the earliest time a waiting dispatch
-- becomes due (a partial index serves it).
SELECT MIN(not_before) AS due FROM dispatches
WHERE status = 'queued' AND not_before IS NOT NULL AND not_before > :now;

-- name: requeue
-- Fenced like write_progress: a reaped daemon cannot take back a dispatch another holds.
UPDATE dispatches
SET status = 'queued', instance_id = NULL, not_before = :not_before, updated_at = :now
WHERE id = :id AND status IN ('planning', 'running')
  AND (CAST(:instance_id AS TEXT) IS NULL OR instance_id = :instance_id);

-- name: request_cancel
-- The right-hand sides see the row as it was before this update.
UPDATE dispatches
SET status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
    finished_at = CASE status WHEN 'queued' THEN :now ELSE finished_at END,
    error = CASE status WHEN 'queued' THEN :error ELSE error END,
    cancel_requested = CASE WHEN status IN ('planning', 'running') THEN TRUE
                            ELSE cancel_requested END,
    updated_at = :now
WHERE id = :id AND status IN ('queued', 'planning', 'running')
RETURNING *;

-- name: get_dispatch
SELECT * FROM dispatches WHERE id = :id;

-- name: list_dispatches
SELECT * FROM dispatches ORDER BY id DESC LIMIT :limit;

-- name: list_dispatches_by_status
SELECT * FROM dispatches WHERE status = :status ORDER BY id DESC LIMIT :limit;

-- name: count_by_status
SELECT status, COUNT(*) AS n FROM dispatches GROUP BY status;

-- name: step_attempts
SELECT * FROM attempts WHERE dispatch_id = :dispatch_id AND step_index = :step_index;

-- name: list_attempts
SELECT * FROM attempts WHERE dispatch_id = :dispatch_id;

-- name: insert_slot
-- A gate row; `released_at` is set when it was released before the insert was written.
INSERT INTO gates (id, gate, holder, instance_id, acquired_at, released_at)
VALUES (:id, :gate, :holder, :instance_id, :now, :released_at);

-- name: close_slot
-- Release exactly once: only an unreleased row matches, so a late second call is a no-op.
UPDATE gates SET released_at = :now WHERE id = :id AND released_at IS NULL RETURNING id;

-- name: held_slots
SELECT * FROM gates WHERE released_at IS NULL ORDER BY id;

-- name: gate_row_counts
SELECT (SELECT COUNT(*) FROM gates WHERE released_at IS NULL) AS held,
       (SELECT COUNT(*) FROM gates WHERE released_at IS NOT NULL) AS released;

-- name: gate_held_count
SELECT COUNT(*) AS n FROM gates WHERE gate = :gate AND released_at IS NULL;

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
)
RETURNING id;

-- name: count_purgeable
SELECT COUNT(*) AS n FROM gates WHERE released_at < :before;

-- name: retention_attempts
-- The attempts of the batch that retention_dispatches deletes next, in the same
-- transaction (same ORDER BY and LIMIT, so the same dispatches). `status || ''` keeps
-- the planner off dispatches_status (it would sort every finished dispatch): the range
-- scan of dispatches_finished_at is the cheap plan, already in order.
DELETE FROM attempts
WHERE dispatch_id IN (
    SELECT id FROM dispatches
    WHERE finished_at < :before AND status || '' IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at, id
    LIMIT :batch_size
)
RETURNING id;

-- name: retention_dispatches
DELETE FROM dispatches
WHERE id IN (
    SELECT id FROM dispatches
    WHERE finished_at < :before AND status || '' IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at, id
    LIMIT :batch_size
)
RETURNING id;

-- name: count_expired
SELECT COUNT(*) AS dispatches,
       COALESCE(SUM((SELECT COUNT(*) FROM attempts WHERE attempts.dispatch_id = d.id)), 0)
           AS attempts
FROM dispatches AS d
WHERE finished_at < :before AND status || '' IN ('succeeded', 'failed', 'cancelled');

-- name: reap_slots
-- Rows of instances that are neither :keep nor live (heartbeat at or after :since).
-- Recovery at start passes a :since in the far future where one daemon owns the
-- database: then every other instance is dead.
UPDATE gates SET released_at = :now, recovered = TRUE
WHERE released_at IS NULL AND COALESCE(instance_id, '') <> :keep
  AND NOT EXISTS (SELECT 1 FROM instances
                  WHERE instances.id = gates.instance_id AND instances.stopped_at IS NULL
                    AND instances.heartbeat_at >= :since)
RETURNING id;

-- name: reap_attempts
UPDATE attempts SET status = 'interrupted', ended_at = :now
WHERE status = 'running' AND COALESCE(instance_id, '') <> :keep
  AND NOT EXISTS (SELECT 1 FROM instances
                  WHERE instances.id = attempts.instance_id AND instances.stopped_at IS NULL
                    AND instances.heartbeat_at >= :since)
RETURNING id;

-- name: reap_dispatches
UPDATE dispatches SET status = 'queued', instance_id = NULL, updated_at = :now
WHERE status IN ('planning', 'running') AND COALESCE(instance_id, '') <> :keep
  AND NOT EXISTS (SELECT 1 FROM instances
                  WHERE instances.id = dispatches.instance_id
                    AND instances.stopped_at IS NULL AND instances.heartbeat_at >= :since)
RETURNING id;

-- name: reap_instances
-- A reaped instance is marked stopped, so it is reaped once.
UPDATE instances SET stopped_at = :now
WHERE stopped_at IS NULL AND heartbeat_at < :since AND id <> :keep;

-- name: register_instance
INSERT INTO instances (id, hostname, pid, version, started_at, heartbeat_at, stopped_at)
VALUES (:id, :hostname, :pid, :version, :started_at, :heartbeat_at, :stopped_at);

-- name: heartbeat
-- Renews the lease: a reaped (stopped) instance is never revived; no row means it was.
UPDATE instances SET heartbeat_at = :now WHERE id = :id AND stopped_at IS NULL
RETURNING id;

-- name: stop_instance
UPDATE instances SET stopped_at = :now WHERE id = :id AND stopped_at IS NULL;

-- name: live_instances
SELECT * FROM instances
WHERE stopped_at IS NULL AND heartbeat_at >= :since
ORDER BY started_at, id;

-- name: schedule_ensure
-- The row a schedule's fires serialize on; a new one has handled no fire yet.
INSERT INTO schedules (name, last_fire, last_outcome, updated_at)
VALUES (:name, :never, 'none', :now)
ON CONFLICT (name) DO NOTHING;

-- name: schedule_record
-- A fire handled: its time (never moving back), what came of it, and its dispatch.
UPDATE schedules
SET last_fire = :fire,
    last_outcome = :outcome,
    last_dispatch_id = COALESCE(:dispatch_id, last_dispatch_id),
    updated_at = :now
WHERE name = :name AND last_fire < :fire;

-- name: schedule_states
SELECT s.name, s.last_fire, s.last_outcome, s.last_dispatch_id,
       d.status AS last_status
FROM schedules AS s LEFT JOIN dispatches AS d ON d.id = s.last_dispatch_id
ORDER BY s.name;
