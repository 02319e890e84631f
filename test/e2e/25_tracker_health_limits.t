#!/usr/bin/python3
"""Tracker health (issue 14), end to end, with two workers: the rate limit
shared by the workers, and kill -9 of a worker while a breaker is open.
(The breaker, Retry-After, the view, metrics and log lines are in
24_tracker_health.t.)

trace.workers = 2, trace.retry_backoff_base = 100ms, trace.retry_backoff_cap
= 1s, trace.breaker_threshold = 5, synchronous_commit on (a crash must not
lose a commit PostgreSQL itself acknowledged).  trace.max_retries = 3: a
row can spend at most three attempts here whatever the breaker does (one
failing before the breaker opens, one in flight when the worker is killed,
which a crash always costs, and one failing before the rebuilt breaker
opens again), so any abandoned row would be the breaker's fault.

- Rate limit: trace.max_requests_per_second = 100, 1,000 rows due at once
  for one tracker, two workers: a token bucket in shared memory (burst
  max(1, rate/10) = 10) allows at most 100 + 10 = 110 requests in any
  1-second window, so no 1-second window of request arrival times at the
  sink (sliding, starting at each request) holds more than 110; all 1,000
  arrive, each exactly once; both workers claimed rows; and
  trust_trace_throttled_total{adapter="webhook"} grew, myfxbook's (no due
  row to hold back) did not.  Then, idle with the limit still on, the
  workers run no statement for 2 s (query_start unchanged) and no
  throttled counter grows.
- kill -9 of a worker while the webhook breaker is open (the tracker
  answering 503): PostgreSQL restarts every process and re-creates shared
  memory, so the breaker is rebuilt, not kept (the spec's choice: shared
  memory does not survive the crash-restart, and a breaker wrongly closed
  costs at most threshold + rows in flight before it opens again, while
  one wrongly kept open would hold a healthy tracker back).  Checked: one
  crash-restart; right after it the view says closed, 0 failures, no
  probe; it opens again (WARNING, NOTIFY) after the threshold, the
  requests after the restart bounded by threshold (5) + rows in flight
  when it opened (trace.batch_size 10 x 2 workers) + the probes the
  schedule allows; once the tracker answers, every row is delivered
  (0 abandoned), exactly one 2xx per (trade, tracker), every request
  under its own Idempotency-Key.
"""

import json
import os
import re
import select
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

BASE, CAP, THRESHOLD, WORKERS = 0.1, 1.0, 5, 2
RATE, BURST = 100, 10
REINIT = "all server processes terminated; reinitializing"
READY = "database system is ready to accept connections"
OPEN_WARNING = (r"WARNING:  (?:trace_ext: )?tracker %s is failing: breaker open after (\d+) "
                r"consecutive failures")
CLOSED_WARNING = r"WARNING:  (?:trace_ext: )?tracker %s answers again: breaker closed after"

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={
    "synchronous_commit": "on",
    "trace.workers": WORKERS,
    "trace.retry_backoff_base": "100ms",
    "trace.retry_backoff_cap": "1s",
    "trace.max_retries": 3,
    "trace.breaker_threshold": THRESHOLD,
    "trace.http_timeout": "3000ms",
}, name="trace_e2e_health_limits")


def max_probes(duration, shrink=0.9):
    """Most probes in `duration` s after a breaker opened: probe k waits
    min(base*6^(k-1), cap) after it (re)opened (at `shrink` x, for
    jitter), plus one at the edge."""
    n, elapsed = 0, 0.0
    while True:
        elapsed += shrink * min(BASE * 6 ** n, CAP)
        if elapsed > duration:
            return n + 1
        n += 1


def health(adapter):
    rows = env.sqld("SELECT *, extract(epoch FROM since)::float8 AS since_epoch "
                    "FROM trace.tracker_health WHERE adapter = %s", (adapter,))
    return rows[0] if rows else {}


def throttled(adapter):
    text = env.sql1("SELECT trace.prometheus_metrics()") or ""
    m = re.search(r'^trust_trace_throttled_total\{adapter="%s"\} (\S+)$' % adapter, text, re.M)
    return float(m.group(1)) if m else None


def status_counts(lo, hi):
    return dict(env.sql("SELECT status, count(*) FROM trace.trace_queue "
                        "WHERE trade_id BETWEEN %s AND %s GROUP BY status", (lo, hi)))


def wait_all_delivered(lo, hi, expect, timeout):
    def probe():
        try:
            return status_counts(lo, hi) == {"delivered": expect}
        except psycopg2.Error:
            env.reconnect(retry_for=30)
            return False
    return wait_until(probe, timeout, 0.2)


