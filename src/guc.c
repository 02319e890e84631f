/*
 * guc.c: the trace.* configuration parameters.
 *
 * Every parameter of INTERFACE.md is defined here, with its unit, its range
 * and a check hook that rejects a bad value with a message naming the
 * parameter.  The secret parameters are defined by secrets.c.  Nothing
 * here touches the network or the catalogs.
 */
#include "postgres.h"

#include <ctype.h>
#include <limits.h>
#include <unistd.h>
#include <curl/curl.h>

#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/varlena.h"

#include "src/trace_ext.h"

char	   *trace_database = NULL;
int			trace_workers = 1;
int			trace_delay_s = 300;
int			trace_batch_size = 100;
int			trace_poll_interval_ms = 1000;
int			trace_max_retries = 5;
int			trace_backoff_base_ms = 5000;
int			trace_backoff_cap_s = 3600;
int			trace_ttl_s = 7 * 24 * 3600;
int			trace_reconcile_interval_s = 3600;
int			trace_http_timeout_ms = 10000;
char	   *trace_enabled_adapters = NULL;
char	   *trace_payload_columns = NULL;
char	   *trace_myfxbook_url = NULL;
char	   *trace_webhook_endpoint = NULL;
char	   *trace_webhook_auth_header = NULL;
char	   *trace_file_export_type = NULL;
char	   *trace_file_export_dir = NULL;
char	   *trace_s3_endpoint = NULL;
char	   *trace_s3_region = NULL;
char	   *trace_s3_bucket = NULL;
char	   *trace_s3_prefix = NULL;
char	   *trace_secrets_file = NULL;
char	   *trace_ca_file = NULL;

/* Parsed form of trace.enabled_adapters, set by its assign hook. */
static bool adapter_enabled[TRACE_NUM_ADAPTERS];

static const char *const adapter_names[TRACE_NUM_ADAPTERS] = {
	"myfxbook", "webhook", "file"
};

static const char *const reason_names[TRACE_NUM_REASONS] = {
	"timeout", "connect", "tls", "http_4xx", "http_5xx", "redirect",
	"config", "io", "other"
};

#define DEFAULT_PAYLOAD_COLUMNS \
	"trade_id,signal_id,instrument,side,volume,entry_price,exit_price," \
	"opened_at,closed_at,pnl,fees"

const char *
trace_adapter_name(TraceAdapterKind kind)
{
	return adapter_names[kind];
}

const char *
trace_reason_name(TraceReason reason)
{
	return reason_names[reason];
}

int
trace_adapter_from_name(const char *name)
{
	for (int i = 0; i < TRACE_NUM_ADAPTERS; i++)
		if (strcmp(name, adapter_names[i]) == 0)
			return i;
	return -1;
}

bool
trace_adapter_enabled(TraceAdapterKind kind)
{
	return adapter_enabled[kind];
}

/* Only http and https URLs are ever fetched. */
bool
trace_url_scheme_ok(const char *url)
{
	return pg_strncasecmp(url, "http://", 7) == 0 ||
		pg_strncasecmp(url, "https://", 8) == 0;
}

/*
 * Split a comma list into trimmed, lower-case-preserving items.  Returns
 * false (with a GUC error detail) for a malformed list.
 */
static bool
split_list(const char *value, const char *guc, List **items)
{
	char	   *copy = pstrdup(value);

	if (!SplitIdentifierString(copy, ',', items))
	{
		GUC_check_errdetail("%s must be a comma-separated list of names.", guc);
		return false;
	}
	return true;
}

