/*
 * http.c: the HTTP transport, one libcurl multi handle.
 *
 * Requests run concurrently; the worker adds new ones as others finish,
 * so the pipe stays full.  Connections are kept alive and reused per host
 * by the multi handle's cache, which keeps as many as the worker has
 * requests in flight (trace_http_keep_connections).  Every transfer has a whole-request timeout
 * (trace.http_timeout), speaks only http/https, never follows redirects,
 * never uses signals, and keeps at most a small prefix of the response
 * body (bodies beyond a cap abort the transfer, so memory stays bounded).
 * It speaks HTTP/1.1 even to a server that offers HTTP/2: a server may
 * answer an HTTP/2 request before reading its body and then reset the
 * stream (RST_STREAM, NO_ERROR, as nginx does), which libcurl 7.88
 * reports as "Stream error in the HTTP/2 framing layer": a delivered row
 * recorded as failed and sent again.  With a connection per request in
 * flight, multiplexing would save connections, not CPU.
 * A finished transfer becomes a TraceResponse (the status or a transport
 * failure, Retry-After, the time taken, the start of the body) that the
 * worker collects with trace_http_next(); what it means for the queue
 * row is decided there, not here.  Never called inside a transaction.
 *
 * Waiting is event driven (libcurl's multi_socket API): libcurl tells us
 * which sockets it wants watched and when its next timeout is, and the
 * worker sleeps in one WaitEventSet holding those sockets and its latch,
 * so a commit that queues work wakes it even while requests are in
 * flight, and nothing is polled.  The set is rebuilt when a new socket
 * comes.  libcurl stops watching a kept-alive connection between its
 * transfers: such a socket, if it was only waited on for reading, stays
 * in the set, parked, so that the connection's next transfer is a
 * ModifyWaitEvent, not a rebuild.  No system call is made when libcurl
 * lets a socket go (it may already have closed it); a parked socket that
 * becomes readable (the peer closed the connection) is forgotten; a
 * rebuild drops every parked socket; a socket number libcurl opens again
 * forgets the parked one; and a ModifyWaitEvent that fails (a number
 * closed and reused behind our back) falls back to a rebuild.
 */
#include "postgres.h"

#include <sys/resource.h>

#include <curl/curl.h>

#include "lib/ilist.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "storage/latch.h"
#include "utils/memutils.h"

#include "src/http.h"

#define BODY_KEEP		TRACE_BODY_KEEP
/* Past this many response bytes the transfer is aborted. */
#define BODY_MAX		(1024 * 1024)

typedef struct Transfer
{
	dlist_node	node;			/* in the running or the finished list */
	CURL	   *easy;			/* NULL once finished */
	struct curl_slist *headers;
	instr_time	start;
	size_t		body_seen;
	bool		body_too_big;
	TraceResponse resp;			/* tag, Retry-After and body as they come */
	char		errbuf[CURL_ERROR_SIZE];
} Transfer;

/* A socket libcurl asked us to watch. */
typedef struct WatchedSocket
{
	curl_socket_t fd;
	int			events;			/* WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE */
	int			pos;			/* in the wait set; -1 until (re)built */
	bool		parked;			/* libcurl does not watch it now */
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
static dlist_head finished = DLIST_STATIC_INIT(finished);
static int	nrunning = 0;

/* Transfers in flight. */
int
trace_http_running(void)
{
	return nrunning;
}

static int
watched_index(curl_socket_t fd)
{
	for (int i = 0; i < nwatched; i++)
		if (watched[i].fd == fd)
			return i;
	return -1;
}

/* Forget watched[i]; the next wait rebuilds the set without it. */
static void
forget_socket(int i)
{
	watched[i] = watched[--nwatched];
	wait_set_stale = true;
}

/*
 * Wait on watched[i] for new events.  Called from libcurl's callbacks: an
 * error must not unwind through libcurl, so a ModifyWaitEvent that fails
 * (the number was closed, or closed and reused, behind our back) is caught
 * and the set rebuilt instead.
 */
static void
set_socket_events(int i, int events)
{
	MemoryContext cxt = CurrentMemoryContext;

	if (watched[i].events != events && !wait_set_stale && watched[i].pos >= 0)
	{
		PG_TRY();
		{
			ModifyWaitEvent(wait_set, watched[i].pos, events, NULL);
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(cxt);
			FlushErrorState();
			wait_set_stale = true;
		}
		PG_END_TRY();
	}
	watched[i].events = events;
}

/* libcurl: watch fd for `what`, or stop watching it (CURL_POLL_REMOVE). */
static int
on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	int			i = watched_index(fd);
	int			events = 0;

	if (what == CURL_POLL_REMOVE)
	{
		/*
		 * No system call here: libcurl may already have closed fd.  A socket
		 * waited on for reading only may stay in the set, parked (it is
		 * quiet until the peer sends or closes); any other is forgotten.
		 */
		if (i < 0)
			return 0;
		if (wait_set_stale || watched[i].pos < 0 ||
			watched[i].events != WL_SOCKET_READABLE)
			forget_socket(i);
		else
			watched[i].parked = true;
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
		watched[i].events = 0;
		wait_set_stale = true;
	}
	watched[i].parked = false;
	set_socket_events(i, events);
	return 0;
}

