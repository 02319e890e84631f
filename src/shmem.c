/*
 * shmem.c: the shared state of trace_ext.
 *
 * Shared memory holds the workers' slots (pid and latch, so that an
 * enqueuing transaction can wake them) and the delivery counters.
 * Locking: the slots are guarded by a spinlock, taken only when a worker
 * starts or exits and when a worker lists the live ones; the counters are
 * atomics, updated without locks on the send path.  Waking (wake.c) never
 * blocks: it only sets the latches found here.
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

/* Upper bounds (seconds) of the post duration histogram; +Inf is implied. */
const double trace_duration_buckets[TRACE_NUM_BUCKETS] = {
	0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
};
#define NUM_BUCKETS TRACE_NUM_BUCKETS

typedef struct TraceCounters
{
	pg_atomic_uint64 pushed;
	pg_atomic_uint64 failed[TRACE_NUM_REASONS];
	pg_atomic_uint64 duration_count;
	pg_atomic_uint64 duration_sum_us;
	pg_atomic_uint64 buckets[NUM_BUCKETS];	/* not cumulative */
	pg_atomic_uint64 reconciled;
} TraceCounters;

typedef struct TraceShared
{
	slock_t		mutex;			/* guards pids and latches */
	pid_t		pids[TRACE_MAX_WORKERS];
	Latch	   *latches[TRACE_MAX_WORKERS];
	/* each worker's next planned pass (a TimestampTz); DT_NOEND: any commit */
	pg_atomic_uint64 wake_at[TRACE_MAX_WORKERS];
	/* configuration reloads each worker has made since it started */
	pg_atomic_uint64 reloads[TRACE_MAX_WORKERS];
	bool		database_missing;	/* a worker found trace.database absent */
	TraceCounters counters[TRACE_NUM_ADAPTERS];
} TraceShared;

static TraceShared *shared = NULL;
static int	my_slot = -1;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;


static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(TraceShared)));
}

static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("trace_ext", sizeof(TraceShared), &found);
	if (!found)
	{
		memset(shared, 0, sizeof(TraceShared));
		SpinLockInit(&shared->mutex);
		for (int i = 0; i < TRACE_MAX_WORKERS; i++)
		{
			pg_atomic_init_u64(&shared->wake_at[i], (uint64) DT_NOEND);
			pg_atomic_init_u64(&shared->reloads[i], 0);
		}
		for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		{
			TraceCounters *c = &shared->counters[a];

			pg_atomic_init_u64(&c->pushed, 0);
			for (int r = 0; r < TRACE_NUM_REASONS; r++)
				pg_atomic_init_u64(&c->failed[r], 0);
			pg_atomic_init_u64(&c->duration_count, 0);
			pg_atomic_init_u64(&c->duration_sum_us, 0);
			for (int b = 0; b < NUM_BUCKETS; b++)
				pg_atomic_init_u64(&c->buckets[b], 0);
			pg_atomic_init_u64(&c->reconciled, 0);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

void
trace_shmem_install(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
}

bool
trace_shmem_ready(void)
{
	return shared != NULL;
}

static void
worker_slot_detach(int code, Datum arg)
{
	SpinLockAcquire(&shared->mutex);
	shared->pids[my_slot] = 0;
	shared->latches[my_slot] = NULL;
	SpinLockRelease(&shared->mutex);
	my_slot = -1;
}

/* A worker announces itself, so that commits can wake it. */
void
trace_worker_slot_attach(int slot)
{
	Assert(slot >= 0 && slot < TRACE_MAX_WORKERS);
	my_slot = slot;
	SpinLockAcquire(&shared->mutex);
	shared->pids[slot] = MyProcPid;
	shared->latches[slot] = MyLatch;
	SpinLockRelease(&shared->mutex);
	pg_atomic_write_u64(&shared->reloads[slot], 0);
	trace_publish_wake_at(DT_NOEND);
	on_shmem_exit(worker_slot_detach, (Datum) 0);
}

/* A worker has re-read its configuration (SIGHUP). */
void
trace_note_reload(void)
{
	if (shared != NULL && my_slot >= 0)
		pg_atomic_fetch_add_u64(&shared->reloads[my_slot], 1);
}

PG_FUNCTION_INFO_V1(trace_worker_reloads);

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
	for (int i = 0; shared != NULL && i < TRACE_MAX_WORKERS; i++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};
		pid_t		pid;

		SpinLockAcquire(&shared->mutex);
		pid = shared->pids[i];
		SpinLockRelease(&shared->mutex);
		if (pid == 0)
			continue;
		values[0] = Int32GetDatum((int32) pid);
		values[1] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->reloads[i]));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* The pids of the running workers: their leases are not orphans. */
