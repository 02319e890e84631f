/* trace_ext 1.3 -> 1.4: the list of adapters comes from the library; tracker health; trace.worker_status; trace.cancel(); clone protection */

\echo Use "ALTER EXTENSION trace_ext UPDATE TO '1.4'" to load this file. \quit

/* ------------------------------------------------------------------------
 * The adapters are listed once, in the library (adapters/registry.c); SQL
 * reads the list from there instead of naming them again.
 * ------------------------------------------------------------------------ */
CREATE FUNCTION trace._adapters() RETURNS text[]
    LANGUAGE c STABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'trace_adapters_fn';

REVOKE ALL ON FUNCTION trace._adapters() FROM PUBLIC;

COMMENT ON FUNCTION trace._adapters() IS
    'the adapters this library knows, in the order of the metrics rows';

COMMENT ON FUNCTION trace._queue_values_ok(text, text) IS
    'the queue''s CHECK rule: adapter is one of trace._adapters(); status is pending, sending, delivered, abandoned or cancelled';
COMMENT ON CONSTRAINT trace_queue_values_check ON trace.trace_queue IS
    'adapter is one of trace._adapters(); status is pending, sending, delivered, abandoned or cancelled';

CREATE OR REPLACE VIEW trace.metrics AS
SELECT k.adapter,
       COALESCE(c.pushed_total, 0) AS pushed_total,
       COALESCE(c.fail_total, 0) AS fail_total,
       COALESCE(p.pending, 0) AS pending,
       COALESCE(c.post_duration_count, 0) AS post_duration_count,
       COALESCE(c.post_duration_sum, 0) AS post_duration_sum
  FROM pg_catalog.unnest(trace._adapters()) WITH ORDINALITY AS k(adapter, ord)
  LEFT JOIN trace._counters() c ON c.adapter = k.adapter
  LEFT JOIN (SELECT q.adapter, pg_catalog.count(*) AS pending
               FROM trace.trace_queue q
              WHERE q.status IN ('pending', 'sending')
              GROUP BY q.adapter) p ON p.adapter = k.adapter
 ORDER BY k.ord;

/* ------------------------------------------------------------------------
 * Tracker health: each tracker's circuit breaker, Retry-After pause and
 * rate limit, kept in shared memory by the workers.
 * ------------------------------------------------------------------------ */
CREATE FUNCTION trace._tracker_health(
    OUT adapter text, OUT state text, OUT since timestamptz,
    OUT consecutive_failures integer, OUT next_probe_at timestamptz,
    OUT paused_until timestamptz, OUT last_error text, OUT throttled bigint)
    RETURNS SETOF record
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_tracker_health';

REVOKE ALL ON FUNCTION trace._tracker_health() FROM PUBLIC;

COMMENT ON FUNCTION trace._tracker_health() IS
    'per adapter: breaker state, since, consecutive failures, next probe, Retry-After pause, last error, rate-limit hold-backs';

CREATE VIEW trace.tracker_health AS
SELECT h.adapter, h.state, h.since, h.consecutive_failures, h.next_probe_at,
       h.paused_until, h.last_error
  FROM trace._tracker_health() h;

COMMENT ON VIEW trace.tracker_health IS
    'each tracker''s circuit breaker (closed, open, half_open) and Retry-After pause';

/* ------------------------------------------------------------------------
 * What each worker is doing, from its slot in shared memory.
 * ------------------------------------------------------------------------ */
CREATE FUNCTION trace._worker_status(
    OUT worker integer, OUT pid integer, OUT state text, OUT in_flight integer,
    OUT next_wake_at timestamptz, OUT last_pass_started timestamptz,
    OUT last_pass_finished timestamptz, OUT delivered bigint, OUT failed bigint,
    OUT started_at timestamptz)
    RETURNS SETOF record
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_worker_status';

REVOKE ALL ON FUNCTION trace._worker_status() FROM PUBLIC;

COMMENT ON FUNCTION trace._worker_status() IS
    'per running worker: pid, state, requests in flight, planned wake-up, last pass, outcomes since it started';

CREATE VIEW trace.worker_status AS
SELECT w.worker, w.pid, w.state, w.in_flight, w.next_wake_at, w.last_pass_started,
       w.last_pass_finished, w.delivered, w.failed, w.started_at
  FROM trace._worker_status() w;

COMMENT ON VIEW trace.worker_status IS
    'one row per running worker: waiting (for its database or the extension), idle, sending, paused';

