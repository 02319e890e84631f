#!/usr/bin/python3
"""A throwaway PostgreSQL 15 cluster for tests and the demo.

It lives in a fresh directory under /tmp (data directory, unix socket,
server log), listens on a free loopback port, and is always removed on
tear-down, whatever happened.  PostgreSQL refuses to run as root, so when
we are root every server-side command (initdb, pg_ctl) runs as the
`postgres` OS user through runuser; clients (psycopg2, psql) connect over
the unix socket with trust authentication.

It never touches the machine's own clusters, never binds anything but
127.0.0.1, and leaves nothing behind.

Every message a client of the cluster saw (errors raised by statements run
through a cursor of connect(), notices and warnings, psql's output) is kept
in Cluster.seen, so that a test can scan what reached the client for data
that must never leave the server (see trace_e2e's canary scan); and every
statement text the clients sent is kept in Cluster.sent, so that a scan
of the server log can tell the test's own statements (logged verbatim with
log_statement = all) from what the server wrote by itself.
"""

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psycopg2
import psycopg2.extensions

PG_BINDIR = os.environ.get("PG_BINDIR") or "/usr/lib/postgresql/15/bin"
OS_USER = "postgres"


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def conf_value(v):
    """A value as postgresql.conf / ALTER SYSTEM wants it."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "''") + "'"


_PSQL_MESSAGE = re.compile(r"^(psql:\S*:\d+: )?(ERROR|WARNING|NOTICE|INFO|LOG|DETAIL|HINT|"
                           r"CONTEXT|FATAL|PANIC|DEBUG\d?|STATEMENT|LINE \d+):")
_STATEMENT_ENTRY = re.compile(
    r"^\S+ \S+ \S+ \[\d+\] [\w ]+ (LOG:  (?:duration: [\d.]+ ms  )?(?:statement|"
    r"execute [^:]*|parse [^:]*|bind [^:]*): |STATEMENT:  )(.*)$", re.S)
_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class ClusterError(RuntimeError):
    pass


def describe_error(e):
    """Everything the server told the client about an error: message,
    detail, hint, context, the statement position."""
    parts = [str(e)]
    diag = getattr(e, "diag", None)
    if diag is not None:
        for f in ("message_primary", "message_detail", "message_hint", "context",
                  "internal_query", "schema_name", "table_name", "column_name",
                  "constraint_name"):
            v = getattr(diag, f, None)
            if v:
                parts.append("%s: %s" % (f, v))
    return "\n".join(parts)


class _SeenList(list):
    """conn.notices: still a list (tests slice it), and every notice is
    also appended to the cluster's record of what clients saw."""

    def __init__(self, sink):
        super().__init__()
        self._sink = sink

    def append(self, msg):
        self._sink.append(("notice", msg))
        super().append(msg)


def _recording_cursor(sink, sent):
    class RecordingCursor(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):
            try:
                text = self.mogrify(query, vars)
                sent.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
            except Exception:
                pass
            try:
                return super().execute(query, vars)
            except psycopg2.Error as e:
                sink.append(("error", describe_error(e)))
                raise

        def callproc(self, procname, parameters=None):
            try:
                return super().callproc(procname, parameters)
            except psycopg2.Error as e:
                sink.append(("error", describe_error(e)))
                raise
    return RecordingCursor


def _exit_on_signal(signum, frame):
    sys.exit(128 + signum)


