"""Shared pieces of the benchmarks in bench/: a throwaway cluster with the
trade store and trace_ext, a loopback nginx sink (plain HTTP or HTTPS with a
throwaway CA), bulk trade helpers, the pgbench close workload, and process
sampling (/proc).  Benchmarks print figures; they assert nothing.

Everything runs on this machine and binds only 127.0.0.1.  Run as root
(the cluster runs as the postgres OS user, nginx as root).  The server
binaries come from $PG_BINDIR (default /usr/lib/postgresql/15/bin), so a
private copy with a build installed into it can be measured; nginx from
$NGINX, else the one on PATH, else Debian's package unpacked into
/tmp/nginx_root (see docs/performance.md).
"""

import atexit
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test" / "lib"))
from cluster import PG_BINDIR, Cluster, free_port  # noqa: E402

DB = "trades"


def nginx_bin():
    """The nginx to run: $NGINX, the one on PATH, or an unpacked .deb."""
    for cand in (os.environ.get("NGINX"), shutil.which("nginx"),
                 "/tmp/nginx_root/usr/sbin/nginx"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError("nginx not found: set NGINX, or unpack Debian's nginx package "
                       "into /tmp/nginx_root (docs/performance.md)")


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
        "load average: %.2f %.2f %.2f (1, 5, 15 min, at the time of printing)"
        % os.getloadavg(),
        "libcurl: %s" % cmd_output(["curl-config", "--version"]),
        "nginx: %s" % _nginx_version(),
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


def _nginx_version():
    try:
        return cmd_output([nginx_bin(), "-v"]).replace("nginx version: ", "")
    except RuntimeError as e:
        return str(e)


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

class _LimitedCluster(Cluster):
    """A Cluster whose server commands (so the postmaster and every
    backend and worker) run under `prlimit --nofile=SOFT:` (hard unchanged):
    runuser gives the postgres OS user PAM's default soft limit, 1024 here,
    and PostgreSQL 15 does not raise it."""

    def __init__(self, nofile, **kw):
        self.nofile = nofile
        Cluster.__init__(self, **kw)

    def _server_cmd(self, args):
        cmd = Cluster._server_cmd(self, args)
        i = cmd.index("--") + 1 if cmd[0] == "runuser" else 0
        return cmd[:i] + ["prlimit", "--nofile=%d:" % self.nofile, "--"] + cmd[i:]


def start_cluster(settings, name, preload_extra=None, pg_settings=None, nofile=None,
                  server_env=None):
    """A cluster with trace_ext preloaded (plus preload_extra), database
    `trades` with the reference trade store and the extension; fsync,
    synchronous_commit and full_page_writes on.  nofile: the server's soft
    limit on open files (default: what runuser gives, 1024 here).
    server_env: extra environment of the server (e.g. from
    curl_maxconnects_env())."""
    # Durable, as in production (the test clusters turn these off for speed).
    conf = {"trace.database": DB, "fsync": True, "synchronous_commit": True,
            "full_page_writes": True}
    conf.update(settings)
    conf.update(pg_settings or {})
    if preload_extra:
        conf["shared_preload_libraries"] = ",".join(["trace_ext"] + preload_extra)
    if nofile:
        cluster = _LimitedCluster(nofile, name=name, settings=conf, server_env=server_env)
    else:
        cluster = Cluster(name=name, settings=conf, server_env=server_env)
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


def curl_maxconnects_env(n):
    """The server environment that preloads bench/curl_maxconnects_shim.c
    (built here with cc into a temp dir), so that the workers' libcurl
    multi handle gets CURLMOPT_MAXCONNECTS = n.  A diagnostic: trace_ext
    itself leaves libcurl's default (4 x the transfers in the multi
    handle)."""
    d = tempfile.mkdtemp(prefix="trace_bench_shim_")
    atexit.register(shutil.rmtree, d, True)
    os.chmod(d, 0o755)
    lib = os.path.join(d, "curl_maxconnects_shim.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", lib,
                    str(REPO / "bench" / "curl_maxconnects_shim.c"), "-ldl", "-lcurl"],
                   check=True)
    os.chmod(lib, 0o755)
    return {"LD_PRELOAD": lib, "BENCH_CURL_MAXCONNECTS": str(n)}


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


