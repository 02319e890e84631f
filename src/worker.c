/*
 * worker.c: the delivery workers' main loop.
 *
 * trace.workers background workers start once recovery has finished (a
 * standby runs none), connect to trace.database and wait quietly until
 * the extension exists there.  Each then loops: sleep until the earliest
 * due_at, trace.poll_interval at most, or until an enqueuing transaction
 * commits and sets our latch; then run a pass.  A pass claims due rows in
 * a short transaction, hands them to the adapters and the HTTP driver,
 * tops the pipe up as requests finish, and records outcomes in further
 * short transactions.  No transaction or snapshot is open while requests
 * are in flight.  An error in a pass is logged, its transaction aborted,
 * its transfers dropped (their leases expire and they are sent again),
 * and the worker carries on; SIGTERM ends it, SIGHUP reloads settings.
 * A worker that exits is restarted by the postmaster after a second.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "adapters/adapter.h"
#include "src/trace_ext.h"

/*
 * Shortest sleep after a pass that claimed nothing although a row looked
 * due: such a row is locked by someone else's open transaction, and
 * looking again at once would spin.
 */
#define LOCKED_ROW_SLEEP_MS	50

/*
 * The rows of one claim share a memory context, freed when the last of
 * them has been recorded.
 */
typedef struct TraceBatch
{
	MemoryContext cxt;
	int			outstanding;
} TraceBatch;

static MemoryContext worker_cxt = NULL;
static int	rows_claimed = 0;		/* by the current pass */

/*
 * Adapters run outside transactions but use PostgreSQL's crypto (HMAC,
 * SHA-256), which registers with the current resource owner.
 */
static ResourceOwner adapter_owner = NULL;

/* When trace.cleanup() may next find rows older than trace.ttl; 0: now. */
static TimestampTz next_cleanup = 0;

/* When the next reconciliation sweep is due; 0: now, DT_NOEND: never. */
static TimestampTz next_reconcile = 0;

void
trace_register_workers(void)
{
	for (int i = 0; i < trace_workers; i++)
	{
		BackgroundWorker worker;

		memset(&worker, 0, sizeof(worker));
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
			BGWORKER_BACKEND_DATABASE_CONNECTION;
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		worker.bgw_restart_time = 1;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "trace_ext");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "trace_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "trace_ext worker %d", i + 1);
		snprintf(worker.bgw_type, BGW_MAXLEN, "trace_ext worker");
		worker.bgw_main_arg = Int32GetDatum(i);
		RegisterBackgroundWorker(&worker);
	}
}

/*
 * The next sweep, trace.reconcile_interval after `from` (never when 0).
 * Only the first worker sweeps: the others would find nothing more.
 */
static int	my_slot = 0;

static void
schedule_reconcile(TimestampTz from)
{
	if (trace_reconcile_interval_s == 0 || my_slot != 0)
		next_reconcile = DT_NOEND;
	else
		next_reconcile = TimestampTzPlusMilliseconds(from,
													 (int64) trace_reconcile_interval_s * 1000);
}

static void
reload_if_asked(void)
{
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
		trace_secrets_load();
		trace_note_reload();
		next_cleanup = 0;		/* trace.ttl may have changed */
		schedule_reconcile(GetCurrentTimestamp());	/* and the interval */
	}
}

static void
batch_release(TraceItem *item)
{
	TraceBatch *batch = item->batch;

	if (--batch->outstanding == 0)
		MemoryContextDelete(batch->cxt);
}

/* Hand claimed items to their adapters: send, or finish at once. */
static void
dispatch(TraceItem *items, int n)
{
	for (int i = 0; i < n; i++)
	{
		TraceItem  *item = &items[i];
		TraceRequest req;
		TracePrep	prep;

		if (item->cancelled)
		{
			batch_release(item);
			continue;
		}
		if (item->out.done)		/* failed while building the payload */
		{
			trace_http_push_done(item);
			continue;
		}
		memset(&req, 0, sizeof(req));
		CurrentResourceOwner = adapter_owner;
		prep = trace_adapter(item->adapter)->prepare(item, &req);
		CurrentResourceOwner = NULL;
		if (prep == TRACE_PREP_SEND)
			trace_http_start(item, &req);
		else
			trace_http_push_done(item);
	}
}

