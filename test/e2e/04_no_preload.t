#!/usr/bin/python3
"""Without shared_preload_libraries: the SQL surface still installs and
works (trades are queued, the views answer), CREATE EXTENSION warns that
nothing will be delivered, and the postmaster-level settings written in
postgresql.conf are accepted rather than warned away."""

import sys
from pathlib import Path

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
        cur.execute("SELECT adapter, pushed_total, pending FROM trace.metrics")
        t.is_(cur.fetchall(), [("myfxbook", 0, 0), ("webhook", 0, 1), ("file", 0, 0)],
              "trace.metrics answers: zero counters, the pending row counted")
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'trace_ext worker'")
        t.is_(cur.fetchone()[0], 0, "no worker runs")
        log = cluster.log_text()
        t.ok("ERROR:" not in log and "invalid configuration parameter" not in log,
             "no error and no rejected parameter in the server log", lambda: cluster.log_tail(20))
finally:
    cluster.destroy()

sys.exit(t.done())
