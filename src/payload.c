/*
 * payload.c: the JSON that leaves the database.
 *
 * For each claimed row, the trade is read as it is now (fees are final at
 * send time) and only the columns of trace.payload_columns are rendered,
 * with PostgreSQL's own JSON rendering (row_to_json), in allowlist order.
 * It is an allowlist: a column that is not named never leaves, whatever
 * else the trades table holds.  One query per trades table per batch.
 * Called inside the worker's claim transaction, connected to SPI.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/varlena.h"

#include "src/trace_ext.h"

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

	if (!SplitIdentifierString(copy, ',', &columns))
		elog(ERROR, "trace_ext: trace.payload_columns is not a list");

	initStringInfo(&sql);
	appendStringInfoString(&sql,
						   "SELECT t.trade_id::pg_catalog.int8, t.status::pg_catalog.text, "
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
	appendStringInfo(&sql,
					 ") r)::pg_catalog.text FROM %s t "
					 "WHERE t.trade_id OPERATOR(pg_catalog.=) ANY ($1)",
					 quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
												get_rel_name(relid)));
	return sql.data;
}

static int
cmp_item_trade(const void *a, const void *b)
{
	const TraceItem *x = *(TraceItem *const *) a;
	const TraceItem *y = *(TraceItem *const *) b;

	return (x->trade_id > y->trade_id) - (x->trade_id < y->trade_id);
}

/* Hand one trade's payload (or cancellation) to each of its items. */
static void
assign_row(TraceItem **sorted, int n, int64 trade_id, bool closed,
		   const char *json, MemoryContext into)
{
	TraceItem	key;
	TraceItem  *keyp = &key;
	TraceItem **hit;

	key.trade_id = trade_id;
	hit = bsearch(&keyp, sorted, n, sizeof(TraceItem *), cmp_item_trade);
	if (hit == NULL)
		return;
	while (hit > sorted && hit[-1]->trade_id == trade_id)
		hit--;
	for (; hit < sorted + n && (*hit)->trade_id == trade_id; hit++)
	{
		if (closed && json != NULL)
			(*hit)->payload = MemoryContextStrdup(into, json);
	}
}

/* Build the payloads of the items that read from one trades table. */
static void
build_for_table(Oid relid, TraceItem **sorted, int n, MemoryContext into)
{
	const char *missing = NULL;
	char	   *sql;
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Oid			argtypes[1] = {INT8ARRAYOID};
	Datum		values[1];

	if (get_rel_name(relid) == NULL)
		return;					/* table gone: every item is cancelled */

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
	values[0] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, true,
												TYPALIGN_DOUBLE));
	/*
	 * Not read-only: SPI then takes a fresh snapshot, at least as new as the
	 * claim's.  With the transaction's first snapshot, a trade whose close
	 * committed just before the claim could still read as OPEN and be
	 * cancelled by mistake.
	 */
	if (SPI_execute_with_args(sql, 1, argtypes, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "trace_ext: could not read trades for their payload");

	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	row = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int64		trade_id = DatumGetInt64(SPI_getbinval(row, desc, 1, &isnull));
		char	   *status = SPI_getvalue(row, desc, 2);
		char	   *json = SPI_getvalue(row, desc, 3);

		assign_row(sorted, n, trade_id,
				   status != NULL && strcmp(status, "CLOSED") == 0, json, into);
	}
}

/*
 * Fill items[i].payload; items left without one (trade gone or no longer
 * CLOSED) are marked cancelled, unless a configuration error failed them.
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
			if (group[i]->payload == NULL && !group[i]->out.done)
				group[i]->cancelled = true;
		done += m;
	}
}
