/*
 * metrics.c: the delivery counters, in shared memory, and their SQL.
 *
 * Per adapter: attempts delivered, failed by reason, the duration
 * histogram, and rows trace.reconcile() queued.  The workers count with
 * trace_metrics_count(); trace._counters() (behind the trace.metrics
 * view), trace._fail_counters() and trace._duration_histogram() (for
 * postgres_exporter) and trace.prometheus_metrics() (the Prometheus text
 * exposition format 0.0.4) read the same numbers; trace._count_reconciled()
 * is how trace.reconcile() adds to them.  Counters count attempts since the
 * server started; they are atomics, updated without locks on the send
 * path.  Without the preload there are none, and reading them is an error
 * (zeros would look like an idle system).  The pending gauge comes from
 * the queue.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "port/atomics.h"
#include "storage/shmem.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "src/trace_ext.h"

#define NUM_BUCKETS		11		/* finite buckets of the duration histogram */

/* Upper bounds (seconds) of the post duration histogram; +Inf is implied. */
static const double duration_buckets[NUM_BUCKETS] = {
	0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
};

/* One adapter's counters in shared memory. */
typedef struct Counters
{
	pg_atomic_uint64 pushed;
	pg_atomic_uint64 failed[TRACE_NUM_REASONS];
	pg_atomic_uint64 duration_count;
	pg_atomic_uint64 duration_sum_us;
	pg_atomic_uint64 buckets[NUM_BUCKETS];	/* not cumulative */
	pg_atomic_uint64 reconciled;
} Counters;

/* What the SQL functions report of one adapter. */
typedef struct CounterSnapshot
{
	uint64		pushed;
	uint64		failed;
	uint64		failed_by_reason[TRACE_NUM_REASONS];
	uint64		buckets[NUM_BUCKETS];	/* cumulative */
	uint64		count;
	double		sum;
	uint64		reconciled;
} CounterSnapshot;

static Counters *counters = NULL;	/* [TRACE_MAX_ADAPTERS] */

Size
trace_metrics_shmem_size(void)
{
	return mul_size(sizeof(Counters), TRACE_MAX_ADAPTERS);
}

void
trace_metrics_shmem_init(void)
{
	bool		found;

	counters = ShmemInitStruct("trace_ext counters", trace_metrics_shmem_size(), &found);
	if (found)
		return;
	for (int a = 0; a < TRACE_MAX_ADAPTERS; a++)
	{
		Counters   *c = &counters[a];

		pg_atomic_init_u64(&c->pushed, 0);
		for (int r = 0; r < TRACE_NUM_REASONS; r++)
			pg_atomic_init_u64(&c->failed[r], 0);
		pg_atomic_init_u64(&c->duration_count, 0);
		pg_atomic_init_u64(&c->duration_sum_us, 0);
		for (int b = 0; b < NUM_BUCKETS; b++)
			pg_atomic_init_u64(&c->buckets[b], 0);
		pg_atomic_init_u64(&c->reconciled, 0);
	}
}

/* Count one finished attempt (or configuration failure) of an item. */
void
trace_metrics_count(const TraceItem *item)
{
	Counters   *c;

	if (counters == NULL)
		return;
	c = &counters[item->adapter];

	if (item->out.delivered)
		pg_atomic_fetch_add_u64(&c->pushed, 1);
	else
		pg_atomic_fetch_add_u64(&c->failed[item->out.reason], 1);

	if (item->out.posted)
	{
		double		s = item->out.seconds;
		int			b;

		/* count first: a reader takes buckets, then the count */
		pg_atomic_fetch_add_u64(&c->duration_count, 1);
		pg_atomic_fetch_add_u64(&c->duration_sum_us, (uint64) (s * 1e6));
		for (b = 0; b < NUM_BUCKETS; b++)
			if (s <= duration_buckets[b])
				break;
		if (b < NUM_BUCKETS)
			pg_atomic_fetch_add_u64(&c->buckets[b], 1);
	}
}

