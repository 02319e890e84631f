/*
 * wake.c: waking the workers when work for them commits.
 *
 * A worker sleeps until the earliest due_at it knows of and runs no query
 * in between, so everything that makes a row due sooner must wake it: a
 * transaction that queues rows (the trades trigger, trace.enqueue), changes
 * the queue (trace.retry, trace.retry_abandoned, or an operator's own
 * INSERT/UPDATE on trace.trace_queue, caught by a statement trigger),
 * commits a prepared transaction that did, or creates or drops the
 * extension.  The wake is armed during the
 * transaction and happens at commit, when the rows become visible; an
 * abort disarms it.  Waking only sets latches: it never blocks.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_wake);
PG_FUNCTION_INFO_V1(trace_queue_changed);

/* Set in the workers: their own queue updates wake nobody. */
bool		trace_is_worker = false;

/* Set while the trades trigger queues rows: it asks for its own wake. */
bool		trace_enqueuing = false;

/* Earliest due_at this transaction queued (DT_NOBEGIN: unknown, wake all). */
static TimestampTz wake_due = DT_NOEND;
static bool xact_callback_registered = false;
static ProcessUtility_hook_type prev_utility_hook = NULL;

static void
xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_due != DT_NOEND)
				trace_wake_workers(wake_due);
			wake_due = DT_NOEND;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction wakes at COMMIT PREPARED (below) */
			wake_due = DT_NOEND;
			break;
		default:
			break;
	}
}

/*
 * Ask for the workers to be woken when the current transaction commits
 * (rows it queued become visible then, not before), unless they will look
 * at the queue by `due` anyway: rows held back by trace.delay wake nobody
 * while a worker already plans a pass before they are due.
 */
void
trace_request_wake_at(TimestampTz due)
{
	if (!trace_preloaded || trace_is_worker)
		return;
	if (!xact_callback_registered)
	{
		RegisterXactCallback(xact_callback, NULL);
		xact_callback_registered = true;
	}
	wake_due = Min(wake_due, due);
}

/* Wake the workers at commit, whatever they planned. */
void
trace_request_wake(void)
{
	trace_request_wake_at(DT_NOBEGIN);
}

/*
 * Statements after which the workers must look again: COMMIT PREPARED may
 * make queued rows visible (which ones is unknown here), and CREATE or
 * DROP EXTENSION may give or take away the queue.  A spurious pass at
 * worst.
 */
static bool
wakes_workers(Node *stmt)
{
	if (IsA(stmt, TransactionStmt))
		return ((TransactionStmt *) stmt)->kind == TRANS_STMT_COMMIT_PREPARED;
	if (IsA(stmt, DropStmt))
		return ((DropStmt *) stmt)->removeType == OBJECT_EXTENSION;
	return IsA(stmt, CreateExtensionStmt);
}

static void
utility_hook(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
			 ProcessUtilityContext context, ParamListInfo params,
			 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	if (wakes_workers(pstmt->utilityStmt))
		trace_request_wake();

	if (prev_utility_hook)
		prev_utility_hook(pstmt, queryString, readOnlyTree, context, params,
						  queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

void
trace_wake_install(void)
{
	prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = utility_hook;
}

/* trace._wake(): wake the workers when this transaction commits. */
Datum
trace_wake(PG_FUNCTION_ARGS)
{
	trace_request_wake();
	PG_RETURN_VOID();
}

/*
 * trace._queue_changed(): AFTER INSERT OR UPDATE ... FOR EACH STATEMENT on
 * trace.trace_queue, so that rows queued or made due by any statement
 * wake the workers at commit.
 */
Datum
trace_queue_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trace._queue_changed() must be called as a trigger")));
	if (!trace_enqueuing)
		trace_request_wake();
	PG_RETURN_POINTER(NULL);
}
