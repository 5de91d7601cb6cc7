-- Named statements of the PostgreSQL store that its dialect spells its own way (the
-- rest is in `sql/common.sql`). Parameters are named (:now) and turned into positional
-- ones ($1) when loaded; a list parameter is one array (:blocked_gates::text[]).

-- name: migrations_lock
-- Concurrent starters wait here, so only one of them applies the migrations.
SELECT pg_advisory_xact_lock(hashtext('dispatcher:migrate'));

-- name: migrations_create_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL
);

-- name: claim_many
-- SKIP LOCKED: concurrent claimers (several daemons) pass over each other's rows
-- instead of waiting. The pick is a CTE so it runs once, before the update. Fenced: a
-- claimer whose lease (:fence, its instance) was taken claims nothing; its lease row,
-- locked FOR SHARE, cannot be reaped until this commits. (:fence NULL: no fence.)
WITH lease AS (
    SELECT id FROM instances
    WHERE id = :fence AND stopped_at IS NULL
    FOR SHARE
), picked AS (
    SELECT q.id FROM dispatches AS q
    WHERE q.status = 'queued'
      AND (q.not_before IS NULL OR q.not_before <= :now)
      AND (q.gate_key IS NULL OR NOT (q.gate_key = ANY(:blocked_gates::text[])))
      AND (q.follows IS NULL
           OR NOT EXISTS (SELECT 1 FROM dispatches AS p WHERE p.id = q.follows
                            AND p.status IN ('queued', 'planning', 'running')))
      AND (CAST(:fence AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM lease))
    ORDER BY q.priority DESC, q.id
    LIMIT :limit
    FOR UPDATE OF q SKIP LOCKED
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

-- name: requeue_abandoned
UPDATE dispatches SET status = 'queued', instance_id = NULL, updated_at = :now
WHERE instance_id = :instance_id AND status IN ('planning', 'running')
  AND NOT (id = ANY(:keep::bigint[]))
RETURNING id;

-- name: cancel_requests
SELECT id FROM dispatches WHERE cancel_requested AND id = ANY(:ids::bigint[]);

-- name: id_block
-- Ids for rows written later: several daemons share the sequence, so each takes a
-- block of its own.
SELECT nextval(pg_get_serial_sequence(:table, 'id')) AS id
FROM generate_series(1, :size);

-- name: lease_check
-- The fence of a transaction that writes about work this instance owns: its lease is
-- current (not reaped), and stays so until the commit (a reaper's UPDATE of this row
-- waits for the FOR SHARE lock).
SELECT id FROM instances WHERE id = :instance_id AND stopped_at IS NULL FOR SHARE;

-- name: gate_lock
-- Serializes the slot takers of one gate across every daemon until the commit.
SELECT pg_advisory_xact_lock(hashtext('dispatcher:gate:' || :gate));

-- name: maintenance_try_lock
SELECT pg_try_advisory_lock(hashtext('dispatcher:maintenance:' || :name)) AS locked;

-- name: maintenance_unlock
SELECT pg_advisory_unlock(hashtext('dispatcher:maintenance:' || :name));

-- name: optimize
ANALYZE gates, dispatches, attempts;

-- name: retry_dispatch
-- A failed or cancelled dispatch queued again, its plan, done steps and claim count
-- kept (a resumed dispatch reads its attempts: the steps that succeeded stay done); a
-- new series of attempts begins. The UPDATE fires no insert trigger: it wakes the
-- daemons itself.
WITH retried AS (
    UPDATE dispatches
    SET status = 'queued', error = NULL, finished_at = NULL, cancel_requested = FALSE,
        not_before = NULL, instance_id = NULL, series = series + 1, updated_at = :now
    WHERE id = :id AND status IN ('failed', 'cancelled')
    RETURNING *
)
SELECT retried.*, pg_notify('dispatcher_dispatches', '')::text AS notified FROM retried;

-- name: schedule_for_update
-- The schedule's row (see schedule_ensure), locked: the daemons that fire one schedule
-- take turns here until the commit.
SELECT last_fire, last_dispatch_id FROM schedules WHERE name = :name
FOR UPDATE;
-- name: write_batch
-- Every queued write of one batch in one statement (its own transaction), fenced on
-- the lease (:fence NULL: no fence); see migration 0022. Rows are arrays of composite
-- values, one array per kind of write.
SELECT dispatcher_write_batch(
    :fence,
    :insert_attempt::dispatcher_attempt_row[],
    :finish_attempt::dispatcher_attempt_end[],
    :insert_slot::dispatcher_slot_row[],
    :release_slot::dispatcher_slot_release[],
    :write_progress::dispatcher_progress[]
);

-- name: claim_with_slots
-- A claim and its places of :gate in one statement (migration 0022). A row with a NULL
-- id: nothing was claimed; `room` still says how many places were free.
SELECT c.granted_room AS room, c.granted_slot AS slot_id, (c.claimed).*
FROM dispatcher_claim(:instance_id, :now, :blocked_gates::text[], :limit, :fence, :gate,
                      :capacity, :slot_ids::bigint[], :released::bigint[]) AS c;

-- name: take_slot
-- One held row of a shared gate, below :capacity across every instance (migration
-- 0022); NULL when full. Fenced: raises SQLSTATE DPL01 when the lease was taken.
SELECT dispatcher_take_slot(:id, :gate, :holder, :instance_id, :capacity, :now, :fence,
                            :released::bigint[]) AS id;
