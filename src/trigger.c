/*
 * trigger.c: putting closed trades on the queue.
 *
 * trace._on_trade_close() is the AFTER UPDATE and AFTER INSERT trigger that
 * trace.attach() installs (an INSERT covers a row written already CLOSED:
 * INSERT, COPY, the insert half of an upsert or MERGE, and an UPDATE that
 * moves the row to another partition, which PostgreSQL runs as DELETE +
 * INSERT); trace.enqueue() is the operator's backfill.  Both queue one
 * row per adapter for an opted-in user, with the effect of one prepared
 * INSERT ... ON CONFLICT (trade_id, adapter) DO UPDATE ... WHERE the row
 * was cancelled.  The common case, no row there yet, is done without that
 * statement, whose executor cost more than the rows themselves: the
 * consent is read from the indexes of users and signals (consent.c) and
 * the rows are inserted speculatively, as ON CONFLICT does
 * (queue_insert.c).  A key found taken, and any table those files cannot
 * read or write exactly as the statement would, go through the statement.
 * This runs inside the application's transaction: it does O(1) work,
 * never touches the network, copies no personal data, and asks for the
 * workers to be woken only when the transaction commits.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_on_trade_close);
PG_FUNCTION_INFO_V1(trace_enqueue);
PG_FUNCTION_INFO_V1(trace_enabled_adapters_fn);

/*
 * Prepared enqueue statements, one per trades table and key types.  A
 * handful at most, so a short array searched in order is enough.
 */
typedef struct EnqueuePlan
{
	Oid			relid;
	Oid			nspid;
	Oid			types[3];		/* trade_id, user_id, signal_id */
	bool		mark_operator;	/* sets trace_queue.by_operator */
	SPIPlanPtr	plan;
} EnqueuePlan;

/*
 * The search path the enqueue statement is prepared and run with:
 * pg_catalog alone, no temporary schema.  The trigger function is SECURITY
 * DEFINER but has no SET search_path clause: setting a GUC at every call
 * (and restoring it, which makes the application's next statement
 * recompute its own path) cost about 15 us per close, while pushing this
 * override costs next to nothing and pins name resolution just as firmly.
 * Tables are schema-qualified in the statement anyway.
 */
static OverrideSearchPath catalog_only = {NIL, true, false, 0};

static bool queue_has_by_operator(void);

#define MAX_PLANS 16
static EnqueuePlan plans[MAX_PLANS];
static int	nplans = 0;

/*
 * The statement that queues a trade.  mark_operator: the rows are the
 * operator's explicit choice (trace.enqueue with adapters), which the
 * worker's consent check at send time must know.  Queues from 1.3 on have
 * the by_operator column; a row re-armed by the other kind of enqueue
 * takes its value.  (A plan prepared before ALTER EXTENSION UPDATE added
 * the column leaves it alone until the session ends.)
 */
