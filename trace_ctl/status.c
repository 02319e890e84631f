/*
 * status.c: "trace_ctl status", a health check of trace_ext for a person
 * or for Nagios/Icinga.
 *
 * One round trip, in a read-only transaction under a statement_timeout:
 * the extension's version and the settings, trace.queue_backlog,
 * trace.worker_status and trace.tracker_health, all of which pg_monitor may
 * read.  It never reads trace.trace_queue itself (the view reads only the
 * pending, sending and abandoned rows, through partial indexes), and it
 * writes nothing.
 *
 * The health rules (README, trace_ctl) turn what was read into reasons,
 * each with a status; the worst wins and is the exit status (0 OK, 1
 * WARNING, 2 CRITICAL, 3 UNKNOWN, the plugin convention).  The first line
 * of the text output is the plugin's status line: every reason, then the
 * performance data after "|".  Anything that keeps the rules from being
 * applied (no connection, no extension, no privilege, a failed query) is
 * UNKNOWN, never OK.
 */
#include "postgres_fe.h"

#include "trace_ctl.h"

/* The columns of the four result sets, as the query below orders them. */
enum
{
	INFO_EXTVERSION, INFO_DATABASE, INFO_IN_RECOVERY, INFO_PAUSED,
	INFO_WORKERS, INFO_TRACE_DATABASE, INFO_CHECKED_AT, INFO_NCOLS
};
enum
{
	Q_ADAPTER, Q_PENDING, Q_SENDING, Q_ABANDONED, Q_OLDEST_DUE_AT,
	Q_OLDEST_DUE_AGO, Q_NCOLS
};
enum
{
	W_WORKER, W_PID, W_STATE, W_IN_FLIGHT, W_NEXT_WAKE_AT, W_NEXT_WAKE_AGO,
	W_PASS_STARTED, W_PASS_STARTED_AGO, W_PASS_FINISHED, W_PASS_FINISHED_AGO,
	W_DELIVERED, W_FAILED, W_STARTED_AT, W_STARTED_AGO, W_NCOLS
};
enum
{
	T_ADAPTER, T_STATE, T_SINCE, T_SINCE_AGO, T_FAILURES, T_NEXT_PROBE_AT,
	T_NEXT_PROBE_AGO, T_PAUSED_UNTIL, T_PAUSED_UNTIL_AGO, T_LAST_ERROR, T_NCOLS
};

/*
 * A timestamptz column as two: ISO 8601 (for JSON) and whole seconds
 * before the transaction's now() (negative: in the future; for text).
 */
#define TS(col) \
	"pg_catalog.to_json(" col ") #>> '{}', " \
	"pg_catalog.floor(EXTRACT(epoch FROM pg_catalog.now() - " col "))::bigint"

static const char *const status_sql =
"SET search_path = pg_catalog, pg_temp;\n"
"BEGIN TRANSACTION READ ONLY;\n"
"SELECT (SELECT e.extversion FROM pg_catalog.pg_extension e\n"
"         WHERE e.extname = 'trace_ext'),\n"
"       pg_catalog.current_database(),\n"
"       pg_catalog.pg_is_in_recovery(),\n"
"       pg_catalog.current_setting('trace.paused', true),\n"
"       pg_catalog.current_setting('trace.workers', true),\n"
"       pg_catalog.current_setting('trace.database', true),\n"
"       pg_catalog.to_json(pg_catalog.now()) #>> '{}';\n"
"SELECT b.adapter, b.pending, b.sending, b.abandoned, " TS("b.oldest_due_at") "\n"
"  FROM trace.queue_backlog b;\n"
"SELECT w.worker, w.pid, w.state, w.in_flight, " TS("w.next_wake_at") ",\n"
"       " TS("w.last_pass_started") ", " TS("w.last_pass_finished") ",\n"
"       w.delivered, w.failed, " TS("w.started_at") "\n"
"  FROM trace.worker_status w ORDER BY w.worker;\n"
"SELECT h.adapter, h.state, " TS("h.since") ", h.consecutive_failures,\n"
"       " TS("h.next_probe_at") ", " TS("h.paused_until") ", h.last_error\n"
"  FROM trace.tracker_health h;\n"
"COMMIT;\n";

