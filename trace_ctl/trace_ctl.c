/*
 * trace_ctl.c: the command line of trace_ctl, trace_ext's monitoring
 * client.
 *
 *	trace_ctl status [options] [conninfo]	health check (Nagios/Icinga plugin)
 *	trace_ctl watch [options] [conninfo]	print trace_alert notifications
 *
 * This file parses the command and its options, prints --help and
 * --version, and hands a TraceCtlOptions to status.c or watch.c.  The
 * conninfo (the last argument, or -d) goes to libpq untouched: a
 * connection string, a URI or a database name, with the PG* environment
 * variables and ~/.pgpass filling in the rest, as for psql.
 *
 * A usage error exits with 3 for status (the plugin convention's UNKNOWN:
 * a misconfigured check must not look healthy) and with 2 for watch (the
 * Unix convention); without a known command, 3.
 */
#include "postgres_fe.h"

#include <limits.h>

#include "common/logging.h"
#include "getopt_long.h"

#include "trace_ctl.h"

typedef enum TraceCtlCommand
{
	CMD_STATUS,
	CMD_WATCH
} TraceCtlCommand;

/* Long options without a short form. */
enum
{
	OPT_JSON = 1000,
	OPT_WARNING_AGE,
	OPT_CRITICAL_AGE,
	OPT_WARNING_ABANDONED,
	OPT_CRITICAL_ABANDONED
};

static void usage(FILE *out);
static bool parse_duration(const char *s, int64 *seconds);
static bool parse_count(const char *s, int64 *n);
static int	parse_command_options(TraceCtlCommand cmd, int argc, char **argv,
								  TraceCtlOptions *opts);

static const char *progname;

int
main(int argc, char **argv)
{
	TraceCtlOptions opts;
	TraceCtlCommand cmd;
	int			rc;

	pg_logging_init(argv[0]);
	progname = get_progname(argv[0]);

	if (argc < 2)
	{
		pg_log_error("no command given");
		pg_log_error_hint("Try \"%s --help\" for more information.", progname);
		exit(TC_UNKNOWN);
	}
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-?") == 0 ||
		strcmp(argv[1], "help") == 0)
	{
		usage(stdout);
		exit(0);
	}
	if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0)
	{
		printf("trace_ctl (trace_ext) " TRACE_EXT_VERSION "\n");
		exit(0);
	}
	if (strcmp(argv[1], "status") == 0)
		cmd = CMD_STATUS;
	else if (strcmp(argv[1], "watch") == 0)
		cmd = CMD_WATCH;
	else
	{
		pg_log_error("unknown command \"%s\"", argv[1]);
		pg_log_error_hint("Try \"%s --help\" for more information.", progname);
		exit(TC_UNKNOWN);
	}

	memset(&opts, 0, sizeof(opts));
	opts.timeout_s = DEFAULT_TIMEOUT_S;
	opts.warning_age_s = DEFAULT_WARNING_AGE_S;
	opts.critical_age_s = DEFAULT_CRITICAL_AGE_S;
	opts.warning_abandoned = DEFAULT_WARNING_ABANDONED;
	opts.critical_abandoned = DEFAULT_CRITICAL_ABANDONED;

	/* The command's options: argv[1] plays argv[0] for getopt. */
	rc = parse_command_options(cmd, argc - 1, argv + 1, &opts);
	if (rc >= 0)
		exit(rc);

	if (cmd == CMD_STATUS)
		rc = run_status(&opts);
	else
		rc = run_watch(&opts);
	exit(rc);
}

/*
 * Parse a command's options into opts.  Returns -1 to go on, else the exit
 * status (0 after --help or --version, the usage status after an error).
 */
