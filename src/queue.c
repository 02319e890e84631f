/*
 * queue.c: the worker's SQL on trace.trace_queue, and nothing else.
 *
 * No transaction, snapshot or row lock is ever held while the worker
 * talks to the network: the claim runs in a transaction the worker opens
 * and commits around it (trace_queue_begin/commit: the payloads are built
 * in the same one), every other function here runs one short transaction
 * of its own.  Claiming locks due rows with FOR UPDATE SKIP LOCKED
 * (workers never wait on each other), skipping the rows other workers are
 * sending (their leases, lease.c): it writes no new row version.
 * Recording is the one write a delivery costs: one set-based UPDATE per
 * round that only touches rows nobody changed since the claim (attempts
 * and due_at as claimed), run again when it fails for a transient reason,
 * so that a serialization failure or a deadlock never drops outcomes
 * (their rows would be sent again).  Must only be called by a worker.
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "pgstat.h"
#include "utils/array.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr next_due_plan = NULL;
static SPIPlanPtr cancel_plan = NULL;
static SPIPlanPtr record_plan = NULL;
static SPIPlanPtr origin_plan = NULL;

/*
 * The claim statement depends on the extension's objects (by_operator is
 * new in 1.3, trace._leased() in 1.6; the library must work with the
 * objects of every older version until ALTER EXTENSION UPDATE has run).
 * Any change to the queue table or to a function makes the claim plans be
 * prepared again, reading the shape anew.
 */
static Oid	queue_relid = InvalidOid;
static bool queue_has_by_operator = false;
static bool queue_has_leased_fn = false;
static bool queue_has_origin = false;
static bool claim_plans_stale = false;
static bool queue_callback_registered = false;

/*
 * Start a short transaction of the worker, with SPI and a snapshot;
 * activity is what pg_stat_activity shows meanwhile.
 */