static bool
check_enabled_adapters(char **newval, void **extra, GucSource source)
{
	List	   *items;
	ListCell   *lc;
	bool	   *parsed;

	if (!split_list(*newval, "trace.enabled_adapters", &items))
		return false;

	parsed = malloc(sizeof(bool) * TRACE_NUM_ADAPTERS);
	if (parsed == NULL)
		return false;
	memset(parsed, 0, sizeof(bool) * TRACE_NUM_ADAPTERS);

	foreach(lc, items)
	{
		const char *name = lfirst(lc);
		int			kind = trace_adapter_from_name(name);

		if (kind < 0)
		{
			GUC_check_errdetail("trace.enabled_adapters: unknown adapter \"%s\"; "
								"the adapters are myfxbook, webhook and file.",
								name);
			free(parsed);
			return false;
		}
		parsed[kind] = true;
	}
	*extra = parsed;
	return true;
}

static void
assign_enabled_adapters(const char *newval, void *extra)
{
	memcpy(adapter_enabled, extra, sizeof(bool) * TRACE_NUM_ADAPTERS);
}

static bool
check_payload_columns(char **newval, void **extra, GucSource source)
{
	List	   *items;
	ListCell   *lc;

	if (!split_list(*newval, "trace.payload_columns", &items))
		return false;
	if (items == NIL)
	{
		GUC_check_errdetail("trace.payload_columns must name at least one column.");
		return false;
	}
	foreach(lc, items)
	{
		const char *name = lfirst(lc);

		for (const char *p = name; *p; p++)
		{
			if (!(isalnum((unsigned char) *p) || *p == '_'))
			{
				GUC_check_errdetail("trace.payload_columns: \"%s\" is not a plain column name.",
									name);
				return false;
			}
		}
		/* A column named twice would be a duplicate key in every payload. */
		for (ListCell *prev = list_head(items); prev != lc; prev = lnext(items, prev))
		{
			if (strcmp(lfirst(prev), name) == 0)
			{
				GUC_check_errdetail("trace.payload_columns names \"%s\" twice.", name);
				return false;
			}
		}
	}
	return true;
}

/*
 * Parse the URL as libcurl will when sending, so that a malformed one (no
 * host, a bad port or IPv6 address) is refused now, naming the parameter,
 * rather than failing every delivery later.
 */
static bool
check_url_syntax(const char *url, const char *guc)
{
	CURLU	   *u = curl_url();
	CURLUcode	rc;
	char	   *host = NULL;
	char	   *user = NULL;
	bool		has_user = false;

	if (u == NULL)
	{
		GUC_check_errdetail("%s could not be parsed: out of memory.", guc);
		return false;
	}
	rc = curl_url_set(u, CURLUPART_URL, url, 0);
	if (rc == CURLUE_OK)
		rc = curl_url_get(u, CURLUPART_HOST, &host, 0);
	if (rc == CURLUE_OK && host[0] == '\0')
		rc = CURLUE_NO_HOST;
	if (rc == CURLUE_OK && curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK)
		has_user = true;
	curl_free(host);
	curl_free(user);
	curl_url_cleanup(u);
	if (has_user)
	{
		/* the value itself is visible in pg_settings and the reload log */
		GUC_check_errdetail("%s must not carry a user name or password; put credentials in the adapter's token or key parameters, or in trace.secrets_file.", guc);
		return false;
	}
	if (rc != CURLUE_OK)
	{
		GUC_check_errdetail("%s is not a valid URL: %s.", guc, curl_url_strerror(rc));
		return false;
	}
	return true;
}

/* An empty URL means "not configured"; anything else must be http(s). */
static bool
check_url(char **newval, const char *guc)
{
	const char *url = *newval;

	if (url == NULL || url[0] == '\0')
		return true;
	if (!trace_url_scheme_ok(url))
	{
		GUC_check_errdetail("%s must be an http:// or https:// URL.", guc);
		return false;
	}
	for (const char *p = url; *p; p++)
	{
		if ((unsigned char) *p <= ' ' || *p == 0x7f)
		{
			GUC_check_errdetail("%s must not contain spaces or control characters.", guc);
			return false;
		}
	}
	return check_url_syntax(url, guc);
}

static bool
check_myfxbook_url(char **newval, void **extra, GucSource source)
{
	return check_url(newval, "trace.myfxbook_webhook_url");
}

