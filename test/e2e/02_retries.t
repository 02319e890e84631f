#!/usr/bin/python3
"""Failures and retries, end to end: a tracker that fails then recovers,
one that always fails (abandon, NOTIFY trace_alert, WARNING), permanent
rejections, Retry-After, redirects not followed, the operator functions
that re-deliver abandoned rows, and the backoff schedule itself.

The rule (README.md, Failure semantics): retry n waits min(base * 6^(n-1), cap) +- up to
10 % jitter, computed when the failure is recorded: due_at = record time
+ that delay.  The checks read the delay the worker wrote, due_at minus
now() of the transaction that recorded the failure (test/lib/outcome_log.py),
so the bands are those of the rule, with no slack for the test's timing;
and a retry must not reach the tracker before that due_at.

Settings: trace.retry_backoff_base = 200ms, trace.max_retries = 2 (so
0.2 s, then 1.2 s); the last case switches to base 100ms, cap 2s,
max_retries 4 (0.1, 0.6, then 3.6 and 21.6 capped to 2 s) over 20 rows."""

import json
import select
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from outcome_log import OutcomeLog, backoff, in_band  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

BASE = 0.2          # trace.retry_backoff_base, seconds
CAP = 3600.0        # trace.retry_backoff_cap (default), seconds

t = Tap()
# Per-row failure rules: the trackers' breakers (tests 24, 25) are off.
env = TraceEnv.start_or_exit(t, gucs={"trace.breaker_threshold": 0, "trace.max_retries": 2}, name="trace_e2e_retries")
log = OutcomeLog(env).install()


def webhook_trade():
    """A trade of an opted-in user on signal 11 ({webhook}), closed."""
    tid = env.new_trade(user_id=1, signal_id=11)
    env.close_trade(tid)
    return tid


def fmt(outcomes):
    return "\n".join("attempt %(attempts)s %(status)s http=%(http)s delay=%(delay).6f s" % o
                      for o in outcomes)


def check_schedule(outcomes, reqs, base, cap, label):
    """Each recorded retry n waits min(base*6^(n-1), cap) +- 10 % from the
    time its failure was recorded, and the next request did not reach the
    tracker before that due_at."""
    for o in (o for o in outcomes if o["status"] == "pending"):
        n = o["attempts"]
        nominal = backoff(n, base, cap)
        t.ok(in_band(o["delay"], nominal),
             "%s: retry %d scheduled %.3f s +- 10 %% after the failure was recorded "
             "(min(base*6^%d, cap)): %.6f s" % (label, n, nominal, n - 1, o["delay"]),
             fmt(outcomes))
        nxt = reqs[n:n + 1]         # reqs[0] is attempt 1; retry n is attempt n + 1
        t.ok(nxt and nxt[0].time >= o["due_epoch"] - 0.001,
             "%s: retry %d reached the tracker no earlier than its due_at" % (label, n),
             "request at %r, due_at %.3f" % ([r.time for r in nxt], o["due_epoch"]))


