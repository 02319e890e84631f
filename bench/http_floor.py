#!/usr/bin/python3
"""Benchmark, the floor of one delivery's HTTP request: what the cheapest
possible client costs per request to loopback nginx.

bench/http_load.c (built here with cc: one write() per request, one read()
per answer, epoll, no library, no TLS) POSTs 208-byte bodies shaped like a
delivery's over 100 kept-alive connections at each RATE for S seconds.
Prints, per request, the client's CPU (user and system: the system part
includes the loopback TCP that a send runs on the receiving side) and
nginx's CPU.  The worker's HTTP part (libcurl, the kernel, libc) is about
70 us per delivery in bench/throughput.py --perf; this is what no client
can go below on the same machine.

Usage (as root): bench/http_floor.py [--rates 5000,10000] [--seconds 10]
A benchmark, not a test: it asserts nothing.
"""

import argparse
import os
import resource
import subprocess

from benchlib import Nginx, conditions, cpu_seconds, print_block
from steady_state import build_http_load


def nginx_pids(nginx):
    """The master and its workers (the master's children)."""
    with open(os.path.join(nginx.dir, "nginx.pid")) as f:
        master = int(f.read())
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [master] + [int(p) for p in out.split()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="5000,10000")
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()

    nginx = Nginx(log=False).start()
    load = build_http_load()
    lines = []
    try:
        pids = nginx_pids(nginx)
        for rate in [int(r) for r in args.rates.split(",")]:
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            n0 = sum(cpu_seconds(p) for p in pids)
            out = subprocess.run([load, str(nginx.port), "/webhook", str(rate),
                                  str(args.seconds), "100", "208"],
                                 capture_output=True, text=True, check=True).stdout.strip()
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            n1 = sum(cpu_seconds(p) for p in pids)
            answered = max(1, int(out.split()[3]))
            user = (r1.ru_utime - r0.ru_utime) * 1e6 / answered
            system = (r1.ru_stime - r0.ru_stime) * 1e6 / answered
            lines.append("%d requests/s: %s; client CPU per request %.1f us (user %.1f, "
                         "system %.1f); nginx %.1f us"
                         % (rate, out, user + system, user, system,
                            (n1 - n0) * 1e6 / answered))
    finally:
        nginx.stop()
    print_block("the cheapest HTTP client's cost per request",
                conditions(None, {"sink": nginx.describe(),
                                  "client": "bench/http_load.c, 100 kept-alive connections, "
                                            "208-byte bodies, %d s per rate" % args.seconds}))
    print_block("result", lines)


if __name__ == "__main__":
    main()
