-- PostgreSQL schema: the same tables and semantics as the SQLite store (its migrations
-- 0001 and 0010 folded into one). Timestamps are timestamptz; JSON columns are `json`
-- (kept as written, so params read back exactly as submitted). Identity ids are never
-- handed out twice, so a late close of a purged gate row cannot free a new holder.

CREATE TABLE dispatches (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task             TEXT        NOT NULL,
    params           JSON        NOT NULL,
    key              TEXT        UNIQUE,
    fingerprint      TEXT        NOT NULL,
    priority         BIGINT      NOT NULL DEFAULT 0,
    status           TEXT        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'planning', 'running', 'succeeded', 'failed', 'cancelled')),
    plan             JSON,
    current_step     INTEGER     NOT NULL DEFAULT 0 CHECK (current_step >= 0),
    gate_key         TEXT,
    not_before       TIMESTAMPTZ,
    cancel_requested BOOLEAN     NOT NULL DEFAULT FALSE,
    error            TEXT,
    instance_id      TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    claims           INTEGER     NOT NULL DEFAULT 0 CHECK (claims >= 0)
);

CREATE INDEX dispatches_claim ON dispatches (priority DESC, id) WHERE status = 'queued';
CREATE INDEX dispatches_status ON dispatches (status, id);
CREATE INDEX dispatches_in_flight ON dispatches (instance_id)
    WHERE status IN ('planning', 'running');

CREATE TABLE attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dispatch_id BIGINT      NOT NULL REFERENCES dispatches (id) ON DELETE CASCADE,
    step_index  INTEGER     NOT NULL,
    step        TEXT        NOT NULL,
    runner      TEXT        NOT NULL,
    attempt     INTEGER     NOT NULL CHECK (attempt >= 1),
    status      TEXT        NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'succeeded', 'failed', 'timed_out', 'cancelled',
                          'interrupted')),
    started_at  TIMESTAMPTZ NOT NULL,
    ended_at    TIMESTAMPTZ,
    exit_code   INTEGER,
    error       TEXT,
    output      TEXT,
    instance_id TEXT
);

CREATE INDEX attempts_dispatch_step ON attempts (dispatch_id, step_index);
CREATE INDEX attempts_running ON attempts (instance_id) WHERE status = 'running';

CREATE TABLE gates (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gate        TEXT        NOT NULL,
    holder      TEXT        NOT NULL,
    instance_id TEXT,
    acquired_at TIMESTAMPTZ NOT NULL,
    released_at TIMESTAMPTZ,
    recovered   BOOLEAN     NOT NULL DEFAULT FALSE
);

CREATE INDEX gates_held ON gates (gate) WHERE released_at IS NULL;
CREATE INDEX gates_released_at ON gates (released_at);

CREATE TABLE instances (
    id           TEXT        PRIMARY KEY,
    hostname     TEXT        NOT NULL,
    pid          INTEGER     NOT NULL,
    version      TEXT        NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    stopped_at   TIMESTAMPTZ
);

-- Wake-ups: a daemon LISTENs on these channels and claims at once instead of at the
-- next poll. Statement-level, so a batch of thousands sends one notification.
CREATE FUNCTION dispatcher_notify_dispatches() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dispatcher_dispatches', '');
    RETURN NULL;
END $$;

CREATE TRIGGER dispatches_inserted AFTER INSERT ON dispatches
    FOR EACH STATEMENT EXECUTE FUNCTION dispatcher_notify_dispatches();

CREATE FUNCTION dispatcher_notify_gates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dispatcher_gates', '');
    RETURN NULL;
END $$;

CREATE TRIGGER gates_released AFTER UPDATE OF released_at ON gates
    FOR EACH STATEMENT EXECUTE FUNCTION dispatcher_notify_gates();
