/*
 * common.c: request parts shared by the HTTP adapters.
 *
 * The headers every tracker receives (Content-Type, a stable
 * Idempotency-Key, User-Agent), header values checked for line breaks,
 * and the target URL checked before anything is sent: only http and
 * https are ever fetched.  Failures are recorded as "config" outcomes
 * that name the parameter, never its value when it is a secret.
 */
#include "postgres.h"

#include <curl/curl.h>

#include "adapters/adapter.h"

/* Append "name: value"; a value with a line break is a config failure. */
bool
trace_add_header(struct curl_slist **headers, const char *name,
				 const char *value, TraceItem *item, const char *guc)
{
	char	   *line;
	struct curl_slist *grown;

	if (strpbrk(value, "\r\n") != NULL)
	{
		trace_outcome_fail(&item->out, TRACE_REASON_CONFIG,
						   "%s contains a line break", guc);
		return false;
	}
	line = psprintf("%s: %s", name, value);
	grown = curl_slist_append(*headers, line);
	pfree(line);
	if (grown == NULL)
	{
		trace_outcome_fail(&item->out, TRACE_REASON_OTHER,
						   "out of memory building headers");
		return false;
	}
	*headers = grown;
	return true;
}

struct curl_slist *
trace_common_headers(const TraceItem *item)
{
	struct curl_slist *h = NULL;
	char		key[64];

	snprintf(key, sizeof(key), "Idempotency-Key: " INT64_FORMAT "-%s",
			 item->trade_id, trace_adapter_name(item->adapter));
	h = curl_slist_append(h, "Content-Type: application/json");
	h = curl_slist_append(h, key);
	h = curl_slist_append(h, "User-Agent: trace_ext/" TRACE_EXT_VERSION);

	/*
	 * No "Expect:" override: payloads are far below the size at which
	 * libcurl sends "Expect: 100-continue", and an empty Expect header
	 * would be signed by SigV4 yet never sent (S3 would refuse the PUT).
	 */
	return h;
}

/* Is url set and http(s)?  If not, the item fails with reason config. */
bool
trace_target_url(const char *url, const char *guc, TraceItem *item)
{
	if (url == NULL || url[0] == '\0')
	{
		trace_outcome_fail(&item->out, TRACE_REASON_CONFIG, "%s is not set", guc);
		return false;
	}
	if (!trace_url_scheme_ok(url))
	{
		trace_outcome_fail(&item->out, TRACE_REASON_CONFIG,
						   "%s is not an http or https URL; it is never fetched", guc);
		return false;
	}
	return true;
}
