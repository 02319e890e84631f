--
-- attach: trace.attach() / trace.detach() on the reference trade store and
-- on tables that are not one.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never

-- A helper view: which tables carry the trace_ext trigger.
CREATE TEMP VIEW attached AS
SELECT tgrelid::regclass AS "table", tgname
  FROM pg_trigger
 WHERE tgfoid = 'trace._on_trade_close()'::regprocedure
 ORDER BY tgrelid::regclass::text COLLATE "C", tgname COLLATE "C";

SELECT * FROM attached;

-- Attaching twice is harmless: still one trigger.
SELECT trace.attach();
SELECT trace.attach('trades');
SELECT * FROM attached;

-- Detach, and detach again (harmless).
SELECT trace.detach();
SELECT * FROM attached;
SELECT trace.detach('trades');
SELECT * FROM attached;

-- Attach by default name again.
SELECT trace.attach();
SELECT * FROM attached;

-- The trigger fires only when status becomes CLOSED.
SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'trace_ext_enqueue';

-- Things that are not a trade store get a clear error.
SELECT trace.attach('no_such_table');
CREATE SCHEMA not_a_store;
CREATE TABLE not_a_store.trades (id bigint, status text);
SELECT trace.attach('not_a_store.trades');
CREATE TABLE not_a_store.trades2 (trade_id bigint, user_id bigint, status text);
SELECT trace.attach('not_a_store.trades2');
-- The right columns, but no users and signals beside it.
CREATE TABLE not_a_store.trades3 (trade_id bigint, user_id bigint, signal_id bigint,
                                  status text);
SELECT trace.attach('not_a_store.trades3');
CREATE VIEW not_a_store.trades_view AS SELECT * FROM public.trades;
SELECT trace.attach('not_a_store.trades_view');
SELECT * FROM attached;

-- A second trade store in its own schema can be attached too.
CREATE SCHEMA shop;
CREATE TABLE shop.users (LIKE public.users INCLUDING ALL);
CREATE TABLE shop.signals (LIKE public.signals INCLUDING ALL);
CREATE TABLE shop.trades (LIKE public.trades INCLUDING ALL);
SELECT trace.attach('shop.trades');
SELECT trace.attach('shop.trades');
SELECT * FROM attached;
SELECT trace.detach('shop.trades');
SELECT * FROM attached;

-- detach of a table that is gone is a plain "does not exist".
SELECT trace.detach('no_such_table');

DROP SCHEMA not_a_store CASCADE;
DROP SCHEMA shop CASCADE;
SELECT * FROM attached;
