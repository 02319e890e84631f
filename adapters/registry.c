/*
 * registry.c: the list of trackers, indexed by adapter kind.
 */
#include "postgres.h"

#include "adapters/adapter.h"

static const TraceAdapter *const adapters[TRACE_NUM_ADAPTERS] = {
	[TRACE_ADAPTER_MYFXBOOK] = &trace_myfxbook_adapter,
	[TRACE_ADAPTER_WEBHOOK] = &trace_webhook_adapter,
	[TRACE_ADAPTER_FILE] = &trace_file_adapter,
};

const TraceAdapter *
trace_adapter(TraceAdapterKind kind)
{
	Assert(kind >= 0 && kind < TRACE_NUM_ADAPTERS);
	return adapters[kind];
}
