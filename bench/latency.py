#!/usr/bin/python3
"""Benchmark 3, latency: close-commit -> request received at the tracker,
at trace.delay = 0.

Two runs against a loopback capture sink (test/lib/capture_server.py,
which stamps each request when its headers have arrived):
  idle     one close every 100 ms, so the worker is asleep at each commit;
  trickle  a steady 200 closes/s (each its own transaction) for 30 s.
The commit time is taken when COMMIT returns to the client, so the figure
includes the wake, the claim, the payload query, the HTTP post and the
sink's own parsing.  Prints p50/p90/p99/max per run.

Usage (as root, after make install):  bench/latency.py [--idle N] [--trickle-seconds S]
A benchmark, not a test: it asserts nothing.
"""

import argparse
import sys
import time

from benchlib import (DB, REPO, add_open_trades, conditions, percentile, print_block,
                      start_cluster, wait_until, worker_pids)

sys.path.insert(0, str(REPO / "test" / "lib"))
from capture_server import CaptureServer  # noqa: E402


def run(cur, sink, first_id, count, rate):
    """Close `count` trades at `rate` per second; {trade_id: commit time}."""
    add_open_trades(cur, first_id, count, signal_id=11)
    committed = {}
    period = 1.0 / rate
    t_next = time.time()
    for tid in range(first_id, first_id + count):
        now = time.time()
        if now < t_next:
            time.sleep(t_next - now)
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now(), "
                    "exit_price = 1.0912, pnl = 42.10, fees = 1.25 WHERE trade_id = %s", (tid,))
        committed[tid] = time.time()
        t_next += period
    wait_until(lambda: len(arrivals(sink, committed)) >= count, 30)
    got = arrivals(sink, committed)
    lat = [(got[t] - committed[t]) * 1000 for t in got]
    return lat, count - len(got)


def arrivals(sink, committed):
    out = {}
    for r in sink.requests("/hook"):
        key = r.header("Idempotency-Key") or ""
        try:
            tid = int(key.split("-")[0])
        except ValueError:
            continue
        if tid in committed and tid not in out:
            out[tid] = r.time
    return out


def summary(name, lat, missing, extra):
    return "%-8s n=%d  p50 %.1f ms  p90 %.1f ms  p99 %.1f ms  max %.1f ms  (%s; missing %d)" % (
        name, len(lat), percentile(lat, 50), percentile(lat, 90), percentile(lat, 99),
        max(lat) if lat else float("nan"), extra, missing)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=300, help="closes in the idle run")
    ap.add_argument("--trickle-seconds", type=int, default=30)
    args = ap.parse_args()

    sink = CaptureServer().start()
    cluster = start_cluster({
        "trace.enabled_adapters": "webhook",
        "trace.webhook_endpoint": sink.url("/hook"),
        "trace.delay": "0",
    }, "trace_bench_latency")
    try:
        conn = cluster.connect(DB)
        cur = conn.cursor()
        wait_until(lambda: worker_pids(cur), 20)
        time.sleep(1)
        idle, idle_missing = run(cur, sink, 2000000, args.idle, 10)
        sink.clear()
        trickle, trickle_missing = run(cur, sink, 3000000, 200 * args.trickle_seconds, 200)

        print_block("latency: close commit -> request at the sink, trace.delay = 0",
                    conditions(cluster, {"sink": "test/lib/capture_server.py (Python, loopback)",
                                         "client": "psycopg2, autocommit, one UPDATE per close"}))
        print_block("result", [
            summary("idle", idle, idle_missing, "one close every 100 ms"),
            summary("trickle", trickle, trickle_missing,
                    "200 closes/s for %d s" % args.trickle_seconds),
        ])
        conn.close()
    finally:
        cluster.destroy()
        sink.stop()


if __name__ == "__main__":
    main()
