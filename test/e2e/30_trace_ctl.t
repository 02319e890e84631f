#!/usr/bin/python3
"""trace_ctl, the monitoring client (README, trace_ctl), against a real
cluster and its worker, run as a role that is only a member of pg_monitor
(which may not read trace.trace_queue).

- --version prints trace_ext.control's version, --help and each command's
  --help exit 0; a bad option exits 3 for status (UNKNOWN), 2 for watch.
- status, healthy: exit 0, a Nagios status line with the performance data,
  the same with the connection as a conninfo string, a URI, and PGHOST,
  PGPORT, PGDATABASE, PGUSER; --json parses, and its numbers are what SQL
  says.
- trace.paused on: exit 1; rows pending while paused, overdue past a tiny
  --critical-age: exit 2, --json numbers equal the views'; resumed: 0.
- a tracker's breaker open (503s): exit 1; closed again: 0.
- watch (text and --json) prints a row abandoned by a 422 as one line as
  it arrives; status: exit 1 with "1 row abandoned (webhook)", 2 with
  --critical-abandoned=1.
- the server stopped for 3 s, then started: each watch says it lost the
  connection, retries after 0.5, 1 and 2 s, says it is back, and prints
  an alert raised after the restart; SIGTERM (SIGINT) stops it with exit
  0 at once.
- exit 3: an unreachable port, a database without the extension, a role
  that is not a member of pg_monitor; watch exits 1 when it cannot
  connect at start.
- a streaming standby (no worker in recovery): exit 0, noted "standby".
- no worker running (max_worker_processes = 0 leaves trace.workers = 1
  unstarted): exit 2."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import cluster  # noqa: E402
from standby import Standby  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DB, TraceEnv, ext_version, free_port  # noqa: E402


def bindir():
    """Where trace_ctl is installed: PG_BINDIR (as for the clusters), else
    pg_config --bindir."""
    if os.environ.get("PG_BINDIR"):
        return os.environ["PG_BINDIR"]
    pg_config = shutil.which("pg_config") or os.path.join(cluster.PG_BINDIR, "pg_config")
    try:
        return subprocess.run([pg_config, "--bindir"], stdout=subprocess.PIPE,
                              check=True).stdout.decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return cluster.PG_BINDIR


TRACE_CTL = os.path.join(bindir(), "trace_ctl")
ROLE = "trace_ctl_monitor"
BOTH = ("myfxbook", "webhook")

t = Tap()
if not os.access(TRACE_CTL, os.X_OK):
    t.fail("trace_ctl is installed", "%s is missing: make install first" % TRACE_CTL)
    sys.exit(t.done())

env = TraceEnv.start_or_exit(t, name="trace_e2e_trace_ctl")
watchers = []


def client_env(extra=None):
    """The environment of a trace_ctl run: none of the caller's PG*."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    e.update(extra or {})
    return e


def conninfo(dbname=DB, user=ROLE):
    return "host=%s port=%d dbname=%s user=%s" % (env.cluster.sockdir, env.cluster.port,
                                                   dbname, user)


