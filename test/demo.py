#!/usr/bin/python3
"""trace_ext demo: trades close, and arrive at the trackers.

Starts a capture server on 127.0.0.1 playing two trackers (the webhook one
accepts everything; the myfxbook one answers 503 twice before it accepts),
a throwaway cluster with trace_ext preloaded, loads the reference trade
store, closes a few trades the way the trading application does (and one
by a back-office INSERT, one behind a disabled trigger that the
reconciliation sweep finds, one whose trader withdraws consent before the
send), and shows
what the trackers received and what the monitoring views say.  Everything
is removed at the end.  Run through test/demo.sh, which builds and installs
the extension first.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))

from capture_server import CaptureServer  # noqa: E402
from cluster import PG_BINDIR, Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DB = "trading"


def fixture():
    for p in (REPO.parent / "shared" / "fixtures" / "trade_store.sql",
              REPO / "test" / "fixtures" / "trade_store.sql"):
        if p.is_file():
            return p
    sys.exit("trade_store.sql not found")


def say(text):
    print("\n== " + text, flush=True)


def show(conn, title, sql):
    cur = conn.cursor()
    cur.execute(sql)
    rows = cur.fetchall()
    names = [d[0] for d in cur.description]
    widths = [max(len(n), *(len(str(r[i])) for r in rows)) if rows else len(n)
              for i, n in enumerate(names)]
    print("\n-- " + title)
    print("  " + " | ".join(n.ljust(w) for n, w in zip(names, widths)))
    print("  " + "-+-".join("-" * w for w in widths))
    for r in rows:
        print("  " + " | ".join(("" if v is None else str(v)).ljust(w)
                                for v, w in zip(r, widths)))
    print("  (%d rows)" % len(rows))


def wait_for(conn, sql, timeout):
    deadline = time.time() + timeout
    cur = conn.cursor()
    while time.time() < deadline:
        cur.execute(sql)
        if cur.fetchone()[0]:
            return True
        time.sleep(0.2)
    return False


def main():
    sink = CaptureServer()
    sink.set_behaviour("/myfxbook", 503, 503, default=200)
    sink.start()
    cluster = Cluster(name="trace_demo", settings={
        "trace.database": DB,
        "trace.enabled_adapters": "myfxbook,webhook",
        "trace.delay": "2s",
        "trace.poll_interval": "200ms",
        "trace.retry_backoff_base": "1s",
        "trace.http_timeout": "2s",
        "trace.webhook_endpoint": sink.url("/webhook"),
        "trace.webhook_auth_header": "X-Api-Key",
        "trace.webhook_auth_token": "demo-webhook-token",
        "trace.webhook_signing_secret": "whsec_ZGVtby1zaWduaW5nLWtleQ==",
        "trace.myfxbook_webhook_url": sink.url("/myfxbook"),
        "trace.myfxbook_webhook_token": "demo-myfxbook-token",
    })
    try:
        say("starting a throwaway cluster with shared_preload_libraries = 'trace_ext'")
        cluster.init()
        cluster.start()
        cluster.create_database(DB)
        cluster.psql(file=str(fixture()), dbname=DB)
        cluster.psql("CREATE EXTENSION trace_ext;", dbname=DB)
        conn = cluster.connect(DB)
        print("trackers: webhook -> %s, myfxbook -> %s (answers 503 twice, then 200)"
              % (sink.url("/webhook"), sink.url("/myfxbook")))

        say("the trading application closes trades 3, 6, 9 and 1 (user 2 of trade 1 did not opt in)")
        cur = conn.cursor()
        cur.execute("""UPDATE trades SET status = 'CLOSED', exit_price = entry_price + 0.0012,
                              closed_at = now(), pnl = 42.10, fees = 1.00
                        WHERE trade_id IN (1, 3, 6, 9)""")
        show(conn, "trace.trace_queue right after the close (due in trace.delay = 2s)",
             "SELECT id, trade_id, adapter, status, attempts, due_at - created_at AS delay "
             "FROM trace.trace_queue ORDER BY id")

        say("the fees of trade 3 are corrected before it is due: the tracker gets the final value")
        cur.execute("UPDATE trades SET fees = 1.25 WHERE trade_id = 3")

        say("a back-office import writes trade 31 already CLOSED (INSERT): queued too")
        cur.execute("""INSERT INTO trades (trade_id, user_id, signal_id, instrument, side, volume,
                                           entry_price, exit_price, opened_at, closed_at, pnl,
                                           fees, status)
                       VALUES (31, 3, 11, 'EURUSD', 'sell', 2, 1.0850, 1.0831,
                               now() - interval '1 hour', now(), 38.00, 0.80, 'CLOSED')""")

        say("trade 12 closes while a DBA has the trigger disabled; the reconciliation sweep finds it")
        cur.execute("ALTER TABLE trades DISABLE TRIGGER trace_ext_enqueue")
        cur.execute("""UPDATE trades SET status = 'CLOSED', exit_price = entry_price - 0.0004,
                              closed_at = now(), pnl = -12.00, fees = 1.00
                        WHERE trade_id = 12""")
        cur.execute("ALTER TABLE trades ENABLE TRIGGER trace_ext_enqueue")
        show(conn, "SELECT * FROM trace.reconcile(dry_run => true)  -- what no trigger queued",
             "SELECT * FROM trace.reconcile(dry_run => true)")
        cur.execute("SET client_min_messages = error")
        show(conn, "SELECT * FROM trace.reconcile()  -- queue it (the worker also does this "
             "every trace.reconcile_interval)", "SELECT * FROM trace.reconcile()")
        cur.execute("RESET client_min_messages")

        say("trade 15's trader withdraws consent after the close, before it is due: nothing is sent")
        cur.execute("""UPDATE trades SET status = 'CLOSED', exit_price = entry_price + 0.0020,
                              closed_at = now(), pnl = 20.00, fees = 1.00
                        WHERE trade_id = 15""")
        cur.execute("INSERT INTO users VALUES (9, 'dana@example.com', 'Dana', 'CL-0009', true)")
        cur.execute("UPDATE trades SET user_id = 9 WHERE trade_id = 15")
        cur.execute("UPDATE users SET tracing_enabled = false WHERE user_id = 9")

        say("waiting for the deliveries (myfxbook is retried with backoff: 1 s, then 6 s)")
        if not wait_for(conn, "SELECT count(*) = 0 FROM trace.trace_queue "
                              "WHERE status IN ('pending', 'sending')", 30):
            print("(not everything was delivered within 30 s)")

        say("what the trackers received")
        for r in sink.requests():
            hdr = {k: r.header(k) for k in ("Idempotency-Key", "X-Api-Key",
                                            "Authorization", "webhook-signature")
                   if r.header(k) is not None}
            print("%s %-10s -> %s %s" % (time.strftime("%H:%M:%S", time.localtime(r.time)),
                                   r.path, (r.response or {}).get("status"), json.dumps(hdr)))
            print("    %s" % r.text())

        show(conn, "trace.trace_queue: trade 15 cancelled at send time, with the reason",
             "SELECT id, trade_id, adapter, status, attempts, last_error "
             "FROM trace.trace_queue ORDER BY id")
        show(conn, "trace.queue_summary", "SELECT * FROM trace.queue_summary ORDER BY adapter, status")
        show(conn, "trace.failures", "SELECT * FROM trace.failures ORDER BY id")
        show(conn, "trace.metrics", "SELECT * FROM trace.metrics")
        show(conn, "trace.tracker_health", "SELECT * FROM trace.tracker_health")
        show(conn, "trace.worker_status",
             "SELECT worker, pid, state, in_flight, delivered, failed FROM trace.worker_status")
        show(conn, "trace.queue_backlog (what the exporter and trace_ctl read)",
             "SELECT * FROM trace.queue_backlog")
        say("trace_ctl status: the health check for Nagios/Icinga (exit 0 OK, 1, 2, 3)")
        ctl = subprocess.run([os.path.join(PG_BINDIR, "trace_ctl"), "status",
                              "host=%s port=%d dbname=%s user=postgres"
                              % (cluster.sockdir, cluster.port, DB)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(ctl.stdout.rstrip())
        print("(exit status %d)" % ctl.returncode)
        print("\nThe tokens above are the demo's own; in production they belong in "
              "trace.secrets_file, and they never reach the server log:")
        print("  'demo-webhook-token' in server log: %s"
              % ("demo-webhook-token" in cluster.log_text()))
        return 0
    finally:
        cluster.destroy()
        sink.stop()
        print("\n(cluster and capture server removed)")


if __name__ == "__main__":
    sys.exit(main())
