#!/usr/bin/python3
"""Tracker health (issue 14), end to end: one circuit breaker per tracker,
Retry-After that pauses the whole tracker, the view trace.tracker_health,
the gauge and counter, the WARNING and NOTIFY, and the LOG line of each
failed attempt.  (The rate limit and kill -9 with the breaker open are in
25_tracker_health_limits.t.)

Time is scaled down, not slept away: trace.retry_backoff_base = 100ms,
trace.retry_backoff_cap = 1s, trace.max_retries = 2, so a row's whole retry
window is 0.1 + 0.6 s (+10 % jitter: 0.77 s), after which today's rule
abandons it; trace.breaker_threshold = 5; trace.batch_size = 10; one
worker.  The sleeps below only pace the phases of an outage; every
assertion is on what the queue, the sink, the view and the log say.

- A tracker (myfxbook) down for 16 s, over 20x that retry window: 8 s
  refusing connections (its URL on a closed loopback port), then 8 s
  answering 503 (after 0.3 s, so that half_open is seen), with 6 trades a
  second closing throughout (signal 10: myfxbook and webhook).  Checks:
  0 abandoned; the failed requests to it during the outage are at most
  threshold (5) + the rows in flight when it opened (<= trace.batch_size x
  workers = 10) + the probes the schedule allows in the outage (probe k
  waits min(base*6^(k-1), cap) after the breaker (re)opened: 0.1, 0.6, 1,
  1, ... s; counted with 0.9x those delays, in case they carry the retry
  rule's jitter, plus one), counted as failed attempts by
  trace._fail_counters() (a refused connection never reaches the sink; the
  503s are counted at the sink too, and must agree); the view went open
  and half_open and back to closed; one WARNING and NOTIFY trace_alert
  breaker_open, one breaker_closed; afterwards every (trade, tracker) got exactly one 2xx,
  every request under its own Idempotency-Key; webhook stayed closed and
  delivered every row on its first attempt within 2 s of the close.
  The LOG lines about its failed attempts during the outage are at most
  threshold + probes + 6 (one line each for the failures before the
  breaker opened, at most 5 + a summary in the round that opens it, then
  one summary line per round while open: per probe, plus one for rows in
  flight when it opened), and every failure is in exactly one line (its
  own or a summary's count); besides them, the worker's lines about the
  breaker itself are the two WARNINGs and at most one per failed probe.
- One poisoned trade among 30 healthy ones (the tracker answers 422 for
  its Idempotency-Key only; then 500 for it only): 422 abandoned after 1
  attempt, 500 after 1 + trace.max_retries = 3; the breaker stays closed
  (consecutive_failures < threshold in every sample), no breaker NOTIFY;
  the others delivered on the first attempt within 2 s; a LOG line per
  failed attempt "delivery of trade N to webhook failed (attempt K): HTTP
  500"; the abandoned row's NOTIFY keeps its old shape (no "event" key).
- 429 with Retry-After: 3, then 503 with Retry-After: 3: paused_until =
  the answer + 3 s (within 1 s), no request to that tracker from any row
  until then (request times at the sink), the other tracker not paused,
  then all delivered, the held-back rows on their first attempt.
- The view: its columns and types, one row per adapter in order, fresh
  state (closed since server start), readable by pg_monitor and by no one
  else; trust_trace_breaker_open and trust_trace_throttled_total in
  trace.prometheus_metrics() (HELP, TYPE, one sample per adapter, 1 while
  open), `promtool check metrics` on an exposition taken with a breaker
  open, the exporter with monitoring/queries.yaml serving the same two
  series, and `promtool test rules` for TraceExtBreakerOpen (fires after
  15 minutes open, not before).
"""

import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from exposition import EXPORTER, Exporter, parse, value  # noqa: E402
from trace_e2e import REPO, TraceEnv, free_port  # noqa: E402

BASE, CAP, RETRIES, THRESHOLD, BATCH, WORKERS = 0.1, 1.0, 2, 5, 10, 1
ADAPTERS = ("myfxbook", "webhook", "file")
BOTH = ("myfxbook", "webhook")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={
    "trace.retry_backoff_base": "100ms",
    "trace.retry_backoff_cap": "1s",
    "trace.max_retries": RETRIES,
    "trace.breaker_threshold": THRESHOLD,
    "trace.batch_size": BATCH,
    "trace.http_timeout": "2000ms",
}, name="trace_e2e_health")

FAILED_LINE = re.compile(
    r"LOG:  (?:trace_ext: )?delivery of trade (\d+) to (\w+) failed \(attempt (\d+)\): (.*)$",
    re.M)
SUMMARY_LINE = re.compile(
    r"LOG:  (?:trace_ext: )?(\d+) (?:more )?failed deliver(?:y|ies) to (\w+) "
    r"(not logged one by one|while its breaker is open) \(([^)]*)\)(.*)$", re.M)
OPEN_WARNING = (r"WARNING:  (?:trace_ext: )?tracker %s is failing: breaker open after (\d+) "
                r"consecutive failures \(last: (.*)\); next probe at (.+)$")
CLOSED_WARNING = r"WARNING:  (?:trace_ext: )?tracker %s answers again: breaker closed after (.+) open"


