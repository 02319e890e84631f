--
-- privileges: PUBLIC gets nothing in schema trace; pg_monitor reads the
-- views; the application role closes trades with no grant in trace (the
-- trigger function is SECURITY DEFINER); secret settings are superuser-only.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never
DROP ROLE IF EXISTS regress_trace_nobody, regress_trace_monitor, regress_trace_app,
                    regress_trace_settings;
CREATE ROLE regress_trace_nobody;
CREATE ROLE regress_trace_monitor IN ROLE pg_monitor;
CREATE ROLE regress_trace_app;
GRANT SELECT, UPDATE ON trades TO regress_trace_app;
GRANT SELECT ON users, signals TO regress_trace_app;
CREATE ROLE regress_trace_settings IN ROLE pg_read_all_settings;

-- What a role with no grant (PUBLIC) and a pg_monitor member may do, per
-- object of schema trace.
SELECT 'schema trace' AS object,
       has_schema_privilege('regress_trace_nobody', 'trace', 'USAGE') AS public_use,
       has_schema_privilege('regress_trace_nobody', 'trace', 'CREATE') AS public_create,
       has_schema_privilege('regress_trace_monitor', 'trace', 'USAGE') AS monitor_use,
       has_schema_privilege('regress_trace_monitor', 'trace', 'CREATE') AS monitor_create;
SELECT c.oid::regclass AS relation, c.relkind,
       has_table_privilege('regress_trace_nobody', c.oid, 'SELECT') AS public_read,
       has_table_privilege('regress_trace_nobody', c.oid,
                           'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') AS public_write,
       has_table_privilege('regress_trace_monitor', c.oid, 'SELECT') AS monitor_read,
       has_table_privilege('regress_trace_monitor', c.oid,
                           'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') AS monitor_write
  FROM pg_class c
 WHERE c.relnamespace = 'trace'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
 ORDER BY c.relname COLLATE "C";
SELECT c.oid::regclass AS sequence,
       has_sequence_privilege('regress_trace_nobody', c.oid, 'USAGE, SELECT, UPDATE') AS public_use,
       has_sequence_privilege('regress_trace_monitor', c.oid, 'USAGE, SELECT, UPDATE') AS monitor_use
  FROM pg_class c
 WHERE c.relnamespace = 'trace'::regnamespace AND c.relkind = 'S'
 ORDER BY c.relname COLLATE "C";
SELECT p.oid::regprocedure AS function,
       has_function_privilege('regress_trace_nobody', p.oid, 'EXECUTE') AS public_execute,
       has_function_privilege('regress_trace_monitor', p.oid, 'EXECUTE') AS monitor_execute,
       has_function_privilege('regress_trace_app', p.oid, 'EXECUTE') AS app_execute
  FROM pg_proc p
 WHERE p.pronamespace = 'trace'::regnamespace
 ORDER BY p.proname COLLATE "C";

-- Every function pins search_path; the trigger function runs as its owner.
SELECT p.oid::regprocedure AS function, p.prosecdef, p.proconfig
  FROM pg_proc p
 WHERE p.pronamespace = 'trace'::regnamespace
 ORDER BY p.proname COLLATE "C";

-- Something to look at.
ALTER SYSTEM SET trace.enabled_adapters = 'myfxbook,webhook,file';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
UPDATE trades SET status = 'CLOSED' WHERE trade_id = 3;

-- A role with no grant sees nothing and runs nothing.
SET ROLE regress_trace_nobody;
SELECT count(*) FROM trace.trace_queue;
SELECT count(*) FROM trace.queue_summary;
SELECT count(*) FROM trace.failures;
SELECT count(*) FROM trace.metrics;
SELECT trace.enqueue(3);
SELECT trace.retry(1);
SELECT trace.retry_abandoned();
SELECT trace.cleanup();
SELECT trace.attach();
SELECT trace.detach();
RESET ROLE;

