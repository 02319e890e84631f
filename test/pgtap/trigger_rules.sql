-- Which closed trades trace_ext queues, and how: the trigger's promises.
--
-- Runs on a database holding the reference trade store and the extension,
-- with trace.enabled_adapters = 'myfxbook,webhook' (test/run.sh sets it, so
-- that signal 10 {myfxbook,webhook,file} shows the intersection) and the
-- default trace.delay.  Everything happens in one transaction that is rolled
-- back.
--
-- Reference store: trade g belongs to user 1 + g % 3 and signal 10 + g % 3:
--   g % 3 = 0: user 1 (opted in),  signal 10 {myfxbook,webhook,file}
--   g % 3 = 1: user 2 (opted out), signal 11 {webhook}
--   g % 3 = 2: user 3 (opted in),  signal 12 NULL

BEGIN;
SELECT plan(23);

SELECT is(current_setting('trace.enabled_adapters'), 'myfxbook,webhook',
          'precondition: myfxbook and webhook are enabled, file is not');
SELECT is((SELECT count(*) FROM trace.trace_queue), 0::bigint,
          'precondition: the queue starts empty');

-- The application's close.
UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(),
                  pnl = 42.10, fees = 1.25
 WHERE trade_id = 3;

SELECT is(ARRAY(SELECT adapter FROM trace.trace_queue WHERE trade_id = 3
                 ORDER BY adapter COLLATE "C"),
          ARRAY['myfxbook', 'webhook'],
          'a trade closed by an opted-in user is queued once for each enabled adapter of its signal');

SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 3 AND adapter = 'file'$$,
                'an adapter of the signal that is not enabled is not queued');

SELECT ok((SELECT bool_and(xmin = pg_current_xact_id()::xid)
             FROM trace.trace_queue WHERE trade_id = 3),
          'the enqueue happens in the closing transaction');

SELECT ok((SELECT bool_and(due_at = now() + current_setting('trace.delay')::interval)
             FROM trace.trace_queue WHERE trade_id = 3),
          'a queued row is due trace.delay after the close');

SELECT ok((SELECT bool_and(status = 'pending' AND attempts = 0 AND last_error IS NULL
                           AND last_http_status IS NULL AND delivered_at IS NULL
                           AND created_at = now())
             FROM trace.trace_queue WHERE trade_id = 3),
          'a queued row starts pending, untried, created by the close');

UPDATE trades SET status = 'CLOSED' WHERE trade_id = 4;
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 4$$,
                'a trade closed by an opted-out user is not queued');

UPDATE trades SET status = 'CLOSED' WHERE trade_id = 5;
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 5$$,
                'a trade whose signal names no adapters (NULL) is not queued');

INSERT INTO signals VALUES (14, 'Empty', '{}');
UPDATE trades SET signal_id = 14 WHERE trade_id = 8;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 8;
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 8$$,
                'a trade whose signal names an empty adapter list is not queued');

UPDATE trades SET signal_id = NULL WHERE trade_id = 11;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 11;
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 11$$,
                'a trade with no signal is not queued');

INSERT INTO signals VALUES (13, 'Mixed', '{webhook,bogus,webhook,Webhook}');
UPDATE trades SET signal_id = 13 WHERE trade_id = 6;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 6;
SELECT is(ARRAY(SELECT adapter FROM trace.trace_queue WHERE trade_id = 6),
          ARRAY['webhook'],
          'unknown adapter names in a signal are ignored and a repeated name queues once');

UPDATE trades SET fees = 2.00 WHERE trade_id = 9;
UPDATE trades SET status = 'PARTIAL' WHERE trade_id = 9;
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 9$$,
                'an update that does not close the trade queues nothing');
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 9;
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 9), 2::bigint,
          'a close from a status other than OPEN (PARTIAL) is queued');

UPDATE trades SET status = 'CLOSED' WHERE trade_id = 12;
UPDATE trades SET fees = 1.30 WHERE trade_id = 12;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 12;  -- listed, unchanged
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 12), 2::bigint,
          'an update of a trade that stays CLOSED (fees made final) queues nothing more');

SAVEPOINT before_close;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 15;
ROLLBACK TO SAVEPOINT before_close;
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 15$$,
                'a close that is rolled back leaves nothing queued');

UPDATE trades SET status = 'CLOSED' WHERE trade_id IN (18, 21, 24);
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id IN (18, 21, 24)), 6::bigint,
          'trades closed by one statement are each queued');

SELECT is_empty($$SELECT 1 FROM trace.trace_queue q
                   WHERE q::text ~ '@|Ana|Ben|Chen|CL-0|ACC-'$$,
                'a queued row copies no personal data of the trade, user or account');

SELECT is_empty($$SELECT attname FROM pg_attribute
                   WHERE attrelid = 'trace.trace_queue'::regclass AND attnum > 0
                     AND attname IN ('user_id', 'email', 'name', 'client_id',
                                     'account_number')$$,
                'the queue has no column for personal data');

-- The WHEN clause lets only rows whose status changed reach the trigger
-- function, so the application's other writes do not run it at all.
SET LOCAL track_functions = 'all';
CREATE TEMP TABLE trigger_calls AS
SELECT coalesce(sum(calls), 0)::bigint AS n FROM pg_stat_xact_user_functions
 WHERE funcid = 'trace._on_trade_close()'::regprocedure;
UPDATE trades SET fees = 3.00 WHERE trade_id IN (12, 27);
UPDATE trades SET status = status, pnl = 1 WHERE trade_id IN (12, 27);
UPDATE trades SET status = 'PARTIAL' WHERE trade_id = 27;
UPDATE trades SET status = 'OPEN' WHERE trade_id = 27;
SELECT is((SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_xact_user_functions
            WHERE funcid = 'trace._on_trade_close()'::regprocedure)
          - (SELECT n FROM trigger_calls),
          2::bigint,
          'of 6 row updates, the trigger function ran for the 2 that changed status');
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 27$$,
                'status changes that are not a close (OPEN -> PARTIAL -> OPEN) queue nothing');

-- A trigger created by hand, without trace.attach()'s WHEN clause, still
-- queues only when the status becomes CLOSED.
SELECT trace.detach();
CREATE TRIGGER trace_by_hand AFTER UPDATE ON trades
    FOR EACH ROW EXECUTE FUNCTION trace._on_trade_close();
UPDATE trades SET pnl = 1 WHERE trade_id = 27;          -- still OPEN
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 30;
UPDATE trades SET fees = 2 WHERE trade_id = 30;          -- CLOSED stays CLOSED
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 27), 0::bigint,
          'without a WHEN clause: an update that leaves a trade OPEN queues nothing');
SELECT is(ARRAY(SELECT adapter || ':' || status FROM trace.trace_queue WHERE trade_id = 30
                 ORDER BY adapter COLLATE "C"),
          ARRAY['myfxbook:pending', 'webhook:pending'],
          'without a WHEN clause: the close queues, a later update of the closed trade does not');

SELECT * FROM finish();
ROLLBACK;