static bool
check_webhook_endpoint(char **newval, void **extra, GucSource source)
{
	return check_url(newval, "trace.webhook_endpoint");
}

static bool
check_s3_endpoint(char **newval, void **extra, GucSource source)
{
	return check_url(newval, "trace.s3_endpoint");
}

/*
 * Headers the token must not replace: libcurl would send the token in
 * place of the real Host or Content-Length (a broken or smuggled
 * request), and the others are the ones trace_ext itself sends.
 */
static const char *const reserved_headers[] = {
	"Host", "Content-Length", "Transfer-Encoding", "Content-Type",
	"Content-Encoding", "Connection", "Keep-Alive", "Upgrade", "TE", "Trailer",
	"Expect", "Idempotency-Key", "User-Agent", "webhook-id",
	"webhook-timestamp", "webhook-signature"
};

/* An HTTP header name is a non-empty RFC 9110 token, not a reserved one. */
static bool
check_auth_header(char **newval, void **extra, GucSource source)
{
	const char *name = *newval;

	if (name == NULL || name[0] == '\0')
	{
		GUC_check_errdetail("trace.webhook_auth_header must not be empty.");
		return false;
	}
	for (const char *p = name; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) || strchr("!#$%&'*+-.^_`|~", *p)))
		{
			GUC_check_errdetail("trace.webhook_auth_header must be an HTTP header name (letters, digits, '-').");
			return false;
		}
	}
	for (int i = 0; i < lengthof(reserved_headers); i++)
	{
		if (pg_strcasecmp(name, reserved_headers[i]) == 0)
		{
			GUC_check_errdetail("trace.webhook_auth_header cannot be \"%s\": that header is set by HTTP or by trace_ext.",
								name);
			return false;
		}
	}
	return true;
}

static bool
check_file_export_type(char **newval, void **extra, GucSource source)
{
	if (strcmp(*newval, "local") == 0 || strcmp(*newval, "s3") == 0)
		return true;
	GUC_check_errdetail("trace.file_export_type must be \"local\" or \"s3\".");
	return false;
}

static bool
check_absolute_path(char **newval, const char *guc)
{
	if (*newval == NULL || (*newval)[0] == '\0' || (*newval)[0] == '/')
		return true;
	GUC_check_errdetail("%s must be an absolute path.", guc);
	return false;
}

static bool
check_file_export_dir(char **newval, void **extra, GucSource source)
{
	return check_absolute_path(newval, "trace.file_export_dir");
}

/*
 * A CA bundle that cannot be read would fail every HTTPS delivery: refuse
 * it when set (it may still disappear later; that is a recorded failure).
 */
static bool
check_ca_file(char **newval, void **extra, GucSource source)
{
	if (!check_absolute_path(newval, "trace.ca_file"))
		return false;
	if ((*newval)[0] != '\0' && access(*newval, R_OK) != 0)
	{
		GUC_check_errdetail("trace.ca_file \"%s\" cannot be read: %m.", *newval);
		return false;
	}
	return true;
}

static bool
check_secrets_file(char **newval, void **extra, GucSource source)
{
	const char *why;

	if (!check_absolute_path(newval, "trace.secrets_file"))
		return false;
	if ((*newval)[0] == '\0' || trace_secrets_file_safe(*newval, &why))
		return true;
	GUC_check_errdetail("trace.secrets_file is refused: %s.", why);
	return false;
}

/*
 * The prefix is part of the request path: a "." or ".." segment would be
 * resolved away by libcurl, and the object written outside the bucket.
 */