static int
parse_command_options(TraceCtlCommand cmd, int argc, char **argv,
					  TraceCtlOptions *opts)
{
	static const struct option long_options[] = {
		{"dbname", required_argument, NULL, 'd'},
		{"json", no_argument, NULL, OPT_JSON},
		{"timeout", required_argument, NULL, 't'},
		{"warning-age", required_argument, NULL, OPT_WARNING_AGE},
		{"critical-age", required_argument, NULL, OPT_CRITICAL_AGE},
		{"warning-abandoned", required_argument, NULL, OPT_WARNING_ABANDONED},
		{"critical-abandoned", required_argument, NULL, OPT_CRITICAL_ABANDONED},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0}
	};
	int			usage_rc = (cmd == CMD_STATUS) ? TC_UNKNOWN : WATCH_USAGE;
	const char *cmdname = (cmd == CMD_STATUS) ? "status" : "watch";
	int			c;
	int			optindex;
	int64		v;

	/* --help anywhere wins, as -? does: nothing else is looked at. */
	for (c = 1; c < argc && strcmp(argv[c], "--") != 0; c++)
	{
		if (strcmp(argv[c], "--help") == 0 || strcmp(argv[c], "-?") == 0)
		{
			usage(stdout);
			return 0;
		}
	}

	/* getopt_long prints its own complaints, prefixed with argv[0]. */
	argv[0] = unconstify(char *, progname);
	optind = 1;
	while ((c = getopt_long(argc, argv, "d:t:V", long_options, &optindex)) != -1)
	{
		if (cmd != CMD_STATUS &&
			(c == OPT_WARNING_AGE || c == OPT_CRITICAL_AGE ||
			 c == OPT_WARNING_ABANDONED || c == OPT_CRITICAL_ABANDONED))
		{
			pg_log_error("option --%s is for \"status\" only",
						 long_options[optindex].name);
			pg_log_error_hint("Try \"%s %s --help\" for more information.",
							  progname, cmdname);
			return usage_rc;
		}

		switch (c)
		{
			case 'd':
				opts->conninfo = optarg;
				break;
			case OPT_JSON:
				opts->json = true;
				break;
			case 't':
				if (!parse_duration(optarg, &v) || v < 1 || v > INT_MAX / 1000)
				{
					pg_log_error("invalid value \"%s\" for option %s", optarg, "--timeout");
					pg_log_error_hint("A duration of at least 1 s: seconds, or a number with s, min or h.");
					return usage_rc;
				}
				opts->timeout_s = (int) v;
				opts->timeout_given = true;
				break;
			case OPT_WARNING_AGE:
			case OPT_CRITICAL_AGE:
				if (!parse_duration(optarg, &v))
				{
					pg_log_error("invalid value \"%s\" for option %s", optarg,
								 c == OPT_WARNING_AGE ? "--warning-age" : "--critical-age");
					pg_log_error_hint("A duration: seconds, or a number with s, min or h; 0 turns the rule off.");
					return usage_rc;
				}
				if (c == OPT_WARNING_AGE)
					opts->warning_age_s = v;
				else
					opts->critical_age_s = v;
				break;
			case OPT_WARNING_ABANDONED:
			case OPT_CRITICAL_ABANDONED:
				if (!parse_count(optarg, &v))
				{
					pg_log_error("invalid value \"%s\" for option %s", optarg,
								 c == OPT_WARNING_ABANDONED ? "--warning-abandoned" : "--critical-abandoned");
					pg_log_error_hint("A number of rows; 0 turns the rule off.");
					return usage_rc;
				}
				if (c == OPT_WARNING_ABANDONED)
					opts->warning_abandoned = v;
				else
					opts->critical_abandoned = v;
				break;
			case 'V':
				printf("trace_ctl (trace_ext) " TRACE_EXT_VERSION "\n");
				return 0;
			default:
				pg_log_error_hint("Try \"%s %s --help\" for more information.",
								  progname, cmdname);
				return usage_rc;
		}
	}

	if (optind < argc)
	{
		if (opts->conninfo != NULL)
		{
			/* not echoed: a conninfo may hold a password */
			pg_log_error("connection given twice: with -d and as an argument");
			pg_log_error_hint("Try \"%s %s --help\" for more information.",
							  progname, cmdname);
			return usage_rc;
		}
		opts->conninfo = argv[optind++];
	}
	if (optind < argc)
	{
		pg_log_error("too many command-line arguments (first is \"%s\")",
					 argv[optind]);
		pg_log_error_hint("Try \"%s %s --help\" for more information.",
						  progname, cmdname);
		return usage_rc;
	}
	return -1;
}

/*
 * A duration: whole seconds, optionally followed by s, min, h or d
 * ("90", "90s", "15min", "1h").  Negative, fractional and out-of-range
 * values are refused.
 */
