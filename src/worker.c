/*
 * worker.c: the delivery workers' main loop.
 *
 * trace.workers background workers start once recovery has finished (a
 * standby runs none), connect to trace.database and wait quietly until
 * the extension exists there.  Each then loops: sleep until the earliest
 * due_at, trace.poll_interval at most, or until an enqueuing transaction
 * commits and sets our latch; then run a pass.
 *
 * This file is the one place that sequences a pass; the modules it calls
 * do one step each and never call back:
 *   claim    queue.c, in a short transaction that worker.c opens, in which
 *            payload.c builds the payloads (consent checked at send time)
 *            and the rows turned down are cancelled;
 *   prepare  the row's adapter (adapters/), outside any transaction;
 *   send     http.c, many requests in flight, the pipe topped up as they
 *            finish;
 *   explain  outcome.c reads the response, the adapter may add to it;
 *   record   queue.c, one short transaction per round (retry or abandon:
 *            the rule is outcome.c's);
 *   count    metrics.c.
 * No transaction or snapshot is open while requests are in flight.  An
 * error in a pass is logged, its transaction aborted, its transfers
 * dropped (their leases end and they are sent again), and the worker
 * carries on; SIGTERM ends it, SIGHUP reloads settings.  A worker that
 * exits is restarted by the postmaster after a second.
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
#include "src/http.h"
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

/*
 * What a pass knows while it runs: the items finished and not yet
 * recorded, and the requests each adapter has in flight.
 */
typedef struct PassState
{
	TraceItem **done;			/* finished, to be recorded */
	int			ndone;
	int			done_size;
	int			inflight[TRACE_MAX_ADAPTERS];
	int			inflight_total;
	int			claimed;		/* rows claimed by the pass */
	List	   *notify;			/* NOTIFY trace_alert payloads to send */
	bool		origin_checked; /* the queue's cluster was looked at */
	bool		held;			/* the queue comes from another cluster */
} PassState;

static MemoryContext worker_cxt = NULL;

static void gather(long ms);

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

/* An item is finished: keep it for the next record round. */
static void
push_done(PassState *pass, TraceItem *item)
{
	if (pass->ndone == pass->done_size)
	{
		pass->done_size = Max(64, pass->done_size * 2);
		pass->done = pass->done
			? repalloc(pass->done, sizeof(TraceItem *) * pass->done_size)
			: MemoryContextAlloc(worker_cxt, sizeof(TraceItem *) * pass->done_size);
	}
	pass->done[pass->ndone++] = item;
}

/*
 * The tracker's health learns from the attempt (health.c); a breaker that
 * opened or closed is announced (WARNING now, NOTIFY with the record).
 */
static void
note_health(PassState *pass, TraceItem *item)
{
	TraceHealthNote note;
	TraceHealthEvent event = trace_health_report(item->adapter, &item->out,
												 item->probe, &note);
	char	   *notify;

	if (event == TRACE_HEALTH_NONE)
		return;
	notify = trace_health_announce(event, &note);
	if (notify != NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(worker_cxt);

		pass->notify = lappend(pass->notify, notify);
		MemoryContextSwitchTo(old);
	}
	if (event == TRACE_HEALTH_CLOSED)
		trace_wake_all();		/* the backlog may go, from every worker */
}

/* Prepare: hand claimed items to their adapters, then send or finish. */
static void
dispatch(PassState *pass, TraceItem *items, int n)
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
			note_health(pass, item);
			push_done(pass, item);
			continue;
		}
		memset(&req, 0, sizeof(req));
		CurrentResourceOwner = adapter_owner;
		prep = trace_adapter(item->adapter)->prepare(item, &req);
		CurrentResourceOwner = NULL;
		if (prep == TRACE_PREP_DONE)
		{
			note_health(pass, item);
			push_done(pass, item);
			continue;
		}
		trace_http_start(item, &req);
		pass->inflight[item->adapter]++;
		pass->inflight_total++;
	}
}

/*
 * Explain: what the transport says of each finished request becomes its
 * item's outcome, which the adapter may refine from the response body.
 */
static void
collect_responses(PassState *pass)
{
	TraceResponse resp;

	while (trace_http_next(&resp))
	{
		TraceItem  *item = resp.tag;
		const TraceAdapter *adapter = trace_adapter(item->adapter);

		pass->inflight[item->adapter]--;
		pass->inflight_total--;
		trace_outcome_from_response(&item->out, &resp);
		if (!item->out.delivered && resp.body[0] != '\0' && adapter->explain)
			adapter->explain(item, resp.body);
		note_health(pass, item);
		push_done(pass, item);
	}
}