def _install_cleanup_on_signals():
    """Make SIGTERM/SIGHUP (e.g. prove or CI giving up) unwind through
    finally blocks and atexit, so clusters are still torn down.  Leaves
    handlers someone else installed alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_on_signal)


class Cluster:
    """A temporary cluster.

        c = Cluster(settings={"trace.database": "trades"})
        c.init(); c.start()
        conn = c.connect("trades")
        ...
        c.destroy()          # or use it as a context manager

    settings: extra postgresql.conf settings (dict).  preload: put
    trace_ext in shared_preload_libraries.  debug: log_min_messages=debug1.
    server_env: extra environment variables for the server's commands
    (initdb, pg_ctl and so the postmaster), applied last, e.g. LD_PRELOAD
    and FAKETIME for libfaketime, or TZ (runuser passes them through).
    """

    def __init__(self, settings=None, preload=True, debug=False,
                 name="trace_e2e", port=None, server_env=None):
        self.settings = dict(settings or {})
        self.server_env = dict(server_env or {})
        self.preload = preload
        self.debug = debug
        self.port = port or free_port()
        self.base = tempfile.mkdtemp(prefix=name + "_", dir="/tmp")
        self.datadir = os.path.join(self.base, "data")
        self.sockdir = self.base
        self.log_path = os.path.join(self.base, "server.log")
        self.running = False
        self.seen = []          # (kind, text) of every message a client saw
        self.sent = []          # every statement text a client sent
        self._cursor_class = _recording_cursor(self.seen, self.sent)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            pw = pwd.getpwnam(OS_USER)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        os.chmod(self.base, 0o755)
        atexit.register(self.destroy)
        _install_cleanup_on_signals()

    # -- running commands -------------------------------------------------
    def _server_cmd(self, args):
        cmd = [os.path.join(PG_BINDIR, args[0])] + list(args[1:])
        if self._as_root:
            cmd = ["runuser", "-u", OS_USER, "--"] + cmd
        return cmd

    def run_server_cmd(self, args, timeout=120, check=True):
        env = dict(os.environ, TZ="UTC", LC_ALL="C", PGTZ="UTC")
        env.pop("PGDATA", None)
        env.update(self.server_env)
        p = subprocess.run(self._server_cmd(args), cwd=self.base, env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
        out = p.stdout.decode("utf-8", "replace")
        if check and p.returncode != 0:
            raise ClusterError("%s failed (%d):\n%s" % (" ".join(args[:2]),
                                                        p.returncode, out))
        return p.returncode, out

    # -- set up -----------------------------------------------------------
    def init(self):
        self.run_server_cmd(["initdb", "-D", self.datadir, "-U", "postgres",
                             "--auth=trust", "--encoding=UTF8", "--locale=C",
                             "--no-sync"])
        base = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": self.sockdir,
            "logging_collector": False,
            "log_line_prefix": "%m [%p] %b ",
            "log_min_messages": "debug1" if self.debug else "info",
            "timezone": "UTC",
            "log_timezone": "UTC",
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "max_connections": 40,
            "shared_buffers": "32MB",
        }
        if self.preload:
            base["shared_preload_libraries"] = "trace_ext"
        base.update(self.settings)
        self.set_conf(base, reload=False)
        return self

    def set_conf(self, settings, reload=True, conf_file="postgresql.conf"):
        """Append settings to postgresql.conf, or another file of the data
        directory (the last occurrence wins); reload a running server if
        asked."""
        lines = []
        for k, v in settings.items():
            if not _GUC_NAME.match(k):
                raise ValueError("bad setting name %r" % k)
            lines.append("%s = %s\n" % (k, conf_value(v)))
        with open(os.path.join(self.datadir, conf_file), "a") as f:
            f.write("\n# added by test/lib/cluster.py\n")
            f.writelines(lines)
        self.settings.update(settings)
        if reload and self.running:
            self.reload()

    # -- life cycle -------------------------------------------------------
    def start(self, timeout=60, overrides=None):
        """pg_ctl start and wait until it accepts connections.  overrides:
        settings passed as -c options for this start only."""
        args = ["pg_ctl", "-D", self.datadir, "-l", self.log_path, "-w",
                "-t", str(timeout)]
        if overrides:
            opts = " ".join("-c %s=%s" % (k, str(v).replace(" ", "\\ "))
                            for k, v in overrides.items())
            args += ["-o", opts]
        args.append("start")
        try:
            self.run_server_cmd(args, timeout=timeout + 30)
        except ClusterError as e:
            raise ClusterError("%s\n--- server log tail ---\n%s"
                               % (e, self.log_tail(40)))
        self.running = True
        return self

    def stop(self, mode="fast", timeout=60):
        """pg_ctl stop; returns the seconds it took."""
        t0 = time.time()
        self.run_server_cmd(["pg_ctl", "-D", self.datadir, "-m", mode, "-w",
                             "-t", str(timeout), "stop"], timeout=timeout + 30)
        self.running = False
        return time.time() - t0

    def restart(self, mode="fast", timeout=60):
        self.stop(mode=mode, timeout=timeout)
        return self.start(timeout=timeout)

    def reload(self, wait=True, settle=0.3):
        """pg_ctl reload.  With wait, return once the postmaster has logged
        that it re-read the files (it then signals its children), plus a
        short settle time for the children to take the signal."""
        before = self._count_log("received SIGHUP, reloading configuration files")
        self.run_server_cmd(["pg_ctl", "-D", self.datadir, "reload"])
        if wait:
            self._wait_sighup(before, settle)

    def _wait_sighup(self, before, settle, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._count_log("received SIGHUP, reloading configuration files") > before:
                time.sleep(settle)
                return
            time.sleep(0.05)
        raise ClusterError("server did not log a configuration reload")

    def alter_system(self, settings, reload=True, dbname="postgres", settle=0.3):
        """ALTER SYSTEM SET each setting (None means RESET), then
        pg_reload_conf() and wait for it as reload() does.  Errors from
        the server (check hooks) are raised as psycopg2 errors."""
        before = self._count_log("received SIGHUP, reloading configuration files")
        conn = self.connect(dbname)
        try:
            cur = conn.cursor()
            for k, v in settings.items():
                if not _GUC_NAME.match(k):
                    raise ValueError("bad setting name %r" % k)
                if v is None:
                    cur.execute("ALTER SYSTEM RESET %s" % k)
                else:
                    cur.execute("ALTER SYSTEM SET %s = %s" % (k, conf_value(v)))
            if reload:
                cur.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()
        if reload:
            self._wait_sighup(before, settle)

    # -- clients ----------------------------------------------------------
    def dsn(self, dbname="postgres", user="postgres"):
        return "host=%s port=%d dbname=%s user=%s" % (self.sockdir, self.port,
                                                     dbname, user)

    def connect(self, dbname="postgres", user="postgres", autocommit=True,
                retry_for=0.0):
        """A psycopg2 connection (autocommit by default).  retry_for:
        keep trying this many seconds (e.g. during crash recovery)."""
        deadline = time.time() + retry_for
        while True:
            try:
                conn = psycopg2.connect(self.dsn(dbname, user),
                                        application_name="trace_e2e",
                                        cursor_factory=self._cursor_class)
                break
            except psycopg2.OperationalError:
                if time.time() >= deadline:
                    raise
                time.sleep(0.1)
        conn.autocommit = autocommit
        conn.notices = _SeenList(self.seen)
        return conn

    def psql(self, sql=None, file=None, dbname="postgres", check=True):
        """Run psql (-X, ON_ERROR_STOP); returns (returncode, output)."""
        cmd = [os.path.join(PG_BINDIR, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
               "-h", self.sockdir, "-p", str(self.port), "-U", "postgres",
               "-d", dbname]
        if file:
            cmd += ["-f", file]
            try:
                with open(file, encoding="utf-8", errors="replace") as f:
                    self.sent.append(f.read())
            except OSError:
                pass
        if sql:
            cmd += ["-c", sql]
            self.sent.append(sql)
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120)
        out = p.stdout.decode("utf-8", "replace")
        # The server's messages (not query results, which the caller asked for).
        msgs = [ln for ln in out.splitlines() if _PSQL_MESSAGE.match(ln)]
        if msgs:
            self.seen.append(("psql", "\n".join(msgs)))
        if check and p.returncode != 0:
            raise ClusterError("psql failed (%d):\n%s" % (p.returncode, out))
        return p.returncode, out

    def create_database(self, name):
        conn = self.connect()
        try:
            conn.cursor().execute('CREATE DATABASE "%s"' % name.replace('"', '""'))
        finally:
            conn.close()

    # -- the server log ---------------------------------------------------
    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_text(self, since=0):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_bytes(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def log_tail(self, n=30):
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_entries(self, since=0):
        """The log as entries: a line with the log_line_prefix and the
        tab-indented lines that continue it, joined by newlines without
        the tabs (so a logged statement reads as it was sent)."""
        out = []
        for line in self.log_text(since).splitlines():
            if line.startswith("\t") and out:
                out[-1] += "\n" + line[1:]
            else:
                out.append(line)
        return out

    def own_statement(self, entry):
        """If a log entry is a statement a client of this Cluster sent,
        logged verbatim (log_statement, a STATEMENT: line after an error,
        log_min_duration_statement), return its text; else None."""
        m = _STATEMENT_ENTRY.search(entry)
        if not m:
            return None
        text = m.group(2).strip()
        if text and any(text in sent for sent in self.sent):
            return text
        return None

    def _count_log(self, needle):
        return self.log_text().count(needle)

    def wait_for_log(self, pattern, since=0, timeout=10):
        """Wait until a regex matches the log written after offset `since`;
        returns the match or None at the deadline."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        while True:
            m = rx.search(self.log_text(since))
            if m or time.time() >= deadline:
                return m
            time.sleep(0.05)

    # -- tear-down --------------------------------------------------------
    def destroy(self):
        """Stop the server (immediately) and remove the directory; safe to
        call more than once and whatever state things are in."""
        if self.base is None:
            return
        try:
            if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                self.run_server_cmd(["pg_ctl", "-D", self.datadir, "-m",
                                     "immediate", "-w", "-t", "30", "stop"],
                                    check=False, timeout=60)
        except Exception:
            pass
        self.running = False
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
