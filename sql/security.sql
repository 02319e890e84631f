--
-- security: what a role with no grant and a pg_monitor member can learn of
-- the secrets and do to the queue, beyond privileges.sql (which has the
-- grants themselves); and that no trace.* setting can be stored per role
-- or per database (ALTER ROLE / ALTER DATABASE ... SET), where
-- pg_db_role_setting would show it to every role.  Every secret is given a
-- value here, so that a leak would show as that value.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never
DROP ROLE IF EXISTS regress_sec_nobody, regress_sec_monitor;
CREATE ROLE regress_sec_nobody;
CREATE ROLE regress_sec_monitor IN ROLE pg_monitor;

ALTER SYSTEM SET trace.myfxbook_webhook_token = 'regress-sec-value-mfx';
ALTER SYSTEM SET trace.webhook_auth_token = 'regress-sec-value-wh';
ALTER SYSTEM SET trace.webhook_signing_secret = 'regress-sec-value-sign';
ALTER SYSTEM SET trace.s3_access_key_id = 'regress-sec-value-akid';
ALTER SYSTEM SET trace.s3_secret_access_key = 'regress-sec-value-sak';
SELECT pg_reload_conf();
-- Wait for the reload itself, not for a while: this backend takes the
-- postmaster's SIGHUP between statements, after the postmaster has
-- re-read the files, so once it sees a secret set, a new connection does.
\set ECHO none
\o /dev/null
SELECT 'SELECT pg_sleep(0.01) WHERE current_setting(''trace.s3_secret_access_key'') = '''''
  FROM generate_series(1, 1000) \gexec
\o
\set ECHO all
SELECT current_setting('trace.s3_secret_access_key') <> '' AS reloaded;
\c
SET client_min_messages = warning;
\set SHOW_CONTEXT never
CREATE TEMP VIEW secret_gucs AS
SELECT unnest(ARRAY['trace.myfxbook_webhook_token', 'trace.webhook_auth_token',
                    'trace.webhook_signing_secret', 'trace.s3_access_key_id',
                    'trace.s3_secret_access_key']) AS name;
GRANT SELECT ON secret_gucs TO PUBLIC;

-- The superuser too sees only the mask, in every column.
SELECT s.name, s.setting, s.reset_val, s.boot_val
  FROM pg_settings s JOIN secret_gucs g USING (name) ORDER BY s.name COLLATE "C";
SELECT count(*) AS superuser_rows_with_a_value FROM pg_settings s
 WHERE row_to_json(s)::text LIKE '%regress-sec-value%';

-- A pg_monitor member (pg_read_all_settings): the mask in SHOW,
-- current_setting() and every column of pg_settings; no access to
-- pg_file_settings (superuser only), which shows the files' raw values.
SET ROLE regress_sec_monitor;
SHOW trace.myfxbook_webhook_token;
SHOW trace.webhook_auth_token;
SHOW trace.webhook_signing_secret;
SHOW trace.s3_access_key_id;
SHOW trace.s3_secret_access_key;
SELECT g.name, current_setting(g.name) FROM secret_gucs g ORDER BY g.name COLLATE "C";
SELECT s.name, s.setting, s.reset_val, s.boot_val
  FROM pg_settings s JOIN secret_gucs g USING (name) ORDER BY s.name COLLATE "C";
SELECT count(*) AS monitor_rows_with_a_value FROM pg_settings s
 WHERE row_to_json(s)::text LIKE '%regress-sec-value%';
SELECT count(*) AS monitor_rows_with_a_value FROM pg_show_all_settings() s
 WHERE row_to_json(s)::text LIKE '%regress-sec-value%';
SELECT count(*) FROM pg_file_settings;
SELECT count(*) FROM pg_show_all_file_settings();
RESET ROLE;

-- A role with no grant: no secret row at all, whatever the column; no
-- pg_file_settings.
SET ROLE regress_sec_nobody;
SELECT count(*) AS nobody_secret_rows FROM pg_settings s JOIN secret_gucs g USING (name);
SELECT count(*) AS nobody_rows_with_a_value FROM pg_settings s
 WHERE row_to_json(s)::text LIKE '%regress-sec-value%';
SELECT current_setting('trace.s3_secret_access_key');
SELECT count(*) FROM pg_file_settings;
RESET ROLE;
SELECT r.rolname, has_table_privilege(r.rolname, 'pg_file_settings', 'SELECT') AS file_settings,
       has_function_privilege(r.rolname, 'pg_show_all_file_settings()', 'EXECUTE') AS file_settings_fn,
       has_table_privilege(r.rolname, 'pg_db_role_setting', 'SELECT') AS db_role_setting
  FROM pg_roles r WHERE r.rolname IN ('regress_sec_nobody', 'regress_sec_monitor')
 ORDER BY r.rolname COLLATE "C";

-- Neither may write the queue, nor call what privileges.sql does not try.
SET ROLE regress_sec_nobody;
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table) VALUES (1, 'webhook', 'trades');
UPDATE trace.trace_queue SET status = 'pending';
DELETE FROM trace.trace_queue;
TRUNCATE trace.trace_queue;
COPY trace.trace_queue TO STDOUT;
SELECT trace.prometheus_metrics();
SELECT trace._wake();
SELECT trace._ttl();
SELECT trace._preloaded();
SELECT * FROM trace._counters();
RESET ROLE;
SET ROLE regress_sec_monitor;
INSERT INTO trace.trace_queue (trade_id, adapter, trade_table) VALUES (1, 'webhook', 'trades');
UPDATE trace.trace_queue SET status = 'pending';
DELETE FROM trace.trace_queue;
TRUNCATE trace.trace_queue;
COPY trace.trace_queue TO STDOUT;
SELECT trace.attach();
SELECT trace._wake();
SELECT trace._ttl();
SELECT length(trace.prometheus_metrics()) > 0 AS monitor_reads_metrics;
RESET ROLE;

-- No trace.* setting can be stored for a role or a database, whoever
-- asks, nor set in a session: PostgreSQL refuses per-role, per-database
-- and session values for sighup and postmaster parameters (55P02), and
-- the "trace" prefix is reserved (an unknown name is refused too, 42602).
-- The value tried for the secrets is one that must not appear anywhere.
CREATE TEMP TABLE tried (name text, how text, outcome text);
DO $$
DECLARE
    g record;
    how text;
    stmt text;
    val text;
BEGIN
    FOR g IN SELECT s.name, s.context FROM pg_settings s WHERE s.name LIKE 'trace.%'
             UNION ALL SELECT 'trace.no_such_setting', '-'
    LOOP
        val := 'regress-sec-value-tried';
        FOREACH how IN ARRAY ARRAY['role', 'role in db', 'all roles', 'database',
                                   'session', 'set_config'] LOOP
            stmt := CASE how
                WHEN 'role' THEN format('ALTER ROLE regress_sec_nobody SET %s = %L', g.name, val)
                WHEN 'role in db' THEN format('ALTER ROLE regress_sec_nobody IN DATABASE %I SET %s = %L',
                                             current_database(), g.name, val)
                WHEN 'all roles' THEN format('ALTER ROLE ALL SET %s = %L', g.name, val)
                WHEN 'database' THEN format('ALTER DATABASE %I SET %s = %L',
                                           current_database(), g.name, val)
                WHEN 'session' THEN format('SET %s = %L', g.name, val)
                ELSE format('SELECT set_config(%L, %L, false)', g.name, val) END;
            BEGIN
                EXECUTE stmt;
                INSERT INTO tried VALUES (g.name, how, 'ACCEPTED');
            EXCEPTION WHEN OTHERS THEN
                INSERT INTO tried VALUES (g.name, how, SQLSTATE);
            END;
        END LOOP;
    END LOOP;
END
$$;
SELECT name,
       max(outcome) FILTER (WHERE how = 'role') AS role,
       max(outcome) FILTER (WHERE how = 'role in db') AS role_in_db,
       max(outcome) FILTER (WHERE how = 'all roles') AS all_roles,
       max(outcome) FILTER (WHERE how = 'database') AS database,
       max(outcome) FILTER (WHERE how = 'session') AS session,
       max(outcome) FILTER (WHERE how = 'set_config') AS set_config
  FROM tried GROUP BY name ORDER BY name COLLATE "C";
-- The messages, once each.
ALTER ROLE regress_sec_nobody SET trace.webhook_auth_token = 'regress-sec-value-tried';
ALTER DATABASE postgres SET trace.delay = '1s';
ALTER ROLE ALL SET trace.database = 'x';
ALTER ROLE regress_sec_nobody SET trace.no_such_setting = 'x';
-- A role with no grant, for itself.
SET ROLE regress_sec_nobody;
ALTER ROLE regress_sec_nobody SET trace.webhook_auth_token = 'regress-sec-value-tried';
ALTER ROLE regress_sec_nobody SET trace.enabled_adapters = 'webhook';
ALTER SYSTEM SET trace.webhook_auth_token = 'regress-sec-value-tried';
RESET ROLE;
-- Nothing was stored; nobody was granted SET or ALTER SYSTEM on a trace
-- parameter.
SELECT count(*) AS stored_trace_settings
  FROM pg_db_role_setting s, unnest(s.setconfig) AS c WHERE c LIKE 'trace.%';
SELECT count(*) AS stored_tried_values
  FROM pg_db_role_setting s WHERE s.setconfig::text LIKE '%regress-sec-value%';
SELECT count(*) AS trace_parameter_acls FROM pg_parameter_acl WHERE parname LIKE 'trace.%';

-- Clean up.
ALTER SYSTEM RESET trace.myfxbook_webhook_token;
ALTER SYSTEM RESET trace.webhook_auth_token;
ALTER SYSTEM RESET trace.webhook_signing_secret;
ALTER SYSTEM RESET trace.s3_access_key_id;
ALTER SYSTEM RESET trace.s3_secret_access_key;
SELECT pg_reload_conf();
DROP VIEW secret_gucs;
DROP ROLE regress_sec_nobody, regress_sec_monitor;
