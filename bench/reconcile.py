#!/usr/bin/python3
"""Benchmark: the cost of the reconciliation sweep, trace.reconcile(), on a
large trade store.

The store holds N trades (default 1,000,000) closed evenly over D days
(default 100), so that the default window (trace.ttl = 7 days) holds about
7 % of them; two thirds belong to opted-in users, on a signal with two
enabled adapters.  The sweep's horizon is lowered to -infinity first (a
fresh install would not look before CREATE EXTENSION).  Measured, each the
median of R runs (default 3), with and without an index on closed_at:

  - dry run with nothing queued: finding every missing (trade, adapter)
    pair of the window;
  - the sweep that queues them all (once);
  - the steady state: the sweep the worker runs every
    trace.reconcile_interval when nothing is missing (every pair has its
    row): the recurring cost.

trace.delay keeps its default (5min) and trace.reconcile_interval is 0, so
the worker neither sends nor sweeps meanwhile.

Usage (as root, after make install):
    bench/reconcile.py [--trades N] [--days D] [--runs R]
A benchmark, not a test: it asserts nothing.
"""

import argparse
import statistics
import time

from benchlib import DB, conditions, print_block, start_cluster


def timed(cur, sql, runs):
    times = []
    result = None
    for _ in range(runs):
        t0 = time.perf_counter()
        cur.execute(sql)
        result = cur.fetchall()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def one_sweep(cur, sql):
    t0 = time.perf_counter()
    cur.execute(sql)
    result = cur.fetchall()
    return time.perf_counter() - t0, result


def measure(cur, runs, label):
    lines = []
    cur.execute("TRUNCATE trace.trace_queue")
    cur.execute("VACUUM ANALYZE trace.trace_queue")
    secs, rows = timed(cur, "SELECT count(*) FROM trace.reconcile(dry_run => true)", runs)
    lines.append("%s: dry run, nothing queued yet: %.3f s, %d pairs found"
                 % (label, secs, rows[0][0]))
    secs, rows = one_sweep(cur, "SELECT count(*) FROM trace.reconcile()")
    lines.append("%s: the sweep that queues them: %.3f s, %d rows queued"
                 % (label, secs, rows[0][0]))
    cur.execute("VACUUM ANALYZE trace.trace_queue")
    secs, rows = timed(cur, "SELECT count(*) FROM trace.reconcile()", runs)
    lines.append("%s: steady state (every pair queued): %.3f s, %d queued"
                 % (label, secs, rows[0][0]))
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trades", type=int, default=1000000)
    ap.add_argument("--days", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    cluster = start_cluster({"trace.enabled_adapters": "myfxbook,webhook",
                             "trace.reconcile_interval": "0",
                             "client_min_messages": "error"},
                            "trace_bench_reconcile",
                            pg_settings={"shared_buffers": "512MB", "max_wal_size": "4GB"})
    try:
        conn = cluster.connect(DB)
        cur = conn.cursor()
        cur.execute("SET client_min_messages = error")
        cur.execute("""INSERT INTO trades (trade_id, user_id, signal_id, account_number,
                                           client_id, instrument, side, volume, entry_price,
                                           exit_price, opened_at, closed_at, pnl, fees, status)
                       SELECT g, 1 + g %% 3, 10, 'ACC-' || g, 'CL-' || g, 'EURUSD', 'buy',
                              1.5, 1.0842, 1.0912,
                              now() - (g %% %s) * interval '1 day' - interval '1 hour',
                              now() - (g %% %s) * interval '1 day' - (g %% 1440) * interval '1 minute',
                              42.10, 1.25, 'CLOSED'
                         FROM generate_series(1000, 999 + %s) g""",
                    (args.days, args.days, args.trades))
        # Only reconciliation queues here: the trigger saw none of these.
        cur.execute("TRUNCATE trace.trace_queue")
        cur.execute("UPDATE trace.reconcile_horizon SET not_before = '-infinity'")
        cur.execute("VACUUM ANALYZE trades")
        cur.execute("SELECT count(*) FROM trades WHERE status = 'CLOSED' "
                    "   AND closed_at >= now() - current_setting('trace.ttl')::interval")
        in_window = cur.fetchone()[0]

        lines = measure(cur, args.runs, "no index on closed_at")
        cur.execute("CREATE INDEX trades_closed_at_idx ON trades (closed_at) "
                    " WHERE status = 'CLOSED'")
        cur.execute("ANALYZE trades")
        lines += measure(cur, args.runs, "index on closed_at WHERE status = 'CLOSED'")

        print_block("reconcile: trace.reconcile() over the trace.ttl window",
                    conditions(cluster, {
                        "store": "%d CLOSED trades over %d days; %d closed within trace.ttl "
                                 "(7d); 2/3 of users opted in; signal {myfxbook,webhook,file}, "
                                 "file not enabled" % (args.trades, args.days, in_window),
                        "timing": "median of %d runs (the queueing sweep: once)" % args.runs}))
        print_block("result", lines)
        conn.close()
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
