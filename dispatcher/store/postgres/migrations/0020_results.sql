-- Issue 20: what a step gave back (one JSON value, bounded by the runner), kept with
-- the attempt that made it; later steps of the dispatch read it. `json` keeps the text
-- as written, as for params and plans.
ALTER TABLE attempts ADD COLUMN result JSON;