def max_probes(duration, shrink=0.9):
    """The most probes the schedule lets a breaker send in `duration`
    seconds after it opened: probe k waits min(base*6^(k-1), cap) after
    the breaker (re)opened (counted at `shrink` x, for jitter), plus one
    for a probe at the edge."""
    n, elapsed = 0, 0.0
    while True:
        elapsed += shrink * min(BASE * 6 ** n, CAP)
        if elapsed > duration:
            return n + 1
        n += 1


def fail_counts(adapter):
    """{reason: failed attempts since server start} of an adapter."""
    return {r: int(n) for r, n in env.sql(
        "SELECT reason, fail_total FROM trace._fail_counters() WHERE adapter = %s",
        (adapter,))}


def status_counts(lo, hi, adapter=None):
    return dict(env.sql("SELECT status, count(*) FROM trace.trace_queue "
                        "WHERE trade_id BETWEEN %s AND %s AND (%s::text IS NULL OR adapter = %s) "
                        "GROUP BY status", (lo, hi, adapter, adapter)))


def health(adapter):
    rows = env.sqld("SELECT *, extract(epoch FROM since)::float8 AS since_epoch, "
                    "extract(epoch FROM paused_until)::float8 AS paused_epoch, "
                    "extract(epoch FROM next_probe_at)::float8 AS probe_epoch "
                    "FROM trace.tracker_health WHERE adapter = %s", (adapter,))
    return rows[0] if rows else {}


RUNNING = []        # background threads to stop if a case ends early


def stop_running():
    while RUNNING:
        try:
            RUNNING.pop().stop()
        except Exception:
            pass


class HealthSampler:
    """trace.tracker_health every 20 ms, from its own session, in a thread."""

    def __init__(self):
        self.samples = []       # (time, {adapter: row dict})
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        conn = env.cluster.connect("trades")
        cur = conn.cursor()
        while not self._stop.is_set():
            try:
                cur.execute("SELECT adapter, state, consecutive_failures, "
                            "extract(epoch FROM since)::float8, next_probe_at IS NOT NULL, "
                            "last_error FROM trace.tracker_health")
                rows = {r[0]: {"state": r[1], "failures": r[2], "since": r[3],
                               "probe": r[4], "last_error": r[5]} for r in cur.fetchall()}
                self.samples.append((time.time(), rows))
            except psycopg2.Error as e:
                self.errors.append(str(e))
                break
            self._stop.wait(0.02)
        conn.close()

    def start(self):
        RUNNING.append(self)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        return self

    def states(self, adapter):
        return [s[1][adapter]["state"] for s in self.samples if adapter in s[1]]

    def first(self, adapter, state):
        for ts, rows in self.samples:
            if rows.get(adapter, {}).get("state") == state:
                return ts, rows[adapter]
        return None, None

    def max_failures(self, adapter):
        return max([s[1][adapter]["failures"] or 0 for s in self.samples if adapter in s[1]]
                   or [None])


class Listener:
    """LISTEN trace_alert on its own session; payloads parsed as JSON."""

    def __init__(self):
        self.conn = env.cluster.connect("trades")
        self.conn.cursor().execute("LISTEN trace_alert")
        self.got = []

    def poll(self, wait=0.0):
        if select.select([self.conn], [], [], wait)[0]:
            self.conn.poll()
        for n in self.conn.notifies:
            try:
                self.got.append(json.loads(n.payload))
            except ValueError:
                self.got.append(n.payload)
        self.conn.notifies.clear()
        return self.got

    def events(self, event, adapter=None):
        self.poll()
        return [p for p in self.got if isinstance(p, dict) and p.get("event") == event
                and (adapter is None or p.get("adapter") == adapter)]

    def wait_event(self, event, adapter, timeout=5):
        return wait_until(lambda: self.poll(0.05) is not None
                          and self.events(event, adapter), timeout, 0)

    def close(self):
        self.conn.close()


class Closer:
    """Closes trades (ids given) at a steady rate from its own session."""

    def __init__(self, ids, rate):
        self.ids = list(ids)
        self.rate = rate
        self.closed = []        # (trade_id, time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        conn = env.cluster.connect("trades")
        cur = conn.cursor()
        t0 = time.time()
        for i, tid in enumerate(self.ids):
            if self._stop.is_set():
                break
            cur.execute("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, "
                        "closed_at = now(), pnl = 10, fees = 1 WHERE trade_id = %s", (tid,))
            self.closed.append((tid, time.time()))
            self._stop.wait(max(0.0, t0 + (i + 1) / self.rate - time.time()))
        conn.close()

    def start(self):
        RUNNING.append(self)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        return [x for x, _ in self.closed]

    def join(self, timeout=60):
        """Wait until every trade given is closed."""
        self._thread.join(timeout)
        return [x for x, _ in self.closed]


