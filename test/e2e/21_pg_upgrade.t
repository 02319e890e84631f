#!/usr/bin/python3
"""pg_upgrade of a cluster with trace_ext installed and rows pending.

A cluster preloading trace_ext has 40 rows failing at a tracker (503,
retried).  It is stopped and upgraded with pg_upgrade (15 to 15, into a
new cluster initialised with the same settings, trace_ext preloaded).
pg_upgrade starts both servers in binary upgrade mode, where trace_ext
must not deliver: no worker runs there (no trace_ext line in pg_upgrade's
server log, no request reaches the tracker while pg_upgrade runs).  The
upgraded cluster has the queue as it was, row for row.  pg_upgrade gives
it a new system identifier, so its worker holds the queue (clone
protection: state held, a WARNING naming trace.adopt_queue(), no
request) until the README's runbook step SELECT trace.adopt_queue(); then,
the tracker answering 200, it delivers every row, one 2xx per (trade,
tracker), same Idempotency-Key as before."""

import glob
import os
import pwd
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from cluster import Cluster  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

t = Tap()
# Every row is tried at a failing tracker: its breaker (tests 24, 25) is off.
env = TraceEnv.start_or_exit(t, gucs={"trace.max_retries": 100,
                                      "trace.breaker_threshold": 0,
                                      "trace.retry_backoff_base": "200ms",
                                      "trace.retry_backoff_cap": "1s"},
                             name="trace_e2e_upgrade_old")
new = None
def chown_server(path):
    pw = pwd.getpwnam("postgres")
    os.chown(path, pw.pw_uid, pw.pw_gid)


QUEUE = ("SELECT trade_id, adapter, status, trade_table::text, by_operator "
         "  FROM trace.trace_queue WHERE trade_id BETWEEN %s AND %s ORDER BY 1, 2")
try:
    with t.case("before: 40 rows pending, failing at the tracker"):
        env.sink.set_behaviour("/up-mfx", default=503)
        env.sink.set_behaviour("/up-wh", default=503)
        env.point("myfxbook", "/up-mfx")
        env.point("webhook", "/up-wh")
        tids = [env.new_trade(user_id=1, signal_id=10) for _ in range(20)]
        for tid in tids:
            env.close_trade(tid)
        lo, hi = tids[0], tids[-1]
        tried = wait_until(lambda: env.sql1(
            "SELECT count(*) FROM trace.trace_queue WHERE trade_id BETWEEN %s AND %s "
            "   AND status = 'pending' AND attempts >= 1", (lo, hi)) == 40, 30)
        t.ok(tried, "40 rows pending, each tried and failed at least once")
        before = env.sql(QUEUE, (lo, hi))
        env.cluster.stop()

    with t.case("pg_upgrade: the servers it starts run no trace_ext worker"):
        same = {k: v for k, v in env.cluster.settings.items()
                if k not in ("port", "unix_socket_directories")}
        new = Cluster(settings=same, name="trace_e2e_upgrade_new")
        new.init()
        old = env.cluster
        bindir = os.path.dirname(new._server_cmd(["pg_upgrade"])[-1])
        up0 = time.time()
        rc, out = new.run_server_cmd(
            ["pg_upgrade", "-b", bindir, "-B", bindir, "-d", old.datadir, "-D", new.datadir,
             "-p", str(old.port), "-P", str(new.port), "-U", "postgres", "--retain"],
            timeout=300, check=False)
        up1 = time.time()
        t.is_(rc, 0, "pg_upgrade succeeds", out[-3000:])
        logs = glob.glob(os.path.join(new.datadir, "pg_upgrade_output.d", "*", "log",
                                      "pg_upgrade_server.log"))
        text = "".join(open(p, errors="replace").read() for p in logs)
        t.ok(logs and "database system is ready" in text,
             "pg_upgrade's server log was kept (%d file)" % len(logs))
        # (log_line_prefix names each line's backend type; a worker that
        # started would log, e.g. waiting for database "trades".)
        lines = [ln for ln in text.splitlines() if " trace_ext worker " in ln]
        t.is_(lines, [], "no trace_ext worker logged anything in binary upgrade mode")
        during = [r for r in env.sink.requests() if up0 <= r.time <= up1]
        t.is_(len(during), 0, "no request reached the tracker while pg_upgrade ran")

    with t.case("after: the queue as it was, delivered by the upgraded cluster"):
        # pg_upgrade carries no configuration: the DBA copies it over
        # (here postgresql.auto.conf, where the trackers' paths were set).
        shutil.copy(os.path.join(old.datadir, "postgresql.auto.conf"), new.datadir)
        chown_server(os.path.join(new.datadir, "postgresql.auto.conf"))
        # First without workers, to read the queue exactly as upgraded.
        new.start(overrides={"trace.workers": 0})
        conn = new.connect("trades")
        cur = conn.cursor()
        cur.execute(QUEUE, (lo, hi))
        t.is_(cur.fetchall(), before, "the upgraded queue holds the same 40 rows")
        conn.close()
        new.stop()
        env.sink.set_behaviour("/up-mfx", default=200)
        env.sink.set_behaviour("/up-wh", default=200)
        since = new.log_size()
        new.start()
        conn = new.connect("trades")
        cur = conn.cursor()

        # Runbook: the upgraded cluster holds the queue until it is adopted.
        def worker_state():
            cur.execute("SELECT state FROM trace.worker_status")
            return [r[0] for r in cur.fetchall()]
        t.ok(wait_until(lambda: worker_state() == ["held"], 30),
             "after pg_upgrade (a new system identifier) the worker holds the queue",
             lambda: repr(worker_state()))
        t.ok(new.wait_for_log(r"WARNING:  the delivery queue was filled on another cluster",
                              since, 10) is not None,
             "... says so in a WARNING that names trace.adopt_queue()")
        n_before = len([r for r in env.sink.requests() if r.route in ("/up-mfx", "/up-wh")
                        and (r.response or {}).get("status") == 200])
        time.sleep(1)
        t.is_(len([r for r in env.sink.requests() if r.route in ("/up-mfx", "/up-wh")
                   and (r.response or {}).get("status") == 200]), n_before,
              "... and sends nothing while held")
        cur.execute("SELECT trace.adopt_queue()")
        t.is_(cur.fetchone()[0], 40, "SELECT trace.adopt_queue() releases the 40 pending rows")

        def delivered():
            cur.execute("SELECT count(*) FROM trace.trace_queue WHERE trade_id BETWEEN %s "
                        "AND %s AND status = 'delivered'", (lo, hi))
            return cur.fetchone()[0] == 40
        t.ok(wait_until(delivered, 30), "the upgraded cluster's worker delivers all 40 rows")
        ok = {}
        for r in env.sink.requests():
            if r.route in ("/up-mfx", "/up-wh") and (r.response or {}).get("status") == 200:
                key = r.header("Idempotency-Key")
                ok[key] = ok.get(key, 0) + 1
        want = {"%d-%s" % (x, a) for x in tids for a in ("myfxbook", "webhook")}
        t.is_(sorted(k for k, n in ok.items() if n == 1), sorted(want),
              "one 2xx per (trade, tracker), under its Idempotency-Key")
        conn.close()
finally:
    if new is not None:
        new.destroy()
    env.close()
sys.exit(t.done())