/*
 * libcurl opens a socket.  A parked socket with the same number was closed
 * without our knowing: forget it before the number is watched again.
 */
static curl_socket_t
on_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	curl_socket_t fd = socket(address->family, address->socktype, address->protocol);
	int			i;

	if (fd != CURL_SOCKET_BAD && (i = watched_index(fd)) >= 0)
		forget_socket(i);
	return fd;
}

/* libcurl: call curl_multi_socket_action(TIMEOUT) in timeout_ms (-1: never). */
static int
on_timer(CURLM *m, long timeout_ms, void *userp)
{
	curl_timeout_ms = timeout_ms;
	INSTR_TIME_SET_CURRENT(curl_timeout_set);
	return 0;
}

/*
 * Each request in flight holds a socket, outside PostgreSQL's own count of
 * open files (max_files_per_process).  A worker started under a soft limit
 * of 1,024 descriptors (runuser, a systemd service without LimitNOFILE)
 * would see socket() fail for a few hundred requests in flight, and count
 * that as the tracker failing: raise the soft limit to the hard one.
 */
static void
raise_open_files_limit(void)
{
	struct rlimit lim;

	if (getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur >= lim.rlim_max)
		return;
	lim.rlim_cur = lim.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &lim) != 0)
		ereport(LOG,
				(errmsg("could not raise the open files limit of the worker: %m")));
}

void
trace_http_init(void)
{
	if (multi != NULL)
		return;
	raise_open_files_limit();
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(FATAL, (errmsg("could not initialize libcurl")));
	multi = curl_multi_init();
	if (multi == NULL)
		ereport(FATAL, (errmsg("could not create a libcurl multi handle")));
	if (curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, on_socket) != CURLM_OK ||
		curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, on_timer) != CURLM_OK)
		ereport(FATAL,
				(errmsg("libcurl %s lacks the multi_socket API",
						curl_version_info(CURLVERSION_NOW)->version)));
}

