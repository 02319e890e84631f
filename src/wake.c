/*
 * wake.c: the workers' slots in shared memory, and waking them when work
 * for them commits.
 *
 * Each worker has a slot: its pid and latch (so that an enqueuing
 * transaction can wake it), when it plans to look at the queue by itself,
 * and how many times it has reloaded its configuration.  Locking: pid and
 * latch are guarded by a spinlock, taken only when a worker starts or
 * exits and when the live ones are listed; the planned wake-ups and
 * reload counts are atomics.  Waking never blocks: it only sets latches.
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
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_wake);
PG_FUNCTION_INFO_V1(trace_queue_changed);
PG_FUNCTION_INFO_V1(trace_worker_reloads);
PG_FUNCTION_INFO_V1(trace_worker_status);

typedef struct WorkerSlots
{
	slock_t		mutex;			/* guards pids, latches, database_missing */
	pid_t		pids[TRACE_MAX_WORKERS];
	Latch	   *latches[TRACE_MAX_WORKERS];
	/* each worker's next planned pass (a TimestampTz); DT_NOEND: any commit */
	pg_atomic_uint64 wake_at[TRACE_MAX_WORKERS];
	/* configuration reloads each worker has made since it started */
	pg_atomic_uint64 reloads[TRACE_MAX_WORKERS];
	/* what each worker is doing, for trace.worker_status */
	pg_atomic_uint32 state[TRACE_MAX_WORKERS];	/* TraceWorkerState */
	pg_atomic_uint32 in_flight[TRACE_MAX_WORKERS];
	pg_atomic_uint64 started_at[TRACE_MAX_WORKERS];
	pg_atomic_uint64 pass_started[TRACE_MAX_WORKERS];	/* 0: none yet */
	pg_atomic_uint64 pass_finished[TRACE_MAX_WORKERS];
	pg_atomic_uint64 delivered[TRACE_MAX_WORKERS];
	pg_atomic_uint64 failed[TRACE_MAX_WORKERS];
	bool		database_missing;	/* a worker found trace.database absent */
} WorkerSlots;

static const char *const state_names[] = {"waiting", "idle", "sending", "paused", "held"};

static WorkerSlots *slots = NULL;
static int	my_slot = -1;

/* Set in the workers: their own queue updates wake nobody. */
bool		trace_is_worker = false;

/* Set while the trades trigger queues rows: it asks for its own wake. */
bool		trace_enqueuing = false;

/* Earliest due_at this transaction queued (DT_NOBEGIN: unknown, wake all). */
static TimestampTz wake_due = DT_NOEND;
static bool xact_callback_registered = false;
static ProcessUtility_hook_type prev_utility_hook = NULL;

static void wake_workers(TimestampTz due);

static void
xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_due != DT_NOEND)
				wake_workers(wake_due);
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

/* ---- the slots ---- */

Size
trace_wake_shmem_size(void)
{
	return sizeof(WorkerSlots);
}

void
trace_wake_shmem_init(void)
{
	bool		found;

	slots = ShmemInitStruct("trace_ext worker slots", sizeof(WorkerSlots), &found);
	if (found)
		return;
	memset(slots, 0, sizeof(WorkerSlots));
	SpinLockInit(&slots->mutex);
	for (int i = 0; i < TRACE_MAX_WORKERS; i++)
	{
		pg_atomic_init_u64(&slots->wake_at[i], (uint64) DT_NOEND);
		pg_atomic_init_u64(&slots->reloads[i], 0);
		pg_atomic_init_u32(&slots->state[i], TRACE_WORKER_WAITING);
		pg_atomic_init_u32(&slots->in_flight[i], 0);
		pg_atomic_init_u64(&slots->started_at[i], 0);
		pg_atomic_init_u64(&slots->pass_started[i], 0);
		pg_atomic_init_u64(&slots->pass_finished[i], 0);
		pg_atomic_init_u64(&slots->delivered[i], 0);
		pg_atomic_init_u64(&slots->failed[i], 0);
	}
}

