#!/usr/bin/python3
"""Benchmark 1, delivery rate: N due rows (default 100,000) drained to a
loopback nginx by the webhook adapter.

Closes N trades of opted-in users with trace.delay holding them back, makes
them all due at once, and times the drain from then until the last row is
`delivered`.  Samples the workers' open sockets and RSS while it runs, then
checks every row ended delivered, nginx saw exactly one request per row,
all answered 200.  Prints the rate and the conditions.

Usage (as root, after make install):
    bench/throughput.py [N] [--workers W] [--batch B] [--nginx-workers K]
A benchmark, not a test: it asserts nothing.
"""

import argparse
import time

from benchlib import (DB, Nginx, add_open_trades, close_all_open, conditions, cpu_seconds,
                      fmt_counts, last_error_sample, print_block, queue_counts, rss_kb,
                      start_cluster, tcp_sockets, wait_until, worker_pids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=100000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--perf", metavar="FILE", help="perf record the first worker into FILE")
    args = ap.parse_args()

    nginx = Nginx(workers=args.nginx_workers).start()
    settings = {
        "trace.enabled_adapters": "webhook",
        "trace.webhook_endpoint": nginx.url("/hook"),
        "trace.delay": "1h",
        "trace.workers": args.workers,
    }
    if args.batch:
        settings["trace.batch_size"] = args.batch
    cluster = start_cluster(settings, "trace_bench_throughput")
    try:
        conn = cluster.connect(DB)
        cur = conn.cursor()
        t0 = time.time()
        add_open_trades(cur, 1000000, args.n, signal_id=11)
        closed = close_all_open(cur)
        t_close = time.time() - t0
        cur.execute("VACUUM ANALYZE trace.trace_queue")
        pids = wait_until(lambda: worker_pids(cur), 20)
        perf = None
        if args.perf:
            import subprocess
            perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2999", "-g",
                                     "-p", str(pids[0]), "-o", args.perf],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        cpu0 = {p: cpu_seconds(p) for p in pids}
        rss0 = {p: rss_kb(p) for p in pids}
        socks, rss = [], []

        start = time.time()
        cur.execute("UPDATE trace.trace_queue SET due_at = now() WHERE status = 'pending'")
        while True:
            socks.append(sum(tcp_sockets(p) for p in pids))
            rss.append(max(rss_kb(p) for p in pids))
            cur.execute("SELECT count(*) FROM trace.trace_queue WHERE status <> 'delivered'")
            left = cur.fetchone()[0]
            if left == 0 or time.time() - start > 600:
                break
            time.sleep(0.05)
        cur.execute("SELECT extract(epoch FROM max(delivered_at)) FROM trace.trace_queue")
        last = float(cur.fetchone()[0])
        elapsed = last - start
        cpu = sum(cpu_seconds(p) - cpu0[p] for p in pids)
        if perf:
            perf.send_signal(2)
            perf.wait()
        counts = queue_counts(cur)
        total = sum(counts.values())
        reqs = nginx.requests()
        keys = [r[2] for r in reqs]
        non200 = sum(1 for r in reqs if r[1] != 200)

        print_block("throughput: %d due rows -> loopback nginx, webhook adapter" % args.n,
                    conditions(cluster, {
                        "rows": "%d trades closed in %.1f s (trigger), all made due at once"
                                % (closed, t_close),
                        "sink": "nginx, %d worker process(es), return 200, keep-alive"
                                % args.nginx_workers,
                    }))
        print_block("result", [
            "rate: %.0f traces/s (%d rows in %.2f s, first due -> last delivered_at)"
            % (total / elapsed, total, elapsed),
            "queue: %s" % fmt_counts(counts),
            "requests at nginx: %d (%d distinct Idempotency-Keys, %d not 200)"
            % (len(reqs), len(set(keys)), non200),
            "worker CPU: %.1f s in all, %.0f us per delivery" % (cpu, cpu * 1e6 / total),
            "worker sockets: max %d while draining" % max(socks),
            "worker RSS: %d kB before, max %d kB while draining"
            % (max(rss0.values()), max(rss)),
        ] + ["last_error: %s (%d rows)" % e for e in last_error_sample(cur)])
        conn.close()
    finally:
        cluster.destroy()
        nginx.stop()


if __name__ == "__main__":
    main()