typedef struct Reason
{
	int			status;
	char	   *message;
} Reason;

typedef struct Report
{
	int			status;			/* the worst of the reasons' */
	Reason		reasons[16];
	int			nreasons;
	char	   *notes[4];
	int			nnotes;

	/* what was read (NULL when the check ended before) */
	PGresult   *info;
	PGresult   *queue;
	PGresult   *workers;
	PGresult   *trackers;

	/* the totals of the performance data */
	int64		pending;
	int64		sending;
	int64		abandoned;
	int64		oldest_overdue;
	int			nworkers;
} Report;

static const char *const status_names[] = {"OK", "WARNING", "CRITICAL", "UNKNOWN"};

static void add_reason(Report *r, int status, char *message);
static void add_note(Report *r, char *note);
static void read_results(Report *r, PGresult **results, int nresults);
static void apply_rules(Report *r, const TraceCtlOptions *opts);
static char *status_line(const Report *r);
static void print_text(const Report *r);
static void print_json(const Report *r, const TraceCtlOptions *opts);
static const char *val(const PGresult *res, int row, int col);

int
run_status(const TraceCtlOptions *opts)
{
	Report		r;
	PGconn	   *conn;
	char	   *errmsg;
	bool		interrupted;
	PGresult  **results;
	int			nresults = 0;
	char	   *sql;
	int			i;

	memset(&r, 0, sizeof(r));

	conn = tc_connect(opts, &errmsg, &interrupted);
	if (conn == NULL)
	{
		add_reason(&r, TC_UNKNOWN, psprintf("cannot connect: %s", errmsg));
		pg_free(errmsg);
	}
	else
	{
		/* the session's timeout first, so that it covers every statement */
		sql = psprintf("SET statement_timeout = %d;\n%s",
					   opts->timeout_s * 1000, status_sql);
		results = tc_query(conn, sql, tc_clock() + opts->timeout_s + 5,
						   &nresults, &errmsg, &interrupted);
		pg_free(sql);
		if (results == NULL)
		{
			add_reason(&r, TC_UNKNOWN, psprintf("query failed: %s", errmsg));
			pg_free(errmsg);
		}
		else
		{
			read_results(&r, results, nresults);
			if (r.nreasons == 0)
				apply_rules(&r, opts);
			/* the results the report kept are freed with it, below */
			for (i = 0; i < nresults; i++)
			{
				if (results[i] != r.info && results[i] != r.queue &&
					results[i] != r.workers && results[i] != r.trackers)
					PQclear(results[i]);
			}
			pg_free(results);
		}
		PQfinish(conn);
	}

	if (opts->json)
		print_json(&r, opts);
	else
		print_text(&r);
	fflush(stdout);

	PQclear(r.info);
	PQclear(r.queue);
	PQclear(r.workers);
	PQclear(r.trackers);
	for (i = 0; i < r.nreasons; i++)
		pg_free(r.reasons[i].message);
	for (i = 0; i < r.nnotes; i++)
		pg_free(r.notes[i]);
	return r.status;
}

static void
add_reason(Report *r, int status, char *message)
{
	if (r->nreasons < lengthof(r->reasons))
	{
		r->reasons[r->nreasons].status = status;
		r->reasons[r->nreasons].message = message;
		r->nreasons++;
	}
	else
		pg_free(message);
	r->status = Max(r->status, status);
}

static void
add_note(Report *r, char *note)
{
	if (r->nnotes < lengthof(r->notes))
		r->notes[r->nnotes++] = note;
	else
		pg_free(note);
}

/* A value, or NULL for SQL NULL. */
static const char *
val(const PGresult *res, int row, int col)
{
	if (res == NULL || row >= PQntuples(res) || col >= PQnfields(res) ||
		PQgetisnull(res, row, col))
		return NULL;
	return PQgetvalue(res, row, col);
}