static SPIPlanPtr
prepare_enqueue(Oid relid, Oid nspid, const Oid *types, bool mark_operator)
{
	const char *nsp = quote_identifier(get_namespace_name(nspid));
	bool		by_operator = queue_has_by_operator();
	StringInfoData sql;
	Oid			argtypes[7];
	SPIPlanPtr	plan;

	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "INSERT INTO trace.trace_queue AS q (trade_id, adapter, trade_table, due_at%s) "
					 "SELECT $1, a.name, $4, $5%s "
					 "  FROM unnest($6) AS a(name) "
					 " WHERE EXISTS (SELECT 1 FROM %s.users u "
					 "                WHERE u.user_id = $2 AND u.tracing_enabled) "
					 "   AND (NOT $7 OR EXISTS (SELECT 1 FROM %s.signals s "
					 "                           WHERE s.signal_id = $3 "
					 "                             AND a.name = ANY (s.tracing_adapters))) "
					 "ON CONFLICT (trade_id, adapter) DO UPDATE "
					 "   SET status = 'pending', attempts = 0, due_at = EXCLUDED.due_at, "
					 "       lease_owner = NULL, last_error = NULL, last_http_status = NULL, "
					 "       delivered_at = NULL, created_at = now()%s "
					 " WHERE q.status = 'cancelled'",
					 by_operator ? ", by_operator" : "",
					 !by_operator ? "" : mark_operator ? ", true" : ", false",
					 nsp, nsp,
					 by_operator ? ", by_operator = EXCLUDED.by_operator" : "");

	argtypes[0] = types[0];
	argtypes[1] = types[1];
	argtypes[2] = types[2];
	argtypes[3] = REGCLASSOID;
	argtypes[4] = TIMESTAMPTZOID;
	argtypes[5] = TEXTARRAYOID;
	argtypes[6] = BOOLOID;

	/*
	 * A generic plan: it is the same for every trade, and planning it for
	 * each close (what the plan cache would otherwise choose, as custom
	 * plans look no costlier) would cost more than running it.
	 */
	plan = SPI_prepare_cursor(sql.data, 7, argtypes, CURSOR_OPT_GENERIC_PLAN);
	if (plan == NULL)
		elog(ERROR, "could not prepare the enqueue statement: %s",
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	pfree(sql.data);
	return plan;
}

static SPIPlanPtr
enqueue_plan(Oid relid, const Oid *types, bool mark_operator)
{
	Oid			nspid = get_rel_namespace(relid);

	for (int i = 0; i < nplans; i++)
	{
		EnqueuePlan *p = &plans[i];

		if (p->relid == relid && p->nspid == nspid &&
			p->mark_operator == mark_operator &&
			memcmp(p->types, types, sizeof(p->types)) == 0)
			return p->plan;
	}

	if (nplans == MAX_PLANS)
	{
		/* Many tables over time: forget the oldest plan. */
		SPI_freeplan(plans[0].plan);
		memmove(&plans[0], &plans[1], sizeof(EnqueuePlan) * (MAX_PLANS - 1));
		nplans--;
	}
	plans[nplans].relid = relid;
	plans[nplans].nspid = nspid;
	memcpy(plans[nplans].types, types, sizeof(plans[nplans].types));
	plans[nplans].mark_operator = mark_operator;
	plans[nplans].plan = prepare_enqueue(relid, nspid, types, mark_operator);
	return plans[nplans++].plan;
}

/* The adapters marked in `want`, each once, as a text[]; NULL if none. */
static ArrayType *
adapters_array(const bool *want)
{
	Datum		names[TRACE_MAX_ADAPTERS];
	int			n = 0;

	for (int kind = 0; kind < trace_num_adapters; kind++)
		if (want[kind])
			names[n++] = CStringGetTextDatum(trace_adapter_name(kind));
	if (n == 0)
		return NULL;
	return construct_array_builtin(names, n, TEXTOID);
}

/* The enabled adapters as a text[], or NULL when none is enabled. */
static ArrayType *
enabled_adapters_array(void)
{
	bool		want[TRACE_MAX_ADAPTERS];

	for (int kind = 0; kind < trace_num_adapters; kind++)
		want[kind] = trace_adapter_enabled(kind);
	return adapters_array(want);
}

/* trace._enabled_adapters(): trace.enabled_adapters as a text[], maybe empty. */
Datum
trace_enabled_adapters_fn(PG_FUNCTION_ARGS)
{
	ArrayType  *result = enabled_adapters_array();

	PG_RETURN_ARRAYTYPE_P(result ? result : construct_empty_array(TEXTOID));
}

/* Does this database's queue record who queued a row (1.3 on)? */
static bool
queue_has_by_operator(void)
{
	Oid			nsp = get_namespace_oid("trace", true);
	Oid			queue = OidIsValid(nsp) ? get_relname_relid("trace_queue", nsp) : InvalidOid;

	return OidIsValid(queue) && get_attnum(queue, "by_operator") != InvalidAttrNumber;
}

