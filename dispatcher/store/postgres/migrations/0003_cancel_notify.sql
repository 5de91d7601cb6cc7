-- A cancel request wakes the daemons as an insert does (channel dispatcher_dispatches;
-- a daemon looks for work and for cancel requests on any wake-up), so the daemon that
-- runs the dispatch stops it at once instead of at its next poll. Only request_cancel
-- sets cancel_requested, and it is rare: one notification a statement is plenty.
CREATE TRIGGER dispatches_cancel_requested AFTER UPDATE OF cancel_requested ON dispatches
    FOR EACH STATEMENT EXECUTE FUNCTION dispatcher_notify_dispatches();
