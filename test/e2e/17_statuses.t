#!/usr/bin/python3
"""What each HTTP status does, per adapter, and the worker's own clean-up.

Table-driven over both HTTP adapters (myfxbook and webhook, each at its own
path of the sink): a permanent rejection (400, 404, 405, 410, 413, 422) is
abandoned after its one attempt; every other failure (401, 403, 408, 429,
500, 503, and a 4xx nobody lists, 418) is retried on the backoff schedule
(the row stays pending, attempts grows) and delivered once the tracker
answers 200.  Retry-After as an HTTP date is honoured (due_at no earlier
than that date), and a Retry-After of 999999 s is capped at 24 h.  With a
small trace.ttl the worker deletes rows older than it by itself, without
anyone calling trace.cleanup(), and says so in the log.

The sink answers each path from a script consumed in arrival order; the
trades of a round are closed together, so which row got which status is
read from the sink (what it answered to each request) and compared with
what the queue recorded for that attempt (test/lib/outcome_log.py).

Settings: trace.max_retries = 2, trace.retry_backoff_base = 100ms."""

import email.utils
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from outcome_log import OutcomeLog, backoff, in_band  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

PERMANENT = (400, 404, 405, 410, 413, 422)
RETRIED = (401, 403, 408, 429, 500, 503, 418)
BOTH = ("myfxbook", "webhook")
PATHS = {"myfxbook": "/status-mfx", "webhook": "/status-wh"}
BASE = 0.1
CAP = 3600.0
MAX_RETRIES = 2
DAY = 24 * 3600

t = Tap()
# Per-row failure rules: the trackers' breakers (tests 24, 25) are off.
env = TraceEnv.start_or_exit(t, gucs={"trace.breaker_threshold": 0, "trace.max_retries": MAX_RETRIES,
                                      "trace.retry_backoff_base": "100ms"},
                             name="trace_e2e_statuses")
log = OutcomeLog(env).install()


