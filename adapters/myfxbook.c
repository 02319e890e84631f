/*
 * myfxbook.c: the Myfxbook-style tracker.
 *
 * Myfxbook offers no public inbound API for trades, so this adapter POSTs
 * the payload to the URL the operator configures
 * (trace.myfxbook_webhook_url: Myfxbook's own endpoint if they grant one,
 * or a bridge) with trace.myfxbook_webhook_token as a Bearer token.
 */
#include "postgres.h"

#include <curl/curl.h>

#include "utils/guc.h"

#include "adapters/adapter.h"

static char *url = NULL;

static bool
check_url(char **newval, void **extra, GucSource source)
{
	return trace_check_url(newval, "trace.myfxbook_webhook_url");
}

static void
myfxbook_define_gucs(void)
{
	DefineCustomStringVariable("trace.myfxbook_webhook_url",
							   gettext_noop("URL the myfxbook adapter posts to."),
							   NULL, &url, "", PGC_SIGHUP, 0,
							   check_url, NULL, NULL);
	trace_define_secret("myfxbook_webhook_token",
						gettext_noop("Bearer token of the myfxbook adapter."));
}

static TracePrep
myfxbook_prepare(TraceItem *item, TraceRequest *req)
{
	const char *token = trace_secret("myfxbook_webhook_token");

	if (!trace_target_url(url, "trace.myfxbook_webhook_url", item))
		return TRACE_PREP_DONE;

	req->url = url;
	req->method = "POST";
	req->body = item->payload;
	req->body_len = strlen(item->payload);
	req->headers = trace_common_headers(item);

	if (token[0] != '\0' &&
		!trace_add_header(&req->headers, "Authorization",
						  psprintf("Bearer %s", token), item,
						  "trace.myfxbook_webhook_token"))
	{
		curl_slist_free_all(req->headers);
		req->headers = NULL;
		return TRACE_PREP_DONE;
	}
	return TRACE_PREP_SEND;
}

const TraceAdapter trace_myfxbook_adapter = {
	.name = "myfxbook",
	.define_gucs = myfxbook_define_gucs,
	.prepare = myfxbook_prepare,
	.explain = NULL,
};