/*
 * What a claim may take of each tracker: as many rows as the slots allow,
 * or fewer (its rate limit, its breaker's probe), or none (its share of the
 * slots in use, its breaker open, a Retry-After pause).
 */
typedef struct ClaimPlan
{
	int			allow[TRACE_MAX_ADAPTERS];	/* rows; slots: no limit of its own */
	bool		probe[TRACE_MAX_ADAPTERS];
	bool		blocked[TRACE_MAX_ADAPTERS];	/* rows not due for us before
												 * wait_until */
	TimestampTz wait_until;		/* earliest time a blocked tracker opens */
	bool		capped;			/* a tracker left out for its share */
} ClaimPlan;

static void
plan_claim(PassState *pass, int slots, ClaimPlan *plan)
{
	int			enabled = 0;
	int			cap = Max(1, (trace_batch_size * 3) / 4);

	memset(plan, 0, sizeof(*plan));
	plan->wait_until = DT_NOEND;
	for (int a = 0; a < trace_num_adapters; a++)
		enabled += trace_adapter_enabled(a) ? 1 : 0;
	for (int a = 0; a < trace_num_adapters; a++)
	{
		TimestampTz until;

		/*
		 * With several trackers, none may take every slot: a hanging
		 * tracker must not hold up the others' deliveries.
		 */
		if (enabled > 1 && pass->inflight[a] >= cap)
		{
			plan->capped = true;
			continue;
		}
		plan->allow[a] = trace_health_allow(a, slots, &plan->probe[a], &until);
		if (until != DT_NOEND)
		{
			plan->blocked[a] = true;
			plan->wait_until = Min(plan->wait_until, until);
		}
	}
}

/*
 * Claim the rows the plan allows, in the claim transaction: one statement
 * for the trackers without a limit of their own, one per tracker with one.
 * Returns the rows claimed (*items, allocated in cxt); *full says whether
 * the unlimited trackers had as many due rows as the slots.
 */
static int
claim_planned(ClaimPlan *plan, int slots, MemoryContext cxt, TraceItem **items,
			  bool *full)
{
	bool		skip[TRACE_MAX_ADAPTERS];
	TraceItem  *all = NULL;
	int			n = 0;

	*full = false;
	/* the trackers with no limit of their own, together */
	for (int a = 0; a < trace_num_adapters; a++)
		skip[a] = plan->allow[a] < slots || plan->probe[a];
	for (int a = 0; a < trace_num_adapters; a++)
		if (!skip[a])
		{
			n = trace_queue_claim(slots, skip, cxt, &all);
			*full = (n == slots);
			break;
		}
	/* then each limited one (rate limit, probe) on its own */
	for (int a = 0; a < trace_num_adapters && n < slots; a++)
	{
		TraceItem  *more;
		int			want = Min(plan->allow[a], slots - n);
		int			got;
		TimestampTz again;

		if (!(plan->allow[a] < slots || plan->probe[a]) || plan->allow[a] == 0)
			continue;
		for (int b = 0; b < trace_num_adapters; b++)
			skip[b] = (b != a);
		got = want > 0 ? trace_queue_claim(want, skip, cxt, &more) : 0;
		again = trace_health_claimed(a, slots, plan->allow[a], got, plan->probe[a]);
		if (again != DT_NOEND)
		{
			plan->blocked[a] = true;
			plan->wait_until = Min(plan->wait_until, again);
		}
		if (got == 0)
			continue;
		if (plan->probe[a])
			more[0].probe = true;
		all = all ? repalloc(all, sizeof(TraceItem) * (n + got))
			: MemoryContextAlloc(cxt, sizeof(TraceItem) * got);
		memcpy(all + n, more, sizeof(TraceItem) * got);
		n += got;
	}
	*items = all;
	return n;
}

/*
 * Say once (per worker, until it changes) that the queue was filled on
 * another cluster and nothing is sent, and how to release it.
 */