/*
 * The enqueue statement for the adapters marked in want, through SPI: for
 * a trade whose rows cannot be written directly (see enqueue_directly),
 * and for the keys found taken, whose ON CONFLICT waits for a concurrent
 * inserter and re-arms a cancelled row.  Returns the rows queued or
 * re-armed.
 */
static int
enqueue_by_statement(Oid trade_table, const Oid *types, Datum trade_id,
					 Datum user_id, Datum signal_id, bool signal_null,
					 const bool *want, bool mark_operator, TimestampTz due)
{
	ArrayType  *adapters = adapters_array(want);
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			rc;
	int			processed;

	if (adapters == NULL)
		return 0;
	values[0] = trade_id;
	values[1] = user_id;
	values[2] = signal_id;
	if (signal_null)
		nulls[2] = 'n';
	values[3] = ObjectIdGetDatum(trade_table);
	values[4] = TimestampTzGetDatum(due);
	values[5] = PointerGetDatum(adapters);
	values[6] = BoolGetDatum(!mark_operator);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/*
	 * Names in the statement resolve in pg_catalog only, whatever the
	 * caller's search_path (and never in pg_temp): see catalog_only.  The
	 * queue's statement trigger leaves the wake to the caller.
	 */
	PushOverrideSearchPath(&catalog_only);
	trace_enqueuing = true;
	PG_TRY();
	{
		rc = SPI_execute_plan(enqueue_plan(trade_table, types, mark_operator),
							  values, nulls, false, 0);
	}
	PG_FINALLY();
	{
		trace_enqueuing = false;
		PopOverrideSearchPath();
	}
	PG_END_TRY();
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "enqueue failed: %s", SPI_result_code_string(rc));
	processed = (int) SPI_processed;
	SPI_finish();
	return processed;
}

/* The trade id as the queue's bigint, if it is an integer; false if not. */
static bool
trade_id_int8(Datum trade_id, Oid type, int64 *result)
{
	switch (getBaseType(type))
	{
		case INT8OID:
			*result = DatumGetInt64(trade_id);
			return true;
		case INT4OID:
			*result = DatumGetInt32(trade_id);
			return true;
		case INT2OID:
			*result = DatumGetInt16(trade_id);
			return true;
		default:
			return false;
	}
}

/*
 * Insert the rows of the adapters wanted that the consent allows; the
 * rows inserted, or -1 (see trace_queue_insert).
 */
static int
insert_consented(TraceQueueRow *row, bool opted_in, const bool *want,
				 const bool *listed, bool *taken)
{
	bool		any = false;

	for (int kind = 0; kind < trace_num_adapters; kind++)
	{
		row->adapters[kind] = opted_in && want[kind] && listed[kind];
		taken[kind] = false;
		any |= row->adapters[kind];
	}
	return any ? trace_queue_insert(row, taken) : 0;
}

/*
 * What the enqueue statement does, without it: read the consent from the
 * indexes of users and signals (consent.c) and insert the rows
 * (queue_insert.c), under the snapshot and command counter the statement
 * would run with.  Returns the rows inserted, marking in taken[] the
 * adapters whose (trade_id, adapter) was there already; -1, having written
 * nothing, when the tables are not ones these files can read or write as
 * the statement would.
 */
