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

#include "utils/guc.h"

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

/*
 * Parse the URL as libcurl will when sending, so that a malformed one (no
 * host, a bad port or IPv6 address) is refused now, naming the parameter,
 * rather than failing every delivery later.
 */
static bool
check_url_syntax(const char *url, const char *guc)
{
	CURLU	   *u = curl_url();
	CURLUcode	rc;
	char	   *host = NULL;
	char	   *user = NULL;
	bool		has_user = false;

	if (u == NULL)
	{
		GUC_check_errdetail("%s could not be parsed: out of memory.", guc);
		return false;
	}
	rc = curl_url_set(u, CURLUPART_URL, url, 0);
	if (rc == CURLUE_OK)
		rc = curl_url_get(u, CURLUPART_HOST, &host, 0);
	if (rc == CURLUE_OK && host[0] == '\0')
		rc = CURLUE_NO_HOST;
	if (rc == CURLUE_OK && curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK)
		has_user = true;
	curl_free(host);
	curl_free(user);
	curl_url_cleanup(u);
	if (has_user)
	{
		/* the value itself is visible in pg_settings and the reload log */
		GUC_check_errdetail("%s must not carry a user name or password; put credentials in the adapter's token or key parameters, or in trace.secrets_file.", guc);
		return false;
	}
	if (rc != CURLUE_OK)
	{
		GUC_check_errdetail("%s is not a valid URL: %s.", guc, curl_url_strerror(rc));
		return false;
	}
	return true;
}

/* An empty URL means "not configured"; anything else must be http(s). */
bool
trace_check_url(char **newval, const char *guc)
{
	const char *url = *newval;

	if (url == NULL || url[0] == '\0')
		return true;
	if (!trace_url_scheme_ok(url))
	{
		GUC_check_errdetail("%s must be an http:// or https:// URL.", guc);
		return false;
	}
	for (const char *p = url; *p; p++)
	{
		if ((unsigned char) *p <= ' ' || *p == 0x7f)
		{
			GUC_check_errdetail("%s must not contain spaces or control characters.", guc);
			return false;
		}
	}
	return check_url_syntax(url, guc);
}
