-- Serves retention: final dispatches in finished_at order.
CREATE INDEX dispatches_finished_at ON dispatches (finished_at, id)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