static void
worker_slot_detach(int code, Datum arg)
{
	SpinLockAcquire(&slots->mutex);
	slots->pids[my_slot] = 0;
	slots->latches[my_slot] = NULL;
	SpinLockRelease(&slots->mutex);
	my_slot = -1;
}

/* A worker announces itself, so that commits can wake it. */
void
trace_worker_slot_attach(int slot)
{
	Assert(slot >= 0 && slot < TRACE_MAX_WORKERS);
	my_slot = slot;
	SpinLockAcquire(&slots->mutex);
	slots->pids[slot] = MyProcPid;
	slots->latches[slot] = MyLatch;
	SpinLockRelease(&slots->mutex);
	pg_atomic_write_u64(&slots->reloads[slot], 0);
	pg_atomic_write_u32(&slots->state[slot], TRACE_WORKER_WAITING);
	pg_atomic_write_u32(&slots->in_flight[slot], 0);
	pg_atomic_write_u64(&slots->started_at[slot], (uint64) GetCurrentTimestamp());
	pg_atomic_write_u64(&slots->pass_started[slot], 0);
	pg_atomic_write_u64(&slots->pass_finished[slot], 0);
	pg_atomic_write_u64(&slots->delivered[slot], 0);
	pg_atomic_write_u64(&slots->failed[slot], 0);
	trace_publish_wake_at(DT_NOEND);
	on_shmem_exit(worker_slot_detach, (Datum) 0);
}

/* What this worker is doing now (trace.worker_status). */
void
trace_worker_set_state(TraceWorkerState state)
{
	if (my_slot >= 0)
		pg_atomic_write_u32(&slots->state[my_slot], (uint32) state);
}

/* A pass starts (started) or ends. */
void
trace_worker_note_pass(bool started)
{
	if (my_slot < 0)
		return;
	pg_atomic_write_u64(started ? &slots->pass_started[my_slot] : &slots->pass_finished[my_slot],
						(uint64) GetCurrentTimestamp());
}

/* Requests in flight now; outcomes recorded since the worker started. */
void
trace_worker_note_work(int in_flight, int delivered, int failed)
{
	if (my_slot < 0)
		return;
	pg_atomic_write_u32(&slots->in_flight[my_slot], (uint32) Max(in_flight, 0));
	if (delivered > 0)
		pg_atomic_fetch_add_u64(&slots->delivered[my_slot], delivered);
	if (failed > 0)
		pg_atomic_fetch_add_u64(&slots->failed[my_slot], failed);
}

/* A timestamp slot as a nullable timestamptz Datum. */
static Datum
time_or_null(pg_atomic_uint64 *v, bool *isnull)
{
	TimestampTz t = (TimestampTz) pg_atomic_read_u64(v);

	*isnull = (t == 0 || t == DT_NOEND);
	return TimestampTzGetDatum(t);
}

/*
 * trace._worker_status(): one row per running worker: pid, state, rows in
 * flight, planned wake-up, last pass started and finished, rows delivered
 * and failed since it started, when it started.
 */
