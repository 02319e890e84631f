#!/usr/bin/python3
"""Benchmark 5, idle: what the worker costs while the queue is empty.

Delivers a few trades (so the worker has prepared its plans and done real
work), lets the queue go idle, resets pg_stat_statements, then watches the
worker for S seconds (default 60): its CPU time (utime + stime from /proc)
and every statement pg_stat_statements saw meanwhile, other than this
script's own.  Then closes one trade to show the idle worker still answers
a commit at once.

Usage (as root, after make install):  bench/idle.py [S]
A benchmark, not a test: it asserts nothing.
"""

import sys
import time

from benchlib import (DB, Nginx, add_open_trades, close_all_open, conditions, cpu_seconds,
                      print_block, start_cluster, wait_until, worker_pids)

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 60


def main():
    nginx = Nginx().start()
    cluster = start_cluster({
        "trace.enabled_adapters": "webhook",
        "trace.webhook_endpoint": nginx.url("/hook"),
        "trace.delay": "0",
    }, "trace_bench_idle", preload_extra=["pg_stat_statements"],
        pg_settings={"pg_stat_statements.track": "all",
                     "pg_stat_statements.track_utility": "on"})
    try:
        conn = cluster.connect(DB)
        cur = conn.cursor()
        pid = wait_until(lambda: worker_pids(cur), 20)[0]
        add_open_trades(cur, 500000, 100, signal_id=11)
        close_all_open(cur)
        wait_until(lambda: cur.execute(
            "SELECT count(*) = 0 FROM trace.trace_queue WHERE status <> 'delivered'")
            or cur.fetchone()[0], 30)
        time.sleep(2)
        cur.execute("SELECT pg_stat_statements_reset()")
        cpu0, t0 = cpu_seconds(pid), time.time()
        time.sleep(SECONDS)
        cpu, wall = cpu_seconds(pid) - cpu0, time.time() - t0
        cur.execute("SELECT calls, query FROM pg_stat_statements "
                    " WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC")
        seen = cur.fetchall()
        cur.execute("SELECT state, backend_xmin, wait_event FROM pg_stat_activity "
                    " WHERE pid = %s", (pid,))
        state = cur.fetchone()

        add_open_trades(cur, 600000, 1, signal_id=11)
        t_close = time.time()
        close_all_open(cur)
        hit = wait_until(lambda: [r for r in nginx.requests() if r[2].startswith("600000-")],
                         10, every=0.001)
        arrived = hit[0][0] if hit else None

        print_block("idle: worker with an empty queue for %d s" % SECONDS,
                    conditions(cluster, {"pg_stat_statements": "track = all"}))
        print_block("result", [
            "worker CPU: %.3f s in %.0f s = %.4f %%" % (cpu, wall, 100 * cpu / wall),
            "statements run meanwhile (pg_stat_statements, any backend but this one): %d"
            % sum(c for c, _ in seen),
        ] + ["  %d x %s" % (c, q[:100].replace("\n", " ")) for c, q in seen] + [
            "worker in pg_stat_activity: state %s, backend_xmin %s, wait_event %s" % state,
            "a close after the idle period reached nginx %s"
            % ("%.1f ms after its commit returned" % ((arrived - t_close) * 1000)
               if arrived else "NOT within 10 s"),
        ])
        conn.close()
    finally:
        cluster.destroy()
        nginx.stop()


if __name__ == "__main__":
    main()