static void
warn_held(bool held, int64 foreign)
{
	static bool warned = false;

	if (held && !warned)
		ereport(WARNING,
				(errmsg("the delivery queue was filled on another cluster (system identifier " UINT64_FORMAT "); nothing is sent from it",
						(uint64) foreign),
				 errdetail("This cluster was restored from a dump, copied, or upgraded with pg_upgrade: sending its rows here could post a copy's trades to the real trackers."),
				 errhint("If this cluster is now the one that delivers, run SELECT trace.adopt_queue(); to discard the copied rows, SELECT trace.cancel_queue().")));
	warned = held;
}

/*
 * Lease the rows just claimed (lease.c), their locks held; the ones another
 * worker is sending are dropped.  Returns how many are left, in items.
 */
static int
lease_claimed(TraceItem *items, int n)
{
	TimestampTz expires = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  2 * (int64) trace_http_timeout_ms + 5000);
	int			kept = 0;

	if (n == 0 || trace_lease_take(items, n, expires) == n)
		return n;
	for (int i = 0; i < n; i++)
		if (!items[i].lease_lost)
			items[kept++] = items[i];
	return kept;
}

/* The cancelled rows' cancellation has committed: their leases end. */
static void
end_cancelled_leases(TraceItem *items, int n)
{
	TraceItem **cancelled = palloc(sizeof(TraceItem *) * Max(n, 1));
	int			ncancelled = 0;

	for (int i = 0; i < n; i++)
		if (items[i].cancelled)
			cancelled[ncancelled++] = &items[i];
	trace_lease_end(cancelled, ncancelled);
	pfree(cancelled);
}

/*
 * Claim: up to `slots` due rows in one short transaction, as the trackers'
 * health allows, with their payloads built from the trades as they are now
 * and the rows that may not be sent any more cancelled; then hand them to
 * their adapters.  False when fewer were due (*next_due: when the next is,
 * or a held-back tracker may go).  *capped says whether an adapter was left
 * out for having its share of the slots.
 */
static bool
claim_more(PassState *pass, int slots, TimestampTz *next_due, bool *capped)
{
	ClaimPlan	plan;
	TraceBatch *batch;
	MemoryContext cxt;
	TraceItem  *items;
	bool		full;
	int			n;

	plan_claim(pass, slots, &plan);
	*capped = plan.capped;

	cxt = AllocSetContextCreate(worker_cxt, "trace_ext batch", ALLOCSET_DEFAULT_SIZES);
	batch = MemoryContextAlloc(cxt, sizeof(TraceBatch));
	batch->cxt = cxt;

	trace_queue_begin("trace_ext: claiming due rows");

	/*
	 * The claim writes no row (cancellations aside); its locks and leases
	 * mean nothing after a crash, which ends every lease anyway: no need to
	 * wait for its commit to be flushed.
	 */
	(void) set_config_option("synchronous_commit", "off", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	trace_queue_use_indexes();
	if (!pass->origin_checked)
	{
		int64		foreign = 0;

		pass->held = trace_queue_held(&foreign);
		pass->origin_checked = true;
		warn_held(pass->held, foreign);
	}
	if (pass->held)
	{
		trace_queue_commit();
		MemoryContextDelete(cxt);
		*next_due = DT_NOEND;	/* until trace.adopt_queue() wakes us */
		return false;
	}
	n = claim_planned(&plan, slots, cxt, &items, &full);
	n = lease_claimed(items, n);
	if (n > 0)
	{
		/* payloads must outlive the transaction: built in the batch's context */
		trace_payload_build(items, n, cxt);
		trace_queue_cancel(items, n);
	}
	if (full)
		*next_due = 0;
	else
	{
		/* not inside Min(): a macro, it would run the query twice */
		TimestampTz due = trace_queue_next_due(plan.blocked);

		*next_due = Min(due, plan.wait_until);
	}
	trace_queue_commit();
	end_cancelled_leases(items, n);
	pass->claimed += n;

	if (n == 0)
		MemoryContextDelete(cxt);
	else
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		batch->outstanding = n;
		for (int i = 0; i < n; i++)
			items[i].batch = batch;
		dispatch(pass, items, n);
		MemoryContextSwitchTo(old);
	}
	return full;
}

/* Warn of the rows abandoned, once their recording has committed. */
static void
warn_abandoned(List *rows)
{
	ListCell   *lc;

	foreach(lc, rows)
	{
		TraceAbandoned *row = lfirst(lc);

		ereport(WARNING,
				(errmsg("giving up on trade %s for adapter %s after %s attempts: %s",
						row->trade, row->adapter, row->attempts,
						row->error ? row->error : "unknown error"),
				 errhint("Fix the cause, then call trace.retry() or trace.retry_abandoned().")));
	}
}

