/*
 * http.c: the worker's HTTP driver, one libcurl multi handle.
 *
 * Requests run concurrently; the worker adds new ones as others finish,
 * so the pipe stays full.  Connections are kept alive and reused per host
 * by the multi handle's cache.  Every transfer has a whole-request timeout
 * (trace.http_timeout), speaks only http/https, never follows redirects,
 * never uses signals, and keeps at most a small prefix of the response
 * body (bodies beyond a cap abort the transfer, so memory stays bounded).
 * Finished transfers are classified into an outcome and queued for the
 * worker to record.  Never called inside a transaction.
 *
 * Waiting is event driven (libcurl's multi_socket API): libcurl tells us
 * which sockets it wants watched and when its next timeout is, and the
 * worker sleeps in one WaitEventSet holding those sockets and its latch,
 * so a commit that queues work wakes it even while requests are in
 * flight, and nothing is polled.  The set is rebuilt only when a socket
 * comes or goes (connections are reused, so rarely); a change of
 * direction on a known socket is a ModifyWaitEvent.
 */
#include "postgres.h"

#include <curl/curl.h>

#include "lib/ilist.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "storage/latch.h"
#include "utils/memutils.h"

#include "adapters/adapter.h"
#include "src/trace_ext.h"

/* Response bytes kept for the adapter's explain(); the rest is dropped. */
#define BODY_KEEP		1024
/* Past this many response bytes the transfer is aborted. */
#define BODY_MAX		(1024 * 1024)

typedef struct Transfer
{
	dlist_node	node;			/* in the list of running transfers */
	CURL	   *easy;
	TraceItem  *item;
	struct curl_slist *headers;
	instr_time	start;
	size_t		body_seen;
	bool		body_too_big;
	int			retry_after;
	char		body[BODY_KEEP + 1];
	char		errbuf[CURL_ERROR_SIZE];
} Transfer;

/* A socket libcurl asked us to watch. */
typedef struct WatchedSocket
{
	curl_socket_t fd;
	int			events;			/* WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE */
	int			pos;			/* in the wait set; -1 until (re)built */
} WatchedSocket;

static CURLM *multi = NULL;
static dlist_head running = DLIST_STATIC_INIT(running);

static WatchedSocket *watched = NULL;
static int	nwatched = 0;
static int	watched_size = 0;
static WaitEventSet *wait_set = NULL;
static bool wait_set_stale = true;
static long curl_timeout_ms = -1;	/* libcurl's next timeout; -1: none */
static instr_time curl_timeout_set; /* when it was given */
static int	inflight[TRACE_NUM_ADAPTERS];
static int	inflight_total = 0;

/* Finished items waiting to be recorded (a growable array). */
static TraceItem **done_items = NULL;
static int	done_count = 0;
static int	done_size = 0;

void
trace_http_push_done(TraceItem *item)
{
	if (done_count == done_size)
	{
		done_size = Max(64, done_size * 2);
		done_items = done_items
			? repalloc(done_items, sizeof(TraceItem *) * done_size)
			: MemoryContextAlloc(TopMemoryContext, sizeof(TraceItem *) * done_size);
	}
	done_items[done_count++] = item;
}

bool
trace_http_has_done(void)
{
	return done_count > 0;
}

TraceItem *
trace_http_next_done(void)
{
	if (done_count == 0)
		return NULL;
	return done_items[--done_count];
}

int
trace_http_inflight(TraceAdapterKind kind)
{
	return inflight[kind];
}

int
trace_http_inflight_total(void)
{
	return inflight_total;
}

static int
watched_index(curl_socket_t fd)
{
	for (int i = 0; i < nwatched; i++)
		if (watched[i].fd == fd)
			return i;
	return -1;
}

/* libcurl: watch fd for `what`, or stop watching it (CURL_POLL_REMOVE). */
static int
on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	int			i = watched_index(fd);
	int			events = 0;

	if (what == CURL_POLL_REMOVE)
	{
		if (i >= 0)
		{
			watched[i] = watched[--nwatched];
			wait_set_stale = true;
		}
		return 0;
	}
	if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
		events |= WL_SOCKET_READABLE;
	if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
		events |= WL_SOCKET_WRITEABLE;

	if (i < 0)
	{
		if (nwatched == watched_size)
		{
			watched_size = Max(16, watched_size * 2);
			watched = watched
				? repalloc(watched, sizeof(WatchedSocket) * watched_size)
				: MemoryContextAlloc(TopMemoryContext, sizeof(WatchedSocket) * watched_size);
		}
		i = nwatched++;
		watched[i].fd = fd;
		watched[i].pos = -1;
		wait_set_stale = true;
	}
	else if (watched[i].events != events && !wait_set_stale && watched[i].pos >= 0)
		ModifyWaitEvent(wait_set, watched[i].pos, events, NULL);
	watched[i].events = events;
	return 0;
}

