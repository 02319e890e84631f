/*
 * lease.c: the queue rows being sent, in shared memory.
 *
 * Claiming a row does not rewrite it.  The claim transaction locks the row
 * (FOR UPDATE SKIP LOCKED: a lock, not a new row version) and, while it
 * holds that lock, takes a lease here, keyed by the row's id; the lock
 * ends with the claim's commit, the lease when the worker has recorded the
 * row's outcome (the one UPDATE a delivery costs).  The claim statement
 * skips rows with a live lease (trace._leased()), and looks again here
 * once it holds their locks (a lease taken after its scan saw the row).
 *
 * A lease ends when its worker has recorded the row, when the worker drops
 * its work after an error or exits, or when it expires (2 x
 * trace.http_timeout + 5 s after it was taken: a worker that hangs).  A
 * crash restart re-creates shared memory with no lease at all: every row
 * not recorded is still pending in the table and is sent again, with the
 * same Idempotency-Key.  Nothing durable depends on a lease; it only keeps
 * two workers from sending the same row at once.
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_leased);
PG_FUNCTION_INFO_V1(trace_leases);

/*
 * Leases a worker may hold at once: trace.batch_size's maximum (requests
 * in flight never exceed it).
 */
#define LEASES_PER_WORKER	10000

typedef struct LeaseEntry
{
	int64		id;				/* the queue row (hash key) */
	int			owner;			/* the worker's pid */
	TimestampTz expires;
} LeaseEntry;

typedef struct LeaseShared
{
	LWLock		lock;			/* guards the hash table */
	int			tranche;
} LeaseShared;

static LeaseShared *lease_shared = NULL;
static HTAB *leases = NULL;

static long
lease_capacity(void)
{
	return (long) Max(trace_workers, 1) * LEASES_PER_WORKER;
}

Size
trace_lease_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(LeaseShared)),
					hash_estimate_size(lease_capacity(), sizeof(LeaseEntry)));
}

void
trace_lease_shmem_init(void)
{
	bool		found;
	HASHCTL		ctl;

	lease_shared = ShmemInitStruct("trace_ext leases", sizeof(LeaseShared), &found);
	if (!found)
	{
		lease_shared->tranche = LWLockNewTrancheId();
		LWLockInitialize(&lease_shared->lock, lease_shared->tranche);
	}
	LWLockRegisterTranche(lease_shared->tranche, "trace_ext leases");

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(LeaseEntry);
	leases = ShmemInitHash("trace_ext lease table", lease_capacity(), lease_capacity(),
						   &ctl, HASH_ELEM | HASH_BLOBS);
}

static bool
lease_live(const LeaseEntry *e, TimestampTz now)
{
	return e->expires > now;
}

/*
 * Take the leases of the rows just claimed (their locks held).  An item
 * whose row has a live lease, or one of ours that expired (our request
 * may still be out), is marked lease_lost: it is not ours to send now.
 * Returns how many are ours.
 */
int
trace_lease_take(TraceItem *items, int n, TimestampTz expires)
{
	TimestampTz now = GetCurrentTimestamp();
	int			kept = 0;

	LWLockAcquire(&lease_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		bool		found;
		LeaseEntry *e = hash_search(leases, &items[i].id, HASH_ENTER_NULL, &found);

		if (e == NULL || (found && (lease_live(e, now) || e->owner == MyProcPid)))
		{
			/* leased by another worker; or, no room: claim it another time */
			items[i].lease_lost = true;
			continue;
		}
		e->owner = MyProcPid;
		e->expires = expires;
		kept++;
	}
	LWLockRelease(&lease_shared->lock);
	return kept;
}

/* The rows' outcomes are recorded (or they were cancelled): end our leases. */
void
trace_lease_end(TraceItem **items, int n)
{
	if (n == 0)
		return;
	LWLockAcquire(&lease_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		LeaseEntry *e = hash_search(leases, &items[i]->id, HASH_FIND, NULL);

		if (e != NULL && e->owner == MyProcPid)
			hash_search(leases, &items[i]->id, HASH_REMOVE, NULL);
	}
	LWLockRelease(&lease_shared->lock);
}

/*
 * End every lease held by this worker (all == false), or by any process
 * that is not a live worker (all == true, at a worker's start: what a
 * worker that exited without cleaning up left).
 */