try:
    with t.case("503, 503, 200: delivered on attempt 3 after backoff"):
        env.sink.set_behaviour("/r503", 503, 503, 200)
        env.point("webhook", "/r503")
        tid = webhook_trade()
        rows = env.wait_status(tid, "webhook", ["delivered", "abandoned"], 20)
        r = rows.get("webhook", {})
        t.ok(r.get("status") == "delivered" and r.get("attempts") == 3,
             "status delivered with attempts = 3", repr(r))
        reqs = env.reqs_for(tid, "webhook", "/r503")
        t.is_(len(reqs), 3, "three requests reached the tracker")
        t.is_({x.header("Idempotency-Key") for x in reqs}, {"%d-webhook" % tid},
              "the same Idempotency-Key on every attempt")
        rec = log.outcomes(tid, "webhook")
        t.is_([(o["attempts"], o["status"], o["http"]) for o in rec],
              [(1, "pending", 503), (2, "pending", 503), (3, "delivered", 200)],
              "recorded: retry after 503, retry after 503, delivered", fmt(rec))
        check_schedule(rec, reqs, BASE, CAP, "503,503,200")
        ids = [x[0] for x in env.sql("SELECT trade_id FROM trace.failures")]
        t.ok(tid in ids, "a row that failed before it was delivered is in trace.failures")

    with t.case("always 500: abandoned after max_retries, NOTIFY and WARNING"):
        listener = env.cluster.connect("trades")
        listener.cursor().execute("LISTEN trace_alert")
        env.sink.set_behaviour("/r500", default=500)
        env.point("webhook", "/r500")
        log_from = env.cluster.log_size()
        tid = webhook_trade()
        t_500 = tid
        rows = env.wait_status(tid, "webhook", ["abandoned", "delivered"], 20)
        r = rows.get("webhook", {})
        t.ok(r.get("status") == "abandoned" and r.get("attempts") == 3,
             "abandoned after 1 + trace.max_retries (2) = 3 attempts", repr(r))
        reqs = env.reqs_for(tid, "webhook", "/r500")
        t.is_(len(reqs), 3, "three requests reached the tracker")
        rec = log.outcomes(tid, "webhook")
        t.is_([(o["attempts"], o["status"]) for o in rec],
              [(1, "pending"), (2, "pending"), (3, "abandoned")],
              "recorded: two retries, then abandoned", fmt(rec))
        check_schedule(rec, reqs, BASE, CAP, "always 500")
        t.ok(r.get("last_http_status") == 500 and "500" in (r.get("last_error") or ""),
             "last_http_status 500, last_error names it", repr(r))

        notes = []

        def got_note():
            if select.select([listener], [], [], 0.1)[0]:
                listener.poll()
                notes.extend(listener.notifies)
                listener.notifies.clear()
            return [n for n in notes if n.channel == "trace_alert"]
        alerts = wait_until(got_note, 5, 0)
        payload = None
        if alerts:
            try:
                payload = json.loads(alerts[0].payload)
            except ValueError:
                payload = alerts[0].payload
        t.ok(isinstance(payload, dict)
             and set(payload) >= {"id", "trade_id", "adapter", "attempts", "last_error"},
             "NOTIFY trace_alert with a JSON payload {id, trade_id, adapter, attempts, last_error}",
             "notifications: %r" % ([(n.channel, n.payload) for n in notes],))
        if isinstance(payload, dict):
            t.ok(payload.get("id") == r.get("id") and payload.get("trade_id") == tid
                 and payload.get("adapter") == "webhook" and payload.get("attempts") == 3
                 and "500" in str(payload.get("last_error")),
                 "... whose values are the abandoned row's", repr(payload))
        listener.close()
        m = env.cluster.wait_for_log(
            r"WARNING:  giving up on trade %d for adapter webhook after 3 attempts"
            % tid, since=log_from, timeout=5)
        t.ok(m is not None, "WARNING in the server log names the trade and the adapter",
             lambda: env.cluster.log_text(log_from)[-2000:])

    with t.case("422: abandoned at once"):
        env.sink.set_behaviour("/r422", default=422)
        env.point("webhook", "/r422")
        tid = webhook_trade()
        t_422 = tid
        rows = env.wait_status(tid, "webhook", ["abandoned", "delivered"], 10)
        r = rows.get("webhook", {})
        t.ok(r.get("status") == "abandoned" and r.get("attempts") == 1,
             "a permanent rejection is abandoned after 1 attempt", repr(r))
        t.ok(r.get("last_http_status") == 422 and "422" in (r.get("last_error") or ""),
             "last_http_status 422, last_error names it", repr(r))
        t.is_(len(env.reqs_for(tid, "webhook", "/r422")), 1, "one request reached the tracker")

    for code in (429, 503):
        with t.case("%d with Retry-After: 2" % code):
            path = "/ra%d" % code
            env.sink.set_behaviour(path, "%d;Retry-After=2" % code, default=200)
            env.point("webhook", path)
            tid = webhook_trade()
            rows = env.wait_status(tid, "webhook", ["delivered", "abandoned"], 15)
            r = rows.get("webhook", {})
            t.ok(r.get("status") == "delivered" and r.get("attempts") == 2,
                 "delivered on the second attempt", repr(r))
            reqs = env.reqs_for(tid, "webhook", path)
            rec = log.retries(tid, "webhook")
            t.ok(len(rec) == 1 and 2.0 - 2e-6 <= rec[0]["delay"] <= 2.0 + 2e-6,
                 "the retry was scheduled exactly 2 s after the failure was recorded "
                 "(Retry-After beats the 0.2 s backoff)", fmt(rec))
            t.ok(len(reqs) == 2 and rec and reqs[1].time >= rec[0]["due_epoch"] - 0.001,
                 "... and reached the tracker no earlier than that",
                 "requests at %r, due_at %r" % ([r.time for r in reqs],
                                               [o["due_epoch"] for o in rec]))

    with t.case("302: redirect not followed"):
        env.sink.set_behaviour("/r302", default={
            "status": 302, "headers": {"Location": env.sink.url("/redirect-target")}})
        env.sink.set_behaviour("/redirect-target", default=200)
        env.point("webhook", "/r302")
        tid = webhook_trade()
        t_302 = tid
        rows = env.wait_rows(tid, lambda rs: rs.get("webhook", {}).get("attempts", 0) >= 1
                             and rs["webhook"]["last_http_status"] is not None, 10)
        r = rows.get("webhook", {})
        t.ok(r.get("last_http_status") == 302 and r.get("status") != "delivered",
             "a 302 is a recorded failure with last_http_status 302", repr(r))
        f = env.sqld("SELECT * FROM trace.failures WHERE trade_id = %s", (tid,))
        t.ok(len(f) == 1 and f[0]["last_http_status"] == 302,
             "... visible in trace.failures", repr(f))
        rows = env.wait_status(tid, "webhook", ["abandoned", "delivered"], 15)
        r = rows.get("webhook", {})
        t.ok(r.get("status") == "abandoned" and r.get("attempts") == 3,
             "a 302 is retried (not permanent), then abandoned", repr(r))
        t.is_(len(env.sink.requests("/redirect-target")), 0,
              "the Location was never requested")

    with t.case("trace.retry(id) and trace.retry_abandoned()"):
        env.sink.set_behaviour("/ok", default=200)
        env.point("webhook", "/ok")
        rid = env.rows(t_500)["webhook"]["id"]
        t.is_(env.sql1("SELECT trace.retry(%s)", (rid,)), True,
              "trace.retry(id) of an abandoned row returns true")
        rows = env.wait_status(t_500, "webhook", "delivered", 10)
        t.is_(rows.get("webhook", {}).get("status"), "delivered", "... and it is re-delivered")
        t.is_(len(env.reqs_for(t_500, "webhook", "/ok")), 1, "... once, to the current endpoint")
        t.is_(env.sql1("SELECT trace.retry(%s)", (rid,)), False,
              "trace.retry(id) of a delivered row returns false")
        t.is_(env.rows(t_500)["webhook"]["status"], "delivered", "... and changes nothing")
        n_ab = env.sql1("SELECT count(*) FROM trace.trace_queue WHERE status = 'abandoned'")
        t.is_(n_ab, 2, "two rows are abandoned (the 422 and the 302)")
        t.is_(env.sql1("SELECT trace.retry_abandoned()"), 2,
              "trace.retry_abandoned() returns the number of rows re-armed")
        rows = [env.wait_status(x, "webhook", "delivered", 10) for x in (t_422, t_302)]
        t.ok(all(r.get("webhook", {}).get("status") == "delivered" for r in rows),
             "... and they are re-delivered", repr(rows))
        t.is_(env.sql1("SELECT trace.retry_abandoned()"), 0,
              "trace.retry_abandoned() with nothing abandoned returns 0")

    with t.case("the schedule up to trace.retry_backoff_cap, with jitter, over 20 rows"):
        base, cap, retries = 0.1, 2.0, 4
        env.set_gucs({"trace.retry_backoff_base": "100ms", "trace.retry_backoff_cap": "2s",
                      "trace.max_retries": retries})
        env.sink.set_behaviour("/sched", default=500)
        env.point("webhook", "/sched")
        tids = [env.new_trade(user_id=1, signal_id=11) for _ in range(20)]
        env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912,
                          closed_at = now(), pnl = 1, fees = 0.5
                    WHERE trade_id = ANY(%s)""", (tids,))

        def all_abandoned():
            return env.sql1("SELECT count(*) FROM trace.trace_queue WHERE trade_id = ANY(%s) "
                            "AND status IN ('abandoned', 'delivered')", (tids,)) == len(tids)
        t.ok(wait_until(all_abandoned, 40, 0.2),
             "the 20 rows failing with 500 all ended (abandoned)")
        rows = env.sqld("SELECT trade_id, status, attempts FROM trace.trace_queue "
                        "WHERE trade_id = ANY(%s) ORDER BY trade_id", (tids,))
        bad = [r for r in rows if (r["status"], r["attempts"]) != ("abandoned", retries + 1)]
        t.ok(len(rows) == 20 and not bad,
             "each abandoned after 1 + trace.max_retries (%d) = %d attempts"
             % (retries, retries + 1), repr(bad or rows))
        recs = {x: log.outcomes(x, "webhook") for x in tids}
        shape = [(n, "pending") for n in range(1, retries + 1)] + [(retries + 1, "abandoned")]
        bad = {x: [(o["attempts"], o["status"]) for o in r] for x, r in recs.items()
               if [(o["attempts"], o["status"]) for o in r] != shape}
        t.ok(not bad, "each row recorded %d retries, then abandoned" % retries, repr(bad))
        for n in range(1, retries + 1):
            nominal = backoff(n, base, cap)
            delays = sorted(o["delay"] for r in recs.values() for o in r
                            if o["attempts"] == n and o["status"] == "pending")
            out = [d for d in delays if not in_band(d, nominal)]
            t.ok(len(delays) == 20 and not out,
                 "retry %d of all 20 rows scheduled min(%.1f*6^%d, %.0f) = %.1f s +- 10 %% after "
                 "the failure was recorded" % (n, base, n - 1, cap, nominal),
                 "delays: %s" % ", ".join("%.6f" % d for d in delays))
            spread = (max(delays) - min(delays)) if delays else 0
            t.ok(delays and min(delays) < nominal < max(delays) and spread >= 0.05 * nominal,
                 "retry %d: the 20 delays differ (jitter), on both sides of %.1f s "
                 "(%.3f .. %.3f s)" % (n, nominal, min(delays or [0]), max(delays or [0])),
                 "delays: %s" % ", ".join("%.6f" % d for d in delays))
        late = []
        for x in tids:
            reqs = env.reqs_for(x, "webhook", "/sched")
            if len(reqs) != retries + 1 or {r.header("Idempotency-Key") for r in reqs} \
                    != {"%d-webhook" % x}:
                late.append("trade %d: %d requests, keys %r" % (
                    x, len(reqs), sorted({r.header("Idempotency-Key") for r in reqs})))
                continue
            for o in recs[x]:
                if o["status"] == "pending" and reqs[o["attempts"]].time < o["due_epoch"] - 0.001:
                    late.append("trade %d: retry %d reached the tracker %.3f s before its due_at"
                                % (x, o["attempts"], o["due_epoch"] - reqs[o["attempts"]].time))
        t.ok(not late, "each row: %d requests with its own Idempotency-Key, no retry before "
             "its due_at" % (retries + 1), "\n".join(late[:20]))

    with t.case("no personal data, secrets only where they belong"):
        env.check_no_pii("retries")
finally:
    env.close()

sys.exit(t.done())
