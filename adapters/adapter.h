/*
 * adapter.h: the interface every tracker implements, and the registry.
 *
 * A tracker is one file in adapters/ that defines one TraceAdapter: its
 * name (as queue rows, trace.enabled_adapters and signals.tracing_adapters
 * spell it), its configuration parameters, and how a claimed queue row
 * becomes a request for the HTTP driver.  adapters/registry.c lists the
 * adapters, one line each: adding a tracker is a new file here plus that
 * line.  Everything else (the queue's CHECK rule, the metrics rows, the
 * hints that name the adapters, trace._adapters() for SQL) reads the
 * registry.
 *
 * prepare() and explain() run in the worker, outside any transaction, and
 * must not raise errors for bad configuration: those are recorded failures
 * (reason "config") that name the parameter.
 */
#ifndef TRACE_ADAPTER_H
#define TRACE_ADAPTER_H

#include "src/trace_ext.h"
#include "src/http.h"

typedef enum TracePrep
{
	TRACE_PREP_SEND,			/* req is filled in: hand it to the driver */
	TRACE_PREP_DONE				/* item->out is final: nothing to send */
} TracePrep;

typedef struct TraceAdapter
{
	const char *name;

	/*
	 * Define the adapter's parameters (trace.<name>_..., with their check
	 * hooks; secret ones through trace_define_secret()).  Called once, from
	 * _PG_init.
	 */
	void		(*define_gucs) (void);

	/* Fill *req for item, or finish item->out and return TRACE_PREP_DONE. */
	TracePrep	(*prepare) (TraceItem *item, TraceRequest *req);

	/*
	 * Optional: refine a failed HTTP outcome from the start of the response
	 * body (e.g. an S3 error code).  body is NUL-terminated.
	 */
	void		(*explain) (TraceItem *item, const char *body);
} TraceAdapter;

/* registry.c */
extern const TraceAdapter *trace_adapter(TraceAdapterId id);

/* common.c: what every HTTP adapter shares */
extern struct curl_slist *trace_common_headers(const TraceItem *item);
extern bool trace_add_header(struct curl_slist **headers, const char *name,
							 const char *value, TraceItem *item,
							 const char *guc);
extern bool trace_target_url(const char *url, const char *guc, TraceItem *item);
extern bool trace_check_url(char **newval, const char *guc);

#endif							/* TRACE_ADAPTER_H */