static void
lease_sweep(bool all)
{
	int			live[TRACE_MAX_WORKERS];
	int			nlive = all ? trace_live_worker_pids(live, TRACE_MAX_WORKERS) : 0;
	HASH_SEQ_STATUS seq;
	LeaseEntry *e;

	if (leases == NULL)
		return;
	LWLockAcquire(&lease_shared->lock, LW_EXCLUSIVE);
	hash_seq_init(&seq, leases);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		bool		drop = (e->owner == MyProcPid);

		if (all && !drop)
		{
			drop = true;
			for (int i = 0; i < nlive; i++)
				if (live[i] == e->owner)
					drop = false;
		}
		if (drop)
			hash_search(leases, &e->id, HASH_REMOVE, NULL);
	}
	LWLockRelease(&lease_shared->lock);
}

void
trace_lease_end_mine(void)
{
	lease_sweep(false);
}

void
trace_lease_end_orphans(void)
{
	lease_sweep(true);
}

/* Whether the row has a live lease: a worker is sending it. */
bool
trace_lease_held(int64 id)
{
	LeaseEntry *e;
	bool		held;

	if (leases == NULL)
		return false;
	LWLockAcquire(&lease_shared->lock, LW_SHARED);
	e = hash_search(leases, &id, HASH_FIND, NULL);
	held = e != NULL && lease_live(e, GetCurrentTimestamp());
	LWLockRelease(&lease_shared->lock);
	return held;
}

/*
 * The ids of the rows with a live lease (palloc'd), for a queue whose
 * SQL is older than trace._leased().
 */
int64 *
trace_lease_ids(int *n)
{
	TimestampTz now = GetCurrentTimestamp();
	HASH_SEQ_STATUS seq;
	LeaseEntry *e;
	int64	   *ids;
	int			size;

	*n = 0;
	if (leases == NULL)
		return palloc(sizeof(int64));
	/* no allocation under the lock; leases taken meanwhile are left out */
	LWLockAcquire(&lease_shared->lock, LW_SHARED);
	size = (int) hash_get_num_entries(leases) + 1;
	LWLockRelease(&lease_shared->lock);
	ids = palloc(sizeof(int64) * size);
	LWLockAcquire(&lease_shared->lock, LW_SHARED);
	hash_seq_init(&seq, leases);
	while ((e = hash_seq_search(&seq)) != NULL)
		if (*n < size && lease_live(e, now))
			ids[(*n)++] = e->id;
	LWLockRelease(&lease_shared->lock);
	return ids;
}

/*
 * trace._leased(id bigint) RETURNS boolean: the claim's filter, and what
 * the views show as sending.  Without the preload there are no workers,
 * so no leases: false.
 */
Datum
trace_leased(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(trace_lease_held(PG_GETARG_INT64(0)));
}

/*
 * trace._leases(OUT id bigint, OUT pid integer, OUT expires_at timestamptz):
 * every live lease, which worker holds it and until when.  Copied out
 * first: no tuple is built under the lock.
 */
Datum
trace_leases(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz now = GetCurrentTimestamp();
	LeaseEntry *copy;
	int			size;
	int			n = 0;
	HASH_SEQ_STATUS seq;
	LeaseEntry *e;

	InitMaterializedSRF(fcinfo, 0);
	if (leases == NULL)
		PG_RETURN_VOID();
	LWLockAcquire(&lease_shared->lock, LW_SHARED);
	size = (int) hash_get_num_entries(leases) + 1;
	LWLockRelease(&lease_shared->lock);
	copy = palloc(sizeof(LeaseEntry) * size);
	LWLockAcquire(&lease_shared->lock, LW_SHARED);
	hash_seq_init(&seq, leases);
	while ((e = hash_seq_search(&seq)) != NULL)
		if (n < size && lease_live(e, now))
			copy[n++] = *e;
	LWLockRelease(&lease_shared->lock);

	for (int i = 0; i < n; i++)
	{
		Datum		values[3];
		bool		nulls[3] = {false};

		values[0] = Int64GetDatum(copy[i].id);
		values[1] = Int32GetDatum(copy[i].owner);
		values[2] = TimestampTzGetDatum(copy[i].expires);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}
