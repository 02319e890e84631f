--
-- gucs: every trace.* parameter, its default, unit and context; units as a
-- user writes them; check hooks that reject bad values naming the parameter;
-- secrets shown as ******** (or '' when unset).
--
-- Nearly every parameter is reloadable (sighup), so a session cannot SET
-- it: values are changed with ALTER SYSTEM (which runs the check hooks) and
-- pg_reload_conf(), then a new connection (\c) sees the reloaded value.
-- Everything changed here is reset at the end.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never

-- All the parameters of README.md (Configuration) exist, and no others.
SELECT coalesce(i.name, s.name) AS name,
       CASE WHEN s.name IS NULL THEN 'missing' ELSE 'unexpected' END AS problem
  FROM (VALUES ('trace.database'), ('trace.workers'), ('trace.delay'),
               ('trace.batch_size'), ('trace.poll_interval'), ('trace.max_retries'),
               ('trace.retry_backoff_base'), ('trace.retry_backoff_cap'),
               ('trace.ttl'), ('trace.reconcile_interval'), ('trace.http_timeout'),
               ('trace.enabled_adapters'),
               ('trace.payload_columns'), ('trace.myfxbook_webhook_url'),
               ('trace.myfxbook_webhook_token'), ('trace.webhook_endpoint'),
               ('trace.webhook_auth_header'), ('trace.webhook_auth_token'),
               ('trace.webhook_signing_secret'), ('trace.file_export_type'),
               ('trace.file_export_dir'), ('trace.s3_endpoint'), ('trace.s3_region'),
               ('trace.s3_bucket'), ('trace.s3_prefix'), ('trace.s3_access_key_id'),
               ('trace.s3_secret_access_key'), ('trace.secrets_file'),
               ('trace.ca_file')) AS i(name)
  FULL JOIN pg_settings s ON s.name = i.name
 WHERE s.name IS NULL OR (i.name IS NULL AND s.name LIKE 'trace.%')
 ORDER BY coalesce(i.name, s.name) COLLATE "C";

-- Defaults, units and contexts (setting is in the unit shown).
SELECT name, setting, unit, vartype, context, min_val, max_val
  FROM pg_settings WHERE name LIKE 'trace.%'
 ORDER BY name COLLATE "C";

-- The defaults as SHOW writes them.
SHOW trace.database;
SHOW trace.workers;
SHOW trace.delay;
SHOW trace.batch_size;
SHOW trace.poll_interval;
SHOW trace.max_retries;
SHOW trace.retry_backoff_base;
SHOW trace.retry_backoff_cap;
SHOW trace.ttl;
SHOW trace.reconcile_interval;
SHOW trace.http_timeout;
SHOW trace.enabled_adapters;
SHOW trace.payload_columns;
SHOW trace.myfxbook_webhook_url;
SHOW trace.myfxbook_webhook_token;
SHOW trace.webhook_endpoint;
SHOW trace.webhook_auth_header;
SHOW trace.webhook_auth_token;
SHOW trace.webhook_signing_secret;
SHOW trace.file_export_type;
SHOW trace.file_export_dir;
SHOW trace.s3_endpoint;
SHOW trace.s3_region;
SHOW trace.s3_bucket;
SHOW trace.s3_prefix;
SHOW trace.s3_access_key_id;
SHOW trace.s3_secret_access_key;
SHOW trace.secrets_file;
SHOW trace.ca_file;

-- The prefix is reserved: a misspelt parameter is an error, not a
-- silently created placeholder.
SET trace.dealy = '30s';
ALTER SYSTEM SET trace.dealy = '30s';

-- Reloadable parameters cannot be changed in a session, and the
-- postmaster ones not even by ALTER SYSTEM until a restart.
SET trace.delay = '30s';
SET trace.database = 'other';

-- Units: what a user writes in postgresql.conf.
ALTER SYSTEM SET trace.delay = '30s';
ALTER SYSTEM SET trace.poll_interval = '100ms';
ALTER SYSTEM SET trace.ttl = '2d';
ALTER SYSTEM SET trace.retry_backoff_base = '1500ms';
ALTER SYSTEM SET trace.http_timeout = '2s';
ALTER SYSTEM SET trace.reconcile_interval = '15min';
SELECT pg_reload_conf();
\c
SHOW trace.delay;
SHOW trace.poll_interval;
SHOW trace.ttl;
SHOW trace.retry_backoff_base;
SHOW trace.http_timeout;
SHOW trace.reconcile_interval;
SELECT name, setting, unit FROM pg_settings
 WHERE name IN ('trace.delay', 'trace.poll_interval', 'trace.ttl',
                'trace.retry_backoff_base', 'trace.http_timeout',
                'trace.reconcile_interval')
 ORDER BY name COLLATE "C";

ALTER SYSTEM SET trace.delay = '0';
SELECT pg_reload_conf();
\c
SHOW trace.delay;
SELECT setting FROM pg_settings WHERE name = 'trace.delay';

ALTER SYSTEM SET trace.delay = '5min';
SELECT pg_reload_conf();
\c
SHOW trace.delay;
SELECT setting FROM pg_settings WHERE name = 'trace.delay';

