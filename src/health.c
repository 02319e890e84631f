/*
 * health.c: each tracker's health, shared by all workers.
 *
 * Three things decide whether a worker may send to a tracker now:
 * - its circuit breaker.  After trace.breaker_threshold consecutive
 *   tracker-level failures (no connection, TLS, timeout, 5xx, 429), across
 *   rows and workers, it opens: nobody claims that tracker's rows.  At
 *   next_probe_at one worker sends one real due row as a probe (the breaker
 *   is half open meanwhile); an answer closes it and the backlog drains, a
 *   tracker-level failure opens it again for longer (the retry schedule:
 *   base, 6 x base, ... capped at trace.retry_backoff_cap).  Any answer that
 *   is not a tracker-level failure (2xx, or a 4xx for one payload) shows the
 *   tracker is up: it resets the count and closes an open breaker.
 * - a pause: a 429 or 503 with Retry-After holds the whole tracker until
 *   then, not just the row that got it.
 * - its rate limit, trace.max_requests_per_second: a token bucket (burst a
 *   twentieth of a second's worth), so a backlog reaches it at that rate.
 * A row whose attempt failed at tracker level while the breaker is not
 * closed is "held": put back without using up an attempt, so that a long
 * outage abandons nothing.  The state lives in shared memory, one struct
 * per adapter under its own spinlock; it is lost with shared memory when
 * the server restarts after a crash, and rebuilt from the next failures.
 */
#include "postgres.h"

#include <math.h>

#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/timestamp.h"

#include "src/trace_ext.h"

PG_FUNCTION_INFO_V1(trace_tracker_health);

/* Longest pause a Retry-After may ask for. */
#define MAX_PAUSE_S		(24 * 3600)

typedef enum BreakerState
{
	BREAKER_CLOSED = 0,
	BREAKER_OPEN,
	BREAKER_HALF_OPEN
} BreakerState;

static const char *const state_names[] = {"closed", "open", "half_open"};

typedef struct TrackerHealth
{
	slock_t		mutex;
	BreakerState state;
	TimestampTz since;			/* closed: when it closed; else when it opened */
	int			consecutive_failures;
	int			failed_probes;	/* since it opened */
	TimestampTz next_probe_at;	/* open: when a probe may go */
	TimestampTz probe_deadline; /* half open: when a lost probe is retaken */
	TimestampTz paused_until;	/* Retry-After; 0: none */
	bool		has_error;
	char		last_error[TRACE_ERROR_LEN];
	double		tokens;			/* rate limit bucket */
	TimestampTz refilled_at;
	pg_atomic_uint64 throttled;
} TrackerHealth;

static TrackerHealth *health = NULL;	/* [TRACE_MAX_ADAPTERS] */

int			trace_breaker_threshold = 5;
int			trace_max_requests_per_second = 0;

Size
trace_health_shmem_size(void)
{
	return mul_size(sizeof(TrackerHealth), TRACE_MAX_ADAPTERS);
}

void
trace_health_shmem_init(void)
{
	bool		found;
	TimestampTz now = GetCurrentTimestamp();

	health = ShmemInitStruct("trace_ext tracker health", trace_health_shmem_size(),
							 &found);
	if (found)
		return;
	memset(health, 0, trace_health_shmem_size());
	for (int a = 0; a < TRACE_MAX_ADAPTERS; a++)
	{
		SpinLockInit(&health[a].mutex);
		health[a].state = BREAKER_CLOSED;
		health[a].since = now;
		health[a].refilled_at = now;
		pg_atomic_init_u64(&health[a].throttled, 0);
	}
}

/*
 * The bucket holds a twentieth of a second's worth of requests, at least
 * one: no second sees more than the rate and that much.
 */
static double
burst(void)
{
	return Max(1.0, trace_max_requests_per_second / 20.0);
}