static bool
check_s3_prefix(char **newval, void **extra, GucSource source)
{
	const char *p = *newval;

	if (p == NULL)
		return true;
	if (p[0] == '/')
	{
		GUC_check_errdetail("trace.s3_prefix must not start with \"/\".");
		return false;
	}
	while (*p)
	{
		size_t		seg = strcspn(p, "/");

		if ((seg == 1 && p[0] == '.') || (seg == 2 && p[0] == '.' && p[1] == '.'))
		{
			GUC_check_errdetail("trace.s3_prefix must not contain \".\" or \"..\" path segments.");
			return false;
		}
		p += seg;
		if (*p == '/')
			p++;
	}
	for (p = *newval; *p; p++)
	{
		if ((unsigned char) *p < ' ' || *p == 0x7f)
		{
			GUC_check_errdetail("trace.s3_prefix must not contain control characters.");
			return false;
		}
	}
	return true;
}

/*
 * The region ends up in libcurl's "aws:amz:<region>:s3" signer string, so
 * a ':' would change what is signed: letters, digits, '-' and '_' only.
 */
static bool
check_s3_region(char **newval, void **extra, GucSource source)
{
	const char *p = *newval;

	if (p == NULL || p[0] == '\0')
	{
		GUC_check_errdetail("trace.s3_region must not be empty.");
		return false;
	}
	for (; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) || *p == '-' || *p == '_'))
		{
			GUC_check_errdetail("trace.s3_region must be a region name (letters, digits, '-', '_').");
			return false;
		}
	}
	return true;
}

/*
 * A bucket is one path segment: S3's naming rules (letters, digits, '.',
 * '-', '_'; starting and ending with a letter or digit), so that it can
 * be neither "..", nor contain '/', '?' or '#'.
 */
static bool
check_s3_bucket(char **newval, void **extra, GucSource source)
{
	const char *b = *newval;
	size_t		len;

	if (b == NULL || b[0] == '\0')
		return true;
	len = strlen(b);
	for (const char *p = b; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) || *p == '.' || *p == '-' || *p == '_'))
		{
			GUC_check_errdetail("trace.s3_bucket must be a bucket name (letters, digits, '.', '-', '_').");
			return false;
		}
	}
	if (!isalnum((unsigned char) b[0]) || !isalnum((unsigned char) b[len - 1]))
	{
		GUC_check_errdetail("trace.s3_bucket must start and end with a letter or digit.");
		return false;
	}
	return true;
}

static void
define_string(const char *name, const char *desc, char **var, const char *boot,
			  GucContext context, int flags, GucStringCheckHook check,
			  GucStringAssignHook assign, GucShowHook show)
{
	DefineCustomStringVariable(name, desc, NULL, var, boot, context, flags,
							   check, assign, show);
}

static void
define_int(const char *name, const char *desc, int *var, int boot, int min,
		   int max, GucContext context, int flags)
{
	DefineCustomIntVariable(name, desc, NULL, var, boot, min, max, context,
							flags, NULL, NULL, NULL);
}