static int
enqueue_directly(Oid trade_table, const Oid *types, Datum trade_id,
				 Datum user_id, Datum signal_id, bool signal_null,
				 const bool *want, bool mark_operator, TimestampTz due,
				 bool *taken)
{
	Oid			nspid = get_rel_namespace(trade_table);
	Oid			users_id = get_relname_relid("users", nspid);
	Oid			signals_id = mark_operator ? InvalidOid : get_relname_relid("signals", nspid);
	Relation	users;
	Relation	volatile signals = NULL;
	TraceQueueRow row;
	bool		listed[TRACE_MAX_ADAPTERS];
	int			consent;
	int			volatile inserted = -1;

	memset(&row, 0, sizeof(row));
	if (!trade_id_int8(trade_id, types[0], &row.trade_id) ||
		!OidIsValid(users_id) || (!mark_operator && !OidIsValid(signals_id)))
		return -1;
	row.trade_table = trade_table;
	row.due_at = due;
	row.by_operator = mark_operator;

	/*
	 * What SPI does before a statement that writes; and the statement's
	 * search path (a function the queue's defaults or CHECK call sees
	 * pg_catalog only, as under the statement).
	 */
	PushActiveSnapshot(GetTransactionSnapshot());
	CommandCounterIncrement();
	UpdateActiveSnapshotCommandId();
	PushOverrideSearchPath(&catalog_only);
	PG_TRY();
	{
		users = table_open(users_id, AccessShareLock);
		if (!mark_operator)
			signals = table_open(signals_id, AccessShareLock);
		consent = trace_consent_read(users, user_id, types[1], signals, signal_id,
									 types[2], signal_null, GetActiveSnapshot(), listed);
		if (consent >= 0)
			inserted = insert_consented(&row, consent > 0, want, listed, taken);
		if (signals != NULL)
			table_close(signals, NoLock);
		table_close(users, NoLock);
	}
	PG_FINALLY();
	{
		PopOverrideSearchPath();
	}
	PG_END_TRY();
	PopActiveSnapshot();
	return inserted;
}

/* want[]: the operator's adapters (see operator_adapters), or the enabled ones. */
static bool
wanted_adapters(const bool *explicit_want, bool *want)
{
	bool		any = false;

	for (int kind = 0; kind < trace_num_adapters; kind++)
	{
		want[kind] = explicit_want ? explicit_want[kind] : trace_adapter_enabled(kind);
		any |= want[kind];
	}
	return any;
}

/*
 * Queue one trade.  With explicit_want NULL the trigger's rule applies
 * (signal's adapters that are enabled); otherwise exactly the adapters it
 * marks (see operator_adapters; none marked queues nothing).
 * Either way the user must have opted in.  Returns the rows queued or
 * re-armed.
 *
 * The rows are written directly when they can be (enqueue_directly);
 * otherwise, and for a key already taken, by the enqueue statement.
 */
int
trace_enqueue_trade(Oid trade_table, Datum trade_id, Oid trade_id_type,
					Datum user_id, Oid user_id_type, bool user_null,
					Datum signal_id, Oid signal_id_type, bool signal_null,
					const bool *explicit_want)
{
	Oid			types[3] = {trade_id_type, user_id_type, signal_id_type};
	bool		mark_operator = explicit_want != NULL;
	bool		want[TRACE_MAX_ADAPTERS];
	bool		taken[TRACE_MAX_ADAPTERS];
	TimestampTz due;
	int			queued;

	if (!wanted_adapters(explicit_want, want) || user_null)
		return 0;

	/* due at now() + trace.delay, now() being the transaction's start */
	due = TimestampTzPlusMilliseconds(GetCurrentTransactionStartTimestamp(),
									  (int64) trace_delay_s * 1000);

	queued = enqueue_directly(trade_table, types, trade_id, user_id, signal_id,
							  signal_null, want, mark_operator, due, taken);
	if (queued < 0)
		queued = enqueue_by_statement(trade_table, types, trade_id, user_id,
									  signal_id, signal_null, want,
									  mark_operator, due);
	else
		queued += enqueue_by_statement(trade_table, types, trade_id, user_id,
									   signal_id, signal_null, taken,
									   mark_operator, due);

	if (queued > 0)
		trace_request_wake_at(due);
	return queued;
}

/* Read a column of the trades row by name; error if the table lacks it. */
static Datum
trade_column(Relation rel, HeapTuple tuple, const char *name, Oid *type,
			 bool *isnull)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			attnum = SPI_fnumber(desc, name);

	if (attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("table \"%s\" has no column \"%s\"",
						RelationGetRelationName(rel), name)));
	*type = SPI_gettypeid(desc, attnum);
	return SPI_getbinval(tuple, desc, attnum, isnull);
}

