-- Every path by which a trade becomes CLOSED is queued, exactly once per
-- tracker: UPDATE, INSERT and COPY of a closed row, upsert and MERGE, an
-- UPDATE that moves the row to another partition (LIST, RANGE and HASH
-- partitioning, partitions attached later), and replicated changes when
-- attached with replica => true.  Shapes that cannot be traced are refused
-- by trace.attach().
--
-- Needs trace.enabled_adapters = 'myfxbook,webhook' (test/run.sh).  Rolled
-- back at the end.  Users 1 and 3 opt in, user 2 does not; signal 10 lists
-- {myfxbook,webhook,file}, signal 11 {webhook}.

BEGIN;
SELECT plan(32);

SELECT is(current_setting('trace.enabled_adapters'), 'myfxbook,webhook',
          'precondition: myfxbook and webhook are enabled, file is not');

CREATE FUNCTION pg_temp.queued(trade bigint) RETURNS text[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(q.adapter ORDER BY q.adapter COLLATE "C"), '{}')
      FROM trace.trace_queue q WHERE q.trade_id = trade
$$;
CREATE FUNCTION pg_temp.queued_from(trade bigint) RETURNS regclass[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(DISTINCT q.trade_table), '{}')
      FROM trace.trace_queue q WHERE q.trade_id = trade
$$;

-- A trade as the store writes it: user 1, signal 10 unless told otherwise.
CREATE FUNCTION pg_temp.trade_row(id bigint, st text, usr bigint DEFAULT 1,
                                  sig bigint DEFAULT 10)
    RETURNS trades LANGUAGE sql AS $$
    SELECT ROW(id, usr, sig, NULL, NULL, 'EURUSD', 'buy', 1.0, 1.08, NULL,
               timestamptz '2026-01-05 08:00+00',
               CASE WHEN st = 'CLOSED' THEN timestamptz '2026-01-05 09:00+00' END,
               NULL, NULL, st)::trades
$$;

-- ---- the plain table --------------------------------------------------
SELECT is(ARRAY(SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'trades'::regclass
                   AND tgname LIKE 'trace_ext%' ORDER BY 1),
          ARRAY['trace_ext_enqueue', 'trace_ext_enqueue_insert'],
          'CREATE EXTENSION attached an UPDATE and an INSERT trigger');

INSERT INTO trades SELECT (pg_temp.trade_row(101, 'CLOSED')).*;
SELECT is(pg_temp.queued(101), ARRAY['myfxbook', 'webhook'],
          'INSERT of a CLOSED trade is queued once per tracker');

INSERT INTO trades SELECT (pg_temp.trade_row(102, 'OPEN')).*;
SELECT is(pg_temp.queued(102), '{}'::text[], 'INSERT of an OPEN trade is not queued');

INSERT INTO trades SELECT (pg_temp.trade_row(103, 'CLOSED', usr => 2)).*;
SELECT is(pg_temp.queued(103), '{}'::text[],
          'INSERT of a CLOSED trade of an opted-out user is not queued');

CREATE TEMP TABLE copy_src AS
    SELECT (pg_temp.trade_row(g, 'CLOSED', sig => 11)).* FROM generate_series(104, 106) g;
COPY (SELECT * FROM copy_src) TO '/tmp/trace_pgtap_copy.dat';
COPY trades FROM '/tmp/trace_pgtap_copy.dat';
SELECT is((SELECT array_agg(t ORDER BY t) FROM unnest(ARRAY[104, 105, 106]) t
            WHERE pg_temp.queued(t) = ARRAY['webhook']),
          ARRAY[104, 105, 106], 'COPY of CLOSED trades queues each');

-- Upsert: its insert branch and its update branch.
INSERT INTO trades SELECT (pg_temp.trade_row(107, 'CLOSED')).*
    ON CONFLICT (trade_id) DO UPDATE SET status = EXCLUDED.status;
SELECT is(pg_temp.queued(107), ARRAY['myfxbook', 'webhook'],
          'INSERT ... ON CONFLICT that inserts a CLOSED trade queues it');
INSERT INTO trades SELECT (pg_temp.trade_row(108, 'OPEN')).*;
INSERT INTO trades SELECT (pg_temp.trade_row(108, 'CLOSED')).*
    ON CONFLICT (trade_id) DO UPDATE SET status = EXCLUDED.status;
SELECT is(pg_temp.queued(108), ARRAY['myfxbook', 'webhook'],
          'INSERT ... ON CONFLICT DO UPDATE that closes a trade queues it');
INSERT INTO trades SELECT (pg_temp.trade_row(108, 'CLOSED')).*
    ON CONFLICT (trade_id) DO UPDATE SET fees = 2;
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 108), 2::bigint,
          'an upsert of an already CLOSED trade queues nothing more');

