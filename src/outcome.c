/*
 * outcome.c: filling in the result of a delivery attempt.
 *
 * Every path that ends an attempt (HTTP driver, local file export, a
 * configuration check) describes it here, so last_error texts have one
 * shape: "<reason>: <what happened>" or "HTTP <status>".  The texts must
 * never contain a payload, a personal field or a secret.
 */
#include "postgres.h"

#include "mb/pg_wchar.h"

#include "src/trace_ext.h"

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
