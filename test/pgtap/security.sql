-- Who may do what, and what cannot steer the trigger: the application role
-- needs no grant in schema trace, and objects planted in its search_path or
-- in pg_temp are never used when it closes a trade, nor when an operator
-- calls the operator functions, nor when a pg_monitor member reads the
-- monitoring views and the Prometheus text.
--
-- Needs trace.enabled_adapters = 'myfxbook,webhook' (test/run.sh).  Roles
-- and schemas are created inside the transaction and rolled back with it.

BEGIN;
SELECT plan(22);

SELECT is(current_setting('trace.enabled_adapters'), 'myfxbook,webhook',
          'precondition: myfxbook and webhook are enabled, file is not');

-- The trigger function itself.
SELECT ok((SELECT prosecdef FROM pg_proc
            WHERE oid = 'trace._on_trade_close()'::regprocedure),
          'the trigger function is SECURITY DEFINER');
-- The trigger function pins name resolution in C (an override search path
-- of pg_catalog alone around its statement) rather than with a SET clause,
-- which costs a parameter change at every close; the trojans below check
-- that it holds.
SELECT is((SELECT proconfig FROM pg_proc
            WHERE oid = 'trace._on_trade_close()'::regprocedure),
          NULL,
          'the trigger function has no SET clause (it pins name resolution itself)');
SELECT is_empty($$SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                   WHERE p.pronamespace = 'trace'::regnamespace
                     AND (l.lanname IN ('sql', 'plpgsql') OR p.prosecdef
                          OR p.oid = 'trace.enqueue(bigint, text[])'::regprocedure)
                     AND p.oid <> 'trace._on_trade_close()'::regprocedure
                     AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)$$,
                'every other trace function that runs SQL pins search_path to pg_catalog, pg_temp');
SELECT is((SELECT count(*) FROM pg_trigger t
            WHERE t.tgrelid = 'trades'::regclass AND t.tgname = 'trace_ext_enqueue'
              AND t.tgfoid = 'trace._on_trade_close()'::regprocedure
              AND t.tgtype::int & (2 | 64) = 0   -- neither BEFORE nor INSTEAD OF
              AND t.tgtype::int & 16 <> 0        -- UPDATE
              AND t.tgtype::int & 1 <> 0),       -- FOR EACH ROW
          1::bigint,
          'the trades table carries the AFTER UPDATE FOR EACH ROW trigger');

-- PUBLIC can use nothing in schema trace.
SELECT ok(NOT has_schema_privilege('public', 'trace', 'USAGE, CREATE'),
          'PUBLIC has no privilege on schema trace');
SELECT is_empty($$SELECT c.oid::regclass FROM pg_class c
                   WHERE c.relnamespace = 'trace'::regnamespace
                     AND c.relacl IS NOT NULL
                     AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0)$$,
                'PUBLIC has no privilege on any table, view or sequence of schema trace');
SELECT is_empty($$SELECT p.oid::regprocedure FROM pg_proc p
                   WHERE p.pronamespace = 'trace'::regnamespace
                     AND (p.proacl IS NULL
                          OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))$$,
                'PUBLIC may execute no function of schema trace');

-- The application role: its usual rights on the trade store, nothing in trace.
CREATE ROLE pgtap_trace_app;
GRANT SELECT, UPDATE ON trades TO pgtap_trace_app;
GRANT SELECT ON users, signals TO pgtap_trace_app;

-- Trojans: an operator and functions in a schema the application puts
-- ahead of pg_catalog, and tables in its pg_temp named like the trade
-- store's and the queue.  Each trojan records its call.
CREATE SCHEMA trojan;
CREATE TABLE trojan.calls (what text);
GRANT USAGE ON SCHEMA trojan TO PUBLIC;
GRANT INSERT, SELECT ON trojan.calls TO PUBLIC;

