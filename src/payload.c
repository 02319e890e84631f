/*
 * payload.c: the JSON that leaves the database.
 *
 * For each claimed row, the trade is read as it is now (fees are final at
 * send time) and only the columns of trace.payload_columns are rendered,
 * with PostgreSQL's own JSON rendering (row_to_json), in allowlist order.
 * It is an allowlist: a column that is not named never leaves, whatever
 * else the trades table holds.  One query per trades table per batch.
 *
 * The same query checks, in the claim transaction, that the row may still
 * be sent: the trade exists and is CLOSED, its user exists and opts in
 * (users.tracing_enabled), and, unless an operator queued the row with
 * explicit adapters, its signal exists and still lists the tracker.  A row
 * that fails is cancelled with the reason (a fixed text) instead.
 * Called inside the worker's claim transaction, connected to SPI;
 * trace._send_verdict() runs it for one queue row, for tests and operators.
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/varlena.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_send_verdict);

/*
 * Build "SELECT ... FROM table" rendering the allowlisted columns, or
 * return NULL after failing every item of the table when a column is
 * missing (a configuration error the operator must see).
 */
static char *
payload_query(Oid relid, const char **missing)
{
	char	   *copy = pstrdup(trace_payload_columns);
	List	   *columns;
	ListCell   *lc;
	StringInfoData sql;
	bool		first = true;
	const char *nsp;

	if (!SplitIdentifierString(copy, ',', &columns))
		elog(ERROR, "trace.payload_columns is not a list");

	initStringInfo(&sql);
	appendStringInfoString(&sql,
						   "SELECT t.trade_id::pg_catalog.int8, t.status::pg_catalog.text, "
						   "CASE WHEN u.user_id IS NULL THEN 'user no longer exists' "
						   "     WHEN u.tracing_enabled IS NOT TRUE THEN 'consent withdrawn' END, "
						   "s.signal_id IS NOT NULL, s.tracing_adapters::pg_catalog.text[], "
						   "(SELECT pg_catalog.row_to_json(r) FROM (SELECT ");
	foreach(lc, columns)
	{
		const char *col = lfirst(lc);

		if (get_attnum(relid, col) == InvalidAttrNumber)
		{
			*missing = col;
			return NULL;
		}
		appendStringInfo(&sql, "%st.%s", first ? "" : ", ", quote_identifier(col));
		first = false;
	}
	nsp = quote_identifier(get_namespace_name(get_rel_namespace(relid)));
	appendStringInfo(&sql,
					 ") r)::pg_catalog.text FROM %s.%s t "
					 "LEFT JOIN %s.users u ON u.user_id OPERATOR(pg_catalog.=) t.user_id "
					 "LEFT JOIN %s.signals s ON s.signal_id OPERATOR(pg_catalog.=) t.signal_id "
					 "WHERE t.trade_id OPERATOR(pg_catalog.=) ANY ($1)",
					 nsp, quote_identifier(get_rel_name(relid)), nsp, nsp);
	return sql.data;
}

static int
cmp_item_trade(const void *a, const void *b)
{
	const TraceItem *x = *(TraceItem *const *) a;
	const TraceItem *y = *(TraceItem *const *) b;

	return (x->trade_id > y->trade_id) - (x->trade_id < y->trade_id);
}

/* What the query said of one trade. */
typedef struct TradeState
{
	int64		trade_id;
	bool		closed;
	const char *user_veto;		/* why the user forbids it, or NULL */
	bool		signal_exists;
	Datum		adapters;		/* the signal's tracing_adapters, a text[] */
	bool		adapters_null;
	const char *json;
} TradeState;

/* Does the signal's tracing_adapters list this adapter? */
static bool
signal_lists(const TradeState *t, TraceAdapterId adapter)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	const char *name = trace_adapter_name(adapter);

	if (t->adapters_null)
		return false;
	deconstruct_array_builtin(DatumGetArrayTypeP(t->adapters), TEXTOID,
							  &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
	{
		if (nulls[i])
			continue;
		if (strcmp(TextDatumGetCString(elems[i]), name) == 0)
			return true;
	}
	return false;
}

/*
 * Why an item of this trade may not be sent now, or NULL if it may.  The
 * texts end in last_error: fixed words, never the trade's data.
 */
