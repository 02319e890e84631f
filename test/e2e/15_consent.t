#!/usr/bin/python3
"""Consent at send time, end to end: the worker reads the trade, its user
and its signal again in the claim transaction, and cancels a row that may
no longer be sent, with the reason in last_error.

Each trade below closes (trace.delay = 4s), then, before it is sent, one
thing changes; the transaction making the change first locks the trade's
queue rows and finds them still pending, so the worker (whose claim skips
locked rows) decides after the change, whatever the machine's speed.

- consent withdrawn (users.tracing_enabled false), adapter removed from
  the signal (one of two, and tracing_adapters set to NULL), user deleted,
  signal deleted, trade reopened, trade deleted: every row of the trade
  ends 'cancelled' with exactly that last_error ('consent withdrawn',
  'adapter removed from signal', 'user no longer exists', 'signal no
  longer exists', 'trade no longer CLOSED', 'trade no longer exists'),
  attempts 0, no HTTP status; the sink got no request for it; it is not in
  trace.failures.  An adapter the signal still lists is delivered.
- The worker did look: the rows turn 'cancelled' (only the worker does
  that), control trades closed with them are delivered, and a control
  trade closed after them is delivered while they still have no request.
- Rows an operator queued with explicit adapters (trace.enqueue(id,
  ARRAY[...]), by_operator = true) are delivered although the signal does
  not list the adapter (NULL, another adapter, the signal deleted before
  the send), but cancelled when the user withdraws consent or is deleted.
- A user who withdraws and opts in again before the send gets the trade
  delivered.
- A trade reopened (its trigger row and an operator's row cancelled) that
  closes again: the trigger re-arms both rows as its own (pending,
  last_error cleared, by_operator false), so when the signal then drops a
  tracker before the send, that row is cancelled ('adapter removed from
  signal') and only the other is sent.
- trace._send_verdict(id) agrees with the worker: NULL before every
  change and for every delivered row, the reason after the change, and
  the same reason as last_error once the worker has cancelled the row.
- No cancellation counts as a failed attempt (trust_trace_fail_total).
- last_error holds only the fixed reasons, never a personal value.
No timing is asserted: the waits are generous upper bounds."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import re  # noqa: E402

from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DB, TraceEnv  # noqa: E402

DELAY = "4s"
BOTH = ("myfxbook", "webhook")
REASONS = {"consent withdrawn", "adapter removed from signal", "user no longer exists",
           "signal no longer exists", "trade no longer CLOSED", "trade no longer exists"}

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"trace.delay": DELAY}, name="trace_e2e_consent")


def both(reason):
    return {a: reason for a in BOTH}


# Each scenario: a trade of `user` on `signal`; `operator`: adapters an
# operator queues with trace.enqueue(id, ARRAY[...]) after the close;
# `change`: statements run before the send ({tid} is the trade's id);
# `expect`: per adapter, the cancellation reason, or None (delivered).
SCENARIOS = [
    dict(key="consent withdrawn", user=4, signal=10,
         change=["UPDATE users SET tracing_enabled = false WHERE user_id = 4"],
         expect=both("consent withdrawn")),
    dict(key="adapter removed from signal (one of two)", user=1, signal=13,
         change=["UPDATE signals SET tracing_adapters = '{webhook}' WHERE signal_id = 13"],
         expect={"myfxbook": "adapter removed from signal", "webhook": None}),
    dict(key="signal's tracing_adapters set to NULL", user=1, signal=14,
         change=["UPDATE signals SET tracing_adapters = NULL WHERE signal_id = 14"],
         expect=both("adapter removed from signal")),
    dict(key="user deleted", user=5, signal=10,
         change=["DELETE FROM users WHERE user_id = 5"],
         expect=both("user no longer exists")),
    dict(key="signal deleted", user=1, signal=15,
         change=["DELETE FROM signals WHERE signal_id = 15"],
         expect=both("signal no longer exists")),
    dict(key="trade reopened", user=1, signal=10,
         change=["UPDATE trades SET status = 'OPEN' WHERE trade_id = {tid}"],
         expect=both("trade no longer CLOSED")),
    dict(key="trade deleted", user=1, signal=10,
         change=["DELETE FROM trades WHERE trade_id = {tid}"],
         expect=both("trade no longer exists")),
    dict(key="user re-opts in before the send", user=7, signal=10,
         change=["UPDATE users SET tracing_enabled = false WHERE user_id = 7"],
         then=["UPDATE users SET tracing_enabled = true WHERE user_id = 7"],
         expect=both(None)),
    dict(key="control (nothing changes)", user=1, signal=10, change=[],
         expect=both(None)),
    dict(key="operator row, signal lists no adapter", user=1, signal=12,
         operator=["webhook"], change=[],
         expect={"webhook": None}),
    dict(key="operator row, signal lists another adapter", user=3, signal=11,
         operator=["myfxbook"], change=[],
         expect={"webhook": None, "myfxbook": None}),
    dict(key="operator row, signal deleted", user=1, signal=16,
         operator=["webhook"], change=["DELETE FROM signals WHERE signal_id = 16"],
         expect={"webhook": None}),
    dict(key="operator row, consent withdrawn", user=6, signal=12,
         operator=["myfxbook", "webhook"],
         change=["UPDATE users SET tracing_enabled = false WHERE user_id = 6"],
         expect=both("consent withdrawn")),
    dict(key="trade reopened, with an operator row", user=1, signal=17,
         operator=["myfxbook"],
         change=["UPDATE trades SET status = 'OPEN' WHERE trade_id = {tid}"],
         expect=both("trade no longer CLOSED")),
    dict(key="operator row, user deleted", user=8, signal=12,
         operator=["webhook"], change=["DELETE FROM users WHERE user_id = 8"],
         expect={"webhook": "user no longer exists"}),
]


def verdicts(tid):
    """trace._send_verdict of each of the trade's queue rows, by adapter."""
    return {r["adapter"]: r["v"] for r in env.sqld(
        "SELECT adapter, trace._send_verdict(id) AS v FROM trace.trace_queue "
        " WHERE trade_id = %s", (tid,))}