/*
 * Sort the results into the report, or explain as an UNKNOWN reason why
 * the rules cannot be applied.
 */
static void
read_results(Report *r, PGresult **results, int nresults)
{
	PGresult   *error = NULL;
	PGresult   *sets[4] = {NULL, NULL, NULL, NULL};
	static const int ncols[4] = {INFO_NCOLS, Q_NCOLS, W_NCOLS, T_NCOLS};
	int			nsets = 0;
	int			i;
	const char *extversion;

	for (i = 0; i < nresults; i++)
	{
		ExecStatusType st = PQresultStatus(results[i]);

		if (st == PGRES_TUPLES_OK && nsets < 4)
			sets[nsets++] = results[i];
		else if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK && error == NULL)
			error = results[i];
	}
	r->info = sets[0];
	r->queue = sets[1];
	r->workers = sets[2];
	r->trackers = sets[3];

	/* No extension, or one older than the views: say so, whatever failed. */
	if (r->info != NULL && PQntuples(r->info) == 1)
	{
		const char *db = val(r->info, 0, INFO_DATABASE);
		const char *tracedb = val(r->info, 0, INFO_TRACE_DATABASE);

		extversion = val(r->info, 0, INFO_EXTVERSION);
		if (extversion == NULL)
		{
			if (tracedb != NULL && db != NULL && strcmp(db, tracedb) != 0)
				add_reason(r, TC_UNKNOWN,
						   psprintf("trace_ext is not installed in database \"%s\" (trace.database is \"%s\")",
									db, tracedb));
			else
				add_reason(r, TC_UNKNOWN,
						   psprintf("trace_ext is not installed in database \"%s\"",
									db ? db : "?"));
			return;
		}
		if (error != NULL && r->queue == NULL &&
			strcmp(PQresultErrorField(error, PG_DIAG_SQLSTATE) ?
				   PQresultErrorField(error, PG_DIAG_SQLSTATE) : "", "42P01") == 0)
		{
			add_reason(r, TC_UNKNOWN,
					   psprintf("trace_ext %s has no trace.queue_backlog: trace_ctl needs 1.5 or later (ALTER EXTENSION trace_ext UPDATE)",
								extversion));
			return;
		}
	}

	if (error != NULL)
	{
		const char *sqlstate = PQresultErrorField(error, PG_DIAG_SQLSTATE);
		const char *primary = PQresultErrorField(error, PG_DIAG_MESSAGE_PRIMARY);
		char	   *msg = one_line(primary ? primary : PQresultErrorMessage(error));

		if (sqlstate && strcmp(sqlstate, "42501") == 0)
			add_reason(r, TC_UNKNOWN,
					   psprintf("%s (trace_ctl needs a role that is a member of pg_monitor)", msg));
		else if (sqlstate && strcmp(sqlstate, "57014") == 0)
			add_reason(r, TC_UNKNOWN, psprintf("query timed out: %s", msg));
		else
			add_reason(r, TC_UNKNOWN, psprintf("query failed: %s", msg));
		pg_free(msg);
		return;
	}

	for (i = 0; i < 4; i++)
	{
		if (sets[i] == NULL || PQnfields(sets[i]) != ncols[i])
		{
			add_reason(r, TC_UNKNOWN,
					   pg_strdup("unexpected answer from the server (not the four result sets trace_ctl asked for)"));
			return;
		}
	}
	if (PQntuples(r->info) != 1)
		add_reason(r, TC_UNKNOWN, pg_strdup("unexpected answer from the server"));
}

/*
 * "webhook" when one adapter of the result has a positive count in col,
 * "myfxbook 2, webhook 1" when several do; NULL when none.
 */
