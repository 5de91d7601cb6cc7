-- Issue 20: what a step gave back (one JSON value, as compact text, bounded by the
-- runner), kept with the attempt that made it; later steps of the dispatch read it.
ALTER TABLE attempts ADD COLUMN result TEXT;