/*
 * Record and count: every finished item in one transaction.  Returns the
 * earliest retry scheduled (DT_NOEND if none).
 */
static TimestampTz
record_done(PassState *pass)
{
	TimestampTz retry_at;
	List	   *abandoned = NIL;
	int			delivered = 0;
	MemoryContext scratch = AllocSetContextCreate(worker_cxt, "trace_ext record",
												  ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(scratch);

	for (int i = 0; i < pass->ndone; i++)
	{
		trace_metrics_count(pass->done[i]);
		delivered += pass->done[i]->out.delivered ? 1 : 0;
	}
	retry_at = trace_queue_record(pass->done, pass->ndone, &abandoned);
	trace_lease_end(pass->done, pass->ndone);
	trace_outcome_log_failures(pass->done, pass->ndone);
	warn_abandoned(abandoned);
	trace_queue_notify(pass->notify);
	pass->notify = NIL;
	trace_worker_note_work(pass->inflight_total, delivered, pass->ndone - delivered);
	for (int i = 0; i < pass->ndone; i++)
		batch_release(pass->done[i]);
	pass->ndone = 0;
	MemoryContextSwitchTo(old);
	MemoryContextDelete(scratch);
	return retry_at;
}

/*
 * How long to wait for transfers: until something happens (a socket, a
 * commit setting our latch), but no later than the earliest row left
 * unclaimed, a paced claim or record (see pace_claim), and
 * trace.poll_interval (settings are looked at in between).
 */
static int
wait_ms(TimestampTz claim_due, TimestampTz paced_until)
{
	long		ms = trace_poll_interval_ms;
	TimestampTz until = Min(claim_due, paced_until);

	if (until != DT_NOEND)
		ms = Min(ms, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until));
	return (int) Max(ms, 1);
}

/*
 * Pacing within a pass.  Every claim and every record is a transaction,
 * whatever it carries (a few hundred microseconds).  While trades close
 * one by one, each commit wakes the worker and each response comes alone:
 * claiming at every wake and recording at every response cost a claim and
 * a record transaction for every few deliveries.  So, within a pass, a
 * claim that would follow a small one (fewer than a quarter of
 * trace.batch_size) by less than PACE_MS waits for the rest of that time,
 * and finished requests are recorded once a quarter of trace.batch_size of
 * them are in, or nothing else is in flight, or the first of them has
 * waited PACE_MS.  A close waits PACE_MS longer at most.  At 1,000 closes
 * a second a claim then carries about 12 rows instead of 5, and a delivery
 * costs about 155 us of the worker's CPU instead of 215.  A busy worker
 * claims and records big batches and is never paced; a quiet one sends a
 * lone close at once (the first claim of a pass is not paced).
 */
#define PACE_MS		10

/* The earlier of two pacing times (0: none); DT_NOEND if neither. */
static TimestampTz
paced_until(TimestampTz claim_at, TimestampTz record_at)
{
	if (claim_at == 0)
		return record_at == 0 ? DT_NOEND : record_at;
	if (record_at == 0)
		return claim_at;
	return Min(claim_at, record_at);
}

/* When a claim may run: now (0), or when the last small claim's time is up. */
static TimestampTz
pace_claim(TimestampTz last_claim_at, int last_claimed)
{
	if (last_claim_at == 0 || last_claimed >= Max(1, trace_batch_size / 4))
		return 0;
	return TimestampTzPlusMilliseconds(last_claim_at, PACE_MS);
}

/* When finished requests should be recorded: now (0), or later. */
static TimestampTz
pace_record(const PassState *pass, TimestampTz first_done_at)
{
	if (pass->ndone >= Max(1, trace_batch_size / 4) || pass->inflight_total == 0)
		return 0;
	return TimestampTzPlusMilliseconds(first_done_at, PACE_MS);
}

/*
 * One pass: keep claiming, sending and recording until nothing is in
 * flight and nothing more is due.  Returns when the next row is due;
 * *claimed is how many rows the pass claimed.
 */
