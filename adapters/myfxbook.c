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

#include "adapters/adapter.h"

static TracePrep
myfxbook_prepare(TraceItem *item, TraceRequest *req)
{
	const char *token = trace_secret("myfxbook_webhook_token");

	if (!trace_target_url(trace_myfxbook_url, "trace.myfxbook_webhook_url", item))
		return TRACE_PREP_DONE;

	req->url = trace_myfxbook_url;
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
	.kind = TRACE_ADAPTER_MYFXBOOK,
	.name = "myfxbook",
	.prepare = myfxbook_prepare,
	.explain = NULL,
};