static char *
adapters_with(const PGresult *res, int col)
{
	PQExpBufferData buf;
	int			n = 0;
	int			i;
	char	   *out;

	initPQExpBuffer(&buf);
	for (i = 0; i < PQntuples(res); i++)
	{
		const char *v = val(res, i, col);

		if (v == NULL || strtoll(v, NULL, 10) <= 0)
			continue;
		appendPQExpBuffer(&buf, "%s%s %s", n ? ", " : "", val(res, i, Q_ADAPTER), v);
		n++;
	}
	if (n == 1)
	{
		/* one adapter: its name alone, the count is the total */
		for (i = 0; i < PQntuples(res); i++)
		{
			const char *v = val(res, i, col);

			if (v != NULL && strtoll(v, NULL, 10) > 0)
			{
				resetPQExpBuffer(&buf);
				appendPQExpBufferStr(&buf, val(res, i, Q_ADAPTER));
			}
		}
	}
	out = n ? pg_strdup(buf.data) : NULL;
	termPQExpBuffer(&buf);
	return out;
}

/* The adapters whose oldest pending row is at least limit seconds overdue. */
static char *
adapters_overdue(const PGresult *res, int64 limit)
{
	PQExpBufferData buf;
	int			i;
	char	   *out;

	initPQExpBuffer(&buf);
	for (i = 0; i < PQntuples(res); i++)
	{
		const char *v = val(res, i, Q_OLDEST_DUE_AGO);

		if (v != NULL && strtoll(v, NULL, 10) >= limit)
			appendPQExpBuffer(&buf, "%s%s", buf.len ? ", " : "", val(res, i, Q_ADAPTER));
	}
	out = pg_strdup(buf.data);
	termPQExpBuffer(&buf);
	return out;
}

/* The health rules (README, trace_ctl; --help). */
static void
apply_rules(Report *r, const TraceCtlOptions *opts)
{
	const char *paused = val(r->info, 0, INFO_PAUSED);
	const char *workers_setting = val(r->info, 0, INFO_WORKERS);
	bool		standby = (val(r->info, 0, INFO_IN_RECOVERY) != NULL &&
						   strcmp(val(r->info, 0, INFO_IN_RECOVERY), "t") == 0);
	int			configured = workers_setting ? atoi(workers_setting) : -1;
	int			held = 0;
	int			i;
	char	   *list;

	/* the totals */
	for (i = 0; i < PQntuples(r->queue); i++)
	{
		const char *ago = val(r->queue, i, Q_OLDEST_DUE_AGO);

		r->pending += strtoll(val(r->queue, i, Q_PENDING), NULL, 10);
		r->sending += strtoll(val(r->queue, i, Q_SENDING), NULL, 10);
		r->abandoned += strtoll(val(r->queue, i, Q_ABANDONED), NULL, 10);
		if (ago != NULL)
			r->oldest_overdue = Max(r->oldest_overdue, strtoll(ago, NULL, 10));
	}
	r->nworkers = PQntuples(r->workers);

	/* CRITICAL: fewer workers than configured; none runs on a standby */
	if (standby)
		add_note(r, pg_strdup("standby: no worker runs during recovery"));
	else if (configured > 0 && r->nworkers < configured)
	{
		if (r->nworkers == 0)
			add_reason(r, TC_CRITICAL,
					   psprintf("no worker running (trace.workers = %d)", configured));
		else
			add_reason(r, TC_CRITICAL,
					   psprintf("%d of %d workers running", r->nworkers, configured));
	}
	else if (configured == 0)
		add_note(r, pg_strdup("trace.workers = 0: nothing is sent"));

	/* CRITICAL or WARNING: the oldest pending row is overdue */
	if (opts->critical_age_s > 0 && r->oldest_overdue >= opts->critical_age_s)
	{
		char	   *d = format_duration(r->oldest_overdue);

		list = adapters_overdue(r->queue, opts->critical_age_s);
		add_reason(r, TC_CRITICAL,
				   psprintf("oldest pending row %s overdue (%s)", d, list));
		pg_free(list);
		pg_free(d);
	}
	else if (opts->warning_age_s > 0 && r->oldest_overdue >= opts->warning_age_s)
	{
		char	   *d = format_duration(r->oldest_overdue);

		list = adapters_overdue(r->queue, opts->warning_age_s);
		add_reason(r, TC_WARNING,
				   psprintf("oldest pending row %s overdue (%s)", d, list));
		pg_free(list);
		pg_free(d);
	}

	/* CRITICAL or WARNING: abandoned rows */
	if ((opts->critical_abandoned > 0 && r->abandoned >= opts->critical_abandoned) ||
		(opts->warning_abandoned > 0 && r->abandoned >= opts->warning_abandoned))
	{
		int			st = (opts->critical_abandoned > 0 &&
						  r->abandoned >= opts->critical_abandoned) ?
		TC_CRITICAL : TC_WARNING;

		list = adapters_with(r->queue, Q_ABANDONED);
		add_reason(r, st, psprintf("%lld %s abandoned (%s)", (long long) r->abandoned,
								   r->abandoned == 1 ? "row" : "rows", list ? list : "?"));
		pg_free(list);
	}

	/* WARNING: paused, held, a breaker not closed */
	if (paused != NULL && strcmp(paused, "on") == 0)
		add_reason(r, TC_WARNING, pg_strdup("trace.paused is on"));
	for (i = 0; i < r->nworkers; i++)
	{
		const char *state = val(r->workers, i, W_STATE);

		if (state != NULL && strcmp(state, "held") == 0)
			held++;
	}
	if (held > 0)
		add_reason(r, TC_WARNING,
				   pg_strdup("queue held: restored from another cluster (trace.adopt_queue() or trace.cancel_queue())"));
	for (i = 0; i < PQntuples(r->trackers); i++)
	{
		const char *state = val(r->trackers, i, T_STATE);

		if (state != NULL && strcmp(state, "closed") != 0)
			add_reason(r, TC_WARNING,
					   psprintf("tracker %s breaker %s", val(r->trackers, i, T_ADAPTER), state));
	}
}

