/*
 * metrics.c: SQL access to the delivery counters kept in shared memory.
 *
 * trace._counters() returns one row per adapter kind; trace.metrics joins
 * it with the pending count from the queue.  The counters count attempts
 * since the server started (zero without the preload).
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_counters);

Datum
trace_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);

	for (int kind = 0; kind < TRACE_NUM_ADAPTERS; kind++)
	{
		Datum		values[5];
		bool		nulls[5] = {false};
		uint64		pushed,
					failed,
					count;
		double		sum;

		trace_metrics_read(kind, &pushed, &failed, &count, &sum);
		values[0] = CStringGetTextDatum(trace_adapter_name(kind));
		values[1] = Int64GetDatum((int64) pushed);
		values[2] = Int64GetDatum((int64) failed);
		values[3] = Int64GetDatum((int64) count);
		values[4] = Float8GetDatum(sum);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
