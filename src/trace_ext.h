/*
 * trace_ext.h: declarations shared by the files of trace_ext.
 *
 * Each .c file does one job (GUCs, shared memory, trigger, queue SQL,
 * payload, HTTP driver, worker loop, metrics); this header is the only
 * place where they meet.  Adapters have their own small interface in
 * adapters/adapter.h.
 */
#ifndef TRACE_EXT_H
#define TRACE_EXT_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/palloc.h"

#ifndef TRACE_EXT_VERSION
#define TRACE_EXT_VERSION "unknown"
#endif

/* The adapter kinds.  Their order is the order of the metrics rows. */
typedef enum TraceAdapterKind
{
	TRACE_ADAPTER_MYFXBOOK = 0,
	TRACE_ADAPTER_WEBHOOK,
	TRACE_ADAPTER_FILE,
	TRACE_NUM_ADAPTERS
} TraceAdapterKind;

/* Why an attempt failed: a fixed set, so metric labels stay bounded. */
typedef enum TraceReason
{
	TRACE_REASON_TIMEOUT = 0,
	TRACE_REASON_CONNECT,
	TRACE_REASON_TLS,
	TRACE_REASON_HTTP_4XX,
	TRACE_REASON_HTTP_5XX,
	TRACE_REASON_REDIRECT,
	TRACE_REASON_CONFIG,
	TRACE_REASON_IO,
	TRACE_REASON_OTHER,
	TRACE_NUM_REASONS
} TraceReason;

#define TRACE_MAX_WORKERS		32
#define TRACE_NUM_BUCKETS		11	/* finite buckets of the duration histogram */
#define TRACE_ERROR_LEN			256

/* The result of one delivery attempt. */
typedef struct TraceOutcome
{
	bool		done;			/* an outcome has been recorded */
	bool		delivered;		/* 2xx received, or the line is on disk */
	bool		permanent;		/* give up now: retrying cannot help */
	bool		posted;			/* an attempt was made (for the timing
								 * histogram) */
	TraceReason reason;			/* when not delivered */
	int			http_status;	/* 0 when no HTTP status was received */
	int			retry_after;	/* seconds from Retry-After, or -1 */
	double		seconds;		/* how long the attempt took */
	char		error[TRACE_ERROR_LEN]; /* no PII, no secrets */
} TraceOutcome;

struct TraceBatch;

/* One claimed queue row, from claim to the recording of its outcome. */
typedef struct TraceItem
{
	struct TraceBatch *batch;	/* the claim it came from (worker.c) */
	int64		id;
	int64		trade_id;
	TraceAdapterKind adapter;
	int			attempts;		/* including the one in progress */
	TimestampTz created_at;
	Oid			trade_table;
	bool		by_operator;	/* queued by trace.enqueue() with explicit
								 * adapters: the signal's list is not
								 * consulted */
	const char *cancelled;		/* why it is not sent (a fixed text, no
								 * personal data), or NULL */
	char	   *payload;		/* the allowlisted JSON, or NULL */
	TraceOutcome out;
} TraceItem;

/* ---- guc.c ---- */
extern char *trace_database;
extern int	trace_workers;
extern int	trace_delay_s;
extern int	trace_batch_size;
extern int	trace_poll_interval_ms;
extern int	trace_max_retries;
extern int	trace_backoff_base_ms;
extern int	trace_backoff_cap_s;
extern int	trace_ttl_s;
extern int	trace_reconcile_interval_s;
extern int	trace_http_timeout_ms;
extern char *trace_enabled_adapters;
extern char *trace_payload_columns;
extern char *trace_myfxbook_url;
extern char *trace_webhook_endpoint;
extern char *trace_webhook_auth_header;
extern char *trace_file_export_type;
extern char *trace_file_export_dir;
extern char *trace_s3_endpoint;
extern char *trace_s3_region;
extern char *trace_s3_bucket;
extern char *trace_s3_prefix;
extern char *trace_secrets_file;
extern char *trace_ca_file;

extern void trace_define_gucs(void);
extern bool trace_adapter_enabled(TraceAdapterKind kind);
extern int	trace_adapter_from_name(const char *name);
extern const char *trace_adapter_name(TraceAdapterKind kind);
extern const char *trace_reason_name(TraceReason reason);
extern bool trace_url_scheme_ok(const char *url);