-- MERGE: an insert action and an update action.
INSERT INTO trades SELECT (pg_temp.trade_row(109, 'OPEN')).*;
MERGE INTO trades t
USING (VALUES (109::bigint), (110::bigint)) AS s(id) ON t.trade_id = s.id
 WHEN MATCHED THEN UPDATE SET status = 'CLOSED'
 WHEN NOT MATCHED THEN
      INSERT (trade_id, user_id, signal_id, instrument, side, volume, entry_price,
              opened_at, closed_at, status)
      VALUES (s.id, 1, 10, 'EURUSD', 'buy', 1, 1.08, '2026-01-05 08:00+00',
              '2026-01-05 09:00+00', 'CLOSED');
SELECT is(ARRAY[pg_temp.queued(109), pg_temp.queued(110)],
          ARRAY[ARRAY['myfxbook', 'webhook'], ARRAY['myfxbook', 'webhook']],
          'MERGE queues the trade it closes and the closed trade it inserts');

-- ---- LIST partitioning by status (hot/cold) -------------------------------
CREATE TABLE ltrades (LIKE trades INCLUDING DEFAULTS) PARTITION BY LIST (status);
CREATE TABLE ltrades_open PARTITION OF ltrades FOR VALUES IN ('OPEN');
SELECT lives_ok($$SELECT trace.attach('ltrades')$$, 'a table partitioned by status can be attached');
-- The closed partition comes after attach().
CREATE TABLE ltrades_closed (LIKE trades INCLUDING DEFAULTS);
ALTER TABLE ltrades ATTACH PARTITION ltrades_closed FOR VALUES IN ('CLOSED');
SELECT is((SELECT count(*) FROM pg_trigger WHERE tgrelid = 'ltrades_closed'::regclass
              AND tgname LIKE 'trace_ext%'), 2::bigint,
          'a partition attached later gets both triggers without calling attach() again');

INSERT INTO ltrades SELECT (pg_temp.trade_row(201, 'OPEN')).*;
UPDATE ltrades SET status = 'CLOSED' WHERE trade_id = 201;
SELECT is(pg_temp.queued(201), ARRAY['myfxbook', 'webhook'],
          'a close that moves the row to the closed partition is queued');
SELECT is(pg_temp.queued_from(201), ARRAY['ltrades'::regclass],
          'the queue row refers to the partitioned table, not the partition');
SELECT is((SELECT tableoid::regclass FROM ltrades WHERE trade_id = 201), 'ltrades_closed'::regclass,
          '(the row did move to the closed partition)');

UPDATE ltrades SET status = 'OPEN' WHERE trade_id = 201;
UPDATE ltrades SET status = 'CLOSED' WHERE trade_id = 201;
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 201), 2::bigint,
          'closed, reopened (back to the open partition) and closed again: still one row per tracker');

SELECT is(trace._send_verdict((SELECT min(id) FROM trace.trace_queue WHERE trade_id = 201)), NULL,
          'the worker finds the trade through the partitioned table');
UPDATE ltrades SET status = 'OPEN' WHERE trade_id = 201;
SELECT is(trace._send_verdict((SELECT min(id) FROM trace.trace_queue WHERE trade_id = 201)),
          'trade no longer CLOSED',
          'and sees it reopened in the other partition');

-- ---- RANGE partitioning by closed_at, open trades in the default ---------
CREATE TABLE rtrades (LIKE trades INCLUDING DEFAULTS) PARTITION BY RANGE (closed_at);
CREATE TABLE rtrades_2026 PARTITION OF rtrades
    FOR VALUES FROM ('2026-01-01 00:00+00') TO ('2027-01-01 00:00+00');
CREATE TABLE rtrades_open PARTITION OF rtrades DEFAULT;
SELECT trace.attach('rtrades');
INSERT INTO rtrades SELECT (pg_temp.trade_row(301, 'OPEN')).*;
UPDATE rtrades SET status = 'CLOSED', closed_at = '2026-03-01 10:00+00' WHERE trade_id = 301;
SELECT is(pg_temp.queued(301), ARRAY['myfxbook', 'webhook'],
          'RANGE partitions: a close that moves the row out of the default partition is queued');
UPDATE rtrades SET closed_at = '2026-03-02 10:00+00' WHERE trade_id = 301;
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id = 301), 2::bigint,
          'moving an already CLOSED row between partitions queues nothing more');

