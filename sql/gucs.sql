--
-- gucs: every trace.* parameter, its default, unit and context; units as a
-- user writes them; check hooks that reject bad values naming the parameter;
-- secrets shown as '' when unset.
--
-- Nothing here changes a setting: the suite may run on an existing server
-- (make installcheck TRACE_LIVE=1).  Nearly every parameter is reloadable
-- (sighup), so a session cannot SET it; the check hooks are exercised by
-- ALTER SYSTEM with values they must refuse (a refused ALTER SYSTEM writes
-- nothing, and the end of this file checks that nothing was written).
-- Units are read back from the server's own configuration: test/regress.conf
-- writes each duration's default in another unit.  Accepted values set with
-- ALTER SYSTEM are in hostile_gucs, secrets that are set in security.
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
               ('trace.breaker_threshold'), ('trace.max_requests_per_second'),
               ('trace.paused'),
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

-- Units: what a user writes in postgresql.conf.  test/regress.conf gives
-- each duration its default in another unit ('300s' for 5min, '168h' for
-- 7d, ...): the server read them, applied them without error, and the
-- values are the defaults.
SELECT name, setting AS written, applied, error FROM pg_file_settings
 WHERE name LIKE 'trace.%' ORDER BY name COLLATE "C";
SELECT s.name, s.setting, s.unit, s.setting = s.boot_val AS is_default
  FROM pg_settings s JOIN pg_file_settings f USING (name)
 WHERE s.name LIKE 'trace.%' AND f.applied
 ORDER BY s.name COLLATE "C";

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
ALTER SYSTEM SET trace.breaker_threshold = -1;
ALTER SYSTEM SET trace.max_requests_per_second = -1;
ALTER SYSTEM SET trace.paused = 'sometimes';
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

SET client_min_messages = warning;

-- Secrets: '' when unset.
SELECT name, setting FROM pg_settings
 WHERE name IN ('trace.myfxbook_webhook_token', 'trace.webhook_auth_token',
                'trace.webhook_signing_secret', 'trace.s3_access_key_id',
                'trace.s3_secret_access_key')
 ORDER BY name COLLATE "C";

-- Nothing above was written or changed: postgresql.auto.conf holds no
-- trace.* line, and every trace.* setting is its default.
SELECT count(*) AS trace_lines_in_auto_conf
  FROM regexp_split_to_table(pg_read_file('postgresql.auto.conf'), E'\n') AS l
 WHERE l ~ '^\s*trace\.';
SELECT name, setting FROM pg_settings
 WHERE name LIKE 'trace.%' AND setting IS DISTINCT FROM boot_val
 ORDER BY name COLLATE "C";
