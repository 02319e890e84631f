#!/usr/bin/python3
"""Without shared_preload_libraries: the SQL surface still installs and
works (trades are queued, the queue views answer), CREATE EXTENSION warns
that nothing will be delivered, and the postmaster-level settings written
in postgresql.conf are accepted rather than warned away.  The delivery
metrics live in shared memory, which only the preload creates: reading
them is an error that says so, not zeros that would look like an idle
system."""

import sys
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from cluster import Cluster  # noqa: E402
from tap import Tap  # noqa: E402
from trace_e2e import fixture_path  # noqa: E402

t = Tap()
cluster = Cluster(preload=False, name="trace_e2e_nopreload", settings={
    "trace.database": "trades",
    "trace.enabled_adapters": "webhook",
})
try:
    with t.case("CREATE EXTENSION without the preload"):
        cluster.init()
        cluster.start()
        cluster.create_database("trades")
        cluster.psql(file=str(fixture_path()), dbname="trades")
        conn = cluster.connect("trades")
        notices_before = len(conn.notices)
        conn.cursor().execute("CREATE EXTENSION trace_ext")
        notices = "".join(conn.notices[notices_before:])
        t.ok("not in shared_preload_libraries" in notices and "nothing will be delivered" in notices,
             "CREATE EXTENSION warns that nothing will be delivered", notices)
        t.ok("invalid configuration parameter" not in notices,
             "trace.database in postgresql.conf is accepted", notices)
        cur = conn.cursor()
        cur.execute("UPDATE trades SET status = 'CLOSED' WHERE trade_id = 3")
        cur.execute("SELECT adapter, status FROM trace.trace_queue WHERE trade_id = 3")
        t.is_(cur.fetchall(), [("webhook", "pending")], "closing a trade still queues it")
        cur.execute("SELECT adapter, status, count FROM trace.queue_summary")
        t.is_(cur.fetchall(), [("webhook", "pending", 1)],
              "trace.queue_summary answers: the pending row counted")
        for query in ("SELECT * FROM trace.metrics", "SELECT trace.prometheus_metrics()",
                      "SELECT * FROM trace._fail_counters()",
                      "SELECT * FROM trace._duration_histogram()"):
            try:
                cur.execute(query)
                t.fail("%s raises an error without the preload" % query, repr(cur.fetchall()))
            except psycopg2.Error as e:
                t.is_((e.pgcode, e.pgerror.splitlines()[0]),
                      ("55000", 'ERROR:  trace_ext must be loaded via "shared_preload_libraries" '
                                'to keep delivery metrics'),
                      "%s: a clear error, not zeros" % query)
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'trace_ext worker'")
        t.is_(cur.fetchone()[0], 0, "no worker runs")
        # the errors of the metrics queries above, and their statements, aside
        expected = 'ERROR:  trace_ext must be loaded via "shared_preload_libraries"'
        lines = cluster.log_text().splitlines()
        other = [ln for i, ln in enumerate(lines)
                 if expected not in ln
                 and not (i > 0 and expected in lines[i - 1] and "STATEMENT:" in ln)]
        log = "\n".join(other)
        t.ok("ERROR:" not in log and "invalid configuration parameter" not in log,
             "no other error and no rejected parameter in the server log",
             lambda: cluster.log_tail(20))
finally:
    cluster.destroy()

sys.exit(t.done())
