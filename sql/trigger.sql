--
-- trigger: which closed trades are queued, for which adapters, and what a
-- re-close does.  Rules (README.md, How it works): the trade's user opted in
-- (users.tracing_enabled), one row per adapter in signals.tracing_adapters
-- intersected with trace.enabled_adapters, in the closing transaction, with
-- due_at = now() + trace.delay; no duplicates; a cancelled row is re-armed.
--
-- Reference store: trade g belongs to user 1 + g % 3 and signal 10 + g % 3:
--   g % 3 = 0: user 1 (opted in),  signal 10 {myfxbook,webhook,file}
--   g % 3 = 1: user 2 (opted out), signal 11 {webhook}
--   g % 3 = 2: user 3 (opted in),  signal 12 NULL
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never

CREATE VIEW queued AS
SELECT trade_id, adapter, status, attempts, trade_table,
       last_error IS NULL AS no_error, delivered_at IS NULL AS undelivered
  FROM trace.trace_queue
 ORDER BY trade_id, adapter COLLATE "C";

-- Closing a trade, as the trading application does it.
CREATE PROCEDURE close_trade(id bigint) LANGUAGE sql AS $$
    UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(),
                      pnl = 42.10, fees = 1.25
     WHERE trade_id = id;
$$;
CREATE PROCEDURE reopen_trade(id bigint) LANGUAGE sql AS $$
    UPDATE trades SET status = 'OPEN', exit_price = NULL, closed_at = NULL,
                      pnl = NULL, fees = NULL
     WHERE trade_id = id;
$$;

-- With no adapter enabled (the default), nothing is ever queued.
SHOW trace.enabled_adapters;
CALL close_trade(30);
SELECT count(*) AS queued FROM trace.trace_queue;
CALL reopen_trade(30);

ALTER SYSTEM SET trace.enabled_adapters = 'myfxbook,webhook,file';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
SHOW trace.enabled_adapters;

-- Opted-in user, signal with three adapters: one pending row per adapter.
CALL close_trade(3);
SELECT * FROM queued;

-- Opted-out user: nothing.
CALL close_trade(4);
SELECT count(*) AS queued FROM trace.trace_queue WHERE trade_id = 4;

-- Opted-in user, signal with NULL adapters: nothing.
CALL close_trade(5);
SELECT count(*) AS queued FROM trace.trace_queue WHERE trade_id = 5;

-- Unknown adapter names in a signal are ignored, duplicates count once.
INSERT INTO signals VALUES (13, 'Mixed', '{webhook,bogus,webhook,MyFxBook}');
UPDATE trades SET signal_id = 13 WHERE trade_id = 8;
CALL close_trade(8);
SELECT * FROM queued WHERE trade_id = 8;

-- An empty adapter list, or no signal at all: nothing.
INSERT INTO signals VALUES (14, 'Empty', '{}');
UPDATE trades SET signal_id = 14 WHERE trade_id = 11;
CALL close_trade(11);
UPDATE trades SET signal_id = NULL WHERE trade_id = 14;
CALL close_trade(14);
SELECT count(*) AS queued FROM trace.trace_queue WHERE trade_id IN (11, 14);

-- Other updates do not queue: an OPEN trade edited, a status that is not
-- exactly CLOSED.
UPDATE trades SET fees = 2.00 WHERE trade_id = 6;
UPDATE trades SET status = 'closed' WHERE trade_id = 6;
UPDATE trades SET status = 'CLOSING' WHERE trade_id = 6;
SELECT count(*) AS queued FROM trace.trace_queue WHERE trade_id = 6;
UPDATE trades SET status = 'OPEN' WHERE trade_id = 6;

-- Rolled back: nothing queued.
BEGIN;
CALL close_trade(6);
SELECT count(*) AS queued_inside FROM trace.trace_queue WHERE trade_id = 6;
ROLLBACK;
SELECT count(*) AS queued_after_rollback FROM trace.trace_queue WHERE trade_id = 6;
SELECT status FROM trades WHERE trade_id = 6;