/*
 * TRACE_EXT <STATUS> - <reasons, worst first; notes> | <performance data>
 * Nothing from the server that could hold a "|" or a newline (a
 * tracker's error) goes into it.
 */
static char *
status_line(const Report *r)
{
	PQExpBufferData buf;
	int			n = 0;
	int			st;
	int			i;
	char	   *out;

	initPQExpBuffer(&buf);
	appendPQExpBuffer(&buf, "TRACE_EXT %s - ", status_names[r->status]);
	for (st = TC_UNKNOWN; st >= TC_OK; st--)
	{
		for (i = 0; i < r->nreasons; i++)
		{
			if (r->reasons[i].status != st)
				continue;
			appendPQExpBuffer(&buf, "%s%s", n++ ? "; " : "", r->reasons[i].message);
		}
	}
	if (n == 0)
		appendPQExpBuffer(&buf, "%lld pending, %lld abandoned, %d %s running",
						  (long long) r->pending, (long long) r->abandoned,
						  r->nworkers, r->nworkers == 1 ? "worker" : "workers");
	for (i = 0; i < r->nnotes; i++)
		appendPQExpBuffer(&buf, "; %s", r->notes[i]);
	if (r->info != NULL && r->status != TC_UNKNOWN)
		appendPQExpBuffer(&buf,
						  " | pending=%lld sending=%lld abandoned=%lld oldest_overdue_seconds=%lld workers=%d",
						  (long long) r->pending, (long long) r->sending,
						  (long long) r->abandoned, (long long) r->oldest_overdue,
						  r->nworkers);
	out = pg_strdup(buf.data);
	termPQExpBuffer(&buf);
	return out;
}

