-- Consent is checked again at send time.  trace._send_verdict(id) runs the
-- worker's own check (src/payload.c) for one queue row: NULL when it would
-- be sent, else the reason the worker writes to last_error as it cancels
-- the row.  Rows an operator queued with explicit adapters skip the
-- signal's list, never the user's opt-in.
--
-- Needs trace.enabled_adapters = 'myfxbook,webhook' (test/run.sh).  Rolled
-- back at the end.  Trades 3, 6, 9, ...: user 1 (opted in), signal 10
-- {myfxbook,webhook,file}.

BEGIN;
SELECT plan(15);

-- The trades table's foreign keys would keep users and signals from going.
ALTER TABLE trades DROP CONSTRAINT trades_user_id_fkey,
                   DROP CONSTRAINT trades_signal_id_fkey;

CREATE FUNCTION pg_temp.verdict(trade bigint, tracker text) RETURNS text LANGUAGE sql AS $$
    SELECT trace._send_verdict(id) FROM trace.trace_queue
     WHERE trade_id = trade AND adapter = tracker
$$;

UPDATE trades SET status = 'CLOSED', closed_at = now() WHERE trade_id IN (3, 6, 9, 12, 15, 18);
SELECT is((SELECT count(*) FROM trace.trace_queue), 12::bigint,
          'precondition: six trades queued for myfxbook and webhook');
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trace._send_verdict(id) IS NULL),
          12::bigint, 'every row may be sent as queued');

-- Consent withdrawn after the close.
INSERT INTO users VALUES (21, 'x@example.invalid', NULL, NULL, true);
UPDATE trades SET user_id = 21 WHERE trade_id = 3;
UPDATE users SET tracing_enabled = false WHERE user_id = 21;
SELECT is(pg_temp.verdict(3, 'webhook'), 'consent withdrawn',
          'a trader who opts out after the close: consent withdrawn');
ALTER TABLE users ALTER COLUMN tracing_enabled DROP NOT NULL;
UPDATE users SET tracing_enabled = NULL WHERE user_id = 21;
SELECT is(pg_temp.verdict(3, 'myfxbook'), 'consent withdrawn',
          'tracing_enabled NULL (a store without NOT NULL) is no consent either');
UPDATE users SET tracing_enabled = true WHERE user_id = 21;
SELECT is(pg_temp.verdict(3, 'webhook'), NULL, 'opted in again before the send: sent');

-- The user is gone.
INSERT INTO users VALUES (22, 'y@example.invalid', NULL, NULL, true);
UPDATE trades SET user_id = 22 WHERE trade_id = 6;
DELETE FROM users WHERE user_id = 22;
SELECT is(pg_temp.verdict(6, 'webhook'), 'user no longer exists', 'user deleted: not sent');

-- The signal no longer lists the tracker, or is gone.
INSERT INTO signals VALUES (31, 'Changing', '{myfxbook,webhook}'), (32, 'Going', '{webhook}');
UPDATE trades SET signal_id = 31 WHERE trade_id = 9;
UPDATE signals SET tracing_adapters = '{webhook}' WHERE signal_id = 31;
SELECT is(pg_temp.verdict(9, 'myfxbook'), 'adapter removed from signal',
          'the signal dropped the tracker: adapter removed from signal');
SELECT is(pg_temp.verdict(9, 'webhook'), NULL, '... the tracker it still lists is sent');
UPDATE signals SET tracing_adapters = NULL WHERE signal_id = 31;
SELECT is(pg_temp.verdict(9, 'webhook'), 'adapter removed from signal',
          'a signal whose list became NULL lists no tracker');
UPDATE trades SET signal_id = 32 WHERE trade_id = 12;
DELETE FROM signals WHERE signal_id = 32;
SELECT is(pg_temp.verdict(12, 'webhook'), 'signal no longer exists', 'signal deleted: not sent');

-- The trade itself.
UPDATE trades SET status = 'OPEN' WHERE trade_id = 15;
SELECT is(pg_temp.verdict(15, 'webhook'), 'trade no longer CLOSED', 'reopened: not sent');
DELETE FROM trades WHERE trade_id = 18;
SELECT is(pg_temp.verdict(18, 'webhook'), 'trade no longer exists', 'deleted: not sent');

-- An operator's explicit choice of tracker: the signal's list is not asked,
-- the user's opt-in is.
UPDATE trades SET signal_id = 11, status = 'CLOSED', closed_at = now() WHERE trade_id = 21;
SELECT is(trace.enqueue(21, ARRAY['file']), 1,
          'precondition: the operator queues trade 21 (signal {webhook}) for file');
SELECT is(pg_temp.verdict(21, 'file'), NULL,
          'a tracker the operator chose is sent though the signal does not list it... ');
UPDATE users SET tracing_enabled = false WHERE user_id = 1;
SELECT is(pg_temp.verdict(21, 'file'), 'consent withdrawn',
          '... but never once the trader has withdrawn consent');

SELECT * FROM finish();
ROLLBACK;