-- Queued in the closing transaction: the rows are its own, created "now",
-- due trace.delay later.
BEGIN;
CALL close_trade(6);
SELECT count(*) AS rows,
       bool_and(created_at = now()) AS created_now,
       bool_and(due_at = now() + current_setting('trace.delay')::interval) AS due_after_delay,
       bool_and(due_at = now() + interval '5 minutes') AS due_in_5min,
       bool_and(xmin = pg_current_xact_id()::xid) AS same_transaction
  FROM trace.trace_queue WHERE trade_id = 6;
COMMIT;

-- Several trades closed by one statement.
UPDATE trades SET status = 'CLOSED' WHERE trade_id IN (15, 16, 17, 18);
SELECT trade_id, count(*) FROM trace.trace_queue
 WHERE trade_id IN (15, 16, 17, 18) GROUP BY trade_id ORDER BY trade_id;

-- A CLOSED trade updated again (fees made final) is not queued again.
CREATE TABLE snap AS SELECT id, trade_id, adapter, status, attempts, due_at, created_at
                       FROM trace.trace_queue;
UPDATE trades SET fees = 1.30 WHERE trade_id = 3;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 3;
SELECT (SELECT count(*) FROM trace.trace_queue) AS rows_now,
       (SELECT count(*) FROM snap) AS rows_before;
SELECT count(*) AS rows_changed
  FROM trace.trace_queue q JOIN snap s USING (id)
 WHERE (q.trade_id, q.adapter, q.status, q.attempts, q.due_at, q.created_at)
       IS DISTINCT FROM (s.trade_id, s.adapter, s.status, s.attempts, s.due_at, s.created_at);

-- Re-closed (CLOSED -> OPEN -> CLOSED): no duplicate, the rows stay as
-- they are, whatever their state, except cancelled.
UPDATE trace.trace_queue SET status = 'delivered', attempts = 1
 WHERE trade_id = 6 AND adapter = 'myfxbook';
UPDATE trace.trace_queue SET status = 'abandoned', attempts = 6, last_error = 'HTTP 500'
 WHERE trade_id = 6 AND adapter = 'webhook';
UPDATE trace.trace_queue SET status = 'sending', attempts = 1
 WHERE trade_id = 6 AND adapter = 'file';
DROP TABLE snap;
CREATE TABLE snap AS SELECT id, trade_id, adapter, status, attempts, due_at, created_at
                       FROM trace.trace_queue;
CALL reopen_trade(3);
CALL close_trade(3);
CALL reopen_trade(6);
CALL close_trade(6);
SELECT (SELECT count(*) FROM trace.trace_queue) AS rows_now,
       (SELECT count(*) FROM snap) AS rows_before;
SELECT count(*) AS rows_changed
  FROM trace.trace_queue q JOIN snap s USING (id)
 WHERE (q.trade_id, q.adapter, q.status, q.attempts, q.due_at, q.created_at)
       IS DISTINCT FROM (s.trade_id, s.adapter, s.status, s.attempts, s.due_at, s.created_at);
SELECT * FROM queued WHERE trade_id = 6;

-- A cancelled row (the trade was reopened before it was sent) is re-armed
-- by the next close: pending, attempts 0, a new due_at.
UPDATE trace.trace_queue
   SET status = 'cancelled', attempts = 1, due_at = '2001-02-03 04:05:06+00'
 WHERE trade_id = 3;
CALL reopen_trade(3);
BEGIN;
CALL close_trade(3);
SELECT adapter, status, attempts,
       due_at = now() + current_setting('trace.delay')::interval AS new_due_at
  FROM trace.trace_queue WHERE trade_id = 3 ORDER BY adapter COLLATE "C";
COMMIT;
SELECT count(*) AS rows_for_trade_3 FROM trace.trace_queue WHERE trade_id = 3;