/* libcurl: call curl_multi_socket_action(TIMEOUT) in timeout_ms (-1: never). */
static int
on_timer(CURLM *m, long timeout_ms, void *userp)
{
	curl_timeout_ms = timeout_ms;
	INSTR_TIME_SET_CURRENT(curl_timeout_set);
	return 0;
}

void
trace_http_init(void)
{
	if (multi != NULL)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(FATAL, (errmsg("trace_ext: could not initialize libcurl")));
	multi = curl_multi_init();
	if (multi == NULL)
		ereport(FATAL, (errmsg("trace_ext: could not create a libcurl multi handle")));
	if (curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, on_socket) != CURLM_OK ||
		curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, on_timer) != CURLM_OK)
		ereport(FATAL,
				(errmsg("trace_ext: this libcurl lacks the multi_socket API (%s)",
						curl_version())));
}

static size_t
on_body(char *data, size_t size, size_t nmemb, void *arg)
{
	Transfer   *t = arg;
	size_t		len = size * nmemb;

	if (t->body_seen < BODY_KEEP)
	{
		size_t		keep = Min(len, BODY_KEEP - t->body_seen);

		memcpy(t->body + t->body_seen, data, keep);
		t->body[t->body_seen + keep] = '\0';
	}
	t->body_seen += len;
	if (t->body_seen > BODY_MAX)
	{
		t->body_too_big = true;
		return 0;				/* abort: CURLE_WRITE_ERROR */
	}
	return len;
}

/* Only Retry-After matters among the response headers. */
static size_t
on_header(char *data, size_t size, size_t nmemb, void *arg)
{
	Transfer   *t = arg;
	size_t		len = size * nmemb;
	const char *name = "retry-after:";
	size_t		nlen = strlen(name);

	if (len > nlen && pg_strncasecmp(data, name, nlen) == 0)
	{
		char		value[128];
		size_t		vlen = Min(len - nlen, sizeof(value) - 1);
		char	   *v = value;
		char	   *end;
		long		secs;

		memcpy(value, data + nlen, vlen);
		value[vlen] = '\0';
		while (*v == ' ' || *v == '\t')
			v++;
		v[strcspn(v, "\r\n")] = '\0';
		secs = strtol(v, &end, 10);
		if (end != v && *end == '\0' && secs >= 0)
			t->retry_after = (int) Min(secs, INT_MAX);
		else
		{
			time_t		when = curl_getdate(v, NULL);

			if (when > 0)
				t->retry_after = (int) Max(0, when - time(NULL));
		}
	}
	return len;
}

/*
 * Set one option; a libcurl that refuses one (too old for
 * CURLOPT_PROTOCOLS_STR, say) must not send the request without it: the
 * name of the option is kept for the failure.
 */
#define SET_OPTION(opt, value) \
	do { \
		CURLcode	rc_ = curl_easy_setopt(e, opt, value); \
		if (rc_ != CURLE_OK) \
		{ \
			*refused = #opt; \
			*code = rc_; \
			return false; \
		} \
	} while (0)

/* All the options of a transfer; false (and which one) if one is refused. */
static bool
set_options(Transfer *t, TraceRequest *req, const char **refused, CURLcode *code)
{
	CURL	   *e = t->easy;

	SET_OPTION(CURLOPT_URL, req->url);
	SET_OPTION(CURLOPT_PROTOCOLS_STR, "http,https");
	SET_OPTION(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	SET_OPTION(CURLOPT_FOLLOWLOCATION, 0L);
	SET_OPTION(CURLOPT_NOSIGNAL, 1L);
	SET_OPTION(CURLOPT_TIMEOUT_MS, (long) trace_http_timeout_ms);
	SET_OPTION(CURLOPT_CONNECTTIMEOUT_MS, (long) trace_http_timeout_ms);
	SET_OPTION(CURLOPT_SSL_VERIFYPEER, 1L);
	SET_OPTION(CURLOPT_SSL_VERIFYHOST, 2L);
	if (trace_ca_file != NULL && trace_ca_file[0] != '\0')
		SET_OPTION(CURLOPT_CAINFO, trace_ca_file);
	SET_OPTION(CURLOPT_POSTFIELDS, req->body);
	SET_OPTION(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) req->body_len);
	if (strcmp(req->method, "POST") != 0)
		SET_OPTION(CURLOPT_CUSTOMREQUEST, req->method);
	SET_OPTION(CURLOPT_HTTPHEADER, req->headers);
	if (req->aws_sigv4 != NULL)
	{
		SET_OPTION(CURLOPT_AWS_SIGV4, req->aws_sigv4);
		SET_OPTION(CURLOPT_USERPWD, req->userpwd);
	}
	SET_OPTION(CURLOPT_WRITEFUNCTION, on_body);
	SET_OPTION(CURLOPT_WRITEDATA, t);
	SET_OPTION(CURLOPT_HEADERFUNCTION, on_header);
	SET_OPTION(CURLOPT_HEADERDATA, t);
	SET_OPTION(CURLOPT_ERRORBUFFER, t->errbuf);
	SET_OPTION(CURLOPT_PRIVATE, t);
	return true;
}

