/*
 * outcome.c: what a delivery attempt came to, and what becomes of its row.
 *
 * Every path that ends an attempt (an HTTP response, a transport failure,
 * the local file export, a configuration check) describes it here, so
 * last_error texts have one shape: "<reason>: <what happened>" or
 * "HTTP <status>".  The texts must never contain a payload, a personal
 * field or a secret.  The retry rule lives here too: delivered, retried
 * after a backoff (at least Retry-After), or abandoned.
 */
#include "postgres.h"

#include <math.h>

#include "common/pg_prng.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"

#include "src/http.h"
#include "src/trace_ext.h"

/* Longest Retry-After honoured: a tracker cannot park a row forever. */
#define MAX_RETRY_AFTER_S	(24 * 3600)

/*
 * Texts can quote what a tracker sent (a certificate's name, an error
 * code): no control characters, and no UTF-8 character cut in half by the
 * length limit, so that last_error is always valid text in the database's
 * encoding.
 */
static void
sanitize(char *text)
{
	int			len;
	int			valid;

	for (unsigned char *p = (unsigned char *) text; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			*p = '?';
	len = strlen(text);
	valid = pg_encoding_verifymbstr(GetDatabaseEncoding(), text, len);
	if (valid < len)
		text[valid] = '\0';
}

void
trace_outcome_fail(TraceOutcome *out, TraceReason reason, const char *fmt,...)
{
	va_list		args;

	out->done = true;
	out->delivered = false;
	out->reason = reason;
	va_start(args, fmt);
	vsnprintf(out->error, sizeof(out->error), fmt, args);
	va_end(args);
	sanitize(out->error);
}

/*
 * Add to a failure's text (an adapter's explain() quoting the tracker's
 * answer); the whole text is sanitized again.
 */
void
trace_outcome_append(TraceOutcome *out, const char *fmt,...)
{
	size_t		used = strlen(out->error);
	va_list		args;

	va_start(args, fmt);
	vsnprintf(out->error + used, sizeof(out->error) - used, fmt, args);
	va_end(args);
	sanitize(out->error);
}

void
trace_outcome_delivered(TraceOutcome *out, int http_status)
{
	out->done = true;
	out->delivered = true;
	out->http_status = http_status;
	out->error[0] = '\0';
}

/* Receivers reject these payloads or endpoints for good: no retry. */
static bool
permanent_status(int code)
{
	return code == 400 || code == 404 || code == 405 || code == 410 ||
		code == 413 || code == 422;
}

/* The outcome of an attempt from what the transport says of it. */
void
trace_outcome_from_response(TraceOutcome *out, const TraceResponse *resp)
{
	int			code = resp->http_status;

	if (resp->failed)
		trace_outcome_fail(out, resp->reason, "%s", resp->error);
	else if (code >= 200 && code < 300)
		trace_outcome_delivered(out, code);
	else if (code >= 300 && code < 400)
		trace_outcome_fail(out, TRACE_REASON_REDIRECT,
						   "HTTP %d (redirects are not followed)", code);
	else if (permanent_status(code))
	{
		trace_outcome_fail(out, TRACE_REASON_HTTP_4XX, "HTTP %d (permanent)", code);
		out->permanent = true;
	}
	else if (code >= 400 && code < 500)
		trace_outcome_fail(out, TRACE_REASON_HTTP_4XX, "HTTP %d", code);
	else if (code >= 500 && code < 600)
		trace_outcome_fail(out, TRACE_REASON_HTTP_5XX, "HTTP %d", code);
	else
		trace_outcome_fail(out, TRACE_REASON_OTHER, "unexpected HTTP status %d", code);

	out->posted = resp->sent;
	out->seconds = resp->seconds;
	out->http_status = code;
	if (code == 429 || code == 503)
		out->retry_after = resp->retry_after;
}

/* min(base * 6^(n-1), cap), then +/- up to 10 % jitter; in seconds. */
double
trace_outcome_backoff(int attempts)
{
	double		base = trace_backoff_base_ms / 1000.0;
	double		cap = trace_backoff_cap_s;
	double		wait = base * pow(6.0, Max(attempts, 1) - 1);

	if (wait > cap)
		wait = cap;
	return wait * (0.9 + 0.2 * pg_prng_double(&pg_global_prng_state));
}

/*
 * What becomes of a finished item: its next status ("delivered",
 * "pending" or "abandoned") and, when it is retried, in how many seconds.
 */
const char *
trace_outcome_next_status(const TraceItem *item, double *delay)
{
	*delay = 0;
	if (item->out.delivered)
		return "delivered";
	if (item->out.held)
	{
		/* the tracker is down: wait for it, the attempt not counted */
		*delay = item->out.hold_s;
		return "pending";
	}
	if (item->out.permanent || item->attempts > trace_max_retries)
		return "abandoned";

	*delay = trace_outcome_backoff(item->attempts);
	if (item->out.retry_after > 0)
		*delay = Max(*delay, (double) Min(item->out.retry_after, MAX_RETRY_AFTER_S));
	return "pending";
}

/* Failed attempts logged one by one, per tracker and record round. */
#define LOG_LINES_PER_ROUND	5

/*
 * Log the failed attempts of a record round with their context: trade,
 * tracker, attempt, what happened.  A tracker that is down must not flood
 * the log: beyond LOG_LINES_PER_ROUND lines per tracker, and while its
 * breaker is open, one summary line per tracker says how many, by reason,
 * and which trades.
 */
void
trace_outcome_log_failures(TraceItem **items, int n)
{
	int			failed = 0;

	/* the usual round: everything delivered, nothing to look at */
	for (int i = 0; i < n; i++)
		failed += items[i]->out.delivered ? 0 : 1;
	if (failed == 0)
		return;
	for (int a = 0; a < trace_num_adapters; a++)
	{
		bool		open = trace_health_breaker_open(a);
		int			logged = 0;
		int			more = 0;
		int64		first = 0;
		int64		last = 0;
		int			by_reason[TRACE_NUM_REASONS] = {0};
		StringInfoData reasons;

		for (int i = 0; i < n; i++)
		{
			TraceItem  *item = items[i];

			if (item->adapter != a || item->out.delivered)
				continue;
			if (!open && logged < LOG_LINES_PER_ROUND)
			{
				ereport(LOG,
						(errmsg("delivery of trade " INT64_FORMAT " to %s failed (attempt %d): %s",
								item->trade_id, trace_adapter_name(a), item->attempts,
								item->out.error)));
				logged++;
				continue;
			}
			if (more == 0 || item->trade_id < first)
				first = item->trade_id;
			if (more == 0 || item->trade_id > last)
				last = item->trade_id;
			by_reason[item->out.reason]++;
			more++;
		}
		if (more == 0)
			continue;
		initStringInfo(&reasons);
		for (int r = 0; r < TRACE_NUM_REASONS; r++)
			if (by_reason[r] > 0)
				appendStringInfo(&reasons, "%s%s: %d", reasons.len > 0 ? ", " : "",
								 trace_reason_name(r), by_reason[r]);
		if (open)
			ereport(LOG,
					(errmsg("%d failed deliveries to %s while its breaker is open (%s), trades " INT64_FORMAT " to " INT64_FORMAT,
							more, trace_adapter_name(a), reasons.data, first, last)));
		else
			ereport(LOG,
					(errmsg("%d more failed deliveries to %s not logged one by one (%s), trades " INT64_FORMAT " to " INT64_FORMAT,
							more, trace_adapter_name(a), reasons.data, first, last)));
		pfree(reasons.data);
	}
}