static const char *
send_veto(const TradeState *t, const TraceItem *item)
{
	if (!t->closed)
		return "trade no longer CLOSED";
	if (t->user_veto)
		return t->user_veto;
	if (item->by_operator)
		return NULL;			/* the operator chose the tracker */
	if (!t->signal_exists)
		return "signal no longer exists";
	if (!signal_lists(t, item->adapter))
		return "adapter removed from signal";
	return NULL;
}

/* Hand one trade's payload (or cancellation) to each of its items. */
static void
assign_row(TraceItem **sorted, int n, const TradeState *t, MemoryContext into)
{
	TraceItem	key;
	TraceItem  *keyp = &key;
	TraceItem **hit;

	key.trade_id = t->trade_id;
	hit = bsearch(&keyp, sorted, n, sizeof(TraceItem *), cmp_item_trade);
	if (hit == NULL)
		return;
	while (hit > sorted && hit[-1]->trade_id == t->trade_id)
		hit--;
	for (; hit < sorted + n && (*hit)->trade_id == t->trade_id; hit++)
	{
		const char *veto = send_veto(t, *hit);

		if (veto)
			(*hit)->cancelled = veto;
		else if (t->json != NULL)
			(*hit)->payload = MemoryContextStrdup(into, t->json);
	}
}

/*
 * The users and signals tables beside the trades table; without them no
 * consent can be checked, a configuration error the operator must see
 * (the rows are retried, never sent unchecked).
 */
static bool
beside_tables_exist(Oid relid, TraceItem **items, int n)
{
	Oid			nsp = get_rel_namespace(relid);
	const char *missing = NULL;

	if (!OidIsValid(get_relname_relid("users", nsp)))
		missing = "users";
	else if (!OidIsValid(get_relname_relid("signals", nsp)))
		missing = "signals";
	if (missing == NULL)
		return true;
	for (int i = 0; i < n; i++)
		trace_outcome_fail(&items[i]->out, TRACE_REASON_CONFIG,
						   "table %s has no table \"%s\" beside it: consent cannot be checked",
						   get_rel_name(relid), missing);
	return false;
}

/*
 * Saved plans of the payload queries, by their text (the trades table and
 * trace.payload_columns make it): parsing and planning the query at every
 * claim cost more than running it.  PostgreSQL's plan cache revalidates a
 * saved plan after DDL on what it reads; a changed allowlist is another
 * text, another plan.
 */
#define PAYLOAD_PLANS	4

typedef struct PayloadPlan
{
	char	   *sql;			/* in TopMemoryContext */
	SPIPlanPtr	plan;
} PayloadPlan;

static PayloadPlan payload_plans[PAYLOAD_PLANS];
static int	payload_plan_next = 0;

static SPIPlanPtr
payload_plan(const char *sql)
{
	Oid			argtypes[1] = {INT8ARRAYOID};
	PayloadPlan *slot;
	SPIPlanPtr	plan;

	for (int i = 0; i < PAYLOAD_PLANS; i++)
		if (payload_plans[i].sql != NULL && strcmp(payload_plans[i].sql, sql) == 0)
			return payload_plans[i].plan;
	plan = SPI_prepare(sql, 1, argtypes);
	if (plan == NULL || SPI_keepplan(plan) != 0)
		elog(ERROR, "could not prepare the payload query: %s",
			 SPI_result_code_string(SPI_result));
	slot = &payload_plans[payload_plan_next];
	payload_plan_next = (payload_plan_next + 1) % PAYLOAD_PLANS;
	if (slot->sql != NULL)
	{
		SPI_freeplan(slot->plan);
		pfree(slot->sql);
	}
	slot->sql = MemoryContextStrdup(TopMemoryContext, sql);
	slot->plan = plan;
	return plan;
}

