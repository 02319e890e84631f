--
-- operator: trace.enqueue (backfill), trace.retry, trace.retry_abandoned,
-- trace.cleanup.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never
ALTER SYSTEM SET trace.enabled_adapters = 'myfxbook,webhook';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;

CREATE VIEW queued AS
SELECT trade_id, adapter, status, attempts
  FROM trace.trace_queue
 ORDER BY trade_id, adapter COLLATE "C";

-- Trades closed before trace_ext was attached: nothing queued for them.
DO $$ BEGIN PERFORM trace.detach(); END $$;
UPDATE trades SET status = 'CLOSED' WHERE trade_id BETWEEN 3 AND 9;
DO $$ BEGIN PERFORM trace.attach(); END $$;
SELECT count(*) AS queued FROM trace.trace_queue;

-- enqueue with NULL adapters applies the trigger's rule: signal 10's
-- adapters that are enabled (myfxbook, webhook; file is not enabled).
SELECT trace.enqueue(3);
SELECT * FROM queued;
-- Again: nothing new.
SELECT trace.enqueue(3);
SELECT trace.enqueue(3, NULL);
-- An opted-out user, a signal without adapters: nothing.
SELECT trace.enqueue(4);
SELECT trace.enqueue(5);

-- Explicit adapters: exactly those, enabled or not, signal or not ...
SELECT trace.enqueue(5, '{file}');
SELECT trace.enqueue(6, '{webhook,file,webhook}');
SELECT trace.enqueue(6, '{webhook}');
SELECT trace.enqueue(6, '{}');
SELECT * FROM queued WHERE trade_id IN (5, 6);
-- ... but never for a user who has not opted in.
SELECT trace.enqueue(4, '{webhook}');
SELECT count(*) AS queued FROM trace.trace_queue WHERE trade_id = 4;

-- The queued rows are due trace.delay after the enqueue.
BEGIN;
SELECT trace.enqueue(9);
SELECT count(*) AS rows,
       bool_and(due_at = now() + current_setting('trace.delay')::interval) AS due_after_delay,
       bool_and(status = 'pending' AND attempts = 0) AS pending
  FROM trace.trace_queue WHERE trade_id = 9;
COMMIT;

-- A cancelled row is re-armed by enqueue, and counted.
UPDATE trace.trace_queue SET status = 'cancelled', attempts = 2
 WHERE trade_id = 9 AND adapter = 'webhook';
SELECT trace.enqueue(9);
SELECT * FROM queued WHERE trade_id = 9;

-- Bad input.
SELECT trace.enqueue(6, '{bogus}');
SELECT trace.enqueue(6, '{webhook,NULL}');
SELECT trace.enqueue(NULL);
SELECT trace.enqueue(99999);
SELECT count(*) AS queued FROM trace.trace_queue WHERE trade_id = 6;

-- retry: an abandoned row goes back to pending, due now, attempts 0.
UPDATE trace.trace_queue
   SET status = 'abandoned', attempts = 6, due_at = '2001-02-03 04:05:06+00',
       last_error = 'HTTP 500', last_http_status = 500
 WHERE trade_id = 3 AND adapter = 'webhook';
SELECT id AS abandoned_id FROM trace.trace_queue
 WHERE trade_id = 3 AND adapter = 'webhook' \gset
BEGIN;
SELECT trace.retry(:abandoned_id);
SELECT status, attempts, due_at = now() AS due_now
  FROM trace.trace_queue WHERE id = :abandoned_id;
COMMIT;

-- retry of a row that is not abandoned: false, and nothing changes.
UPDATE trace.trace_queue SET status = 'delivered', attempts = 1
 WHERE trade_id = 3 AND adapter = 'myfxbook';
CREATE TABLE snap AS SELECT * FROM trace.trace_queue;
SELECT trace.retry(:abandoned_id);
SELECT trace.retry(id) FROM trace.trace_queue WHERE trade_id = 3 AND adapter = 'myfxbook';
SELECT trace.retry(-1);
SELECT trace.retry(NULL);
SELECT count(*) AS rows_changed
  FROM trace.trace_queue q FULL JOIN snap s USING (id)
 WHERE q IS DISTINCT FROM s;
DROP TABLE snap;

-- retry_abandoned: per adapter, then all.
UPDATE trace.trace_queue SET status = 'abandoned', attempts = 6
 WHERE (trade_id, adapter) IN ((3, 'webhook'), (6, 'webhook'), (6, 'file'));
SELECT trace.retry_abandoned('webhook');
SELECT adapter, status, attempts FROM trace.trace_queue
 WHERE (trade_id, adapter) IN ((3, 'webhook'), (6, 'webhook'), (6, 'file'))
 ORDER BY trade_id, adapter COLLATE "C";
SELECT trace.retry_abandoned('myfxbook');
SELECT trace.retry_abandoned('no_such_adapter');
SELECT trace.retry_abandoned();
SELECT trace.retry_abandoned();
SELECT count(*) AS abandoned FROM trace.trace_queue WHERE status = 'abandoned';

-- cleanup: rows older than trace.ttl (7d) go, whatever their status;
-- younger rows stay.
UPDATE trace.trace_queue SET created_at = now() - interval '8 days'
 WHERE trade_id IN (3, 5);
UPDATE trace.trace_queue SET status = 'abandoned' WHERE trade_id = 5;
SELECT status, count(*) FROM trace.trace_queue WHERE trade_id IN (3, 5)
 GROUP BY status ORDER BY status COLLATE "C";
SELECT count(*) AS rows_before FROM trace.trace_queue;
SELECT trace.cleanup();
SELECT count(*) AS rows_after FROM trace.trace_queue;
SELECT count(*) AS old_rows_left FROM trace.trace_queue WHERE trade_id IN (3, 5);
SELECT trace.cleanup();

-- With a short trace.ttl (reloadable: ALTER SYSTEM), a row two hours old
-- goes and one half an hour old stays.
ALTER SYSTEM SET trace.ttl = '1h';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
UPDATE trace.trace_queue SET created_at = now() - interval '2 hours' WHERE trade_id = 6;
UPDATE trace.trace_queue SET created_at = now() - interval '30 minutes' WHERE trade_id = 9;
SELECT trace.cleanup();
SELECT trade_id, count(*) FROM trace.trace_queue GROUP BY trade_id ORDER BY trade_id;

-- Clean up.
ALTER SYSTEM RESET trace.ttl;
ALTER SYSTEM RESET trace.enabled_adapters;
SELECT pg_reload_conf();
DROP VIEW queued;
UPDATE trades SET status = 'OPEN' WHERE trade_id BETWEEN 3 AND 9;
TRUNCATE trace.trace_queue;