-- The enabled adapters filter the signal's: only webhook and file now.
ALTER SYSTEM SET trace.enabled_adapters = 'webhook,file';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
CALL close_trade(9);
SELECT * FROM queued WHERE trade_id = 9;
-- A cancelled row of an adapter no longer enabled stays cancelled.
UPDATE trace.trace_queue SET status = 'cancelled' WHERE trade_id = 9;
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status)
VALUES (9, 'myfxbook', 'trades', 'cancelled');
CALL reopen_trade(9);
CALL close_trade(9);
SELECT adapter, status FROM trace.trace_queue WHERE trade_id = 9 ORDER BY adapter COLLATE "C";

-- Only myfxbook enabled, a webhook-only signal: nothing.
ALTER SYSTEM SET trace.enabled_adapters = 'myfxbook';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
UPDATE trades SET signal_id = 11 WHERE trade_id = 12;
CALL close_trade(12);
SELECT count(*) AS queued FROM trace.trace_queue WHERE trade_id = 12;

-- trace.delay is read at close time: 0 means due at once, 30s thirty
-- seconds later.
ALTER SYSTEM SET trace.enabled_adapters = 'myfxbook,webhook,file';
ALTER SYSTEM SET trace.delay = 0;
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
BEGIN;
CALL close_trade(21);
SELECT count(*) AS rows, bool_and(due_at = now()) AS due_now
  FROM trace.trace_queue WHERE trade_id = 21;
COMMIT;
ALTER SYSTEM SET trace.delay = '30s';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
BEGIN;
CALL close_trade(24);
SELECT count(*) AS rows, bool_and(due_at = now() + interval '30 seconds') AS due_in_30s
  FROM trace.trace_queue WHERE trade_id = 24;
COMMIT;

-- A second trade store: its own users and signals decide, not public's.
CREATE SCHEMA shop;
CREATE TABLE shop.users (LIKE public.users INCLUDING ALL);
CREATE TABLE shop.signals (LIKE public.signals INCLUDING ALL);
CREATE TABLE shop.trades (LIKE public.trades INCLUDING ALL);
INSERT INTO shop.users VALUES (1, 'x@example.com', 'X', 'CL-9001', false),
                              (2, 'y@example.com', 'Y', 'CL-9002', true);
INSERT INTO shop.signals VALUES (10, 'Shop signal', '{webhook}');
INSERT INTO shop.trades (trade_id, user_id, signal_id, instrument, side, volume,
                         entry_price, opened_at)
VALUES (1001, 1, 10, 'EURUSD', 'buy', 1, 1.1, '2026-01-05 08:00:00+00'),
       (1002, 2, 10, 'EURUSD', 'buy', 1, 1.1, '2026-01-05 08:00:00+00');
SELECT trace.attach('shop.trades');
UPDATE shop.trades SET status = 'CLOSED';
SELECT * FROM queued WHERE trade_id > 1000;

-- The queue holds no personal data: no PII column, and no PII value in
-- any of its rows.
SELECT a.attname
  FROM pg_attribute a
 WHERE a.attrelid = 'trace.trace_queue'::regclass AND a.attnum > 0
   AND NOT a.attisdropped
   AND a.attname IN ('user_id', 'email', 'name', 'client_id', 'account_number');
SELECT count(*) AS rows_with_pii
  FROM trace.trace_queue q
 WHERE q::text ~ '@|Ana|Ben|Chen|CL-|ACC-';
SELECT count(*) > 0 AS queue_not_empty FROM trace.trace_queue;

-- Clean up.
SELECT trace.detach('shop.trades');
DROP SCHEMA shop CASCADE;
DROP TABLE snap;
DROP VIEW queued;
DROP PROCEDURE close_trade(bigint);
DROP PROCEDURE reopen_trade(bigint);
-- Back to the reference store: every trade OPEN on its own signal (the
-- trigger does not fire for OPEN), the queue empty.
UPDATE trades SET status = 'OPEN', exit_price = NULL, closed_at = NULL,
                  pnl = NULL, fees = NULL, signal_id = 10 + trade_id % 3;
DELETE FROM signals WHERE signal_id IN (13, 14);
TRUNCATE trace.trace_queue;
ALTER SYSTEM RESET trace.enabled_adapters;
ALTER SYSTEM RESET trace.delay;
SELECT pg_reload_conf();