GRANT EXECUTE ON FUNCTION trace._adapters(), trace._tracker_health(),
    trace._worker_status() TO pg_monitor;
GRANT SELECT ON trace.tracker_health, trace.worker_status TO pg_monitor;

/* ------------------------------------------------------------------------
 * Row-level control: cancel one row; trace.failures shows each row's age.
 * ------------------------------------------------------------------------ */
CREATE FUNCTION trace.cancel(id bigint) RETURNS boolean
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- A row in flight (sending) is cancelled too: the worker's record
    -- then finds no lease of its own and leaves it cancelled.
    UPDATE trace.trace_queue q
       SET status = 'cancelled', last_error = 'cancelled by an operator',
           lease_owner = NULL, due_at = pg_catalog.now()
     WHERE q.id = cancel.id AND q.status IN ('pending', 'sending', 'abandoned');
    RETURN FOUND;
END
$$;

REVOKE ALL ON FUNCTION trace.cancel(bigint) FROM PUBLIC;

COMMENT ON FUNCTION trace.cancel(bigint) IS
    'cancel one queue row that is pending, sending or abandoned: it is not sent (again); false if there is no such row';

-- trace.failures: the age of each row (created_at), at the end.
CREATE OR REPLACE VIEW trace.failures AS
SELECT q.id, q.trade_id, q.adapter, q.status, q.attempts,
       q.last_error, q.last_http_status, q.due_at, q.created_at
  FROM trace.trace_queue q
 WHERE (q.last_error IS NOT NULL AND (q.status <> 'cancelled' OR q.attempts > 0))
    OR q.status = 'abandoned';

/* ------------------------------------------------------------------------
 * Clone protection.  The queue remembers the cluster it was queued on
 * (PostgreSQL's system identifier).  A dump restored on another cluster, or
 * a pg_upgrade, brings the old identifier along (this table is dumped with
 * the queue): the workers then hold every row, and the trades closed on
 * the new cluster too, until a superuser adopts the queue
 * (trace.adopt_queue()) or discards it (trace.cancel_queue()).  A promoted
 * streaming standby has the primary's identifier and just delivers.
 * ------------------------------------------------------------------------ */
CREATE FUNCTION trace._system_identifier() RETURNS bigint
    LANGUAGE c STABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'trace_system_identifier';

REVOKE ALL ON FUNCTION trace._system_identifier() FROM PUBLIC;

COMMENT ON FUNCTION trace._system_identifier() IS
    'this cluster''s system identifier (pg_control_system()), as a bigint';

CREATE TABLE trace.queue_origin (
    system_identifier bigint      NOT NULL,
    since             timestamptz NOT NULL DEFAULT pg_catalog.now()
);

REVOKE ALL ON trace.queue_origin FROM PUBLIC;

COMMENT ON TABLE trace.queue_origin IS
    'the cluster(s) the queue was filled on: a row naming another cluster holds every delivery until trace.adopt_queue()';

INSERT INTO trace.queue_origin (system_identifier) VALUES (trace._system_identifier());
SELECT pg_catalog.pg_extension_config_dump('trace.queue_origin', '');

CREATE FUNCTION trace.adopt_queue() RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM trace.queue_origin;
    INSERT INTO trace.queue_origin (system_identifier) VALUES (trace._system_identifier());
    SELECT pg_catalog.count(*) INTO n FROM trace.trace_queue
     WHERE status IN ('pending', 'sending');
    PERFORM trace._wake();
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION trace.adopt_queue() FROM PUBLIC;

COMMENT ON FUNCTION trace.adopt_queue() IS
    'this cluster takes over a queue restored from another one: its rows are sent; returns the rows pending';

CREATE FUNCTION trace.cancel_queue() RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM trace.queue_origin o
                    WHERE o.system_identifier <> trace._system_identifier()) THEN
        RAISE EXCEPTION 'the queue was not restored from another cluster: nothing is held'
            USING HINT = 'trace.cancel(id) cancels one row.';
    END IF;
    UPDATE trace.trace_queue q
       SET status = 'cancelled', last_error = 'cancelled: queued on another cluster',
           lease_owner = NULL, due_at = pg_catalog.now()
     WHERE q.status IN ('pending', 'sending');
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION trace.cancel_queue() FROM PUBLIC;

COMMENT ON FUNCTION trace.cancel_queue() IS
    'discard a queue restored from another cluster: every pending row is cancelled, and deliveries stay held until trace.adopt_queue()';
