/* trace_ext 1.4 -> 1.5: monitoring that stays cheap on a big queue (trace.queue_backlog, trace._queue_held()) */

\echo Use "ALTER EXTENSION trace_ext UPDATE TO '1.5'" to load this file. \quit

-- Abandoned rows, for the monitoring that counts them (trace.queue_backlog)
-- without reading the delivered ones.  Only abandoned rows enter it.
CREATE INDEX trace_queue_abandoned_idx ON trace.trace_queue (adapter)
    WHERE status = 'abandoned';

-- What the exporter and trace_ctl read on every scrape: only rows that are
-- pending, sending or abandoned, each through a partial index, so the cost
-- does not grow with the delivered rows kept for trace.ttl.
CREATE VIEW trace.queue_backlog AS
SELECT k.adapter,
       COALESCE(p.pending, 0) AS pending,
       COALESCE(p.sending, 0) AS sending,
       COALESCE(a.abandoned, 0) AS abandoned,
       p.oldest_due_at
  FROM pg_catalog.unnest(trace._adapters()) WITH ORDINALITY AS k(adapter, ord)
  LEFT JOIN (SELECT q.adapter,
                    pg_catalog.count(*) FILTER (WHERE q.status = 'pending') AS pending,
                    pg_catalog.count(*) FILTER (WHERE q.status = 'sending') AS sending,
                    pg_catalog.min(q.due_at) FILTER (WHERE q.status = 'pending') AS oldest_due_at
               FROM trace.trace_queue q
              WHERE q.status IN ('pending', 'sending')
              GROUP BY q.adapter) p ON p.adapter = k.adapter
  LEFT JOIN (SELECT q.adapter, pg_catalog.count(*) AS abandoned
               FROM trace.trace_queue q
              WHERE q.status = 'abandoned'
              GROUP BY q.adapter) a ON a.adapter = k.adapter
 ORDER BY k.ord;

COMMENT ON VIEW trace.queue_backlog IS
    'per adapter: rows pending, sending and abandoned, and the earliest due_at of the pending ones; reads no delivered row';

REVOKE ALL ON trace.queue_backlog FROM PUBLIC;
GRANT SELECT ON trace.queue_backlog TO pg_monitor;

-- For monitoring (monitoring/queries.yaml): true while the queue names
-- another cluster, so that the workers hold it.  It reads only
-- trace.queue_origin, works without the preload, and needs no worker.
CREATE FUNCTION trace._queue_held() RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM trace.queue_origin o
                    WHERE o.system_identifier <> trace._system_identifier())
$$;

REVOKE ALL ON FUNCTION trace._queue_held() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trace._queue_held() TO pg_monitor;

COMMENT ON FUNCTION trace._queue_held() IS
    'true while the queue was filled on another cluster and the workers hold it (until trace.adopt_queue())';