#undef SET_OPTION

/* Start sending item; on failure to start, it is finished at once. */
void
trace_http_start(TraceItem *item, TraceRequest *req)
{
	Transfer   *t = calloc(1, sizeof(Transfer));
	const char *refused = NULL;
	CURLcode	code = CURLE_OK;

	if (t == NULL || (t->easy = curl_easy_init()) == NULL)
	{
		free(t);
		curl_slist_free_all(req->headers);
		trace_outcome_fail(&item->out, TRACE_REASON_OTHER, "could not create a libcurl handle");
		trace_http_push_done(item);
		return;
	}
	t->item = item;
	t->headers = req->headers;
	t->retry_after = -1;
	if (!set_options(t, req, &refused, &code))
	{
		curl_easy_cleanup(t->easy);
		curl_slist_free_all(t->headers);
		free(t);
		ereport(WARNING,
				(errmsg("trace_ext: libcurl %s refused %s: %s; nothing is sent without it",
						curl_version_info(CURLVERSION_NOW)->version, refused,
						curl_easy_strerror(code))));
		trace_outcome_fail(&item->out, TRACE_REASON_CONFIG,
						   "libcurl refused %s: %s", refused, curl_easy_strerror(code));
		trace_http_push_done(item);
		return;
	}
	INSTR_TIME_SET_CURRENT(t->start);

	if (curl_multi_add_handle(multi, t->easy) != CURLM_OK)
	{
		curl_easy_cleanup(t->easy);
		curl_slist_free_all(t->headers);
		free(t);
		trace_outcome_fail(&item->out, TRACE_REASON_OTHER, "could not start a libcurl transfer");
		trace_http_push_done(item);
		return;
	}
	dlist_push_tail(&running, &t->node);
	inflight[item->adapter]++;
	inflight_total++;
}

static TraceReason
transport_reason(CURLcode rc)
{
	switch (rc)
	{
		case CURLE_OPERATION_TIMEDOUT:
			return TRACE_REASON_TIMEOUT;
		case CURLE_COULDNT_CONNECT:
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
			return TRACE_REASON_CONNECT;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_CIPHER:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_ENGINE_NOTFOUND:
		case CURLE_SSL_ENGINE_SETFAILED:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_CRL_BADFILE:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
		case CURLE_SSL_SHUTDOWN_FAILED:
			return TRACE_REASON_TLS;
		case CURLE_URL_MALFORMAT:
			return TRACE_REASON_CONFIG;
		case CURLE_UNSUPPORTED_PROTOCOL:
			/*
			 * Other schemes never reach libcurl (check hooks, protocol
			 * list); this is a tracker answering something that is not
			 * HTTP ("Received HTTP/0.9").
			 */
			return TRACE_REASON_OTHER;
		default:
			return TRACE_REASON_OTHER;
	}
}

/* Receivers reject these payloads or endpoints for good: no retry. */
static bool
permanent_status(long code)
{
	return code == 400 || code == 404 || code == 405 || code == 410 ||
		code == 413 || code == 422;
}