/*
 * Is the row's status 'CLOSED', as its text form?  A text or varchar
 * status is compared as it is stored (its text form, byte for byte),
 * any other type (an enum, a domain, char(n)) through its output function.
 */
static bool
status_is_closed(Relation rel, HeapTuple tuple)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			attnum = SPI_fnumber(desc, "status");
	Oid			type;
	Datum		value;
	bool		isnull;
	char	   *status;

	if (attnum <= 0)
		return false;
	value = heap_getattr(tuple, attnum, desc, &isnull);
	if (isnull)
		return false;
	type = TupleDescAttr(desc, attnum - 1)->atttypid;
	if (type == TEXTOID || type == VARCHAROID)
	{
		text	   *t = DatumGetTextPP(value);

		return VARSIZE_ANY_EXHDR(t) == strlen("CLOSED") &&
			memcmp(VARDATA_ANY(t), "CLOSED", strlen("CLOSED")) == 0;
	}
	status = SPI_getvalue(tuple, desc, attnum);
	return status != NULL && strcmp(status, "CLOSED") == 0;
}

/*
 * The table trace.attach() was called on.  For a partition whose trigger
 * was cloned from a partitioned table's, that is the ancestor holding the
 * original trigger: the queue refers to it, so that the worker finds the
 * trade (and users and signals beside it) whichever partition the row
 * lives in by then.
 */
static Oid
attached_table(Relation rel, const Trigger *trigger)
{
	List	   *ancestors;
	ListCell   *lc;

	if (!trigger->tgisclone || !rel->rd_rel->relispartition)
		return RelationGetRelid(rel);

	ancestors = get_partition_ancestors(RelationGetRelid(rel));
	foreach(lc, ancestors)
	{
		Relation	parent = relation_open(lfirst_oid(lc), AccessShareLock);
		TriggerDesc *desc = parent->trigdesc;
		bool		original = false;
		Oid			relid = RelationGetRelid(parent);

		for (int i = 0; desc != NULL && i < desc->numtriggers; i++)
			if (strcmp(desc->triggers[i].tgname, trigger->tgname) == 0)
				original = !desc->triggers[i].tgisclone;
		relation_close(parent, AccessShareLock);
		if (original)
			return relid;
	}
	return RelationGetRelid(rel);
}

/*
 * The trigger: AFTER INSERT or AFTER UPDATE, FOR EACH ROW; queues a trade
 * that is CLOSED now and was not before (an inserted row was nothing
 * before).
 */
Datum
trace_on_trade_close(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	HeapTuple	newtuple;
	Datum		trade_id,
				user_id,
				signal_id;
	Oid			trade_type,
				user_type,
				signal_type;
	bool		trade_null,
				user_null,
				signal_null;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!(TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ||
		  TRIGGER_FIRED_BY_INSERT(trigdata->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trace._on_trade_close() must be an AFTER INSERT or AFTER UPDATE FOR EACH ROW trigger"),
				 errhint("Use trace.attach() to install it.")));

	rel = trigdata->tg_relation;

	/*
	 * trace.attach()'s WHEN clauses let only rows whose status changed (an
	 * UPDATE) or is CLOSED (an INSERT) get here: the cheapest tests
	 * PostgreSQL can rebuild at every statement.  Whether an update changed
	 * it to CLOSED is decided here.
	 */
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		newtuple = trigdata->tg_newtuple;
		if (!status_is_closed(rel, newtuple) ||
			status_is_closed(rel, trigdata->tg_trigtuple))
			return PointerGetDatum(NULL);
	}
	else
	{
		newtuple = trigdata->tg_trigtuple;
		if (!status_is_closed(rel, newtuple))
			return PointerGetDatum(NULL);
	}

	trade_id = trade_column(rel, newtuple, "trade_id", &trade_type, &trade_null);
	user_id = trade_column(rel, newtuple, "user_id", &user_type, &user_null);
	signal_id = trade_column(rel, newtuple, "signal_id", &signal_type, &signal_null);
	if (trade_null)
		return PointerGetDatum(NULL);

	trace_enqueue_trade(attached_table(rel, trigdata->tg_trigger),
						trade_id, trade_type, user_id, user_type, user_null,
						signal_id, signal_type, signal_null, NULL);

	return PointerGetDatum(NULL);
}