def ctl(*args, extra_env=None, timeout=30):
    p = subprocess.run([TRACE_CTL] + list(args), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=client_env(extra_env), timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def status(*args, **kw):
    """trace_ctl status as the pg_monitor role: (rc, first line, output)."""
    rc, out, err = ctl("status", *(list(args) + [conninfo()]), **kw)
    return rc, (out.splitlines() or [""])[0], out + err


def status_json(*args):
    rc, out, err = ctl("status", "--json", *(list(args) + [conninfo()]))
    try:
        return rc, json.loads(out), out + err
    except ValueError:
        return rc, None, out + err


class Watcher:
    """trace_ctl watch in the background, its lines collected as they come."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([TRACE_CTL, "watch"] + list(args) + [conninfo()],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=client_env())
        self.out, self.err = [], []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()
        watchers.append(self)

    @staticmethod
    def _read(stream, sink):
        for line in iter(stream.readline, b""):
            sink.append(line.decode("utf-8", "replace").rstrip("\n"))

    def alerts(self, trade_id):
        """The lines printed for trade_id's alerts (the payload as text, or
        --json's object, parsed)."""
        out = []
        for ln in list(self.out):
            try:
                alert = (json.loads(ln).get("alert") if ln.startswith("{")
                         else json.loads(ln.split(" ", 2)[2]))
            except (ValueError, IndexError, AttributeError):
                continue
            if isinstance(alert, dict) and alert.get("trade_id") == trade_id:
                out.append(ln)
        return out

    def wait_err(self, text, timeout=15, after=0):
        return wait_until(lambda: any(text in ln for ln in self.err[after:]), timeout)

    def stop(self, sig=signal.SIGTERM, timeout=5):
        """Signal it; (exit status, seconds it took) or (None, timeout)."""
        t0 = time.time()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None, timeout
        return rc, time.time() - t0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def backlog():
    return {r["adapter"]: r for r in env.sqld(
        "SELECT adapter, pending, sending, abandoned, oldest_due_at, "
        "floor(extract(epoch FROM now() - oldest_due_at))::bigint AS overdue "
        "FROM trace.queue_backlog")}


def check_json_numbers(doc, label):
    """--json's queue, totals and workers against the views, read as the
    superuser right after it."""
    b = backlog()
    if not t.ok(doc is not None, "%s: --json is one JSON object" % label):
        return
    got = {q["adapter"]: q for q in doc["queue"]}
    t.is_(sorted(got), sorted(b), "%s: one queue entry per adapter of trace.queue_backlog" % label)
    t.is_({a: (q["pending"], q["sending"], q["abandoned"]) for a, q in got.items()},
          {a: (r["pending"], r["sending"], r["abandoned"]) for a, r in b.items()},
          "%s: pending, sending, abandoned per adapter equal the view's" % label)
    t.is_({a: q["oldest_due_at"] and datetime.fromisoformat(q["oldest_due_at"])
           for a, q in got.items()},
          {a: r["oldest_due_at"] for a, r in b.items()},
          "%s: oldest_due_at per adapter equals the view's" % label)
    tot = doc["totals"]
    t.is_((tot["pending"], tot["sending"], tot["abandoned"]),
          tuple(sum(r[k] for r in b.values()) for k in ("pending", "sending", "abandoned")),
          "%s: totals are the sums" % label)
    over = max([max(r["overdue"], 0) for r in b.values() if r["overdue"] is not None] or [0])
    t.ok(abs(tot["oldest_overdue_seconds"] - over) <= 2,
         "%s: oldest_overdue_seconds is now() - the oldest due_at (%d, SQL %d)"
         % (label, tot["oldest_overdue_seconds"], over))
    pids = sorted(r[0] for r in env.sql("SELECT pid FROM trace.worker_status"))
    t.is_(sorted(w["pid"] for w in doc["workers"]), pids,
          "%s: workers are trace.worker_status's" % label)
    t.is_(tot["workers"], len(pids), "%s: totals.workers counts them" % label)
    t.is_({h["adapter"]: h["state"] for h in doc["trackers"]},
          dict(env.sql("SELECT adapter, state FROM trace.tracker_health")),
          "%s: trackers' states are trace.tracker_health's" % label)


try:
    with t.case("--version, --help, bad options"):
        rc, out, _ = ctl("--version")
        t.is_((rc, out), (0, "trace_ctl (trace_ext) %s\n" % ext_version()),
              "--version: trace_ctl (trace_ext) <default_version of trace_ext.control>, exit 0")
        for args in (["--help"], ["status", "--help"], ["watch", "--help"]):
            rc, out, _ = ctl(*args)
            t.ok(rc == 0 and "Exit status" in out and "status" in out and "watch" in out,
                 "%s: the usage, exit 0" % " ".join(args), out)
        rc, out, err = ctl("status", "--no-such-option")
        t.ok(rc == 3 and "--help" in err, "status with a bad option: exit 3 (UNKNOWN), a hint",
             out + err)
        rc, out, err = ctl("status", "--critical-age=soon")
        t.ok(rc == 3 and "--critical-age" in err, "status --critical-age=soon: exit 3", out + err)
        rc, out, err = ctl("watch", "--no-such-option")
        t.ok(rc == 2 and "--help" in err, "watch with a bad option: exit 2", out + err)

    with t.case("healthy, as a member of pg_monitor"):
        env.sql("CREATE ROLE %s LOGIN IN ROLE pg_monitor" % ROLE)
        t.is_(env.sql1("SELECT has_table_privilege(%s, 'trace.trace_queue', 'SELECT')",
                       (ROLE,)), False, "the role may not read trace.trace_queue")
        rc, first, out = status()
        t.is_(rc, 0, "exit 0 (OK)", out)
        perf = "| pending=0 sending=0 abandoned=0 oldest_overdue_seconds=0 workers=1"
        t.ok(first.startswith("TRACE_EXT OK - ") and first.endswith(perf),
             "a Nagios status line with the performance data", first)
        t.ok("Queue (trace.queue_backlog)" in out and "Workers (trace.worker_status)" in out
             and "Trackers (trace.tracker_health)" in out, "then the three tables", out)
        uri = "postgresql://%s@127.0.0.1:%d/%s?application_name=ctl_uri" % (
            ROLE, env.cluster.port, DB)
        rc, out, err = ctl("status", uri)
        t.ok(rc == 0 and out.startswith("TRACE_EXT OK"), "a URI (TCP): exit 0", out + err)
        rc, out, err = ctl("status", "-d", conninfo())
        t.ok(rc == 0 and out.startswith("TRACE_EXT OK"), "-d conninfo: exit 0", out + err)
        rc, out, err = ctl("status", extra_env={
            "PGHOST": env.cluster.sockdir, "PGPORT": str(env.cluster.port),
            "PGDATABASE": DB, "PGUSER": ROLE})
        t.ok(rc == 0 and out.startswith("TRACE_EXT OK"),
             "no argument, PGHOST/PGPORT/PGDATABASE/PGUSER: exit 0", out + err)
        rc, doc, out = status_json()
        t.ok(rc == 0 and doc and doc["status"] == "OK" and doc["exit_code"] == 0
             and doc["reasons"] == [], "--json: status OK, exit_code 0, no reason", out)
        check_json_numbers(doc, "healthy --json")

    with t.case("paused: WARNING; overdue: CRITICAL"):
        env.set_gucs({"trace.paused": "on"})
        rc, first, out = status()
        t.is_(rc, 1, "trace.paused on: exit 1 (WARNING)", out)
        t.ok(first.startswith("TRACE_EXT WARNING - trace.paused is on"),
             "the status line says why", first)
        held = [env.new_trade(signal_id=10) for _ in range(2)]
        for tid in held:
            env.close_trade(tid)
        t.ok(wait_until(lambda: (backlog()["webhook"]["overdue"] or 0) >= 2, 10),
             "4 rows pending, the oldest 2 s overdue")
        rc, first, out = status("--critical-age=1")
        t.is_(rc, 2, "--critical-age=1: exit 2 (CRITICAL)", out)
        t.ok(first.startswith("TRACE_EXT CRITICAL - oldest pending row ")
             and "overdue (myfxbook, webhook); trace.paused is on |" in first
             and " pending=4 " in first,
             "every reason, the worst first, and the performance data", first)
        rc, first, out = status("--warning-age=1s", "--critical-age=1h")
        t.ok(rc == 1 and "overdue" in first, "--warning-age=1s: exit 1 with the overdue reason",
             out)
        rc, doc, out = status_json("--critical-age=1")
        t.ok(rc == 2 and doc and doc["status"] == "CRITICAL"
             and [r["status"] for r in doc["reasons"]] == ["CRITICAL", "WARNING"],
             "--json: CRITICAL, with both reasons", out)
        check_json_numbers(doc, "paused --json")
        env.set_gucs({"trace.paused": "off"})
        t.ok(all(env.wait_status(tid, BOTH, "delivered", 15) for tid in held),
             "resumed: the rows are delivered")
        rc, first, out = status()
        t.is_(rc, 0, "then exit 0 again", out)

    with t.case("a tracker's breaker open: WARNING"):
        env.sink.set_behaviour(env.paths["myfxbook"], default=503)
        failing = [env.new_trade(signal_id=10) for _ in range(3)]
        for tid in failing:
            env.close_trade(tid)
        t.ok(wait_until(lambda: env.sql1("SELECT state FROM trace.tracker_health "
                                         "WHERE adapter = 'myfxbook'") != "closed", 15),
             "503s open myfxbook's breaker")
        rc, first, out = status()
        t.ok(rc == 1 and ("tracker myfxbook breaker open" in first
                          or "tracker myfxbook breaker half_open" in first),
             "exit 1, the status line names the tracker", out)
        env.sink.set_behaviour(env.paths["myfxbook"], default=200)
        t.ok(all(env.wait_status(tid, BOTH, "delivered", 20) for tid in failing),
             "answering again: delivered")
        t.ok(wait_until(lambda: status()[0] == 0, 10), "then exit 0 again")

    with t.case("watch: an abandoned row's alert as one line; status WARNING"):
        w_text = Watcher()
        w_json = Watcher("--json")
        for w, label in ((w_text, "text"), (w_json, "--json")):
            t.ok(w.wait_err('listening on trace_alert in database "%s"' % DB),
                 "watch %s: listening (stderr)" % label, "\n".join(w.err))
        env.sink.set_behaviour("/r422", default=422)
        env.point("webhook", "/r422")
        tid = env.new_trade(signal_id=10)
        env.close_trade(tid)
        rows = env.wait_status(tid, "webhook", "abandoned", 10)
        t.is_(rows.get("webhook", {}).get("attempts"), 1, "422: abandoned at once")
        t.ok(wait_until(lambda: w_text.alerts(tid) and w_json.alerts(tid), 10),
             "each watch printed the alert")
        lines = w_text.alerts(tid)
        parts = lines[0].split(" ", 2) if lines else ["", "", "{}"]
        alert = json.loads(parts[2])
        t.ok(len(lines) == 1 and parts[1] == "trace_alert" and alert.get("adapter") == "webhook"
             and alert.get("attempts") == 1, "text: one line, <received time> trace_alert "
             "<payload>", repr(w_text.out))
        t.ok(datetime.fromisoformat(parts[0].replace("Z", "+00:00")).tzinfo is not None,
             "... the received time in ISO 8601 (UTC)", repr(lines))
        lines = w_json.alerts(tid)
        obj = json.loads(lines[0]) if lines else {}
        t.ok(len(lines) == 1 and obj.get("channel") == "trace_alert"
             and json.loads(obj.get("payload", "null")) == obj.get("alert")
             and obj["alert"].get("adapter") == "webhook"
             and "received_at" in obj and obj.get("sender_pid") in env.worker_pids(),
             "--json: one object, the original payload, parsed, received time, sender",
             repr(w_json.out))
        rc, first, out = status()
        t.is_(rc, 1, "status: exit 1 (WARNING)", out)
        t.ok(first.startswith("TRACE_EXT WARNING - 1 row abandoned (webhook) |")
             and " abandoned=1 " in first, "the status line: 1 row abandoned (webhook)", first)
        rc, first, out = status("--critical-abandoned=1")
        t.is_(rc, 2, "--critical-abandoned=1: exit 2", out)
        rc, first, out = status("--warning-abandoned=0")
        t.is_(rc, 0, "--warning-abandoned=0 turns the rule off: exit 0", out)
        rc, doc, out = status_json()
        t.ok(rc == 1 and doc and doc["reasons"] == [
            {"status": "WARNING", "message": "1 row abandoned (webhook)"}],
            "--json: WARNING, the reason", out)
        check_json_numbers(doc, "abandoned --json")

    with t.case("watch survives a server restart"):
        n_err = [len(w.err) for w in (w_text, w_json)]
        env.cluster.stop()
        for (w, label), n in zip(((w_text, "text"), (w_json, "--json")), n_err):
            t.ok(w.wait_err("connection lost", 10, n), "%s: says it lost the connection" % label,
                 "\n".join(w.err))
        time.sleep(3)           # down this long: the backoff is what is measured
        env.cluster.start()
        for (w, label), n in zip(((w_text, "text"), (w_json, "--json")), n_err):
            t.ok(w.wait_err("connection back after", 20, n),
                 "%s: reconnects and says it is back" % label, "\n".join(w.err))
            waits = [ln.split("reconnecting in ")[1] for ln in w.err[n:]
                     if "reconnecting in " in ln]
            t.is_(waits[:3], ["0.5 s", "1.0 s", "2.0 s"],
                  "%s: failed attempts back off 0.5 s, doubling" % label, "\n".join(w.err))
        env.reconnect()
        t.ok(wait_until(env.worker_pid, 20), "the worker is back")
        tid2 = env.new_trade(signal_id=10)
        env.close_trade(tid2)
        t.ok(env.wait_status(tid2, "webhook", "abandoned", 10),
             "a row abandoned after the restart")
        t.ok(wait_until(lambda: w_text.alerts(tid2) and w_json.alerts(tid2), 10),
             "each watch printed its alert")
        t.is_(len(w_text.alerts(tid2)), 1, "text: the new alert, one line", repr(w_text.out))
        t.is_(len(w_json.alerts(tid2)), 1, "--json: the new alert, one line", repr(w_json.out))
        for w, sig, label in ((w_text, signal.SIGTERM, "text: SIGTERM"),
                              (w_json, signal.SIGINT, "--json: SIGINT")):
            rc, took = w.stop(sig)
            t.ok(rc == 0 and took < 2, "%s stops it, exit 0, at once (%.2f s)"
                 % (label, took), "exit %r\n%s" % (rc, "\n".join(w.err)))

    with t.case("UNKNOWN: unreachable, no extension, no privilege"):
        port = free_port()
        rc, out, err = ctl("status", "host=127.0.0.1 port=%d dbname=%s" % (port, DB))
        t.ok(rc == 3 and out.startswith("TRACE_EXT UNKNOWN - cannot connect:"),
             "an unreachable port: exit 3, cannot connect", out + err)
        rc, out, err = ctl("status", "--json", "host=127.0.0.1 port=%d" % port)
        doc = json.loads(out) if out.strip() else None
        t.ok(rc == 3 and doc and doc["status"] == "UNKNOWN" and doc["exit_code"] == 3,
             "... --json too", out + err)
        rc, out, err = ctl("watch", "host=127.0.0.1 port=%d" % port)
        t.ok(rc == 1 and out == "" and "Connection refused" in err,
             "watch, unreachable at start: exit 1, the reason on stderr", out + err)
        env.cluster.create_database("noext")
        rc, out, err = ctl("status", conninfo(dbname="noext"))
        t.ok(rc == 3 and out.startswith(
            'TRACE_EXT UNKNOWN - trace_ext is not installed in database "noext"'),
            "a database without the extension: exit 3, says so", out + err)
        env.sql("CREATE ROLE trace_ctl_nobody LOGIN")
        rc, out, err = ctl("status", conninfo(user="trace_ctl_nobody"))
        t.ok(rc == 3 and "permission denied" in out and "pg_monitor" in out,
             "a role outside pg_monitor: exit 3, permission denied, names pg_monitor",
             out + err)

    with t.case("a standby: no worker by design, OK with a note"):
        standby = Standby(env.cluster, name="trace_e2e_trace_ctl_standby")
        standby.init()
        standby.start()
        t.ok(standby.wait_streaming(60) and standby.in_recovery(), "a streaming standby")
        rc, out, err = ctl("status", "--warning-abandoned=0",
                           "host=%s port=%d dbname=%s user=%s"
                           % (standby.sockdir, standby.port, DB, ROLE))
        first = (out.splitlines() or [""])[0]
        t.ok(rc == 0 and first.startswith("TRACE_EXT OK - ")
             and "standby: no worker runs during recovery" in first
             and first.endswith(" workers=0"),
             "exit 0, noted standby, 0 workers (abandoned rule off: the replicated rows)",
             out + err)
        standby.destroy()

    with t.case("no worker running: CRITICAL"):
        env.cluster.alter_system({"max_worker_processes": 0}, dbname=DB, reload=False)
        env.cluster.restart()
        env.reconnect()
        t.is_(env.worker_pids(), [], "max_worker_processes = 0: no worker started")
        rc, first, out = status()
        t.is_(rc, 2, "exit 2 (CRITICAL)", out)
        t.ok(first.startswith("TRACE_EXT CRITICAL - no worker running (trace.workers = 1)")
             and first.endswith(" workers=0"), "the status line says so", first)
        t.ok("(no worker running)" in out, "the workers table too", out)
finally:
    for w in watchers:
        w.kill()
    env.close()

sys.exit(t.done())
