-- Issue 3: retention of finished dispatches scans by finished_at, oldest first.
-- Partial: only finished dispatches have finished_at, and only they can expire.
-- (The purge of released gate rows uses gates_released_at from 0001.)
CREATE INDEX dispatches_finished_at ON dispatches (finished_at) WHERE finished_at IS NOT NULL;