def close_trades(n):
    """n trades on signal 10 (myfxbook and webhook), closed in one statement."""
    tids = [env.new_trade(user_id=1, signal_id=10) for _ in range(n)]
    env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912,
                      closed_at = now(), pnl = 1, fees = 0.5
                WHERE trade_id = ANY(%s)""", (tids,))
    return tids


def ended(tids, statuses=("abandoned", "delivered")):
    return env.sql1("SELECT count(*) FROM trace.trace_queue WHERE trade_id = ANY(%s) "
                    "AND status = ANY(%s)", (tids, list(statuses))) == 2 * len(tids)


def answered(req):
    """The status the sink answered a request with ('hang' if none)."""
    r = req.response or {}
    return "hang" if r.get("hang") else r.get("status")


def fmt(outcomes):
    return "\n".join("attempt %(attempts)s %(status)s http=%(http)s delay=%(delay).6f" % o
                     for o in outcomes)


try:
    env.set_gucs({"trace.myfxbook_webhook_url": env.sink.url(PATHS["myfxbook"]),
                  "trace.webhook_endpoint": env.sink.url(PATHS["webhook"])})
    env.paths.update(PATHS)

    with t.case("permanent rejections: abandoned after 1 attempt"):
        for a in BOTH:
            env.sink.set_behaviour(PATHS[a], *PERMANENT, default=200)
        tids = close_trades(len(PERMANENT))
        t.ok(wait_until(lambda: ended(tids), 15, 0.1),
             "the %d rows of each adapter ended" % len(PERMANENT))
        for a in BOTH:
            seen = {}
            for tid in tids:
                reqs = env.reqs_for(tid, a, PATHS[a])
                row = env.rows(tid).get(a, {})
                rec = log.outcomes(tid, a)
                if len(reqs) != 1:
                    t.fail("%s, trade %d: exactly one request" % (a, tid),
                           "%d requests, answered %r" % (len(reqs), [answered(r) for r in reqs]))
                    continue
                code = answered(reqs[0])
                seen[code] = tid
                t.ok(row.get("status") == "abandoned" and row.get("attempts") == 1
                     and row.get("last_http_status") == code
                     and ("%s" % code) in (row.get("last_error") or ""),
                     "%s: HTTP %s: abandoned after 1 attempt, last_http_status %s"
                     % (a, code, code), repr(row))
                t.is_([(o["attempts"], o["status"], o["http"]) for o in rec],
                      [(1, "abandoned", code)],
                      "%s: HTTP %s: recorded once, as abandoned (never pending)" % (a, code),
                      fmt(rec))
            t.is_(sorted(seen), sorted(PERMANENT),
                  "%s: each of %s was answered once" % (a, ", ".join(map(str, PERMANENT))))

    with t.case("other failures: retried on the backoff schedule, then delivered"):
        # Each status twice: every row fails twice (attempts 1 and 2), then
        # the third attempt, the last of 1 + trace.max_retries, gets 200.
        script = [c for c in RETRIED for _ in range(2)]
        for a in BOTH:
            env.sink.set_behaviour(PATHS[a], *script, default=200)
        tids = close_trades(len(RETRIED))
        t.ok(wait_until(lambda: ended(tids), 20, 0.1),
             "the %d rows of each adapter ended" % len(RETRIED))
        for a in BOTH:
            seen = {}
            for tid in tids:
                reqs = env.reqs_for(tid, a, PATHS[a])
                codes = [answered(r) for r in reqs]
                row = env.rows(tid).get(a, {})
                rec = log.outcomes(tid, a)
                for c in codes[:-1]:
                    seen[c] = seen.get(c, 0) + 1
                label = "%s, trade %d (answered %s)" % (a, tid, ", ".join(map(str, codes)))
                t.ok(row.get("status") == "delivered" and row.get("attempts") == len(codes)
                     and codes and codes[-1] == 200 and all(c in RETRIED for c in codes[:-1]),
                     "%s: retried after each failure, delivered when the tracker answered 200"
                     % label, repr(row))
                want = [(i + 1, "pending", c) for i, c in enumerate(codes[:-1])] \
                    + [(len(codes), "delivered", 200)]
                t.is_([(o["attempts"], o["status"], o["http"]) for o in rec], want,
                      "%s: each failure recorded as pending with its status, attempts growing"
                      % label, fmt(rec))
                out = [o for o in rec if o["status"] == "pending"
                       and not in_band(o["delay"], backoff(o["attempts"], BASE, CAP))]
                t.ok(rec and not out,
                     "%s: each retry scheduled min(base*6^(n-1), cap) +- 10 %% after the "
                     "failure was recorded" % label, fmt(rec))
                t.is_({r.header("Idempotency-Key") for r in reqs}, {"%d-%s" % (tid, a)},
                      "%s: the same Idempotency-Key on every attempt" % label)
            t.is_(seen, {c: 2 for c in RETRIED},
                  "%s: each of %s was answered twice, and each time retried"
                  % (a, ", ".join(map(str, RETRIED))))

    with t.case("Retry-After as an HTTP date"):
        when = int(time.time()) + 4
        date = email.utils.formatdate(when, usegmt=True)     # IMF-fixdate
        codes = {"myfxbook": 429, "webhook": 503}
        for a in BOTH:
            env.sink.set_behaviour(PATHS[a], {"status": codes[a], "headers": {"Retry-After": date}},
                                   default=200)
        tid = close_trades(1)[0]
        t.ok(wait_until(lambda: ended([tid], ["delivered"]), 20, 0.1),
             "both rows delivered after the Retry-After date")
        for a in BOTH:
            rec = log.outcomes(tid, a)
            reqs = env.reqs_for(tid, a, PATHS[a])
            t.is_([(o["attempts"], o["status"], o["http"]) for o in rec],
                  [(1, "pending", codes[a]), (2, "delivered", 200)],
                  "%s: %d with Retry-After: %s, then delivered" % (a, codes[a], date), fmt(rec))
            if rec:
                t.ok(rec[0]["due_epoch"] >= when - 1e-6,
                     "%s: due_at no earlier than the Retry-After date (not the 0.1 s backoff)" % a,
                     "due_at %.3f, date %d (%s)" % (rec[0]["due_epoch"], when, date))
            t.ok(len(reqs) == 2 and reqs[1].time >= when,
                 "%s: the retry reached the tracker no earlier than that date" % a,
                 "requests at %r, date %d" % ([r.time for r in reqs], when))

    with t.case("Retry-After: 999999 is capped at 24 h"):
        codes = {"myfxbook": 503, "webhook": 429}
        for a in BOTH:
            env.sink.set_behaviour(PATHS[a], "%d;Retry-After=999999" % codes[a], default=200)
        tid = close_trades(1)[0]
        rec = log.wait(tid, lambda rs: len(rs) >= 2, 15)
        for a in BOTH:
            r = [o for o in rec if o["adapter"] == a]
            t.is_([(o["attempts"], o["status"], o["http"]) for o in r], [(1, "pending", codes[a])],
                  "%s: %d with Retry-After: 999999 is retried later" % (a, codes[a]), fmt(r))
            if r:
                d = r[0]["delay"]
                t.ok(DAY - 1e-6 <= d <= DAY + 1,
                     "%s: due_at is 24 h after the failure was recorded (at least Retry-After, "
                     "up to 24 h), not 999999 s: %.3f s" % (a, d))
            t.is_(env.rows(tid).get(a, {}).get("status"), "pending", "%s: ... and pending" % a)

    with t.case("trace.ttl: the worker deletes old rows by itself"):
        n0 = env.sql1("SELECT count(*) FROM trace.trace_queue")
        since = env.cluster.log_size()
        env.set_gucs({"trace.ttl": "2s"})
        rx = re.compile(r"^(\S+ \S+) \S+ \[\d+\] .*LOG:  deleted (\d+) queue rows "
                        r"older than trace\.ttl", re.M)

        def deleted(since):
            """Rows the worker said it deleted, in the log written after `since`."""
            return sum(int(m.group(2)) for m in rx.finditer(env.cluster.log_text(since)))
        gone = wait_until(lambda: env.sql1("SELECT count(*) FROM trace.trace_queue") == 0, 20, 0.1)
        t.ok(n0 > 0 and gone, "the %d queue rows, older than trace.ttl = 2s, were deleted "
             "without a call to trace.cleanup()" % n0)
        t.ok(wait_until(lambda: deleted(since) == n0, 5),
             "the worker logged \"deleted N queue rows older than trace.ttl\", N adding up "
             "to %d" % n0, lambda: env.cluster.log_text(since)[-3000:])

        def young_row():
            """A row queued now is kept while younger than trace.ttl, then deleted."""
            since = env.cluster.log_size()
            tid = env.new_trade(user_id=1, signal_id=11)
            env.close_trade(tid)
            row = env.rows(tid).get("webhook", {})
            t.ok(row, "a row queued now is there (younger than trace.ttl)")
            created = row.get("created_epoch", 0)
            gone = wait_until(lambda: not env.rows(tid), 20, 0.1)
            t.ok(gone, "... and deleted once older than trace.ttl")
            m = None
            if wait_until(lambda: deleted(since) == 1, 5):
                m = rx.search(env.cluster.log_text(since))
            logged = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(
                tzinfo=timezone.utc).timestamp() if m else None     # log_timezone = UTC
            t.ok(m and logged >= created + 2.0 - 0.001,
                 "the worker logged its deletion (\"deleted 1 queue rows older than "
                 "trace.ttl\"), no earlier than 2 s after it was queued",
                 "created %.3f, logged %r (%s)" % (created, logged, m and m.group(1)))
        if gone:
            young_row()
        else:
            t.skip("a row queued now is deleted once older than trace.ttl",
                   "the old rows were not deleted")

    with t.case("no personal data, secrets only where they belong"):
        env.check_no_pii("statuses")
finally:
    env.close()

sys.exit(t.done())
