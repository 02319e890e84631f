#!/usr/bin/python3
"""trace.paused: stop sending without a restart (README, Operations).

- Paused on reload while requests are in flight at a slow tracker: those
  finish and are recorded delivered; nothing is marked failed.
- While paused, trades close and are queued, and no request reaches any
  tracker; the rows stay pending with no attempt and no error;
  trust_trace_paused is 1.
- Off again on reload: every row is delivered, once per (trade, tracker),
  and trust_trace_paused is 0."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

t = Tap()
# Requests take 2 s at the slow tracker: a timeout well above that.
env = TraceEnv.start_or_exit(t, gucs={"trace.http_timeout": "10s"}, name="trace_e2e_paused")
BOTH = ("myfxbook", "webhook")


def paused_gauge():
    text = env.sql1("SELECT trace.prometheus_metrics()")
    for line in text.splitlines():
        if line.startswith("trust_trace_paused "):
            return line.split()[1]
    return None


try:
    with t.case("paused while requests are in flight"):
        for a in BOTH:
            env.sink.set_behaviour(env.paths[a], default="delay:2:200")
        slow = [env.new_trade(signal_id=10) for _ in range(3)]
        for tid in slow:
            env.close_trade(tid)
        t.ok(wait_until(lambda: all(env.reqs_for(tid, a) for tid in slow for a in BOTH), 10),
             "six requests are in flight at the slow tracker")
        env.set_gucs({"trace.paused": "on"})
        rows = {tid: env.wait_status(tid, BOTH, "delivered", 15) for tid in slow}
        t.ok(all(r[a]["status"] == "delivered" and r[a]["attempts"] == 1
                 for r in rows.values() for a in BOTH),
             "they finish and are recorded delivered, one attempt each", repr(rows))
        for a in BOTH:
            env.sink.set_behaviour(env.paths[a], default=200)

    with t.case("nothing is sent while paused"):
        t.is_(paused_gauge(), "1", "trust_trace_paused is 1")
        before = len(env.sink.requests())
        held = [env.new_trade(signal_id=10) for _ in range(10)]
        for tid in held:
            env.close_trade(tid)
        time.sleep(3)           # the time being measured: nothing may happen in it
        t.is_(len(env.sink.requests()), before, "no request reached a tracker in 3 s")
        rows = env.sql("SELECT status, attempts, last_error FROM trace.trace_queue "
                       "WHERE trade_id = ANY(%s)", (held,))
        t.is_(sorted(set(rows)), [("pending", 0, None)],
              "the 20 rows are queued, pending, no attempt, no error")
        t.is_(len(rows), 20, "... one per (trade, tracker)")
        t.is_(env.sql1("SELECT count(*) FROM trace.failures"), 0, "nothing is marked failed")

    with t.case("resumed on reload"):
        env.set_gucs({"trace.paused": "off"})
        ok = all(env.wait_status(tid, BOTH, "delivered", 15) for tid in held)
        rows = env.sql("SELECT status, attempts FROM trace.trace_queue "
                       "WHERE trade_id = ANY(%s)", (held,))
        t.is_(sorted(set(rows)), [("delivered", 1)], "every row delivered, at the first attempt")
        keys = [r.header("Idempotency-Key") for r in env.sink.requests()
                if env.req_trade(r)[0] in held]
        t.is_(len(keys), 20, "20 requests for the 10 trades and 2 trackers", repr(keys))
        t.is_(len(set(keys)), 20, "... each (trade, tracker) once")
        t.is_(paused_gauge(), "0", "trust_trace_paused is 0 again")
        env.check_log_clean("server log")
finally:
    env.close()

sys.exit(t.done())
