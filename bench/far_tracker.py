#!/usr/bin/python3
"""Benchmark, a tracker far away: N due rows (default 20,000) for the
webhook adapter, pointed at a loopback sink that answers every request
D ms (default 100) after it arrived, as a distant tracker would.

The sink is bench/slow_sink.js (node's http module, keep-alive, one
process); with --sink-test the script first measures what the sink alone
serves with batch_size x workers requests in flight (its own node client),
so that the sink is known not to be the limit.  Then, as bench/throughput.py
does, it closes N trades with trace.delay holding their rows back, makes
them all due at once, and times the drain until the last row is delivered,
or waits for a retry, or is given up.

With D ms per request and at most batch_size requests in flight per worker,
the ceiling is batch_size x workers / D: 1,000/s at batch 100 and 100 ms.
Prints the rate, the requests in flight allowed, the workers' peak open
TCP sockets (and their states), RSS and CPU per delivery, the queue's
outcome (delivered, failed), deliveries per second (stalls show as
seconds with few), the webhook breaker's state and the requests in flight
(trace.tracker_health, trace.worker_status) at each look, what the sink saw (connections opened and who closed
them, peak open), the kernel's TCP counters over the drain (system-wide:
SYN retransmits, listen queue overflows), the WAL syncs (each claim's and
each record's commit waits for one; track_wal_io_timing is on), and the
workers' open-files limit.  --syscalls counts the workers' socket, connect, close and epoll
system calls with perf (tracepoints; failed socket() calls and connect()
calls that failed other than EINPROGRESS counted apart).

Usage (as root, after make install; PG_BINDIR=... for a private copy):
    bench/far_tracker.py [--delay-ms D] [--batch B] [--workers W] [--n N]
                         [--set trace.NAME=VALUE ...] [--sink-test]
                         [--sink-backlog K] [--nofile F] [--curl-maxconnects N]
                         [--syscalls] [--perf FILE]
e.g. the two runs of issue 16:
    bench/far_tracker.py --batch 100 --sink-test
    bench/far_tracker.py --batch 1000 --sink-test --syscalls
--nofile starts the server with that soft limit on open files (prlimit;
runuser gives 1024 here, and every socket of a worker is a file),
--sink-backlog sets the sink's listen backlog, and --curl-maxconnects
preloads bench/curl_maxconnects_shim.c (libcurl's connection cache size):
to test what limits a large batch.
A benchmark, not a test: it asserts nothing.
"""

import argparse
import os
import signal
import subprocess
import tempfile
import time

from benchlib import (DB, Drain, PerfRecord, SlowSink, conditions, cpu_seconds,
                      curl_maxconnects_env, fmt_counts, last_error_sample, open_files_limit,
                      print_block, queue_counts, queue_rows_held_back, rss_kb, slow_sink_load,
                      start_cluster, tcp_counters, wait_until, worker_pids)

# Kernel TCP counters worth a look when connections stall.
TCP_COUNTERS = ("ActiveOpens", "PassiveOpens", "AttemptFails", "EstabResets", "RetransSegs",
                "TCPSynRetrans", "ListenOverflows", "ListenDrops", "TCPTimeouts",
                "TCPAbortOnData", "TCPAbortOnClose")

# Looked at with every poll of the drain: the webhook tracker's breaker and
# the requests the workers have in flight.
WATCH = ("SELECT (SELECT state FROM trace.tracker_health WHERE adapter = 'webhook'), "
         "       (SELECT coalesce(sum(in_flight), 0) FROM trace.worker_status)")

SYSCALLS = ("socket", "connect", "close", "epoll_create1", "epoll_ctl", "epoll_wait",
            "sendto", "recvfrom")


