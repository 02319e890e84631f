/*
 * trace_ext.h: declarations shared by the files of trace_ext.
 *
 * Each .c file does one job, and this header is where they meet:
 * guc.c (the core parameters), shmem.c (sizing and creating shared
 * memory), wake.c (the workers' slots and waking them), trigger.c
 * (queueing closed trades), queue_check.c (the queue's CHECK rule),
 * queue.c (the worker's SQL), payload.c (building payloads, consent at
 * send time), outcome.c (what an attempt came to, and the retry rule),
 * health.c (each tracker's breaker, pause and rate limit),
 * worker.c (the one loop that sequences a pass), metrics.c (the counters
 * and their SQL), secrets.c (secret values and the log filter).  The HTTP
 * transport has its own header, src/http.h; the trackers theirs,
 * adapters/adapter.h, with adapters/registry.c as the one list of them.
 */
#ifndef TRACE_EXT_H
#define TRACE_EXT_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "nodes/pg_list.h"
#include "utils/array.h"
#include "utils/palloc.h"
#include "utils/relcache.h"
#include "utils/snapshot.h"

#ifndef TRACE_EXT_VERSION
#define TRACE_EXT_VERSION "unknown"
#endif

/*
 * An adapter (tracker) is known by its position in adapters/registry.c:
 * 0 .. trace_num_adapters - 1, the order of the metrics rows.
 */
typedef int TraceAdapterId;

#define TRACE_MAX_ADAPTERS		16

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
	bool		held;			/* a tracker-level failure while the tracker's
								 * breaker is not closed: the attempt is not
								 * counted */
	double		hold_s;			/* held: when the tracker may be tried again */
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
	TraceAdapterId adapter;
	int			attempts;		/* including the one in progress */
	TimestampTz created_at;
	Oid			trade_table;
	bool		probe;			/* the half-open breaker's probe (health.c) */
	bool		by_operator;	/* queued by trace.enqueue() with explicit
								 * adapters: the signal's list is not
								 * consulted */
	TimestampTz claimed_due;	/* its due_at when claimed: the record's
								 * fence, with attempts */
	bool		lease_lost;		/* another worker holds its lease (lease.c):
								 * not ours to send */
	const char *cancelled;		/* why it is not sent (a fixed text, no
								 * personal data), or NULL */
	char	   *payload;		/* the allowlisted JSON, or NULL */
	TraceOutcome out;
} TraceItem;

/* An abandoned row, as the record statement returned it. */
typedef struct TraceAbandoned
{
	char	   *trade;
	char	   *adapter;
	char	   *attempts;
	char	   *error;
} TraceAbandoned;

/* What a worker is doing (trace.worker_status). */
typedef enum TraceWorkerState
{
	TRACE_WORKER_WAITING = 0,	/* for its database or the extension */
	TRACE_WORKER_IDLE,
	TRACE_WORKER_SENDING,
	TRACE_WORKER_PAUSED,		/* trace.paused */
	TRACE_WORKER_HELD			/* the queue comes from another cluster */
} TraceWorkerState;

/* What changed for a tracker's breaker (health.c). */
typedef enum TraceHealthEvent
{
	TRACE_HEALTH_NONE = 0,
	TRACE_HEALTH_OPENED,
	TRACE_HEALTH_STILL_OPEN,	/* a probe failed */
	TRACE_HEALTH_CLOSED
} TraceHealthEvent;

typedef struct TraceHealthNote
{
	TraceAdapterId adapter;
	int			consecutive_failures;
	TimestampTz next_probe_at;
	TimestampTz open_since;
	char		last_error[TRACE_ERROR_LEN];
} TraceHealthNote;

/* ---- trace_ext.c ---- */
extern bool trace_preloaded;
extern void trace_error_not_preloaded(const char *to_do) pg_attribute_noreturn();

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
extern bool trace_paused;
extern char *trace_enabled_adapters;
extern char *trace_payload_columns;
extern char *trace_secrets_file;
extern char *trace_ca_file;

extern void trace_define_gucs(void);
extern bool trace_adapter_enabled(TraceAdapterId id);
extern const char *trace_reason_name(TraceReason reason);
extern bool trace_url_scheme_ok(const char *url);
extern bool trace_check_absolute_path(char **newval, const char *guc);

/* ---- adapters/registry.c: the one list of trackers ---- */
extern const int trace_num_adapters;
extern const char *trace_adapter_name(TraceAdapterId id);
extern TraceAdapterId trace_adapter_id(const char *name);
extern TraceAdapterId trace_adapter_id_n(const char *name, size_t len);
extern const char *trace_adapter_list(void);
extern void trace_define_adapter_gucs(void);

/* ---- secrets.c ---- */
extern void trace_define_secret(const char *name, const char *desc);
extern void trace_secrets_load(void);
extern bool trace_secrets_file_safe(const char *path, const char **why);
extern const char *trace_secret(const char *name);
extern void trace_install_log_redaction(void);

/* ---- shmem.c: sizes and creates what the files below keep there ---- */
extern void trace_shmem_install(void);

