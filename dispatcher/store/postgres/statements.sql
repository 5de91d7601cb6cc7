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

-- name: gate_lock
-- Serializes the slot takers of one gate across every daemon until the commit.
SELECT pg_advisory_xact_lock(hashtext('dispatcher:gate:' || :gate));

-- name: maintenance_try_lock
SELECT pg_try_advisory_lock(hashtext('dispatcher:maintenance:' || :name)) AS locked;

-- name: maintenance_unlock
SELECT pg_advisory_unlock(hashtext('dispatcher:maintenance:' || :name));

-- name: optimize
ANALYZE gates, dispatches, attempts;