def audit(paths, ids):
    """Requests at `paths` (path -> adapter) for trades `ids`: {(trade,
    adapter): [2xx-answered requests]}, all requests per pair, and the
    problems (a request for another pair, an Idempotency-Key that is not
    <trade_id>-<adapter> of its own body and path)."""
    ids = set(ids)
    ok2xx, every, bad = {}, {}, []
    for path, adapter in paths.items():
        for r in env.sink.requests(path):
            tid = (r.json() or {}).get("trade_id")
            if tid not in ids:
                bad.append("request #%d to %s for trade %r" % (r.seq, path, tid))
                continue
            key = (tid, adapter)
            if r.header("Idempotency-Key") != "%d-%s" % key:
                bad.append("request #%d for %r has Idempotency-Key %r"
                           % (r.seq, key, r.header("Idempotency-Key")))
            every.setdefault(key, []).append(r)
            if r.response and not r.response.get("hang") and 200 <= r.response["status"] < 300:
                ok2xx.setdefault(key, []).append(r)
    return ok2xx, every, bad


def failed_lines(text, adapter=None):
    return [(int(m.group(1)), m.group(2), int(m.group(3)), m.group(4))
            for m in FAILED_LINE.finditer(text) if adapter in (None, m.group(2))]


def summary_lines(text, adapter=None):
    return [(int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(0))
            for m in SUMMARY_LINE.finditer(text) if adapter in (None, m.group(2))]