def locked_change(tid, statements):
    """Run statements in one transaction that first locks the trade's queue
    rows (FOR UPDATE: the worker's claim skips them meanwhile); returns the
    rows' statuses as that transaction found them."""
    conn = env.cluster.connect(DB, autocommit=False)
    try:
        cur = conn.cursor()
        cur.execute("SELECT adapter, status FROM trace.trace_queue WHERE trade_id = %s "
                    "   FOR UPDATE", (tid,))
        found = dict(cur.fetchall())
        for s in statements:
            cur.execute(s.replace("{tid}", str(int(tid))))
        conn.commit()
        return found
    finally:
        conn.close()


def fail_total():
    text = env.sql1("SELECT trace.prometheus_metrics()") or ""
    return sum(int(v) for v in re.findall(r"^trust_trace_fail_total\{[^}]*\} (\d+)$",
                                          text, re.M))


def outcome(row):
    return (row.get("status"), row.get("last_error"), row.get("attempts"),
            row.get("last_http_status"))


try:
    with t.case("set-up: more traders and signals; trades may outlive them"):
        # The fixture's foreign keys would refuse deleting a user or a
        # signal that has trades; a trade store without them is what
        # "user deleted" and "signal deleted" are about.
        env.sql("ALTER TABLE trades DROP CONSTRAINT trades_user_id_fkey, "
                "  DROP CONSTRAINT trades_signal_id_fkey")
        # Users 4..8 opt in; their personal values are derived from user 1's
        # canaries on the server (this statement carries none).
        env.sql("""INSERT INTO users (user_id, email, name, client_id, tracing_enabled)
                   SELECT g, replace(u.email, '@', '.' || g || '@'), u.name || ' ' || g,
                          u.client_id || '-' || g, true
                     FROM users u, generate_series(4, 8) g WHERE u.user_id = 1""")
        env.sql("""INSERT INTO signals (signal_id, name, tracing_adapters) VALUES
                   (13, 'loses myfxbook', '{myfxbook,webhook}'),
                   (14, 'loses all', '{myfxbook,webhook}'),
                   (15, 'deleted', '{myfxbook,webhook}'),
                   (16, 'lists none, deleted', '{}'),
                   (17, 'reopened, closed again', '{webhook}')""")
        t.is_(env.sql1("SELECT count(*) FROM users WHERE tracing_enabled AND user_id >= 4"), 5,
              "users 4..8 opted in")

    with t.case("the trades close: rows pending, trace._send_verdict NULL"):
        for s in SCENARIOS:
            s["tid"] = env.new_trade(user_id=s["user"], signal_id=s["signal"])
        for s in SCENARIOS:
            env.close_trade(s["tid"])
            if s.get("operator"):
                s["queued"] = env.sql1("SELECT trace.enqueue(%s, %s)",
                                       (s["tid"], s["operator"]))
        for s in SCENARIOS:
            rows = env.rows(s["tid"])
            t.is_(sorted(rows), sorted(s["expect"]),
                  "%s: one queue row per adapter expected" % s["key"],
                  lambda: "rows: %r" % rows)
            if s.get("operator"):
                t.is_(s["queued"], len(s["operator"]),
                      "%s: trace.enqueue(id, %r) queued %d row(s)"
                      % (s["key"], s["operator"], len(s["operator"])))
                t.is_(dict(env.sql("SELECT adapter, by_operator FROM trace.trace_queue "
                                   " WHERE trade_id = %s", (s["tid"],))),
                      {a: (a in s["operator"]) for a in s["expect"]},
                      "%s: by_operator true on the operator's rows only" % s["key"])
        pending = {s["key"]: verdicts(s["tid"]) for s in SCENARIOS}
        t.is_(pending, {s["key"]: {a: None for a in s["expect"]} for s in SCENARIOS},
              "before any change, trace._send_verdict is NULL for every row (would send)")

    with t.case("the changes, before the send"):
        for s in SCENARIOS:
            found = locked_change(s["tid"], s["change"])
            ok = t.is_(found, {a: "pending" for a in s["expect"]},
                       "%s: the change committed while the rows were still pending"
                       % s["key"])
            if not ok:
                t.diag("set-up too slow for trace.delay = %s: raise DELAY" % DELAY)
            if s.get("then"):
                v = verdicts(s["tid"])
                t.is_(v, both("consent withdrawn"),
                      "%s: trace._send_verdict after the withdrawal says why" % s["key"])
                found = locked_change(s["tid"], s["then"])
                t.is_(found, {a: "pending" for a in s["expect"]},
                      "%s: the re-opt-in committed while the rows were still pending"
                      % s["key"])
        for s in SCENARIOS:
            s["verdict_before"] = verdicts(s["tid"])
            t.is_(s["verdict_before"], s["expect"],
                  "%s: trace._send_verdict before the send: %s"
                  % (s["key"], ", ".join("%s %s" % (a, s["expect"][a] or "NULL")
                                         for a in sorted(s["expect"]))))

    with t.case("what the worker did"):
        final = ("cancelled", "delivered", "abandoned")
        done = wait_until(lambda: all(
            set(env.rows(s["tid"])) == set(s["expect"])
            and all(r["status"] in final for r in env.rows(s["tid"]).values())
            for s in SCENARIOS), 30, 0.1)
        t.ok(done, "every row reached a final status",
             lambda: "\n".join("%s: %r" % (s["key"], {a: r["status"] for a, r in
                                                       env.rows(s["tid"]).items()})
                               for s in SCENARIOS))
        # Requests still in flight when the rows were recorded delivered
        # have been captured by then; give a late one a moment anyway.
        wait_until(lambda: all(len(env.reqs_for(s["tid"], a)) >= 1
                               for s in SCENARIOS for a, r in s["expect"].items()
                               if r is None), 5)
        failures = {r[0] for r in env.sql("SELECT trade_id FROM trace.failures")}
        for s in SCENARIOS:
            tid = s["tid"]
            rows = env.rows(tid)
            want = {a: ("cancelled", r, 0, None) if r else ("delivered", None, 1, 200)
                    for a, r in s["expect"].items()}
            t.is_({a: outcome(r) for a, r in rows.items()}, want,
                  "%s: (status, last_error, attempts, last_http_status) as expected" % s["key"])
            t.is_({a: len(env.reqs_for(tid, a)) for a in s["expect"]},
                  {a: 0 if r else 1 for a, r in s["expect"].items()},
                  "%s: the sink got %s" % (s["key"], ", ".join(
                      "%s %s" % (a, "no request" if r else "one request")
                      for a, r in sorted(s["expect"].items()))))
            if any(s["expect"].values()):
                t.ok(tid not in failures,
                     "%s: trace.failures does not list the cancelled rows" % s["key"],
                     lambda: repr(env.sqld("SELECT * FROM trace.failures WHERE trade_id = %s",
                                           (tid,))))
            now = verdicts(tid)
            t.is_(now, {a: r.get("last_error") if r.get("status") == "cancelled" else None
                        for a, r in rows.items()},
                  "%s: trace._send_verdict now agrees with what the worker did" % s["key"])
            t.is_(now, s["verdict_before"],
                  "%s: ... and with what it said before the send" % s["key"])

    with t.case("a control trade closed afterwards is delivered; still nothing for the others"):
        ctl = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(ctl)
        rows = env.wait_status(ctl, BOTH, "delivered", 30)
        t.is_({a: r["status"] for a, r in rows.items()}, both("delivered"),
              "the control trade closed after the cancellations is delivered")
        env.wait_reqs(ctl, count=2, timeout=5)
        t.is_(len(env.reqs_for(ctl)), 2, "... one request per adapter")
        cancelled = [(s["tid"], a) for s in SCENARIOS for a, r in s["expect"].items() if r]
        sent = [(tid, a) for tid, a in cancelled if env.reqs_for(tid, a)]
        t.is_(sent, [], "no request ever reached the sink for any of the %d cancelled rows"
              % len(cancelled))

    with t.case("a reopened trade closes again: the trigger re-arms its rows as its own"):
        s = [x for x in SCENARIOS if x["key"] == "trade reopened, with an operator row"][0]
        tid = s["tid"]
        # The signal now lists both trackers; the trade closes again (trigger).
        env.sql("UPDATE signals SET tracing_adapters = '{myfxbook,webhook}' "
                " WHERE signal_id = 17")
        env.close_trade(tid)
        got = {r["adapter"]: (r["status"], r["last_error"], r["attempts"], r["by_operator"])
               for r in env.sqld("SELECT adapter, status, last_error, attempts, by_operator "
                                 "  FROM trace.trace_queue WHERE trade_id = %s", (tid,))}
        t.is_(got, both(("pending", None, 0, False)),
              "the close re-armed both cancelled rows (pending, last_error cleared) as the "
              "trigger's rows (by_operator false: no operator chose this close's trackers)")
        found = locked_change(tid, ["UPDATE signals SET tracing_adapters = '{webhook}' "
                                    " WHERE signal_id = 17"])
        t.is_(found, both("pending"), "the signal dropped myfxbook while the rows were pending")
        t.is_(verdicts(tid), {"myfxbook": "adapter removed from signal", "webhook": None},
              "trace._send_verdict: myfxbook 'adapter removed from signal', webhook NULL")
        rows = env.wait_rows(tid, lambda rs: all(r["status"] in ("cancelled", "delivered",
                                                                 "abandoned")
                                                 for r in rs.values()), 30)
        env.wait_reqs(tid, "webhook", count=1, timeout=5)
        t.is_({a: outcome(r) for a, r in rows.items()},
              {"myfxbook": ("cancelled", "adapter removed from signal", 0, None),
               "webhook": ("delivered", None, 1, 200)},
              "the worker cancelled myfxbook (the signal no longer lists it) and delivered "
              "webhook")
        t.is_({a: len(env.reqs_for(tid, a)) for a in BOTH}, {"myfxbook": 0, "webhook": 1},
              "the sink got no myfxbook request, one webhook request")

    with t.case("cancellations are not failures"):
        t.is_(fail_total(), 0, "trust_trace_fail_total is 0 for every adapter and reason")
        n = env.sql1("SELECT count(*) FROM trace.failures")
        t.is_(n, 0, "trace.failures is empty")

    with t.case("last_error: fixed reasons only, no personal data"):
        errs = [r[0] for r in env.sql("SELECT DISTINCT last_error FROM trace.trace_queue "
                                      " WHERE last_error IS NOT NULL")]
        t.is_(sorted(set(errs) - REASONS), [],
              "every last_error is one of the fixed reasons", lambda: repr(errs))
        pii = env.pii_values()
        bad = [e for e in errs for v in pii if v and v in e]
        t.is_(bad, [], "no last_error holds a personal value")

    with t.case("no personal data, secrets only where they belong"):
        env.check_no_pii("consent")
finally:
    env.close()

sys.exit(t.done())
