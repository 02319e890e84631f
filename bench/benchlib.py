"""Shared pieces of the benchmarks in bench/: a throwaway cluster with the
trade store and trace_ext, a loopback nginx sink, bulk trade helpers, and
process sampling (/proc).  Benchmarks print figures; they assert nothing.

Everything runs on this machine and binds only 127.0.0.1.  Run as root
(the cluster runs as the postgres OS user, nginx as www-data).
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test" / "lib"))
from cluster import Cluster, free_port  # noqa: E402

DB = "trades"


def fixture_path():
    shared = REPO.parent / "shared" / "fixtures" / "trade_store.sql"
    return str(shared if shared.is_file() else REPO / "test" / "fixtures" / "trade_store.sql")


def cmd_output(args):
    try:
        return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=30).stdout.decode().strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def conditions(cluster=None, extra=None):
    """The lines that say what machine and versions a figure came from."""
    lines = [
        "machine: %s, %d CPUs, %s" % (platform.node(), os.cpu_count(), platform.release()),
        "cpu: %s" % _cpu_model(),
        "libcurl: %s" % cmd_output(["curl-config", "--version"]),
        "nginx: %s" % cmd_output(["nginx", "-v"]).replace("nginx version: ", ""),
    ]
    if cluster is not None:
        conn = cluster.connect(DB)
        cur = conn.cursor()
        cur.execute("SELECT version()")
        lines.append("server: %s" % cur.fetchone()[0].split(" on ")[0])
        cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'trace_ext'")
        row = cur.fetchone()
        lines.append("trace_ext: %s" % (row[0] if row else "not installed"))
        cur.execute("SELECT name, setting, unit FROM pg_settings "
                    " WHERE name LIKE 'trace.%' AND name NOT LIKE '%token%' "
                    "   AND name NOT LIKE '%secret%' AND name NOT LIKE '%key%' "
                    "   AND source <> 'default' ORDER BY name")
        lines.append("settings: " + ", ".join(
            "%s=%s%s" % (n, s, u or "") for n, s, u in cur.fetchall()))
        conn.close()
    for k, v in (extra or {}).items():
        lines.append("%s: %s" % (k, v))
    return lines


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def print_block(title, lines):
    print("== %s ==" % title)
    for line in lines:
        print("  " + line)
    sys.stdout.flush()


# -- the cluster -------------------------------------------------------------

def start_cluster(settings, name, preload_extra=None, pg_settings=None):
    """A cluster with trace_ext preloaded (plus preload_extra), database
    `trades` with the reference trade store and the extension; fsync,
    synchronous_commit and full_page_writes on."""
    # Durable, as in production (the test clusters turn these off for speed).
    conf = {"trace.database": DB, "fsync": True, "synchronous_commit": True,
            "full_page_writes": True}
    conf.update(settings)
    conf.update(pg_settings or {})
    if preload_extra:
        conf["shared_preload_libraries"] = ",".join(["trace_ext"] + preload_extra)
    cluster = Cluster(name=name, settings=conf)
    cluster.init()
    cluster.start(overrides={"shared_preload_libraries": "''"})
    cluster.create_database(DB)
    cluster.psql(file=fixture_path(), dbname=DB)
    cluster.stop()
    cluster.start()
    conn = cluster.connect(DB)
    cur = conn.cursor()
    cur.execute("SET client_min_messages = warning")
    cur.execute("CREATE EXTENSION trace_ext")
    if preload_extra and "pg_stat_statements" in preload_extra:
        cur.execute("CREATE EXTENSION pg_stat_statements")
    conn.close()
    return cluster


def add_open_trades(cur, first_id, n, signal_id=10, users=(1, 3)):
    """n OPEN trades with ids first_id.., owned by opted-in users."""
    cur.execute("""
        INSERT INTO trades (trade_id, user_id, signal_id, account_number, client_id,
                            instrument, side, volume, entry_price, opened_at)
        SELECT g, (%s::bigint[])[1 + g %% %s], %s, 'ACC-' || g, 'CL-' || g,
               'EURUSD', 'buy', 1.5, 1.0842, now()
          FROM generate_series(%s::bigint, %s::bigint) g""",
                (list(users), len(users), signal_id, first_id, first_id + n - 1))


def close_all_open(cur):
    cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now(), exit_price = 1.0912, "
                "pnl = 42.10, fees = 1.25 WHERE status = 'OPEN'")
    return cur.rowcount


def worker_pids(cur):
    cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'trace_ext worker' "
                "ORDER BY pid")
    return [r[0] for r in cur.fetchall()]


def wait_until(probe, timeout, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    return probe()


# -- /proc sampling ----------------------------------------------------------

def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_anon_kb(pid):
    """Private resident memory (RssAnon): what the process itself holds,
    without the shared buffers it has touched."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def tcp_sockets(pid):
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# -- nginx sink ----------------------------------------------------------------

NGINX_CONF = """
worker_processes {workers};
daemon on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; }}
http {{
    log_format bench '$msec $status $request_length $http_idempotency_key';
    access_log {access};
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_buffer_size 64k;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


class Nginx:
    """nginx on 127.0.0.1: answers every request 200 "ok" (the body is
    read and dropped).  With log=True, one access-log line per request:
    '$msec $status $request_length $http_idempotency_key'."""

    def __init__(self, workers=1, log=True):
        self.dir = tempfile.mkdtemp(prefix="trace_bench_nginx_")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.access_path = os.path.join(self.dir, "access.log")
        access = "%s bench" % self.access_path if log else "off"
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(workers=workers, dir=self.dir, port=self.port,
                                      access=access))

    def start(self):
        subprocess.run(["nginx", "-c", os.path.join(self.dir, "nginx.conf"),
                        "-p", self.dir, "-g", "user root;"], check=True,
                       stderr=subprocess.STDOUT)
        wait_until(lambda: os.path.exists(os.path.join(self.dir, "nginx.pid")), 10)
        return self

    def url(self, path="/hook"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def requests(self):
        """[(epoch seconds, status, idempotency key)] from the access log."""
        out = []
        if not os.path.exists(self.access_path):
            return out
        with open(self.access_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    out.append((float(parts[0]), int(parts[1]), parts[3]))
        return out

    def stop(self):
        pidfile = os.path.join(self.dir, "nginx.pid")
        if os.path.exists(pidfile):
            subprocess.run(["nginx", "-c", os.path.join(self.dir, "nginx.conf"),
                            "-p", self.dir, "-s", "stop"], stderr=subprocess.DEVNULL)
            wait_until(lambda: not os.path.exists(pidfile), 10)
        shutil.rmtree(self.dir, ignore_errors=True)


def queue_counts(cur):
    cur.execute("SELECT status, count(*) FROM trace.trace_queue GROUP BY 1 ORDER BY 1")
    return dict(cur.fetchall())


def fmt_counts(counts):
    return ", ".join("%s %d" % kv for kv in sorted(counts.items())) or "empty"


def last_error_sample(cur):
    cur.execute("SELECT last_error, count(*) FROM trace.trace_queue "
                " WHERE last_error IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 3")
    return cur.fetchall()