-- A pg_monitor member reads the three views, and nothing else.
SET ROLE regress_trace_monitor;
SELECT adapter, status, count FROM trace.queue_summary
 ORDER BY adapter COLLATE "C", status COLLATE "C";
SELECT count(*) AS failures FROM trace.failures;
SELECT adapter, pending FROM trace.metrics;
SELECT count(*) FROM trace.trace_queue;
SELECT trace.enqueue(3);
SELECT trace.retry(1);
SELECT trace.retry_abandoned();
SELECT trace.cleanup();
SELECT trace.detach();
RESET ROLE;

-- The application role, with only its usual rights on the trade store,
-- closes a trade: it is queued, though the role cannot see the queue.
SET ROLE regress_trace_app;
UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(),
                  pnl = 42.10, fees = 1.25
 WHERE trade_id = 6;
SELECT count(*) FROM trace.trace_queue;
RESET ROLE;
SELECT trade_id, adapter, status FROM trace.trace_queue
 ORDER BY trade_id, adapter COLLATE "C";

-- An operator role granted EXECUTE on the operator functions needs no
-- rights on the queue itself (they are SECURITY DEFINER).
CREATE ROLE regress_trace_operator;
GRANT USAGE ON SCHEMA trace TO regress_trace_operator;
GRANT EXECUTE ON FUNCTION trace.retry(bigint), trace.retry_abandoned(text)
    TO regress_trace_operator;
SET ROLE regress_trace_operator;
SELECT trace.retry(-1) AS retried_nothing;
SELECT trace.retry_abandoned() AS none_abandoned;
SELECT count(*) FROM trace.trace_queue;
SELECT trace.cleanup();
RESET ROLE;
REVOKE ALL ON SCHEMA trace FROM regress_trace_operator;
REVOKE ALL ON FUNCTION trace.retry(bigint), trace.retry_abandoned(text)
    FROM regress_trace_operator;
DROP ROLE regress_trace_operator;

-- Secret settings: a role without pg_read_all_settings may not read them
-- at all; ordinary settings stay readable.
ALTER SYSTEM SET trace.webhook_auth_token = 'regress-webhook-token';
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;
SET ROLE regress_trace_nobody;
SHOW trace.delay;
SHOW trace.webhook_auth_token;
SHOW trace.myfxbook_webhook_token;
SHOW trace.webhook_signing_secret;
SHOW trace.s3_access_key_id;
SHOW trace.s3_secret_access_key;
SHOW trace.secrets_file;
SELECT current_setting('trace.webhook_auth_token');
SELECT current_setting('trace.webhook_auth_token', true) AS missing_ok;
SELECT name FROM pg_settings
 WHERE name IN ('trace.myfxbook_webhook_token', 'trace.webhook_auth_token',
                'trace.webhook_signing_secret', 'trace.s3_access_key_id',
                'trace.s3_secret_access_key', 'trace.secrets_file');
RESET ROLE;

-- A pg_read_all_settings member sees ******** (set) or '' (unset), never
-- the value.
SET ROLE regress_trace_settings;
SHOW trace.webhook_auth_token;
SHOW trace.myfxbook_webhook_token;
SELECT name, setting, reset_val FROM pg_settings
 WHERE name IN ('trace.webhook_auth_token', 'trace.myfxbook_webhook_token')
 ORDER BY name COLLATE "C";
RESET ROLE;

-- Clean up.
ALTER SYSTEM RESET trace.webhook_auth_token;
ALTER SYSTEM RESET trace.enabled_adapters;
SELECT pg_reload_conf();
UPDATE trades SET status = 'OPEN' WHERE trade_id IN (3, 6);
TRUNCATE trace.trace_queue;
REVOKE ALL ON trades, users, signals FROM regress_trace_app;
DROP ROLE regress_trace_nobody, regress_trace_monitor, regress_trace_app,
          regress_trace_settings;
