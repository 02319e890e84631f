-- The operator functions: trace.enqueue, trace.retry, trace.retry_abandoned,
-- trace.cancel, trace.cleanup, as an operator relies on them.
--
-- Needs trace.enabled_adapters = 'myfxbook,webhook' and the default
-- trace.ttl (7d) (test/run.sh).  Rolled back at the end.

BEGIN;
SELECT plan(29);

SELECT is(current_setting('trace.enabled_adapters'), 'myfxbook,webhook',
          'precondition: myfxbook and webhook are enabled, file is not');

-- Trades closed while trace_ext was detached: a backfill is needed.
DO $$ BEGIN PERFORM trace.detach(); END $$;
UPDATE trades SET status = 'CLOSED' WHERE trade_id BETWEEN 3 AND 12;
DO $$ BEGIN PERFORM trace.attach(); END $$;

-- enqueue
SELECT is(trace.enqueue(3), 2,
          'trace.enqueue returns the rows it queued (the trigger''s rule: signal adapters that are enabled)');
SELECT is(ARRAY(SELECT adapter FROM trace.trace_queue WHERE trade_id = 3
                 ORDER BY adapter COLLATE "C"),
          ARRAY['myfxbook', 'webhook'],
          'trace.enqueue with NULL adapters queues what the trigger would have queued');
SELECT is(trace.enqueue(3), 0,
          'trace.enqueue of a trade already queued returns 0 and adds nothing');
SELECT is(trace.enqueue(6, ARRAY['file']), 1,
          'trace.enqueue with explicit adapters queues exactly those, enabled or not');
SELECT is(trace.enqueue(4), 0,
          'trace.enqueue does not queue a trade of an opted-out user');
SELECT is(trace.enqueue(4, ARRAY['webhook']), 0,
          'trace.enqueue with explicit adapters still respects the user''s opt-out');
SELECT ok((SELECT bool_and(due_at = now() + current_setting('trace.delay')::interval
                           AND status = 'pending' AND attempts = 0)
             FROM trace.trace_queue WHERE trade_id IN (3, 6)),
          'trace.enqueue queues pending rows due trace.delay from now');
SELECT throws_ok('SELECT trace.enqueue(6, ARRAY[''carrier-pigeon''])', '22023',
                 'trace.enqueue: unknown adapter "carrier-pigeon"',
                 'trace.enqueue refuses an unknown adapter');
SELECT throws_ok('SELECT trace.enqueue(424242)', 'P0002',
                 'trace.enqueue: trade 424242 not found in any attached trades table',
                 'trace.enqueue of a trade that does not exist is an error');

-- retry
UPDATE trace.trace_queue
   SET status = 'delivered', attempts = 1, delivered_at = now() - interval '1 hour'
 WHERE trade_id = 3 AND adapter = 'myfxbook';
CREATE TEMP TABLE before_retry AS SELECT * FROM trace.trace_queue;
SELECT is(trace.retry((SELECT id FROM trace.trace_queue
                        WHERE trade_id = 3 AND adapter = 'myfxbook')), false,
          'trace.retry on a row that is not abandoned returns false');
SELECT is(trace.retry((SELECT id FROM trace.trace_queue
                        WHERE trade_id = 3 AND adapter = 'webhook')), false,
          'trace.retry on a pending row returns false');
SELECT is_empty($$(SELECT * FROM trace.trace_queue EXCEPT SELECT * FROM before_retry)
                  UNION ALL
                  (SELECT * FROM before_retry EXCEPT SELECT * FROM trace.trace_queue)$$,
                'trace.retry on a row that is not abandoned changes nothing');
SELECT is(trace.retry(-1), false, 'trace.retry of a row that does not exist returns false');

UPDATE trace.trace_queue
   SET status = 'abandoned', attempts = 6, due_at = now() - interval '1 day',
       last_error = 'HTTP 500', last_http_status = 500
 WHERE trade_id = 3 AND adapter = 'webhook';
SELECT is(trace.retry((SELECT id FROM trace.trace_queue
                        WHERE trade_id = 3 AND adapter = 'webhook')), true,
          'trace.retry on an abandoned row returns true');
