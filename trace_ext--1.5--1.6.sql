/* trace_ext 1.5 -> 1.6: a claim leases rows in shared memory instead of rewriting them (trace._leased()) */

\echo Use "ALTER EXTENSION trace_ext UPDATE TO '1.6'" to load this file. \quit

-- The rows a worker is sending: they are not rewritten when claimed, but
-- leased in shared memory until their outcome is recorded (lease.c).  The
-- workers' claim skips them; the views show them as 'sending'.
CREATE FUNCTION trace._leased(id bigint) RETURNS boolean
    LANGUAGE c STRICT PARALLEL RESTRICTED
    AS 'MODULE_PATHNAME', 'trace_leased';

REVOKE ALL ON FUNCTION trace._leased(bigint) FROM PUBLIC;

COMMENT ON FUNCTION trace._leased(bigint) IS
    'whether a worker is sending this queue row now (its lease in shared memory)';

CREATE FUNCTION trace._leases(OUT id bigint, OUT pid integer, OUT expires_at timestamptz)
    RETURNS SETOF record
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_leases';

REVOKE ALL ON FUNCTION trace._leases() FROM PUBLIC;

COMMENT ON FUNCTION trace._leases() IS
    'the queue rows the workers are sending now: row id, worker pid, end of the lease';

GRANT EXECUTE ON FUNCTION trace._leased(bigint), trace._leases() TO pg_monitor;

-- The views show a leased row as 'sending', as the rows claimed by a
-- version before 1.6 were.
CREATE OR REPLACE VIEW trace.queue_summary AS
SELECT q.adapter,
       CASE WHEN q.status = 'pending' AND trace._leased(q.id) THEN 'sending'
            ELSE q.status END AS status,
       pg_catalog.count(*) AS count,
       pg_catalog.min(q.due_at) AS oldest_due_at,
       pg_catalog.min(q.due_at) FILTER (WHERE q.due_at > pg_catalog.now()) AS next_due_at
  FROM trace.trace_queue q
 GROUP BY 1, 2;

CREATE OR REPLACE VIEW trace.failures AS
SELECT q.id, q.trade_id, q.adapter,
       CASE WHEN q.status = 'pending' AND trace._leased(q.id) THEN 'sending'
            ELSE q.status END AS status,
       q.attempts, q.last_error, q.last_http_status, q.due_at, q.created_at
  FROM trace.trace_queue q
 WHERE (q.last_error IS NOT NULL AND (q.status <> 'cancelled' OR q.attempts > 0))
    OR q.status = 'abandoned';

CREATE OR REPLACE VIEW trace.queue_backlog AS
SELECT k.adapter,
       COALESCE(p.pending, 0) AS pending,
       COALESCE(p.sending, 0) AS sending,
       COALESCE(a.abandoned, 0) AS abandoned,
       p.oldest_due_at
  FROM pg_catalog.unnest(trace._adapters()) WITH ORDINALITY AS k(adapter, ord)
  LEFT JOIN (SELECT q.adapter,
                    pg_catalog.count(*) FILTER (WHERE NOT q.leased) AS pending,
                    pg_catalog.count(*) FILTER (WHERE q.leased) AS sending,
                    pg_catalog.min(q.due_at) FILTER (WHERE NOT q.leased) AS oldest_due_at
               FROM (SELECT r.adapter, r.due_at,
                            r.status = 'sending' OR trace._leased(r.id) AS leased
                       FROM trace.trace_queue r
                      WHERE r.status IN ('pending', 'sending')) q
              GROUP BY q.adapter) p ON p.adapter = k.adapter
  LEFT JOIN (SELECT q.adapter, pg_catalog.count(*) AS abandoned
               FROM trace.trace_queue q
              WHERE q.status = 'abandoned'
              GROUP BY q.adapter) a ON a.adapter = k.adapter
 ORDER BY k.ord;
