/*
 * shmem.c: sizing and creating trace_ext's shared memory.
 *
 * Each feature keeps its own shared state, in a struct of its own file:
 * wake.c the workers' slots (pid, latch, planned wake-up, reloads),
 * metrics.c the delivery counters, health.c the trackers' breakers,
 * lease.c the rows being sent.  This
 * file only asks the postmaster for the sum of their sizes and has each
 * create its part at startup.  Adding shared state is one line in `parts`
 * below.
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"

#include "src/trace_ext.h"

typedef struct ShmemPart
{
	Size		(*size) (void);
	void		(*init) (void); /* ShmemInitStruct, and set up if new */
} ShmemPart;

static const ShmemPart parts[] = {
	{trace_wake_shmem_size, trace_wake_shmem_init},
	{trace_metrics_shmem_size, trace_metrics_shmem_init},
	{trace_health_shmem_size, trace_health_shmem_init},
	{trace_lease_shmem_size, trace_lease_shmem_init},
};

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
shmem_request(void)
{
	Size		size = 0;

	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	for (int i = 0; i < lengthof(parts); i++)
		size = add_size(size, MAXALIGN(parts[i].size()));
	RequestAddinShmemSpace(size);
}

static void
shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	for (int i = 0; i < lengthof(parts); i++)
		parts[i].init();
	LWLockRelease(AddinShmemInitLock);
}

/* Called from _PG_init while preloading. */
void
trace_shmem_install(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
}