SELECT ok((SELECT status = 'pending' AND attempts = 0 AND due_at = now()
             FROM trace.trace_queue WHERE trade_id = 3 AND adapter = 'webhook'),
          'a retried row is pending again, due now, with no attempt');

-- retry_abandoned
UPDATE trace.trace_queue SET status = 'abandoned', attempts = 6
 WHERE (trade_id, adapter) IN ((3, 'webhook'), (6, 'file'), (3, 'myfxbook'));
SELECT is(trace.retry_abandoned('webhook'), 1::bigint,
          'trace.retry_abandoned(adapter) re-arms the abandoned rows of that adapter only');
SELECT is(trace.retry_abandoned(), 2::bigint,
          'trace.retry_abandoned() re-arms every abandoned row and returns how many');
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE status = 'abandoned'$$,
                'after trace.retry_abandoned() no row is abandoned');

-- cancel
CREATE TEMP TABLE before_cancel AS SELECT * FROM trace.trace_queue;
SELECT is(trace.cancel(-1), false, 'trace.cancel of a row that does not exist returns false');
UPDATE trace.trace_queue SET status = 'delivered', delivered_at = now()
 WHERE trade_id = 6 AND adapter = 'file';
SELECT is(trace.cancel((SELECT id FROM trace.trace_queue
                         WHERE trade_id = 6 AND adapter = 'file')), false,
          'trace.cancel of a delivered row returns false ...');
SELECT is((SELECT status FROM trace.trace_queue WHERE trade_id = 6 AND adapter = 'file'),
          'delivered', '... and leaves it delivered');
UPDATE trace.trace_queue SET status = 'sending', attempts = 2, lease_owner = 4242,
                             last_error = 'HTTP 503'
 WHERE trade_id = 3 AND adapter = 'myfxbook';
SELECT is(trace.cancel((SELECT id FROM trace.trace_queue
                         WHERE trade_id = 3 AND adapter = 'myfxbook')), true,
          'trace.cancel of a row in flight returns true');
SELECT ok((SELECT status = 'cancelled' AND lease_owner IS NULL
                  AND last_error = 'cancelled by an operator' AND attempts = 2
             FROM trace.trace_queue WHERE trade_id = 3 AND adapter = 'myfxbook'),
          'a cancelled row: cancelled, no lease, says who cancelled it, attempts kept');
SELECT is(trace.cancel((SELECT id FROM trace.trace_queue
                         WHERE trade_id = 3 AND adapter = 'myfxbook')), false,
          'trace.cancel of a row already cancelled returns false');
SELECT ok((SELECT f.created_at = q.created_at FROM trace.failures f
             JOIN trace.trace_queue q USING (id)
            WHERE q.trade_id = 3 AND q.adapter = 'myfxbook'),
          'trace.failures shows a row cancelled after failed attempts, with its created_at');
CREATE ROLE pgtap_trace_watcher IN ROLE pg_monitor;
SET LOCAL ROLE pgtap_trace_watcher;
SELECT throws_ok('SELECT trace.cancel(1)', '42501',
                 'permission denied for function cancel',
                 'trace.cancel is for superusers and whom they grant, not pg_monitor');
RESET ROLE;
UPDATE trace.trace_queue q SET status = b.status, attempts = b.attempts,
       lease_owner = b.lease_owner, last_error = b.last_error, delivered_at = b.delivered_at
  FROM before_cancel b WHERE b.id = q.id;

-- cleanup
UPDATE trace.trace_queue SET created_at = now() - interval '8 days', status = 'delivered'
 WHERE trade_id = 3 AND adapter = 'webhook';
UPDATE trace.trace_queue SET created_at = now() - interval '8 days', status = 'pending'
 WHERE trade_id = 3 AND adapter = 'myfxbook';
SELECT is(trace.cleanup(), 2::bigint,
          'trace.cleanup deletes the rows older than trace.ttl, whatever their status');
SELECT is((SELECT count(*) FROM trace.trace_queue), 1::bigint,
          'trace.cleanup keeps the rows younger than trace.ttl');

SELECT * FROM finish();
ROLLBACK;
