/*
 * adapter.h: the interface every tracker implements.
 *
 * An adapter turns one claimed queue row (with its allowlisted payload)
 * into a request for the HTTP driver, or finishes the row itself (a local
 * file write, or a configuration error).  It runs in the worker, outside
 * any transaction, and must not raise errors for bad configuration:
 * those are recorded failures (reason "config") that name the parameter.
 * Adding a tracker means one new file here and one line in registry.c.
 */
#ifndef TRACE_ADAPTER_H
#define TRACE_ADAPTER_H

#include "src/trace_ext.h"

typedef enum TracePrep
{
	TRACE_PREP_SEND,			/* req is filled in: hand it to the driver */
	TRACE_PREP_DONE				/* item->out is final: nothing to send */
} TracePrep;

typedef struct TraceAdapter
{
	TraceAdapterKind kind;
	const char *name;

	/* Fill *req for item, or finish item->out and return TRACE_PREP_DONE. */
	TracePrep	(*prepare) (TraceItem *item, TraceRequest *req);

	/*
	 * Optional: refine a failed HTTP outcome from the start of the response
	 * body (e.g. an S3 error code).  body is NUL-terminated.
	 */
	void		(*explain) (TraceItem *item, const char *body);
} TraceAdapter;

extern const TraceAdapter *trace_adapter(TraceAdapterKind kind);

/* common.c: what every HTTP adapter shares */
extern struct curl_slist *trace_common_headers(const TraceItem *item);
extern bool trace_add_header(struct curl_slist **headers, const char *name,
							 const char *value, TraceItem *item,
							 const char *guc);
extern bool trace_target_url(const char *url, const char *guc, TraceItem *item);

extern const TraceAdapter trace_myfxbook_adapter;
extern const TraceAdapter trace_webhook_adapter;
extern const TraceAdapter trace_file_adapter;

#endif							/* TRACE_ADAPTER_H */