/*
 * Claim and dispatch up to `slots` rows; false when fewer were due.
 * *capped says whether an adapter was left out for having its share of
 * the slots already.
 */
static bool
claim_more(int slots, TimestampTz *next_due, bool *capped)
{
	bool		saturated[TRACE_NUM_ADAPTERS] = {false};
	int			enabled = 0;
	int			cap = Max(1, (trace_batch_size * 3) / 4);
	TraceBatch *batch;
	MemoryContext cxt;
	MemoryContext old;
	TraceItem  *items;
	TimestampTz due;
	int			n;

	/*
	 * With several trackers, none may take every slot: a hanging tracker
	 * must not hold up the others' deliveries.
	 */
	for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		enabled += trace_adapter_enabled(a) ? 1 : 0;
	*capped = false;
	if (enabled > 1)
		for (int a = 0; a < TRACE_NUM_ADAPTERS; a++)
		{
			saturated[a] = trace_http_inflight(a) >= cap;
			*capped |= saturated[a];
		}

	cxt = AllocSetContextCreate(worker_cxt, "trace_ext batch", ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(cxt);
	batch = palloc(sizeof(TraceBatch));
	batch->cxt = cxt;
	n = trace_queue_claim(slots, saturated, &items, &due);
	MemoryContextSwitchTo(old);
	rows_claimed += n;

	if (n == 0)
		MemoryContextDelete(cxt);
	else
	{
		batch->outstanding = n;
		for (int i = 0; i < n; i++)
			items[i].batch = batch;
		old = MemoryContextSwitchTo(cxt);
		dispatch(items, n);
		MemoryContextSwitchTo(old);
	}

	if (n < slots)
	{
		*next_due = due;
		return false;
	}
	return true;
}

/* Record every finished item in one transaction. */
static TimestampTz
record_done(void)
{
	TraceItem **items;
	TraceItem  *item;
	int			n = 0;
	int			size = 64;
	TimestampTz retry_at;
	MemoryContext scratch = AllocSetContextCreate(worker_cxt, "trace_ext record",
												  ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(scratch);

	items = palloc(sizeof(TraceItem *) * size);
	while ((item = trace_http_next_done()) != NULL)
	{
		if (n == size)
		{
			size *= 2;
			items = repalloc(items, sizeof(TraceItem *) * size);
		}
		items[n++] = item;
	}
	retry_at = (n > 0) ? trace_queue_record(items, n) : DT_NOEND;
	for (int i = 0; i < n; i++)
		batch_release(items[i]);
	MemoryContextSwitchTo(old);
	MemoryContextDelete(scratch);
	return retry_at;
}

/*
 * How long to wait for transfers: until something happens (a socket, a
 * commit setting our latch), but no later than the earliest row left
 * unclaimed and trace.poll_interval (settings are looked at in between).
 */
static int
wait_ms(TimestampTz claim_due)
{
	long		ms = trace_poll_interval_ms;

	if (claim_due != DT_NOEND)
		ms = Min(ms, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), claim_due));
	return (int) Max(ms, 1);
}

/*
 * One pass: keep claiming, sending and recording until nothing is in
 * flight and nothing more is due.  Returns when the next row is due.
 */