# -- the application's close, run by pgbench ------------------------------------

# The application's close; {id} is the trade id (a pgbench variable, a
# query parameter or a plpgsql variable).
CLOSE = ("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(), "
         "pnl = 42.10, fees = 1.25 WHERE trade_id = {id}")


def fill_trade_store(cluster, n, signal_id=10):
    """Replace the fixture's trades by n open trades (ids 1..n) of opted-in
    users (all three opt in) on signal_id; signal 10 lists myfxbook,
    webhook and file."""
    cluster.psql(dbname=DB, sql="""
        UPDATE users SET tracing_enabled = true;
        DELETE FROM trades;
        INSERT INTO trades (trade_id, user_id, signal_id, account_number, client_id,
                            instrument, side, volume, entry_price, opened_at)
        SELECT g, 1 + g %% 3, %d, 'ACC-' || g, 'CL-' || g, 'EURUSD', 'buy',
               1.5, 1.0842, now()
          FROM generate_series(1, %d) g;""" % (signal_id, n))


def reset_trade_store(cluster):
    """Every trade open again, the trades the benchmarks inserted (ids from
    100,000,000) gone, the queue empty; VACUUM ANALYZE, CHECKPOINT: the
    same starting state for every run."""
    cluster.psql(dbname=DB, sql="""
        UPDATE trades SET status = 'OPEN', exit_price = NULL, closed_at = NULL,
                          pnl = NULL, fees = NULL WHERE status <> 'OPEN';
        DELETE FROM trades WHERE trade_id >= 100000000;
        TRUNCATE trace.trace_queue;""")
    cluster.psql(dbname=DB, sql="VACUUM ANALYZE trades")
    cluster.psql(dbname=DB, sql="VACUUM ANALYZE trace.trace_queue")
    cluster.psql(dbname=DB, sql="CHECKPOINT")


def pgbench_script(text):
    """A pgbench script file readable by the postgres OS user; the caller
    unlinks it."""
    f = tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False)
    f.write(text)
    f.close()
    os.chmod(f.name, 0o644)
    return f.name


def pgbench_version():
    return cmd_output([os.path.join(PG_BINDIR, "pgbench"), "--version"])


class PgbenchResult:
    def __init__(self, tps, progress, transactions, output):
        self.tps = tps                      # without initial connection time
        self.progress = progress            # TPS per progress interval
        self.transactions = transactions
        self.output = output


def pgbench(cluster, script, seconds, clients=2, defines=None, progress=10, rate=None):
    """pgbench -n -M prepared, `clients` clients and threads, for `seconds`,
    running `script` with -D defines (and -R rate: that many transactions
    per second in all, if given); as the postgres OS user when root."""
    cmd = [os.path.join(PG_BINDIR, "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
           "-j", str(clients), "-T", str(seconds), "-P", str(progress), "-f", script,
           "-h", cluster.sockdir, "-p", str(cluster.port), "-U", "postgres"]
    if rate:
        cmd += ["-R", str(rate)]
    for k, v in (defines or {}).items():
        cmd += ["-D", "%s=%s" % (k, v)]
    cmd.append(DB)
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.decode()
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    n = re.search(r"number of transactions actually processed: (\d+)", out)
    if p.returncode != 0 or not m or not n:
        raise RuntimeError("pgbench failed:\n" + out)
    progress = [float(x) for x in re.findall(r"progress: [\d.]+ s, ([\d.]+) tps", out)]
    return PgbenchResult(float(m.group(1)), progress, int(n.group(1)), out)


def worker_pids(cur):
    cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'trace_ext worker' "
                "ORDER BY pid")
    return [r[0] for r in cur.fetchall()]


def queue_rows_held_back(cur, n, signal_id=11, first_id=1000000):
    """Close n new trades of opted-in users on signal_id, so that the
    trigger queues their rows (trace.delay must hold them back, e.g. 1h).
    Returns (trades closed, seconds); the fixture's own trades close too."""
    t0 = time.time()
    add_open_trades(cur, first_id, n, signal_id=signal_id)
    closed = close_all_open(cur)
    seconds = time.time() - t0
    cur.execute("VACUUM ANALYZE trace.trace_queue")
    return closed, seconds