static TimestampTz
run_pass(int *claimed, bool *held)
{
	PassState	pass;
	bool		latch_set = true;	/* we were woken, or it is time */
	bool		may_have_due = true;
	bool		capped = false;
	TimestampTz next_due = DT_NOEND;
	TimestampTz claim_due = DT_NOEND;
	TimestampTz claimed_at = 0;
	int			last_claimed = 0;
	TimestampTz first_done_at = 0;

	memset(&pass, 0, sizeof(pass));
	for (;;)
	{
		int			slots;
		TimestampTz now;
		bool		want_claim;
		TimestampTz claim_at;
		TimestampTz record_at = 0;
		int			wait;

		/*
		 * A commit woke us, or a signal.  The latch is reset before the
		 * flags it stands for are looked at: a SIGHUP that comes after
		 * reload_if_asked() sets it again, and the next wait returns.
		 */
		if (latch_set)
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

		/*
		 * trace.paused: claim nothing; what is in flight finishes and is
		 * recorded.  A reload that turns it off sets the latch.
		 */
		if (trace_paused)
		{
			may_have_due = false;
			claim_due = DT_NOEND;
		}

		trace_http_keep_connections(trace_batch_size);
		slots = trace_batch_size - pass.inflight_total;
		now = GetCurrentTimestamp();
		want_claim = may_have_due && slots > 0 &&
			(pass.inflight_total == 0 || slots >= Max(1, trace_batch_size / 2));
		claim_at = want_claim ? pace_claim(claimed_at, last_claimed) : 0;
		if (want_claim && now >= claim_at)
		{
			int			before = pass.claimed;

			claim_due = DT_NOEND;
			claimed_at = now;
			may_have_due = claim_more(&pass, slots, &claim_due, &capped);
			last_claimed = pass.claimed - before;
			claim_at = 0;
		}

		collect_responses(&pass);
		trace_worker_note_work(pass.inflight_total, 0, 0);
		if (pass.ndone > 0)
		{
			now = GetCurrentTimestamp();
			if (first_done_at == 0)
				first_done_at = now;
			record_at = pace_record(&pass, first_done_at);
		}
		if (pass.ndone > 0 && now >= record_at)
		{
			/* not inside Min(): a macro, it would record twice */
			TimestampTz retry_at = record_done(&pass);

			next_due = Min(next_due, retry_at);
			record_at = 0;
			first_done_at = 0;
			/* slots freed: an adapter left out at its cap may go now */
			if (capped)
				may_have_due = true;
		}

		/*
		 * Rows that were due at the claim but not claimed are locked by
		 * another transaction: they are left to the next pass, after a
		 * short sleep (see sleep_until), rather than spun on here.
		 */
		if (pass.inflight_total == 0 && pass.ndone == 0 && !may_have_due)
			break;
		wait = wait_ms(claim_due, paced_until(claim_at, record_at));
		if (pass.inflight_total == 0 && claim_at != 0)
		{
			/* nothing to wait for but the claim's pace (commits may wait) */
			gather(wait);
			latch_set = true;
		}
		else
			latch_set = trace_http_wait(wait);
	}
	if (pass.done)
		pfree(pass.done);
	*claimed = pass.claimed;
	*held = pass.held;
	if (trace_paused)
		return DT_NOEND;		/* until a reload, or trace.poll_interval */
	return Min(next_due, claim_due);
}

/*
 * After an error in the worker (reported or not by the caller, as
 * `report` says): forget it, abort its transaction, and drop what a pass
 * held: transfers in flight, outcomes not recorded (their leases end, so
 * their rows are sent again), resources an adapter had registered, the
 * pass's memory.
 */