/* ---- secrets.c ---- */
extern void trace_define_secret_gucs(void);
extern void trace_secrets_load(void);
extern bool trace_secrets_file_safe(const char *path, const char **why);
extern const char *trace_secret(const char *name);
extern void trace_install_log_redaction(void);

/* ---- shmem.c ---- */
extern bool trace_preloaded;
extern void trace_shmem_install(void);
extern bool trace_shmem_ready(void);
extern void trace_worker_slot_attach(int slot);
extern int	trace_live_worker_pids(int *pids, int max);
extern bool trace_database_missing(void);
extern void trace_set_database_missing(bool missing);
extern void trace_wake_workers(TimestampTz due);
extern void trace_publish_wake_at(TimestampTz when);
extern void trace_note_reload(void);

/* ---- wake.c ---- */
extern bool trace_is_worker;
extern bool trace_enqueuing;
extern void trace_wake_install(void);
extern void trace_request_wake(void);
extern void trace_request_wake_at(TimestampTz due);

/* What trace.metrics and trace.prometheus_metrics() report of one adapter. */
typedef struct TraceMetrics
{
	uint64		pushed;
	uint64		failed;
	uint64		failed_by_reason[TRACE_NUM_REASONS];
	uint64		buckets[TRACE_NUM_BUCKETS]; /* cumulative */
	uint64		count;
	double		sum;
	uint64		reconciled;		/* rows queued by trace.reconcile() */
} TraceMetrics;

extern const double trace_duration_buckets[TRACE_NUM_BUCKETS];
extern void trace_metrics_count(const TraceItem *item);
extern void trace_metrics_snapshot(TraceAdapterKind kind, TraceMetrics *m);
extern void trace_metrics_count_reconciled(TraceAdapterKind kind, uint64 n);

/* ---- trigger.c ---- */
extern int	trace_enqueue_trade(Oid trade_table, Datum trade_id, Oid trade_id_type,
								Datum user_id, Oid user_id_type, bool user_null,
								Datum signal_id, Oid signal_id_type, bool signal_null,
								ArrayType *explicit_adapters);

/* ---- queue.c: every function runs its own short transaction ---- */
extern void trace_queue_release_orphans(void);
extern int	trace_queue_claim(int max_rows, const bool *saturated,
							  TraceItem **items, TimestampTz *next_due);
extern TimestampTz trace_queue_record(TraceItem **items, int n);
extern int64 trace_queue_cleanup(TimestampTz *oldest);
extern int64 trace_queue_reconcile(void);
extern bool trace_extension_present(void);

/* ---- payload.c: called inside the claim transaction ---- */
extern void trace_payload_build(TraceItem *items, int n, MemoryContext into);

/* ---- http.c ---- */
struct curl_slist;
typedef struct TraceRequest
{
	const char *url;
	const char *method;			/* "POST" or "PUT" */
	struct curl_slist *headers; /* owned by the driver once started */
	const char *body;
	size_t		body_len;
	const char *aws_sigv4;		/* CURLOPT_AWS_SIGV4 provider string, or
								 * NULL */
	const char *userpwd;		/* for the signer, or NULL */
} TraceRequest;

extern void trace_http_init(void);
extern void trace_http_start(TraceItem *item, TraceRequest *req);
extern void trace_http_poll(int timeout_ms);
extern void trace_http_push_done(TraceItem *item);
extern bool trace_http_has_done(void);
extern TraceItem *trace_http_next_done(void);
extern int	trace_http_inflight(TraceAdapterKind kind);
extern int	trace_http_inflight_total(void);
extern void trace_http_abort_all(void);

/* ---- worker.c ---- */
extern void trace_register_workers(void);
extern PGDLLEXPORT void trace_worker_main(Datum arg);

/* helpers shared by the outcome paths */
extern void trace_outcome_fail(TraceOutcome *out, TraceReason reason,
							   const char *fmt,...) pg_attribute_printf(3, 4);
extern void trace_outcome_append(TraceOutcome *out, const char *fmt,...)
			pg_attribute_printf(2, 3);
extern void trace_outcome_delivered(TraceOutcome *out, int http_status);

#endif							/* TRACE_EXT_H */