class Drain:
    """Make every pending row due at once and wait until each is delivered,
    or waits for a retry, or is given up (or `timeout` seconds pass),
    sampling the workers meanwhile (ProcSampler), and running watch_sql at
    each look (its first row kept in watched, as (seconds since start,
    row)).  Afterwards: start (epoch seconds), elapsed (start -> last
    delivered_at), delivered, cpu (the workers' CPU seconds), sampler,
    watched, timed_out."""

    def __init__(self, cur, pids, timeout=600, every=0.05, states_every=None,
                 watch_sql=None):
        self.cur = cur
        self.watch_sql = watch_sql
        self.watched = []
        self.pids = pids
        self.timeout = timeout
        self.sampler = ProcSampler(pids, every=every, states_every=states_every)
        self.every = every
        self.timed_out = False

    def run(self):
        cur = self.cur
        cpu0 = {p: cpu_seconds(p) for p in self.pids}
        self.sampler.start()
        self.start = time.time()
        cur.execute("UPDATE trace.trace_queue SET due_at = now() WHERE status = 'pending'")
        while True:
            # Not finished: rows in flight, or pending and due (a row that
            # failed and waits for its retry's due_at counts as finished).
            # One row is enough: in due_at order through the queue's partial
            # index, so the look costs next to nothing (a count(*) here was
            # a sequential scan of the whole queue, 11-22 ms of a core every
            # 50 ms, taken from the worker and the sink on this machine).
            cur.execute("SELECT count(*) FROM (SELECT 1 FROM trace.trace_queue "
                        " WHERE status IN ('pending', 'sending') "
                        "   AND (attempts = 0 OR due_at <= now()) "
                        " ORDER BY due_at LIMIT 1) AS s")
            left = cur.fetchone()[0]
            if self.watch_sql:
                cur.execute(self.watch_sql)
                self.watched.append((time.time() - self.start, cur.fetchone()))
            if left == 0:
                break
            if time.time() - self.start > self.timeout:
                self.timed_out = True
                break
            time.sleep(self.every)
        self.sampler.stop()
        self.cpu = sum(cpu_seconds(p) - cpu0[p] for p in self.pids)
        cur.execute("SELECT extract(epoch FROM max(delivered_at)), "
                    "       count(*) FILTER (WHERE status = 'delivered') "
                    "  FROM trace.trace_queue")
        last, self.delivered = cur.fetchone()
        self.elapsed = (float(last) if last is not None else time.time()) - self.start
        return self

    def per_second(self):
        """[deliveries in second 0, 1, ...] from the start, by delivered_at."""
        self.cur.execute("SELECT floor(extract(epoch FROM delivered_at) - %s)::int AS s, "
                         "       count(*) FROM trace.trace_queue "
                         " WHERE status = 'delivered' AND delivered_at >= to_timestamp(%s) "
                         " GROUP BY 1 ORDER BY 1", (self.start, self.start))
        rows = dict(self.cur.fetchall())
        return [rows.get(i, 0) for i in range(0, max(rows) + 1)] if rows else []


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


def machine_cpu():
    """(busy, all) CPU seconds of the whole machine since boot, summed over
    its CPUs (/proc/stat; busy is all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])                  # user .. steal (guest is in user)
    return (total - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


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


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
               "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
               "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def tcp_socket_states(pids):
    """{state: count} of the TCP sockets the processes hold open (by the
    socket inodes of their fds, looked up in /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    states = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] in inodes:
                        name = _TCP_STATES.get(parts[3], parts[3])
                        states[name] = states.get(name, 0) + 1
        except OSError:
            pass
    return states


