/*
 * webhook.c: the generic webhook tracker.
 *
 * POSTs the payload to trace.webhook_endpoint with the token in the header
 * named by trace.webhook_auth_header, and, when trace.webhook_signing_secret
 * is set, signs it as the Standard Webhooks specification says:
 * webhook-id (the idempotency key), webhook-timestamp and
 * webhook-signature "v1,<base64 HMAC-SHA256 of id.timestamp.body>".  A
 * secret starting "whsec_" is the base64 of the key; any other secret is
 * the key's raw bytes.
 */
#include "postgres.h"

#include <time.h>
#include <curl/curl.h>

#include "common/base64.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "utils/guc.h"

#include "adapters/adapter.h"

static char *endpoint = NULL;
static char *auth_header = NULL;

static bool
check_endpoint(char **newval, void **extra, GucSource source)
{
	return trace_check_url(newval, "trace.webhook_endpoint");
}

/*
 * Headers the token must not replace: libcurl would send the token in
 * place of the real Host or Content-Length (a broken or smuggled
 * request), and the others are the ones trace_ext itself sends.
 */
static const char *const reserved_headers[] = {
	"Host", "Content-Length", "Transfer-Encoding", "Content-Type",
	"Content-Encoding", "Connection", "Keep-Alive", "Upgrade", "TE", "Trailer",
	"Expect", "Idempotency-Key", "User-Agent", "webhook-id",
	"webhook-timestamp", "webhook-signature"
};

/* An HTTP header name is a non-empty RFC 9110 token, not a reserved one. */
static bool
check_auth_header(char **newval, void **extra, GucSource source)
{
	const char *name = *newval;

	if (name == NULL || name[0] == '\0')
	{
		GUC_check_errdetail("trace.webhook_auth_header must not be empty.");
		return false;
	}
	for (const char *p = name; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) || strchr("!#$%&'*+-.^_`|~", *p)))
		{
			GUC_check_errdetail("trace.webhook_auth_header must be an HTTP header name (letters, digits, '-').");
			return false;
		}
	}
	for (int i = 0; i < lengthof(reserved_headers); i++)
	{
		if (pg_strcasecmp(name, reserved_headers[i]) == 0)
		{
			GUC_check_errdetail("trace.webhook_auth_header cannot be \"%s\": that header is set by HTTP or by trace_ext.",
								name);
			return false;
		}
	}
	return true;
}

static void
webhook_define_gucs(void)
{
	DefineCustomStringVariable("trace.webhook_endpoint",
							   gettext_noop("URL the webhook adapter posts to."),
							   NULL, &endpoint, "", PGC_SIGHUP, 0,
							   check_endpoint, NULL, NULL);
	DefineCustomStringVariable("trace.webhook_auth_header",
							   gettext_noop("Header that carries the webhook token."),
							   NULL, &auth_header, "Authorization", PGC_SIGHUP, 0,
							   check_auth_header, NULL, NULL);
	trace_define_secret("webhook_auth_token",
						gettext_noop("Value of the webhook auth header."));
	trace_define_secret("webhook_signing_secret",
						gettext_noop("Standard Webhooks signing secret."));
}

/* The signing key, decoded; false (item failed) for a bad whsec_ value. */
static bool
signing_key(const char *secret, TraceItem *item, uint8 **key, int *keylen)
{
	if (strncmp(secret, "whsec_", 6) == 0)
	{
		const char *b64 = secret + 6;
		int			len = strlen(b64);

		*key = palloc(pg_b64_dec_len(len) + 1);
		*keylen = pg_b64_decode(b64, len, (char *) *key, pg_b64_dec_len(len));
		if (*keylen <= 0)
		{
			trace_outcome_fail(&item->out, TRACE_REASON_CONFIG,
							   "trace.webhook_signing_secret starts with whsec_ but is not valid base64");
			return false;
		}
		return true;
	}
	*key = (uint8 *) pstrdup(secret);
	*keylen = strlen(secret);
	return true;
}

/* base64(HMAC-SHA256(key, "id.timestamp.body")) */
static char *
sign(const uint8 *key, int keylen, const char *id, const char *ts,
	 const char *body, size_t body_len)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);
	uint8		mac[PG_SHA256_DIGEST_LENGTH];
	char	   *out;
	int			outlen;

	if (ctx == NULL ||
		pg_hmac_init(ctx, key, keylen) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) id, strlen(id)) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) ".", 1) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) ts, strlen(ts)) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) ".", 1) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) body, body_len) < 0 ||
		pg_hmac_final(ctx, mac, sizeof(mac)) < 0)
	{
		pg_hmac_free(ctx);
		return NULL;
	}
	pg_hmac_free(ctx);

	outlen = pg_b64_enc_len(sizeof(mac));
	out = palloc(outlen + 1);
	outlen = pg_b64_encode((const char *) mac, sizeof(mac), out, outlen);
	if (outlen < 0)
		return NULL;
	out[outlen] = '\0';
	return out;
}

static bool
add_signature(TraceItem *item, TraceRequest *req, const char *secret)
{
	char		id[64];
	char		ts[32];
	uint8	   *key;
	int			keylen;
	char	   *sig;

	if (!signing_key(secret, item, &key, &keylen))
		return false;
	snprintf(id, sizeof(id), INT64_FORMAT "-%s", item->trade_id,
			 trace_adapter_name(item->adapter));
	snprintf(ts, sizeof(ts), "%lld", (long long) time(NULL));
	sig = sign(key, keylen, id, ts, req->body, req->body_len);
	memset(key, 0, keylen);
	if (sig == NULL)
	{
		trace_outcome_fail(&item->out, TRACE_REASON_OTHER,
						   "could not compute the webhook signature");
		return false;
	}
	return trace_add_header(&req->headers, "webhook-id", id, item, "webhook-id") &&
		trace_add_header(&req->headers, "webhook-timestamp", ts, item, "webhook-timestamp") &&
		trace_add_header(&req->headers, "webhook-signature", psprintf("v1,%s", sig),
						 item, "webhook-signature");
}

static TracePrep
webhook_prepare(TraceItem *item, TraceRequest *req)
{
	const char *token = trace_secret("webhook_auth_token");
	const char *secret = trace_secret("webhook_signing_secret");

	if (!trace_target_url(endpoint, "trace.webhook_endpoint", item))
		return TRACE_PREP_DONE;

	req->url = endpoint;
	req->method = "POST";
	req->body = item->payload;
	req->body_len = strlen(item->payload);
	req->headers = trace_common_headers(item);

	if (token[0] != '\0' &&
		!trace_add_header(&req->headers, auth_header, token, item,
						  "trace.webhook_auth_token"))
		goto failed;
	if (secret[0] != '\0' && !add_signature(item, req, secret))
		goto failed;
	return TRACE_PREP_SEND;

failed:
	curl_slist_free_all(req->headers);
	req->headers = NULL;
	return TRACE_PREP_DONE;
}

const TraceAdapter trace_webhook_adapter = {
	.name = "webhook",
	.define_gucs = webhook_define_gucs,
	.prepare = webhook_prepare,
	.explain = NULL,
};