static void
classify(Transfer *t, CURLcode rc)
{
	TraceOutcome *out = &t->item->out;
	long		code = 0;
	instr_time	elapsed;

	INSTR_TIME_SET_CURRENT(elapsed);
	INSTR_TIME_SUBTRACT(elapsed, t->start);
	curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &code);

	/* A response too large to keep is judged by its status line. */
	if (rc == CURLE_WRITE_ERROR && t->body_too_big && code > 0)
		rc = CURLE_OK;

	if (rc != CURLE_OK)
	{
		TraceReason reason = transport_reason(rc);

		trace_outcome_fail(out, reason, "%s: %s", trace_reason_name(reason),
						   t->errbuf[0] ? t->errbuf : curl_easy_strerror(rc));
	}
	else if (code >= 200 && code < 300)
		trace_outcome_delivered(out, (int) code);
	else if (code >= 300 && code < 400)
		trace_outcome_fail(out, TRACE_REASON_REDIRECT,
						   "HTTP %ld (redirects are not followed)", code);
	else if (permanent_status(code))
	{
		trace_outcome_fail(out, TRACE_REASON_HTTP_4XX, "HTTP %ld (permanent)", code);
		out->permanent = true;
	}
	else if (code >= 400 && code < 500)
		trace_outcome_fail(out, TRACE_REASON_HTTP_4XX, "HTTP %ld", code);
	else if (code >= 500 && code < 600)
		trace_outcome_fail(out, TRACE_REASON_HTTP_5XX, "HTTP %ld", code);
	else
		trace_outcome_fail(out, TRACE_REASON_OTHER, "unexpected HTTP status %ld", code);

	out->posted = true;
	out->seconds = INSTR_TIME_GET_DOUBLE(elapsed);
	out->http_status = (rc == CURLE_OK) ? (int) code : 0;
	if (code == 429 || code == 503)
		out->retry_after = t->retry_after;

	if (!out->delivered && rc == CURLE_OK && t->body_seen > 0)
	{
		const TraceAdapter *adapter = trace_adapter(t->item->adapter);

		if (adapter->explain)
			adapter->explain(t->item, t->body);
	}
}

static void
release(Transfer *t)
{
	dlist_delete(&t->node);
	curl_multi_remove_handle(multi, t->easy);
	curl_easy_cleanup(t->easy);
	curl_slist_free_all(t->headers);
	free(t);
}

static void
finish(Transfer *t, CURLcode rc)
{
	TraceItem  *item = t->item;

	classify(t, rc);
	release(t);
	inflight[item->adapter]--;
	inflight_total--;
	trace_http_push_done(item);
}

/* Collect finished transfers. */
static void
collect(void)
{
	int			left;
	CURLMsg    *msg;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		Transfer   *t;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
		finish(t, msg->data.result);
	}
}

/* A wait set with the latch, postmaster death and every watched socket. */
static void
rebuild_wait_set(void)
{
	if (wait_set != NULL)
		FreeWaitEventSet(wait_set);
	wait_set = CreateWaitEventSet(TopMemoryContext, nwatched + 2);
	AddWaitEventToSet(wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	for (int i = 0; i < nwatched; i++)
		watched[i].pos = AddWaitEventToSet(wait_set, watched[i].events,
										   watched[i].fd, NULL, NULL);
	wait_set_stale = false;
}

/* Milliseconds until libcurl's timeout is due (0: now), capped at cap_ms. */
static long
until_curl_timeout(long cap_ms)
{
	instr_time	now;
	long		spent;

	if (curl_timeout_ms < 0)
		return cap_ms;
	INSTR_TIME_SET_CURRENT(now);
	INSTR_TIME_SUBTRACT(now, curl_timeout_set);
	spent = (long) INSTR_TIME_GET_MILLISEC(now);
	return Max(0, Min(cap_ms, curl_timeout_ms - spent));
}

#define MAX_EVENTS 64

/*
 * Let transfers progress: wait up to timeout_ms for socket activity,
 * libcurl's own timeout or our latch (left set for the caller), drive
 * libcurl with what happened, and queue the transfers that finished.
 */
void
trace_http_poll(int timeout_ms)
{
	WaitEvent	events[MAX_EVENTS];
	long		timeout;
	int			n;
	int			still_running;

	if (inflight_total == 0)
		return;
	if (wait_set_stale)
		rebuild_wait_set();

	timeout = until_curl_timeout(timeout_ms);
	n = WaitEventSetWait(wait_set, timeout, events, MAX_EVENTS, PG_WAIT_EXTENSION);
	for (int i = 0; i < n; i++)
	{
		int			flags = 0;

		if (events[i].events & WL_SOCKET_READABLE)
			flags |= CURL_CSELECT_IN;
		if (events[i].events & WL_SOCKET_WRITEABLE)
			flags |= CURL_CSELECT_OUT;
		if (flags != 0)
			curl_multi_socket_action(multi, events[i].fd, flags, &still_running);
	}
	if (curl_timeout_ms >= 0 && until_curl_timeout(1) == 0)
	{
		curl_timeout_ms = -1;
		curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &still_running);
	}
	collect();
}

/*
 * After an error in the worker's pass: drop every transfer and every
 * unrecorded outcome.  Their rows stay leased and are sent again when the
 * lease runs out (same Idempotency-Key).
 */
void
trace_http_abort_all(void)
{
	dlist_mutable_iter iter;

	dlist_foreach_modify(iter, &running)
		release(dlist_container(Transfer, node, iter.cur));
	memset(inflight, 0, sizeof(inflight));
	inflight_total = 0;
	done_count = 0;
}
