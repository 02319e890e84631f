/*
 * queue_check.c: the rule behind trace.trace_queue's CHECK constraint.
 *
 * A queue row names a known adapter and a known status.  The rule is one
 * C function rather than two "IN (...)" lists because PostgreSQL rebuilds
 * a table's CHECK expressions from their stored text at every statement
 * that inserts or updates rows: for the two lists that cost about a fifth
 * of the work a trade close does to queue its rows; a single call to this
 * function, a small part of that.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_queue_values_ok);

static const char *const queue_statuses[] = {
	"pending", "sending", "delivered", "abandoned", "cancelled"
};

/* Does the text equal the C string, byte for byte? */
static bool
text_is(text *t, const char *s)
{
	size_t		len = strlen(s);

	return VARSIZE_ANY_EXHDR(t) == len && memcmp(VARDATA_ANY(t), s, len) == 0;
}

static bool
adapter_known(text *adapter)
{
	for (int kind = 0; kind < trace_num_adapters; kind++)
		if (text_is(adapter, trace_adapter_name(kind)))
			return true;
	return false;
}

static bool
status_known(text *status)
{
	for (int i = 0; i < lengthof(queue_statuses); i++)
		if (text_is(status, queue_statuses[i]))
			return true;
	return false;
}

/* trace._queue_values_ok(adapter text, status text): strict, immutable. */
Datum
trace_queue_values_ok(PG_FUNCTION_ARGS)
{
	text	   *adapter = PG_GETARG_TEXT_PP(0);
	text	   *status = PG_GETARG_TEXT_PP(1);

	PG_RETURN_BOOL(adapter_known(adapter) && status_known(status));
}