static void
recover_after_error(bool report)
{
	HOLD_INTERRUPTS();
	if (report)
		EmitErrorReport();
	AbortOutOfAnyTransaction();
	ResourceOwnerRelease(adapter_owner, RESOURCE_RELEASE_BEFORE_LOCKS, false, false);
	ResourceOwnerRelease(adapter_owner, RESOURCE_RELEASE_LOCKS, false, false);
	ResourceOwnerRelease(adapter_owner, RESOURCE_RELEASE_AFTER_LOCKS, false, false);
	CurrentResourceOwner = NULL;
	trace_http_abort_all();
	trace_lease_end_mine();		/* the rows dropped go again at once */
	MemoryContextSwitchTo(TopMemoryContext);
	FlushErrorState();
	MemoryContextReset(worker_cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	RESUME_INTERRUPTS();
}

/* Run a pass; on error, log it, clean up and carry on. */
static TimestampTz
run_pass_guarded(bool *extension_ok, int *claimed, bool *held)
{
	TimestampTz next_due = DT_NOEND;

	PG_TRY();
	{
		next_due = run_pass(claimed, held);
	}
	PG_CATCH();
	{
		recover_after_error(true);
		*extension_ok = false;
		*claimed = 0;
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
	recover_after_error(!yielded);
	if (yielded)
		ereport(LOG,
				(errmsg("%s gave way to a lock held by another session; retrying in %d s",
						what, HOUSEKEEPING_RETRY_MS / 1000)));
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
					(errmsg("deleted " INT64_FORMAT " queue rows older than trace.ttl",
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
					(errmsg("reconciliation sweep queued " INT64_FORMAT " rows",
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
	int			rc;

	/* a reload asked for while the latch was being reset: no sleep first */
	if (ConfigReloadPending)
		timeout_ms = 0;
	rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
				   Max(timeout_ms, 0), PG_WAIT_EXTENSION);
	CHECK_FOR_INTERRUPTS();
	reload_if_asked();
	return (rc & WL_LATCH_SET) != 0;
}

/*
 * Sleep until the next row is due, trace.poll_interval at most; true if
 * woken (a commit queued or changed rows, or a signal came).  claimed: the
 * rows the last pass claimed.
 */
static bool
sleep_until(TimestampTz when, int claimed)
{
	long		timeout = trace_poll_interval_ms;

	if (when != DT_NOEND)
	{
		long		until = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), when);

		timeout = Min(timeout, until);
		if (claimed == 0)
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
					(errmsg("waiting for CREATE EXTENSION trace_ext in database \"%s\"",
							trace_database)));
		logged = true;
		nap(WAITING_LOOK_MS);
	}
	if (logged)
		ereport(LOG, (errmsg("extension found; delivering")));
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
					(errmsg("database \"%s\" exists now; the worker restarts to connect to it",
							trace_database)));
			proc_exit(1);
		}
		if (!logged)
			ereport(LOG,
					(errmsg("waiting for database \"%s\" (trace.database) to be created",
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
				(errmsg("default_transaction_read_only is on in database \"%s\"; the worker's own transactions are read-write all the same",
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
	/* its statements are short; compiling one costs more than running it */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);
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

/*
 * A commit woke us while closes come in one by one: wait a few
 * milliseconds for the next ones, so that a pass carries more than one or
 * two rows (each pass costs a claim and a record transaction, whatever
 * it carries).  Signals still end the wait; the latch is left set.
 */
#define COALESCE_MS		5

static void
gather(long ms)
{
	(void) WaitLatch(NULL, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, ms, PG_WAIT_EXTENSION);
	CHECK_FOR_INTERRUPTS();
}

/* A worker that exits ends its leases: its rows can be sent at once. */
static void
end_leases_at_exit(int code, Datum arg)
{
	trace_lease_end_mine();
}

void
trace_worker_main(Datum arg)
{
	int			slot = DatumGetInt32(arg);
	bool		extension_ok = false;
	bool		woken = true;
	int			claimed = 0;
	bool		held = false;
	TimestampTz next_due = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	trace_is_worker = true;
	trace_worker_slot_attach(slot);
	before_shmem_exit(end_leases_at_exit, (Datum) 0);
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
			trace_worker_set_state(TRACE_WORKER_WAITING);
			wait_for_extension();
			extension_ok = true;
			PG_TRY();
			{
				trace_queue_release_orphans();
			}
			PG_CATCH();
			{
				recover_after_error(true);
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
			if (woken && claimed < trace_batch_size / 4)
				gather(COALESCE_MS);
			trace_publish_wake_at(DT_NOEND);
			trace_worker_set_state(TRACE_WORKER_SENDING);
			trace_worker_note_pass(true);
			next_due = run_pass_guarded(&extension_ok, &claimed, &held);
			trace_worker_note_pass(false);
		}
		trace_worker_set_state(trace_paused ? TRACE_WORKER_PAUSED :
							   held ? TRACE_WORKER_HELD : TRACE_WORKER_IDLE);
		cleanup_if_due();
		if (reconcile_if_due())
			next_due = 0;		/* rows queued: run a pass now */
		/* rows due later than next_due need not wake us (see wake.c) */
		trace_publish_wake_at(next_due);
		woken = sleep_until(Min(Min(next_due, next_cleanup), next_reconcile), claimed);
	}
}
