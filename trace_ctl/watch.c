/*
 * watch.c: "trace_ctl watch", trace_alert notifications as they arrive.
 *
 * LISTEN trace_alert, then wait in poll() on the connection's socket (and
 * on a pipe the SIGINT/SIGTERM handler writes to) and print each
 * notification as one line: the time it was received (UTC), the channel
 * and the payload as the server sent it; with --json, one JSON object per
 * line, with the payload as a string and, when it is valid JSON, parsed
 * as "alert".  stdout is flushed after every line, so that a pipe (a log
 * shipper, jq) sees each alert at once.
 *
 * When the connection is lost (a server restart), it says so on stderr
 * and reconnects with exponential backoff (0.5 s doubling to 30 s), says
 * when it is back, and LISTENs again.  Notifications sent while it was
 * disconnected are not replayed: NOTIFY keeps nothing for absent
 * listeners (trace_ctl status and trace.failures tell what was missed).
 *
 * It never busy-loops: between alerts it sleeps in poll() with no
 * timeout.  SIGINT or SIGTERM stops it at once, whatever it is doing
 * (waiting, connecting, backing off), with exit status 0.
 */
#include "postgres_fe.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common/jsonapi.h"
#include "common/logging.h"

#include "trace_ctl.h"

#define BACKOFF_FIRST_S		0.5
#define BACKOFF_MAX_S		30.0

static const char *const listen_sql =
"SET search_path = pg_catalog, pg_temp;\n"
"LISTEN trace_alert;\n"
"SELECT pg_catalog.current_database(),\n"
"       (SELECT e.extversion FROM pg_catalog.pg_extension e\n"
"         WHERE e.extname = 'trace_ext'),\n"
"       pg_catalog.current_setting('trace.database', true);\n";

static volatile sig_atomic_t stop_requested = false;
static int	stop_pipe[2] = {-1, -1};

static void handle_stop(SIGNAL_ARGS);
static bool setup_signals(void);
static PGconn *connect_and_listen(const TraceCtlOptions *opts, bool quiet,
								  char **errmsg, bool *interrupted);
static bool print_notifications(PGconn *conn, const TraceCtlOptions *opts);
static bool sleep_or_stop(double seconds);
static void notice_processor(void *arg, const char *message);

int
run_watch(const TraceCtlOptions *opts)
{
	PGconn	   *conn;
	char	   *errmsg;
	bool		interrupted;

	if (!setup_signals())
		return WATCH_FAILED;

	conn = connect_and_listen(opts, false, &errmsg, &interrupted);
	if (conn == NULL)
	{
		if (interrupted)
			return WATCH_STOPPED;
		pg_log_error("%s", errmsg);
		pg_free(errmsg);
		return WATCH_FAILED;
	}

	while (!stop_requested)
	{
		struct pollfd fds[2];
		bool		lost = false;

		if (!print_notifications(conn, opts))
		{
			PQfinish(conn);
			return WATCH_FAILED;
		}

		fds[0].fd = PQsocket(conn);
		fds[0].events = POLLIN;
		fds[0].revents = 0;
		fds[1].fd = stop_pipe[0];
		fds[1].events = POLLIN;
		fds[1].revents = 0;
		if (fds[0].fd < 0)
			lost = true;
		else if (poll(fds, 2, -1) < 0)
		{
			if (errno != EINTR)
			{
				pg_log_error("could not wait for the server: %m");
				PQfinish(conn);
				return WATCH_FAILED;
			}
			continue;
		}
		if (stop_requested || fds[1].revents != 0)
			break;
		if (!lost && fds[0].revents != 0)
		{
			if (!PQconsumeInput(conn) || PQstatus(conn) != CONNECTION_OK)
				lost = true;
		}
		if (!lost)
			continue;

		/* Lost: print what arrived before, then reconnect. */
		{
			char	   *why = tc_first_line(PQerrorMessage(conn));
			double		lost_at = tc_clock();
			double		delay = BACKOFF_FIRST_S;
			int			attempt = 0;

			if (!print_notifications(conn, opts))
			{
				pg_free(why);
				PQfinish(conn);
				return WATCH_FAILED;
			}
			PQfinish(conn);
			conn = NULL;
			pg_log_warning("connection lost: %s", why);
			pg_free(why);

			while (conn == NULL)
			{
				pg_log_info("reconnecting in %.1f s", delay);
				if (sleep_or_stop(delay))
					return WATCH_STOPPED;
				attempt++;
				conn = connect_and_listen(opts, true, &errmsg, &interrupted);
				if (conn != NULL)
					break;
				if (interrupted)
					return WATCH_STOPPED;
				pg_log_info("attempt %d failed: %s", attempt, errmsg);
				pg_free(errmsg);
				delay = Min(delay * 2, BACKOFF_MAX_S);
			}
			pg_log_info("connection back after %.1f s (%d %s); listening on trace_alert again",
						tc_clock() - lost_at, attempt, attempt == 1 ? "attempt" : "attempts");
		}
	}

	PQfinish(conn);
	return WATCH_STOPPED;
}

