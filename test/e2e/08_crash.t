#!/usr/bin/python3
"""Crashes and concurrency, end to end: nothing is lost, nothing is sent
twice in the normal path, and no snapshot is held across the network.

- kill -9 of the worker 10 times, at random points, while 1,000 rows (500
  trades, two trackers) go to a slow tracker (20-50 ms per answer): every
  row ends delivered, every (trade, adapter) reached its tracker, every
  repeat carries the same Idempotency-Key, and the postmaster restarted
  all backends exactly once per kill (a bgworker killed by a signal is a
  crash to PostgreSQL) and never because a worker died by itself.
- pg_ctl stop -m immediate with 1,000 rows queued and some leased: after
  the restart the dead worker's leases are freed at once, all rows are
  delivered, nothing already recorded delivered is sent again, and
  repeats carry the same key.
- trace.workers = 3 and a burst of 5,000 rows to a fast tracker: all three
  workers claimed rows, yet every row was claimed once (attempts = 1) and
  every (trade, adapter) got exactly one request.
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
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"synchronous_commit": "on",
                                      "trace.max_retries": 100,
                                      "trace.http_timeout": "3000ms",
                                      "trace.retry_backoff_cap": "2s"},
                             name="trace_e2e_crash")

BOTH = ("myfxbook", "webhook")
REINIT = "all server processes terminated; reinitializing"
TERMINATING = "terminating any other active server processes"
READY = "database system is ready to accept connections"
_next_id = [2_000_000]


def bulk_close(n, signal_id=10, chunk=None):
    """Insert n OPEN trades of user 1 (opted in) and close them, in one
    UPDATE (or in UPDATEs of `chunk` trades); returns their ids."""
    first = _next_id[0]
    last = first + n - 1
    _next_id[0] = last + 1
    env.sql("""
        INSERT INTO trades (trade_id, user_id, signal_id, account_number, client_id,
                            instrument, side, volume, entry_price, opened_at,
                            passport, iban)
        SELECT g, u.user_id, %(s)s, 'ACC-E2E-' || g, u.client_id, 'EURUSD', 'buy', 2.5,
               1.084250, timestamptz '2026-01-05 08:00:00+00' + g * interval '1 second',
               'PASSPORT-CANARY-' || g, 'DE00CANARYIBAN' || lpad(g::text, 8, '0')
          FROM generate_series(%(a)s::bigint, %(b)s::bigint) g, users u
         WHERE u.user_id = 1""", {"s": signal_id, "a": first, "b": last})
    step = chunk or n
    for lo in range(first, last + 1, step):
        env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912,
                          closed_at = now(), pnl = 10, fees = 1
                    WHERE trade_id BETWEEN %s AND %s""", (lo, min(last, lo + step - 1)))
    return list(range(first, last + 1))


def status_counts(lo, hi):
    return dict(env.sql("SELECT status, count(*) FROM trace.trace_queue "
                        "WHERE trade_id BETWEEN %s AND %s GROUP BY status", (lo, hi)))


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


try:
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
                n = env.sql1("SELECT count(*) FROM trace.trace_queue "
                             "WHERE status = 'sending' AND lease_owner = %s", (pid,))
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
        exits = [ln for ln in log.splitlines()
                 if "exited with exit code" in ln]
        t.is_(exits, [], "no process exited with an error code (no worker ERROR/FATAL exit)")
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
        env.cluster.stop(mode="immediate")
        stopped_at = time.time()
        t.ok(before and sum(before.values()) == 1000 and before.get("sending", 0) > 0,
             "at the stop: 1,000 rows queued, some delivered, some leased (%r)" % (before,))
        since = env.cluster.log_size()
        env.cluster.start()
        env.reconnect(retry_for=30)
        t.ok(env.cluster.wait_for_log(r"rows left in sending by a stopped worker are due again",
                                      since, 30),
             "the restarted worker freed the dead worker's leases at once")
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
                cur.execute("SELECT lease_owner, count(*) FROM trace.trace_queue "
                            "WHERE status = 'sending' GROUP BY 1")
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
        t.is_(attempts, {1: 5000}, "every row was claimed exactly once (attempts = 1)")
        seen, bad = audit(paths, lo, hi, expected)
        counts = {}
        for k, v in seen.items():
            counts[len(v)] = counts.get(len(v), 0) + 1
        t.is_(counts, {1: 5000}, "every (trade, adapter) got exactly one request",
              lambda: "pairs by number of requests: %r" % counts)
        t.ok(not bad, "each request carries its own Idempotency-Key", "\n".join(bad[:20]))
        t.diag("lease samples per worker: %r" % owners)

    with t.case("no snapshot or transaction held while requests hang"):
        env.sql("ALTER TABLE trace.trace_queue SET (autovacuum_enabled = off)")
        # A long poll_interval: a worker then starts a (short) transaction
        # only when woken by a commit, so that any xmin seen below would be
        # one held across the hanging requests, not a worker looking at
        # the queue between them.
        env.set_gucs({"trace.http_timeout": "20s", "trace.poll_interval": "1h"})
        env.sink.set_behaviour("/h-mfx", default="hang:60")
        env.sink.set_behaviour("/h-wh", default="hang:60")
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
        still = len([r for r in env.sink.requests() if r.route in ("/h-mfx", "/h-wh")])
        t.ok(status_counts(lo, hi) == {"sending": 40} and still == 40
             and time.time() - hang_from < 20,
             "... and the 40 requests were still hanging all along (%.1f s)"
             % (time.time() - hang_from))
        mon.close()
        env.sql("ALTER TABLE trace.trace_queue RESET (autovacuum_enabled)")
        # Let them through: the timeouts are retried to a tracker that answers.
        env.sink.set_behaviour("/ok-mfx", default=200)
        env.sink.set_behaviour("/ok-wh", default=200)
        env.point("myfxbook", "/ok-mfx")
        env.point("webhook", "/ok-wh")
        env.set_gucs({"trace.poll_interval": "100ms"})
        t.ok(wait_all_delivered(lo, hi, 40, 60),
             "after the timeout, the 40 rows are delivered by a retry",
             lambda: repr(status_counts(lo, hi)))
finally:
    env.close()

sys.exit(t.done())