def open_files_limit(pid):
    """The process's (soft, hard) limit on open files."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                parts = line.split()
                return int(parts[3]), int(parts[4])
    return None


def tcp_counters():
    """The kernel's TCP counters (/proc/net/snmp Tcp:, /proc/net/netstat
    TcpExt:), {name: value}.  System-wide: other processes count too."""
    out = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for head, vals in zip(lines[::2], lines[1::2]):
            prefix = head.split(":", 1)[0]
            if prefix not in ("Tcp", "TcpExt"):
                continue
            for k, v in zip(head.split()[1:], vals.split()[1:]):
                try:
                    out[k] = int(v)
                except ValueError:
                    pass
    return out


class ProcSampler:
    """Samples processes in a background thread, every `every` seconds:
    their socket fds (the sum over the processes, and the most any one held),
    their RSS; with states_every, also the states of their TCP sockets
    (dearer: it reads /proc/net/tcp).  Keeps the peaks."""

    def __init__(self, pids, every=0.05, states_every=None):
        self.pids = list(pids)
        self.every = every
        self.states_every = states_every
        self.peak_sockets = 0
        self.peak_sockets_one = 0
        self.peak_rss_kb = 0
        self.peak_states = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self

    def _run(self):
        next_states = 0.0
        while not self._stop.is_set():
            try:
                socks = [tcp_sockets(p) for p in self.pids]
                self.peak_sockets = max(self.peak_sockets, sum(socks))
                self.peak_sockets_one = max([self.peak_sockets_one] + socks)
                self.peak_rss_kb = max([self.peak_rss_kb] + [rss_kb(p) for p in self.pids])
                if self.states_every and time.time() >= next_states:
                    next_states = time.time() + self.states_every
                    for k, v in tcp_socket_states(self.pids).items():
                        self.peak_states[k] = max(self.peak_states.get(k, 0), v)
                self.samples += 1
            except OSError:
                pass                # a worker restarted: keep sampling the others
            self._stop.wait(self.every)


class PerfRecord:
    """perf record -e cpu-clock -g of one process into `path`, until stop()."""

    def __init__(self, pid, path):
        self.proc = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2999", "-g",
                                      "-p", str(pid), "-o", path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait()


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
    log_format bench '$msec $status $request_length $http_idempotency_key $server_protocol $connection';
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
        listen 127.0.0.1:{port} reuseport{listen_tls};
{tls}        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

NGINX_TLS = """        ssl_certificate {dir}/server.crt;
        ssl_certificate_key {dir}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:TLS:10m;