static void
refill(TrackerHealth *h, TimestampTz now)
{
	double		elapsed = (now - h->refilled_at) / 1e6;

	if (elapsed > 0)
		h->tokens = Min(burst(), h->tokens + elapsed * trace_max_requests_per_second);
	h->refilled_at = now;
}

/* When the bucket will hold a whole token again. */
static TimestampTz
next_token(TrackerHealth *h, TimestampTz now)
{
	double		missing = 1.0 - (h->tokens - floor(h->tokens));

	return TimestampTzPlusMilliseconds(now,
									   (int64) ceil(missing * 1000.0 / trace_max_requests_per_second));
}

/* The lease of a probe: like a claimed row's (see queue.c). */
static TimestampTz
probe_deadline(TimestampTz now)
{
	return TimestampTzPlusMilliseconds(now, 2 * (int64) trace_http_timeout_ms + 5000);
}

/*
 * How many of `want` rows of tracker `id` a worker may claim now.  *probe:
 * the one row allowed is the half-open breaker's probe.  When fewer than
 * want are allowed because of the tracker's state, *wait_until says when
 * to look again (DT_NOEND: when something else wakes the worker); the
 * caller leaves the tracker's rows out of its next-due time until then.
 */
int
trace_health_allow(TraceAdapterId id, int want, bool *probe, TimestampTz *wait_until)
{
	TrackerHealth *h = &health[id];
	TimestampTz now = GetCurrentTimestamp();
	int			allowed = want;

	*probe = false;
	*wait_until = DT_NOEND;
	if (health == NULL)
		return want;
	SpinLockAcquire(&h->mutex);
	if (h->paused_until > now)
	{
		allowed = 0;
		*wait_until = h->paused_until;
	}
	else if (h->state == BREAKER_OPEN && now < h->next_probe_at)
	{
		allowed = 0;
		*wait_until = h->next_probe_at;
	}
	else if (h->state == BREAKER_HALF_OPEN && now < h->probe_deadline)
	{
		allowed = 0;
		*wait_until = h->probe_deadline;
	}
	else if (h->state != BREAKER_CLOSED)
	{
		/* open and due, or a probe that was lost with its worker */
		h->state = BREAKER_HALF_OPEN;
		h->probe_deadline = probe_deadline(now);
		*probe = true;
		allowed = 1;
	}
	else if (trace_max_requests_per_second > 0)
	{
		refill(h, now);
		allowed = Min(want, (int) h->tokens);
		h->tokens -= allowed;
		if (allowed == 0)
			*wait_until = next_token(h, now);
	}
	SpinLockRelease(&h->mutex);
	return allowed;
}

/*
 * A claim of the tracker's rows took `got` of the `allowed` (of `want`).
 * Fewer: give the unused tokens back, or the probe (the breaker stays
 * open, its probe due: the next due row of the tracker is the probe).  All
 * of them, fewer than wanted: the rate limit may have held rows back
 * (throttled); returns when the next token comes, for the worker to look
 * again then (DT_NOEND otherwise: an idle tracker wakes nobody).
 */
TimestampTz
trace_health_claimed(TraceAdapterId id, int want, int allowed, int got, bool probe)
{
	TrackerHealth *h = &health[id];
	TimestampTz again = DT_NOEND;

	if (health == NULL)
		return again;
	if (!probe && got == allowed && got > 0 && allowed < want)
	{
		pg_atomic_fetch_add_u64(&h->throttled, 1);
		SpinLockAcquire(&h->mutex);
		again = next_token(h, GetCurrentTimestamp());
		SpinLockRelease(&h->mutex);
		return again;
	}
	if (got >= allowed)
		return again;
	SpinLockAcquire(&h->mutex);
	if (probe)
	{
		if (h->state == BREAKER_HALF_OPEN)
			h->state = BREAKER_OPEN;
	}
	else if (trace_max_requests_per_second > 0)
		h->tokens = Min(burst(), h->tokens + (allowed - got));
	SpinLockRelease(&h->mutex);
	return again;
}