void
trace_queue_begin(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

/*
 * In the claim's and the record's transactions: plan with the queue's
 * indexes whatever its statistics say.  The statements are prepared once
 * and their generic plans kept; planned while the queue looked empty (new,
 * truncated, or not analyzed since a burst of closes began) they read the
 * whole table, and kept reading it at every claim while it grew to tens of
 * thousands of rows (a worker at 500 us per delivery in bench/steady_state.py,
 * which starts each run from an empty queue).  Local to the transaction:
 * the housekeeping functions keep the planner's own choice.
 */
void
trace_queue_use_indexes(void)
{
	(void) set_config_option("enable_seqscan", "off", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/* Commit it. */
void
trace_queue_commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

static SPIPlanPtr
keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "could not prepare a queue statement: %s",
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	return plan;
}

static ArrayType *
int4_array(const int *values, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int32GetDatum(values[i]);
	return construct_array_builtin(d, n, INT4OID);
}

static ArrayType *
text_array(const char *const *values, const bool *nulls, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
		d[i] = (nulls && nulls[i]) ? (Datum) 0 : CStringGetTextDatum(values[i]);
	return construct_md_array(d, (bool *) nulls, 1, dims, lbs, TEXTOID, -1,
							  false, TYPALIGN_INT);
}

/* The names of the adapters marked in skip, as a text[]. */
static ArrayType *
skipped_names(const bool *skip)
{
	const char *names[TRACE_MAX_ADAPTERS];
	int			n = 0;

	for (int a = 0; a < trace_num_adapters; a++)
		if (skip[a])
			names[n++] = trace_adapter_name(a);
	return text_array(names, NULL, n);
}

/* Is the extension installed in this database? */
bool
trace_extension_present(void)
{
	bool		present;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	present = OidIsValid(get_extension_oid("trace_ext", true));
	CommitTransactionCommand();
	return present;
}

/*
 * A worker that starts frees the leases of workers that are gone (a crash,
 * kill -9, immediate shutdown), instead of waiting for them to expire: in
 * shared memory (lease.c), and rows left in 'sending' by a version before
 * 1.6, whose claim wrote its lease into the row.
 */
void
trace_queue_release_orphans(void)
{
	int			pids[TRACE_MAX_WORKERS];
	int			n = trace_live_worker_pids(pids, TRACE_MAX_WORKERS);
	Oid			argtypes[1] = {INT4ARRAYOID};
	Datum		values[1];

	trace_lease_end_orphans();
	trace_queue_begin("trace_ext: releasing orphaned leases");
	values[0] = PointerGetDatum(int4_array(pids, n));
	if (SPI_execute_with_args("UPDATE trace.trace_queue SET due_at = now() "
							  " WHERE status = 'sending' AND due_at > now() "
							  "   AND (lease_owner IS NULL OR lease_owner <> ALL ($1))",
							  1, argtypes, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not release orphaned leases");
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("%llu rows left in sending by a stopped worker are due again",
						(unsigned long long) SPI_processed)));
	trace_queue_commit();
}

/*
 * The claim: due rows, oldest first, none another worker is sending (its
 * lease: leased_expr), locked with SKIP LOCKED (workers never wait on each
 * other).  A lock, not an update: the row is not rewritten; the lease is
 * taken in shared memory while the lock is held (lease.c).  attempts is
 * the attempt about to be made.  by_operator_expr is q.by_operator, or
 * false for a queue older than 1.3; leased_expr is trace._leased(q.id), or
 * for a queue older than 1.6 a comparison with the ids leased ($3).
 * (e2e 08_crash and bench/scale.py run this statement as written here.)
 */
#define CLAIM_SQL(by_operator_expr, leased_expr) \
	"SELECT q.id, q.trade_id, q.adapter, q.attempts + 1, " \
	"       q.created_at, q.trade_table::oid, " \
	by_operator_expr " AS by_operator, q.due_at " \
	"  FROM trace.trace_queue q " \
	" WHERE q.status IN ('pending', 'sending') AND q.due_at <= now() " \
	"   AND q.adapter <> ALL ($2) " \
	"   AND NOT " leased_expr " " \
	" ORDER BY q.due_at LIMIT $1 " \
	" FOR UPDATE OF q SKIP LOCKED"

#define LEASED_FN	"trace._leased(q.id)"
#define LEASED_IDS	"(q.id = ANY ($3))"

static void
queue_changed(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == queue_relid)
		claim_plans_stale = true;
}

/* A function was created, changed or dropped: trace._leased() may have. */
static void
functions_changed(Datum arg, int cacheid, uint32 hashvalue)
{
	claim_plans_stale = true;
}

/*
 * Read the queue's shape: its oid, whether it has by_operator, whether
 * trace._leased() exists, and whether trace.queue_origin does.
 */
static void
read_queue_shape(void)
{
	bool		isnull;
	HeapTuple	row;
	TupleDesc	desc;

	if (SPI_execute("SELECT 'trace.trace_queue'::pg_catalog.regclass::pg_catalog.oid, "
					"       EXISTS (SELECT 1 FROM pg_catalog.pg_attribute "
					"                WHERE attrelid = 'trace.trace_queue'::pg_catalog.regclass "
					"                  AND attname = 'by_operator' AND NOT attisdropped), "
					"       pg_catalog.to_regprocedure('trace._leased(bigint)') IS NOT NULL, "
					"       pg_catalog.to_regclass('trace.queue_origin') IS NOT NULL",
					true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the queue's columns");
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	queue_relid = DatumGetObjectId(SPI_getbinval(row, desc, 1, &isnull));
	queue_has_by_operator = DatumGetBool(SPI_getbinval(row, desc, 2, &isnull));
	queue_has_leased_fn = DatumGetBool(SPI_getbinval(row, desc, 3, &isnull));
	queue_has_origin = DatumGetBool(SPI_getbinval(row, desc, 4, &isnull));
}

static void
free_claim_plans(void)
{
	SPIPlanPtr *plans[] = {&claim_plan, &next_due_plan, &cancel_plan, &origin_plan};

	for (int i = 0; i < lengthof(plans); i++)
		if (*plans[i] != NULL)
		{
			SPI_freeplan(*plans[i]);
			*plans[i] = NULL;
		}
}

static void
prepare_claim_plans(void)
{
	Oid			claim_types[3] = {INT4OID, TEXTARRAYOID, INT8ARRAYOID};
	Oid			cancel_types[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Oid			next_due_types[2] = {TEXTARRAYOID, INT8ARRAYOID};
	Oid			origin_types[1] = {INT8OID};

	if (!queue_callback_registered)
	{
		CacheRegisterRelcacheCallback(queue_changed, (Datum) 0);
		CacheRegisterSyscacheCallback(PROCOID, functions_changed, (Datum) 0);
		queue_callback_registered = true;
	}
	if (claim_plans_stale)
	{
		free_claim_plans();
		claim_plans_stale = false;
	}
	if (claim_plan != NULL)
		return;
	read_queue_shape();
	if (queue_has_leased_fn)
		claim_plan = keep_plan(queue_has_by_operator ?
							   CLAIM_SQL("q.by_operator", LEASED_FN) :
							   CLAIM_SQL("false", LEASED_FN),
							   3, claim_types);
	else
		claim_plan = keep_plan(queue_has_by_operator ?
							   CLAIM_SQL("q.by_operator", LEASED_IDS) :
							   CLAIM_SQL("false", LEASED_IDS),
							   3, claim_types);
	/*
	 * The earliest row not being sent: an index scan in due_at order that
	 * stops at the first (min() with a volatile filter would aggregate).
	 */
	next_due_plan = keep_plan(queue_has_leased_fn ?
							  "SELECT q.due_at FROM trace.trace_queue q "
							  " WHERE q.status IN ('pending', 'sending') "
							  "   AND q.adapter <> ALL ($1) AND NOT " LEASED_FN
							  " ORDER BY q.due_at LIMIT 1" :
							  "SELECT q.due_at FROM trace.trace_queue q "
							  " WHERE q.status IN ('pending', 'sending') "
							  "   AND q.adapter <> ALL ($1) AND q.id <> ALL ($2) "
							  " ORDER BY q.due_at LIMIT 1",
							  2, next_due_types);
	/* the claim's lock is held: the row is as claimed */
	cancel_plan = keep_plan("UPDATE trace.trace_queue q "
							"   SET status = 'cancelled', "
							"       lease_owner = NULL, last_error = c.reason, "
							"       last_http_status = NULL, due_at = now() "
							"  FROM unnest($1, $2) AS c(id, reason) "
							" WHERE q.id = c.id AND q.status IN ('pending', 'sending')",
							2, cancel_types);
	if (queue_has_origin)
		origin_plan = keep_plan("SELECT system_identifier FROM trace.queue_origin "
								" WHERE system_identifier <> $1 LIMIT 1",
								1, origin_types);
}

/*
 * Was the queue filled on another cluster (a restored dump, a pg_upgrade)
 * and not adopted yet?  In the claim's transaction, once per pass, with a
 * statement prepared once.  *foreign: the other cluster's identifier, for
 * the message.  A queue older than 1.4 has no trace.queue_origin: never
 * held.
 */
bool
trace_queue_held(int64 *foreign)
{
	Datum		values[1] = {Int64GetDatum((int64) GetSystemIdentifier())};
	bool		isnull;

	prepare_claim_plans();
	if (!queue_has_origin)
		return false;
	if (SPI_execute_plan(origin_plan, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read trace.queue_origin");
	if (SPI_processed == 0)
		return false;
	*foreign = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
										   &isnull));
	return true;
}

/*
 * The ids being sent, for a queue whose SQL has no trace._leased(); an
 * empty array otherwise (the statements do not read it).
 */
static Datum
leased_ids_param(void)
{
	int64	   *ids;
	Datum	   *datums;
	int			n = 0;

	if (queue_has_leased_fn)
		return PointerGetDatum(construct_empty_array(INT8OID));
	ids = trace_lease_ids(&n);
	datums = palloc(sizeof(Datum) * Max(n, 1));
	for (int i = 0; i < n; i++)
		datums[i] = Int64GetDatum(ids[i]);
	return PointerGetDatum(construct_array_builtin(datums, n, INT8OID));
}

static void
read_claimed(TraceItem *items, int n)
{
	SPITupleTable *tt = SPI_tuptable;

	for (int i = 0; i < n; i++)
	{
		HeapTuple	row = tt->vals[i];
		TraceItem  *item = &items[i];
		bool		isnull;
		char	   *adapter;

		memset(item, 0, sizeof(TraceItem));
		item->id = DatumGetInt64(SPI_getbinval(row, tt->tupdesc, 1, &isnull));
		item->trade_id = DatumGetInt64(SPI_getbinval(row, tt->tupdesc, 2, &isnull));
		adapter = TextDatumGetCString(SPI_getbinval(row, tt->tupdesc, 3, &isnull));
		item->adapter = trace_adapter_id(adapter);
		item->attempts = DatumGetInt32(SPI_getbinval(row, tt->tupdesc, 4, &isnull));
		item->created_at = DatumGetTimestampTz(SPI_getbinval(row, tt->tupdesc, 5, &isnull));
		item->trade_table = DatumGetObjectId(SPI_getbinval(row, tt->tupdesc, 6, &isnull));
		item->by_operator = DatumGetBool(SPI_getbinval(row, tt->tupdesc, 7, &isnull));
		item->claimed_due = DatumGetTimestampTz(SPI_getbinval(row, tt->tupdesc, 8, &isnull));
		item->out.retry_after = -1;
	}
}

/*
 * Cancel the claimed items the payload builder turned down, each with its
 * reason, in the claim's transaction.
 */
void
trace_queue_cancel(TraceItem *items, int n)
{
	Datum	   *ids = palloc(sizeof(Datum) * Max(n, 1));
	const char **reasons = palloc(sizeof(char *) * Max(n, 1));
	int			ncancel = 0;
	Datum		values[2];

	for (int i = 0; i < n; i++)
		if (items[i].cancelled)
		{
			ids[ncancel] = Int64GetDatum(items[i].id);
			reasons[ncancel++] = items[i].cancelled;
		}
	if (ncancel == 0)
		return;
	values[0] = PointerGetDatum(construct_array_builtin(ids, ncancel, INT8OID));
	values[1] = PointerGetDatum(text_array(reasons, NULL, ncancel));
	if (SPI_execute_plan(cancel_plan, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not cancel rows");
}

/*
 * Claim up to max_rows due rows, none of an adapter marked in skip, in the
 * transaction trace_queue_begin() opened.  *items is allocated in cxt.
 */
int
trace_queue_claim(int max_rows, const bool *skip, MemoryContext cxt,
				  TraceItem **items)
{
	Datum		values[3];
	int			n;

	prepare_claim_plans();
	values[0] = Int32GetDatum(max_rows);
	values[1] = PointerGetDatum(skipped_names(skip));
	values[2] = leased_ids_param();
	if (SPI_execute_plan(claim_plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not claim due rows");
	n = (int) SPI_processed;

	*items = MemoryContextAllocZero(cxt, sizeof(TraceItem) * Max(n, 1));
	read_claimed(*items, n);
	return n;
}

/*
 * The earliest due_at of the rows left to send (DT_NOEND if none), but
 * for adapters marked in skip, in the claim's transaction.
 */
TimestampTz
trace_queue_next_due(const bool *skip)
{
	bool		isnull;
	Datum		d;
	Datum		values[2];

	values[0] = PointerGetDatum(skipped_names(skip));
	values[1] = leased_ids_param();
	if (SPI_execute_plan(next_due_plan, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the next due time");
	if (SPI_processed == 0)
		return DT_NOEND;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? DT_NOEND : DatumGetTimestampTz(d);
}

static void
prepare_record_plan(void)
{
	Oid			types[8] = {INT8ARRAYOID, INT4ARRAYOID, TEXTARRAYOID,
		INT4ARRAYOID, TEXTARRAYOID, FLOAT8ARRAYOID, BOOLARRAYOID,
	TIMESTAMPTZARRAYOID};

	if (record_plan != NULL)
		return;
	record_plan = keep_plan(
							"WITH r AS ("
							"  SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8) "
							"         AS r(id, attempts, status, http, err, delay, held, due)), "
							"upd AS ("
							"  UPDATE trace.trace_queue q "
							"     SET status = r.status, "
							"         attempts = CASE WHEN r.held THEN q.attempts "
							"                         ELSE r.attempts END, "
							"         due_at = CASE WHEN r.status = 'pending' "
							"                       THEN now() + make_interval(secs => r.delay) "
							"                       ELSE now() END, "
							"         delivered_at = CASE WHEN r.status = 'delivered' "
							"                             THEN now() END, "
							"         last_http_status = r.http, "
							"         last_error = CASE WHEN r.status = 'delivered' "
							"                           THEN q.last_error ELSE r.err END, "
							"         lease_owner = NULL "
							"    FROM r "
							"   WHERE q.id = r.id AND q.status IN ('pending', 'sending') "
							"     AND q.attempts = r.attempts - 1 AND q.due_at = r.due "
							"  RETURNING q.id, q.trade_id, q.adapter, q.attempts, "
							"            q.status, q.last_error) "
							"SELECT u.trade_id, u.adapter, u.attempts, u.last_error, "
							"       pg_notify('trace_alert', json_build_object("
							"           'id', u.id, 'trade_id', u.trade_id, "
							"           'adapter', u.adapter, 'attempts', u.attempts, "
							"           'last_error', u.last_error)::text) "
							"  FROM upd u WHERE u.status = 'abandoned'",
							8, types);
}

/* The abandoned rows of the record statement just run, copied into cxt. */
static List *
read_abandoned(MemoryContext cxt)
{
	SPITupleTable *tt = SPI_tuptable;
	MemoryContext old = MemoryContextSwitchTo(cxt);
	List	   *rows = NIL;

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		TraceAbandoned *row = palloc(sizeof(TraceAbandoned));

		row->trade = SPI_getvalue(tt->vals[i], tt->tupdesc, 1);
		row->adapter = SPI_getvalue(tt->vals[i], tt->tupdesc, 2);
		row->attempts = SPI_getvalue(tt->vals[i], tt->tupdesc, 3);
		row->error = SPI_getvalue(tt->vals[i], tt->tupdesc, 4);
		rows = lappend(rows, row);
	}
	MemoryContextSwitchTo(old);
	return rows;
}

/*
 * How many times a record transaction is tried when it fails for a
 * transient reason, and the pause before the next try (times the tries
 * made), so that the transaction in the way can finish.
 */
#define RECORD_TRIES		5
#define RECORD_RETRY_MS		20

/*
 * Errors after which the same record transaction, run again, may well
 * succeed: a serialization failure or a deadlock (the other transaction
 * went on), a lock not available.  Any other error is not retried: the
 * pass fails, and the rows are sent again when their lease ends.
 */
static bool
transient_error(int sqlerrcode)
{
	switch (sqlerrcode)
	{
		case ERRCODE_TRANSACTION_ROLLBACK:
		case ERRCODE_T_R_SERIALIZATION_FAILURE:
		case ERRCODE_T_R_DEADLOCK_DETECTED:
		case ERRCODE_LOCK_NOT_AVAILABLE:
			return true;
		default:
			return false;
	}
}

/* One try: the record statement in a transaction of its own. */
static List *
record_once(Datum *values, MemoryContext cxt)
{
	List	   *abandoned;

	trace_queue_begin("trace_ext: recording outcomes");
	trace_queue_use_indexes();
	prepare_record_plan();
	if (SPI_execute_plan(record_plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not record delivery outcomes");
	abandoned = read_abandoned(cxt);
	trace_queue_commit();
	return abandoned;
}

/*
 * Try to record, the rows abandoned copied into cxt; false if the
 * transaction failed for a transient reason and may be tried again (it
 * has been rolled back and the failure logged).  Any other error, or the
 * last try's, is raised.  Dropping outcomes means sending their rows
 * again, so a transient failure must not do that.
 */
static bool
record_try(Datum *values, int tries, MemoryContext cxt, List **abandoned)
{
	volatile bool done = true;

	PG_TRY();
	{
		*abandoned = record_once(values, cxt);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (tries >= RECORD_TRIES || !transient_error(edata->sqlerrcode))
			PG_RE_THROW();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		MemoryContextSwitchTo(cxt);		/* the abort left us in TopMemoryContext */
		pgstat_report_activity(STATE_IDLE, NULL);
		ereport(LOG,
				(errmsg("recording delivery outcomes failed, retrying (try %d of %d): %s",
						tries + 1, RECORD_TRIES, edata->message)));
		FreeErrorData(edata);
		done = false;
	}
	PG_END_TRY();
	return done;
}

/*
 * Record the outcomes of finished items in one statement: delivered,
 * retried later (backoff), or abandoned (with NOTIFY trace_alert; the rows
 * abandoned are returned in *abandoned, a List of TraceAbandoned).  A
 * transaction that fails for a transient reason (serialization failure,
 * deadlock, ...) is run again, up to RECORD_TRIES times in all.  Returns
 * the earliest retry time scheduled (DT_NOEND if none).
 */
TimestampTz
trace_queue_record(TraceItem **items, int n, List **abandoned)
{
	Datum	   *ids = palloc(sizeof(Datum) * n);
	int		   *attempts = palloc(sizeof(int) * n);
	const char **status = palloc(sizeof(char *) * n);
	Datum	   *http = palloc(sizeof(Datum) * n);
	bool	   *http_null = palloc(sizeof(bool) * n);
	const char **errors = palloc(sizeof(char *) * n);
	bool	   *error_null = palloc(sizeof(bool) * n);
	Datum	   *delays = palloc(sizeof(Datum) * n);
	Datum	   *held = palloc(sizeof(Datum) * n);
	Datum	   *due = palloc(sizeof(Datum) * n);
	double		soonest = -1;
	Datum		values[8];
	int			dims[1] = {n};
	int			lbs[1] = {1};
	MemoryContext caller = CurrentMemoryContext;

	for (int i = 0; i < n; i++)
	{
		TraceItem  *item = items[i];
		double		delay;

		ids[i] = Int64GetDatum(item->id);
		attempts[i] = item->attempts;
		status[i] = trace_outcome_next_status(item, &delay);
		delays[i] = Float8GetDatum(delay);
		held[i] = BoolGetDatum(item->out.held);
		due[i] = TimestampTzGetDatum(item->claimed_due);
		http[i] = Int32GetDatum(item->out.http_status);
		http_null[i] = item->out.http_status == 0;
		errors[i] = item->out.error;
		error_null[i] = item->out.delivered;
		if (strcmp(status[i], "pending") == 0 && (soonest < 0 || delay < soonest))
			soonest = delay;
	}

	values[0] = PointerGetDatum(construct_array_builtin(ids, n, INT8OID));
	values[1] = PointerGetDatum(int4_array(attempts, n));
	values[2] = PointerGetDatum(text_array(status, NULL, n));
	values[3] = PointerGetDatum(construct_md_array(http, http_null, 1, dims, lbs,
												   INT4OID, 4, true, TYPALIGN_INT));
	values[4] = PointerGetDatum(text_array(errors, error_null, n));
	/* PostgreSQL 15's construct_array_builtin() knows no float8 */
	values[5] = PointerGetDatum(construct_array(delays, n, FLOAT8OID, sizeof(float8),
												FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[6] = PointerGetDatum(construct_array(held, n, BOOLOID, sizeof(bool), true,
												TYPALIGN_CHAR));
	values[7] = PointerGetDatum(construct_array(due, n, TIMESTAMPTZOID, sizeof(TimestampTz),
												FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	for (int tries = 1; !record_try(values, tries, caller, abandoned); tries++)
	{
		(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 RECORD_RETRY_MS * tries, PG_WAIT_EXTENSION);
		CHECK_FOR_INTERRUPTS();
	}
	if (soonest < 0)
		return DT_NOEND;
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) (soonest * 1000));
}

/* NOTIFY trace_alert with each payload of the list, in one transaction. */
void
trace_queue_notify(List *payloads)
{
	ListCell   *lc;
	Oid			types[1] = {TEXTOID};

	if (payloads == NIL)
		return;
	trace_queue_begin("trace_ext: notifying trace_alert");
	foreach(lc, payloads)
	{
		Datum		values[1] = {CStringGetTextDatum((char *) lfirst(lc))};

		if (SPI_execute_with_args("SELECT pg_catalog.pg_notify('trace_alert', $1)",
								  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not notify trace_alert");
	}
	trace_queue_commit();
}

/*
 * The worker's housekeeping (clean-up, reconciliation) gives way to DDL: a
 * lock it cannot have at once (DROP EXTENSION, ALTER TABLE on a trades
 * table in progress) ends its transaction with ERRCODE_LOCK_NOT_AVAILABLE
 * well before deadlock_timeout, instead of making the DBA's statement the
 * victim of a deadlock.  The caller tries again later.
 */
static void
yield_to_ddl(void)
{
	if (SPI_execute("SELECT pg_catalog.set_config('lock_timeout', '100', true)",
					false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not set lock_timeout");
}

/*
 * trace.cleanup(), run by the worker now and then; *oldest is the
 * created_at of the oldest row left (DT_NOEND if none).
 */
int64
trace_queue_cleanup(TimestampTz *oldest)
{
	int64		deleted = 0;
	bool		isnull;
	Datum		d;

	trace_queue_begin("trace_ext: deleting rows older than trace.ttl");
	yield_to_ddl();
	if (SPI_execute("SELECT trace.cleanup()", false, 1) != SPI_OK_SELECT)
		elog(ERROR, "cleanup failed");
	deleted = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										  SPI_tuptable->tupdesc, 1, &isnull));
	/* a new snapshot (not read-only): the rows just deleted are gone */
	if (SPI_execute("SELECT min(created_at) FROM trace.trace_queue", false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the oldest queue row");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*oldest = isnull ? DT_NOEND : DatumGetTimestampTz(d);
	trace_queue_commit();
	return deleted;
}

/*
 * The worker's reconciliation sweep: trace.reconcile() over the TTL window
 * (it logs a WARNING and notifies trace_alert itself when it queues
 * anything).  Returns the rows queued; -1 when the installed extension is
 * older than 1.3 and has no trace.reconcile() yet.
 */
int64
trace_queue_reconcile(void)
{
	int64		queued = -1;
	bool		isnull;

	trace_queue_begin("trace_ext: reconciling closed trades with the queue");
	yield_to_ddl();
	if (SPI_execute("SELECT pg_catalog.to_regprocedure("
					"'trace.reconcile(timestamptz, boolean)') IS NOT NULL",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not look for trace.reconcile()");
	if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
								   &isnull)))
	{
		if (SPI_execute("SELECT pg_catalog.count(*) FROM trace.reconcile()",
						false, 1) != SPI_OK_SELECT)
			elog(ERROR, "reconciliation failed");
		queued = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &isnull));
	}
	trace_queue_commit();
	return queued;
}
