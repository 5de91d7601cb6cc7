-- Initial schema. Timestamps are ISO-8601 UTC TEXT with fixed-width microseconds
-- (2026-11-29T02:35:45.123456Z), so text order is time order. JSON columns are TEXT.

CREATE TABLE dispatches (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    task             TEXT    NOT NULL,
    params           TEXT    NOT NULL,              -- JSON object
    key              TEXT    UNIQUE,                -- idempotency key; NULLs are distinct
    fingerprint      TEXT    NOT NULL,              -- digest of task + params
    priority         INTEGER NOT NULL DEFAULT 0,
    status           TEXT    NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'planning', 'running', 'succeeded', 'failed', 'cancelled')),
    plan             TEXT,                          -- JSON array of steps, NULL until planned
    current_step     INTEGER NOT NULL DEFAULT 0 CHECK (current_step >= 0),
    gate_key         TEXT,
    not_before       TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    error            TEXT,
    instance_id      TEXT,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);

-- Serves claim_next: WHERE status = 'queued' ORDER BY priority DESC, id.
CREATE INDEX dispatches_claim ON dispatches (status, priority DESC, id);
-- Serves listing by status, newest first.
CREATE INDEX dispatches_status ON dispatches (status, id);

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dispatch_id INTEGER NOT NULL REFERENCES dispatches (id) ON DELETE CASCADE,
    step_index  INTEGER NOT NULL,                   -- -1 for an external planner
    step        TEXT    NOT NULL,
    runner      TEXT    NOT NULL,
    attempt     INTEGER NOT NULL CHECK (attempt >= 1),
    status      TEXT    NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'succeeded', 'failed', 'timed_out', 'cancelled',
                          'interrupted')),
    started_at  TEXT    NOT NULL,
    ended_at    TEXT,
    exit_code   INTEGER,
    error       TEXT,
    output      TEXT,
    instance_id TEXT
);

CREATE INDEX attempts_dispatch_step ON attempts (dispatch_id, step_index);
-- Recovery looks at running attempts only: keep that scan small.
CREATE INDEX attempts_running ON attempts (instance_id) WHERE status = 'running';

-- Mirror of the in-memory gate: one row per slot taken. AUTOINCREMENT so that a purged
-- id is never handed out again: a late close_slot(old_id) must not free a new holder.
CREATE TABLE gates (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    gate        TEXT    NOT NULL,
    holder      TEXT    NOT NULL,
    instance_id TEXT,
    acquired_at TEXT    NOT NULL,
    released_at TEXT,
    recovered   INTEGER NOT NULL DEFAULT 0 CHECK (recovered IN (0, 1))
);

CREATE INDEX gates_held ON gates (gate) WHERE released_at IS NULL;
-- Serves the purge job's range scan over released rows.
CREATE INDEX gates_released_at ON gates (released_at);

CREATE TABLE instances (
    id           TEXT    PRIMARY KEY,
    hostname     TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT    NOT NULL,
    started_at   TEXT    NOT NULL,
    heartbeat_at TEXT    NOT NULL,
    stopped_at   TEXT
);