-- ---- HASH partitioning --------------------------------------------------
CREATE TABLE htrades (LIKE trades INCLUDING DEFAULTS) PARTITION BY HASH (trade_id);
CREATE TABLE htrades_0 PARTITION OF htrades FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE htrades_1 PARTITION OF htrades FOR VALUES WITH (MODULUS 2, REMAINDER 1);
SELECT trace.attach('htrades');
INSERT INTO htrades SELECT (pg_temp.trade_row(g, 'OPEN')).* FROM generate_series(401, 404) g;
UPDATE htrades SET status = 'CLOSED' WHERE trade_id BETWEEN 401 AND 404;
SELECT is((SELECT count(*) FROM trace.trace_queue WHERE trade_id BETWEEN 401 AND 404
              AND trade_table = 'htrades'::regclass), 8::bigint,
          'HASH partitions: closes in every partition are queued, referring to the partitioned table');

-- ---- logical replication: replica => true -------------------------------
INSERT INTO trades SELECT (pg_temp.trade_row(501, 'OPEN')).*;
INSERT INTO trades SELECT (pg_temp.trade_row(502, 'OPEN')).*;
SET LOCAL session_replication_role = replica;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 501;
RESET session_replication_role;
SELECT is(pg_temp.queued(501), '{}'::text[],
          'attached without replica: a change applied as a replica (logical replication) is not queued');
SELECT trace.attach('trades', replica => true);
SELECT is(ARRAY(SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = 'trades'::regclass
                   AND tgname LIKE 'trace_ext%' ORDER BY tgname),
          ARRAY['A', 'A'], 'replica => true enables both triggers ALWAYS');
SET LOCAL session_replication_role = replica;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 502;
RESET session_replication_role;
SELECT is(pg_temp.queued(502), ARRAY['myfxbook', 'webhook'],
          'attached with replica: a change applied as a replica is queued');
SELECT trace.attach('trades');
SELECT is(ARRAY(SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = 'trades'::regclass
                   AND tgname LIKE 'trace_ext%' ORDER BY tgname),
          ARRAY['O', 'O'], 'attach() again without replica turns that off');

-- ---- shapes that cannot be traced are refused ----------------------------
CREATE SCHEMA odd;
CREATE TABLE odd.users (user_id bigint, tracing_enabled boolean);
CREATE TABLE odd.signals (signal_id bigint, tracing_adapters text[]);
CREATE TABLE odd.no_status (trade_id bigint, user_id bigint, signal_id bigint);
SELECT throws_ok($$SELECT trace.attach('odd.no_status')$$, 'P0001',
                 'trace.attach: table odd.no_status has no column "status"',
                 'a table without status is refused, naming the column');
CREATE TABLE odd.text_id (trade_id text, user_id bigint, signal_id bigint, status text);
SELECT throws_ok($$SELECT trace.attach('odd.text_id')$$, 'P0001',
                 'trace.attach: column trade_id of table odd.text_id is of type text, not an integer',
                 'a trade_id that is not an integer is refused');
CREATE TABLE odd.num_id (trade_id numeric, user_id bigint, signal_id bigint, status text);
SELECT throws_ok($$SELECT trace.attach('odd.num_id')$$, 'P0001',
                 'trace.attach: column trade_id of table odd.num_id is of type numeric, not an integer',
                 'a numeric trade_id is refused');
CREATE TYPE odd.state AS ENUM ('OPEN', 'DONE');
CREATE TABLE odd.enum_status (trade_id int, user_id bigint, signal_id bigint, status odd.state);
SELECT throws_ok($$SELECT trace.attach('odd.enum_status')$$, 'P0001',
                 'trace.attach: column status of table odd.enum_status is of type odd.state, which cannot hold ''CLOSED''',
                 'an enum status without CLOSED is refused');
CREATE DOMAIN odd.trade_key AS integer;
CREATE TYPE odd.state2 AS ENUM ('OPEN', 'CLOSED');
CREATE TABLE odd.trades (trade_id odd.trade_key, user_id bigint, signal_id bigint,
                         status odd.state2);
SELECT lives_ok($$SELECT trace.attach('odd.trades')$$,
                'an integer domain as trade_id and an enum with CLOSED as status are accepted');
ALTER TABLE odd.users DROP COLUMN tracing_enabled;
CREATE TABLE odd.more (trade_id int, user_id bigint, signal_id bigint, status text);
SELECT throws_ok($$SELECT trace.attach('odd.more')$$, 'P0001',
                 'trace.attach: table odd.users has no column "tracing_enabled"',
                 'users without tracing_enabled is refused');
SELECT is((SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
            WHERE c.relnamespace = 'odd'::regnamespace AND t.tgname LIKE 'trace_ext%'), 2::bigint,
          'a refused table gets no trigger (only odd.trades has its two)');

SELECT * FROM finish();
ROLLBACK;
