/*
 * http.h: the HTTP transport (http.c).
 *
 * Requests go in with a tag (the caller's handle for them); finished
 * requests come out as responses carrying that tag, the HTTP status or
 * the transport failure, Retry-After, the time taken and the start of the
 * body.  The transport knows nothing of queue rows, adapters or retries.
 */
#ifndef TRACE_HTTP_H
#define TRACE_HTTP_H

#include "src/trace_ext.h"

struct curl_slist;

typedef struct TraceRequest
{
	const char *url;
	const char *method;			/* "POST" or "PUT" */
	struct curl_slist *headers; /* owned by the transport once started */
	const char *body;
	size_t		body_len;
	const char *aws_sigv4;		/* CURLOPT_AWS_SIGV4 provider string, or
								 * NULL */
	const char *userpwd;		/* for the signer, or NULL */
} TraceRequest;

/* Response bytes kept for an adapter's explain(); the rest is dropped. */
#define TRACE_BODY_KEEP		1024

typedef struct TraceResponse
{
	void	   *tag;			/* as given to trace_http_start() */
	bool		failed;			/* no usable HTTP response: see reason */
	TraceReason reason;			/* why, when failed */
	char		error[TRACE_ERROR_LEN]; /* what happened, when failed */
	bool		sent;			/* the request went out (it was timed) */
	int			http_status;	/* 0 when none was received */
	int			retry_after;	/* seconds from Retry-After, or -1 */
	double		seconds;		/* how long the request took */
	char		body[TRACE_BODY_KEEP + 1];	/* NUL-terminated prefix */
} TraceResponse;

extern void trace_http_init(void);
extern void trace_http_start(void *tag, TraceRequest *req);
extern void trace_http_keep_connections(long n);
extern bool trace_http_wait(int timeout_ms);
extern bool trace_http_next(TraceResponse *resp);
extern int	trace_http_running(void);
extern void trace_http_abort_all(void);

#endif							/* TRACE_HTTP_H */