static TimestampTz
run_pass(void)
{
	bool		may_have_due = true;
	bool		capped = false;
	TimestampTz next_due = DT_NOEND;
	TimestampTz claim_due = DT_NOEND;
	TimestampTz claimed_at = 0;

	rows_claimed = 0;
	for (;;)
	{
		int			inflight;
		int			slots;

		/*
		 * A commit woke us, or a signal.  The latch is reset before the
		 * flags it stands for are looked at: a SIGHUP that comes after
		 * reload_if_asked() sets it again, and the next wait returns.
		 */
		if (MyLatch->is_set)
		{
			ResetLatch(MyLatch);
			may_have_due = true;
		}
		CHECK_FOR_INTERRUPTS();
		reload_if_asked();

		/* A row we know of became due since the claim. */
		if (!may_have_due && claim_due != DT_NOEND && claim_due > claimed_at &&
			GetCurrentTimestamp() >= claim_due)
			may_have_due = true;

		inflight = trace_http_inflight_total();
		slots = trace_batch_size - inflight;
		if (may_have_due && slots > 0 &&
			(inflight == 0 || slots >= Max(1, trace_batch_size / 2)))
		{
			claim_due = DT_NOEND;
			claimed_at = GetCurrentTimestamp();
			may_have_due = claim_more(slots, &claim_due, &capped);
		}

		if (trace_http_has_done())
		{
			TimestampTz retry_at = record_done();

			next_due = Min(next_due, retry_at);
			/* slots freed: an adapter left out at its cap may go now */
			if (capped)
				may_have_due = true;
		}

		/*
		 * Rows that were due at the claim but not claimed are locked by
		 * another transaction: they are left to the next pass, after a
		 * short sleep (see sleep_until), rather than spun on here.
		 */
		if (trace_http_inflight_total() == 0 && !may_have_due &&
			!trace_http_has_done())
			break;
		trace_http_poll(wait_ms(claim_due));
	}
	return Min(next_due, claim_due);
}

static void
forget_pass_state(void)
{
	trace_http_abort_all();
	MemoryContextReset(worker_cxt);
}

/* Run a pass; on error, log it, clean up and carry on. */
static TimestampTz
run_pass_guarded(bool *extension_ok)
{
	TimestampTz next_due = DT_NOEND;

	PG_TRY();
	{
		next_due = run_pass();
	}
	PG_CATCH();
	{
		EmitErrorReport();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		CurrentResourceOwner = NULL;
		forget_pass_state();
		pgstat_report_activity(STATE_IDLE, NULL);
		*extension_ok = false;
		next_due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
											   Max(trace_poll_interval_ms, 1000));
	}
	PG_END_TRY();
	return next_due;
}

/* How soon housekeeping that gave way to DDL tries again. */
#define HOUSEKEEPING_RETRY_MS	10000

/*
 * Report an error of the worker's housekeeping and clean up after it.  A
 * lock it gave way to (see yield_to_ddl in queue.c) is not an error: LOG.
 * Returns whether it was that.
 */
static bool
housekeeping_failed(const char *what)
{
	ErrorData  *edata;
	bool		yielded;
	MemoryContext old = MemoryContextSwitchTo(worker_cxt);

	edata = CopyErrorData();
	MemoryContextSwitchTo(old);
	yielded = edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
	if (yielded)
		ereport(LOG,
				(errmsg("trace_ext: %s gave way to a lock held by another session; retrying in %d s",
						what, HOUSEKEEPING_RETRY_MS / 1000)));
	else
		EmitErrorReport();
	FlushErrorState();
	FreeErrorData(edata);
	AbortOutOfAnyTransaction();
	return yielded;
}

/*
 * Run trace.cleanup() when rows may have outlived trace.ttl: at start,
 * then when the oldest row left expires, but at most every ttl/4 (and
 * every hour).  An idle queue thus costs no query until a row expires.
 */
static void
cleanup_if_due(void)
{
	TimestampTz now = GetCurrentTimestamp();
	int			every_s = Min(3600, Max(1, trace_ttl_s / 4));
	TimestampTz oldest = DT_NOEND;

	if (now < next_cleanup)
		return;
	next_cleanup = TimestampTzPlusMilliseconds(now, (int64) every_s * 1000);
	PG_TRY();
	{
		int64		deleted = trace_queue_cleanup(&oldest);

		if (deleted > 0)
			ereport(LOG,
					(errmsg("trace_ext: deleted " INT64_FORMAT " queue rows older than trace.ttl",
							deleted)));
		/* rows queued from now on expire a whole ttl from now, or later */
		if (oldest == DT_NOEND || oldest > now)
			oldest = now;
		next_cleanup = Max(next_cleanup,
						   TimestampTzPlusMilliseconds(oldest, (int64) trace_ttl_s * 1000));
	}
	PG_CATCH();
	{
		if (housekeeping_failed("the clean-up"))
			next_cleanup = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   HOUSEKEEPING_RETRY_MS);
	}
	PG_END_TRY();
}

/*
 * Run the reconciliation sweep when it is due: at start (closes missed
 * while no worker ran), then every trace.reconcile_interval.  Returns
 * whether it queued rows: the worker must then look at the queue, since
 * its own commits wake nobody.
 */
