--
-- hostile_gucs: hostile values for every trace.* parameter where they apply
-- (negative, beyond the integer range, wrong units, empty, unknown or
-- duplicate names, URLs of other schemes, malformed URLs, header names
-- that would replace HTTP's own, S3 names that would leave the bucket).
-- Each is refused by ALTER SYSTEM (which runs the check hooks) with a
-- message naming the parameter, or shown to be accepted on purpose.
-- sql/gucs.sql covers the defaults and the first bad values of each kind;
-- this file extends that.  Nothing is left set: everything is reset at the
-- end, and postgresql.auto.conf is left as it was.
--
SET client_min_messages = error;
\set SHOW_CONTEXT never

-- Integers: negative.
ALTER SYSTEM SET trace.workers = -1;
ALTER SYSTEM SET trace.batch_size = -1;
ALTER SYSTEM SET trace.poll_interval = '-1ms';
ALTER SYSTEM SET trace.retry_backoff_base = '-1';
ALTER SYSTEM SET trace.retry_backoff_cap = '-1s';
ALTER SYSTEM SET trace.ttl = '-1';
ALTER SYSTEM SET trace.http_timeout = '-1s';

-- Integers: beyond the integer range, beyond the parameter's range.
ALTER SYSTEM SET trace.batch_size = 99999999999;
ALTER SYSTEM SET trace.max_retries = 2147483648;
ALTER SYSTEM SET trace.ttl = '9999999999999999999999';
ALTER SYSTEM SET trace.delay = '1e10';
ALTER SYSTEM SET trace.http_timeout = '100000000000ms';
ALTER SYSTEM SET trace.retry_backoff_base = '25h';
ALTER SYSTEM SET trace.retry_backoff_cap = '8d';
ALTER SYSTEM SET trace.delay = '31d';
ALTER SYSTEM SET trace.http_timeout = '11min';
ALTER SYSTEM SET trace.workers = 33;
ALTER SYSTEM SET trace.max_retries = 101;

-- Integers: units that are not time, no unit where none is allowed,
-- sub-unit values that round to an out-of-range zero, non-numbers.
ALTER SYSTEM SET trace.delay = '10 parsecs';
ALTER SYSTEM SET trace.http_timeout = '5 kB';
ALTER SYSTEM SET trace.poll_interval = '1 MB';
ALTER SYSTEM SET trace.batch_size = '10s';
ALTER SYSTEM SET trace.max_retries = '3 tries';
ALTER SYSTEM SET trace.http_timeout = '99us';
ALTER SYSTEM SET trace.poll_interval = '1us';
ALTER SYSTEM SET trace.delay = 'NaN';
ALTER SYSTEM SET trace.ttl = 'Infinity';
-- Accepted: PostgreSQL reads integers as C does, so hex is a number.
ALTER SYSTEM SET trace.batch_size = '0x10';
ALTER SYSTEM RESET trace.batch_size;

-- Integers: empty.
ALTER SYSTEM SET trace.delay = '';
ALTER SYSTEM SET trace.batch_size = '';
ALTER SYSTEM SET trace.http_timeout = '';

-- trace.enabled_adapters: unknown, misspelt, quoted (case kept), empty
-- items, other separators.
ALTER SYSTEM SET trace.enabled_adapters = 'webhooks';
ALTER SYSTEM SET trace.enabled_adapters = '"Webhook"';
ALTER SYSTEM SET trace.enabled_adapters = 'webhook,';
ALTER SYSTEM SET trace.enabled_adapters = ',';
ALTER SYSTEM SET trace.enabled_adapters = 'webhook,,file';
ALTER SYSTEM SET trace.enabled_adapters = 'webhook file';
ALTER SYSTEM SET trace.enabled_adapters = 'webhook;file';
ALTER SYSTEM SET trace.enabled_adapters = 's3';
ALTER SYSTEM SET trace.enabled_adapters = 'webhook,myfxbook,file,other';
-- Accepted: a name twice means the same set (as in search_path), unquoted
-- names are case-folded, and blanks alone mean none.
ALTER SYSTEM SET trace.enabled_adapters = 'webhook,webhook';
ALTER SYSTEM SET trace.enabled_adapters = 'WEBHOOK, MyFxBook';
ALTER SYSTEM SET trace.enabled_adapters = '  ';
ALTER SYSTEM RESET trace.enabled_adapters;

-- URLs of other schemes, in each of the three URL parameters.
SELECT format('ALTER SYSTEM SET %s = %L', g, u)
  FROM unnest(ARRAY['trace.webhook_endpoint', 'trace.myfxbook_webhook_url',
                    'trace.s3_endpoint']) AS g,
       unnest(ARRAY['file:///etc/passwd', 'gopher://127.0.0.1:70/1', 'dict://127.0.0.1:2628/d:x',
                    'ftp://example.com/x', 'ldap://127.0.0.1/dc=x', 'telnet://127.0.0.1:23',
                    'scp://127.0.0.1/etc/passwd', 'javascript:alert(1)',
                    'http:/example.com', 'https:example.com',
                    '//example.com/hook', ' https://example.com/hook']) AS u
 ORDER BY g, u \gexec

-- Malformed http(s) URLs: no host, a bad port, a bad IPv6 address,
-- control characters.
SELECT format('ALTER SYSTEM SET %s = %L', g, u)
  FROM unnest(ARRAY['trace.webhook_endpoint', 'trace.myfxbook_webhook_url',
                    'trace.s3_endpoint']) AS g,
       unnest(ARRAY['http://', 'http://:8080/hook',
                    'http://127.0.0.1:99999/hook', 'http://127.0.0.1:-1/hook',
                    'http://[::1/hook', 'http://[zz::1]/hook',
                    E'http://127.0.0.1/\x01', E'https://example.com/\x7f',
                    E'https://example.com/\ttab']) AS u
 ORDER BY g, u \gexec
-- Credentials in a URL would be visible in pg_settings and the reload log.
SELECT format('ALTER SYSTEM SET %s = %L', g, u)
  FROM unnest(ARRAY['trace.webhook_endpoint', 'trace.myfxbook_webhook_url',
                    'trace.s3_endpoint']) AS g,
       unnest(ARRAY['https://user:pass@example.com/hook', 'https://user@example.com/hook',
                    'http://:pass@127.0.0.1/hook']) AS u
 ORDER BY g, u \gexec
-- A line break is a control character too (no header injection).
ALTER SYSTEM SET trace.webhook_endpoint = E'https://example.com/hook\nX-Injected: 1';

-- Accepted: upper-case schemes, IPv6, a port, a query (libcurl reads
-- them exactly as written).
ALTER SYSTEM SET trace.webhook_endpoint = 'HTTPS://Example.COM/hook';
ALTER SYSTEM SET trace.webhook_endpoint = 'http://[::1]:8080/hook?x=1';
ALTER SYSTEM SET trace.myfxbook_webhook_url = 'https://127.0.0.1:65535/';
ALTER SYSTEM SET trace.s3_endpoint = 'http://localhost:9000';
ALTER SYSTEM RESET trace.webhook_endpoint;
ALTER SYSTEM RESET trace.myfxbook_webhook_url;
ALTER SYSTEM RESET trace.s3_endpoint;

-- trace.webhook_auth_header: line breaks, spaces, non-ASCII, and the
-- headers HTTP or trace_ext sets (the token would replace them).
ALTER SYSTEM SET trace.webhook_auth_header = E'X-Key\r\nX-Evil: 1';
ALTER SYSTEM SET trace.webhook_auth_header = 'X Key';
ALTER SYSTEM SET trace.webhook_auth_header = 'Ключ';
ALTER SYSTEM SET trace.webhook_auth_header = 'X-Key:';
SELECT format('ALTER SYSTEM SET trace.webhook_auth_header = %L', h)
  FROM unnest(ARRAY['Host', 'content-length', 'Transfer-Encoding', 'Content-Type',
                    'Connection', 'Expect', 'Idempotency-Key', 'User-Agent',
                    'webhook-signature']) AS h \gexec
ALTER SYSTEM SET trace.webhook_auth_header = 'X-Tracker-Key';
ALTER SYSTEM RESET trace.webhook_auth_header;

-- trace.payload_columns: a column twice (a duplicate JSON key), a wildcard,
-- an empty item, quoted names with spaces, a function call.
ALTER SYSTEM SET trace.payload_columns = 'trade_id,pnl,trade_id';
ALTER SYSTEM SET trace.payload_columns = 'trade_id,TRADE_ID';
ALTER SYSTEM SET trace.payload_columns = '*';
ALTER SYSTEM SET trace.payload_columns = 'trade_id,,pnl';
ALTER SYSTEM SET trace.payload_columns = '"trade id"';
ALTER SYSTEM SET trace.payload_columns = 'pg_sleep(10)';
ALTER SYSTEM SET trace.payload_columns = 'trade_id,';

-- trace.file_export_type and trace.file_export_dir.
ALTER SYSTEM SET trace.file_export_type = '';
ALTER SYSTEM SET trace.file_export_type = 'LOCAL';
ALTER SYSTEM SET trace.file_export_type = 's3 ';
ALTER SYSTEM SET trace.file_export_dir = '~/export';
ALTER SYSTEM SET trace.file_export_dir = '../export';

-- S3 names: the region goes into the signer's "aws:amz:<region>:s3", the
-- bucket and prefix into the path.
ALTER SYSTEM SET trace.s3_region = '';
ALTER SYSTEM SET trace.s3_region = 'us-east-1:evil';
ALTER SYSTEM SET trace.s3_region = 'us east 1';
ALTER SYSTEM SET trace.s3_bucket = '..';
ALTER SYSTEM SET trace.s3_bucket = 'a/b';
ALTER SYSTEM SET trace.s3_bucket = 'bucket?x=1';
ALTER SYSTEM SET trace.s3_bucket = '.hidden';
ALTER SYSTEM SET trace.s3_bucket = 'bucket-';
ALTER SYSTEM SET trace.s3_prefix = '../other-bucket/';
ALTER SYSTEM SET trace.s3_prefix = 'traces/./x/';
ALTER SYSTEM SET trace.s3_prefix = 'traces/..';
ALTER SYSTEM SET trace.s3_prefix = E'traces/\x01/';
-- Accepted: the names S3-compatible stores use.
ALTER SYSTEM SET trace.s3_region = 'eu-west-3';
ALTER SYSTEM SET trace.s3_region = 'auto';
ALTER SYSTEM SET trace.s3_bucket = 'track-records.v2';
ALTER SYSTEM SET trace.s3_bucket = 'Legacy_Bucket1';
ALTER SYSTEM SET trace.s3_prefix = '';
ALTER SYSTEM SET trace.s3_prefix = 'a b/..x/.hidden/';
ALTER SYSTEM RESET trace.s3_region;
ALTER SYSTEM RESET trace.s3_bucket;
ALTER SYSTEM RESET trace.s3_prefix;

-- Files: relative paths, a CA bundle that cannot be read, a secrets file
-- that is not a regular private file.
ALTER SYSTEM SET trace.ca_file = 'ca.pem';
ALTER SYSTEM SET trace.ca_file = '~/ca.pem';
ALTER SYSTEM SET trace.ca_file = '/nonexistent/ca.pem';
ALTER SYSTEM SET trace.secrets_file = 'secrets';
ALTER SYSTEM SET trace.secrets_file = '/nonexistent/trace_ext.secrets';
ALTER SYSTEM SET trace.secrets_file = '/etc/passwd';
ALTER SYSTEM SET trace.secrets_file = '/dev/null';
ALTER SYSTEM SET trace.secrets_file = '/tmp';

-- Nothing above was written: postgresql.auto.conf holds no trace.* line,
-- and the reloaded settings are the defaults.
SELECT count(*) AS trace_lines_in_auto_conf
  FROM regexp_split_to_table(pg_read_file('postgresql.auto.conf'), E'\n') AS l
 WHERE l LIKE 'trace.%';
SELECT pg_reload_conf();
\c
SELECT name, setting FROM pg_settings
 WHERE name LIKE 'trace.%' AND setting IS DISTINCT FROM boot_val
 ORDER BY name COLLATE "C";
