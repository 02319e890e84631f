/*
 * metrics.c: SQL access to the delivery counters kept in shared memory.
 *
 * trace._counters() (behind the trace.metrics view), trace._fail_counters()
 * (failures by reason, for postgres_exporter) and
 * trace.prometheus_metrics() (the Prometheus text exposition format 0.0.4)
 * read the same numbers; trace._count_reconciled() is how trace.reconcile()
 * adds to them.  Counters count attempts since the server started
 * (zero without the preload); the pending gauge comes from the queue.
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_counters);
PG_FUNCTION_INFO_V1(trace_fail_counters);
PG_FUNCTION_INFO_V1(trace_duration_histogram);
PG_FUNCTION_INFO_V1(trace_prometheus_metrics);
PG_FUNCTION_INFO_V1(trace_count_reconciled);
PG_FUNCTION_INFO_V1(trace_reconciled_counters);

/*
 * Rows trace.reconcile() queued in the current transaction: added to the
 * shared counters when it commits, forgotten if it aborts.  Each count
 * remembers the subtransaction it was made in, so that rolling back to a
 * savepoint forgets what was counted after it.
 */
typedef struct PendingCount
{
	SubTransactionId subid;
	TraceAdapterKind adapter;
	uint64		n;
} PendingCount;

static PendingCount *pending_counts = NULL;
static int	npending = 0;
static int	pending_size = 0;
static bool reconciled_callbacks = false;

static void
reconciled_at_end(XactEvent event, void *arg)
{
	bool		commit = (event == XACT_EVENT_COMMIT ||
						  event == XACT_EVENT_PARALLEL_COMMIT);

	if (!commit && event != XACT_EVENT_ABORT && event != XACT_EVENT_PARALLEL_ABORT)
		return;
	for (int i = 0; commit && i < npending; i++)
		trace_metrics_count_reconciled(pending_counts[i].adapter, pending_counts[i].n);
	npending = 0;
}

static void
reconciled_at_subabort(SubXactEvent event, SubTransactionId mySubid,
					   SubTransactionId parentSubid, void *arg)
{
	/* counts made in this subtransaction or in one it started */
	if (event == SUBXACT_EVENT_ABORT_SUB)
		while (npending > 0 && pending_counts[npending - 1].subid >= mySubid)
			npending--;
}

static void
remember_count(TraceAdapterKind adapter, uint64 n)
{
	if (!reconciled_callbacks)
	{
		RegisterXactCallback(reconciled_at_end, NULL);
		RegisterSubXactCallback(reconciled_at_subabort, NULL);
		reconciled_callbacks = true;
	}
	if (npending == pending_size)
	{
		pending_size = Max(8, pending_size * 2);
		pending_counts = pending_counts == NULL ?
			MemoryContextAlloc(TopMemoryContext, sizeof(PendingCount) * pending_size) :
			repalloc(pending_counts, sizeof(PendingCount) * pending_size);
	}
	pending_counts[npending].subid = GetCurrentSubTransactionId();
	pending_counts[npending].adapter = adapter;
	pending_counts[npending].n = n;
	npending++;
}

/*
 * trace._count_reconciled(adapter, n): trace.reconcile() counts the rows it
 * queued (trust_trace_reconciled_total), once its transaction commits.
 */
Datum
trace_count_reconciled(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	int64		n = PG_GETARG_INT64(1);
	int			kind = trace_adapter_from_name(name);

	if (kind < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("trace_ext: unknown adapter \"%s\"", name)));
	if (n > 0)
		remember_count(kind, (uint64) n);
	PG_RETURN_VOID();
}

