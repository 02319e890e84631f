/* trace_ext 1.0 -> 1.1: workers that run no query while the queue is idle */

\echo Use "ALTER EXTENSION trace_ext UPDATE TO '1.1'" to load this file. \quit

-- A worker now sleeps until the earliest due_at it knows of, instead of
-- looking at the queue every trace.poll_interval, so any statement that
-- queues rows or makes them due must wake it when it commits: the trades
-- trigger and the operator functions already do; this covers the rest
-- (an operator's own INSERT or UPDATE on the queue).
CREATE FUNCTION trace._queue_changed() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'trace_queue_changed';

CREATE TRIGGER trace_queue_wake
    AFTER INSERT OR UPDATE ON trace.trace_queue
    FOR EACH STATEMENT EXECUTE FUNCTION trace._queue_changed();

COMMENT ON TRIGGER trace_queue_wake ON trace.trace_queue IS
    'wakes the delivery workers when a statement that queued or rescheduled rows commits';

REVOKE ALL ON FUNCTION trace._queue_changed() FROM PUBLIC;

-- The trigger function pins name resolution in C instead (an override
-- search path of pg_catalog alone around its one statement): a SET clause
-- costs a parameter change and restore at every close.
ALTER FUNCTION trace._on_trade_close() RESET search_path;
COMMENT ON FUNCTION trace._on_trade_close() IS
    'trigger: queue a trade that became CLOSED (SECURITY DEFINER; names resolve in pg_catalog only)';
