#!/usr/bin/python3
"""Crashes and concurrency, end to end: nothing is lost, nothing is sent
twice in the normal path, and no snapshot is held across the network.

- A tracker down for a long time: 50,000 rows (25,000 trades, two
  trackers) back up while it refuses connections, then answers 503; then
  it comes back.  Every row is delivered under its own Idempotency-Key,
  and the worker's memory and open files, sampled throughout, stay flat
  (the bounds are explained at class Sampler).
- kill -9 of the worker 10 times, at random points, while 1,000 rows (500
  trades, two trackers) go to a slow tracker (20-50 ms per answer): every
  row ends delivered, every (trade, adapter) reached its tracker, every
  repeat carries the same Idempotency-Key, and the postmaster restarted
  all backends exactly once per kill (a bgworker killed by a signal is a
  crash to PostgreSQL) and never because a worker died by itself.
- pg_ctl stop -m immediate with 1,000 rows queued and some leased: after
  the restart no lease of the dead worker is left (shared memory is new), all rows are
  delivered, nothing already recorded delivered is sent again, and
  repeats carry the same key.
- trace.workers = 3 and a burst of 5,000 rows to a fast tracker: all three
  workers claimed rows, yet every row was claimed once (attempts = 1) and
  every (trade, adapter) got exactly one request.
- Two sessions running the worker's own claim statement (read from
  src/queue.c) at once, one inside an open transaction: disjoint rows, no
  waiting; and the claim is a lock, not an update (no row gets a new
  version: the lease is in shared memory, lease.c).
- While requests hang at a tracker, no worker holds a snapshot or a
  transaction (pg_stat_activity: backend_xmin and backend_xid NULL, state
  idle), and VACUUM removes the queue rows deleted meanwhile; a control
  session holding a snapshot shows that the check would see one.

synchronous_commit is on: with it off, PostgreSQL itself may lose the last
commits in a crash, which is not what these tests are about."""

import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from capture_server import CaptureServer  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv, free_port  # noqa: E402

t = Tap()
# Every row is tried at a failing tracker: its breaker (tests 24, 25) is off.
env = TraceEnv.start_or_exit(t, gucs={"synchronous_commit": "on",
                                      "trace.breaker_threshold": 0,
                                      "trace.max_retries": 100,
                                      "trace.http_timeout": "3000ms",
                                      "trace.retry_backoff_cap": "2s"},
                             name="trace_e2e_crash")

BOTH = ("myfxbook", "webhook")
REINIT = "all server processes terminated; reinitializing"
TERMINATING = "terminating any other active server processes"
READY = "database system is ready to accept connections"
_next_id = [2_000_000]


def forget_trades(lo, hi):
    """Delete trades lo..hi once their case has checked them (their queue
    rows stay).  The trade store stays small, so that the canary scan at
    close (TRACE_E2E_CANARY) does not search every request and log line
    for tens of thousands of values; every personal value carries its
    column's marker, which the scan still looks for."""
    env.sql("DELETE FROM trades WHERE trade_id BETWEEN %s AND %s", (lo, hi))