/* trace._counters(): one row per adapter kind. */
Datum
trace_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (int kind = 0; kind < TRACE_NUM_ADAPTERS; kind++)
	{
		Datum		values[5];
		bool		nulls[5] = {false};
		TraceMetrics m;

		trace_metrics_snapshot(kind, &m);
		values[0] = CStringGetTextDatum(trace_adapter_name(kind));
		values[1] = Int64GetDatum((int64) m.pushed);
		values[2] = Int64GetDatum((int64) m.failed);
		values[3] = Int64GetDatum((int64) m.count);
		values[4] = Float8GetDatum(m.sum);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* trace._reconciled_counters(): rows trace.reconcile() queued, per adapter kind. */
Datum
trace_reconciled_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (int kind = 0; kind < TRACE_NUM_ADAPTERS; kind++)
	{
		Datum		values[2];
		bool		nulls[2] = {false};
		TraceMetrics m;

		trace_metrics_snapshot(kind, &m);
		values[0] = CStringGetTextDatum(trace_adapter_name(kind));
		values[1] = Int64GetDatum((int64) m.reconciled);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* trace._fail_counters(): one row per adapter kind and failure reason. */
Datum
trace_fail_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (int kind = 0; kind < TRACE_NUM_ADAPTERS; kind++)
	{
		TraceMetrics m;

		trace_metrics_snapshot(kind, &m);
		for (int r = 0; r < TRACE_NUM_REASONS; r++)
		{
			Datum		values[3];
			bool		nulls[3] = {false};

			values[0] = CStringGetTextDatum(trace_adapter_name(kind));
			values[1] = CStringGetTextDatum(trace_reason_name(r));
			values[2] = Int64GetDatum((int64) m.failed_by_reason[r]);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	return (Datum) 0;
}

/*
 * trace._duration_histogram(): per adapter kind, the finite bucket bounds
 * and their cumulative counts as arrays, the sum and the count (the +Inf
 * bucket): the shape postgres_exporter's HISTOGRAM columns want.
 */
Datum
trace_duration_histogram(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		bounds[TRACE_NUM_BUCKETS];

	InitMaterializedSRF(fcinfo, 0);
	for (int b = 0; b < TRACE_NUM_BUCKETS; b++)
		bounds[b] = Float8GetDatum(trace_duration_buckets[b]);

	for (int kind = 0; kind < TRACE_NUM_ADAPTERS; kind++)
	{
		Datum		values[5];
		bool		nulls[5] = {false};
		Datum		counts[TRACE_NUM_BUCKETS];
		TraceMetrics m;

		trace_metrics_snapshot(kind, &m);
		for (int b = 0; b < TRACE_NUM_BUCKETS; b++)
			counts[b] = Int64GetDatum((int64) m.buckets[b]);

		values[0] = CStringGetTextDatum(trace_adapter_name(kind));
		values[1] = PointerGetDatum(construct_array(bounds, TRACE_NUM_BUCKETS,
													FLOAT8OID, 8, FLOAT8PASSBYVAL,
													TYPALIGN_DOUBLE));
		values[2] = PointerGetDatum(construct_array(counts, TRACE_NUM_BUCKETS,
													INT8OID, 8, FLOAT8PASSBYVAL,
													TYPALIGN_DOUBLE));
		values[3] = Float8GetDatum(m.sum);
		values[4] = Int64GetDatum((int64) m.count);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* Rows pending or being sent, per adapter kind, from the queue. */
static void
read_pending(int64 *pending)
{
	memset(pending, 0, sizeof(int64) * TRACE_NUM_ADAPTERS);
	SPI_connect();
	if (SPI_execute("SELECT adapter, count(*) FROM trace.trace_queue "
					" WHERE status IN ('pending', 'sending') GROUP BY adapter",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "trace_ext: could not count pending rows");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		char	   *adapter = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		int			kind = adapter ? trace_adapter_from_name(adapter) : -1;

		if (kind >= 0)
			pending[kind] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
														SPI_tuptable->tupdesc, 2,
														&isnull));
	}
	SPI_finish();
}

static void
family(StringInfo buf, const char *name, const char *type, const char *help)
{
	appendStringInfo(buf, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* trace.prometheus_metrics(): the four families, every series present. */
Datum
trace_prometheus_metrics(PG_FUNCTION_ARGS)
{
	StringInfoData buf;
	TraceMetrics m[TRACE_NUM_ADAPTERS];
	int64		pending[TRACE_NUM_ADAPTERS];

	for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		trace_metrics_snapshot(a, &m[a]);
	read_pending(pending);

	initStringInfo(&buf);
	family(&buf, "trust_traces_pushed_total", "counter",
		   "Trades delivered to a tracker (2xx received, or written to the export), since server start.");
	for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		appendStringInfo(&buf, "trust_traces_pushed_total{adapter=\"%s\"} " UINT64_FORMAT "\n",
						 trace_adapter_name(a), m[a].pushed);

	family(&buf, "trust_trace_fail_total", "counter",
		   "Failed delivery attempts by reason, since server start.");
	for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		for (int r = 0; r < TRACE_NUM_REASONS; r++)
			appendStringInfo(&buf, "trust_trace_fail_total{adapter=\"%s\",reason=\"%s\"} " UINT64_FORMAT "\n",
							 trace_adapter_name(a), trace_reason_name(r),
							 m[a].failed_by_reason[r]);

	family(&buf, "trust_trace_reconciled_total", "counter",
		   "Closed trades that no trigger had queued, found and queued by trace.reconcile(), since server start.");
	for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		appendStringInfo(&buf, "trust_trace_reconciled_total{adapter=\"%s\"} " UINT64_FORMAT "\n",
						 trace_adapter_name(a), m[a].reconciled);

	family(&buf, "trust_trace_queue_pending", "gauge",
		   "Queue rows pending or being sent.");
	for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		appendStringInfo(&buf, "trust_trace_queue_pending{adapter=\"%s\"} " INT64_FORMAT "\n",
						 trace_adapter_name(a), pending[a]);

	family(&buf, "trust_trace_post_duration_seconds", "histogram",
		   "Duration of delivery attempts, in seconds.");
	for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
	{
		const char *name = trace_adapter_name(a);

		for (int b = 0; b < TRACE_NUM_BUCKETS; b++)
			appendStringInfo(&buf,
							 "trust_trace_post_duration_seconds_bucket{adapter=\"%s\",le=\"%g\"} " UINT64_FORMAT "\n",
							 name, trace_duration_buckets[b], m[a].buckets[b]);
		appendStringInfo(&buf,
						 "trust_trace_post_duration_seconds_bucket{adapter=\"%s\",le=\"+Inf\"} " UINT64_FORMAT "\n",
						 name, m[a].count);
		appendStringInfo(&buf, "trust_trace_post_duration_seconds_sum{adapter=\"%s\"} %.6f\n",
						 name, m[a].sum);
		appendStringInfo(&buf, "trust_trace_post_duration_seconds_count{adapter=\"%s\"} " UINT64_FORMAT "\n",
						 name, m[a].count);
	}

	PG_RETURN_TEXT_P(cstring_to_text(buf.data));
}
