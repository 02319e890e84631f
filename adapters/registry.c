/*
 * registry.c: the list of trackers.
 *
 * One line per adapter in ADAPTERS below; its position is its id (the
 * order of the metrics rows).  Everything that needs the adapters' names
 * reads them from here: the parameters' check hooks and hints, the
 * queue's CHECK rule, the trigger, the metrics, and SQL through
 * trace._adapters().
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "adapters/adapter.h"

#define ADAPTERS(X) \
	X(myfxbook) \
	X(webhook) \
	X(file) \
	/* a new tracker: one line X(name) above, for adapters/name.c */

#define DECLARE_ADAPTER(name) extern const TraceAdapter trace_##name##_adapter;
#define LIST_ADAPTER(name) &trace_##name##_adapter,

ADAPTERS(DECLARE_ADAPTER)

static const TraceAdapter *const adapters[] = {ADAPTERS(LIST_ADAPTER)};

StaticAssertDecl(lengthof(adapters) <= TRACE_MAX_ADAPTERS,
				 "raise TRACE_MAX_ADAPTERS");

const int	trace_num_adapters = lengthof(adapters);

const TraceAdapter *
trace_adapter(TraceAdapterId id)
{
	Assert(id >= 0 && id < trace_num_adapters);
	return adapters[id];
}

const char *
trace_adapter_name(TraceAdapterId id)
{
	return trace_adapter(id)->name;
}

/* The id of the adapter called name; -1 if there is none. */
TraceAdapterId
trace_adapter_id(const char *name)
{
	return trace_adapter_id_n(name, strlen(name));
}

/* The same for a name of len bytes, not terminated (a text value's). */
TraceAdapterId
trace_adapter_id_n(const char *name, size_t len)
{
	for (int id = 0; id < trace_num_adapters; id++)
		if (strlen(adapters[id]->name) == len &&
			memcmp(name, adapters[id]->name, len) == 0)
			return id;
	return -1;
}

/* "a, b and c": the adapters' names, for messages. */
const char *
trace_adapter_list(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int id = 0; id < trace_num_adapters; id++)
	{
		if (id > 0)
			appendStringInfoString(&buf, id == trace_num_adapters - 1 ? " and " : ", ");
		appendStringInfoString(&buf, adapters[id]->name);
	}
	return buf.data;
}

/* Let each adapter define its parameters. */
void
trace_define_adapter_gucs(void)
{
	for (int id = 0; id < trace_num_adapters; id++)
		if (adapters[id]->define_gucs)
			adapters[id]->define_gucs();
}

PG_FUNCTION_INFO_V1(trace_adapters_fn);

/* trace._adapters(): the adapters' names, in registry order. */
Datum
trace_adapters_fn(PG_FUNCTION_ARGS)
{
	Datum		names[TRACE_MAX_ADAPTERS];

	for (int id = 0; id < trace_num_adapters; id++)
		names[id] = CStringGetTextDatum(adapters[id]->name);
	PG_RETURN_ARRAYTYPE_P(construct_array_builtin(names, trace_num_adapters, TEXTOID));
}