CREATE FUNCTION trojan.eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('=(text,text)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR trojan.= (LEFTARG = text, RIGHTARG = text, FUNCTION = trojan.eq);
CREATE FUNCTION trojan.eq(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('=(bigint,bigint)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR trojan.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = trojan.eq);
CREATE FUNCTION trojan.eq(a text, b text[]) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('=(text,text[])'); RETURN a OPERATOR(pg_catalog.=) ANY (b); END $$;
CREATE OPERATOR trojan.= (LEFTARG = text, RIGHTARG = text[], FUNCTION = trojan.eq);
CREATE FUNCTION trojan.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('now()'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION trojan.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('unnest(text[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION trojan.make_interval(secs double precision) RETURNS interval LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('make_interval()'); RETURN pg_catalog.make_interval(secs => secs); END $$;
CREATE FUNCTION trojan.array_position(a text[], b text) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('array_position()'); RETURN pg_catalog.array_position(a, b); END $$;
CREATE FUNCTION trojan.current_setting(a text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('current_setting()'); RETURN pg_catalog.current_setting(a); END $$;
-- What the operator functions, attach and the monitoring SQL would use
-- if they resolved names through the caller's search_path.
CREATE FUNCTION trojan.count_sf(n bigint) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('count(*)'); RETURN n OPERATOR(pg_catalog.+) 1; END $$;
CREATE AGGREGATE trojan.count(*) (SFUNC = trojan.count_sf, STYPE = bigint, INITCOND = '0');
CREATE FUNCTION trojan.min_sf(a timestamptz, b timestamptz) RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO trojan.calls VALUES ('min(timestamptz)');
    IF a IS NULL OR (b IS NOT NULL AND b OPERATOR(pg_catalog.<) a) THEN RETURN b; END IF;
    RETURN a;
END $$;
CREATE AGGREGATE trojan.min(timestamptz) (SFUNC = trojan.min_sf, STYPE = timestamptz);
CREATE FUNCTION trojan.lt(a timestamptz, b timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('<(timestamptz,timestamptz)'); RETURN a OPERATOR(pg_catalog.<) b; END $$;
CREATE OPERATOR trojan.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = trojan.lt);
CREATE FUNCTION trojan.gt(a timestamptz, b timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('>(timestamptz,timestamptz)'); RETURN a OPERATOR(pg_catalog.>) b; END $$;
CREATE OPERATOR trojan.> (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = trojan.gt);
CREATE FUNCTION trojan.minus(a timestamptz, b interval) RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('-(timestamptz,interval)'); RETURN a OPERATOR(pg_catalog.-) b; END $$;
CREATE OPERATOR trojan.- (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = trojan.minus);
CREATE FUNCTION trojan.cat(a text, b text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('||(text,text)'); RETURN a OPERATOR(pg_catalog.||) b; END $$;
CREATE OPERATOR trojan.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = trojan.cat);
CREATE FUNCTION trojan.format(a text, b regclass) RETURNS text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('format(text,regclass)'); RETURN pg_catalog.format(a, b); END $$;
CREATE FUNCTION trojan.quote_ident(a text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('quote_ident()'); RETURN pg_catalog.quote_ident(a); END $$;
CREATE FUNCTION trojan.to_regclass(a text) RETURNS regclass LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('to_regclass()'); RETURN pg_catalog.to_regclass(a); END $$;
CREATE FUNCTION trojan.pg_notify(a text, b text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO trojan.calls VALUES ('pg_notify()'); PERFORM pg_catalog.pg_notify(a, b); END $$;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA trojan TO PUBLIC;

-- pg_temp: tables named like the trade store's that say everybody opted
-- in to every adapter, and a decoy queue.  (Functions and operators are
-- never looked up in pg_temp, only relations: the function trojans are in
-- schema trojan, ahead in search_path.)
CREATE TEMP TABLE users (user_id bigint, tracing_enabled boolean);
INSERT INTO pg_temp.users VALUES (1, true), (2, true), (3, true);
CREATE TEMP TABLE signals (signal_id bigint, tracing_adapters text[]);
INSERT INTO pg_temp.signals VALUES (10, '{myfxbook,webhook}'), (11, '{myfxbook,webhook}'),
                                   (12, '{myfxbook,webhook}');
CREATE TEMP TABLE trace_queue (LIKE trace.trace_queue);
GRANT SELECT ON pg_temp.users, pg_temp.signals TO pgtap_trace_app;
GRANT ALL ON pg_temp.trace_queue TO pgtap_trace_app;

-- The application closes three trades: 3 (opted in, signal 10),
-- 4 (opted out, signal 11) and 5 (opted in, signal 12 without adapters),
-- with the trojans ahead in its search_path.  Its own statement uses
-- OPERATOR(pg_catalog.=) so that any trojan call comes from trace_ext.
SET LOCAL search_path = trojan, pg_catalog, public;
SET LOCAL ROLE pgtap_trace_app;
UPDATE public.trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = pg_catalog.now(),
                         pnl = 42.10, fees = 1.25
 WHERE trade_id OPERATOR(pg_catalog.=) ANY ('{3,4,5}'::bigint[]);
RESET ROLE;
SET LOCAL search_path = public, pg_catalog;

SELECT is((SELECT count(*) FROM trades WHERE trade_id IN (3, 4, 5) AND status = 'CLOSED'),
          3::bigint,
          'a role without any grant in schema trace can close trades');
SELECT is(ARRAY(SELECT adapter FROM trace.trace_queue WHERE trade_id = 3
                 ORDER BY adapter COLLATE "C"),
          ARRAY['myfxbook', 'webhook'],
          'a trade closed by a role without any grant in schema trace is queued');
SELECT is_empty($$SELECT what FROM trojan.calls$$,
                'no operator or function planted ahead in search_path is called when a trade closes');
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 4$$,
                'a users table planted in pg_temp cannot opt a user in');
SELECT is_empty($$SELECT 1 FROM trace.trace_queue WHERE trade_id = 5$$,
                'a signals table planted in pg_temp cannot add adapters');
SELECT is_empty($$SELECT 1 FROM pg_temp.trace_queue$$,
                'a trace_queue planted in pg_temp receives nothing');
SELECT ok((SELECT bool_and(created_at = pg_catalog.now()) FROM trace.trace_queue WHERE trade_id = 3),
          'a now() planted in pg_temp is not used for the queue times');

-- An operator (here the superuser) with the trojans ahead in its
-- search_path: the operator functions, attach and detach call none.
DELETE FROM trojan.calls;
UPDATE trace.trace_queue SET status = 'abandoned' WHERE trade_id = 3 AND adapter = 'webhook';
SET LOCAL search_path = trojan, pg_catalog, public;
DO $$ BEGIN PERFORM trace.enqueue(6); PERFORM trace.enqueue(7, ARRAY['webhook']); END $$;
DO $$ BEGIN PERFORM trace.retry(-1); PERFORM trace.retry_abandoned(); PERFORM trace.cleanup(); END $$;
SET LOCAL search_path = public, pg_catalog;
SELECT is_empty($$SELECT what FROM trojan.calls$$,
                'enqueue, retry, retry_abandoned and cleanup call no operator, function or aggregate planted ahead in search_path');
SELECT is((SELECT status FROM trace.trace_queue WHERE trade_id = 3 AND adapter = 'webhook'),
          'pending', '(retry_abandoned did re-arm the abandoned row)');

SET LOCAL search_path = trojan, pg_catalog, public;
DO $$ BEGIN PERFORM trace.detach(); PERFORM trace.attach(); PERFORM trace.attach(); END $$;
SET LOCAL search_path = public, pg_catalog;
SELECT is_empty($$SELECT what FROM trojan.calls$$,
                'attach and detach call no operator or function planted ahead in search_path');
SELECT is((SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.trades'::regclass
                                              AND tgname = 'trace_ext_enqueue'),
          1::bigint, '(attach re-created the trigger, once)');

-- A pg_monitor member with the trojans ahead in its search_path reads the
-- views and the Prometheus text: none is called.
CREATE ROLE pgtap_trace_monitor IN ROLE pg_monitor;
SET LOCAL ROLE pgtap_trace_monitor;
SET LOCAL search_path = trojan, pg_catalog, public;
DO $$
BEGIN
    PERFORM * FROM trace.queue_summary;
    PERFORM * FROM trace.failures;
    PERFORM * FROM trace.metrics;
    PERFORM trace.prometheus_metrics();
END $$;
RESET ROLE;
SET LOCAL search_path = public, pg_catalog;
SELECT is_empty($$SELECT what FROM trojan.calls$$,
                'queue_summary, failures, metrics and prometheus_metrics() call nothing planted ahead in search_path');

-- The application role still cannot look at the queue or run the operators.
SET LOCAL ROLE pgtap_trace_app;
SELECT throws_ok('SELECT count(*) FROM trace.trace_queue', '42501',
                 'permission denied for schema trace',
                 'the role that closes trades cannot read the queue');
SELECT throws_ok('SELECT trace.enqueue(6)', '42501',
                 'permission denied for schema trace',
                 'the role that closes trades cannot call trace.enqueue');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
