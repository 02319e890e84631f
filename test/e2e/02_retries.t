#!/usr/bin/python3
"""Failures and retries, end to end: a tracker that fails then recovers
(backoff gaps), one that always fails (abandon, NOTIFY trace_alert,
WARNING), permanent rejections, Retry-After, redirects not followed, and
the operator functions that re-deliver abandoned rows.

Timings: trace.retry_backoff_base = 200ms, so retry n waits
0.2 s * 6^(n-1) +- 10 %: 0.2 s, then 1.2 s; trace.max_retries = 2."""

import json
import select
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

BASE = 0.2          # trace.retry_backoff_base, seconds
SLACK = 1.0         # generous upper slack: poll interval, scheduling, HTTP

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"trace.max_retries": 2}, name="trace_e2e_retries")


def webhook_trade():
    """A trade of an opted-in user on signal 11 ({webhook}), closed."""
    tid = env.new_trade(user_id=1, signal_id=11)
    env.close_trade(tid)
    return tid


def gaps(reqs):
    return [b.time - a.time for a, b in zip(reqs, reqs[1:])]


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
        g = gaps(reqs)
        if len(g) == 2:
            t.ok(g[0] >= 0.9 * BASE and g[0] <= 1.1 * BASE + SLACK,
                 "gap before retry 1 is base (0.2 s) +- 10 %%: %.3f s" % g[0])
            t.ok(g[1] >= 0.9 * BASE * 6 and g[1] <= 1.1 * BASE * 6 + SLACK,
                 "gap before retry 2 is base*6 (1.2 s) +- 10 %%: %.3f s" % g[1])
        else:
            t.fail("backoff gaps measurable", "gaps: %r" % g)
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
        t.is_(len(env.reqs_for(tid, "webhook", "/r500")), 3, "three requests reached the tracker")
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
            r"WARNING:.*trace_ext: giving up on trade %d for adapter webhook after 3 attempts"
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
            g = gaps(reqs)
            t.ok(len(g) == 1 and 1.98 <= g[0] <= 2.2 + SLACK,
                 "the retry came >= 2 s later (Retry-After beats the 0.2 s backoff)",
                 "gaps: %r" % (g,))

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

    with t.case("no personal data, secrets only where they belong"):
        env.check_no_pii("retries")
finally:
    env.close()

sys.exit(t.done())
