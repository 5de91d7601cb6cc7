-- Issue 21: PostgreSQL at speed. Three functions, so that each hot verb is one
-- statement, one round trip and one transaction:
--   dispatcher_write_batch  every queued write of one turn of the loop (rows passed as
--                           arrays of the composite types below), fenced on the lease;
--   dispatcher_claim        a batch of queued dispatches and, for each, a held row of a
--                           shared gate, never beyond the gate's capacity;
--   dispatcher_take_slot    one held row of a shared gate, below its capacity.
-- A refused fence raises SQLSTATE DPL01, which the store turns into LeaseLost.
--
-- The caps stay exact across daemons: a grant takes the gate's advisory lock, then
-- counts the held rows. The count is a statement of its own inside a VOLATILE function,
-- so in READ COMMITTED it takes a new snapshot after the lock is granted, and sees every
-- row the previous holder of the lock committed. The lock lasts the statement's own
-- transaction: microseconds, not a round trip.

CREATE TYPE dispatcher_attempt_row AS (
    id bigint, dispatch_id bigint, step_index integer, step text, runner text,
    attempt integer, status text, started_at timestamptz, ended_at timestamptz,
    exit_code integer, error text, output text, instance_id text, result text,
    series integer
);

CREATE TYPE dispatcher_attempt_end AS (
    id bigint, status text, ended_at timestamptz, exit_code integer, error text,
    output text, result text
);

CREATE TYPE dispatcher_slot_row AS (
    id bigint, gate text, holder text, instance_id text, acquired_at timestamptz,
    released_at timestamptz
);

CREATE TYPE dispatcher_slot_release AS (id bigint, released_at timestamptz);

CREATE TYPE dispatcher_progress AS (
    id bigint, instance_id text, plan text, current_step integer, status text,
    final boolean, error text, changed_at timestamptz
);