void
trace_define_gucs(void)
{
	/*
	 * PostgreSQL allows postmaster-context parameters only while preloading.
	 * Loaded later (no preload: no worker to configure), they are still
	 * defined, as reloadable, so that postgresql.conf entries are accepted.
	 */
	GucContext	postmaster = process_shared_preload_libraries_in_progress
		? PGC_POSTMASTER : PGC_SIGHUP;

	define_string("trace.database", "Database the trace_ext workers serve.",
				  &trace_database, "postgres", postmaster, 0,
				  NULL, NULL, NULL);
	define_int("trace.workers", "Number of trace_ext delivery workers.",
			   &trace_workers, 1, 0, TRACE_MAX_WORKERS, postmaster, 0);
	define_int("trace.delay", "Delay between a trade's close and its delivery (T+X).",
			   &trace_delay_s, 300, 0, 30 * 24 * 3600, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.batch_size", "Queue rows claimed per round, and the most requests in flight.",
			   &trace_batch_size, 100, 1, 10000, PGC_SIGHUP, 0);
	define_int("trace.poll_interval", "Longest time a worker sleeps between looks at the queue.",
			   &trace_poll_interval_ms, 1000, 10, 3600 * 1000, PGC_SIGHUP, GUC_UNIT_MS);
	define_int("trace.max_retries", "Retries after the first delivery attempt.",
			   &trace_max_retries, 5, 0, 100, PGC_SIGHUP, 0);
	define_int("trace.retry_backoff_base", "Wait before the first retry; retry n waits base*6^(n-1).",
			   &trace_backoff_base_ms, 5000, 1, 24 * 3600 * 1000, PGC_SIGHUP, GUC_UNIT_MS);
	define_int("trace.retry_backoff_cap", "Longest wait between retries.",
			   &trace_backoff_cap_s, 3600, 1, 7 * 24 * 3600, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.ttl", "Queue rows older than this are deleted, whatever their status.",
			   &trace_ttl_s, 7 * 24 * 3600, 1, INT_MAX, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.reconcile_interval",
			   "How often the worker sweeps for closed trades that no trigger queued (0: never).",
			   &trace_reconcile_interval_s, 3600, 0, INT_MAX, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.http_timeout", "Whole-request timeout of a delivery.",
			   &trace_http_timeout_ms, 10000, 100, 600 * 1000, PGC_SIGHUP, GUC_UNIT_MS);

	define_string("trace.enabled_adapters", "Adapters that trades are queued for (comma list).",
				  &trace_enabled_adapters, "", PGC_SIGHUP, GUC_LIST_INPUT,
				  check_enabled_adapters, assign_enabled_adapters, NULL);
	define_string("trace.payload_columns", "The trade columns that may leave the database (allowlist).",
				  &trace_payload_columns, DEFAULT_PAYLOAD_COLUMNS, PGC_SIGHUP,
				  GUC_LIST_INPUT, check_payload_columns, NULL, NULL);

	define_string("trace.myfxbook_webhook_url", "URL the myfxbook adapter posts to.",
				  &trace_myfxbook_url, "", PGC_SIGHUP, 0,
				  check_myfxbook_url, NULL, NULL);
	define_string("trace.webhook_endpoint", "URL the webhook adapter posts to.",
				  &trace_webhook_endpoint, "", PGC_SIGHUP, 0,
				  check_webhook_endpoint, NULL, NULL);
	define_string("trace.webhook_auth_header", "Header that carries the webhook token.",
				  &trace_webhook_auth_header, "Authorization", PGC_SIGHUP, 0,
				  check_auth_header, NULL, NULL);

	define_string("trace.file_export_type", "File export target: local or s3.",
				  &trace_file_export_type, "local", PGC_SIGHUP, 0,
				  check_file_export_type, NULL, NULL);
	define_string("trace.file_export_dir", "Directory of the local JSON Lines export.",
				  &trace_file_export_dir, "", PGC_SIGHUP, 0,
				  check_file_export_dir, NULL, NULL);
	define_string("trace.s3_endpoint", "S3-compatible endpoint (path-style).",
				  &trace_s3_endpoint, "https://s3.amazonaws.com", PGC_SIGHUP, 0,
				  check_s3_endpoint, NULL, NULL);
	define_string("trace.s3_region", "S3 region used in the signature.",
				  &trace_s3_region, "us-east-1", PGC_SIGHUP, 0,
				  check_s3_region, NULL, NULL);
	define_string("trace.s3_bucket", "S3 bucket of the export.",
				  &trace_s3_bucket, "", PGC_SIGHUP, 0, check_s3_bucket, NULL, NULL);
	define_string("trace.s3_prefix", "Key prefix of the S3 export.",
				  &trace_s3_prefix, "traces/", PGC_SIGHUP, 0,
				  check_s3_prefix, NULL, NULL);

	define_string("trace.secrets_file", "File of name = value lines for the secret parameters (mode 0600).",
				  &trace_secrets_file, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY,
				  check_secrets_file, NULL, NULL);
	define_string("trace.ca_file", "Extra CA bundle for HTTPS trackers.",
				  &trace_ca_file, "", PGC_SIGHUP, 0, check_ca_file, NULL, NULL);

	trace_define_secret_gucs();

	MarkGUCPrefixReserved("trace");
}