-- Check hooks and ranges: each error names the parameter.
SET client_min_messages = error;
ALTER SYSTEM SET trace.batch_size = 0;
ALTER SYSTEM SET trace.batch_size = 10001;
ALTER SYSTEM SET trace.delay = '-5s';
ALTER SYSTEM SET trace.delay = 'soon';
ALTER SYSTEM SET trace.poll_interval = '0';
ALTER SYSTEM SET trace.max_retries = -1;
ALTER SYSTEM SET trace.reconcile_interval = '-1s';
ALTER SYSTEM SET trace.reconcile_interval = 'hourly';
ALTER SYSTEM SET trace.enabled_adapters = 'foo';
ALTER SYSTEM SET trace.enabled_adapters = 'webhook,foo';
ALTER SYSTEM SET trace.webhook_endpoint = 'file:///etc/passwd';
ALTER SYSTEM SET trace.webhook_endpoint = 'gopher://x';
ALTER SYSTEM SET trace.webhook_endpoint = 'ftp://example.com/hook';
ALTER SYSTEM SET trace.webhook_endpoint = 'https://example.com/a hook';
ALTER SYSTEM SET trace.myfxbook_webhook_url = 'file:///etc/passwd';
ALTER SYSTEM SET trace.s3_endpoint = 'gopher://s3.example.com';
ALTER SYSTEM SET trace.file_export_type = 'ftp';
ALTER SYSTEM SET trace.file_export_dir = 'relative/dir';
ALTER SYSTEM SET trace.payload_columns = 'trade_id,fees);DROP TABLE users;--';
ALTER SYSTEM SET trace.payload_columns = 'trade_id,pnl fees';
ALTER SYSTEM SET trace.payload_columns = '';
ALTER SYSTEM SET trace.webhook_auth_header = 'X-Auth: evil';
ALTER SYSTEM SET trace.webhook_auth_header = '';

-- Good values pass the same hooks.
ALTER SYSTEM SET trace.batch_size = 1;
ALTER SYSTEM SET trace.batch_size = 10000;
ALTER SYSTEM SET trace.enabled_adapters = 'myfxbook, webhook,file';
ALTER SYSTEM SET trace.enabled_adapters = '';
ALTER SYSTEM SET trace.webhook_endpoint = 'https://example.com/hook';
ALTER SYSTEM SET trace.webhook_endpoint = 'http://127.0.0.1:8080/hook';
ALTER SYSTEM SET trace.webhook_endpoint = '';
ALTER SYSTEM SET trace.file_export_type = 's3';
ALTER SYSTEM SET trace.payload_columns = 'trade_id,pnl';
ALTER SYSTEM SET trace.webhook_auth_header = 'X-Api-Key';
SELECT format('ALTER SYSTEM RESET %s', name) FROM pg_settings
 WHERE name LIKE 'trace.%' ORDER BY name COLLATE "C" \gexec
SELECT pg_reload_conf();
\c
SET client_min_messages = warning;

-- Secrets: '' when unset ...
SELECT name, setting FROM pg_settings
 WHERE name IN ('trace.myfxbook_webhook_token', 'trace.webhook_auth_token',
                'trace.webhook_signing_secret', 'trace.s3_access_key_id',
                'trace.s3_secret_access_key')
 ORDER BY name COLLATE "C";

-- ... and ******** when set, wherever a value can be read in SQL.
ALTER SYSTEM SET trace.myfxbook_webhook_token = 'regress-myfxbook-token';
ALTER SYSTEM SET trace.webhook_auth_token = 'regress-webhook-token';
ALTER SYSTEM SET trace.webhook_signing_secret = 'whsec_cmVncmVzcy1zaWduaW5nLXNlY3JldA==';
ALTER SYSTEM SET trace.s3_access_key_id = 'REGRESSACCESSKEYID';
ALTER SYSTEM SET trace.s3_secret_access_key = 'regress-s3-secret-access-key';
SELECT pg_reload_conf();
\c
SHOW trace.myfxbook_webhook_token;
SHOW trace.webhook_auth_token;
SHOW trace.webhook_signing_secret;
SHOW trace.s3_access_key_id;
SHOW trace.s3_secret_access_key;
SELECT current_setting('trace.webhook_auth_token') AS current_setting;
SELECT name, setting, reset_val, boot_val FROM pg_settings
 WHERE name IN ('trace.myfxbook_webhook_token', 'trace.webhook_auth_token',
                'trace.webhook_signing_secret', 'trace.s3_access_key_id',
                'trace.s3_secret_access_key')
 ORDER BY name COLLATE "C";
-- No SQL-visible setting anywhere holds a secret value.
SELECT count(*) AS leaked FROM pg_settings
 WHERE setting LIKE '%regress-%' OR reset_val LIKE '%regress-%'
    OR setting LIKE '%REGRESSACCESSKEYID%' OR reset_val LIKE '%REGRESSACCESSKEYID%'
    OR setting LIKE 'whsec_%' OR reset_val LIKE 'whsec_%';

SELECT format('ALTER SYSTEM RESET %s', name) FROM pg_settings
 WHERE name LIKE 'trace.%' ORDER BY name COLLATE "C" \gexec
SELECT pg_reload_conf();
\c
SHOW trace.webhook_auth_token;
SHOW trace.delay;