/*
 * The stop signals set a flag and write a byte to a pipe that every wait
 * polls, so that a signal arriving just before a wait is not missed.
 */
static void
handle_stop(SIGNAL_ARGS)
{
	int			save_errno = errno;

	stop_requested = true;
	if (stop_pipe[1] >= 0)
	{
		/* the pipe is non-blocking: a full pipe already says "stop" */
		if (write(stop_pipe[1], "x", 1) < 0)
		{
			/* nothing to do in a signal handler */
		}
	}
	errno = save_errno;
}

static bool
setup_signals(void)
{
	struct sigaction sa;
	int			i;

	if (pipe(stop_pipe) != 0)
	{
		pg_log_error("could not create pipe: %m");
		return false;
	}
	for (i = 0; i < 2; i++)
	{
		int			flags = fcntl(stop_pipe[i], F_GETFL);

		if (flags < 0 || fcntl(stop_pipe[i], F_SETFL, flags | O_NONBLOCK) < 0 ||
			fcntl(stop_pipe[i], F_SETFD, FD_CLOEXEC) < 0)
		{
			pg_log_error("could not set up pipe: %m");
			return false;
		}
	}
	tc_interrupt_fd = stop_pipe[0];

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handle_stop;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;			/* no SA_RESTART: poll() returns EINTR */
	if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0)
	{
		pg_log_error("could not set up signal handlers: %m");
		return false;
	}
	return true;
}

/* Wait seconds; true when a stop was requested meanwhile. */
static bool
sleep_or_stop(double seconds)
{
	double		until = tc_clock() + seconds;

	while (!stop_requested)
	{
		struct pollfd fd;
		double		left = until - tc_clock();

		if (left <= 0)
			return false;
		fd.fd = stop_pipe[0];
		fd.events = POLLIN;
		fd.revents = 0;
		if (poll(&fd, 1, (int) (left * 1000) + 1) > 0)
			return true;
	}
	return true;
}

/*
 * Connect and LISTEN.  The first time (quiet false) it says where it
 * listens, and warns when trace_ext is not installed in that database
 * (its alerts are sent in the one trace.database names).
 */
static PGconn *
connect_and_listen(const TraceCtlOptions *opts, bool quiet, char **errmsg,
				   bool *interrupted)
{
	PGconn	   *conn;
	PGresult  **results;
	int			nresults;
	int			i;
	char	   *sql;
	const char *db = NULL;
	const char *ext = NULL;
	const char *tracedb = NULL;

	conn = tc_connect(opts, errmsg, interrupted);
	if (conn == NULL)
		return NULL;
	PQsetNoticeProcessor(conn, notice_processor, NULL);

	sql = psprintf("SET statement_timeout = %d;\n%s", opts->timeout_s * 1000,
				   listen_sql);
	results = tc_query(conn, sql, tc_clock() + opts->timeout_s + 5, &nresults,
					   errmsg, interrupted);
	pg_free(sql);
	if (results == NULL)
	{
		PQfinish(conn);
		return NULL;
	}
	for (i = 0; i < nresults; i++)
	{
		ExecStatusType st = PQresultStatus(results[i]);

		if (st == PGRES_TUPLES_OK && PQntuples(results[i]) == 1 &&
			PQnfields(results[i]) == 3)
		{
			db = PQgetvalue(results[i], 0, 0);
			ext = PQgetisnull(results[i], 0, 1) ? NULL : PQgetvalue(results[i], 0, 1);
			tracedb = PQgetisnull(results[i], 0, 2) ? NULL : PQgetvalue(results[i], 0, 2);
		}
		else if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
		{
			char	   *msg = tc_first_line(PQresultErrorMessage(results[i]));

			*errmsg = psprintf("LISTEN trace_alert failed: %s", msg);
			pg_free(msg);
			tc_free_results(results, nresults);
			PQfinish(conn);
			return NULL;
		}
	}
	if (!quiet && db != NULL)
	{
		pg_log_info("listening on trace_alert in database \"%s\"", db);
		if (ext == NULL)
		{
			if (tracedb != NULL && strcmp(tracedb, db) != 0)
				pg_log_warning("trace_ext is not installed in database \"%s\": its alerts are sent in database \"%s\" (trace.database)",
							   db, tracedb);
			else
				pg_log_warning("trace_ext is not installed in database \"%s\"", db);
		}
	}
	tc_free_results(results, nresults);
	return conn;
}

