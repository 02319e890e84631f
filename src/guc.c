/*
 * guc.c: the core trace.* configuration parameters.
 *
 * The parameters of the queue, the worker and the payload are defined
 * here, with their units, ranges and check hooks that reject a bad value
 * with a message naming the parameter; each adapter defines its own
 * (in its own file in adapters/, through define_gucs), the secret ones through
 * secrets.c.  Nothing here touches the network or the catalogs.
 */
#include "postgres.h"

#include <ctype.h>
#include <limits.h>
#include <unistd.h>

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
bool		trace_paused = false;
char	   *trace_enabled_adapters = NULL;
char	   *trace_payload_columns = NULL;
char	   *trace_secrets_file = NULL;
char	   *trace_ca_file = NULL;

/* Parsed form of trace.enabled_adapters, set by its assign hook. */
static bool adapter_enabled[TRACE_MAX_ADAPTERS];

static const char *const reason_names[TRACE_NUM_REASONS] = {
	"timeout", "connect", "tls", "http_4xx", "http_5xx", "redirect",
	"config", "io", "other"
};

#define DEFAULT_PAYLOAD_COLUMNS \
	"trade_id,signal_id,instrument,side,volume,entry_price,exit_price," \
	"opened_at,closed_at,pnl,fees"

const char *
trace_reason_name(TraceReason reason)
{
	return reason_names[reason];
}

bool
trace_adapter_enabled(TraceAdapterId id)
{
	return adapter_enabled[id];
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

	parsed = malloc(sizeof(bool) * TRACE_MAX_ADAPTERS);
	if (parsed == NULL)
		return false;
	memset(parsed, 0, sizeof(bool) * TRACE_MAX_ADAPTERS);

	foreach(lc, items)
	{
		const char *name = lfirst(lc);
		TraceAdapterId id = trace_adapter_id(name);

		if (id < 0)
		{
			GUC_check_errdetail("trace.enabled_adapters: unknown adapter \"%s\"; "
								"the adapters are %s.",
								name, trace_adapter_list());
			free(parsed);
			return false;
		}
		parsed[id] = true;
	}
	*extra = parsed;
	return true;
}

static void
assign_enabled_adapters(const char *newval, void *extra)
{
	memcpy(adapter_enabled, extra, sizeof(bool) * TRACE_MAX_ADAPTERS);
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

/* An empty path means "not set"; anything else must be absolute. */
bool
trace_check_absolute_path(char **newval, const char *guc)
{
	if (*newval == NULL || (*newval)[0] == '\0' || (*newval)[0] == '/')
		return true;
	GUC_check_errdetail("%s must be an absolute path.", guc);
	return false;
}

/*
 * A CA bundle that cannot be read would fail every HTTPS delivery: refuse
 * it when set (it may still disappear later; that is a recorded failure).
 */
static bool
check_ca_file(char **newval, void **extra, GucSource source)
{
	if (!trace_check_absolute_path(newval, "trace.ca_file"))
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

	if (!trace_check_absolute_path(newval, "trace.secrets_file"))
		return false;
	if ((*newval)[0] == '\0' || trace_secrets_file_safe(*newval, &why))
		return true;
	GUC_check_errdetail("trace.secrets_file is refused: %s.", why);
	return false;
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

	define_string("trace.database", gettext_noop("Database the trace_ext workers serve."),
				  &trace_database, "postgres", postmaster, 0,
				  NULL, NULL, NULL);
	define_int("trace.workers", gettext_noop("Number of trace_ext delivery workers."),
			   &trace_workers, 1, 0, TRACE_MAX_WORKERS, postmaster, 0);
	define_int("trace.delay", gettext_noop("Delay between a trade's close and its delivery (T+X)."),
			   &trace_delay_s, 300, 0, 30 * 24 * 3600, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.batch_size", gettext_noop("Queue rows claimed per round, and the most requests in flight."),
			   &trace_batch_size, 100, 1, 10000, PGC_SIGHUP, 0);
	define_int("trace.poll_interval", gettext_noop("Longest time a worker sleeps between looks at the queue."),
			   &trace_poll_interval_ms, 1000, 10, 3600 * 1000, PGC_SIGHUP, GUC_UNIT_MS);
	define_int("trace.max_retries", gettext_noop("Retries after the first delivery attempt."),
			   &trace_max_retries, 5, 0, 100, PGC_SIGHUP, 0);
	define_int("trace.retry_backoff_base", gettext_noop("Wait before the first retry; retry n waits base*6^(n-1)."),
			   &trace_backoff_base_ms, 5000, 1, 24 * 3600 * 1000, PGC_SIGHUP, GUC_UNIT_MS);
	define_int("trace.retry_backoff_cap", gettext_noop("Longest wait between retries."),
			   &trace_backoff_cap_s, 3600, 1, 7 * 24 * 3600, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.ttl", gettext_noop("Queue rows older than this are deleted, whatever their status."),
			   &trace_ttl_s, 7 * 24 * 3600, 1, INT_MAX, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.reconcile_interval",
			   gettext_noop("How often the worker sweeps for closed trades that no trigger queued (0: never)."),
			   &trace_reconcile_interval_s, 3600, 0, INT_MAX, PGC_SIGHUP, GUC_UNIT_S);
	define_int("trace.breaker_threshold",
			   gettext_noop("Consecutive tracker-level failures that open a tracker's circuit breaker (0: never)."),
			   &trace_breaker_threshold, 5, 0, 1000000, PGC_SIGHUP, 0);
	define_int("trace.max_requests_per_second",
			   gettext_noop("Most requests per second to each tracker, across all workers (0: no limit)."),
			   &trace_max_requests_per_second, 0, 0, 1000000, PGC_SIGHUP, 0);
	define_int("trace.http_timeout", gettext_noop("Whole-request timeout of a delivery."),
			   &trace_http_timeout_ms, 10000, 100, 600 * 1000, PGC_SIGHUP, GUC_UNIT_MS);

	DefineCustomBoolVariable("trace.paused",
							 gettext_noop("Workers send nothing new while on: requests in flight finish and are recorded; rows wait."),
							 NULL, &trace_paused, false, PGC_SIGHUP, 0, NULL, NULL, NULL);

	define_string("trace.enabled_adapters", gettext_noop("Adapters that trades are queued for (comma list)."),
				  &trace_enabled_adapters, "", PGC_SIGHUP, GUC_LIST_INPUT,
				  check_enabled_adapters, assign_enabled_adapters, NULL);
	define_string("trace.payload_columns", gettext_noop("The trade columns that may leave the database (allowlist)."),
				  &trace_payload_columns, DEFAULT_PAYLOAD_COLUMNS, PGC_SIGHUP,
				  GUC_LIST_INPUT, check_payload_columns, NULL, NULL);

	define_string("trace.secrets_file", gettext_noop("File of name = value lines for the secret parameters (mode 0600)."),
				  &trace_secrets_file, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY,
				  check_secrets_file, NULL, NULL);
	define_string("trace.ca_file", gettext_noop("Extra CA bundle for HTTPS trackers."),
				  &trace_ca_file, "", PGC_SIGHUP, 0, check_ca_file, NULL, NULL);

	trace_define_adapter_gucs();

	MarkGUCPrefixReserved("trace");
}