/* ---- wake.c: the workers' slots, and waking them ---- */
extern bool trace_is_worker;
extern bool trace_enqueuing;
extern Size trace_wake_shmem_size(void);
extern void trace_wake_shmem_init(void);
extern void trace_wake_install(void);
extern void trace_request_wake(void);
extern void trace_request_wake_at(TimestampTz due);
extern void trace_worker_slot_attach(int slot);
extern int	trace_live_worker_pids(int *pids, int max);
extern bool trace_database_missing(void);
extern void trace_set_database_missing(bool missing);
extern void trace_publish_wake_at(TimestampTz when);
extern void trace_wake_all(void);
extern void trace_worker_set_state(TraceWorkerState state);
extern void trace_worker_note_pass(bool started);
extern void trace_worker_note_work(int in_flight, int delivered, int failed);
extern void trace_note_reload(void);

/* ---- lease.c: the rows being sent, in shared memory ---- */
extern Size trace_lease_shmem_size(void);
extern void trace_lease_shmem_init(void);
extern int	trace_lease_take(TraceItem *items, int n, TimestampTz expires);
extern void trace_lease_end(TraceItem **items, int n);
extern void trace_lease_end_mine(void);
extern void trace_lease_end_orphans(void);
extern bool trace_lease_held(int64 id);
extern int64 *trace_lease_ids(int *n);

/* ---- health.c: breakers, pauses and rate limits of the trackers ---- */
extern int	trace_breaker_threshold;
extern int	trace_max_requests_per_second;
extern Size trace_health_shmem_size(void);
extern void trace_health_shmem_init(void);
extern int	trace_health_allow(TraceAdapterId id, int want, bool *probe,
							   TimestampTz *wait_until);
extern TimestampTz trace_health_claimed(TraceAdapterId id, int want, int allowed,
										int got, bool probe);
extern TraceHealthEvent trace_health_report(TraceAdapterId id, TraceOutcome *out,
											bool probe, TraceHealthNote *note);
extern bool trace_health_breaker_open(TraceAdapterId id);
extern uint64 trace_health_throttled(TraceAdapterId id);
extern char *trace_health_announce(TraceHealthEvent event, const TraceHealthNote *note);

/* ---- metrics.c: the delivery counters ---- */
extern Size trace_metrics_shmem_size(void);
extern void trace_metrics_shmem_init(void);
extern void trace_metrics_count(const TraceItem *item);

/* ---- consent.c: the opt-in and the signal's adapters, read by index ---- */
extern int	trace_consent_read(Relation users, Datum user_id, Oid user_type,
							   Relation signals, Datum signal_id, Oid signal_type,
							   bool signal_null, Snapshot snapshot, bool *listed);

/* ---- queue_insert.c: queue rows written without the executor ---- */
typedef struct TraceQueueRow
{
	int64		trade_id;
	Oid			trade_table;
	TimestampTz due_at;
	bool		by_operator;
	bool		adapters[TRACE_MAX_ADAPTERS];	/* true: a row for it */
} TraceQueueRow;

extern int	trace_queue_insert(const TraceQueueRow *row, bool *taken);

/* ---- trigger.c ---- */
extern int	trace_enqueue_trade(Oid trade_table, Datum trade_id, Oid trade_id_type,
								Datum user_id, Oid user_id_type, bool user_null,
								Datum signal_id, Oid signal_id_type, bool signal_null,
								const bool *explicit_want);

/* ---- queue.c: the worker's SQL ---- */
extern void trace_queue_begin(const char *activity);
extern void trace_queue_use_indexes(void);
extern void trace_queue_commit(void);
extern int	trace_queue_claim(int max_rows, const bool *skip, MemoryContext cxt,
							  TraceItem **items);
extern void trace_queue_cancel(TraceItem *items, int n);
extern TimestampTz trace_queue_next_due(const bool *skip);
extern bool trace_queue_held(int64 *foreign);
extern void trace_queue_notify(List *payloads);
extern TimestampTz trace_queue_record(TraceItem **items, int n, List **abandoned);
extern void trace_queue_release_orphans(void);
extern int64 trace_queue_cleanup(TimestampTz *oldest);
extern int64 trace_queue_reconcile(void);
extern bool trace_extension_present(void);

/* ---- payload.c: called inside the claim transaction ---- */
extern void trace_payload_build(TraceItem *items, int n, MemoryContext into);

/* ---- outcome.c ---- */
struct TraceResponse;
extern void trace_outcome_fail(TraceOutcome *out, TraceReason reason,
							   const char *fmt,...) pg_attribute_printf(3, 4);
extern void trace_outcome_append(TraceOutcome *out, const char *fmt,...)
			pg_attribute_printf(2, 3);
extern void trace_outcome_delivered(TraceOutcome *out, int http_status);
extern void trace_outcome_from_response(TraceOutcome *out,
										const struct TraceResponse *resp);
extern const char *trace_outcome_next_status(const TraceItem *item, double *delay);
extern double trace_outcome_backoff(int attempts);
extern void trace_outcome_log_failures(TraceItem **items, int n);

/* ---- worker.c ---- */
extern void trace_register_workers(void);
extern PGDLLEXPORT void trace_worker_main(Datum arg);

#endif							/* TRACE_EXT_H */
