/*
 * outcome.c: filling in the result of a delivery attempt.
 *
 * Every path that ends an attempt (HTTP driver, local file export, a
 * configuration check) describes it here, so last_error texts have one
 * shape: "<reason>: <what happened>" or "HTTP <status>".  The texts must
 * never contain a payload, a personal field or a secret.
 */
#include "postgres.h"

#include "src/trace_ext.h"

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
}

void
trace_outcome_delivered(TraceOutcome *out, int http_status)
{
	out->done = true;
	out->delivered = true;
	out->http_status = http_status;
	out->error[0] = '\0';
}