static void
print_text(const Report *r)
{
	static const char *const qh[] = {"adapter", "pending", "sending", "abandoned", "oldest due"};
	static const char *const wh[] = {"worker", "pid", "state", "in flight", "delivered",
	"failed", "last pass", "next wake", "started"};
	static const char *const th[] = {"adapter", "breaker", "since", "failures",
	"next probe", "paused until", "last error"};
	char	   *line = status_line(r);
	TextTable	t;
	int			i;

	printf("%s\n", line);
	pg_free(line);
	if (r->status == TC_UNKNOWN || r->info == NULL)
		return;

	printf("\ndatabase \"%s\", trace_ext %s, %s; trace.workers = %s, trace.paused = %s\n",
		   val(r->info, 0, INFO_DATABASE), val(r->info, 0, INFO_EXTVERSION),
		   strcmp(val(r->info, 0, INFO_IN_RECOVERY), "t") == 0 ? "standby" : "primary",
		   val(r->info, 0, INFO_WORKERS) ? val(r->info, 0, INFO_WORKERS) : "?",
		   val(r->info, 0, INFO_PAUSED) ? val(r->info, 0, INFO_PAUSED) : "?");

	printf("\nQueue (trace.queue_backlog)\n");
	table_init(&t, lengthof(qh), qh, "lrrrl");
	for (i = 0; i < PQntuples(r->queue); i++)
	{
		char	   *cells[lengthof(qh)];
		const char *ago = val(r->queue, i, Q_OLDEST_DUE_AGO);

		cells[0] = pg_strdup(val(r->queue, i, Q_ADAPTER));
		cells[1] = pg_strdup(val(r->queue, i, Q_PENDING));
		cells[2] = pg_strdup(val(r->queue, i, Q_SENDING));
		cells[3] = pg_strdup(val(r->queue, i, Q_ABANDONED));
		if (ago == NULL)
			cells[4] = pg_strdup("");
		else if (strtoll(ago, NULL, 10) >= 0)
		{
			char	   *d = format_duration(strtoll(ago, NULL, 10));

			cells[4] = psprintf("%s overdue", d);
			pg_free(d);
		}
		else
			cells[4] = format_relative(ago);
		table_add_row(&t, cells);
	}
	table_print(&t, stdout);
	table_free(&t);

	printf("\nWorkers (trace.worker_status)\n");
	if (PQntuples(r->workers) == 0)
		printf(" (no worker running)\n");
	else
	{
		table_init(&t, lengthof(wh), wh, "rrlrrrlll");
		for (i = 0; i < PQntuples(r->workers); i++)
		{
			char	   *cells[lengthof(wh)];

			cells[0] = pg_strdup(val(r->workers, i, W_WORKER));
			cells[1] = pg_strdup(val(r->workers, i, W_PID) ? val(r->workers, i, W_PID) : "");
			cells[2] = pg_strdup(val(r->workers, i, W_STATE) ? val(r->workers, i, W_STATE) : "");
			cells[3] = pg_strdup(val(r->workers, i, W_IN_FLIGHT) ? val(r->workers, i, W_IN_FLIGHT) : "");
			cells[4] = pg_strdup(val(r->workers, i, W_DELIVERED) ? val(r->workers, i, W_DELIVERED) : "");
			cells[5] = pg_strdup(val(r->workers, i, W_FAILED) ? val(r->workers, i, W_FAILED) : "");
			cells[6] = format_relative(val(r->workers, i, W_PASS_FINISHED_AGO));
			cells[7] = format_relative(val(r->workers, i, W_NEXT_WAKE_AGO));
			cells[8] = format_relative(val(r->workers, i, W_STARTED_AGO));
			table_add_row(&t, cells);
		}
		table_print(&t, stdout);
		table_free(&t);
	}

	printf("\nTrackers (trace.tracker_health)\n");
	table_init(&t, lengthof(th), th, "llrrlll");
	for (i = 0; i < PQntuples(r->trackers); i++)
	{
		char	   *cells[lengthof(th)];

		cells[0] = pg_strdup(val(r->trackers, i, T_ADAPTER));
		cells[1] = pg_strdup(val(r->trackers, i, T_STATE) ? val(r->trackers, i, T_STATE) : "");
		cells[2] = format_relative(val(r->trackers, i, T_SINCE_AGO));
		cells[3] = pg_strdup(val(r->trackers, i, T_FAILURES) ? val(r->trackers, i, T_FAILURES) : "");
		cells[4] = format_relative(val(r->trackers, i, T_NEXT_PROBE_AGO));
		cells[5] = format_relative(val(r->trackers, i, T_PAUSED_UNTIL_AGO));
		cells[6] = one_line(val(r->trackers, i, T_LAST_ERROR));
		table_add_row(&t, cells);
	}
	table_print(&t, stdout);
	table_free(&t);
}