CREATE FUNCTION dispatcher_lease_held(fence text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- FOR SHARE until the commit: a reaper's UPDATE of this row waits for us, and once
    -- it is through, this check fails.
    PERFORM 1 FROM instances WHERE id = fence AND stopped_at IS NULL FOR SHARE;
    RETURN FOUND;
END $$;

CREATE FUNCTION dispatcher_write_batch(
    fence text,
    new_attempts dispatcher_attempt_row[],
    attempt_ends dispatcher_attempt_end[],
    new_slots dispatcher_slot_row[],
    slot_releases dispatcher_slot_release[],
    progress dispatcher_progress[]
) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF fence IS NOT NULL AND NOT dispatcher_lease_held(fence) THEN
        RAISE EXCEPTION 'instance % was reaped: its writes are refused', fence
            USING ERRCODE = 'DPL01';
    END IF;
    -- In this order (a row's insert before its update); an empty kind runs no
    -- statement, so no statement trigger fires for it.
    IF cardinality(new_attempts) > 0 THEN
        INSERT INTO attempts (id, dispatch_id, step_index, step, runner, attempt, status,
                              started_at, ended_at, exit_code, error, output, instance_id,
                              result, series)
        SELECT a.id, a.dispatch_id, a.step_index, a.step, a.runner, a.attempt, a.status,
               a.started_at, a.ended_at, a.exit_code, a.error, a.output, a.instance_id,
               a.result::json, a.series
        FROM unnest(new_attempts) AS a;
    END IF;
    IF cardinality(attempt_ends) > 0 THEN
        UPDATE attempts AS t
        SET status = e.status, ended_at = e.ended_at, exit_code = e.exit_code,
            error = e.error, output = e.output, result = e.result::json
        FROM unnest(attempt_ends) AS e
        WHERE t.id = e.id AND t.status = 'running';
    END IF;
    IF cardinality(new_slots) > 0 THEN
        INSERT INTO gates (id, gate, holder, instance_id, acquired_at, released_at)
        SELECT s.id, s.gate, s.holder, s.instance_id, s.acquired_at, s.released_at
        FROM unnest(new_slots) AS s;
    END IF;
    IF cardinality(slot_releases) > 0 THEN
        UPDATE gates AS g SET released_at = r.released_at
        FROM unnest(slot_releases) AS r
        WHERE g.id = r.id AND g.released_at IS NULL;
    END IF;
    IF cardinality(progress) > 0 THEN
        UPDATE dispatches AS d
        SET plan = COALESCE(p.plan::json, d.plan),
            current_step = COALESCE(p.current_step, d.current_step),
            status = COALESCE(p.status, d.status),
            error = CASE WHEN p.final THEN p.error ELSE d.error END,
            finished_at = CASE WHEN p.final THEN p.changed_at ELSE d.finished_at END,
            updated_at = p.changed_at
        FROM unnest(progress) AS p
        WHERE d.id = p.id AND d.status NOT IN ('succeeded', 'failed', 'cancelled')
          AND (p.instance_id IS NULL OR d.instance_id = p.instance_id);
    END IF;
END $$;

CREATE FUNCTION dispatcher_gate_room(
    slot_gate text, capacity integer, released bigint[]
) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held integer;
BEGIN
    -- The lock lasts until the transaction ends, and a synchronous commit ends only once
    -- its WAL is on disk: every grant of the gate would wait for the previous one's
    -- fsync. This transaction commits asynchronously instead (visible at once, on disk
    -- a moment later). That loses nothing a step could have acted on: a step with
    -- effects starts only once its attempt row is durable, a synchronous commit later
    -- in the WAL, which puts this grant on disk first.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('dispatcher:gate:' || slot_gate));
    -- A new snapshot (see the top): every grant committed before ours is counted.
    -- `released`: rows the caller has given back whose release is still on its way.
    SELECT COUNT(*) INTO held FROM gates
    WHERE gate = slot_gate AND released_at IS NULL AND NOT (id = ANY(released));
    RETURN GREATEST(capacity - held, 0);
END $$;

CREATE FUNCTION dispatcher_take_slot(
    slot_id bigint, slot_gate text, slot_holder text, owner text, capacity integer,
    taken_at timestamptz, fence text, released bigint[]
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF fence IS NOT NULL AND NOT dispatcher_lease_held(fence) THEN
        RAISE EXCEPTION 'instance % was reaped: its writes are refused', fence
            USING ERRCODE = 'DPL01';
    END IF;
    IF dispatcher_gate_room(slot_gate, capacity, released) < 1 THEN
        RETURN NULL;
    END IF;
    INSERT INTO gates (id, gate, holder, instance_id, acquired_at)
    VALUES (slot_id, slot_gate, slot_holder, owner, taken_at);
    RETURN slot_id;
END $$;

CREATE FUNCTION dispatcher_claim(
    claimer text, claim_at timestamptz, blocked text[], wanted integer, fence text,
    slot_gate text, capacity integer, slot_ids bigint[], released bigint[]
) RETURNS TABLE (granted_room integer, granted_slot bigint, claimed dispatches)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    room integer;
BEGIN
    IF fence IS NOT NULL AND NOT dispatcher_lease_held(fence) THEN
        RETURN;  -- a claimer whose lease was taken claims nothing
    END IF;
    room := dispatcher_gate_room(slot_gate, capacity, released);
    RETURN QUERY
    WITH picked AS (
        SELECT q.id FROM dispatches AS q
        WHERE q.status = 'queued'
          AND (q.not_before IS NULL OR q.not_before <= claim_at)
          AND (q.gate_key IS NULL OR NOT (q.gate_key = ANY(blocked)))
          -- overlap = "queue": not before the dispatch it follows has ended
          AND (q.follows IS NULL
               OR NOT EXISTS (SELECT 1 FROM dispatches AS p WHERE p.id = q.follows
                                AND p.status IN ('queued', 'planning', 'running')))
        ORDER BY q.priority DESC, q.id
        LIMIT LEAST(wanted, room, cardinality(slot_ids))
        FOR UPDATE OF q SKIP LOCKED
    ), taken AS (
        UPDATE dispatches AS d
        SET status = CASE WHEN d.plan IS NULL THEN 'planning' ELSE 'running' END,
            instance_id = claimer,
            started_at = COALESCE(d.started_at, claim_at),
            claims = d.claims + 1,
            updated_at = claim_at
        FROM picked
        WHERE d.id = picked.id
        RETURNING d AS drow, d.id AS id
    ), numbered AS (
        SELECT t.drow, t.id, row_number() OVER (ORDER BY t.id) AS n FROM taken AS t
    ), slots AS (
        INSERT INTO gates (id, gate, holder, instance_id, acquired_at)
        SELECT slot_ids[m.n], slot_gate, 'dispatch:' || m.id, claimer, claim_at FROM numbered AS m
    )
    SELECT room, slot_ids[m.n], m.drow FROM numbered AS m;
    IF NOT FOUND THEN  -- nothing claimed: still say how much room there was
        RETURN QUERY SELECT room, NULL::bigint, NULL::dispatches;
    END IF;
END $$;

-- A cancel request says so in its payload, so a daemon looks for cancel requests on
-- those wake-ups only (a submission wakes the claim, not that look).
CREATE FUNCTION dispatcher_notify_cancel() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dispatcher_dispatches', 'cancel');
    RETURN NULL;
END $$;

DROP TRIGGER dispatches_cancel_requested ON dispatches;
CREATE TRIGGER dispatches_cancel_requested AFTER UPDATE OF cancel_requested ON dispatches
    FOR EACH STATEMENT EXECUTE FUNCTION dispatcher_notify_cancel();