def close_range(lo, hi, signal_id=11):
    env.add_trades(lo, hi, user_id=1, signal_id=signal_id)
    env.sql("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(), "
            "pnl = 10, fees = 1 WHERE trade_id BETWEEN %s AND %s", (lo, hi))


def audit(path, adapter, lo, hi):
    """Requests at `path` for trades lo..hi: {trade: [2xx requests]},
    {trade: [requests]}, problems (a key that is not <trade>-<adapter>)."""
    ok2xx, every, bad = {}, {}, []
    for r in env.sink.requests(path):
        tid = (r.json() or {}).get("trade_id")
        if not isinstance(tid, int) or not lo <= tid <= hi:
            continue
        if r.header("Idempotency-Key") != "%d-%s" % (tid, adapter):
            bad.append("request #%d for trade %d has Idempotency-Key %r"
                       % (r.seq, tid, r.header("Idempotency-Key")))
        every.setdefault(tid, []).append(r)
        if r.response and not r.response.get("hang") and 200 <= r.response["status"] < 300:
            ok2xx.setdefault(tid, []).append(r)
    return ok2xx, every, bad


class Sampler(threading.Thread):
    """Runs fn(cursor) every `every` s from its own session, keeping what
    it returns with the time."""

    def __init__(self, fn, every=0.02):
        super().__init__(daemon=True)
        self.fn, self.every = fn, every
        self.samples, self.errors = [], []
        self._halt = threading.Event()

    def run(self):
        try:
            conn = env.cluster.connect("trades", retry_for=30)
        except psycopg2.Error as e:
            self.errors.append(str(e))
            return
        cur = conn.cursor()
        while not self._halt.is_set():
            try:
                self.samples.append((time.time(), self.fn(cur)))
            except psycopg2.Error as e:
                self.errors.append(str(e))
                break
            self._halt.wait(self.every)
        conn.close()

    def halt(self):
        self._halt.set()
        self.join(10)
        return self


def lease_owners(cur):
    cur.execute("SELECT pid, count(*) FROM trace._leases() GROUP BY 1")
    return dict(cur.fetchall())


def webhook_state(cur):
    cur.execute("SELECT state, consecutive_failures, next_probe_at IS NOT NULL "
                "FROM trace.tracker_health WHERE adapter = 'webhook'")
    return cur.fetchone()


def listen():
    conn = env.cluster.connect("trades", retry_for=30)
    conn.cursor().execute("LISTEN trace_alert")
    return conn


def notes(conn, got, wait=0.0):
    if select.select([conn], [], [], wait)[0]:
        conn.poll()
    for n in conn.notifies:
        try:
            got.append(json.loads(n.payload))
        except ValueError:
            got.append(n.payload)
    conn.notifies.clear()
    return got


def events(got, event, adapter="webhook"):
    return [p for p in got if isinstance(p, dict) and p.get("event") == event
            and p.get("adapter") == adapter]


