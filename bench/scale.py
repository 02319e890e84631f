#!/usr/bin/python3
"""Benchmark 4, scale: the claim statement's time per batch with 10,000,
100,000 and 1,000,000 rows pending, its plan, and the worker's memory
while it drains 1,000,000 rows to a loopback nginx.

For each level L the queue is emptied, L rows are queued (CLOSED trades,
due in an hour), then all are made due at once; pg_stat_statements (reset
at that moment) gives the mean time of the worker's claim statement over
the first few seconds of the drain (the whole drain for the smaller
levels), while the backlog is still about L.  The plan is EXPLAINed
while the rows of the largest level are due.  At the largest level the worker's RSS (VmRSS and RssAnon,
its private memory) is sampled every second until the queue is drained.

Usage (as root, after make install):  bench/scale.py [--levels 10000,100000,1000000]
A benchmark, not a test: it asserts nothing.
"""

import argparse
import re
import time

from benchlib import (DB, REPO, Nginx, conditions, print_block, rss_anon_kb, rss_kb, start_cluster,
                      wait_until, worker_pids)

WINDOW = 5      # seconds of drain measured per level


def queue_rows(cur, n):
    cur.execute("TRUNCATE trace.trace_queue")
    cur.execute("""INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, due_at)
                   SELECT g, 'webhook', 'trades', now() + interval '1 hour'
                     FROM generate_series(1000, 999 + %s) g""", (n,))
    cur.execute("VACUUM ANALYZE trace.trace_queue")


def claim_stats(cur):
    cur.execute("SELECT calls, mean_exec_time, query FROM pg_stat_statements "
                " WHERE query LIKE 'SELECT q.id%%FOR UPDATE OF q SKIP LOCKED%%'")
    return cur.fetchone()


def claim_sql():
    """The worker's claim statement, as src/queue.c prepares it."""
    src = (REPO / "src" / "queue.c").read_text()
    body = src.split("#define CLAIM_SQL(by_operator_expr, leased_expr)", 1)[1]
    body = body.split("\n\n", 1)[0]
    body = (body.replace("by_operator_expr", '"q.by_operator"')
            .replace("leased_expr", '"trace._leased(q.id)"'))
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))


def explain_claim(cur):
    cur.execute("DEALLOCATE ALL")
    cur.execute("PREPARE claim(int, text[], bigint[]) AS " + claim_sql())
    cur.execute("EXPLAIN EXECUTE claim(100, '{}', '{}')")
    return [r[0] for r in cur.fetchall()]


def pending(cur):
    cur.execute("SELECT count(*) FROM trace.trace_queue WHERE status IN ('pending', 'sending')")
    return cur.fetchone()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="10000,100000,1000000")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    nginx = Nginx(log=False).start()
    cluster = start_cluster({"trace.enabled_adapters": "webhook",
                             "trace.webhook_endpoint": nginx.url("/hook")},
                            "trace_bench_scale", preload_extra=["pg_stat_statements"],
                            pg_settings={"shared_buffers": "512MB", "max_wal_size": "4GB"})
    try:
        conn = cluster.connect(DB)
        cur = conn.cursor()
        cur.execute("""INSERT INTO trades (trade_id, user_id, signal_id, account_number,
                                           client_id, instrument, side, volume, entry_price,
                                           exit_price, opened_at, closed_at, pnl, fees, status)
                       SELECT g, 1, 11, 'ACC-' || g, 'CL-' || g, 'EURUSD', 'buy', 1.5,
                              1.0842, 1.0912, now(), now(), 42.10, 1.25, 'CLOSED'
                         FROM generate_series(1000, 999 + %s) g""", (max(levels),))
        cur.execute("VACUUM ANALYZE trades")
        pid = wait_until(lambda: worker_pids(cur), 20)[0]
        results, plan, rss = [], None, []
        for level in levels:
            queue_rows(cur, level)
            cur.execute("SELECT pg_stat_statements_reset()")
            cur.execute("UPDATE trace.trace_queue SET due_at = now()")
            t0 = time.time()
            rss0 = (rss_kb(pid), rss_anon_kb(pid))
            time.sleep(WINDOW)
            calls, mean_ms, q = claim_stats(cur) or (0, 0.0, None)
            left = pending(cur)
            results.append((level, calls, mean_ms, left))
            if level == max(levels):
                plan = explain_claim(cur)
                rss.append((time.time() - t0, rss0[0], rss0[1], level))
                while True:
                    left = pending(cur)
                    rss.append((time.time() - t0, rss_kb(pid), rss_anon_kb(pid), left))
                    if left == 0 or time.time() - t0 > 900:
                        break
                    time.sleep(1)
            wait_until(lambda: pending(cur) == 0, 600, every=0.5)

        print_block("scale: claim time per batch vs. backlog; worker memory draining %d rows"
                    % max(levels), conditions(cluster, {
                        "queue": "rows of CLOSED trades, all made due at once, webhook to "
                                 "loopback nginx (return 200)",
                        "claim": "mean_exec_time of the worker's claim statement "
                                 "(pg_stat_statements), first %d s of each drain" % WINDOW}))
        lines = ["%9d pending: %5d claims, mean %.3f ms per claim (batch of up to 100); "
                 "%d rows left after %d s" % (lvl, calls, mean, left, WINDOW)
                 for lvl, calls, mean, left in results]
        if plan:
            lines.append("plan of the claim with %d rows due:" % max(levels))
            lines += ["  " + p for p in plan]
        if rss:
            anon = [r[2] for r in rss]
            vm = [r[1] for r in rss]
            lines.append("worker memory while draining %d rows (%d samples, %.0f s): "
                         "RssAnon %d..%d kB (first %d, last %d), VmRSS %d..%d kB"
                         % (max(levels), len(rss), rss[-1][0], min(anon), max(anon), anon[0],
                            anon[-1], min(vm), max(vm)))
            step = max(1, len(rss) // 10)
            lines += ["  t=%5.0f s  left %8d  RssAnon %6d kB  VmRSS %6d kB" % (t, left, a, v)
                      for t, v, a, left in rss[::step]]
        print_block("result", lines)
        conn.close()
    finally:
        cluster.destroy()
        nginx.stop()


if __name__ == "__main__":
    main()
