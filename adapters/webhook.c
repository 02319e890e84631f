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

#include "adapters/adapter.h"

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

	if (!trace_target_url(trace_webhook_endpoint, "trace.webhook_endpoint", item))
		return TRACE_PREP_DONE;

	req->url = trace_webhook_endpoint;
	req->method = "POST";
	req->body = item->payload;
	req->body_len = strlen(item->payload);
	req->headers = trace_common_headers(item);

	if (token[0] != '\0' &&
		!trace_add_header(&req->headers, trace_webhook_auth_header, token, item,
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
	.kind = TRACE_ADAPTER_WEBHOOK,
	.name = "webhook",
	.prepare = webhook_prepare,
	.explain = NULL,
};
