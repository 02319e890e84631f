-- A trade that closes again (CLOSED -> OPEN -> CLOSED): no duplicate row
-- for the same adapter; pending, sending, delivered and abandoned rows stay
-- as they are; a cancelled row is re-armed.
--
-- Needs trace.enabled_adapters = 'myfxbook,webhook' (test/run.sh).  Rolled
-- back at the end.

BEGIN;
SELECT plan(12);

SELECT is(current_setting('trace.enabled_adapters'), 'myfxbook,webhook',
          'precondition: myfxbook and webhook are enabled, file is not');

CREATE PROCEDURE pg_temp.reclose(id bigint) LANGUAGE sql AS $$
    UPDATE public.trades SET status = 'OPEN' WHERE trade_id = id;
    UPDATE public.trades SET status = 'CLOSED' WHERE trade_id = id;
$$;

-- Trades 3, 6, 9, 12, 15: opted-in user, signal {myfxbook,webhook,file}.
UPDATE trades SET status = 'CLOSED' WHERE trade_id IN (3, 6, 9, 12, 15);
-- The whole spec is one transaction, where now() does not move: date the
-- rows an hour back, so that a re-arm (which would set due_at and
-- created_at from now()) shows.
UPDATE trace.trace_queue SET due_at = now() - interval '1 hour',
                             created_at = now() - interval '1 hour';
CREATE TEMP TABLE before_reclose AS SELECT * FROM trace.trace_queue;

CALL pg_temp.reclose(3);
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 3), 2::bigint,
          'a re-closed trade is not queued twice for the same adapter');

SELECT is_empty($$SELECT * FROM trace.trace_queue WHERE trade_id = 3
                  EXCEPT SELECT * FROM before_reclose$$,
                'a pending row stays as it is, due_at included, when its trade closes again');

UPDATE trace.trace_queue SET status = 'sending', attempts = 1 WHERE trade_id = 6;
UPDATE trace.trace_queue SET status = 'delivered', attempts = 1, delivered_at = now()
 WHERE trade_id = 9;
UPDATE trace.trace_queue SET status = 'abandoned', attempts = 6, last_error = 'HTTP 500',
                             last_http_status = 500
 WHERE trade_id = 12;
DROP TABLE before_reclose;
CREATE TEMP TABLE before_reclose AS SELECT * FROM trace.trace_queue;
CALL pg_temp.reclose(6);
CALL pg_temp.reclose(9);
CALL pg_temp.reclose(12);

SELECT is_empty($$SELECT * FROM trace.trace_queue WHERE trade_id = 6
                  EXCEPT SELECT * FROM before_reclose$$,
                'a sending row stays as it is when its trade closes again');
SELECT is_empty($$SELECT * FROM trace.trace_queue WHERE trade_id = 9
                  EXCEPT SELECT * FROM before_reclose$$,
                'a delivered row stays as it is when its trade closes again');
SELECT is_empty($$SELECT * FROM trace.trace_queue WHERE trade_id = 12
                  EXCEPT SELECT * FROM before_reclose$$,
                'an abandoned row stays as it is when its trade closes again');

-- The worker found trade 15 reopened and cancelled its rows.
UPDATE trace.trace_queue
   SET status = 'cancelled', attempts = 1, due_at = now() - interval '1 day',
       created_at = now() - interval '1 day'
 WHERE trade_id = 15;
CALL pg_temp.reclose(15);
SELECT is(ARRAY(SELECT status FROM trace.trace_queue WHERE trade_id = 15 ORDER BY adapter),
          ARRAY['pending', 'pending'],
          'a cancelled row is re-armed to pending when its trade closes again');
SELECT ok((SELECT bool_and(attempts = 0) FROM trace.trace_queue WHERE trade_id = 15),
          'a re-armed row starts again with no attempt');
SELECT ok((SELECT bool_and(due_at = now() + current_setting('trace.delay')::interval)
             FROM trace.trace_queue WHERE trade_id = 15),
          'a re-armed row gets a new due_at, trace.delay after the new close');
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 15), 2::bigint,
          'a re-armed trade still has one row per adapter');

-- A cancelled row for an adapter that is no longer enabled stays cancelled.
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status)
VALUES (18, 'file', 'trades', 'cancelled');
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 18;
SELECT is((SELECT status FROM trace.trace_queue WHERE trade_id = 18 AND adapter = 'file'),
          'cancelled',
          'a cancelled row of an adapter that is not enabled is not re-armed');

-- The same rule through trace.enqueue.
UPDATE trace.trace_queue SET status = 'cancelled' WHERE trade_id = 3 AND adapter = 'webhook';
SELECT is(trace.enqueue(3), 1,
          'trace.enqueue re-arms a cancelled row and counts it');

SELECT * FROM finish();
ROLLBACK;