static size_t
on_body(char *data, size_t size, size_t nmemb, void *arg)
{
	Transfer   *t = arg;
	size_t		len = size * nmemb;

	if (t->body_seen < BODY_KEEP)
	{
		size_t		keep = Min(len, BODY_KEEP - t->body_seen);

		memcpy(t->resp.body + t->body_seen, data, keep);
		t->resp.body[t->body_seen + keep] = '\0';
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
			t->resp.retry_after = (int) Min(secs, INT_MAX);
		else
		{
			time_t		when = curl_getdate(v, NULL);

			if (when > 0)
				t->resp.retry_after = (int) Max(0, when - time(NULL));
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
	/* HTTP/1.1 over kept-alive connections, never HTTP/2: see the top */
	SET_OPTION(CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_1_1);
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
	SET_OPTION(CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
	return true;
}

#undef SET_OPTION

/* Free the transfer's libcurl handle and headers (not the transfer). */
static void
release_handle(Transfer *t)
{
	if (t->easy != NULL)
	{
		curl_multi_remove_handle(multi, t->easy);
		curl_easy_cleanup(t->easy);
		t->easy = NULL;
	}
	curl_slist_free_all(t->headers);
	t->headers = NULL;
}

/* A transfer that ends before it started: failed, with reason and text. */
static void
finish_unstarted(Transfer *t, TraceReason reason, const char *fmt,...)
{
	va_list		args;

	release_handle(t);
	t->resp.failed = true;
	t->resp.reason = reason;
	va_start(args, fmt);
	vsnprintf(t->resp.error, sizeof(t->resp.error), fmt, args);
	va_end(args);
	dlist_push_tail(&finished, &t->node);
}

/*
 * Start sending req.  Whatever happens, one response with this tag comes
 * out of trace_http_next() later: a transfer that cannot start is finished
 * at once.
 */
void
trace_http_start(void *tag, TraceRequest *req)
{
	Transfer   *t = calloc(1, sizeof(Transfer));
	const char *refused = NULL;
	CURLcode	code = CURLE_OK;

	if (t == NULL)
	{
		curl_slist_free_all(req->headers);
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	}
	t->resp.tag = tag;
	t->resp.retry_after = -1;
	t->headers = req->headers;
	if ((t->easy = curl_easy_init()) == NULL)
	{
		finish_unstarted(t, TRACE_REASON_OTHER, "could not create a libcurl handle");
		return;
	}
	if (!set_options(t, req, &refused, &code))
	{
		ereport(WARNING,
				(errmsg("libcurl %s refused %s: %s; nothing is sent without it",
						curl_version_info(CURLVERSION_NOW)->version, refused,
						curl_easy_strerror(code))));
		finish_unstarted(t, TRACE_REASON_CONFIG, "libcurl refused %s: %s",
						 refused, curl_easy_strerror(code));
		return;
	}
	INSTR_TIME_SET_CURRENT(t->start);
	if (curl_multi_add_handle(multi, t->easy) != CURLM_OK)
	{
		finish_unstarted(t, TRACE_REASON_OTHER, "could not start a libcurl transfer");
		return;
	}
	dlist_push_tail(&running, &t->node);
	nrunning++;
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

/*
 * A transfer is over: keep what the caller needs in its response, free the
 * libcurl handle, and move it to the finished list.
 */
static void
finish(Transfer *t, CURLcode rc)
{
	TraceResponse *resp = &t->resp;
	long		code = 0;
	instr_time	elapsed;

	INSTR_TIME_SET_CURRENT(elapsed);
	INSTR_TIME_SUBTRACT(elapsed, t->start);
	curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &code);

	/* A response too large to keep is judged by its status line. */
	if (rc == CURLE_WRITE_ERROR && t->body_too_big && code > 0)
		rc = CURLE_OK;

	resp->sent = true;
	resp->seconds = INSTR_TIME_GET_DOUBLE(elapsed);
	if (rc == CURLE_OK)
		resp->http_status = (int) code;
	else
	{
		resp->failed = true;
		resp->reason = transport_reason(rc);
		snprintf(resp->error, sizeof(resp->error), "%s: %s",
				 trace_reason_name(resp->reason),
				 t->errbuf[0] ? t->errbuf : curl_easy_strerror(rc));
		resp->body[0] = '\0';
	}

	dlist_delete(&t->node);
	nrunning--;
	release_handle(t);
	dlist_push_tail(&finished, &t->node);
}

/*
 * Keep up to n idle connections open for reuse.  libcurl's default keeps
 * four per transfer in the multi handle; a finished transfer leaves it at
 * once, so with fewer in flight kept-alive connections would be closed and
 * opened again (a new TLS handshake each over https).  The worker asks for
 * its requests in flight, trace.batch_size.
 */
void
trace_http_keep_connections(long n)
{
	static long current = -1;

	if (multi == NULL || n == current)
		return;
	if (curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, n) == CURLM_OK)
		current = n;
}

/* The next finished request, copied into *resp; false when none is left. */
bool
trace_http_next(TraceResponse *resp)
{
	Transfer   *t;

	if (dlist_is_empty(&finished))
		return false;
	t = dlist_container(Transfer, node, dlist_pop_head_node(&finished));
	memcpy(resp, &t->resp, sizeof(TraceResponse));
	free(t);
	return true;
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

/*
 * A wait set with the latch, postmaster death and every watched socket;
 * parked sockets are left out (and forgotten).
 */
static void
rebuild_wait_set(void)
{
	for (int i = nwatched - 1; i >= 0; i--)
		if (watched[i].parked)
			watched[i] = watched[--nwatched];
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
#define MAX_EVENTS 64

/*
 * Let transfers progress: wait up to timeout_ms for socket activity,
 * libcurl's own timeout or our latch, drive libcurl with what happened,
 * and move the transfers that finished to the finished list.  Returns
 * whether the latch was found set (it is left set: the caller resets it
 * before it looks for work).  With nothing in flight, returns at once.
 */
bool
trace_http_wait(int timeout_ms)
{
	WaitEvent	events[MAX_EVENTS];
	long		timeout;
	int			n;
	int			still_running;
	bool		latch_set = false;

	if (nrunning == 0)
		return false;
	if (wait_set_stale)
		rebuild_wait_set();

	timeout = until_curl_timeout(timeout_ms);
	n = WaitEventSetWait(wait_set, timeout, events, MAX_EVENTS, PG_WAIT_EXTENSION);
	for (int i = 0; i < n; i++)
	{
		int			flags = 0;
		int			w;

		if (events[i].events & WL_LATCH_SET)
			latch_set = true;
		if ((events[i].events & WL_SOCKET_MASK) &&
			(w = watched_index(events[i].fd)) >= 0 && watched[w].parked)
		{
			/* the peer closed an idle connection (or sent on it): let it go */
			forget_socket(w);
			continue;
		}
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
	return latch_set;
}

/*
 * After an error in the worker's pass: drop every transfer, running or
 * finished.  Their rows stay leased and are sent again when the lease
 * runs out (same Idempotency-Key).
 */
void
trace_http_abort_all(void)
{
	dlist_mutable_iter iter;

	dlist_foreach_modify(iter, &running)
	{
		Transfer   *t = dlist_container(Transfer, node, iter.cur);

		dlist_delete(&t->node);
		release_handle(t);
		free(t);
	}
	dlist_foreach_modify(iter, &finished)
	{
		Transfer   *t = dlist_container(Transfer, node, iter.cur);

		dlist_delete(&t->node);
		free(t);
	}
	nrunning = 0;
}