samplers = []
try:
    with t.case("rate limit 100/s, 1,000 due rows, two workers"):
        pids = wait_until(lambda: len(env.worker_pids()) == WORKERS and env.worker_pids(), 30)
        t.ok(pids and len(pids) == WORKERS, "%d trace_ext workers run" % WORKERS,
             repr(env.worker_pids()))
        env.set_gucs({"trace.max_requests_per_second": RATE})
        env.sink.set_behaviour("/rl-wh", default=200)
        env.point("webhook", "/rl-wh")
        th0 = throttled("webhook")
        t.ok(th0 is not None, "trust_trace_throttled_total{adapter=\"webhook\"} is exposed "
             "(%r before)" % th0)
        owners = Sampler(lease_owners, 0.01)
        samplers.append(owners)
        owners.start()
        LO, N = 4_000_000, 1000
        HI = LO + N - 1
        t0 = time.time()
        close_range(LO, HI)                         # 1,000 rows due at once (trace.delay 0)
        done = wait_all_delivered(LO, HI, N, 60)
        owners.halt()
        took = time.time() - t0
        t.ok(done, "all 1,000 rows delivered (%.1f s)" % took, lambda: repr(status_counts(LO, HI)))
        ok2xx, every, bad = audit("/rl-wh", "webhook", LO, HI)
        t.is_(len(ok2xx), N, "all 1,000 trades arrived at the tracker")
        t.ok(all(len(v) == 1 for v in every.values()) and not bad,
             "... each exactly once, under its own Idempotency-Key",
             "\n".join(bad[:10]) + repr({k: len(v) for k, v in every.items() if len(v) != 1}))
        times = sorted(r.time for v in every.values() for r in v)
        peak, at, j = 0, None, 0
        for i, x in enumerate(times):
            while j < len(times) and times[j] < x + 1.0:
                j += 1
            if j - i > peak:
                peak, at = j - i, x - times[0]
        span = (times[-1] - times[0]) if times else 0
        t.ok(times and peak <= RATE + BURST,
             "no 1-second window at the sink holds more than %d requests (rate %d + burst %d): "
             "at most %d, in the window %.2f s after the first" % (RATE + BURST, RATE, BURST,
                                                                   peak, at or 0))
        t.ok(span >= (N - RATE - BURST) / RATE,
             "... so the 1,000 took at least %.1f s: %.2f s (%.0f requests/s)"
             % ((N - RATE - BURST) / RATE, span, N / span if span else 0))
        t.ok(span <= 2.0 * N / RATE,
             "the limit does not hold them back much more than it should: %.2f s <= %.0f s"
             % (span, 2.0 * N / RATE))
        claimed = {p for _, d in owners.samples for p, n in d.items() if p is not None}
        t.ok(pids and set(pids) <= claimed,
             "both workers claimed rows (the bucket is shared by the workers)",
             "workers %r, lease owners seen %r" % (pids, sorted(claimed)))
        th1 = throttled("webhook")
        t.ok(th1 is not None and th1 > 0 and th1 > (th0 or 0),
             "trust_trace_throttled_total{adapter=\"webhook\"} grew: %r -> %r" % (th0, th1))
        t.is_(throttled("myfxbook"), 0.0, "... and stayed 0 for myfxbook, which had no due "
              "row to hold back (the counter counts claims cut short, not plans)")

        # Idle with the limit still on: nothing is due, so there is nothing
        # to claim or hold back, and the workers run no statement between
        # passes (README, How it works), as 12_burst_and_wakes.t checks
        # without a limit.
        time.sleep(1.0)
        q0 = dict(env.sql("SELECT pid, query_start FROM pg_stat_activity "
                          "WHERE backend_type = 'trace_ext worker'"))
        th_idle = [throttled(a) for a in ("myfxbook", "webhook", "file")]
        time.sleep(2.0)         # 20 x trace.poll_interval (100ms): the window observed
        q1 = dict(env.sql("SELECT pid, query_start FROM pg_stat_activity "
                          "WHERE backend_type = 'trace_ext worker'"))
        t.ok(len(q0) == WORKERS and q0 == q1,
             "idle with the rate limit on, the workers run no statement (query_start "
             "unchanged over 2 s)", "before %r\nafter  %r" % (q0, q1))
        th_after = [throttled(a) for a in ("myfxbook", "webhook", "file")]
        t.is_(th_after, th_idle, "... and trust_trace_throttled_total (myfxbook, webhook, "
              "file) does not grow while nothing is due")
        env.set_gucs({"trace.max_requests_per_second": 0})
        env.sql("DELETE FROM trades WHERE trade_id BETWEEN %s AND %s", (LO, HI))

    with t.case("kill -9 of a worker while the breaker is open"):
        BATCH = 10
        env.set_gucs({"trace.batch_size": BATCH})
        env.sink.set_behaviour("/k-wh", default=503)
        env.point("webhook", "/k-wh")
        LO, N = 4_100_000, 20
        HI = LO + N - 1
        listener = listen()
        got = []
        t_close = time.time()
        close_range(LO, HI)
        opened = wait_until(lambda: health("webhook").get("state") in ("open", "half_open"),
                            10, 0.05)
        h = health("webhook")
        t.ok(opened, "the tracker answers 503: the webhook breaker opens", repr(h))
        t.ok(wait_until(lambda: events(notes(listener, got, 0.05), "breaker_open"), 5, 0),
             "NOTIFY trace_alert breaker_open", repr(got))
        # From now on the tracker takes 1 s to answer 503: after the
        # restart, the rebuilt breaker is seen closed before the first
        # answers come back.
        env.sink.set_behaviour("/k-wh", default="delay:1.0:503")
        time.sleep(0.5)
        counts = status_counts(LO, HI)
        t.ok(not counts.get("abandoned") and not counts.get("delivered"),
             "before the kill: %r, nothing abandoned" % counts)
        before = [r for r in env.sink.requests("/k-wh")]
        pid = env.worker_pid()
        log_from = env.cluster.log_size()
        kill_time = time.time()
        n_before = len(before)
        bound0 = THRESHOLD + WORKERS * BATCH + max_probes(kill_time - t_close)
        t.ok(n_before <= bound0,
             "requests while it was down, before the kill: %d <= threshold %d + in flight %d "
             "x %d + probes %d = %d" % (n_before, THRESHOLD, WORKERS, BATCH,
                                        max_probes(kill_time - t_close), bound0))
        listener.close()
        os.kill(pid, signal.SIGKILL)
        rx = re.compile(re.escape(REINIT) + r".*" + re.escape(READY), re.S)
        ready = wait_until(lambda: rx.search(env.cluster.log_text(log_from)), 60, 0.02)
        t_ready = time.time()
        t.ok(ready, "kill -9 of worker %d: the postmaster restarted every process" % pid)
        env.reconnect(retry_for=30)
        states = Sampler(webhook_state, 0.02)
        samplers.append(states)
        states.start()
        listener = listen()
        got = []
        first = wait_until(lambda: states.samples, 10, 0.01)
        h = health("webhook")
        s0 = states.samples[0][1] if first else None
        t.ok(s0 is not None and s0[0] == "closed" and s0[1] == 0 and not s0[2],
             "right after the restart the webhook breaker is closed, 0 failures, no probe "
             "(rebuilt, not kept)", "first sample %r; view %r" % (s0, h))
        t.diag("since after the restart: %r (kill at %.3f)" % (h.get("since"), kill_time))
        reopened = wait_until(lambda: health("webhook").get("state") in ("open", "half_open"),
                              15, 0.05)
        t_reopen = time.time()
        t.ok(reopened, "it opens again after the threshold (%.1f s after the restart)"
             % (t_reopen - t_ready))
        # The sampler's own session may not have seen the change yet when
        # this one has: give it a moment before reading its samples.
        wait_until(lambda: any(x[1][0] != "closed" for x in states.samples), 5, 0.02)
        seq = [x[1][0] for x in states.samples]
        runs = [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]
        t.ok(runs[:1] == ["closed"] and len(runs) > 1 and runs[1] in ("open", "half_open"),
             "the view after the restart: closed, then open (%s)" % " -> ".join(runs)[:200])
        t.ok(wait_until(lambda: events(notes(listener, got, 0.05), "breaker_open"), 5, 0),
             "NOTIFY trace_alert breaker_open again", repr(got))
        log = env.cluster.log_text(log_from)
        t.ok(re.search(OPEN_WARNING % "webhook", log, re.M),
             "WARNING: tracker webhook is failing: breaker open ... (after the restart)")
        time.sleep(2.5)                                     # a few probes, 1 s each
        env.sink.set_behaviour("/k-wh", default=200)
        t_up = time.time()
        after = [r for r in env.sink.requests("/k-wh") if r.time >= kill_time and r.time < t_up]
        bound1 = THRESHOLD + WORKERS * BATCH + max_probes(t_up - t_ready)
        t.ok(len(after) <= bound1,
             "requests after the restart, until the tracker answers: %d <= threshold %d + in "
             "flight %d x %d + probes %d = %d" % (len(after), THRESHOLD, WORKERS, BATCH,
                                                 max_probes(t_up - t_ready), bound1))
        done = wait_all_delivered(LO, HI, N, 30)
        counts = status_counts(LO, HI)
        t.ok(done, "nothing lost: all %d rows delivered once the tracker answers" % N,
             repr(counts))
        t.ok(not counts.get("abandoned"), "0 abandoned", repr(counts))
        ok2xx, every, bad = audit("/k-wh", "webhook", LO, HI)
        t.is_(sorted(ok2xx), list(range(LO, HI + 1)), "every trade reached the tracker")
        t.ok(all(len(v) == 1 for v in ok2xx.values()), "... with exactly one 2xx each",
             repr({k: len(v) for k, v in ok2xx.items() if len(v) != 1}))
        t.ok(not bad, "every request under its own Idempotency-Key", "\n".join(bad[:10]))
        closed = wait_until(lambda: health("webhook").get("state") == "closed", 10, 0.05)
        t.ok(closed and wait_until(lambda: events(notes(listener, got, 0.05), "breaker_closed"),
                                   5, 0),
             "breaker closed again, NOTIFY breaker_closed", repr(got))
        t.ok(re.search(CLOSED_WARNING % "webhook", env.cluster.log_text(log_from), re.M),
             "WARNING: tracker webhook answers again: breaker closed ...")
        states.halt()
        listener.close()
        log = env.cluster.log_text(log_from)
        t.is_(log.count(REINIT), 1, "exactly one crash-restart")
        att = env.sql1("SELECT max(attempts) FROM trace.trace_queue "
                       "WHERE trade_id BETWEEN %s AND %s", (LO, HI))
        t.diag("%d requests before the kill, %d after it until the return; max attempts %s"
               % (n_before, len(after), att))
finally:
    for s in samplers:
        try:
            s.halt()
        except Exception:
            pass
    env.close()

sys.exit(t.done())
