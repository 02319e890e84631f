#!/usr/bin/python3
"""Hostile conditions, end to end: a URL that is not http(s), a tracker
that refuses connections, a worker killed with SIGKILL in the middle of a
batch, a tracker that never answers (it must not hold up another
adapter's deliveries), and a fast shutdown while a request hangs.

trace.http_timeout is 3 s here, so that "prompt" and "after the timeout"
are far apart."""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv, free_port  # noqa: E402

TIMEOUT = 3.0

t = Tap()
# synchronous_commit on: with it off, a close committed a few ms before
# the kill -9 may be lost by PostgreSQL itself (no WAL flush yet), which
# is not what the crash test is about.
# Per-row failure rules: the trackers' breakers (tests 24, 25) are off.
env = TraceEnv.start_or_exit(t, gucs={"trace.breaker_threshold": 0, "trace.max_retries": 5, "trace.http_timeout": "3000ms",
                                      "synchronous_commit": "on"},
                             name="trace_e2e_failures")

BOTH = ("myfxbook", "webhook")

try:
    with t.case("file:// URLs are refused"):
        before = env.sql1("SHOW trace.webhook_endpoint")
        for guc in ("trace.webhook_endpoint", "trace.myfxbook_webhook_url"):
            err = None
            try:
                env.sql("ALTER SYSTEM SET %s = 'file:///etc/passwd'" % guc)
            except psycopg2.Error as e:
                err = e
            t.ok(err is not None and guc in str(err),
                 "ALTER SYSTEM SET %s = 'file:///etc/passwd' is rejected naming the GUC" % guc,
                 "error: %s" % err)
        auto = open(os.path.join(env.cluster.datadir, "postgresql.auto.conf")).read()
        t.ok("file:///" not in auto, "nothing was written to postgresql.auto.conf")
        env.sql("SELECT pg_reload_conf()")
        t.is_(env.sql1("SHOW trace.webhook_endpoint"), before, "the endpoint is unchanged")

    with t.case("connection refused: a recorded failure, the worker lives on"):
        pid0 = env.worker_pid()
        port = free_port()
        env.set_gucs({"trace.webhook_endpoint": "http://127.0.0.1:%d/nothing-listens" % port})
        tid = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(tid)
        rows = env.wait_rows(tid, lambda rs: rs.get("webhook", {}).get("last_error") is not None, 10)
        r = rows.get("webhook", {})
        t.ok(r.get("attempts", 0) >= 1 and "connect" in (r.get("last_error") or "").lower()
             and r.get("last_http_status") is None,
             "last_error names a connect failure, last_http_status NULL", repr(r))
        t.ok(r.get("status") in ("pending", "sending"), "it will be retried", repr(r))
        t.is_(env.worker_pid(), pid0, "the same worker process is still running")
        env.sink.set_behaviour("/ok", default=200)
        env.point("webhook", "/ok")
        rows = env.wait_status(tid, "webhook", "delivered", 15)
        t.is_(rows.get("webhook", {}).get("status"), "delivered",
              "delivered by a retry once the endpoint is fixed")

    with t.case("an error in a pass: the worker logs it and carries on"):
        # Dropping the extension under the worker makes its next claim fail
        # (the queue is gone); it must log the error, wait for the extension
        # and deliver again once it is back, in the same process.
        pid0 = env.worker_pid()
        since = env.cluster.log_size()
        env.sql("DROP EXTENSION trace_ext CASCADE")
        t.ok(env.cluster.wait_for_log(r"waiting for CREATE EXTENSION trace_ext", since, 10),
             "the worker noticed the extension is gone and waits for it")
        env.sql("SET client_min_messages = error")
        env.sql("CREATE EXTENSION trace_ext")
        env.sql("RESET client_min_messages")
        t.ok(env.cluster.wait_for_log(r"extension found; delivering", since, 10),
             "... and resumes when it is back")
        tid = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(tid)
        rows = env.wait_status(tid, "webhook", "delivered", 15)
        t.is_(rows.get("webhook", {}).get("status"), "delivered",
              "a trade closed after CREATE EXTENSION is delivered")
        t.is_(env.worker_pid(), pid0, "by the same worker process")

    with t.case("a due row locked by another transaction: the worker neither spins nor waits on it"):
        tid = env.new_trade(user_id=1, signal_id=11)
        env.set_gucs({"trace.delay": "1s"})
        env.close_trade(tid)
        locker = env.cluster.connect("trades", autocommit=False)
        lcur = locker.cursor()
        lcur.execute("SELECT id FROM trace.trace_queue WHERE trade_id = %s FOR UPDATE", (tid,))
        other = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(other)
        pid = env.worker_pid()

        def cpu():
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        time.sleep(1.2)         # both rows are due now; one is locked
        c0, t0 = cpu(), time.time()
        rows = env.wait_status(other, "webhook", "delivered", 10)
        t.is_(rows.get("webhook", {}).get("status"), "delivered",
              "the other due row is delivered while one is locked")
        time.sleep(2.0)
        used = cpu() - c0
        t.ok(used < 0.5 * (time.time() - t0),
             "the worker does not spin on the locked row (CPU %.2f s in %.1f s)"
             % (used, time.time() - t0))
        t.is_(env.rows(tid).get("webhook", {}).get("status"), "pending",
              "the locked row is still pending")
        locker.rollback()
        locker.close()
        rows = env.wait_status(tid, "webhook", "delivered", 10)
        t.is_(rows.get("webhook", {}).get("status"), "delivered",
              "... and delivered once the lock is gone")
        env.set_gucs({"trace.delay": "0"})

    with t.case("kill -9 of the worker mid-batch"):
        env.sink.set_behaviour("/slow-mfx", default="delay:1.5")
        env.sink.set_behaviour("/slow-wh", default="delay:1.5")
        env.point("myfxbook", "/slow-mfx")
        env.point("webhook", "/slow-wh")
        path_adapter = {"/slow-mfx": "myfxbook", "/slow-wh": "webhook"}
        tids = [env.new_trade(user_id=1, signal_id=10) for _ in range(8)]
        env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912,
                          closed_at = now(), pnl = 10, fees = 1
                    WHERE trade_id = ANY(%s)""", (tids,))
        expected = {(x, a) for x in tids for a in BOTH}
        started = wait_until(lambda: len(env.sink.requests("/slow-mfx"))
                             + len(env.sink.requests("/slow-wh")) >= 2, 10)
        sending = env.sql1("SELECT count(*) FROM trace.trace_queue "
                           "WHERE " + env.status_sql() + " = 'sending' AND trade_id = ANY(%s)",
                           (tids,))
        pid = env.worker_pid()
        t.ok(started and sending > 0 and pid,
             "the worker is mid-batch (%d rows sending, requests in flight)" % (sending or 0))
        log_from = env.cluster.log_size()
        kill_time = time.time()
        os.kill(pid, signal.SIGKILL)
        # The postmaster ends every backend, reinitialises and recovers;
        # reconnect only once that is over.
        reinit = env.cluster.wait_for_log(r"all server processes terminated; reinitializing",
                                          since=log_from, timeout=30)
        ready = env.cluster.wait_for_log(
            r"all server processes terminated; reinitializing(.|\n)*"
            r"database system is ready to accept connections", since=log_from, timeout=60)
        t.ok(reinit and ready, "the postmaster did a crash-restart")
        env.reconnect(retry_for=30)
        new_pid = wait_until(lambda: (env.worker_pid() or pid) != pid and env.worker_pid(), 60, 0.2)
        t.ok(new_pid and new_pid != pid, "a new worker process came back after the crash",
             "old %s, new %s" % (pid, new_pid))

        def all_delivered():
            n = env.sql1("SELECT count(*) FROM trace.trace_queue "
                         "WHERE status = 'delivered' AND trade_id = ANY(%s)", (tids,))
            return n == len(expected)
        done = wait_until(all_delivered, 60, 0.2)
        t.ok(done, "every queued row ended delivered (%.1f s after the kill)"
             % (time.time() - kill_time),
             lambda: repr(env.sqld("SELECT trade_id, adapter, status, attempts, last_error "
                                   "FROM trace.trace_queue WHERE trade_id = ANY(%s)", (tids,))))
        reqs = env.sink.requests("/slow-mfx") + env.sink.requests("/slow-wh")
        seen, bad = {}, []
        for r in reqs:
            body = r.json() or {}
            key = (body.get("trade_id"), path_adapter[r.route])
            if key not in expected:
                bad.append("request #%d for an unexpected trade: %r" % (r.seq, key))
                continue
            if r.header("Idempotency-Key") != "%d-%s" % key:
                bad.append("request #%d for %r has Idempotency-Key %r"
                           % (r.seq, key, r.header("Idempotency-Key")))
            seen.setdefault(key, []).append(r)
        t.is_(set(seen), expected, "every (trade, adapter) reached its tracker")
        t.ok(not bad, "duplicates only with the same Idempotency-Key", "\n".join(bad))
        dups = sum(len(v) - 1 for v in seen.values())
        t.diag("%d requests, %d duplicates" % (len(reqs), dups))
        # A request the sink was still holding when the worker died got no
        # answer to the worker: at-least-once means it is sent again.
        inflight = [r for r in reqs if kill_time - 1.3 < r.time < kill_time]
        unsent = [r.seq for r in inflight
                  if not any(o.time > kill_time and o.header("Idempotency-Key")
                             == r.header("Idempotency-Key") for o in reqs)]
        t.ok(inflight and not unsent,
             "requests in flight at the kill (%d) were sent again after it" % len(inflight),
             "not re-sent: %r" % unsent)

    with t.case("a hanging tracker does not hold up another adapter"):
        env.sink.set_behaviour("/hang", default="hang:60")
        env.sink.set_behaviour("/mfx", default=200)
        env.point("webhook", "/hang")
        env.point("myfxbook", "/mfx")
        t_hang = env.new_trade(user_id=1, signal_id=11)         # webhook only
        env.close_trade(t_hang)
        hung = env.wait_reqs(t_hang, "webhook", "/hang", count=1, timeout=10)
        t.ok(hung, "the webhook request is hanging at the tracker")
        t_both = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(t_both)
        rows = env.wait_status(t_both, "myfxbook", "delivered", 10)
        # A condition, not a clock: the other tracker's row is delivered
        # and recorded while the first request is still hanging (the sink
        # has neither answered nor dropped it).
        t.ok(rows.get("myfxbook", {}).get("status") == "delivered"
             and hung and hung[0].finished is None,
             "myfxbook delivered and recorded while the webhook request still hangs",
             repr(rows))
        rows = env.wait_rows(t_hang, lambda rs: rs.get("webhook", {}).get("last_error") is not None,
                             TIMEOUT + 10)
        r = rows.get("webhook", {})
        t.ok("timeout" in (r.get("last_error") or "").lower() and r.get("last_http_status") is None,
             "the hanging request failed with a timeout", repr(r))
        first = hung[0].time if hung else 0
        took = time.time() - first
        t.ok(took >= TIMEOUT * 0.9, "... not before trace.http_timeout (%.1f s)" % took)

    with t.case("SIGTERM of the worker with a request in flight: re-sent later, same key, "
                "delivered once"):
        # README: "SIGTERM stops a worker at once (rows in flight are re-sent
        # later, same key)".  trace.http_timeout is 30 s, so the lease (65 s)
        # outlives this case: only the restarted worker freeing the dead
        # worker's lease can make the row go again in time.
        env.set_gucs({"trace.http_timeout": "30s"})
        env.sink.set_behaviour("/term", default="hang:60")
        env.point("webhook", "/term")
        tid = env.new_trade(user_id=1, signal_id=11)            # webhook only
        env.close_trade(tid)
        key = "%d-webhook" % tid
        hung = env.wait_reqs(tid, "webhook", "/term", count=1, timeout=10)
        row = env.rows(tid).get("webhook", {})
        pid = env.worker_pid()
        t.ok(hung and row.get("status") == "sending" and row.get("attempts") == 0,
             "a request is hanging at the tracker, its row sending (leased: no attempt "
             "recorded yet)", repr(row))
        env.sink.set_behaviour("/term", default=200)    # from now on the tracker answers
        log_from = env.cluster.log_size()
        term_time = time.time()
        t.is_(env.sql1("SELECT pg_terminate_backend(%s)", (pid,)), True,
              "the worker gets SIGTERM (pg_terminate_backend)")
        new_pid = wait_until(lambda: (env.worker_pid() or pid) != pid and env.worker_pid(),
                             30, 0.1)
        t.ok(new_pid and new_pid != pid, "the postmaster started a new worker",
             "old %s, new %s" % (pid, new_pid))
        rows = env.wait_status(tid, "webhook", ["delivered", "abandoned", "cancelled"], 30)
        r = rows.get("webhook", {})
        t.ok(r.get("status") == "delivered" and r.get("delivered_at") is not None,
             "the row ends delivered", repr(r))
        reqs = env.reqs_for(tid, "webhook", "/term")
        answers = [("hang" if (x.response or {}).get("hang") else (x.response or {}).get("status"))
                   for x in reqs]
        t.is_(answers, ["hang", 200],
              "the row was sent again after the SIGTERM and answered 200: two requests, "
              "the first never answered")
        t.ok(len(reqs) == 2 and reqs[1].time > term_time,
             "the second request came after the SIGTERM",
             "requests at %r, SIGTERM at %.3f" % ([x.time for x in reqs], term_time))
        t.is_([x.header("Idempotency-Key") for x in reqs], [key] * len(reqs),
              "both carry the same Idempotency-Key")
        t.ok(len(reqs) == 2 and reqs[0].body == reqs[1].body, "... and the same body")
        t.is_(sum(1 for a in answers if a == 200), 1, "delivered exactly once (one 2xx)")
        log = env.cluster.log_text(log_from)
        t.ok("terminated by signal" not in log and "reinitializing" not in log,
             "the worker exited cleanly (no crash-restart of the server)",
             lambda: log[-2000:])
        env.point("webhook", "/hang")

    with t.case("SIGTERM while a request hangs"):
        env.set_gucs({"trace.http_timeout": "30s"})
        t_term = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(t_term)
        hung = env.wait_reqs(t_term, "webhook", "/hang", count=1, timeout=10)
        t.ok(hung, "a request with a 30 s timeout is hanging at the tracker")
        env.pii_values()        # remember them for the scan after shutdown
        env.check_no_pii("failures")
        took = env.cluster.stop(mode="fast")
        t.ok(took < 5, "pg_ctl stop -m fast returns in < 5 s", "took %.1f s" % took)
        env.check_log_clean("after shutdown")
finally:
    env.close()

sys.exit(t.done())
