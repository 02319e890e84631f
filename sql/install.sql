--
-- install: CREATE EXTENSION, what it creates, auto-attach, DROP and re-create.
--
-- Runs first: it loads the reference trade store (a copy of
-- test/fixtures/trade_store.sql) that the later tests use.  Needs a
-- server with shared_preload_libraries = 'trace_ext'; the worker serves
-- trace.database ('postgres'), never this database.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never

-- Without a trades table: the extension installs, attaches to nothing, and
-- warns that this database is not the one the worker serves.
CREATE EXTENSION trace_ext;
SELECT count(*) AS triggers FROM pg_trigger
 WHERE NOT tgisinternal AND tgrelid <> 'trace.trace_queue'::regclass;
DROP EXTENSION trace_ext;
SELECT count(*) AS schema_left FROM pg_namespace WHERE nspname = 'trace';

-- The reference trade store, then the extension: it finds "trades" and
-- attaches to it by itself.
\i test/fixtures/trade_store.sql
CREATE EXTENSION trace_ext;

SELECT e.extname, e.extversion, n.nspname AS schema, e.extrelocatable
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname = 'trace_ext';

-- Everything the extension owns, by name (no OIDs).
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) COLLATE "C" AS member
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'trace_ext')
   AND d.deptype = 'e'
 ORDER BY 1;

-- The functions users call, with their signatures and result types.
SELECT p.oid::regprocedure AS function, pg_get_function_result(p.oid) AS returns
  FROM pg_proc p
 WHERE p.pronamespace = 'trace'::regnamespace AND p.proname !~ '^_'
 ORDER BY p.proname COLLATE "C";

-- The queue as README.md (The queue) describes it (other columns are internal).
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type
  FROM pg_attribute a
 WHERE a.attrelid = 'trace.trace_queue'::regclass
   AND a.attname IN ('id', 'trade_id', 'adapter', 'status', 'attempts', 'due_at',
                     'last_error', 'last_http_status', 'delivered_at', 'created_at')
   AND NOT a.attisdropped
 ORDER BY a.attnum;
SELECT count(*) AS interface_columns_present
  FROM pg_attribute a
 WHERE a.attrelid = 'trace.trace_queue'::regclass AND a.attnum > 0
   AND NOT a.attisdropped
   AND a.attname IN ('id', 'trade_id', 'adapter', 'status', 'attempts', 'due_at',
                     'last_error', 'last_http_status', 'delivered_at', 'created_at');

-- One row per (trade, adapter): the primary key is id, and (trade_id,
-- adapter) is unique.
SELECT i.indisprimary, i.indisunique,
       array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              ORDER BY k.ord) AS columns
  FROM pg_index i
 WHERE i.indrelid = 'trace.trace_queue'::regclass AND i.indisunique
 ORDER BY i.indisprimary DESC;

-- The queue accepts only known adapters and statuses (one CHECK constraint).
SELECT conname, pg_get_constraintdef(oid) AS definition
  FROM pg_constraint
 WHERE conrelid = 'trace.trace_queue'::regclass AND contype = 'c';
SELECT v.adapter, v.status, trace._queue_values_ok(v.adapter, v.status) AS accepted
  FROM (VALUES ('myfxbook', 'pending'), ('webhook', 'sending'), ('file', 'delivered'),
               ('webhook', 'abandoned'), ('file', 'cancelled'),
               ('Webhook', 'pending'), ('webhook ', 'pending'), ('', 'pending'),
               ('mt4', 'pending'), ('webhook', 'PENDING'), ('webhook', 'done'),
               ('webhook', '')) v(adapter, status);
SELECT trace._queue_values_ok(NULL, 'pending') IS NULL AS strict;
-- (terse: the failing row's DETAIL holds the time of the insert)
\set VERBOSITY terse
BEGIN;
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table) VALUES (1, 'mt4', 'trades');
ROLLBACK;
BEGIN;
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status)
VALUES (1, 'webhook', 'trades', 'pendng');
ROLLBACK;
BEGIN;
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table) VALUES (1, 'file', 'trades');
UPDATE trace.trace_queue SET status = 'Delivered' WHERE trade_id = 1;
ROLLBACK;
\set VERBOSITY default

-- pg_dump keeps the queue (and its sequence) with the data.
SELECT extconfig::regclass[] AS dumped_with_data
  FROM pg_extension WHERE extname = 'trace_ext';

-- CREATE EXTENSION attached the trigger to trades.
SELECT tgrelid::regclass AS "table", tgname, tgfoid::regprocedure AS function,
       tgenabled
  FROM pg_trigger WHERE NOT tgisinternal;
SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'trace_ext_enqueue';

-- Installed once only.
CREATE EXTENSION trace_ext;
CREATE EXTENSION IF NOT EXISTS trace_ext;

-- The trigger depends on the extension's function: a plain DROP refuses,
-- CASCADE removes the trigger and nothing of the trade store.
DROP EXTENSION trace_ext;
SET client_min_messages = notice;
DROP EXTENSION trace_ext CASCADE;
SET client_min_messages = warning;
SELECT count(*) AS triggers FROM pg_trigger WHERE NOT tgisinternal;
SELECT count(*) AS trades FROM trades;
SELECT count(*) AS functions_left FROM pg_proc WHERE pronamespace::regnamespace::text = 'trace';
-- The extension owns schema trace: it goes with the extension.
SELECT count(*) AS schema_left FROM pg_namespace WHERE nspname = 'trace';

-- Re-created: attached again, the queue is empty.
CREATE EXTENSION trace_ext;
SELECT tgrelid::regclass AS "table", tgname FROM pg_trigger WHERE NOT tgisinternal;
SELECT count(*) AS queued FROM trace.trace_queue;
