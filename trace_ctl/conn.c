/*
 * conn.c: connecting to the server and running queries, for trace_ctl.
 *
 * The conninfo is handed to libpq as it is (expand_dbname), after two
 * defaults that it may override: connect_timeout (unless PGCONNECT_TIMEOUT
 * says otherwise) and keepalives, so that a dead peer is noticed; and
 * application_name falls back to "trace_ctl".  Nothing prompts for a
 * password: trace_ctl runs unattended.
 *
 * Everything here is non-blocking underneath (PQconnectStartParams and
 * PQconnectPoll, PQsendQuery and PQconsumeInput, waiting in poll()), so
 * that a check never outlives its deadline and "watch" stops at once on
 * SIGINT or SIGTERM even while connecting: watch.c points tc_interrupt_fd
 * at a pipe its signal handler writes to, and every wait here watches it.
 */
#include "postgres_fe.h"

#include <poll.h>
#include <time.h>

#include "trace_ctl.h"

int			tc_interrupt_fd = -1;

static TcWait wait_socket(int sock, bool for_read, double deadline);

/* Seconds on a clock that only moves forward. */
double
tc_clock(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/*
 * The first line of a libpq message, without its newline (libpq's
 * messages continue on tab-indented lines: hints for a person).
 */
char *
tc_first_line(const char *message)
{
	size_t		len;

	if (message == NULL || message[0] == '\0')
		return pg_strdup("(no message)");
	len = strcspn(message, "\n");
	return pnstrdup(message, len);
}

/*
 * Wait until sock is readable (or writable), tc_interrupt_fd is readable,
 * or the deadline (a tc_clock() value; 0: none) passes.
 */
static TcWait
wait_socket(int sock, bool for_read, double deadline)
{
	struct pollfd fds[2];
	int			nfds;
	int			timeout_ms;
	int			rc;

	for (;;)
	{
		if (deadline > 0)
		{
			double		left = deadline - tc_clock();

			if (left <= 0)
				return TC_WAIT_TIMEOUT;
			timeout_ms = (int) (left * 1000) + 1;
		}
		else
			timeout_ms = -1;

		fds[0].fd = sock;
		fds[0].events = for_read ? POLLIN : POLLOUT;
		fds[0].revents = 0;
		nfds = 1;
		if (tc_interrupt_fd >= 0)
		{
			fds[1].fd = tc_interrupt_fd;
			fds[1].events = POLLIN;
			fds[1].revents = 0;
			nfds = 2;
		}
		rc = poll(fds, nfds, timeout_ms);
		if (rc < 0)
		{
			if (errno == EINTR)
				continue;		/* a stop request shows on the pipe */
			return TC_WAIT_FAILED;
		}
		if (nfds == 2 && fds[1].revents != 0)
			return TC_WAIT_INTERRUPTED;
		if (rc > 0 && fds[0].revents != 0)
			return TC_WAIT_READY;
		/* rc == 0: loop, and the deadline check returns TIMEOUT */
	}
}

/*
 * Connect.  Returns the connection, or NULL with *errmsg (allocated) set,
 * and *interrupted set when a stop request ended the attempt.
 *
 * The deadline is the connection's connect_timeout as libpq sees it once
 * the conninfo, the environment and our default have been merged (0 or
 * unset: wait as long as it takes), applied to the whole attempt.
 */
PGconn *
tc_connect(const TraceCtlOptions *opts, char **errmsg, bool *interrupted)
{
	const char *keywords[8];
	const char *values[8];
	char		timeout[32];
	int			n = 0;
	PGconn	   *conn;
	PQconninfoOption *info;
	PostgresPollingStatusType st;
	int			connect_timeout = 0;
	double		deadline = 0;

	*errmsg = NULL;
	*interrupted = false;

	/* Defaults first: the conninfo (dbname, expanded) may override them. */
	snprintf(timeout, sizeof(timeout), "%d", opts->timeout_s);
	if (opts->timeout_given || getenv("PGCONNECT_TIMEOUT") == NULL)
	{
		keywords[n] = "connect_timeout";
		values[n++] = timeout;
	}
	keywords[n] = "keepalives_idle";
	values[n++] = "30";
	keywords[n] = "keepalives_interval";
	values[n++] = "10";
	keywords[n] = "keepalives_count";
	values[n++] = "3";
	keywords[n] = "dbname";
	values[n++] = opts->conninfo;
	keywords[n] = "fallback_application_name";
	values[n++] = "trace_ctl";
	keywords[n] = NULL;
	values[n] = NULL;

	conn = PQconnectStartParams(keywords, values, 1);
	if (conn == NULL)
	{
		*errmsg = pg_strdup("out of memory");
		return NULL;
	}
	if (PQstatus(conn) == CONNECTION_BAD)
	{
		*errmsg = tc_first_line(PQerrorMessage(conn));
		PQfinish(conn);
		return NULL;
	}

	info = PQconninfo(conn);
	if (info != NULL)
	{
		PQconninfoOption *o;

		for (o = info; o->keyword != NULL; o++)
		{
			if (strcmp(o->keyword, "connect_timeout") == 0 &&
				o->val != NULL)
				connect_timeout = atoi(o->val);
		}
		PQconninfoFree(info);
	}
	if (connect_timeout > 0)
		deadline = tc_clock() + connect_timeout;

	st = PGRES_POLLING_WRITING;
	while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED)
	{
		TcWait		w;

		if (PQsocket(conn) < 0)
			break;
		w = wait_socket(PQsocket(conn), st == PGRES_POLLING_READING, deadline);
		if (w == TC_WAIT_INTERRUPTED)
		{
			*interrupted = true;
			*errmsg = pg_strdup("interrupted");
			PQfinish(conn);
			return NULL;
		}
		if (w == TC_WAIT_TIMEOUT)
		{
			*errmsg = psprintf("no connection within connect_timeout (%d s)",
							   connect_timeout);
			PQfinish(conn);
			return NULL;
		}
		if (w == TC_WAIT_FAILED)
		{
			*errmsg = psprintf("could not wait for the server: %m");
			PQfinish(conn);
			return NULL;
		}
		st = PQconnectPoll(conn);
	}
	if (st == PGRES_POLLING_FAILED || PQstatus(conn) != CONNECTION_OK)
	{
		*errmsg = tc_first_line(PQerrorMessage(conn));
		PQfinish(conn);
		return NULL;
	}
	return conn;
}

