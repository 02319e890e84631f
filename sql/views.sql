--
-- views: trace.queue_summary, trace.failures, trace.metrics.
--
-- Counters in trace.metrics live in shared memory and count the worker's
-- attempts since server start: only their presence and sign are checked.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never

-- Their columns, as README.md (Monitoring) names them.
SELECT c.relname AS view, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace = 'trace'::regnamespace AND c.relkind = 'v'
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY c.relname COLLATE "C", a.attnum;

-- An empty queue: no summary rows, no failures, and still three metrics
-- rows, one per adapter kind, in a fixed order.
TRUNCATE trace.trace_queue;
SELECT count(*) AS summary_rows FROM trace.queue_summary;
SELECT count(*) AS failure_rows FROM trace.failures;
SELECT adapter, pending, pushed_total >= 0 AS pushed_ok, fail_total >= 0 AS fail_ok,
       post_duration_count >= 0 AS count_ok, post_duration_sum >= 0 AS sum_ok
  FROM trace.metrics;

-- A queue in every state.  Rows are inserted directly (the trigger's rules
-- are tested elsewhere); due_at is set relative to now() so that the
-- expected output holds on any day.
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status, attempts, due_at,
                               last_error, last_http_status, delivered_at)
VALUES (101, 'webhook',  'trades', 'pending',   0, now() - interval '10 minutes', NULL, NULL, NULL),
       (102, 'webhook',  'trades', 'pending',   0, now() + interval '5 minutes',  NULL, NULL, NULL),
       (103, 'webhook',  'trades', 'pending',   2, now() + interval '30 seconds',
        'HTTP 503', 503, NULL),
       (104, 'webhook',  'trades', 'sending',   1, now() + interval '25 seconds', NULL, NULL, NULL),
       (105, 'webhook',  'trades', 'delivered', 1, now() - interval '1 hour',     NULL, 200, now()),
       (106, 'webhook',  'trades', 'abandoned', 6, now() - interval '2 hours',
        'HTTP 500', 500, NULL),
       (107, 'webhook',  'trades', 'abandoned', 1, now() - interval '3 hours',
        'HTTP 422', 422, NULL),
       (101, 'myfxbook', 'trades', 'pending',   0, now() + interval '1 minute',   NULL, NULL, NULL),
       (102, 'myfxbook', 'trades', 'cancelled', 0, now() - interval '1 minute',   NULL, NULL, NULL),
       (103, 'myfxbook', 'trades', 'pending',   3, now() - interval '1 minute',
        'connect: connection refused', NULL, NULL);

-- queue_summary: one row per (adapter, status); oldest_due_at is the
-- earliest due_at of the group, next_due_at the earliest one still in the
-- future (NULL if none).
SELECT s.adapter, s.status, s.count,
       s.oldest_due_at = (SELECT min(due_at) FROM trace.trace_queue q
                           WHERE q.adapter = s.adapter AND q.status = s.status) AS oldest_ok,
       s.next_due_at IS NOT DISTINCT FROM
           (SELECT min(due_at) FROM trace.trace_queue q
             WHERE q.adapter = s.adapter AND q.status = s.status
               AND q.due_at > now()) AS next_ok,
       s.next_due_at IS NULL AS nothing_ahead,
       s.oldest_due_at < now() AS behind
  FROM trace.queue_summary s
 ORDER BY s.adapter COLLATE "C", s.status COLLATE "C";
-- For webhook/pending: the oldest is 10 minutes ago, the next 30 seconds on.
SELECT oldest_due_at = (SELECT due_at FROM trace.trace_queue
                         WHERE trade_id = 101 AND adapter = 'webhook') AS oldest_is_101,
       next_due_at = (SELECT due_at FROM trace.trace_queue
                       WHERE trade_id = 103 AND adapter = 'webhook') AS next_is_103
  FROM trace.queue_summary WHERE adapter = 'webhook' AND status = 'pending';

-- failures: rows that failed at least once or were abandoned.
SELECT trade_id, adapter, status, attempts, last_error, last_http_status,
       id = (SELECT q.id FROM trace.trace_queue q
              WHERE q.trade_id = f.trade_id AND q.adapter = f.adapter) AS id_ok,
       due_at = (SELECT q.due_at FROM trace.trace_queue q
                  WHERE q.trade_id = f.trade_id AND q.adapter = f.adapter) AS due_at_ok
  FROM trace.failures f
 ORDER BY trade_id, adapter COLLATE "C";

-- metrics: always the three adapters; pending counts pending and sending.
SELECT adapter, pending FROM trace.metrics;
SELECT count(*) AS metrics_rows FROM trace.metrics;

TRUNCATE trace.trace_queue;