/*
 * The operator's adapter list: known names only, no NULLs; each marked in
 * want[] (none if the list is empty).
 */
static void
operator_adapters(ArrayType *adapters, bool *want)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	deconstruct_array_builtin(adapters, TEXTOID, &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
	{
		char	   *name;
		int			kind;

		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("trace.enqueue: adapters must not contain NULL")));
		name = TextDatumGetCString(elems[i]);
		kind = trace_adapter_id(name);
		if (kind < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("trace.enqueue: unknown adapter \"%s\"", name),
					 errhint("The adapters are %s.", trace_adapter_list())));
		want[kind] = true;
	}
}

/*
 * Queue trade_id if the table holds it; -1 when it does not.
 */
static int
enqueue_from_table(Oid relid, int64 trade_id, const bool *want)
{
	char	   *sql;
	Oid			argtype = INT8OID;
	Datum		arg = Int64GetDatum(trade_id);
	HeapTuple	row;
	TupleDesc	desc;
	bool		tnull,
				unull,
				snull;
	Datum		t,
				u,
				s;

	sql = psprintf("SELECT trade_id, user_id, signal_id FROM %s WHERE trade_id = $1",
				   quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
											  get_rel_name(relid)));
	if (SPI_execute_with_args(sql, 1, &argtype, &arg, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read trade %lld", (long long) trade_id);
	if (SPI_processed == 0)
		return -1;

	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	t = SPI_getbinval(row, desc, 1, &tnull);
	u = SPI_getbinval(row, desc, 2, &unull);
	s = SPI_getbinval(row, desc, 3, &snull);
	return trace_enqueue_trade(relid, t, SPI_gettypeid(desc, 1),
							   u, SPI_gettypeid(desc, 2), unull,
							   s, SPI_gettypeid(desc, 3), snull,
							   want);
}

/*
 * trace.enqueue(trade_id, adapters): find the trade in the attached trades
 * tables and queue it.
 */
Datum
trace_enqueue(PG_FUNCTION_ARGS)
{
	int64		trade_id;
	bool		chosen[TRACE_MAX_ADAPTERS] = {false};
	bool	   *want = NULL;	/* NULL: the trigger's rule */
	uint64		ntables;
	Oid		   *relids;
	int			queued = -1;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("trace.enqueue: trade_id must not be NULL")));
	trade_id = PG_GETARG_INT64(0);
	if (!PG_ARGISNULL(1))
	{
		operator_adapters(PG_GETARG_ARRAYTYPE_P(1), chosen);
		want = chosen;
	}

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT t.tgrelid FROM pg_catalog.pg_trigger t "
					" WHERE t.tgname = 'trace_ext_enqueue' AND t.tgparentid = 0 "
					"   AND t.tgfoid = 'trace._on_trade_close()'::pg_catalog.regprocedure "
					" ORDER BY 1", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not list attached tables");
	ntables = SPI_processed;
	if (ntables == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("trace.enqueue: no trades table is attached"),
				 errhint("Call trace.attach() first.")));

	relids = palloc(sizeof(Oid) * ntables);
	for (uint64 i = 0; i < ntables; i++)
	{
		bool		isnull;

		relids[i] = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[i],
												   SPI_tuptable->tupdesc, 1,
												   &isnull));
	}

	for (uint64 i = 0; i < ntables && queued < 0; i++)
		queued = enqueue_from_table(relids[i], trade_id, want);
	SPI_finish();

	if (queued < 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("trace.enqueue: trade %lld not found in any attached trades table",
						(long long) trade_id)));
	PG_RETURN_INT32(queued);
}