Datum
trace_worker_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (slots == NULL)
		trace_error_not_preloaded("run workers");
	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < TRACE_MAX_WORKERS; i++)
	{
		Datum		values[10];
		bool		nulls[10] = {false};
		pid_t		pid;
		uint32		state;

		SpinLockAcquire(&slots->mutex);
		pid = slots->pids[i];
		SpinLockRelease(&slots->mutex);
		if (pid == 0)
			continue;
		state = pg_atomic_read_u32(&slots->state[i]);
		values[0] = Int32GetDatum(i + 1);
		values[1] = Int32GetDatum((int32) pid);
		values[2] = CStringGetTextDatum(state < lengthof(state_names) ? state_names[state] : "?");
		values[3] = Int32GetDatum((int32) pg_atomic_read_u32(&slots->in_flight[i]));
		values[4] = time_or_null(&slots->wake_at[i], &nulls[4]);
		values[5] = time_or_null(&slots->pass_started[i], &nulls[5]);
		values[6] = time_or_null(&slots->pass_finished[i], &nulls[6]);
		values[7] = Int64GetDatum((int64) pg_atomic_read_u64(&slots->delivered[i]));
		values[8] = Int64GetDatum((int64) pg_atomic_read_u64(&slots->failed[i]));
		values[9] = time_or_null(&slots->started_at[i], &nulls[9]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* A worker has re-read its configuration (SIGHUP). */
void
trace_note_reload(void)
{
	if (slots != NULL && my_slot >= 0)
		pg_atomic_fetch_add_u64(&slots->reloads[my_slot], 1);
}

/*
 * trace._worker_reloads(): for each running worker, how many times it has
 * re-read its configuration since it started.  An operator (or a test)
 * that changed a setting knows from it when every worker runs with it.
 */
Datum
trace_worker_reloads(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; slots != NULL && i < TRACE_MAX_WORKERS; i++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};
		pid_t		pid;

		SpinLockAcquire(&slots->mutex);
		pid = slots->pids[i];
		SpinLockRelease(&slots->mutex);
		if (pid == 0)
			continue;
		values[0] = Int32GetDatum((int32) pid);
		values[1] = Int64GetDatum((int64) pg_atomic_read_u64(&slots->reloads[i]));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* The pids of the running workers: their leases are not orphans. */
int
trace_live_worker_pids(int *pids, int max)
{
	int			n = 0;

	SpinLockAcquire(&slots->mutex);
	for (int i = 0; i < TRACE_MAX_WORKERS && n < max; i++)
		if (slots->pids[i] != 0)
			pids[n++] = slots->pids[i];
	SpinLockRelease(&slots->mutex);
	return n;
}

/*
 * Whether trace.database was missing when a worker last tried it: workers
 * then wait for it quietly instead of failing at every restart.
 */
bool
trace_database_missing(void)
{
	bool		missing;

	SpinLockAcquire(&slots->mutex);
	missing = slots->database_missing;
	SpinLockRelease(&slots->mutex);
	return missing;
}

void
trace_set_database_missing(bool missing)
{
	SpinLockAcquire(&slots->mutex);
	slots->database_missing = missing;
	SpinLockRelease(&slots->mutex);
}

/*
 * A worker says when it will next look at the queue by itself: commits of
 * rows due no earlier need not wake it.  Before a pass it says DT_NOEND,
 * so that every commit during the pass sets its latch and the pass is
 * followed by another.  The exchange is a full barrier: the value is
 * visible before the worker's next snapshot is taken.
 */
void
trace_publish_wake_at(TimestampTz when)
{
	if (my_slot >= 0)
		(void) pg_atomic_exchange_u64(&slots->wake_at[my_slot], (uint64) when);
}

/* Wake every worker now (a tracker's breaker closed: its backlog may go). */
void
trace_wake_all(void)
{
	wake_workers(DT_NOBEGIN);
}

/*
 * Wake the workers that would otherwise sleep past `due` (DT_NOBEGIN: all
 * of them).  Reading a latch pointer without the spinlock is safe: it
 * points into a PGPROC, which outlives the worker, and setting a stale
 * latch only causes a spurious wakeup.
 */
static void
wake_workers(TimestampTz due)
{
	if (slots == NULL)
		return;
	pg_memory_barrier();		/* our commit is visible before we look */
	for (int i = 0; i < TRACE_MAX_WORKERS; i++)
	{
		Latch	   *latch = slots->latches[i];

		if (latch != NULL &&
			due < (TimestampTz) pg_atomic_read_u64(&slots->wake_at[i]))
			SetLatch(latch);
	}
}