/* Build the payloads of the items that read from one trades table. */
static void
build_for_table(Oid relid, TraceItem **sorted, int n, MemoryContext into)
{
	const char *missing = NULL;
	char	   *sql;
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum		values[1];

	if (get_rel_name(relid) == NULL)
		return;					/* table gone: every item is cancelled */
	if (!beside_tables_exist(relid, sorted, n))
		return;

	sql = payload_query(relid, &missing);
	if (sql == NULL)
	{
		for (int i = 0; i < n; i++)
			trace_outcome_fail(&sorted[i]->out, TRACE_REASON_CONFIG,
							   "trace.payload_columns names column \"%s\", which table %s does not have",
							   missing, get_rel_name(relid));
		return;
	}

	for (int i = 0; i < n; i++)
		ids[i] = Int64GetDatum(sorted[i]->trade_id);
	values[0] = PointerGetDatum(construct_array_builtin(ids, n, INT8OID));
	/*
	 * Not read-only: SPI then takes a fresh snapshot, at least as new as the
	 * claim's.  With the transaction's first snapshot, a trade whose close
	 * committed just before the claim could still read as OPEN and be
	 * cancelled by mistake.
	 */
	if (SPI_execute_plan(payload_plan(sql), values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read trades for their payload");

	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	row = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		TradeState	t;
		bool		isnull;
		char	   *status = SPI_getvalue(row, desc, 2);

		t.trade_id = DatumGetInt64(SPI_getbinval(row, desc, 1, &isnull));
		t.closed = status != NULL && strcmp(status, "CLOSED") == 0;
		t.user_veto = SPI_getvalue(row, desc, 3);
		t.signal_exists = DatumGetBool(SPI_getbinval(row, desc, 4, &isnull));
		t.adapters = SPI_getbinval(row, desc, 5, &t.adapters_null);
		t.json = SPI_getvalue(row, desc, 6);
		assign_row(sorted, n, &t, into);
	}
}

/*
 * Fill items[i].payload; items that may not be sent get the reason in
 * items[i].cancelled (items whose trade is gone: "trade no longer exists"),
 * unless a configuration error failed them.
 */
void
trace_payload_build(TraceItem *items, int n, MemoryContext into)
{
	int			done = 0;

	/* Items of the same table are processed together. */
	while (done < n)
	{
		Oid			relid = InvalidOid;
		int			m = 0;
		TraceItem **group = palloc(sizeof(TraceItem *) * n);

		for (int i = 0; i < n; i++)
		{
			if (items[i].payload || items[i].out.done || items[i].cancelled)
				continue;
			if (relid == InvalidOid)
				relid = items[i].trade_table;
			if (items[i].trade_table == relid)
				group[m++] = &items[i];
		}
		if (m == 0)
			break;
		qsort(group, m, sizeof(TraceItem *), cmp_item_trade);
		build_for_table(relid, group, m, into);
		for (int i = 0; i < m; i++)
			if (group[i]->payload == NULL && !group[i]->out.done &&
				group[i]->cancelled == NULL)
				group[i]->cancelled = "trade no longer exists";
		done += m;
	}
}

/*
 * trace._send_verdict(id): what the worker would do with this queue row if
 * it claimed it now: NULL when it would be sent, else why not (the
 * cancellation reason, or the configuration failure).  It runs the same
 * code as the worker's claim, so tests and operators see the real rule.
 */
Datum
trace_send_verdict(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);
	MemoryContext caller = CurrentMemoryContext;
	Oid			argtypes[1] = {INT8OID};
	Datum		values[1];
	TraceItem	item;
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	const char *verdict = NULL;

	memset(&item, 0, sizeof(item));
	values[0] = Int64GetDatum(id);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_with_args("SELECT q.trade_id, q.adapter, q.trade_table::pg_catalog.oid, "
							  "       q.by_operator "
							  "  FROM trace.trace_queue q WHERE q.id OPERATOR(pg_catalog.=) $1",
							  1, argtypes, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read queue row " INT64_FORMAT, id);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("trace._send_verdict: no queue row with id " INT64_FORMAT, id)));
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	item.id = id;
	item.trade_id = DatumGetInt64(SPI_getbinval(row, desc, 1, &isnull));
	item.adapter = trace_adapter_id(SPI_getvalue(row, desc, 2));
	item.trade_table = DatumGetObjectId(SPI_getbinval(row, desc, 3, &isnull));
	item.by_operator = DatumGetBool(SPI_getbinval(row, desc, 4, &isnull));
	item.out.retry_after = -1;

	trace_payload_build(&item, 1, caller);
	if (item.cancelled)
		verdict = item.cancelled;
	else if (item.out.done)
		verdict = item.out.error;
	if (verdict)
	{
		MemoryContext old = MemoryContextSwitchTo(caller);
		text	   *result = cstring_to_text(verdict);

		MemoryContextSwitchTo(old);
		SPI_finish();
		PG_RETURN_TEXT_P(result);
	}
	SPI_finish();
	PG_RETURN_NULL();
}