static bool
parse_duration(const char *s, int64 *seconds)
{
	char	   *end;
	long long	n;
	int64		mult;

	if (s[0] < '0' || s[0] > '9')
		return false;
	errno = 0;
	n = strtoll(s, &end, 10);
	if (errno != 0)
		return false;
	while (*end == ' ')
		end++;
	if (*end == '\0' || strcmp(end, "s") == 0)
		mult = 1;
	else if (strcmp(end, "min") == 0)
		mult = 60;
	else if (strcmp(end, "h") == 0)
		mult = 3600;
	else if (strcmp(end, "d") == 0)
		mult = 86400;
	else
		return false;
	/* ten years is plenty, and keeps every product far from overflow */
	if (n > (long long) 10 * 366 * 86400 / mult)
		return false;
	*seconds = (int64) n * mult;
	return true;
}

/* A count: a non-negative whole number. */
static bool
parse_count(const char *s, int64 *n)
{
	char	   *end;
	long long	v;

	if (s[0] < '0' || s[0] > '9')
		return false;
	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return false;
	*n = (int64) v;
	return true;
}

static void
usage(FILE *out)
{
	fprintf(out,
			"%s watches trace_ext, the extension that posts closed trades to trackers.\n\n",
			progname);
	fprintf(out, "Usage:\n");
	fprintf(out, "  %s status [OPTION]... [CONNINFO]\n", progname);
	fprintf(out, "  %s watch [OPTION]... [CONNINFO]\n", progname);
	fprintf(out, "  %s --help | --version\n", progname);
	fprintf(out,
			"\nCommands:\n"
			"  status    check the queue, the workers and the trackers; print a\n"
			"            Nagios-style status line, then tables (--json: one JSON object)\n"
			"  watch     LISTEN trace_alert and print each alert as one line as it\n"
			"            arrives (--json: JSON lines); reconnect when the connection is lost\n");
	fprintf(out,
			"\nConnection:\n"
			"  CONNINFO, -d, --dbname=CONNINFO\n"
			"            a connection string (\"host=... dbname=trades\"), a URI\n"
			"            (postgresql://...) or a database name, passed to libpq as it is;\n"
			"            PGHOST, PGPORT, PGDATABASE, PGUSER, PGSSLMODE, ~/.pgpass, ... fill\n"
			"            in the rest.  Connect to the database trace_ext is installed in\n"
			"            (trace.database).  A member of pg_monitor is enough.  No password\n"
			"            prompt: use ~/.pgpass or PGPASSWORD.\n");
	fprintf(out,
			"\nOptions:\n"
			"  --json                       machine-readable output\n"
			"  -t, --timeout=DURATION       connecting, and each query (default %d s)\n"
			"  -V, --version                print the version, then exit\n"
			"  -?, --help                   show this help, then exit\n",
			DEFAULT_TIMEOUT_S);
	fprintf(out,
			"\nstatus thresholds (DURATION: seconds, or with s, min, h; 0 turns a rule off):\n"
			"  --warning-age=DURATION       oldest pending row overdue this long (default %d)\n"
			"  --critical-age=DURATION      ... (default %d)\n"
			"  --warning-abandoned=N        abandoned rows (default %d)\n"
			"  --critical-abandoned=N       ... (default %d)\n",
			DEFAULT_WARNING_AGE_S, DEFAULT_CRITICAL_AGE_S,
			DEFAULT_WARNING_ABANDONED, DEFAULT_CRITICAL_ABANDONED);
	fprintf(out,
			"\nstatus health rules (the worst wins; the status line lists every reason):\n"
			"  CRITICAL  fewer workers running than trace.workers (on a standby none\n"
			"            runs: noted \"standby\", not counted); oldest pending row overdue\n"
			"            >= --critical-age; abandoned rows >= --critical-abandoned\n"
			"  WARNING   overdue >= --warning-age; abandoned >= --warning-abandoned;\n"
			"            trace.paused on; a worker held (queue restored from another\n"
			"            cluster); a tracker's breaker open or half_open\n"
			"  UNKNOWN   cannot connect, trace_ext not installed, permission denied,\n"
			"            a query failed or timed out\n"
			"  Overdue: now() - the earliest due_at of the pending rows, when positive.\n");
	fprintf(out,
			"\nExit status:\n"
			"  status    0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also for bad options)\n"
			"  watch     0 stopped by SIGINT or SIGTERM, 1 the first connection failed\n"
			"            (or output could not be written), 2 bad options\n");
	fprintf(out,
			"\nExamples:\n"
			"  %s status \"host=/var/run/postgresql dbname=trades user=nagios\"\n"
			"  %s status --json --critical-age=30min postgresql://monitor@db1/trades\n"
			"  PGDATABASE=trades %s watch --json\n",
			progname, progname, progname);
}