/*
 * The counters are read by SQL functions; without the preload there are
 * none, and zeros would look like an idle system.
 */
static void
require_counters(void)
{
	if (counters == NULL)
		trace_error_not_preloaded("keep delivery metrics");
}

/*
 * The counters of one adapter.  Buckets are returned cumulative, read
 * before the count, so that every bucket is at most the count even while
 * a worker is adding to them.
 */
static void
snapshot(TraceAdapterId id, CounterSnapshot *m)
{
	Counters   *c = &counters[id];
	uint64		cumulative = 0;

	memset(m, 0, sizeof(CounterSnapshot));
	m->pushed = pg_atomic_read_u64(&c->pushed);
	m->reconciled = pg_atomic_read_u64(&c->reconciled);
	for (int r = 0; r < TRACE_NUM_REASONS; r++)
	{
		m->failed_by_reason[r] = pg_atomic_read_u64(&c->failed[r]);
		m->failed += m->failed_by_reason[r];
	}
	for (int b = 0; b < NUM_BUCKETS; b++)
	{
		cumulative += pg_atomic_read_u64(&c->buckets[b]);
		m->buckets[b] = cumulative;
	}
	pg_read_barrier();
	m->count = pg_atomic_read_u64(&c->duration_count);
	m->sum = pg_atomic_read_u64(&c->duration_sum_us) / 1e6;
	if (m->count < cumulative)
		m->count = cumulative;
}

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
	TraceAdapterId adapter;
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
	for (int i = 0; commit && counters != NULL && i < npending; i++)
		pg_atomic_fetch_add_u64(&counters[pending_counts[i].adapter].reconciled,
								pending_counts[i].n);
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
remember_count(TraceAdapterId adapter, uint64 n)
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
	TraceAdapterId id = trace_adapter_id(name);

	if (id < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown adapter \"%s\"", name),
				 errhint("The adapters are %s.", trace_adapter_list())));
	if (n > 0)
		remember_count(id, (uint64) n);
	PG_RETURN_VOID();
}

