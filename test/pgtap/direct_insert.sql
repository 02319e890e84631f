-- The trigger writes queue rows without the executor (src/queue_insert.c,
-- src/consent.c) when it can do exactly what the enqueue statement would,
-- and runs the statement otherwise.  Either way the rows are the same, the
-- queue's constraints hold and its triggers fire.
--
-- Needs trace.enabled_adapters = 'myfxbook,webhook' (test/run.sh) and the
-- reference trade store (see trigger_rules.sql).  Rolled back at the end.

BEGIN;
SELECT plan(13);

SELECT is(current_setting('trace.enabled_adapters'), 'myfxbook,webhook',
          'precondition: myfxbook and webhook are enabled, file is not');

-- Written directly: every column as the statement would write it.
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 3;
SELECT results_eq(
    $$SELECT adapter, trade_table, status, attempts, due_at, lease_owner, last_error,
             last_http_status, delivered_at, created_at, by_operator
        FROM trace.trace_queue WHERE trade_id = 3 ORDER BY adapter COLLATE "C"$$,
    $$SELECT a, 'trades'::regclass, 'pending'::text, 0,
             now() + current_setting('trace.delay')::interval, NULL::int, NULL::text,
             NULL::int, NULL::timestamptz, now(), false
        FROM unnest(ARRAY['myfxbook', 'webhook']) a$$,
    'a close writes every column as the enqueue statement would');
SELECT ok((SELECT max(id) FROM trace.trace_queue WHERE trade_id = 3)
              = currval(pg_get_serial_sequence('trace.trace_queue', 'id')),
          'the ids come from the identity sequence');
SELECT is((SELECT count(DISTINCT id) FROM trace.trace_queue WHERE trade_id = 3), 2::bigint,
          'one id per row');

-- The queue's CHECK constraints are enforced on every row written.
ALTER TABLE trace.trace_queue ADD CONSTRAINT test_not_21 CHECK (trade_id <> 21);
SELECT throws_ok($$UPDATE trades SET status = 'CLOSED' WHERE trade_id = 21$$, '23514',
                 NULL, 'a CHECK constraint added to the queue is enforced on the close''s rows');
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 24;
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 24), 2::bigint,
          'a row the added CHECK accepts is queued');
ALTER TABLE trace.trace_queue DROP CONSTRAINT test_not_21;

-- A row trigger on the queue: the statement writes the rows, and it fires.
CREATE FUNCTION pg_temp.mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.last_error := 'seen by a row trigger';
    RETURN NEW;
END $$;
CREATE TRIGGER test_mark BEFORE INSERT ON trace.trace_queue
    FOR EACH ROW EXECUTE FUNCTION pg_temp.mark();
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 6;
SELECT is(ARRAY(SELECT last_error FROM trace.trace_queue WHERE trade_id = 6),
          ARRAY['seen by a row trigger', 'seen by a row trigger'],
          'a row trigger on the queue fires for the close''s rows');
DROP TRIGGER test_mark ON trace.trace_queue;

-- Another index on the queue, of another access method: still written.
CREATE INDEX test_hash ON trace.trace_queue USING hash (adapter);
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 9;
SET LOCAL enable_seqscan = off;
SET LOCAL enable_bitmapscan = on;
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE adapter = 'webhook' AND trade_id = 9),
          1::bigint, 'a hash index on the queue holds the close''s rows');
RESET enable_seqscan;
DROP INDEX trace.test_hash;

-- users with row-level security: read by the statement, same answer.
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
UPDATE trades SET status = 'CLOSED' WHERE trade_id IN (12, 13);
SELECT is(ARRAY(SELECT trade_id || ':' || adapter FROM trace.trace_queue
                 WHERE trade_id IN (12, 13) ORDER BY trade_id, adapter COLLATE "C"),
          ARRAY['12:myfxbook', '12:webhook'],
          'users with row-level security: the opted-in user''s trade is queued, the other''s not');
ALTER TABLE users DISABLE ROW LEVEL SECURITY;

-- A signal whose tracing_adapters is varchar[]: read directly, same answer.
ALTER TABLE signals ALTER COLUMN tracing_adapters TYPE varchar[];
UPDATE trades SET status = 'CLOSED' WHERE trade_id IN (15, 16, 17);
SELECT is(ARRAY(SELECT trade_id || ':' || adapter FROM trace.trace_queue
                 WHERE trade_id IN (15, 16, 17) ORDER BY trade_id, adapter COLLATE "C"),
          ARRAY['15:myfxbook', '15:webhook'],
          'varchar[] tracing_adapters: the listed, enabled adapters of an opted-in user');

-- users.user_id of another integer type than trades.user_id.
ALTER TABLE users ALTER COLUMN user_id TYPE integer;
UPDATE trades SET status = 'CLOSED' WHERE trade_id IN (18, 19);
SELECT is(ARRAY(SELECT trade_id || ':' || adapter FROM trace.trace_queue
                 WHERE trade_id IN (18, 19) ORDER BY trade_id, adapter COLLATE "C"),
          ARRAY['18:myfxbook', '18:webhook'],
          'an integer users.user_id read with a bigint key');

-- trace.enqueue with adapters: by_operator, whatever the signal lists.
SELECT is(trace.enqueue(27, ARRAY['myfxbook']), 1, 'trace.enqueue with adapters queues one row');
SELECT is((SELECT by_operator FROM trace.trace_queue WHERE trade_id = 27), true,
          'trace.enqueue with adapters marks the row by_operator');

SELECT * FROM finish();
ROLLBACK;
