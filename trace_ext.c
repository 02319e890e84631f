/*
 * trace_ext.c: entry point of the trace_ext library.
 *
 * _PG_init defines the parameters and, when the library is preloaded,
 * requests shared memory, installs the log redaction hook and registers the
 * delivery workers.  Loaded on demand instead (no preload), the library
 * still serves the SQL surface: trades are queued, and nothing is sent.
 * The small SQL-callable helpers that belong to no other file live here.
 */
#include "postgres.h"

#include "access/xlog.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

PG_MODULE_MAGIC;

bool		trace_preloaded = false;

void		_PG_init(void);

void
_PG_init(void)
{
	trace_preloaded = process_shared_preload_libraries_in_progress;

	trace_define_gucs();

	/*
	 * pg_upgrade's servers (binary upgrade mode) must not deliver: the
	 * catalogs are being rebuilt under them.  The workers start with the
	 * upgraded cluster.
	 */
	if (!trace_preloaded || IsBinaryUpgrade)
		return;

	trace_shmem_install();
	trace_wake_install();
	trace_install_log_redaction();
	trace_register_workers();
}

/*
 * The shared state (counters, trackers' health, workers' slots) exists only
 * when the library is preloaded: reading it without is an error that says
 * so, rather than zeros that would look like an idle system.
 */
void
trace_error_not_preloaded(const char *to_do)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("trace_ext must be loaded via \"shared_preload_libraries\" to %s", to_do)));
}

PG_FUNCTION_INFO_V1(trace_preloaded_fn);
PG_FUNCTION_INFO_V1(trace_ttl);
PG_FUNCTION_INFO_V1(trace_system_identifier);

/* trace._preloaded(): is the library in shared_preload_libraries? */
Datum
trace_preloaded_fn(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(trace_preloaded);
}

/* trace._ttl(): trace.ttl as an interval, for trace.cleanup(). */
Datum
trace_ttl(PG_FUNCTION_ARGS)
{
	Interval   *result = palloc0(sizeof(Interval));

	result->time = (int64) trace_ttl_s * USECS_PER_SEC;
	PG_RETURN_INTERVAL_P(result);
}

/*
 * trace._system_identifier(): this cluster's system identifier, the bits
 * of the uint64 as a bigint (what trace.queue_origin stores).
 */
Datum
trace_system_identifier(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64((int64) GetSystemIdentifier());
}