/* trace._counters(): one row per adapter kind. */
Datum
trace_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	require_counters();
	InitMaterializedSRF(fcinfo, 0);
	for (int kind = 0; kind < trace_num_adapters; kind++)
	{
		Datum		values[5];
		bool		nulls[5] = {false};
		CounterSnapshot	m;

		snapshot(kind, &m);
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

	require_counters();
	InitMaterializedSRF(fcinfo, 0);
	for (int kind = 0; kind < trace_num_adapters; kind++)
	{
		Datum		values[2];
		bool		nulls[2] = {false};
		CounterSnapshot	m;

		snapshot(kind, &m);
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

	require_counters();
	InitMaterializedSRF(fcinfo, 0);
	for (int kind = 0; kind < trace_num_adapters; kind++)
	{
		CounterSnapshot	m;

		snapshot(kind, &m);
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
	Datum		bounds[NUM_BUCKETS];

	require_counters();
	InitMaterializedSRF(fcinfo, 0);
	for (int b = 0; b < NUM_BUCKETS; b++)
		bounds[b] = Float8GetDatum(duration_buckets[b]);

	for (int kind = 0; kind < trace_num_adapters; kind++)
	{
		Datum		values[5];
		bool		nulls[5] = {false};
		Datum		counts[NUM_BUCKETS];
		CounterSnapshot	m;

		snapshot(kind, &m);
		for (int b = 0; b < NUM_BUCKETS; b++)
			counts[b] = Int64GetDatum((int64) m.buckets[b]);

		values[0] = CStringGetTextDatum(trace_adapter_name(kind));
		/* PostgreSQL 15's construct_array_builtin() knows no float8 */
		values[1] = PointerGetDatum(construct_array(bounds, NUM_BUCKETS, FLOAT8OID,
													sizeof(float8), FLOAT8PASSBYVAL,
													TYPALIGN_DOUBLE));
		values[2] = PointerGetDatum(construct_array_builtin(counts, NUM_BUCKETS, INT8OID));
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
	memset(pending, 0, sizeof(int64) * TRACE_MAX_ADAPTERS);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT adapter, count(*) FROM trace.trace_queue "
					" WHERE status IN ('pending', 'sending') GROUP BY adapter",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not count pending rows");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		char	   *adapter = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		TraceAdapterId kind = adapter ? trace_adapter_id(adapter) : -1;

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
	CounterSnapshot	m[TRACE_MAX_ADAPTERS];
	int64		pending[TRACE_MAX_ADAPTERS];

	require_counters();
	for (int a = 0; a < trace_num_adapters; a++)
		snapshot(a, &m[a]);
	read_pending(pending);

	initStringInfo(&buf);
	family(&buf, "trust_traces_pushed_total", "counter",
		   "Trades delivered to a tracker (2xx received, or written to the export), since server start.");
	for (int a = 0; a < trace_num_adapters; a++)
		appendStringInfo(&buf, "trust_traces_pushed_total{adapter=\"%s\"} " UINT64_FORMAT "\n",
						 trace_adapter_name(a), m[a].pushed);

	family(&buf, "trust_trace_fail_total", "counter",
		   "Failed delivery attempts by reason, since server start.");
	for (int a = 0; a < trace_num_adapters; a++)
		for (int r = 0; r < TRACE_NUM_REASONS; r++)
			appendStringInfo(&buf, "trust_trace_fail_total{adapter=\"%s\",reason=\"%s\"} " UINT64_FORMAT "\n",
							 trace_adapter_name(a), trace_reason_name(r),
							 m[a].failed_by_reason[r]);

	family(&buf, "trust_trace_reconciled_total", "counter",
		   "Closed trades that no trigger had queued, found and queued by trace.reconcile(), since server start.");
	for (int a = 0; a < trace_num_adapters; a++)
		appendStringInfo(&buf, "trust_trace_reconciled_total{adapter=\"%s\"} " UINT64_FORMAT "\n",
						 trace_adapter_name(a), m[a].reconciled);

	family(&buf, "trust_trace_queue_pending", "gauge",
		   "Queue rows pending or being sent.");
	for (int a = 0; a < trace_num_adapters; a++)
		appendStringInfo(&buf, "trust_trace_queue_pending{adapter=\"%s\"} " INT64_FORMAT "\n",
						 trace_adapter_name(a), pending[a]);

	family(&buf, "trust_trace_paused", "gauge",
		   "1 while trace.paused is on: the workers send nothing new.");
	appendStringInfo(&buf, "trust_trace_paused %d\n", trace_paused ? 1 : 0);

	family(&buf, "trust_trace_breaker_open", "gauge",
		   "1 while the tracker's circuit breaker is open (or half open, probing), else 0.");
	for (int a = 0; a < trace_num_adapters; a++)
		appendStringInfo(&buf, "trust_trace_breaker_open{adapter=\"%s\"} %d\n",
						 trace_adapter_name(a), trace_health_breaker_open(a) ? 1 : 0);

	family(&buf, "trust_trace_throttled_total", "counter",
		   "Times a worker held a tracker's due rows back for trace.max_requests_per_second, since server start.");
	for (int a = 0; a < trace_num_adapters; a++)
		appendStringInfo(&buf, "trust_trace_throttled_total{adapter=\"%s\"} " UINT64_FORMAT "\n",
						 trace_adapter_name(a), trace_health_throttled(a));

	family(&buf, "trust_trace_post_duration_seconds", "histogram",
		   "Duration of delivery attempts, in seconds.");
	for (int a = 0; a < trace_num_adapters; a++)
	{
		const char *name = trace_adapter_name(a);

		for (int b = 0; b < NUM_BUCKETS; b++)
			appendStringInfo(&buf,
							 "trust_trace_post_duration_seconds_bucket{adapter=\"%s\",le=\"%g\"} " UINT64_FORMAT "\n",
							 name, duration_buckets[b], m[a].buckets[b]);
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