/* No connection, TLS, timeout, 5xx, 429: the tracker, not the row. */
static bool
tracker_level(const TraceOutcome *out)
{
	if (out->delivered)
		return false;
	switch (out->reason)
	{
		case TRACE_REASON_TIMEOUT:
		case TRACE_REASON_CONNECT:
		case TRACE_REASON_TLS:
		case TRACE_REASON_HTTP_5XX:
			return true;
		default:
			return out->http_status == 429;
	}
}

/*
 * Take the outcome of one attempt of tracker `id` into account.  Returns
 * what changed for the breaker (with the details in *note), and marks the
 * outcome held when it is a tracker-level failure while the breaker is not
 * closed: the row is then put back without using up an attempt, due when
 * the tracker may be tried again.
 */
TraceHealthEvent
trace_health_report(TraceAdapterId id, TraceOutcome *out, bool probe, TraceHealthNote *note)
{
	TrackerHealth *h = &health[id];
	TimestampTz now = GetCurrentTimestamp();
	TraceHealthEvent event = TRACE_HEALTH_NONE;
	TimestampTz again = 0;

	if (health == NULL)
		return event;
	memset(note, 0, sizeof(*note));
	note->adapter = id;
	SpinLockAcquire(&h->mutex);
	if (out->retry_after > 0 && (out->http_status == 429 || out->http_status == 503))
		h->paused_until = Max(h->paused_until,
							  TimestampTzPlusMilliseconds(now,
														  (int64) Min(out->retry_after, MAX_PAUSE_S) * 1000));
	if (tracker_level(out))
	{
		h->consecutive_failures++;
		h->has_error = true;
		strlcpy(h->last_error, out->error, sizeof(h->last_error));
		if (h->state == BREAKER_HALF_OPEN && probe)
		{
			h->failed_probes++;
			h->state = BREAKER_OPEN;
			h->next_probe_at = TimestampTzPlusMilliseconds(now,
														   (int64) (trace_outcome_backoff(h->failed_probes + 1) * 1000));
			event = TRACE_HEALTH_STILL_OPEN;
		}
		else if (h->state == BREAKER_CLOSED && trace_breaker_threshold > 0 &&
				 h->consecutive_failures >= trace_breaker_threshold)
		{
			h->state = BREAKER_OPEN;
			h->since = now;
			h->failed_probes = 0;
			h->next_probe_at = TimestampTzPlusMilliseconds(now,
														   (int64) (trace_outcome_backoff(1) * 1000));
			event = TRACE_HEALTH_OPENED;
		}
		if (h->state != BREAKER_CLOSED)
		{
			out->held = true;
			again = Max(h->next_probe_at, h->paused_until);
		}
	}
	else
	{
		h->consecutive_failures = 0;
		if (h->state != BREAKER_CLOSED)
		{
			note->open_since = h->since;
			h->state = BREAKER_CLOSED;
			h->since = now;
			event = TRACE_HEALTH_CLOSED;
		}
	}
	note->consecutive_failures = h->consecutive_failures;
	note->next_probe_at = h->next_probe_at;
	if (event == TRACE_HEALTH_OPENED || event == TRACE_HEALTH_STILL_OPEN)
		note->open_since = h->since;
	SpinLockRelease(&h->mutex);

	if (out->held)
		out->hold_s = Max(0.0, (again - now) / 1e6);
	strlcpy(note->last_error, out->error, sizeof(note->last_error));
	return event;
}

/* Is the tracker's breaker open or half open? */
bool
trace_health_breaker_open(TraceAdapterId id)
{
	TrackerHealth *h = &health[id];
	bool		open;

	if (health == NULL)
		return false;
	SpinLockAcquire(&h->mutex);
	open = h->state != BREAKER_CLOSED;
	SpinLockRelease(&h->mutex);
	return open;
}