/* Append the named columns of one row as members of an open object. */
typedef struct JsonCol
{
	const char *key;
	int			col;
	char		kind;			/* 's' string, 'n' number */
} JsonCol;

static void
json_row(PQExpBuffer buf, const PGresult *res, int row, const JsonCol *cols, int ncols)
{
	bool		first = true;
	int			i;

	appendPQExpBufferChar(buf, '{');
	for (i = 0; i < ncols; i++)
	{
		json_key(buf, &first, cols[i].key);
		if (cols[i].kind == 'n')
			json_number_or_null(buf, val(res, row, cols[i].col));
		else
			json_string(buf, val(res, row, cols[i].col));
	}
	appendPQExpBufferChar(buf, '}');
}

static void
json_rows(PQExpBuffer buf, const PGresult *res, const JsonCol *cols, int ncols)
{
	int			i;

	appendPQExpBufferChar(buf, '[');
	for (i = 0; res != NULL && i < PQntuples(res); i++)
	{
		if (i)
			appendPQExpBufferChar(buf, ',');
		json_row(buf, res, i, cols, ncols);
	}
	appendPQExpBufferChar(buf, ']');
}

/* One JSON object on one line (README, trace_ctl: its members). */
static void
print_json(const Report *r, const TraceCtlOptions *opts)
{
	static const JsonCol wcols[] = {
		{"worker", W_WORKER, 'n'}, {"pid", W_PID, 'n'}, {"state", W_STATE, 's'},
		{"in_flight", W_IN_FLIGHT, 'n'}, {"next_wake_at", W_NEXT_WAKE_AT, 's'},
		{"last_pass_started", W_PASS_STARTED, 's'},
		{"last_pass_finished", W_PASS_FINISHED, 's'},
		{"delivered", W_DELIVERED, 'n'}, {"failed", W_FAILED, 'n'},
		{"started_at", W_STARTED_AT, 's'}
	};
	static const JsonCol tcols[] = {
		{"adapter", T_ADAPTER, 's'}, {"state", T_STATE, 's'}, {"since", T_SINCE, 's'},
		{"consecutive_failures", T_FAILURES, 'n'},
		{"next_probe_at", T_NEXT_PROBE_AT, 's'},
		{"paused_until", T_PAUSED_UNTIL, 's'}, {"last_error", T_LAST_ERROR, 's'}
	};
	PQExpBufferData buf;
	bool		first = true;
	bool		f2;
	char	   *line = status_line(r);
	int			i;
	bool		complete = (r->status != TC_UNKNOWN && r->info != NULL);

	initPQExpBuffer(&buf);
	appendPQExpBufferChar(&buf, '{');
	json_key(&buf, &first, "status");
	json_string(&buf, status_names[r->status]);
	json_key(&buf, &first, "exit_code");
	appendPQExpBuffer(&buf, "%d", r->status);
	json_key(&buf, &first, "status_line");
	json_string(&buf, line);
	pg_free(line);

	json_key(&buf, &first, "reasons");
	appendPQExpBufferChar(&buf, '[');
	for (i = 0; i < r->nreasons; i++)
	{
		f2 = true;
		appendPQExpBufferStr(&buf, i ? ",{" : "{");
		json_key(&buf, &f2, "status");
		json_string(&buf, status_names[r->reasons[i].status]);
		json_key(&buf, &f2, "message");
		json_string(&buf, r->reasons[i].message);
		appendPQExpBufferChar(&buf, '}');
	}
	appendPQExpBufferChar(&buf, ']');
	json_key(&buf, &first, "notes");
	appendPQExpBufferChar(&buf, '[');
	for (i = 0; i < r->nnotes; i++)
	{
		if (i)
			appendPQExpBufferChar(&buf, ',');
		json_string(&buf, r->notes[i]);
	}
	appendPQExpBufferChar(&buf, ']');

	json_key(&buf, &first, "thresholds");
	appendPQExpBuffer(&buf,
					  "{\"warning_age_seconds\":%lld,\"critical_age_seconds\":%lld,"
					  "\"warning_abandoned\":%lld,\"critical_abandoned\":%lld}",
					  (long long) opts->warning_age_s, (long long) opts->critical_age_s,
					  (long long) opts->warning_abandoned,
					  (long long) opts->critical_abandoned);

	if (complete)
	{
		json_key(&buf, &first, "database");
		json_string(&buf, val(r->info, 0, INFO_DATABASE));
		json_key(&buf, &first, "extension_version");
		json_string(&buf, val(r->info, 0, INFO_EXTVERSION));
		json_key(&buf, &first, "in_recovery");
		appendPQExpBufferStr(&buf, strcmp(val(r->info, 0, INFO_IN_RECOVERY), "t") == 0 ?
							 "true" : "false");
		json_key(&buf, &first, "checked_at");
		json_string(&buf, val(r->info, 0, INFO_CHECKED_AT));
		json_key(&buf, &first, "settings");
		f2 = true;
		appendPQExpBufferChar(&buf, '{');
		json_key(&buf, &f2, "trace.database");
		json_string(&buf, val(r->info, 0, INFO_TRACE_DATABASE));
		json_key(&buf, &f2, "trace.paused");
		json_string(&buf, val(r->info, 0, INFO_PAUSED));
		json_key(&buf, &f2, "trace.workers");
		json_number_or_null(&buf, val(r->info, 0, INFO_WORKERS));
		appendPQExpBufferChar(&buf, '}');

		json_key(&buf, &first, "totals");
		appendPQExpBuffer(&buf,
						  "{\"pending\":%lld,\"sending\":%lld,\"abandoned\":%lld,"
						  "\"oldest_overdue_seconds\":%lld,\"workers\":%d}",
						  (long long) r->pending, (long long) r->sending,
						  (long long) r->abandoned, (long long) r->oldest_overdue,
						  r->nworkers);

		/* the queue, with overdue seconds (0 when not yet due) */
		json_key(&buf, &first, "queue");
		appendPQExpBufferChar(&buf, '[');
		for (i = 0; i < PQntuples(r->queue); i++)
		{
			const char *ago = val(r->queue, i, Q_OLDEST_DUE_AGO);

			f2 = true;
			appendPQExpBufferStr(&buf, i ? ",{" : "{");
			json_key(&buf, &f2, "adapter");
			json_string(&buf, val(r->queue, i, Q_ADAPTER));
			json_key(&buf, &f2, "pending");
			json_number_or_null(&buf, val(r->queue, i, Q_PENDING));
			json_key(&buf, &f2, "sending");
			json_number_or_null(&buf, val(r->queue, i, Q_SENDING));
			json_key(&buf, &f2, "abandoned");
			json_number_or_null(&buf, val(r->queue, i, Q_ABANDONED));
			json_key(&buf, &f2, "oldest_due_at");
			json_string(&buf, val(r->queue, i, Q_OLDEST_DUE_AT));
			json_key(&buf, &f2, "overdue_seconds");
			if (ago == NULL)
				appendPQExpBufferStr(&buf, "null");
			else
				appendPQExpBuffer(&buf, "%lld", Max(strtoll(ago, NULL, 10), 0LL));
			appendPQExpBufferChar(&buf, '}');
		}
		appendPQExpBufferChar(&buf, ']');

		json_key(&buf, &first, "workers");
		json_rows(&buf, r->workers, wcols, lengthof(wcols));
		json_key(&buf, &first, "trackers");
		json_rows(&buf, r->trackers, tcols, lengthof(tcols));
	}
	appendPQExpBufferStr(&buf, "}\n");
	fputs(buf.data, stdout);
	termPQExpBuffer(&buf);
}