class SyscallCounter:
    """perf stat of the workers' system calls (tracepoints) while it runs."""

    def __init__(self, pids):
        self.out = tempfile.NamedTemporaryFile(suffix=".perf", delete=False).name
        events = []
        for name in SYSCALLS:
            events += ["-e", "syscalls:sys_enter_" + name]
        events += ["-e", "syscalls:sys_exit_socket", "--filter", "ret < 0"]
        events += ["-e", "syscalls:sys_exit_connect", "--filter", "ret < 0 && ret != -115"]
        self.proc = subprocess.Popen(["perf", "stat", "-x", ",", "-o", self.out] + events
                                     + ["-p", ",".join(str(p) for p in pids)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait()
        counts = {}
        with open(self.out) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) > 2 and parts[2].startswith("syscalls:"):
                    name = parts[2].split(":", 1)[1]
                    if name == "sys_exit_socket":
                        name = "socket failed"
                    elif name == "sys_exit_connect":
                        name = "connect failed (not EINPROGRESS)"
                    else:
                        name = name.replace("sys_enter_", "")
                    counts[name] = int(parts[0]) if parts[0].isdigit() else parts[0]
        os.unlink(self.out)
        return counts


def wal_syncs(cur):
    """(WAL syncs, milliseconds spent in them) so far, all processes."""
    cur.execute("SELECT wal_sync, wal_sync_time FROM pg_stat_wal")
    n, ms = cur.fetchone()
    return int(n), float(ms)


def guc_pairs(values):
    out = {}
    for v in values or []:
        name, sep, value = v.partition("=")
        if not sep or not name.strip():
            raise SystemExit("--set wants NAME=VALUE, e.g. trace.http_timeout=30s")
        out[name.strip()] = value.strip()
    return out


def series(values):
    """A per-second list, trailing zeros cut, as a short string."""
    while values and values[-1] == 0:
        values = values[:-1]
    return " ".join(str(v) for v in values) or "-"


def watched_lines(watched):
    """The breaker's states and the requests in flight, from the drain's looks."""
    if not watched:
        return []
    states, opened, last = {}, 0, "closed"
    per_second = {}
    for t, (state, inflight) in watched:
        state = state or "?"
        states[state] = states.get(state, 0) + 1
        if state != "closed" and last == "closed":
            opened += 1
        last = state
        per_second.setdefault(int(t), []).append(int(inflight))
    looks = len(watched)
    return [
        "webhook breaker, at %d looks: %s; opened %d time(s)"
        % (looks, ", ".join("%s %d" % kv for kv in sorted(states.items())), opened),
        "requests in flight (trace.worker_status), mean per second: %s"
        % " ".join("%.0f" % (sum(v) / len(v)) for _, v in sorted(per_second.items())),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay-ms", type=int, default=100, help="the sink's delay per request")
    ap.add_argument("--batch", type=int, default=100, help="trace.batch_size")
    ap.add_argument("--workers", type=int, default=1, help="trace.workers")
    ap.add_argument("--n", type=int, default=20000, help="rows to drain")
    ap.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="a server setting, e.g. trace.http_timeout=30s (repeatable)")
    ap.add_argument("--sink-test", action="store_true",
                    help="first measure the sink alone (batch x workers in flight)")
    ap.add_argument("--sink-backlog", type=int, default=511,
                    help="the sink's listen backlog (node's default 511)")
    ap.add_argument("--nofile", type=int, default=None,
                    help="start the server with this soft open-files limit (prlimit)")
    ap.add_argument("--curl-maxconnects", type=int, metavar="N",
                    help="diagnostic: preload bench/curl_maxconnects_shim.c so that the "
                         "workers' libcurl keeps up to N idle connections")
    ap.add_argument("--perf", metavar="FILE", help="perf record the first worker into FILE")
    ap.add_argument("--syscalls", action="store_true",
                    help="count the workers' system calls with perf stat")
    ap.add_argument("--timeout", type=int, default=900, help="give up the drain after this")
    args = ap.parse_args()
    extra = guc_pairs(args.set)
    inflight = args.batch * args.workers

    sink = SlowSink(delay_ms=args.delay_ms, backlog=args.sink_backlog).start()
    cluster = None
    sink_stats = None
    try:
        alone = None
        if args.sink_test:
            alone = slow_sink_load(sink.url("/load"), inflight, max(30 * inflight, 5000))
            alone["per_second"] = (sink.stop() or {}).get("answered_per_second", [])
            sink = SlowSink(delay_ms=args.delay_ms, backlog=args.sink_backlog).start()
        settings = {
            "trace.enabled_adapters": "webhook",
            "trace.webhook_endpoint": sink.url("/hook"),
            "trace.delay": "1h",
            "trace.workers": args.workers,
            "trace.batch_size": args.batch,
        }
        settings.update(extra)
        server_env = (curl_maxconnects_env(args.curl_maxconnects) if args.curl_maxconnects
                      else None)
        cluster = start_cluster(settings, "trace_bench_far", nofile=args.nofile,
                                server_env=server_env,
                                pg_settings={"track_wal_io_timing": True})
        conn = cluster.connect(DB)
        cur = conn.cursor()
        closed, t_close = queue_rows_held_back(cur, args.n, signal_id=11)
        pids = wait_until(lambda: worker_pids(cur), 20)
        limits = {p: open_files_limit(p) for p in pids}
        rss0 = max(rss_kb(p) for p in pids)
        counters0 = tcp_counters()
        wal0 = wal_syncs(cur)
        syscalls = SyscallCounter(pids) if args.syscalls else None
        perf = PerfRecord(pids[0], args.perf) if args.perf else None
        sink_cpu0 = cpu_seconds(sink.proc.pid)
        drain = Drain(cur, pids, timeout=args.timeout, states_every=0.5,
                      watch_sql=WATCH).run()
        sink_cpu = cpu_seconds(sink.proc.pid) - sink_cpu0
        if perf:
            perf.stop()
        calls = syscalls.stop() if syscalls else None
        counters1 = tcp_counters()
        time.sleep(1.2)             # backends report their WAL statistics within a second
        wal1 = wal_syncs(cur)
        per_second = drain.per_second()
        sink_stats = sink.stop()
        counts = queue_counts(cur)
        total = sum(counts.values())
        cur.execute("SELECT count(*) FILTER (WHERE attempts > 1), "
                    "       count(*) FILTER (WHERE status <> 'delivered'), "
                    "       count(*) FILTER (WHERE last_error IS NOT NULL) "
                    "  FROM trace.trace_queue")
        retried, not_delivered, with_error = cur.fetchone()

        print_block("far tracker: %d due rows -> webhook at a loopback sink answering after "
                    "%d ms" % (args.n, args.delay_ms),
                    conditions(cluster, {
                        "rows": "%d trades closed in %.1f s (trigger), all made due at once"
                                % (closed, t_close),
                        "sink": sink.describe(),
                        "somaxconn": open("/proc/sys/net/core/somaxconn").read().strip(),
                        "libcurl connection cache": (
                            "CURLMOPT_MAXCONNECTS = %d (preloaded diagnostic shim)"
                            % args.curl_maxconnects if args.curl_maxconnects
                            else "libcurl's default (trace_ext sets no CURLMOPT_MAXCONNECTS)"),
                        "workers' open-files limit (soft, hard)": ", ".join(
                            str(limits[p]) for p in pids),
                    }))
        lines = []
        if alone:
            lines.append("sink alone (its node client on the same CPUs, %d in flight, %d "
                         "requests): %.0f req/s overall, best second %d; %d errors, %d not 200; "
                         "ceiling %d in flight / %d ms = %.0f/s"
                         % (inflight, alone["n"], alone["rps"],
                            max(alone["per_second"] or [0]), alone["errors"],
                            alone["not_200"], inflight, args.delay_ms,
                            inflight * 1000.0 / args.delay_ms))
        lines += [
            "rate: %.0f traces/s (%d rows delivered in %.2f s, first due -> last delivered_at)%s"
            % (drain.delivered / drain.elapsed, drain.delivered, drain.elapsed,
               "; TIMED OUT after %d s" % args.timeout if drain.timed_out else ""),
            "requests in flight allowed: %d (batch_size %d x %d worker(s)); ceiling at %d ms: "
            "%.0f/s" % (inflight, args.batch, args.workers, args.delay_ms,
                        inflight * 1000.0 / args.delay_ms),
            "queue: %s of %d rows; not delivered (failed) %d; needed a retry %d; "
            "with a last_error %d" % (fmt_counts(counts), total, not_delivered, retried,
                                      with_error),
            "worker sockets: peak %d open (sum over workers; one worker at most %d); "
            "peak by TCP state: %s"
            % (drain.sampler.peak_sockets, drain.sampler.peak_sockets_one,
               ", ".join("%s %d" % kv for kv in sorted(drain.sampler.peak_states.items()))
               or "-"),
            "worker RSS: %d kB before, max %d kB while draining"
            % (rss0, drain.sampler.peak_rss_kb),
            "worker CPU: %.1f s in all, %.0f us per delivery"
            % (drain.cpu, drain.cpu * 1e6 / max(1, drain.delivered)),
            "deliveries per second: %s" % series(per_second),
        ] + watched_lines(drain.watched)
        if sink_stats:
            offset = int(drain.start - sink_stats["t0_ms"] / 1000.0)
            lines += [
                "sink: %d requests, %d connections opened (closed by the client %d, by the "
                "sink %d, with an error %d), peak %d open, peak %d requests in progress"
                % (sink_stats["requests"], sink_stats["connections"],
                   sink_stats["closed_by_client"], sink_stats["closed_by_sink"],
                   sink_stats["closed_with_error"], sink_stats["peak_open"],
                   sink_stats["peak_in_progress"]),
                "sink: CPU %.1f s over the drain (%.0f %% of one core)"
                % (sink_cpu, 100 * sink_cpu / max(drain.elapsed, 0.001)),
                "sink: connections opened per second: %s; closed per second: %s"
                % (series(sink_stats["opened_per_second"][max(0, offset):]),
                   series(sink_stats["closed_per_second"][max(0, offset):])),
            ]
        lines.append("WAL syncs over the drain (pg_stat_wal, all processes; each commit of a "
                     "claim or a record waits for one): %d, %.2f s in them; %.0f deliveries "
                     "per sync" % (wal1[0] - wal0[0], (wal1[1] - wal0[1]) / 1000.0,
                                   drain.delivered / max(1, wal1[0] - wal0[0])))
        lines.append("kernel TCP counters over the drain (system-wide): " + ", ".join(
            "%s +%d" % (k, counters1.get(k, 0) - counters0.get(k, 0)) for k in TCP_COUNTERS))
        if calls:
            lines.append("worker system calls over the drain (perf stat): " + ", ".join(
                "%s %s" % (k, calls[k]) for k in sorted(calls)))
        lines += ["last_error: %s (%d rows)" % e for e in last_error_sample(cur)]
        print_block("result", lines)
        conn.close()
    finally:
        if cluster is not None:
            cluster.destroy()
        if sink_stats is None:
            sink.stop()


if __name__ == "__main__":
    main()