/* How often the worker held the tracker's due rows back for its rate limit. */
uint64
trace_health_throttled(TraceAdapterId id)
{
	return health ? pg_atomic_read_u64(&health[id].throttled) : 0;
}

/*
 * Say that a breaker opened or closed: a WARNING now, and the NOTIFY
 * trace_alert payload (JSON) for the worker to send.
 */
char *
trace_health_announce(TraceHealthEvent event, const TraceHealthNote *note)
{
	const char *name = trace_adapter_name(note->adapter);
	StringInfoData json;

	initStringInfo(&json);
	switch (event)
	{
		case TRACE_HEALTH_OPENED:
			ereport(WARNING,
					(errmsg("tracker %s is failing: breaker open after %d consecutive failures (last: %s); next probe at %s",
							name, note->consecutive_failures, note->last_error,
							timestamptz_to_str(note->next_probe_at)),
					 errdetail("Its rows are kept, without using up attempts, until a probe gets an answer.")));
			appendStringInfo(&json, "{\"event\": \"breaker_open\", \"adapter\": ");
			escape_json(&json, name);
			appendStringInfo(&json, ", \"consecutive_failures\": %d, \"last_error\": ",
							 note->consecutive_failures);
			escape_json(&json, note->last_error);
			appendStringInfoString(&json, ", \"next_probe_at\": ");
			escape_json(&json, timestamptz_to_str(note->next_probe_at));
			appendStringInfoChar(&json, '}');
			return json.data;
		case TRACE_HEALTH_STILL_OPEN:
			ereport(LOG,
					(errmsg("tracker %s still failing (probe: %s); next probe at %s",
							name, note->last_error,
							timestamptz_to_str(note->next_probe_at))));
			return NULL;
		case TRACE_HEALTH_CLOSED:
			{
				long		secs;
				int			usecs;

				TimestampDifference(note->open_since, GetCurrentTimestamp(), &secs, &usecs);
				ereport(WARNING,
						(errmsg("tracker %s answers again: breaker closed after %ld s open",
								name, secs)));
				appendStringInfo(&json, "{\"event\": \"breaker_closed\", \"adapter\": ");
				escape_json(&json, name);
				appendStringInfoString(&json, ", \"open_since\": ");
				escape_json(&json, timestamptz_to_str(note->open_since));
				appendStringInfoChar(&json, '}');
				return json.data;
			}
		default:
			return NULL;
	}
}

/*
 * trace._tracker_health(): one row per adapter: adapter, state, since,
 * consecutive_failures, next_probe_at, paused_until, last_error,
 * throttled.
 */
Datum
trace_tracker_health(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz now = GetCurrentTimestamp();

	if (health == NULL)
		trace_error_not_preloaded("keep tracker health");
	InitMaterializedSRF(fcinfo, 0);
	for (int a = 0; a < trace_num_adapters; a++)
	{
		TrackerHealth *h = &health[a];
		TrackerHealth copy;
		Datum		values[8];
		bool		nulls[8] = {false};

		SpinLockAcquire(&h->mutex);
		memcpy(&copy, h, offsetof(TrackerHealth, throttled));
		SpinLockRelease(&h->mutex);

		values[0] = CStringGetTextDatum(trace_adapter_name(a));
		values[1] = CStringGetTextDatum(state_names[copy.state]);
		values[2] = TimestampTzGetDatum(copy.since);
		values[3] = Int32GetDatum(copy.consecutive_failures);
		values[4] = TimestampTzGetDatum(copy.state == BREAKER_CLOSED ? 0 : copy.next_probe_at);
		nulls[4] = copy.state == BREAKER_CLOSED;
		values[5] = TimestampTzGetDatum(copy.paused_until);
		nulls[5] = copy.paused_until <= now;
		values[6] = copy.has_error ? CStringGetTextDatum(copy.last_error) : (Datum) 0;
		nulls[6] = !copy.has_error;
		values[7] = Int64GetDatum((int64) pg_atomic_read_u64(&h->throttled));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
