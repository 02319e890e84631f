#!/usr/bin/python3
"""Benchmark 1, delivery rate: N due rows (default 100,000) drained to a
loopback nginx by the webhook adapter.

Closes N trades of opted-in users with trace.delay holding them back, makes
them all due at once, and times the drain from then until the last row is
`delivered`.  Samples the workers' open sockets and RSS while it runs, then
checks every row ended delivered, nginx saw exactly one request per row,
all answered 200.  Prints the rate and the conditions.

--tls: nginx serves HTTPS with a certificate of a throwaway CA made with
openssl in a temp dir (keep-alive, TLS session cache); trace.ca_file
points at the CA and the endpoint is https://127.0.0.1:PORT.  --http2:
the same, and nginx also offers HTTP/2 by ALPN.  trace_ext does not set
CURLOPT_HTTP_VERSION, so libcurl's default applies (7.88: HTTP/2 over TLS
when the server offers it, HTTP/1.1 otherwise); the protocol nginx logged
for each request and the number of connections it saw are printed.

Usage (as root, after make install; PG_BINDIR=... for a private copy):
    bench/throughput.py [N] [--workers W] [--batch B] [--nginx-workers K]
                        [--tls | --http2] [--perf FILE] [--curl-maxconnects N]
--curl-maxconnects N (a diagnostic) preloads bench/curl_maxconnects_shim.c
into the server so that the workers' libcurl keeps up to N idle
connections (CURLMOPT_MAXCONNECTS), to compare the connections opened, and
the rate, with libcurl's default cache that trace_ext leaves in place.
To compare plain HTTP with HTTPS, alternate the runs:
    for i in 1 2; do bench/throughput.py 100000; bench/throughput.py 100000 --tls; done
A benchmark, not a test: it asserts nothing.
"""

import argparse

from benchlib import (DB, Drain, Nginx, PerfRecord, conditions, curl_maxconnects_env,
                      fmt_counts, last_error_sample, print_block, queue_counts,
                      queue_rows_held_back, rss_kb, start_cluster, wait_until, worker_pids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=100000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--perf", metavar="FILE", help="perf record the first worker into FILE")
    ap.add_argument("--tls", action="store_true", help="HTTPS (a throwaway CA, trace.ca_file)")
    ap.add_argument("--http2", action="store_true",
                    help="HTTPS, and nginx offers HTTP/2 (implies --tls)")
    ap.add_argument("--curl-maxconnects", type=int, metavar="N",
                    help="diagnostic: preload bench/curl_maxconnects_shim.c so that the "
                         "workers' libcurl keeps up to N idle connections")
    args = ap.parse_args()

    nginx = Nginx(workers=args.nginx_workers, tls=args.tls, http2=args.http2).start()
    settings = {
        "trace.enabled_adapters": "webhook",
        "trace.webhook_endpoint": nginx.url("/hook"),
        "trace.delay": "1h",
        "trace.workers": args.workers,
    }
    if nginx.ca_file:
        settings["trace.ca_file"] = nginx.ca_file
    if args.batch:
        settings["trace.batch_size"] = args.batch
    server_env = curl_maxconnects_env(args.curl_maxconnects) if args.curl_maxconnects else None
    cluster = start_cluster(settings, "trace_bench_throughput", server_env=server_env)
    try:
        conn = cluster.connect(DB)
        cur = conn.cursor()
        closed, t_close = queue_rows_held_back(cur, args.n, signal_id=11)
        pids = wait_until(lambda: worker_pids(cur), 20)
        perf = PerfRecord(pids[0], args.perf) if args.perf else None
        rss0 = {p: rss_kb(p) for p in pids}
        drain = Drain(cur, pids).run()
        elapsed, cpu = drain.elapsed, drain.cpu
        if perf:
            perf.stop()
        counts = queue_counts(cur)
        total = sum(counts.values())
        reqs = nginx.requests()
        keys = [r[2] for r in reqs]
        non200 = sum(1 for r in reqs if r[1] != 200)
        protocols = {}
        for r in reqs:
            protocols[r[3]] = protocols.get(r[3], 0) + 1
        connections = len(set(r[4] for r in reqs))

        print_block("throughput: %d due rows -> loopback nginx, webhook adapter" % args.n,
                    conditions(cluster, {
                        "rows": "%d trades closed in %.1f s (trigger), all made due at once"
                                % (closed, t_close),
                        "sink": "%s, %d worker process(es)"
                                % (nginx.describe(), args.nginx_workers),
                        "libcurl connection cache": (
                            "CURLMOPT_MAXCONNECTS = %d (preloaded diagnostic shim)"
                            % args.curl_maxconnects if args.curl_maxconnects
                            else "libcurl's default (trace_ext sets no CURLMOPT_MAXCONNECTS)"),
                    }))
        print_block("result", [
            "rate: %.0f traces/s (%d rows in %.2f s, first due -> last delivered_at)"
            % (total / elapsed, total, elapsed),
            "queue: %s" % fmt_counts(counts),
            "requests at nginx: %d (%d distinct Idempotency-Keys, %d not 200)"
            % (len(reqs), len(set(keys)), non200),
            "protocol at nginx: %s; %d connections"
            % (", ".join("%s %d" % kv for kv in sorted(protocols.items())), connections),
            "worker CPU: %.1f s in all, %.0f us per delivery" % (cpu, cpu * 1e6 / total),
            "worker sockets: max %d while draining" % drain.sampler.peak_sockets,
            "worker RSS: %d kB before, max %d kB while draining"
            % (max(rss0.values()), drain.sampler.peak_rss_kb),
        ] + ["last_error: %s (%d rows)" % e for e in last_error_sample(cur)])
        conn.close()
    finally:
        cluster.destroy()
        nginx.stop()


if __name__ == "__main__":
    main()