open_exposition = None          # trace.prometheus_metrics() taken with a breaker open
exporter = None
try:
    with t.case("the view trace.tracker_health, fresh: columns, rows, privileges"):
        cols = env.sql("SELECT column_name::text, data_type::text FROM information_schema.columns "
                       "WHERE table_schema = 'trace' AND table_name = 'tracker_health' "
                       "ORDER BY ordinal_position")
        t.is_(cols, [("adapter", "text"), ("state", "text"),
                     ("since", "timestamp with time zone"), ("consecutive_failures", "integer"),
                     ("next_probe_at", "timestamp with time zone"),
                     ("paused_until", "timestamp with time zone"), ("last_error", "text")],
              "trace.tracker_health: adapter, state, since, consecutive_failures, next_probe_at, "
              "paused_until, last_error, with their types")
        rows = env.sqld("SELECT h.*, abs(extract(epoch FROM h.since - pg_postmaster_start_time())) "
                        "AS from_start FROM trace.tracker_health h")
        t.is_([r["adapter"] for r in rows], list(ADAPTERS),
              "one row per adapter: myfxbook, webhook, file, in that order")
        t.ok(rows and all(r["state"] == "closed" and r["consecutive_failures"] == 0
                          and r["next_probe_at"] is None and r["paused_until"] is None
                          and r["last_error"] is None for r in rows),
             "every breaker closed, 0 failures, no probe, no pause, no error", repr(rows))
        t.ok(rows and all(r["from_start"] is not None and r["from_start"] < 5 for r in rows),
             "since = server start for a breaker never opened (within 5 s)",
             repr([(r["adapter"], r["since"], r["from_start"]) for r in rows]))

        env.sql("CREATE ROLE health_monitor LOGIN IN ROLE pg_monitor")
        env.sql("CREATE ROLE health_nobody LOGIN")
        mon = env.cluster.connect("trades", user="health_monitor")
        try:
            cur = mon.cursor()
            cur.execute("SELECT adapter, state FROM trace.tracker_health")
            t.is_(len(cur.fetchall()), 3, "a pg_monitor member reads trace.tracker_health")
            cur.execute("SELECT trace.prometheus_metrics()")
            text = cur.fetchone()[0]
            t.ok("trust_trace_breaker_open" in text and "trust_trace_throttled_total" in text,
                 "... and gets the new series from trace.prometheus_metrics()")
        finally:
            mon.close()
        nobody = env.cluster.connect("trades", user="health_nobody")
        try:
            err = None
            try:
                nobody.cursor().execute("SELECT * FROM trace.tracker_health")
            except psycopg2.Error as e:
                err = e
            t.ok(err is not None and err.pgcode == "42501",
                 "a role outside pg_monitor cannot read it (permission denied)", str(err))
        finally:
            nobody.close()

        text = env.sql1("SELECT trace.prometheus_metrics()")
        s = parse(text)
        for fam, typ in (("trust_trace_breaker_open", "gauge"),
                         ("trust_trace_throttled_total", "counter")):
            t.ok("# TYPE %s %s\n" % (fam, typ) in text and "# HELP %s " % fam in text,
                 "trace.prometheus_metrics(): HELP and TYPE %s for %s" % (typ, fam))
            t.is_([value(s, fam, adapter=a) for a in ADAPTERS], [0.0, 0.0, 0.0],
                  "... %s{adapter} is 0 for each of the three adapters" % fam)

    with t.case("a tracker down 16 s (20x its retry window), trades closing throughout"):
        RATE, LEAD, PHASE, TAIL = 6.0, 1.0, 8.0, 1.5
        OUTAGE = 2 * PHASE
        window = 1.1 * (BASE + min(BASE * 6, CAP))
        t.diag("retry window %.2f s (with jitter); outage %.0f s = %.0fx" % (
            window, OUTAGE, OUTAGE / window))
        env.sink.set_behaviour("/o-mfx", default=200)
        env.sink.set_behaviour("/o-wh", default=200)
        env.point("myfxbook", "/o-mfx")
        env.point("webhook", "/o-wh")
        FIRST = 3_000_000
        n = int(math.ceil((LEAD + OUTAGE + TAIL) * RATE)) + 12
        env.add_trades(FIRST, FIRST + n - 1, user_id=1, signal_id=10)
        listener = Listener()
        sampler = HealthSampler().start()
        closer = Closer(range(FIRST, FIRST + n), RATE).start()
        time.sleep(LEAD)

        fail0 = fail_counts("myfxbook")
        log0 = env.cluster.log_size()
        t_down = time.time()
        env.set_gucs({"trace.myfxbook_webhook_url":
                      "http://127.0.0.1:%d/o-mfx" % free_port()})          # refused
        opened = wait_until(lambda: health("myfxbook").get("state") in ("open", "half_open"),
                            PHASE / 2, 0.05)
        mid_a = health("myfxbook")
        t.ok(opened, "refused connections: the myfxbook breaker opens (%.1f s after the URL "
             "change)" % (time.time() - t_down), repr(mid_a))
        t.ok(mid_a.get("consecutive_failures", 0) >= THRESHOLD
             and mid_a.get("next_probe_at") is not None
             and "connect" in (mid_a.get("last_error") or "").lower(),
             "the view while open: consecutive_failures >= %d, next_probe_at set, last_error "
             "names the connect failure" % THRESHOLD, repr(mid_a))
        t.ok(mid_a.get("since_epoch") is not None and mid_a["since_epoch"] >= t_down - 0.01,
             "... since = when it opened (after the tracker went down)", repr(mid_a))
        time.sleep(max(0.0, t_down + PHASE - time.time()))

        env.sink.set_behaviour("/o-down", default="delay:0.3:503")
        t_b = time.time()
        env.point("myfxbook", "/o-down")                                    # 503
        time.sleep(max(0.0, t_b + PHASE / 2 - time.time()))
        mid_b = health("myfxbook")
        open_exposition = env.sql1("SELECT trace.prometheus_metrics()")
        s = parse(open_exposition)
        t.ok(mid_b.get("state") in ("open", "half_open") and mid_b.get("next_probe_at") is not None
             and "503" in (mid_b.get("last_error") or ""),
             "answering 503: still open, last_error HTTP 503", repr(mid_b))
        t.is_((value(s, "trust_trace_breaker_open", adapter="myfxbook"),
               value(s, "trust_trace_breaker_open", adapter="webhook")), (1.0, 0.0),
              "trust_trace_breaker_open: myfxbook 1, webhook 0")
        time.sleep(max(0.0, t_b + PHASE - time.time()))

        env.sink.set_behaviour("/o-down", default=200)                      # back
        t_up = time.time()
        time.sleep(TAIL)
        ids = closer.stop()
        lo, hi = FIRST, FIRST + n - 1
        done = wait_until(lambda: status_counts(lo, hi) == {"delivered": 2 * len(ids)}, 30, 0.2)
        t_done = time.time()
        listener.wait_event("breaker_closed", "myfxbook", 5)
        time.sleep(0.3)
        sampler.stop()
        counts = status_counts(lo, hi)
        t.diag("%d trades closed (%d rows); outage %.1f s; all delivered %.1f s after the "
               "tracker returned" % (len(ids), 2 * len(ids), t_up - t_down, t_done - t_up))
        t.ok(done and not counts.get("abandoned"),
             "0 abandoned: all %d rows delivered once the tracker was back" % (2 * len(ids)),
             repr(counts))
        t.ok(sampler.samples and not sampler.errors, "the view was sampled %d times"
             % len(sampler.samples), repr(sampler.errors[:3]))
        seen = set(sampler.states("myfxbook"))
        t.ok({"open", "half_open"} <= seen,
             "the myfxbook breaker went open and half_open (states seen: %s)" % sorted(seen))
        t.is_(health("myfxbook").get("state"), "closed", "... and is closed again")
        wh = sampler.states("webhook")
        t.ok(wh and set(wh) == {"closed"} and sampler.max_failures("webhook") == 0,
             "webhook: closed with 0 consecutive failures in all %d samples" % len(wh),
             "states %r, max failures %r" % (sorted(set(wh)), sampler.max_failures("webhook")))

        # Requests to the tracker while it was down: its failed attempts.
        fail1 = fail_counts("myfxbook")
        delta = {r: fail1.get(r, 0) - fail0.get(r, 0) for r in set(fail0) | set(fail1)}
        delta = {r: v for r, v in delta.items() if v}
        failures = sum(delta.values())
        probes = max_probes(t_up - t_down)
        bound = THRESHOLD + BATCH * WORKERS + probes
        t.ok(0 < failures <= bound,
             "requests to the tracker during the outage: %d <= threshold %d + rows in flight "
             "when it opened (batch %d x %d worker) + probes in %.1f s (%d) = %d"
             % (failures, THRESHOLD, BATCH, WORKERS, t_up - t_down, probes, bound),
             "failed attempts by reason: %r" % delta)
        t.ok(set(delta) <= {"connect", "http_5xx"},
             "... all of them refused (connect) or answered 503 (http_5xx)", repr(delta))
        down = env.sink.requests("/o-down")
        n503 = [r for r in down if r.response and r.response.get("status") == 503]
        t.ok(len(n503) >= 3 and delta.get("http_5xx") == len(n503),
             "probes went on through the 503 phase: %d requests answered 503 (every one "
             "counted as a failure)" % len(n503), repr(delta))
        rows = env.sqld("SELECT adapter, max(attempts) AS max_attempts FROM trace.trace_queue "
                        "WHERE trade_id BETWEEN %s AND %s GROUP BY adapter", (lo, hi))
        t.ok(rows and all(r["max_attempts"] <= RETRIES + 1 for r in rows),
             "no row used more than 1 + trace.max_retries attempts (rows held back or failing "
             "while open keep their attempts)", repr(rows))

        ok2xx, every, bad = audit({"/o-mfx": "myfxbook", "/o-down": "myfxbook",
                                   "/o-wh": "webhook"}, ids)
        expected = {(x, a) for x in ids for a in BOTH}
        t.is_(set(ok2xx), expected, "every (trade, tracker) got a 2xx",
              lambda: "missing %r" % sorted(expected - set(ok2xx))[:10])
        twice = {k: len(v) for k, v in ok2xx.items() if len(v) != 1}
        t.ok(not twice, "... exactly one each", repr(dict(list(twice.items())[:10])))
        t.ok(not bad, "every request under its own Idempotency-Key", "\n".join(bad[:10]))

        lat = env.sql("SELECT extract(epoch FROM delivered_at - created_at)::float8, attempts "
                      "FROM trace.trace_queue WHERE adapter = 'webhook' "
                      "AND trade_id BETWEEN %s AND %s", (lo, hi))
        slow = [x for x in lat if x[0] is None or x[0] > 2.0 or x[1] != 1]
        t.ok(lat and len(lat) == len(ids) and not slow,
             "the other tracker delivered all %d of its rows on the first attempt, each within "
             "2 s of the close (max %.2f s)" % (len(lat), max([x[0] or 0 for x in lat] or [0])),
             repr(slow[:10]))

        opens = listener.events("breaker_open", "myfxbook")
        closes = listener.events("breaker_closed", "myfxbook")
        t.ok(len(opens) == 1 and len(closes) == 1,
             "NOTIFY trace_alert: one breaker_open and one breaker_closed for myfxbook",
             repr(listener.got))
        if opens:
            p = opens[0]
            t.ok(set(p) >= {"event", "adapter", "consecutive_failures", "last_error",
                            "next_probe_at"}
                 and isinstance(p.get("consecutive_failures"), int)
                 and THRESHOLD <= p["consecutive_failures"] <= THRESHOLD + BATCH
                 and "connect" in str(p.get("last_error")).lower(),
                 "breaker_open: {event, adapter, consecutive_failures (>= %d), last_error "
                 "(connect), next_probe_at}" % THRESHOLD, repr(p))
            try:
                probe_at = env.sql1("SELECT extract(epoch FROM %s::timestamptz)::float8",
                                    (p.get("next_probe_at"),))
            except psycopg2.Error:
                probe_at = None
            t.ok(probe_at is not None and t_down <= probe_at <= t_down + PHASE,
                 "... next_probe_at is a timestamp shortly after the outage began", repr(p))
        if closes:
            p = closes[0]
            t.ok(p.get("adapter") == "myfxbook" and p.get("open_since") is not None,
                 "breaker_closed: {event, adapter, open_since}", repr(p))
        others = [p for p in listener.got if isinstance(p, dict)
                  and p.get("event") in ("breaker_open", "breaker_closed")
                  and p.get("adapter") != "myfxbook"]
        t.ok(not others, "no breaker NOTIFY for webhook", repr(others))
        abandoned_notes = [p for p in listener.got if isinstance(p, dict) and "event" not in p]
        t.ok(not abandoned_notes, "no abandoned-row NOTIFY", repr(abandoned_notes[:5]))
        listener.close()

        log = env.cluster.log_text(log0)
        w_open = re.findall(OPEN_WARNING % "myfxbook", log, re.M)
        w_closed = re.findall(CLOSED_WARNING % "myfxbook", log, re.M)
        t.ok(len(w_open) == 1 and THRESHOLD <= int(w_open[0][0]) <= THRESHOLD + BATCH,
             "one WARNING: tracker myfxbook is failing: breaker open after N consecutive "
             "failures (last: ...); next probe at ...", repr(w_open))
        t.is_(len(w_closed), 1, "one WARNING: tracker myfxbook answers again: breaker closed "
              "after <interval> open", repr(w_closed))
        t.ok(not re.search(OPEN_WARNING % "webhook", log, re.M),
             "no breaker WARNING for webhook")

        # The LOG lines of the failed attempts (the bound: see the docstring).
        one = failed_lines(log, "myfxbook")
        summ = summary_lines(log, "myfxbook")
        total = len(one) + len(summ)
        lbound = THRESHOLD + probes + 6
        t.ok(one and one[0][0] in set(ids) and 1 <= one[0][2] <= RETRIES + 1
             and "connect" in one[0][3].lower(),
             "a failed attempt's LOG line names trade, tracker, attempt and reason: %r"
             % (one[0],) if one else "no 'delivery of trade N to myfxbook failed' line")
        t.ok(0 < total <= lbound,
             "LOG lines about myfxbook failures during the outage: %d (%d one per attempt, %d "
             "summaries) <= threshold %d + probes %d + 6 = %d, for %d failed attempts"
             % (total, len(one), len(summ), THRESHOLD, probes, lbound, failures),
             "\n".join(x[4] for x in summ[:10]))
        counted = len(one) + sum(x[0] for x in summ)
        t.is_(counted, failures, "every failed attempt is in exactly one line (its own, or "
              "a summary's count)", "summaries:\n" + "\n".join(x[4] for x in summ[:20]))
        t.ok(any(x[2] == "while its breaker is open" for x in summ),
             "while open, failures are summarised: 'N failed deliveries to myfxbook while "
             "its breaker is open (reason: N), trades A to B'", "\n".join(x[4] for x in summ))
        t.ok(all(re.search(r"(connect|http_5xx): \d+", x[3]) for x in summ),
             "... each summary counts its failures by reason", "\n".join(x[4] for x in summ))
        t.is_(failed_lines(log, "webhook"), [], "no failed-attempt line for webhook")
        # Everything else the worker logs about the tracker meanwhile: the
        # two WARNINGs, and at most one line per failed probe about the
        # breaker itself ("tracker myfxbook still failing (probe: ...)").
        other = [ln for ln in log.splitlines()
                 if re.search(r"(LOG|WARNING|NOTICE|INFO):  (?:trace_ext: )?tracker myfxbook ", ln)]
        extra = len(other) - len(w_open) - len(w_closed)
        t.ok(extra <= probes and total + len(other) <= lbound + probes + 2,
             "all lines about the outage: %d failed-attempt lines + %d about the breaker (2 "
             "WARNINGs, %d while probing, <= probes %d) <= %d"
             % (total, len(other), extra, probes, lbound + probes + 2),
             "\n".join(other[:20]))

    stop_running()      # threads a failed case left behind
    with t.case("one poisoned trade among healthy ones: 422, then 500 for it alone"):
        for code in (422, 500):
            path = "/poison%d" % code
            poison = env.new_trade(user_id=1, signal_id=11)                 # webhook only
            key = "%d-webhook" % poison
            env.sink.set_behaviour(path, default=200,
                                   hook=lambda r, k=key, c=code:
                                   c if r.header("Idempotency-Key") == k else None)
            env.point("webhook", path)
            first = 3_100_000 + code * 100
            healthy = list(range(first, first + 30))
            env.add_trades(first, first + 29, user_id=1, signal_id=11)
            listener = Listener()
            sampler = HealthSampler().start()
            log0 = env.cluster.log_size()
            env.sql("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(), "
                    "pnl = 10, fees = 1 WHERE trade_id = ANY(%s)", ([poison] + healthy[:10],))
            closer = Closer(healthy[10:], 10.0).start()     # successes throughout its retries
            row = env.wait_status(poison, "webhook", ["abandoned", "delivered"], 15)
            closer.join(30)
            ok = wait_until(lambda: status_counts(first, first + 29, "webhook")
                            == {"delivered": 30}, 15, 0.1)
            time.sleep(0.3)
            sampler.stop()
            r = row.get("webhook", {})
            want = 1 if code == 422 else RETRIES + 1
            t.ok(r.get("status") == "abandoned" and r.get("attempts") == want
                 and r.get("last_http_status") == code,
                 "%d: the poisoned row is abandoned after %d attempt(s), as today" % (code, want),
                 repr(r))
            reqs = env.reqs_for(poison, "webhook", path)
            t.ok(len(reqs) == want and {x.header("Idempotency-Key") for x in reqs} == {key},
                 "%d: %d request(s) for it, same Idempotency-Key" % (code, want),
                 repr([(x.header("Idempotency-Key"), x.response) for x in reqs]))
            t.ok(ok, "%d: the 30 healthy rows are delivered" % code,
                 lambda: repr(status_counts(first, first + 29, "webhook")))
            lat = env.sql("SELECT extract(epoch FROM delivered_at - created_at)::float8, "
                          "attempts FROM trace.trace_queue WHERE adapter = 'webhook' "
                          "AND trade_id BETWEEN %s AND %s", (first, first + 29))
            slow = [x for x in lat if x[0] is None or x[0] > 2.0 or x[1] != 1]
            t.ok(len(lat) == 30 and not slow,
                 "%d: ... each on its first attempt, within 2 s of the close (max %.2f s)"
                 % (code, max([x[0] or 0 for x in lat] or [0])), repr(slow[:5]))
            st = sampler.states("webhook")
            mx = sampler.max_failures("webhook")
            t.ok(st and set(st) == {"closed"} and mx is not None and mx < THRESHOLD,
                 "%d: the webhook breaker stayed closed (%d samples, consecutive_failures at "
                 "most %s < %d)" % (code, len(st), mx, THRESHOLD), repr(sorted(set(st))))
            notes = listener.poll(0.2)
            listener.close()
            t.ok(not [p for p in notes if isinstance(p, dict) and p.get("event")],
                 "%d: no breaker NOTIFY" % code, repr(notes))
            gave_up = [p for p in notes if isinstance(p, dict) and p.get("trade_id") == poison]
            t.ok(len(gave_up) == 1 and set(gave_up[0]) == {"id", "trade_id", "adapter",
                                                           "attempts", "last_error"},
                 "%d: the abandoned row's NOTIFY keeps its shape {id, trade_id, adapter, "
                 "attempts, last_error} (no event key)" % code, repr(notes))
            log = env.cluster.log_text(log0)
            lines = [x for x in failed_lines(log, "webhook") if x[0] == poison]
            t.is_([(x[2], x[3].split(" (")[0]) for x in lines],
                  [(k, "HTTP %d" % code) for k in range(1, want + 1)],
                  "%d: a LOG line per failed attempt: delivery of trade %d to webhook failed "
                  "(attempt k): HTTP %d" % (code, poison, code),
                  lambda: "\n".join(ln for ln in log.splitlines() if "deliver" in ln)[-3000:])
            t.ok(re.search(r"WARNING:  (?:trace_ext: )?giving up on trade %d for adapter webhook "
                           r"after %d attempts" % (poison, want), log),
                 "%d: the give-up WARNING as before" % code)
            t.is_([x for x in failed_lines(log, "webhook") if x[0] != poison], [],
                  "%d: no failure logged for the healthy rows" % code)

    stop_running()      # threads a failed case left behind
    with t.case("429 and 503 with Retry-After: 3 pause the whole tracker"):
        for code in (429, 503):
            path_wh, path_mfx = "/ra%d-wh" % code, "/ra%d-mfx" % code
            env.sink.set_behaviour(path_wh, "%d;Retry-After=3" % code, default=200)
            env.sink.set_behaviour(path_mfx, default=200)
            env.point("webhook", path_wh)
            env.point("myfxbook", path_mfx)
            first_tid = env.new_trade(user_id=1, signal_id=11)
            env.close_trade(first_tid)
            row = env.wait_rows(first_tid, lambda rs: rs.get("webhook", {}).get(
                "last_http_status") == code and rs["webhook"]["status"] == "pending", 10)
            reqs = env.sink.requests(path_wh)
            t.ok(len(reqs) == 1 and row.get("webhook", {}).get("last_http_status") == code,
                 "%d: the first request was answered %d Retry-After: 3 and recorded"
                 % (code, code), repr(row))
            t0 = reqs[0].time if reqs else time.time()
            h = health("webhook")
            t.ok(h.get("paused_epoch") is not None
                 and t0 + 3.0 <= h["paused_epoch"] <= t0 + 4.0,
                 "%d: trace.tracker_health.paused_until = the answer + 3 s (%.3f s after the "
                 "request)" % (code, (h.get("paused_epoch") or 0) - t0), repr(h))
            t.ok(h.get("state") == "closed", "%d: one failure does not open the breaker" % code,
                 repr(h))
            t.is_(health("myfxbook").get("paused_until"), None, "%d: myfxbook is not paused" % code)
            more = []
            both = None
            for i in range(10):
                tid = env.new_trade(user_id=1, signal_id=11)
                env.close_trade(tid)
                more.append(tid)
                if i == 4:
                    both = env.new_trade(user_id=1, signal_id=10)
                    env.close_trade(both)
                time.sleep(0.15)
            ok = wait_until(lambda: all(env.rows(x).get("webhook", {}).get("status")
                                        == "delivered" for x in [first_tid, both] + more),
                            15, 0.1)
            t.ok(ok, "%d: then all 12 webhook rows are delivered" % code)
            later = [r for r in env.sink.requests(path_wh)
                     if r.seq != (reqs[0].seq if reqs else 0)]
            early = [(r.seq, round(r.time - t0, 3)) for r in later
                     if r.time < t0 + 3.0 or (h.get("paused_epoch") and r.time < h["paused_epoch"])]
            t.ok(len(later) == 12 and not early,
                 "%d: no request to webhook from any row until paused_until (%d later "
                 "requests, the first %.2f s after the %d)"
                 % (code, len(later), min([r.time for r in later] or [t0]) - t0, code),
                 "too early (seq, s after the answer): %r" % early)
            mfx = env.reqs_for(both, "myfxbook", path_mfx)
            t.ok(mfx and mfx[0].time < t0 + 3.0,
                 "%d: myfxbook was not paused: a trade closed during the pause reached it "
                 "%.2f s after the %d" % (code, (mfx[0].time - t0) if mfx else -1, code))
            att = dict(env.sql("SELECT trade_id, attempts FROM trace.trace_queue "
                               "WHERE adapter = 'webhook' AND trade_id = ANY(%s)",
                               (more + [both],)))
            t.ok(set(att.values()) == {1}, "%d: rows held back by the pause were delivered on "
                 "their first attempt" % code, repr(att))
            t.is_(health("webhook").get("paused_until"), None,
                  "%d: paused_until is NULL again" % code)

    stop_running()      # threads a failed case left behind
    with t.case("promtool, the exporter and the alert rule"):
        if not os.path.exists(PROMTOOL):
            t.skip("promtool check metrics on the exposition with a breaker open",
                   "promtool not installed (apt package prometheus)")
        else:
            p = subprocess.run([PROMTOOL, "check", "metrics"],
                               input=(open_exposition or "").encode(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            t.ok(open_exposition and p.returncode == 0,
                 "promtool check metrics accepts trace.prometheus_metrics() taken while a "
                 "breaker was open", p.stdout.decode())
            p = subprocess.run([PROMTOOL, "check", "rules",
                                str(REPO / "monitoring" / "alerts.yml")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            t.ok(p.returncode == 0, "promtool check rules monitoring/alerts.yml",
                 p.stdout.decode())
            try:
                import yaml
            except ImportError:
                yaml = None
            if yaml is None:
                t.skip("promtool test rules: TraceExtBreakerOpen", "python3-yaml missing")
            else:
                rules = yaml.safe_load((REPO / "monitoring" / "alerts.yml").read_text())
                rule = [r for g in rules["groups"] for r in g["rules"]
                        if r.get("alert") == "TraceExtBreakerOpen"]
                t.ok(len(rule) == 1 and rule[0].get("for") == "15m",
                     "alerts.yml has TraceExtBreakerOpen, for: 15m", repr(rule))
                if rule:
                    ann = {k: v.replace("{{ $labels.adapter }}", "webhook")
                           for k, v in (rule[0].get("annotations") or {}).items()}
                    labels = dict(rule[0].get("labels") or {}, adapter="webhook")
                    d = tempfile.mkdtemp(prefix="trace_rules_")
                    try:
                        spec = {
                            "rule_files": [str(REPO / "monitoring" / "alerts.yml")],
                            "evaluation_interval": "1m",
                            "tests": [{
                                "interval": "1m",
                                "input_series": [
                                    # webhook open from minute 1 to 20; myfxbook never;
                                    # two servers, as the exporter's label makes them.
                                    {"series": 'trust_trace_breaker_open{adapter="webhook",'
                                               'server="a"}', "values": "0 1x20 0x10"},
                                    {"series": 'trust_trace_breaker_open{adapter="webhook",'
                                               'server="b"}', "values": "0x31"},
                                    {"series": 'trust_trace_breaker_open{adapter="myfxbook",'
                                               'server="a"}', "values": "0x31"},
                                ],
                                "alert_rule_test": [
                                    {"eval_time": "15m", "alertname": "TraceExtBreakerOpen",
                                     "exp_alerts": []},
                                    {"eval_time": "17m", "alertname": "TraceExtBreakerOpen",
                                     "exp_alerts": [{"exp_labels": labels,
                                                     "exp_annotations": ann}]},
                                    {"eval_time": "25m", "alertname": "TraceExtBreakerOpen",
                                     "exp_alerts": []},
                                ]}]}
                        f = os.path.join(d, "breaker_test.yml")
                        with open(f, "w") as fh:
                            json.dump(spec, fh)          # JSON is YAML
                        p = subprocess.run([PROMTOOL, "test", "rules", f],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                        t.ok(p.returncode == 0,
                             "promtool test rules: TraceExtBreakerOpen fires for the adapter "
                             "whose breaker is open > 15 min (one alert, whatever the server "
                             "label), not at 15 min, not once it closed", p.stdout.decode())
                    finally:
                        shutil.rmtree(d, ignore_errors=True)

        # Open the webhook breaker, then read both series through the exporter.
        env.set_gucs({"trace.webhook_endpoint": "http://127.0.0.1:%d/x" % free_port()})
        tids = [env.new_trade(user_id=1, signal_id=11) for _ in range(THRESHOLD + 1)]
        env.sql("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(), "
                "pnl = 10, fees = 1 WHERE trade_id = ANY(%s)", (tids,))
        opened = wait_until(lambda: health("webhook").get("state") in ("open", "half_open"),
                            10, 0.05)
        t.ok(opened, "webhook pointed at a closed port: its breaker opens")
        if not os.path.exists(EXPORTER):
            t.skip("the exporter serves trust_trace_breaker_open and trust_trace_throttled_total",
                   "prometheus-postgres-exporter not installed")
        else:
            exporter = Exporter(env.cluster, "health_monitor")
            body = exporter.scrape("trust_trace_breaker_open")
            t.ok(body, "the exporter (monitoring/queries.yaml) serves trust_trace_breaker_open",
                 exporter.output)
            if body:
                exp = parse(body)
                now = parse(env.sql1("SELECT trace.prometheus_metrics()"))
                t.is_(value(exp, "pg_exporter_last_scrape_error"), 0.0,
                      "... every query of queries.yaml ran without error")
                for fam in ("trust_trace_breaker_open", "trust_trace_throttled_total"):
                    got = [value(exp, fam, adapter=a) for a in ADAPTERS]
                    want = [value(now, fam, adapter=a) for a in ADAPTERS]
                    t.ok(None not in got and got == want,
                         "%s{adapter} from the exporter = trace.prometheus_metrics(): %r"
                         % (fam, got), "exporter %r, function %r" % (got, want))
                t.is_(value(exp, "trust_trace_breaker_open", adapter="webhook"), 1.0,
                      "... trust_trace_breaker_open{adapter=\"webhook\"} is 1")
        env.sink.set_behaviour("/ra-wh", default=200)
        env.point("webhook", "/ra-wh")
        closed = wait_until(lambda: health("webhook").get("state") == "closed", 15, 0.1)
        ok = wait_until(lambda: all(env.rows(x).get("webhook", {}).get("status") == "delivered"
                                    for x in tids), 15, 0.1)
        t.ok(closed and ok, "the tracker back: breaker closed, the %d rows delivered" % len(tids))
finally:
    stop_running()
    if exporter is not None:
        exporter.stop()
    env.close()

sys.exit(t.done())