static bool
reconcile_if_due(void)
{
	TimestampTz now = GetCurrentTimestamp();
	volatile int64 queued = 0;

	if (now < next_reconcile)
		return false;
	schedule_reconcile(now);
	PG_TRY();
	{
		queued = trace_queue_reconcile();
		if (queued >= 0)
			ereport(DEBUG1,
					(errmsg("trace_ext: reconciliation sweep queued " INT64_FORMAT " rows",
							queued)));
	}
	PG_CATCH();
	{
		if (housekeeping_failed("the reconciliation sweep") &&
			trace_reconcile_interval_s > 0 && my_slot == 0)
			next_reconcile = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														 HOUSEKEEPING_RETRY_MS);
		queued = 0;
	}
	PG_END_TRY();
	return queued > 0;
}

/*
 * Sleep up to timeout_ms, or until our latch is set; then obey signals.
 * Returns whether the latch is set (left set: the caller resets it before
 * looking for work, so that no wakeup is lost).
 */
static bool
nap(long timeout_ms)
{
	int			rc = 0;

	/* a reload asked for while the latch was being reset: no sleep first */
	if (ConfigReloadPending)
		timeout_ms = 0;
	if (timeout_ms > 0)
		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   timeout_ms, PG_WAIT_EXTENSION);
	CHECK_FOR_INTERRUPTS();
	reload_if_asked();
	return (rc & WL_LATCH_SET) != 0 || MyLatch->is_set;
}

/*
 * Sleep until the next row is due, trace.poll_interval at most; true if
 * woken (a commit queued or changed rows, or a signal came).
 */
static bool
sleep_until(TimestampTz when)
{
	long		timeout = trace_poll_interval_ms;

	if (when != DT_NOEND)
	{
		long		until = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), when);

		timeout = Min(timeout, until);
		if (rows_claimed == 0)
			timeout = Max(timeout, Min(LOCKED_ROW_SLEEP_MS, trace_poll_interval_ms));
	}
	return nap(timeout);
}

/* How often a worker looks for a missing database or extension. */
#define WAITING_LOOK_MS		Max(trace_poll_interval_ms, 1000)

/* Wait, logging once, until CREATE EXTENSION trace_ext has run here. */
static void
wait_for_extension(void)
{
	bool		logged = false;

	for (;;)
	{
		ResetLatch(MyLatch);
		if (trace_extension_present())
			break;
		if (!logged)
			ereport(LOG,
					(errmsg("trace_ext: waiting for CREATE EXTENSION trace_ext in database \"%s\"",
							trace_database)));
		logged = true;
		nap(WAITING_LOOK_MS);
	}
	if (logged)
		ereport(LOG, (errmsg("trace_ext: extension found; delivering")));
}

/* A worker that dies before its connection is made says why, for the next. */
static bool connected = false;

static void
remember_connect_failure(int code, Datum arg)
{
	if (!connected)
		trace_set_database_missing(true);
}

/*
 * trace.database does not exist (yet): connected to no database, look for
 * it now and then, saying so once; when it appears, exit so that the
 * postmaster restarts the worker, which then connects to it.
 */
static void
wait_for_database(void)
{
	bool		logged = false;

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	for (;;)
	{
		bool		exists;

		ResetLatch(MyLatch);
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		exists = OidIsValid(get_database_oid(trace_database, true));
		CommitTransactionCommand();
		if (exists)
		{
			trace_set_database_missing(false);
			ereport(LOG,
					(errmsg("trace_ext: database \"%s\" exists now; the worker restarts to connect to it",
							trace_database)));
			proc_exit(1);
		}
		if (!logged)
			ereport(LOG,
					(errmsg("trace_ext: waiting for database \"%s\" (trace.database) to be created",
							trace_database)));
		logged = true;
		nap(WAITING_LOOK_MS);
	}
}