"""


def make_test_ca(d, host="127.0.0.1"):
    """A throwaway CA and a server certificate for `host` signed by it, made
    with openssl in directory d (EC P-256 keys, valid one day).  Returns
    the paths (ca.crt, server.crt, server.key); the certificates are
    world-readable (the postgres OS user reads ca.crt), the keys are not."""
    def run(*args):
        subprocess.run(["openssl"] + list(args), cwd=d, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=trace_ext bench CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=" + host)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName = IP:%s\nbasicConstraints = CA:FALSE\n"
                "extendedKeyUsage = serverAuth\n" % host)
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "server.ext")
    for name in ("ca.crt", "server.crt"):
        os.chmod(os.path.join(d, name), 0o644)
    return tuple(os.path.join(d, n) for n in ("ca.crt", "server.crt", "server.key"))


class Nginx:
    """nginx on 127.0.0.1: answers every request 200 "ok" (the body is
    read and dropped), keep-alive.  With log=True, one access-log line per
    request: '$msec $status $request_length $http_idempotency_key
    $server_protocol $connection' (the last is nginx's connection serial
    number: distinct values are connections).  tls=True: HTTPS with a certificate of a throwaway
    CA (self.ca_file, for trace.ca_file); http2=True also offers HTTP/2
    (ALPN h2; nginx 1.22 spells it on the listen line)."""

    def __init__(self, workers=1, log=True, tls=False, http2=False):
        self.dir = tempfile.mkdtemp(prefix="trace_bench_nginx_")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.tls = tls or http2
        self.http2 = http2
        self.ca_file = None
        self.access_path = os.path.join(self.dir, "access.log")
        access = "%s bench" % self.access_path if log else "off"
        tls_lines, listen_tls = "", ""
        if self.tls:
            self.ca_file = make_test_ca(self.dir)[0]
            tls_lines = NGINX_TLS.format(dir=self.dir)
            listen_tls = " ssl http2" if http2 else " ssl"
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(workers=workers, dir=self.dir, port=self.port,
                                      access=access, tls=tls_lines, listen_tls=listen_tls))

    def _cmd(self, *extra):
        # -e: the error log before the configuration is read (the
        # compiled-in /var/log/nginx may not exist).
        return [nginx_bin(), "-c", os.path.join(self.dir, "nginx.conf"), "-p", self.dir,
                "-e", os.path.join(self.dir, "error.log")] + list(extra)

    def start(self):
        subprocess.run(self._cmd("-g", "user root;"), check=True, stderr=subprocess.STDOUT)
        wait_until(lambda: os.path.exists(os.path.join(self.dir, "nginx.pid")), 10)
        return self

    def url(self, path="/hook"):
        return "%s://127.0.0.1:%d%s" % ("https" if self.tls else "http", self.port, path)

    def describe(self):
        if not self.tls:
            return "nginx, plain HTTP/1.1, return 200, keep-alive"
        return ("nginx, HTTPS (TLS 1.2/1.3, EC P-256 certificate of a throwaway CA), %s, "
                "return 200, keep-alive"
                % ("HTTP/2 offered by ALPN" if self.http2 else "HTTP/1.1 only"))

    def requests(self):
        """[(epoch seconds, status, idempotency key, protocol, connection
        serial)] from the access log."""
        out = []
        if not os.path.exists(self.access_path):
            return out
        with open(self.access_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    out.append((float(parts[0]), int(parts[1]), parts[3],
                                parts[4] if len(parts) > 4 else "?",
                                parts[5] if len(parts) > 5 else "?"))
        return out

    def stop(self):
        pidfile = os.path.join(self.dir, "nginx.pid")
        if os.path.exists(pidfile):
            subprocess.run(self._cmd("-s", "stop"), stderr=subprocess.DEVNULL)
            wait_until(lambda: not os.path.exists(pidfile), 10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a slow sink (node) -------------------------------------------------------

SLOW_SINK_JS = str(REPO / "bench" / "slow_sink.js")


def node_bin():
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found (bench/slow_sink.js needs it)")
    return node


class SlowSink:
    """bench/slow_sink.js on 127.0.0.1: answers every request 200 "ok"
    delay_ms after its body arrived, keep-alive; listen backlog `backlog`
    (node's default is 511).  stop() returns its counters (see the
    script): requests, connections, who closed them, peaks, per second."""

    def __init__(self, delay_ms=100, backlog=511):
        self.delay_ms = delay_ms
        self.backlog = backlog
        self.proc = None
        self.port = None

    def start(self):
        self.proc = subprocess.Popen([node_bin(), SLOW_SINK_JS, "serve", "--delay-ms",
                                      str(self.delay_ms), "--backlog", str(self.backlog)],
                                     stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        self.port = json.loads(line)["port"]
        return self

    def url(self, path="/hook"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def describe(self):
        return ("bench/slow_sink.js (node %s, http module, one process), 200 \"ok\" %d ms "
                "after each request's body, keep-alive, listen backlog %d"
                % (cmd_output([node_bin(), "-v"]), self.delay_ms, self.backlog))

    def stop(self):
        """Stop the sink; its counters (a dict), or None."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.proc = None
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None


def slow_sink_load(url, concurrency, n):
    """What the sink alone serves: bench/slow_sink.js's keep-alive load
    client with `concurrency` requests in flight, n requests; a dict with
    n, seconds, rps, errors, not_200."""
    out = subprocess.run([node_bin(), SLOW_SINK_JS, "load", "--url", url, "--concurrency",
                          str(concurrency), "--n", str(n)], stdout=subprocess.PIPE,
                         check=True).stdout
    return json.loads(out.decode().strip().splitlines()[-1])


def status_expr(cur):
    """A queue row's status as the views show it: from 1.6 a row being sent
    stays 'pending' in the table, leased in shared memory (trace._leased())."""
    cur.execute("SELECT to_regprocedure('trace._leased(bigint)') IS NOT NULL")
    if cur.fetchone()[0]:
        return "CASE WHEN status = 'pending' AND trace._leased(id) THEN 'sending' ELSE status END"
    return "status"


def queue_counts(cur):
    cur.execute("SELECT " + status_expr(cur) + ", count(*) FROM trace.trace_queue "
                "GROUP BY 1 ORDER BY 1")
    return dict(cur.fetchall())


def fmt_counts(counts):
    return ", ".join("%s %d" % kv for kv in sorted(counts.items())) or "empty"


def last_error_sample(cur):
    cur.execute("SELECT last_error, count(*) FROM trace.trace_queue "
                " WHERE last_error IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 3")
    return cur.fetchall()