int
trace_live_worker_pids(int *pids, int max)
{
	int			n = 0;

	SpinLockAcquire(&shared->mutex);
	for (int i = 0; i < TRACE_MAX_WORKERS && n < max; i++)
		if (shared->pids[i] != 0)
			pids[n++] = shared->pids[i];
	SpinLockRelease(&shared->mutex);
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

	SpinLockAcquire(&shared->mutex);
	missing = shared->database_missing;
	SpinLockRelease(&shared->mutex);
	return missing;
}

void
trace_set_database_missing(bool missing)
{
	SpinLockAcquire(&shared->mutex);
	shared->database_missing = missing;
	SpinLockRelease(&shared->mutex);
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
		(void) pg_atomic_exchange_u64(&shared->wake_at[my_slot], (uint64) when);
}

/*
 * Wake the workers that would otherwise sleep past `due` (DT_NOBEGIN: all
 * of them).  Reading a latch pointer without the spinlock is safe: it
 * points into a PGPROC, which outlives the worker, and setting a stale
 * latch only causes a spurious wakeup.
 */
void
trace_wake_workers(TimestampTz due)
{
	if (shared == NULL)
		return;
	pg_memory_barrier();		/* our commit is visible before we look */
	for (int i = 0; i < TRACE_MAX_WORKERS; i++)
	{
		Latch	   *latch = shared->latches[i];

		if (latch != NULL &&
			due < (TimestampTz) pg_atomic_read_u64(&shared->wake_at[i]))
			SetLatch(latch);
	}
}

/* Count one finished attempt (or configuration failure) of an item. */
void
trace_metrics_count(const TraceItem *item)
{
	TraceCounters *c;

	if (shared == NULL)
		return;
	c = &shared->counters[item->adapter];

	if (item->out.delivered)
		pg_atomic_fetch_add_u64(&c->pushed, 1);
	else
		pg_atomic_fetch_add_u64(&c->failed[item->out.reason], 1);

	if (item->out.posted)
	{
		double		s = item->out.seconds;
		int			b;

		/* count first: a reader takes buckets, then the count */
		pg_atomic_fetch_add_u64(&c->duration_count, 1);
		pg_atomic_fetch_add_u64(&c->duration_sum_us, (uint64) (s * 1e6));
		for (b = 0; b < NUM_BUCKETS; b++)
			if (s <= trace_duration_buckets[b])
				break;
		if (b < NUM_BUCKETS)
			pg_atomic_fetch_add_u64(&c->buckets[b], 1);
	}
}

/* Count rows that trace.reconcile() queued for an adapter. */
void
trace_metrics_count_reconciled(TraceAdapterKind kind, uint64 n)
{
	if (shared != NULL)
		pg_atomic_fetch_add_u64(&shared->counters[kind].reconciled, n);
}

/*
 * The counters of one adapter (zeros without shared memory).  Buckets are
 * returned cumulative, read before the count, so that every bucket is at
 * most the count even while the worker is adding to them.
 */
void
trace_metrics_snapshot(TraceAdapterKind kind, TraceMetrics *m)
{
	TraceCounters *c;
	uint64		cumulative = 0;

	memset(m, 0, sizeof(TraceMetrics));
	if (shared == NULL)
		return;
	c = &shared->counters[kind];
	m->pushed = pg_atomic_read_u64(&c->pushed);
	m->reconciled = pg_atomic_read_u64(&c->reconciled);
	for (int r = 0; r < TRACE_NUM_REASONS; r++)
	{
		m->failed_by_reason[r] = pg_atomic_read_u64(&c->failed[r]);
		m->failed += m->failed_by_reason[r];
	}
	for (int b = 0; b < NUM_BUCKETS; b++)
	{
		cumulative += pg_atomic_read_u64(&c->buckets[b]);
		m->buckets[b] = cumulative;
	}
	pg_read_barrier();
	m->count = pg_atomic_read_u64(&c->duration_count);
	m->sum = pg_atomic_read_u64(&c->duration_sum_us) / 1e6;
	if (m->count < cumulative)
		m->count = cumulative;
}
