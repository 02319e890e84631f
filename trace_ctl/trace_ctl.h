/*
 * trace_ctl.h: declarations shared by the files of trace_ctl, the
 * monitoring client of trace_ext.
 *
 * trace_ctl.c parses the command line and dispatches; conn.c connects the
 * libpq way and runs queries without ever blocking past a deadline or a
 * stop request; status.c reads the monitoring views, applies the health
 * rules and prints the result; watch.c prints trace_alert notifications
 * and reconnects after a lost connection; output.c holds the small
 * formatting helpers (JSON strings, aligned text tables, durations).
 *
 * trace_ctl reads only what pg_monitor may read: it never touches
 * trace.trace_queue, and it never writes.
 */
#ifndef TRACE_CTL_H
#define TRACE_CTL_H

#include "libpq-fe.h"
#include "pqexpbuffer.h"

#ifndef TRACE_EXT_VERSION
#define TRACE_EXT_VERSION "unknown"
#endif

/* Exit statuses of "status": the Nagios/Icinga plugin convention. */
#define TC_OK			0
#define TC_WARNING		1
#define TC_CRITICAL		2
#define TC_UNKNOWN		3

/* Exit statuses of "watch". */
#define WATCH_STOPPED		0	/* SIGINT or SIGTERM */
#define WATCH_FAILED		1	/* the first connection failed, or output */
#define WATCH_USAGE			2	/* bad options */

/* Defaults of the options (README: trace_ctl). */
#define DEFAULT_TIMEOUT_S			10
#define DEFAULT_WARNING_AGE_S		900
#define DEFAULT_CRITICAL_AGE_S		3600
#define DEFAULT_WARNING_ABANDONED	1
#define DEFAULT_CRITICAL_ABANDONED	100

typedef struct TraceCtlOptions
{
	const char *conninfo;		/* -d or the last argument; NULL: libpq's
								 * defaults (PG* variables) */
	bool		json;			/* --json */
	int			timeout_s;		/* --timeout: connecting, each query */
	bool		timeout_given;	/* --timeout was given (else PGCONNECT_TIMEOUT
								 * wins over the default) */
	/* status's thresholds; 0 turns a rule off */
	int64		warning_age_s;
	int64		critical_age_s;
	int64		warning_abandoned;
	int64		critical_abandoned;
} TraceCtlOptions;

/* status.c, watch.c */
extern int	run_status(const TraceCtlOptions *opts);
extern int	run_watch(const TraceCtlOptions *opts);

/* conn.c */
typedef enum TcWait
{
	TC_WAIT_READY,
	TC_WAIT_TIMEOUT,
	TC_WAIT_INTERRUPTED,
	TC_WAIT_FAILED
} TcWait;

/* A file descriptor that becomes readable when trace_ctl must stop. */
extern int	tc_interrupt_fd;

extern double tc_clock(void);
extern PGconn *tc_connect(const TraceCtlOptions *opts, char **errmsg,
						  bool *interrupted);
extern PGresult **tc_query(PGconn *conn, const char *sql, double deadline,
						   int *nresults, char **errmsg, bool *interrupted);
extern void tc_free_results(PGresult **results, int nresults);
extern char *tc_first_line(const char *message);

/* output.c */
extern void json_string(PQExpBuffer buf, const char *s);
extern void json_key(PQExpBuffer buf, bool *first, const char *key);
extern void json_number_or_null(PQExpBuffer buf, const char *digits);
extern char *format_duration(int64 seconds);
extern char *format_relative(const char *seconds_ago);
extern char *one_line(const char *s);

typedef struct TextTable
{
	int			ncols;
	const char *const *headers;
	const char *align;			/* one 'l' or 'r' per column */
	int			nrows;
	int			maxrows;
	char	  **cells;			/* nrows * ncols, owned */
} TextTable;

extern void table_init(TextTable *t, int ncols, const char *const *headers,
					   const char *align);
extern void table_add_row(TextTable *t, char **cells);
extern void table_print(const TextTable *t, FILE *out);
extern void table_free(TextTable *t);

#endif							/* TRACE_CTL_H */