/*
 * Send sql (one or several statements, in one round trip) and collect
 * every result, waiting no later than deadline (a tc_clock() value).
 * Returns the results (an allocated array, *nresults long; an error
 * result may be among them) or NULL with *errmsg set when nothing came
 * back in time, the connection failed, or a stop was requested.
 */
PGresult **
tc_query(PGconn *conn, const char *sql, double deadline, int *nresults,
		 char **errmsg, bool *interrupted)
{
	PGresult  **results = NULL;
	int			n = 0;
	int			max = 0;
	PGresult   *res;

	*nresults = 0;
	*errmsg = NULL;
	*interrupted = false;

	if (!PQsendQuery(conn, sql))
	{
		*errmsg = tc_first_line(PQerrorMessage(conn));
		return NULL;
	}
	for (;;)
	{
		while (PQisBusy(conn))
		{
			TcWait		w;

			if (PQsocket(conn) < 0)
			{
				*errmsg = tc_first_line(PQerrorMessage(conn));
				tc_free_results(results, n);
				return NULL;
			}
			w = wait_socket(PQsocket(conn), true, deadline);
			if (w != TC_WAIT_READY)
			{
				if (w == TC_WAIT_INTERRUPTED)
				{
					*interrupted = true;
					*errmsg = pg_strdup("interrupted");
				}
				else if (w == TC_WAIT_TIMEOUT)
					*errmsg = pg_strdup("no answer from the server in time");
				else
					*errmsg = psprintf("could not wait for the server: %m");
				tc_free_results(results, n);
				return NULL;
			}
			if (!PQconsumeInput(conn))
			{
				*errmsg = tc_first_line(PQerrorMessage(conn));
				tc_free_results(results, n);
				return NULL;
			}
		}
		res = PQgetResult(conn);
		if (res == NULL)
			break;
		if (n == max)
		{
			max = (max == 0) ? 8 : max * 2;
			results = pg_realloc(results, max * sizeof(PGresult *));
		}
		results[n++] = res;
	}
	if (n == 0)
	{
		*errmsg = tc_first_line(PQerrorMessage(conn));
		pg_free(results);
		return NULL;
	}
	*nresults = n;
	return results;
}

void
tc_free_results(PGresult **results, int nresults)
{
	int			i;

	if (results == NULL)
		return;
	for (i = 0; i < nresults; i++)
		PQclear(results[i]);
	pg_free(results);
}