/* The time now, UTC, ISO 8601 with milliseconds. */
static void
received_at(char *buf, size_t len)
{
	struct timeval tv;
	struct tm	tm;
	char		whole[32];

	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	strftime(whole, sizeof(whole), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf, len, "%s.%03dZ", whole, (int) (tv.tv_usec / 1000));
}

/* Is s valid JSON (jsonapi of libpgcommon, in the client encoding)? */
static bool
is_json(const char *s, int encoding)
{
	JsonLexContext *lex;
	JsonParseErrorType err;

	lex = makeJsonLexContextCstringLen(unconstify(char *, s), strlen(s),
									   encoding, false);
	err = pg_parse_json(lex, &nullSemAction);
	pfree(lex);
	return err == JSON_SUCCESS;
}

/*
 * Print every notification received so far, one line each.  Returns false
 * when stdout cannot be written (watch then exits: nobody reads it).
 */
static bool
print_notifications(PGconn *conn, const TraceCtlOptions *opts)
{
	PGnotify   *n;

	while ((n = PQnotifies(conn)) != NULL)
	{
		char		when[64];

		received_at(when, sizeof(when));
		if (opts->json)
		{
			PQExpBufferData buf;
			bool		first = true;

			initPQExpBuffer(&buf);
			appendPQExpBufferChar(&buf, '{');
			json_key(&buf, &first, "received_at");
			json_string(&buf, when);
			json_key(&buf, &first, "channel");
			json_string(&buf, n->relname);
			json_key(&buf, &first, "sender_pid");
			appendPQExpBuffer(&buf, "%d", n->be_pid);
			json_key(&buf, &first, "payload");
			json_string(&buf, n->extra);
			json_key(&buf, &first, "alert");
			if (is_json(n->extra, PQclientEncoding(conn)))
			{
				const char *p;

				/*
				 * Newlines can only be whitespace between tokens of valid
				 * JSON (a string cannot hold one raw): blanks keep it on
				 * one line without changing a value.
				 */
				for (p = n->extra; *p; p++)
					appendPQExpBufferChar(&buf,
										  (*p == '\n' || *p == '\r' || *p == '\t') ? ' ' : *p);
			}
			else
				appendPQExpBufferStr(&buf, "null");
			appendPQExpBufferStr(&buf, "}\n");
			fputs(buf.data, stdout);
			termPQExpBuffer(&buf);
		}
		else
		{
			char	   *payload = one_line(n->extra);

			printf("%s %s %s\n", when, n->relname, payload);
			pg_free(payload);
		}
		PQfreemem(n);
		if (fflush(stdout) != 0 || ferror(stdout))
		{
			pg_log_error("could not write to stdout: %m");
			return false;
		}
	}
	return true;
}

/* The server's notices and errors outside a query, one line each. */
static void
notice_processor(void *arg, const char *message)
{
	char	   *line = one_line(message);
	size_t		len = strlen(line);

	while (len > 0 && line[len - 1] == ' ')
		line[--len] = '\0';
	pg_log_info("server: %s", line);
	pg_free(line);
}