/*
 * The worker's session is its own.  Settings of its database and of the
 * role it connects as (ALTER DATABASE / ALTER ROLE ... SET) apply to it as
 * to any session, and some would break it; pin what it relies on, like
 * search_path below, where neither they nor a reload can change it:
 *
 * - default_transaction_isolation = read committed.  The claim (FOR UPDATE
 *   SKIP LOCKED) and the record (rows leased to us only) are correct under
 *   read committed, where they never fail for serialization.  Under
 *   repeatable read or serializable they fail when closes or other workers
 *   touch the queue meanwhile, and a failed record leaves its rows leased,
 *   to be sent a second time when the lease ends.
 * - statement_timeout = 0, lock_timeout = 0.  A statement is bounded by
 *   trace.batch_size; a lock wait is a wait for a transaction that holds
 *   one of our queue rows (an operator's UPDATE, a re-close), and giving up
 *   would only drop outcomes and repeat their deliveries.  A worker that
 *   waits shows it in pg_stat_activity (wait_event).
 * - idle_in_transaction_session_timeout = 0, idle_session_timeout = 0.  The
 *   worker never idles inside a transaction, and idles between passes by
 *   design.  PostgreSQL 15 enforces neither in a background worker (nor
 *   statement_timeout, armed only for a client's statements); pinned all
 *   the same, so that a version that does cannot end the worker.
 * - default_transaction_read_only = off.  The worker writes the queue.  A
 *   database or role (or server) set read-only that way is told (LOG) once,
 *   here.
 */
static void
pin_session_settings(void)
{
	if (DefaultXactReadOnly)
		ereport(LOG,
				(errmsg("trace_ext: default_transaction_read_only is on in database \"%s\"; the worker's own transactions are read-write all the same",
						trace_database),
				 errdetail("It is set for the database, for the worker's role or for the server; the worker must record its deliveries in trace.trace_queue.")));
	SetConfigOption("default_transaction_isolation", "read committed",
					PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_read_only", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("statement_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("lock_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("idle_in_transaction_session_timeout", "0",
					PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("idle_session_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
}

static void
connect_to_database(void)
{
	if (trace_database_missing())
		wait_for_database();	/* does not return */
	on_proc_exit(remember_connect_failure, (Datum) 0);
	BackgroundWorkerInitializeConnection(trace_database, NULL, 0);
	connected = true;

	/*
	 * We run as a superuser; the database's owner may have set a
	 * search_path for it (ALTER DATABASE ... SET) with functions or
	 * operators named like the ones our queries use.  Never look there.
	 */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	pin_session_settings();
}

void
trace_worker_main(Datum arg)
{
	int			slot = DatumGetInt32(arg);
	bool		extension_ok = false;
	bool		woken = true;
	TimestampTz next_due = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	trace_is_worker = true;
	trace_worker_slot_attach(slot);
	my_slot = slot;
	/* the first sweep at start, if sweeping is on at all */
	next_reconcile = (my_slot == 0 && trace_reconcile_interval_s > 0) ? 0 : DT_NOEND;
	connect_to_database();
	pgstat_report_appname("trace_ext worker");

	worker_cxt = AllocSetContextCreate(TopMemoryContext, "trace_ext worker",
									   ALLOCSET_DEFAULT_SIZES);
	adapter_owner = ResourceOwnerCreate(NULL, "trace_ext adapters");
	trace_secrets_load();
	trace_http_init();

	for (;;)
	{
		if (!extension_ok)
		{
			wait_for_extension();
			extension_ok = true;
			PG_TRY();
			{
				trace_queue_release_orphans();
			}
			PG_CATCH();
			{
				EmitErrorReport();
				FlushErrorState();
				AbortOutOfAnyTransaction();
			}
			PG_END_TRY();
		}

		/*
		 * Between passes, no query: a pass runs only when a commit woke us
		 * or the earliest row we know of is due.  Waking up for
		 * trace.poll_interval alone costs nothing but the wakeup.
		 */
		if (woken || GetCurrentTimestamp() >= next_due)
		{
			trace_publish_wake_at(DT_NOEND);
			next_due = run_pass_guarded(&extension_ok);
		}
		cleanup_if_due();
		if (reconcile_if_due())
			next_due = 0;		/* rows queued: run a pass now */
		/* rows due later than next_due need not wake us (see wake.c) */
		trace_publish_wake_at(next_due);
		woken = sleep_until(Min(Min(next_due, next_cleanup), next_reconcile));
	}
}