def bulk_close(n, signal_id=10, chunk=None, first=None):
    """Insert n OPEN trades of user 1 (opted in) and close them, in one
    UPDATE (or in UPDATEs of `chunk` trades); returns their ids (from
    `first`, else the next unused)."""
    if first is None:
        first = _next_id[0]
        _next_id[0] = first + n
    last = first + n - 1
    env.add_trades(first, last, signal_id=signal_id)
    step = chunk or n
    for lo in range(first, last + 1, step):
        env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912,
                          closed_at = now(), pnl = 10, fees = 1
                    WHERE trade_id BETWEEN %s AND %s""", (lo, min(last, lo + step - 1)))
    return list(range(first, last + 1))


def status_counts(lo, hi):
    """Rows by status as the views show it (a leased row: 'sending')."""
    return dict(env.sql("SELECT " + env.status_sql() + ", count(*) FROM trace.trace_queue "
                        "WHERE trade_id BETWEEN %s AND %s GROUP BY 1", (lo, hi)))


def wait_all_delivered(lo, hi, expect, timeout):
    def probe():
        try:
            c = status_counts(lo, hi)
        except psycopg2.Error:
            env.reconnect(retry_for=30)
            return False
        return c.get("delivered", 0) == expect and sum(c.values()) == expect
    return wait_until(probe, timeout, 0.25)


def audit(paths, lo, hi, expected):
    """Requests at `paths` (path -> adapter) for trades lo..hi: a dict
    (trade, adapter) -> requests, and a list of problems (a request for an
    unexpected pair, or whose Idempotency-Key is not <trade_id>-<adapter>
    of its own body and path)."""
    seen, bad = {}, []
    for path, adapter in paths.items():
        for r in env.sink.requests(path):
            body = r.json() or {}
            tid = body.get("trade_id")
            if not isinstance(tid, int) or not lo <= tid <= hi:
                continue
            key = (tid, adapter)
            if key not in expected:
                bad.append("request #%d for an unexpected pair %r" % (r.seq, key))
                continue
            if r.header("Idempotency-Key") != "%d-%s" % key:
                bad.append("request #%d for %r has Idempotency-Key %r"
                           % (r.seq, key, r.header("Idempotency-Key")))
            seen.setdefault(key, []).append(r)
    return seen, bad


def slow_script(n):
    """n answers, each 200 after a random 20-50 ms."""
    return ["delay:%.3f" % random.uniform(0.020, 0.050) for _ in range(n)]


def wait_ready_after(since, timeout=90):
    """The postmaster reinitialised after log offset `since` and is
    accepting connections again."""
    rx = re.compile(re.escape(REINIT) + r".*" + re.escape(READY), re.S)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rx.search(env.cluster.log_text(since)):
            return True
        time.sleep(0.1)
    return False


class Sampler:
    """Memory and open files of one process, every 0.25 s, in a thread:
    VmRSS, RssAnon, RssShmem (kB) and its fds by kind (sockets; event fds:
    epoll, eventfd, pipes; files).

    The bounds the backlog case applies, and why.  Memory: a worker that
    kept anything per attempt (a curl handle, a header list, a response
    buffer, a payload in a long-lived context) would grow with the 100,000+
    attempts made there; < 20 MB of growth allows under ~200 bytes per
    attempt.  VmRSS also counts the pages of shared_buffers (32 MB) the
    worker touches, which is no leak: the private part, RssAnon and
    VmRSS - RssShmem, is what is bounded.  Sockets: at most
    trace.batch_size transfers run at once, one connection each, and
    libcurl's connection cache may keep a few more alive.  Event fds: a
    wait set or a pipe per pass would pile up; a few may come and go.
    Files: PostgreSQL opens a relation's files once and keeps them (its
    own cache, capped by max_files_per_process), so a few more appear as
    the worker touches more relations; they are reported, bounded loosely."""

    def __init__(self, pid):
        self.pid = pid
        self.samples = []           # dicts
        self.phase = "idle"
        self.gone = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def take(self):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                st = dict(line.split(":", 1) for line in f if ":" in line)
            kinds = {"sockets": 0, "events": 0, "files": 0}
            fddir = "/proc/%d/fd" % self.pid
            for fd in os.listdir(fddir):
                try:
                    target = os.readlink(os.path.join(fddir, fd))
                except OSError:
                    continue
                if target.startswith("socket:"):
                    kinds["sockets"] += 1
                elif target.startswith(("anon_inode:", "pipe:")):
                    kinds["events"] += 1
                else:
                    kinds["files"] += 1
        except (FileNotFoundError, ProcessLookupError):
            self.gone = True
            return None

        def kb(name):
            return int(st[name].split()[0])
        s = dict(kinds, time=time.time(), phase=self.phase, vmrss=kb("VmRSS"),
                 anon=kb("RssAnon"), shmem=kb("RssShmem"),
                 fds=sum(kinds.values()))
        s["private"] = s["vmrss"] - s["shmem"]
        self.samples.append(s)
        return s

    def _run(self):
        while not self._stop.is_set():
            self.take()
            self._stop.wait(0.25)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)


tracker = None
try:
    with t.case("a tracker down for a long time: 50,000 rows back up, then it returns"):
        ROWS, FIRST = 50_000, 5_000_000
        port = free_port()                  # nothing listens there yet
        paths = {"/b-mfx": "myfxbook", "/b-wh": "webhook"}
        # Short backoff, and enough retries that nothing is abandoned.
        env.set_gucs({"trace.myfxbook_webhook_url": "http://127.0.0.1:%d/b-mfx" % port,
                      "trace.webhook_endpoint": "http://127.0.0.1:%d/b-wh" % port,
                      "trace.retry_backoff_base": "500ms", "trace.retry_backoff_cap": "3s"})
        batch = int(env.sql1("SHOW trace.batch_size"))
        pid = env.worker_pid()
        sampler = Sampler(pid)
        idle = sampler.take()
        sampler.start()

        def backlog_counts():
            return dict(env.sql("SELECT status, count(*) FROM trace.trace_queue "
                                "WHERE trade_id >= %s GROUP BY status", (FIRST,)))

        sampler.phase = "refused"
        t0 = time.time()
        bulk_close(ROWS // 2, signal_id=10, first=FIRST)
        t.is_(sum(backlog_counts().values()), ROWS, "25,000 trades closed: 50,000 rows queued")
        tried = wait_until(lambda: env.sql1("SELECT min(attempts) FROM trace.trace_queue "
                                            "WHERE trade_id >= %s", (FIRST,)) >= 2, 240, 0.5)
        errs = env.sql("SELECT last_error, count(*) FROM trace.trace_queue "
                       "WHERE trade_id >= %s GROUP BY 1 ORDER BY 2 DESC LIMIT 3", (FIRST,))
        t.ok(tried, "the tracker refuses connections: every row was tried and retried "
             "(%.0f s)" % (time.time() - t0), repr(errs))
        t.ok(errs and all("connect" in (e or "").lower() for e, _ in errs),
             "... and failed with a connection error", repr(errs))

        sampler.phase = "503"
        tracker = CaptureServer(port=port, default=503).start()
        got = tracker.wait_for(lambda rs: len(rs) >= 20_000, 120)
        c = backlog_counts()
        t.ok(got and c.get("delivered", 0) == 0 and c.get("abandoned", 0) == 0,
             "then it answers 503: 20,000 requests refused, nothing delivered or abandoned",
             repr(c))

        sampler.phase = "back"
        n503 = len(tracker.requests())
        for p in paths:
            tracker.set_behaviour(p, default=200)
        t0 = time.time()
        done = wait_until(lambda: backlog_counts() == {"delivered": ROWS}, 300, 1.0)
        t.ok(done, "it comes back: all 50,000 rows delivered (%.0f s)" % (time.time() - t0),
             lambda: repr(backlog_counts()))
        seen, bad = {}, []
        for p, adapter in paths.items():
            for r in tracker.requests(p):
                if r.response is None or r.response["status"] != 200:
                    continue
                tid = (r.json() or {}).get("trade_id")
                if r.header("Idempotency-Key") != "%s-%s" % (tid, adapter):
                    bad.append("request #%d: Idempotency-Key %r for trade %r"
                               % (r.seq, r.header("Idempotency-Key"), tid))
                seen[(tid, adapter)] = seen.get((tid, adapter), 0) + 1
        expected = {(x, a) for x in range(FIRST, FIRST + ROWS // 2) for a in BOTH}
        t.ok(set(seen) == expected and not bad,
             "every (trade, adapter) got a 200, under its own Idempotency-Key",
             "%d pairs missing\n%s" % (len(expected - set(seen)), "\n".join(bad[:10])))
        attempts = env.sql1("SELECT sum(attempts) FROM trace.trace_queue "
                            "WHERE trade_id >= %s", (FIRST,))
        t.diag("%d attempts in all; %d answered 503; %d requests after the return"
               % (attempts, n503, len(tracker.requests()) - n503))
        tracker.stop()
        tracker = None

        time.sleep(1.0)
        sampler.stop()
        busy = [x for x in sampler.samples if x["phase"] != "idle"]
        t.ok(not sampler.gone and env.worker_pid() == pid and len(busy) > 50,
             "the same worker process ran throughout (%d samples)" % len(busy))
        for ph in ("refused", "503", "back"):
            xs = [x for x in busy if x["phase"] == ph]
            if xs:
                t.diag("%-7s %3d samples: RssAnon %d..%d kB, VmRSS %d..%d kB, sockets %d..%d, "
                       "event fds %d..%d, files %d..%d" % (
                           ph, len(xs), min(x["anon"] for x in xs), max(x["anon"] for x in xs),
                           min(x["vmrss"] for x in xs), max(x["vmrss"] for x in xs),
                           min(x["sockets"] for x in xs), max(x["sockets"] for x in xs),
                           min(x["events"] for x in xs), max(x["events"] for x in xs),
                           min(x["files"] for x in xs), max(x["files"] for x in xs)))
        first = busy[0]
        for key, label in (("anon", "RssAnon"), ("private", "VmRSS - RssShmem")):
            hi_ = max(x[key] for x in busy)
            t.ok(hi_ - first[key] < 20 * 1024,
                 "worker memory flat: %s grew by < 20 MB (first %d kB, max %d kB)"
                 % (label, first[key], hi_))
        t.diag("VmRSS %d..%d kB, shared_buffers pages touched included"
               % (min(x["vmrss"] for x in busy), max(x["vmrss"] for x in busy)))
        socks = max(x["sockets"] for x in busy)
        t.ok(socks <= idle["sockets"] + batch + 10,
             "sockets never above idle (%d) + trace.batch_size (%d) + 10: max %d"
             % (idle["sockets"], batch, socks))
        events = max(x["events"] for x in busy)
        t.ok(events <= idle["events"] + 4,
             "event fds (epoll, eventfd, pipes) flat: idle %d, max %d" % (idle["events"], events))
        files = max(x["files"] for x in busy)
        t.ok(files <= idle["files"] + 40,
             "files flat (relation files, opened once): idle %d, max %d"
             % (idle["files"], files))
        last = sampler.samples[-1]
        t.diag("idle before: %d fds (%d sockets); after: %d fds (%d sockets)"
               % (idle["fds"], idle["sockets"], last["fds"], last["sockets"]))
        env.set_gucs({"trace.retry_backoff_base": "200ms", "trace.retry_backoff_cap": "2s"})
        forget_trades(FIRST, FIRST + ROWS // 2 - 1)

    with t.case("kill -9 of the worker 10 times while 1,000 rows go to a slow tracker"):
        seed = int(os.environ.get("TRACE_CRASH_SEED") or time.time())
        rnd = random.Random(seed)
        t.diag("random seed %d (TRACE_CRASH_SEED to replay)" % seed)
        env.sink.set_behaviour("/k-mfx", *slow_script(3000), default="delay:0.035")
        env.sink.set_behaviour("/k-wh", *slow_script(3000), default="delay:0.035")
        # Few requests in flight, so that the delivery lasts across all kills.
        env.set_gucs({"trace.batch_size": 4})
        env.point("myfxbook", "/k-mfx")
        env.point("webhook", "/k-wh")
        paths = {"/k-mfx": "myfxbook", "/k-wh": "webhook"}
        log_from = env.cluster.log_size()
        tids = bulk_close(500, signal_id=10)
        lo, hi = tids[0], tids[-1]
        expected = {(x, a) for x in tids for a in BOTH}
        t.is_(sum(status_counts(lo, hi).values()), 1000,
              "500 trades closed: 1,000 rows queued")

        killed, outstanding, phases = [], [], []
        for i in range(10):
            # A live worker (not one we killed) that holds leases: mid-delivery.
            def leasing_worker():
                pid = env.worker_pid()
                if not pid or pid in killed:
                    return None
                n = env.sql1("SELECT count(*) FROM trace._leases() WHERE pid = %s", (pid,))
                return pid if n else None
            pid = wait_until(leasing_worker, 60, 0.01)
            if not pid:
                t.fail("kill %d: a restarted worker is delivering" % (i + 1),
                       repr(status_counts(lo, hi)))
                break
            time.sleep(rnd.uniform(0.0, 0.5))
            left = 1000 - status_counts(lo, hi).get("delivered", 0)
            since = env.cluster.log_size()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            outstanding.append(left)
            if not wait_ready_after(since):
                t.fail("kill %d: the postmaster came back after the crash" % (i + 1),
                       env.cluster.log_tail(30))
                break
            env.reconnect(retry_for=60)
        t.is_(len(killed), 10, "10 workers killed with SIGKILL")
        t.ok(len(outstanding) == 10 and min(outstanding) > 0,
             "every kill hit a worker with rows still to deliver (left at each kill: %s)"
             % outstanding)

        done = wait_all_delivered(lo, hi, 1000, 180)
        t.ok(done, "0 lost: all 1,000 rows ended delivered",
             lambda: repr(status_counts(lo, hi)))
        seen, bad = audit(paths, lo, hi, expected)
        missing = expected - set(seen)
        t.ok(not missing, "every (trade, adapter) reached its tracker at least once",
             "%d missing, e.g. %r" % (len(missing), sorted(missing)[:10]))
        t.ok(not bad, "every request, repeats included, carries <trade_id>-<adapter> "
             "as its Idempotency-Key", "\n".join(bad[:20]))
        nreq = sum(len(v) for v in seen.values())
        dups = nreq - len(seen)
        t.diag("%d requests for %d pairs: %d repeats after %d kills"
               % (nreq, len(seen), dups, len(killed)))

        log = env.cluster.log_text(log_from)
        t.is_(log.count(REINIT), len(killed),
              "one crash-restart of all backends per kill, no other (%d)" % len(killed))
        t.is_(log.count(TERMINATING), len(killed),
              "'terminating any other active server processes' once per kill")
        deaths = re.findall(r'(.*) \(PID (\d+)\) was terminated by signal (\d+)', log)
        ours = sorted((int(p), int(s)) for _, p, s in deaths)
        t.is_(ours, sorted((p, 9) for p in killed),
              "the only processes that died by a signal are the workers we killed, by SIGKILL",
              "\n".join(" ".join(d) for d in deaths))
        worker_deaths = [d[0] for d in deaths if "trace_ext worker" in d[0]]
        t.is_(len(worker_deaths), len(killed),
              "... and the log names them as trace_ext workers")
        # (With log_min_messages = debug1, every client that disconnects
        # logs "exited with exit code 0": that is a normal exit.)
        exits = [ln for ln in log.splitlines()
                 if re.search(r"exited with exit code (?!0\b)\d+", ln)
                 or ("trace_ext worker" in ln and "exited with exit code" in ln)]
        t.is_(exits, [], "no process exited with an error code, no trace_ext worker exited "
              "by itself (no ERROR/FATAL exit)")
        t.ok("segmentation fault" not in log.lower() and "was terminated by signal 11" not in log
             and "terminated by signal 6" not in log,
             "no segfault or abort in the server log")

    with t.case("pg_ctl stop -m immediate with 1,000 rows queued, some leased"):
        env.sink.set_behaviour("/i-mfx", default="delay:0.4")
        env.sink.set_behaviour("/i-wh", default="delay:0.4")
        env.set_gucs({"trace.batch_size": 40})
        env.point("myfxbook", "/i-mfx")
        env.point("webhook", "/i-wh")
        paths = {"/i-mfx": "myfxbook", "/i-wh": "webhook"}
        tids = bulk_close(500, signal_id=10)
        lo, hi = tids[0], tids[-1]
        expected = {(x, a) for x in tids for a in BOTH}

        def some_delivered_some_leased():
            c = status_counts(lo, hi)
            return c.get("delivered", 0) >= 50 and c.get("sending", 0) > 0 and c
        before = wait_until(some_delivered_some_leased, 30, 0.02)
        delivered_before = {(r[0], r[1]) for r in env.sql(
            "SELECT trade_id, adapter FROM trace.trace_queue "
            "WHERE trade_id BETWEEN %s AND %s AND status = 'delivered'", (lo, hi))}
        # The leases held at the stop, and when each would run out.
        leased = env.sql("SELECT l.id, l.expires_at FROM trace._leases() l "
                         "  JOIN trace.trace_queue q ON q.id = l.id "
                         " WHERE q.trade_id BETWEEN %s AND %s", (lo, hi))
        env.cluster.stop(mode="immediate")
        stopped_at = time.time()
        t.ok(before and sum(before.values()) == 1000 and leased,
             "at the stop: 1,000 rows queued, some delivered, %d leased (%r)"
             % (len(leased), before))
        env.cluster.start()
        env.reconnect(retry_for=30)
        # Freed at once: every one of those rows is due again (or already
        # taken by the new worker) while its old lease would still run.
        lease_end = min(r[1] for r in leased) if leased else None

        def freed():
            return env.sql(
                "SELECT count(*) FILTER ("
                "         WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                "                            WHERE a.pid = l.pid "
                "                              AND a.backend_type = 'trace_ext worker')), "
                "       now() < %s "
                "  FROM trace._leases() l WHERE l.id = ANY (%s)",
                (lease_end, [r[0] for r in leased]))[0]
        state = wait_until(lambda: (lambda f: f if f[0] == 0 else None)(freed()), 30, 0.05)
        t.ok(state is not None and state[1],
             "the restarted worker freed the dead worker's %d leases before they ran out "
             "(no row left leased by a gone worker with its lease in the future)" % len(leased),
             lambda: "after 30 s: %r" % (freed(),))
        # The fast path now: what was pending is not held up by the sink.
        env.sink.set_behaviour("/i-mfx", default=200)
        env.sink.set_behaviour("/i-wh", default=200)
        done = wait_all_delivered(lo, hi, 1000, 120)
        t.ok(done, "0 lost: all 1,000 rows delivered after the restart",
             lambda: repr(status_counts(lo, hi)))
        seen, bad = audit(paths, lo, hi, expected)
        missing = expected - set(seen)
        t.ok(not missing, "every (trade, adapter) reached its tracker",
             "%d missing, e.g. %r" % (len(missing), sorted(missing)[:10]))
        t.ok(not bad, "repeats carry the same Idempotency-Key", "\n".join(bad[:20]))
        resent = sorted(k for k in delivered_before
                        if any(r.time > stopped_at for r in seen.get(k, [])))
        t.ok(delivered_before and not resent,
             "none of the %d rows recorded delivered before the stop was sent again"
             % len(delivered_before), "re-sent: %r" % resent[:20])
        nreq = sum(len(v) for v in seen.values())
        t.diag("%d requests for %d pairs: %d repeats (rows leased at the stop: %d)"
               % (nreq, len(seen), nreq - len(seen), before.get("sending", 0) if before else -1))

    with t.case("trace.workers = 3: a burst of 5,000 rows, each claimed and sent once"):
        env.cluster.set_conf({"trace.workers": 3, "trace.batch_size": 100}, reload=False)
        env.sql("ALTER SYSTEM RESET trace.batch_size")
        env.cluster.restart()
        env.reconnect(retry_for=30)
        pids = wait_until(lambda: len(env.worker_pids()) == 3 and env.worker_pids(), 30)
        t.ok(pids and len(pids) == 3, "three trace_ext workers run", repr(env.worker_pids()))
        t.is_(env.sql1("SHOW trace.batch_size"), "100", "trace.batch_size 100")
        env.sink.set_behaviour("/c-mfx", default=200)
        env.sink.set_behaviour("/c-wh", default=200)
        env.point("myfxbook", "/c-mfx")
        env.point("webhook", "/c-wh")
        paths = {"/c-mfx": "myfxbook", "/c-wh": "webhook"}

        # Who holds leases, sampled from another session during the burst.
        owners, stop = {}, threading.Event()

        def sample():
            conn = env.cluster.connect("trades")
            cur = conn.cursor()
            while not stop.is_set():
                cur.execute("SELECT pid, count(*) FROM trace._leases() GROUP BY 1")
                for pid, n in cur.fetchall():
                    owners[pid] = owners.get(pid, 0) + n
                time.sleep(0.002)
            conn.close()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tids = bulk_close(2500, signal_id=10, chunk=250)
        lo, hi = tids[0], tids[-1]
        expected = {(x, a) for x in tids for a in BOTH}
        done = wait_all_delivered(lo, hi, 5000, 180)
        stop.set()
        sampler.join(10)
        t.ok(done, "all 5,000 rows delivered", lambda: repr(status_counts(lo, hi)))
        t.ok(pids and set(pids) <= set(owners),
             "each of the three workers held leases during the burst",
             "workers %r, lease owners seen (samples) %r" % (pids, owners))
        t.ok(set(owners) <= set(pids or []) | {None},
             "no other process held a lease", repr(owners))
        attempts = dict(env.sql("SELECT attempts, count(*) FROM trace.trace_queue "
                                "WHERE trade_id BETWEEN %s AND %s GROUP BY 1", (lo, hi)))
        t.is_(attempts, {1: 5000}, "every row was claimed exactly once (attempts = 1)",
              lambda: "rows sent more than once, by the error of their first attempt: %r"
              % env.sql("SELECT last_error, last_http_status, count(*) "
                        "  FROM trace.trace_queue WHERE trade_id BETWEEN %s AND %s "
                        "   AND attempts > 1 GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5",
                        (lo, hi)))
        seen, bad = audit(paths, lo, hi, expected)
        counts = {}
        for k, v in seen.items():
            counts[len(v)] = counts.get(len(v), 0) + 1
        t.is_(counts, {1: 5000}, "every (trade, adapter) got exactly one request",
              lambda: "pairs by number of requests: %r" % counts)
        t.ok(not bad, "each request carries its own Idempotency-Key", "\n".join(bad[:20]))
        t.diag("lease samples per worker: %r" % owners)
        forget_trades(lo, hi)

    with t.case("two sessions running the worker's claim statement at once get disjoint rows"):
        # The exact statement of src/queue.c (the keep_plan() call holding
        # FOR UPDATE SKIP LOCKED), run by two sessions in a database no
        # worker serves, one of them inside an open transaction: the other
        # must neither wait for it nor get any of its rows.  The lease a
        # worker then takes is in shared memory (lease.c): the statement
        # itself is a lock, and writes no row version.
        src = (Path(__file__).resolve().parents[2] / "src" / "queue.c").read_text()
        claim_sql = None
        m = re.search(r"#define CLAIM_SQL\(by_operator_expr, leased_expr\)(.*?)\n\n", src, re.S)
        if m:
            body = (m.group(1).replace("by_operator_expr", '"q.by_operator"')
                    .replace("leased_expr", '"trace._leased(q.id)"'))
            claim_sql = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))
            if "SKIP LOCKED" not in claim_sql:
                claim_sql = None
        t.ok(claim_sql and "$1" in claim_sql,
             "the claim statement was found in src/queue.c", repr(claim_sql))
        env.cluster.create_database("claimtest")
        s1 = env.cluster.connect("claimtest", autocommit=False)
        s2 = env.cluster.connect("claimtest")
        try:
            c1, c2 = s1.cursor(), s2.cursor()
            c2.execute("SET client_min_messages = error")
            c2.execute("CREATE EXTENSION trace_ext")
            c2.execute("INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, due_at) "
                       "SELECT g, 'webhook', 'pg_class'::regclass, now() - interval '1 min' "
                       "  FROM generate_series(1, 10) g")
            c2.execute("SELECT id, xmin::text FROM trace.trace_queue")
            xmins = dict(c2.fetchall())
            s1.commit()
            for c in (c1, c2):
                # The worker's own parameter types (int4, text[], int8[]).
                c.execute("PREPARE claim(int, text[], bigint[]) AS " + claim_sql)
            s1.commit()
            c2.execute("SET statement_timeout = '10s'")
            c1.execute("EXECUTE claim(4, '{}', '{}')")            # s1: open transaction
            a = {r[0] for r in c1.fetchall()}
            c2.execute("EXECUTE claim(4, '{}', '{}')")            # s2, meanwhile
            b = {r[0] for r in c2.fetchall()}
            c2.execute("EXECUTE claim(4, '{}', '{}')")
            rest = {r[0] for r in c2.fetchall()}
            t.ok(len(a) == 4 and len(b) == 4 and not a & b,
                 "session 2 got 4 other rows without waiting for session 1's open claim",
                 "s1 %r, s2 %r" % (sorted(a), sorted(b)))
            # Session 2's own claims committed at once (autocommit): its locks
            # are gone, and the statement alone leases nothing (a worker's
            # lease is in shared memory), so it may get the same rows again.
            t.ok(len(rest) == 4 and rest <= set(range(1, 11)) - a,
                 "... then again 4 rows, none of session 1's (still locked by its open "
                 "transaction)", repr(sorted(rest)))
            s1.commit()
            c2.execute("SELECT id, xmin::text, status, attempts FROM trace.trace_queue")
            after = c2.fetchall()
            t.ok(len(after) == 10 and all(xmins.get(i) == x and st == "pending" and n == 0
                                          for i, x, st, n in after),
                 "the claim is a lock, not an update: every row keeps its version (xmin), "
                 "status pending, attempts 0", repr(after))
        finally:
            s1.close()
            s2.close()

    with t.case("no snapshot or transaction held while requests hang"):
        env.sql("ALTER TABLE trace.trace_queue SET (autovacuum_enabled = off)")
        # A long poll_interval: a worker then starts a (short) transaction
        # only when woken by a commit, so that any xmin seen below would be
        # one held across the hanging requests, not a worker looking at
        # the queue between them.
        env.set_gucs({"trace.http_timeout": "20s", "trace.poll_interval": "1h"})
        # The sink holds each of the first 20 requests per tracker 10 s,
        # then closes it unanswered; after that it answers 200.
        env.sink.set_behaviour("/h-mfx", *["hang:10"] * 20, default=200)
        env.sink.set_behaviour("/h-wh", *["hang:10"] * 20, default=200)
        env.point("myfxbook", "/h-mfx")
        env.point("webhook", "/h-wh")
        hang_from = time.time()
        tids = bulk_close(20, signal_id=10)
        lo, hi = tids[0], tids[-1]
        hung = env.sink.wait_for(
            lambda rs: len([r for r in rs if r.route in ("/h-mfx", "/h-wh")]) >= 40, 15)
        t.ok(hung, "40 requests are hanging at the tracker (http_timeout 20 s)")
        t.is_(status_counts(lo, hi), {"sending": 40}, "their 40 rows are leased")

        samples, bad = 0, []
        mon = env.cluster.connect("trades")
        mcur = mon.cursor()
        # The workers woken by the close may still be ending the short
        # claim that found the rows already taken, and one that found them
        # locked looks again 50 ms later (LOCKED_ROW_SLEEP_MS): wait until
        # all three are idle (no transaction), each either waiting for its
        # requests or with no wake-up planned before they end, twice 0.2 s
        # apart (a condition, not a sleep), then sample.
        # From then on nothing wakes them until the hanging requests end.
        def quiet():
            mcur.execute(
                "SELECT (SELECT count(*) FROM pg_stat_activity "
                "         WHERE backend_type = 'trace_ext worker' "
                "           AND state = 'idle' AND backend_xmin IS NULL), "
                "       (SELECT count(*) FROM trace.worker_status "
                "         WHERE (state = 'idle' "
                "                AND (next_wake_at IS NULL "
                "                     OR next_wake_at > now() + interval '15 s')) "
                "            OR (state = 'sending' AND in_flight > 0))")
            return mcur.fetchone() == (3, 3)
        settled = wait_until(lambda: quiet() and (time.sleep(0.2) or quiet()), 10)
        t.ok(settled, "all three workers idle while the 40 requests hang",
             lambda: repr(env.sql("SELECT pid, state, next_wake_at - now() "
                                  "FROM trace.worker_status")))
        for _ in range(200):
            mcur.execute("SELECT pid, backend_xmin::text, backend_xid::text, state, query "
                         "FROM pg_stat_activity WHERE backend_type = 'trace_ext worker'")
            rows = mcur.fetchall()
            if len(rows) != 3:
                bad.append("%d workers in pg_stat_activity" % len(rows))
            for pid, xmin, xid, state, query in rows:
                samples += 1
                if xmin is not None or xid is not None or state != "idle":
                    bad.append("worker %d: backend_xmin %s, backend_xid %s, state %s (%s)"
                               % (pid, xmin, xid, state, query))
            time.sleep(0.01)
        t.ok(samples >= 600 and not bad,
             "backend_xmin and backend_xid NULL, state idle, in all %d samples of the workers"
             % samples, "\n".join(bad[:20]))

        def vacuum_tuples():
            """VACUUM VERBOSE trace.trace_queue: (dead rows reclaimed, dead
            but not yet removable).  Reclaimed counts the tuples VACUUM
            removed plus the dead line pointers left by earlier pruning
            (a scan of the table may prune before VACUUM gets there)."""
            del mon.notices[:]
            mcur.execute("VACUUM (VERBOSE) trace.trace_queue")
            text = "".join(n for n in mon.notices if '"trades.trace.trace_queue"' in n)
            m = re.search(r"tuples: (\d+) removed, (\d+) remain, (\d+) are dead but not yet "
                          r"removable", text)
            if not m:
                raise AssertionError("no tuple counts in VACUUM VERBOSE output:\n" + text)
            ids = re.search(r"had (\d+) dead item identifiers removed", text)
            # Tuples VACUUM pruned itself are among the identifiers it then
            # removed; identifiers pruned earlier are only in the latter.
            reclaimed = max(int(m.group(1)), int(ids.group(1)) if ids else 0)
            return reclaimed, int(m.group(3))

        vacuum_tuples()     # start clean
        # Control: a session holding a snapshot keeps dead rows.
        holder = env.cluster.connect("trades", autocommit=False)
        hcur = holder.cursor()
        hcur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        hcur.execute("SELECT count(*) FROM trace.trace_queue")
        env.sql("DELETE FROM trace.trace_queue WHERE status = 'delivered' AND id IN "
                "(SELECT id FROM trace.trace_queue WHERE status = 'delivered' "
                " ORDER BY id LIMIT 1000)")
        removed, kept = vacuum_tuples()
        t.ok(kept >= 1000 and removed == 0,
             "control: with a snapshot held elsewhere, VACUUM keeps the 1,000 deleted rows "
             "(%d dead but not yet removable, %d reclaimed)" % (kept, removed))
        holder.rollback()
        holder.close()
        # The real thing: only the workers are left, with requests hanging.
        env.sql("DELETE FROM trace.trace_queue WHERE status = 'delivered' AND id IN "
                "(SELECT id FROM trace.trace_queue WHERE status = 'delivered' "
                " ORDER BY id LIMIT 1000)")
        removed, kept = vacuum_tuples()
        t.ok(removed >= 2000 and kept == 0,
             "while requests hang, VACUUM removes the 2,000 deleted rows "
             "(%d reclaimed, %d dead but not yet removable)" % (removed, kept))
        hanging = [r for r in env.sink.requests() if r.route in ("/h-mfx", "/h-wh")]
        t.ok(status_counts(lo, hi) == {"sending": 40} and len(hanging) == 40
             and all(r.finished is None for r in hanging),
             "... and the 40 requests were still hanging all along (none answered or "
             "dropped by the sink yet, %.1f s in)" % (time.time() - hang_from))
        mon.close()
        env.sql("ALTER TABLE trace.trace_queue RESET (autovacuum_enabled)")
        env.set_gucs({"trace.poll_interval": "100ms"})
        t.ok(wait_all_delivered(lo, hi, 40, 60),
             "once the tracker dropped them, the 40 rows are delivered by a retry "
             "(%d requests in all)" % len([r for r in env.sink.requests()
                                           if r.route in ("/h-mfx", "/h-wh")]),
             lambda: repr(status_counts(lo, hi)))
finally:
    if tracker is not None:
        tracker.stop()
    env.close()

sys.exit(t.done())
