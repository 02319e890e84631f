#!/usr/bin/python3
"""Reconciliation, end to end: trace.reconcile() finds CLOSED trades of
opted-in traders that no trigger queued, queues them, and the worker
delivers each exactly once; it never queues a trade twice, nor one that
trace.cleanup() removed.

- Trades closed while the trigger was disabled (ALTER TABLE ... DISABLE
  TRIGGER trace_ext_enqueue), loaded with session_replication_role =
  replica (INSERTed closed, and closed by UPDATE), restored from a
  pg_dump -Fc of another database with pg_restore --data-only
  --disable-triggers: no queue row until a sweep; a dry run returns the
  pairs (trade, tracker) and queues nothing (no WARNING, NOTIFY or
  count); the sweep returns and queues exactly those pairs (the signal's
  trackers that trace.enabled_adapters allows); the worker sends one
  request per pair and none for another tracker; a second sweep finds
  nothing.
- due_at = greatest(now(), closed_at + trace.delay) (trace.delay = 2s: a
  trade closed more than 2 s ago is due now(), one closed just now at
  closed_at + 2 s, and not sent before), read in the sweep's transaction.
- An opted-out trader's closed trades (on a signal that lists trackers)
  are never returned or queued, not even by trace.enqueue() with explicit
  adapters.
- A queue row deleted by hand is found again; delivered, cancelled (trade
  reopened before the send, then closed again with the trigger off;
  consent withdrawn and given again) and abandoned rows are not queued
  again, even with since one day back.
- Each sweep that queues logs one WARNING 'trace_ext: reconciliation
  queued N closed trades for adapter X that no trigger had queued' and
  sends one NOTIFY trace_alert {"event":"reconciled","adapter","count",
  "since"} per adapter (received on a LISTEN connection; since is the
  window's start: the since given when it is later than the horizon, never
  before it, never after the first close queued);
  trust_trace_reconciled_total{adapter} grows by exactly the number
  queued, and not at all when the sweep's transaction is rolled back, or
  the sweep is rolled back to a savepoint and the transaction commits.
- Every attached table is swept (one attached after its trade closed); a
  table without closed_at is skipped with a WARNING.
- The TTL edge (trace.ttl = 3s): rows that trace.cleanup() removed, one
  of them of a trade whose closed_at is later than the row's created_at,
  are not queued again by trace.reconcile() nor by trace.reconcile(since
  => now() - interval '1 day').
- The worker's own sweep: with trace.reconcile_interval = 2s (reload), a
  trade closed with the trigger disabled is queued (WARNING from the
  worker, NOTIFY, count) and delivered without anyone calling
  trace.reconcile(); with trace.reconcile_interval = 0 it is not, over
  three former intervals while other trades are delivered, nor by a worker
  that starts again (0 turns the sweep off); with 1h, a worker that starts
  sweeps once and the trades it queues are delivered.
The worker's own start-up sweep is waited out first (two control trades
delivered one after the other), so that it cannot race with the trades
closed behind the trigger's back.
No timing is asserted: the waits are generous upper bounds."""

import io
import json
import os
import re
import select
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DB, TraceEnv  # noqa: E402

BOTH = ("myfxbook", "webhook")
SCRATCH = "e2e_scratch"

t = Tap()
env = TraceEnv.start_or_exit(t, name="trace_e2e_reconcile")

# The operator's session (explicit transactions) and a LISTEN trace_alert one.
op = env.cluster.connect(DB, autocommit=False)
listener = env.cluster.connect(DB)
listener.cursor().execute("LISTEN trace_alert")
notes = []          # every trace_alert payload received, parsed when JSON


def new_ids(n):
    first = env._next_trade + 1
    env._next_trade += n
    return list(range(first, first + n))


def insert_closed(first, last, user_id, signal_id, table="trades", run_sql=None):
    """Insert trades first..last already CLOSED (closed_at now()); the
    personal values are built on the server from e2e_canary."""
    (run_sql or env.sql)("""
        INSERT INTO %s (trade_id, user_id, signal_id, account_number, client_id,
                        instrument, side, volume, entry_price, exit_price, opened_at,
                        closed_at, pnl, fees, status, passport, iban)
        SELECT g, u.user_id, %%(s)s, k.account || g, u.client_id, 'EURUSD', 'buy', 2.5,
               1.084250, 1.091200,
               timestamptz '2026-01-05 08:00:00+00' + g * interval '1 second',
               now(), 42.10, 1.25, 'CLOSED', k.passport || g, k.iban || lpad(g::text, 8, '0')
          FROM generate_series(%%(a)s::bigint, %%(b)s::bigint) g, users u, e2e_canary k
         WHERE u.user_id = %%(u)s""" % table,
                        {"a": first, "b": last, "u": user_id, "s": signal_id})


def trigger(on):
    env.sql("ALTER TABLE trades %s TRIGGER trace_ext_enqueue" % ("ENABLE" if on else "DISABLE"))


def close_untriggered(specs):
    """Open and close trades (user, signal) while the UPDATE trigger is disabled."""
    tids = [env.new_trade(user_id=u, signal_id=s) for u, s in specs]
    trigger(False)
    try:
        for tid in tids:
            env.close_trade(tid)
    finally:
        trigger(True)
    return tids


def queue_pairs(tids):
    return sorted((r[0], r[1]) for r in env.sql(
        "SELECT trade_id, adapter FROM trace.trace_queue WHERE trade_id = ANY(%s)",
        (list(tids),)))


def queue_count():
    return env.sql1("SELECT count(*) FROM trace.trace_queue")


def counters():
    text = env.sql1("SELECT trace.prometheus_metrics()") or ""
    return {a: int(n) for a, n in re.findall(
        r'^trust_trace_reconciled_total\{adapter="(\w+)"\} (\d+)$', text, re.M)}


def delta(before, after):
    return {a: after.get(a, 0) - before.get(a, 0) for a in set(before) | set(after)
            if after.get(a, 0) != before.get(a, 0)}


def per_adapter(pairs):
    out = {}
    for _, a in pairs:
        out[a] = out.get(a, 0) + 1
    return out


def poll_notes():
    if select.select([listener], [], [], 0.05)[0]:
        listener.poll()
        for n in listener.notifies:
            try:
                notes.append(json.loads(n.payload))
            except ValueError:
                notes.append(n.payload)
        listener.notifies.clear()


def notes_until_sentinel():
    """Every trace_alert payload up to a sentinel NOTIFY sent now: anything
    committed before it has arrived once it arrives."""
    mark = "e2e-sentinel-%d" % time.time_ns()
    env.sql("SELECT pg_notify('trace_alert', %s)", (mark,))
    got = wait_until(lambda: (poll_notes(), mark in notes)[1], 10, 0)
    if not got:
        raise RuntimeError("the sentinel NOTIFY did not arrive")
    i = notes.index(mark)
    out = notes[:i]
    del notes[:i + 1]
    return [n for n in out if isinstance(n, dict) and n.get("event") == "reconciled"]


def ts(text):
    return datetime.fromisoformat(text) if isinstance(text, str) else None


def warnings_since(offset):
    return re.findall(r"WARNING:  trace_ext: reconciliation queued (\d+) closed trades for "
                      r"adapter (\w+) that no trigger had queued", env.cluster.log_text(offset))


def reconcile(label, expect, since=None, dry_run=False, exact_since=False, inside=None):
    """Run trace.reconcile() in the operator's session, in a transaction,
    and check what it returned, queued, logged, notified and counted.
    since: an SQL expression; exact_since: it is later than the horizon, so
    the NOTIFY's since must be exactly its value.  inside: (query, args) run
    in the same transaction before it commits (before the worker can touch
    the rows); its rows are returned with the pairs."""
    expect = sorted(expect)
    notes_until_sentinel()           # forget older ones
    c0, q0 = counters(), queue_count()
    log_from = env.cluster.log_size()
    cur = op.cursor()
    args = []
    if since:
        args.append("since => %s" % since)
    if dry_run:
        args.append("dry_run => true")
    # since as the function sees it (same transaction: same now())
    cur.execute("SELECT %s" % (since or "now() - current_setting('trace.ttl')::interval"))
    since_value = cur.fetchone()[0]
    cur.execute("SELECT trade_id, adapter FROM trace.reconcile(%s)" % ", ".join(args))
    got = sorted((r[0], r[1]) for r in cur.fetchall())
    first_close = None
    if got:
        cur.execute("SELECT min(closed_at) FROM trades WHERE trade_id = ANY(%s)",
                    ([p[0] for p in got],))
        first_close = cur.fetchone()[0]
    inside_rows = None
    if inside:
        cur.execute(*inside)
        inside_rows = cur.fetchall()
    op.commit()
    what = "%s: %s%s" % (label, "dry run" if dry_run else "trace.reconcile()",
                         " (since %s)" % since if since else "")
    t.is_(got, expect, "%s returns %s" % (what, "%d pair(s)" % len(expect) if expect
                                          else "nothing"))
    alerts = notes_until_sentinel()
    d = delta(c0, counters())
    want = {} if dry_run else per_adapter(expect)
    if dry_run:
        t.is_(queue_count(), q0, "%s: queued nothing" % what)
    elif expect:
        have = queue_pairs({p[0] for p in expect})
        t.is_(sorted(set(expect) - set(have)), [],
              "%s: a queue row for every pair returned" % what)
        t.is_(queue_count() - q0, len(expect), "%s: queued exactly %d row(s)"
              % (what, len(expect)))
    t.is_(d, want, "%s: trust_trace_reconciled_total grew by %s"
          % (what, want or "nothing"))
    if want:
        env.cluster.wait_for_log(r"reconciliation queued \d+ closed trades for adapter %s"
                                 % max(want), since=log_from, timeout=5)
    t.is_(sorted(warnings_since(log_from)), sorted((str(n), a) for a, n in want.items()),
          "%s: %s" % (what, "one WARNING per adapter in the server log, with its count"
                      if want else "no reconciliation WARNING"))
    t.is_(sorted((n.get("event"), n.get("adapter"), n.get("count")) for n in alerts),
          sorted(("reconciled", a, n) for a, n in want.items()),
          "%s: %s" % (what, "one NOTIFY trace_alert {event: reconciled, adapter, count} "
                      "per adapter" if want else "no NOTIFY"),
          lambda: "notifications: %r" % alerts)
    if alerts:
        t.is_(sorted(set(k for n in alerts for k in n)), ["adapter", "count", "event", "since"],
              "%s: the NOTIFY payload has exactly the keys event, adapter, count, since"
              % what)
        sinces = {ts(n.get("since")) for n in alerts}
        if exact_since:
            t.is_(sinces, {since_value}, "%s: the NOTIFY's since is the since given" % what)
        else:
            t.ok(len(sinces) == 1 and None not in sinces
                 and since_value <= min(sinces)
                 and (first_close is None or min(sinces) <= first_close),
                 "%s: the NOTIFY's since is the window's start: not before the since given, "
                 "not after the first close queued" % what,
                 "since given %s, first close %s, NOTIFY since %r"
                 % (since_value, first_close, sinces))
    return (got, inside_rows) if inside else got


def check_once(pairs, label, timeout=20):
    """Every pair delivered, one request each, none for another tracker."""
    pairs = sorted(pairs)
    trades = {p[0] for p in pairs}
    ok = wait_until(lambda: all(env.rows(tid).get(a, {}).get("status") == "delivered"
                                for tid, a in pairs), timeout, 0.1)
    t.ok(ok, "%s: every queued pair delivered" % label,
         lambda: repr({tid: {a: r["status"] for a, r in env.rows(tid).items()}
                       for tid in trades}))
    wait_until(lambda: all(env.reqs_for(tid, a) for tid, a in pairs), 5)
    got = {}
    for tid in sorted(trades):
        for r in env.reqs_for(tid):
            k = env.req_trade(r)
            got[k] = got.get(k, 0) + 1
    t.is_(got, {p: 1 for p in pairs},
          "%s: exactly one request per (trade, tracker), none for another tracker" % label)


def restart_worker():
    pid0 = env.worker_pid()
    env.sql("SELECT pg_terminate_backend(%s)", (pid0,))
    pid1 = wait_until(lambda: (lambda p: p if p and p != pid0 else None)(env.worker_pid()),
                      20)
    t.ok(pid1, "set-up: the worker was stopped (pg_terminate_backend) and started again")


def check_worker_swept(pairs, c0, log_from, label):
    """The worker's sweep queued the pairs, with its WARNING, NOTIFY and
    count; then they are delivered."""
    pairs = sorted(pairs)
    queued = wait_until(lambda: queue_pairs({p[0] for p in pairs}) == pairs, 15, 0.1)
    t.ok(queued, "%s: the worker's sweep queued %d pair(s), nobody called "
         "trace.reconcile()" % (label, len(pairs)),
         lambda: repr(queue_pairs({p[0] for p in pairs})))
    t.is_(delta(c0, counters()), per_adapter(pairs),
          "%s: trust_trace_reconciled_total grew by %s" % (label, per_adapter(pairs)))
    for a, n in sorted(per_adapter(pairs).items()):
        m = env.cluster.wait_for_log(
            r"trace_ext worker WARNING:  trace_ext: reconciliation queued %d closed trades "
            r"for adapter %s that no trigger had queued" % (n, a), since=log_from, timeout=5)
        t.ok(m, "%s: the worker logged the WARNING for %s" % (label, a),
             lambda: env.cluster.log_text(log_from)[-2000:])
    alerts = notes_until_sentinel()
    t.is_(sorted((n.get("event"), n.get("adapter"), n.get("count")) for n in alerts),
          sorted(("reconciled", a, n) for a, n in per_adapter(pairs).items()),
          "%s: the worker's NOTIFY trace_alert arrived, one per adapter" % label,
          lambda: repr(alerts))
    check_once(pairs, "%s, then" % label, 10)


restore = None      # settings to put back if a case stops half-way


def put_back():
    global restore
    if restore:
        env.set_gucs(restore)
        if "trace.webhook_endpoint" in restore:
            env.paths["webhook"] = "/webhook"
        restore = None


try:
    with t.case("set-up: the worker's start-up sweep is over"):
        # The first worker sweeps once when it starts, after its first pass:
        # once a trade closed after another one was delivered is delivered
        # too, that first loop (and its sweep) is over, and cannot race with
        # the trades closed below with the trigger disabled.
        for i in (1, 2):
            ctl = env.new_trade(user_id=3, signal_id=11)
            env.close_trade(ctl)
            rows = env.wait_status(ctl, "webhook", "delivered", 20)
            t.is_(rows.get("webhook", {}).get("status"), "delivered",
                  "set-up: control trade %d delivered" % i)

    put_back()
    with t.case("trigger disabled: found, dry run first, delivered once, then nothing"):
        a1, a2, a_out, a_none = close_untriggered([(1, 10), (3, 11), (2, 10), (1, 12)])
        t.is_(env.sql1("SELECT tgenabled FROM pg_trigger WHERE tgname = 'trace_ext_enqueue' "
                       "   AND tgrelid = 'trades'::regclass"), "O",
              "set-up: the trigger is enabled again")
        t.is_(queue_pairs([a1, a2, a_out, a_none]), [],
              "closed with the trigger disabled: nothing queued")
        A = [(a1, "myfxbook"), (a1, "webhook"), (a2, "webhook")]
        reconcile("trigger disabled", A, dry_run=True)
        t.is_(queue_pairs([a1, a2]), [], "after the dry run the trades still have no row")
        t.is_(len(env.reqs_for(a1)) + len(env.reqs_for(a2)), 0, "... and nothing was sent")
        reconcile("trigger disabled", A, exact_since=True,
                  since="(SELECT min(closed_at) FROM trades WHERE trade_id IN (%d, %d))"
                  % (a1, a2))
        rows = env.sqld("SELECT trade_id, adapter, by_operator, trade_table::text AS tbl "
                        "  FROM trace.trace_queue WHERE trade_id = ANY(%s) ORDER BY 1, 2",
                        ([a1, a2],))
        t.ok(rows and all(r["tbl"] == "trades" and r["by_operator"] is False for r in rows),
             "the rows name the trades table, by_operator false", repr(rows))
        check_once(A, "trigger disabled")
        reconcile("second sweep", [])

    put_back()
    with t.case("session_replication_role = replica: found and delivered once"):
        b1, b2, b_out = new_ids(3)
        env.add_trades(b2, b2, user_id=3, signal_id=11)
        rep = env.cluster.connect(DB)
        try:
            rc = rep.cursor()
            rc.execute("SET session_replication_role = replica")

            def rep_sql(q, a=None):
                rc.execute(q, a)
            insert_closed(b1, b1, 1, 10, run_sql=rep_sql)
            insert_closed(b_out, b_out, 2, 10, run_sql=rep_sql)
            rc.execute("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, "
                       "  closed_at = now(), pnl = 3.5, fees = 0.5 WHERE trade_id = %s", (b2,))
        finally:
            rep.close()
        t.is_(env.sql1("SELECT count(*) FROM trades WHERE trade_id = ANY(%s) "
                       "   AND status = 'CLOSED'", ([b1, b2, b_out],)), 3,
              "set-up: three trades CLOSED in replica mode (two inserted, one updated)")
        t.is_(queue_pairs([b1, b2, b_out]), [], "replica mode: no trigger fired, nothing queued")
        B = [(b1, "myfxbook"), (b1, "webhook"), (b2, "webhook")]
        reconcile("replica", B, dry_run=True)
        reconcile("replica", B)
        check_once(B, "replica")
        reconcile("replica, second sweep", [])

    put_back()
    with t.case("pg_restore --data-only --disable-triggers: found and delivered once"):
        c1, c2, c_out = new_ids(3)
        # Another database holds the closed trades (built here, copied over).
        cols = env.sql1("""SELECT string_agg(format('%I %s', attname,
                                                     format_type(atttypid, atttypmod)),
                                              ', ' ORDER BY attnum)
                             FROM pg_attribute WHERE attrelid = 'public.trades'::regclass
                              AND attnum > 0 AND NOT attisdropped""")
        env.sql("CREATE TEMP TABLE e2e_staged (LIKE trades)")
        insert_closed(c1, c1, 1, 10, table="e2e_staged")
        insert_closed(c2, c2, 3, 11, table="e2e_staged")
        insert_closed(c_out, c_out, 2, 10, table="e2e_staged")
        buf = io.StringIO()
        env.db.cursor().copy_expert("COPY e2e_staged TO STDOUT", buf)
        env.sql("DROP TABLE e2e_staged")
        env.cluster.create_database(SCRATCH)
        sc = env.cluster.connect(SCRATCH)
        try:
            sc.cursor().execute("CREATE TABLE trades (%s)" % cols)
            buf.seek(0)
            sc.cursor().copy_expert("COPY trades FROM STDIN", buf)
        finally:
            sc.close()
        dump = os.path.join(env.cluster.base, "closed_trades.dump")
        conn_args = ["-h", env.cluster.sockdir, "-p", str(env.cluster.port), "-U", "postgres"]
        env.cluster.run_server_cmd(["pg_dump"] + conn_args +
                                   ["-Fc", "--data-only", "-t", "public.trades",
                                    "-f", dump, SCRATCH])
        rc_, out = env.cluster.run_server_cmd(
            ["pg_restore"] + conn_args + ["--data-only", "--disable-triggers",
                                          "--exit-on-error", "-d", DB, dump], check=False)
        t.is_(rc_, 0, "pg_restore --data-only --disable-triggers succeeded", out)
        t.is_(env.sql1("SELECT count(*) FROM trades WHERE trade_id = ANY(%s) "
                       "   AND status = 'CLOSED'", ([c1, c2, c_out],)), 3,
              "the three closed trades were restored into trades")
        t.is_(sorted(env.sql("SELECT tgname, tgenabled FROM pg_trigger "
                             " WHERE tgrelid = 'trades'::regclass AND tgname LIKE 'trace%%'")),
              [("trace_ext_enqueue", "O"), ("trace_ext_enqueue_insert", "O")],
              "pg_restore enabled the triggers again afterwards")
        t.is_(queue_pairs([c1, c2, c_out]), [], "restored with triggers disabled: nothing queued")
        C = [(c1, "myfxbook"), (c1, "webhook"), (c2, "webhook")]
        reconcile("pg_restore", C, dry_run=True)
        reconcile("pg_restore", C)
        check_once(C, "pg_restore")
        reconcile("pg_restore, second sweep", [])

    put_back()
    with t.case("due_at = greatest(now(), closed_at + trace.delay)"):
        env.set_gucs({"trace.delay": "2s"})
        restore = {"trace.delay": "0"}
        (d_old,) = close_untriggered([(3, 11)])
        wait_until(lambda: env.sql1("SELECT now() > closed_at + interval '2.5 s' FROM trades "
                                    " WHERE trade_id = %s", (d_old,)), 10)
        (d_new,) = close_untriggered([(3, 11)])
        _, due = reconcile("trace.delay 2s", [(d_old, "webhook"), (d_new, "webhook")],
                           inside=("""
            SELECT q.trade_id, CASE WHEN q.due_at = now() THEN 'now()'
                                    WHEN q.due_at = t.closed_at + interval '2 s'
                                    THEN 'closed_at + 2s' ELSE q.due_at::text END
              FROM trace.trace_queue q JOIN trades t USING (trade_id)
             WHERE q.trade_id = ANY(%s)""", ([d_old, d_new],)))
        due = dict(due or [])
        t.is_(due, {d_old: "now()", d_new: "closed_at + 2s"},
              "closed more than trace.delay ago: due now(); closed just now: due closed_at "
              "+ trace.delay")
        due_new = env.sql1("SELECT extract(epoch FROM closed_at + interval '2 s')::float8 "
                           "  FROM trades WHERE trade_id = %s", (d_new,))
        check_once([(d_old, "webhook"), (d_new, "webhook")], "trace.delay 2s")
        reqs = env.reqs_for(d_new, "webhook")
        t.ok(reqs and reqs[0].time >= due_new - 0.01,
             "the one due closed_at + trace.delay was not sent before its due_at",
             lambda: "received %.3f s after due_at" % (reqs[0].time - due_new) if reqs else "")
        env.set_gucs(restore)
        restore = None

    put_back()
    with t.case("an opted-out trader's closed trades are never queued"):
        outs = [a_out, b_out, c_out]
        t.is_(queue_pairs(outs), [],
              "user 2 (opted out), signal 10 lists myfxbook and webhook: no row for any of "
              "the trades closed with the trigger disabled, in replica mode, restored")
        t.is_(sorted(x[0] for x in env.sql(
            "SELECT trade_id FROM trace.reconcile(since => now() - interval '1 day', "
            "                                     dry_run => true)")), [],
              "a dry run one day back lists none of them")
        t.is_([env.sql1("SELECT trace.enqueue(%s, ARRAY['myfxbook', 'webhook'])", (x,))
               for x in outs], [0, 0, 0],
              "trace.enqueue() with explicit adapters queues none of them")
        t.is_([env.sql1("SELECT trace.enqueue(%s)", (x,)) for x in outs], [0, 0, 0],
              "trace.enqueue() with the signal's adapters queues none of them")
        t.is_(queue_pairs(outs + [a_none]), [],
              "no row for them, nor for the trade on a signal without trackers")
        t.is_(sum(len(env.reqs_for(x)) for x in outs + [a_none]), 0, "nothing was sent for them")

    put_back()
    with t.case("a queue row deleted by hand is found again"):
        e1 = env.new_trade(user_id=1, signal_id=10)
        cur = op.cursor()
        cur.execute("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, "
                    "  closed_at = now(), pnl = 1.5, fees = 0.25 WHERE trade_id = %s", (e1,))
        cur.execute("DELETE FROM trace.trace_queue WHERE trade_id = %s AND adapter = 'myfxbook'",
                    (e1,))
        op.commit()
        env.wait_status(e1, "webhook", "delivered", 15)
        t.is_(queue_pairs([e1]), [(e1, "webhook")], "the myfxbook row was deleted by hand")
        reconcile("row deleted by hand", [(e1, "myfxbook")])
        check_once([(e1, "myfxbook"), (e1, "webhook")], "row deleted by hand")

    put_back()
    with t.case("delivered, cancelled and abandoned rows are not queued again"):
        # cancelled: reopened before the send, then closed again with the trigger off
        f1 = env.new_trade(user_id=1, signal_id=11)
        cur = op.cursor()
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now() WHERE trade_id = %s",
                    (f1,))
        cur.execute("UPDATE trades SET status = 'OPEN' WHERE trade_id = %s", (f1,))
        op.commit()
        rows = env.wait_status(f1, "webhook", "cancelled", 15)
        t.is_(rows.get("webhook", {}).get("last_error"), "trade no longer CLOSED",
              "set-up: a row cancelled because the trade was reopened")
        trigger(False)
        env.close_trade(f1)
        trigger(True)
        # cancelled: consent withdrawn in the closing transaction, given again
        env.sql("""INSERT INTO users (user_id, email, name, client_id, tracing_enabled)
                   SELECT 4, replace(email, '@', '.4@'), name || ' 4', client_id || '-4', true
                     FROM users WHERE user_id = 1""")
        f2 = env.new_trade(user_id=4, signal_id=11)
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now() WHERE trade_id = %s",
                    (f2,))
        cur.execute("UPDATE users SET tracing_enabled = false WHERE user_id = 4")
        op.commit()
        rows = env.wait_status(f2, "webhook", "cancelled", 15)
        t.is_(rows.get("webhook", {}).get("last_error"), "consent withdrawn",
              "set-up: a row cancelled because consent was withdrawn")
        env.sql("UPDATE users SET tracing_enabled = true WHERE user_id = 4")
        # abandoned: the tracker rejects it (422)
        env.sink.set_behaviour("/r422", default=422)
        env.point("webhook", "/r422")
        restore = {"trace.webhook_endpoint": env.sink.url("/webhook")}
        g1 = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(g1)
        rows = env.wait_status(g1, "webhook", ["abandoned", "delivered"], 15)
        t.is_(rows.get("webhook", {}).get("status"), "abandoned",
              "set-up: a row abandoned after a 422")
        env.point("webhook", "/webhook")
        restore = None
        before = {x: (env.rows(x)["webhook"]["status"], len(env.reqs_for(x)))
                  for x in (a2, f1, f2, g1)}
        reconcile("delivered, cancelled, abandoned", [], since="now() - interval '1 day'",
                  dry_run=True)
        reconcile("delivered, cancelled, abandoned", [])
        reconcile("delivered, cancelled, abandoned", [], since="now() - interval '1 day'")
        after = {x: (env.rows(x)["webhook"]["status"], len(env.reqs_for(x)))
                 for x in (a2, f1, f2, g1)}
        t.is_(after, before, "their rows are unchanged and nothing more was sent "
              "(delivered, cancelled reopened, cancelled consent, abandoned)")

    put_back()
    with t.case("counted only when the sweep's transaction commits"):
        (h1,) = close_untriggered([(3, 11)])
        c0, q0 = counters(), queue_count()
        cur = op.cursor()
        cur.execute("SELECT count(*) FROM trace.reconcile()")
        n1 = cur.fetchone()[0]
        op.rollback()
        t.is_((n1, queue_count()), (1, q0), "set-up: a sweep found the one missed trade, "
              "rolled back: nothing queued")
        d_rollback = delta(c0, counters())
        cur.execute("SAVEPOINT s")
        cur.execute("SELECT count(*) FROM trace.reconcile()")
        n3 = cur.fetchone()[0]
        cur.execute("ROLLBACK TO SAVEPOINT s")
        op.commit()
        t.is_(d_rollback, {}, "trust_trace_reconciled_total unchanged after a transaction "
              "that ran trace.reconcile() and was rolled back")
        t.is_((n3, queue_count()), (1, q0), "set-up: a sweep rolled back to a savepoint, "
              "the transaction committed: nothing queued")
        t.is_(delta(c0, counters()), {}, "trust_trace_reconciled_total unchanged after a "
              "sweep rolled back to a savepoint (its transaction committed)")
        t.is_(notes_until_sentinel(), [], "no NOTIFY from the rolled-back sweeps")
        reconcile("after the rollbacks", [(h1, "webhook")])
        check_once([(h1, "webhook")], "after the rollbacks")

    attached_more = False
    put_back()
    with t.case("every attached table is swept; one without closed_at is skipped"):
        (i1,) = new_ids(1)
        env.sql("""
            CREATE SCHEMA e2e_b;
            CREATE TABLE e2e_b.users (user_id bigint PRIMARY KEY,
                                      tracing_enabled boolean NOT NULL);
            CREATE TABLE e2e_b.signals (signal_id bigint PRIMARY KEY, tracing_adapters text[]);
            CREATE TABLE e2e_b.trades (LIKE public.trades INCLUDING DEFAULTS);
            INSERT INTO e2e_b.users VALUES (1, true);
            INSERT INTO e2e_b.signals VALUES (11, '{webhook}');
            CREATE SCHEMA e2e_nc;
            CREATE TABLE e2e_nc.users (user_id bigint PRIMARY KEY,
                                       tracing_enabled boolean NOT NULL);
            CREATE TABLE e2e_nc.signals (signal_id bigint PRIMARY KEY, tracing_adapters text[]);
            CREATE TABLE e2e_nc.trades (trade_id bigint PRIMARY KEY, user_id bigint,
                                        signal_id bigint, status text);""")
        # closed before the table was attached: no trigger saw it
        env.sql("""INSERT INTO e2e_b.trades (trade_id, user_id, signal_id, instrument, side,
                                             volume, entry_price, exit_price, opened_at,
                                             closed_at, pnl, fees, status)
                   VALUES (%s, 1, 11, 'XAUUSD', 'sell', 1, 2000.5, 1990.25,
                           now() - interval '1 hour', now(), 10.25, 0.5, 'CLOSED')""", (i1,))
        env.sql("SELECT trace.attach('e2e_b.trades'), trace.attach('e2e_nc.trades')")
        attached_more = True
        log_from = env.cluster.log_size()
        reconcile("two more tables attached", [(i1, "webhook")])
        t.ok(re.search(r"WARNING:  trace\.reconcile: table e2e_nc\.trades has no closed_at "
                       r"column", env.cluster.log_text(log_from)),
             "the table without closed_at is skipped with a WARNING naming it",
             lambda: env.cluster.log_text(log_from)[-2000:])
        t.is_(env.sql1("SELECT trade_table::text FROM trace.trace_queue WHERE trade_id = %s",
                       (i1,)), "e2e_b.trades", "the row names the other table")
        check_once([(i1, "webhook")], "other table")
        reqs = env.reqs_for(i1, "webhook")
        body = reqs[0].json(parse_float=str) if reqs else {}
        t.ok(body.get("instrument") == "XAUUSD" and body.get("pnl") == "10.25",
             "... its body is read from that table", repr(body))
        env.sql("SELECT trace.detach('e2e_b.trades'), trace.detach('e2e_nc.trades')")
        attached_more = False
    if attached_more:
        env.sql("SELECT trace.detach('e2e_b.trades'), trace.detach('e2e_nc.trades')")

    put_back()
    with t.case("TTL edge: rows trace.cleanup() removed are never queued again"):
        env.set_gucs({"trace.ttl": "3s"})
        restore = {"trace.ttl": "7d"}
        j1 = env.new_trade(user_id=1, signal_id=10)
        j2 = env.new_trade(user_id=3, signal_id=11)
        env.close_trade(j1)
        env.close_trade(j2)
        check_once([(j1, "myfxbook"), (j1, "webhook"), (j2, "webhook")], "TTL, before")
        # The broker corrects j2's close time: later than its row's created_at.
        env.sql("UPDATE trades SET closed_at = closed_at + interval '1 minute' "
                " WHERE trade_id = %s", (j2,))
        t.ok(env.sql1("SELECT bool_and(t.closed_at > q.created_at) FROM trace.trace_queue q "
                      "  JOIN trades t USING (trade_id) WHERE q.trade_id = %s", (j2,)),
             "set-up: j2's closed_at is later than its queue row's created_at")
        gone = wait_until(lambda: (env.sql("SELECT trace.cleanup()"),
                                   queue_pairs([j1, j2]) == [])[1], 20, 0.2)
        t.ok(gone, "trace.cleanup() (ours or the worker's) removed the rows once older "
             "than trace.ttl", lambda: repr(queue_pairs([j1, j2])))
        t.is_(sorted(env.sql("SELECT trade_id, adapter FROM trace.cleaned_rows "
                             " WHERE trade_id = ANY(%s)", ([j1, j2],))), [(j2, "webhook")],
              "trace.cleaned_rows remembers j2's row (closed after the horizon)")
        reconcile("after cleanup", [], dry_run=True)
        reconcile("after cleanup", [])
        reconcile("after cleanup", [], since="now() - interval '1 day'", dry_run=True)
        reconcile("after cleanup", [], since="now() - interval '1 day'")
        t.is_(queue_pairs([j1, j2]), [], "no row for j1 or j2")
        time.sleep(0.5)
        t.is_({x: len(env.reqs_for(x)) for x in (j1, j2)}, {j1: 2, j2: 1},
              "nothing sent again for them")
        env.set_gucs(restore)
        restore = None

    put_back()
    with t.case("the worker's own sweep every trace.reconcile_interval"):
        env.set_gucs({"trace.reconcile_interval": "2s"})
        t.is_(env.sql1("SHOW trace.reconcile_interval"), "2s", "trace.reconcile_interval is 2s")
        notes_until_sentinel()
        c0 = counters()
        log_from = env.cluster.log_size()
        (k1,) = close_untriggered([(1, 10)])
        check_worker_swept([(k1, "myfxbook"), (k1, "webhook")], c0, log_from,
                           "reconcile_interval 2s")

    put_back()
    with t.case("trace.reconcile_interval = 0: no sweep"):
        env.set_gucs({"trace.reconcile_interval": 0})
        t.is_(env.sql1("SHOW trace.reconcile_interval"), "0", "trace.reconcile_interval is 0")
        time.sleep(1)       # the worker took the SIGHUP too
        c0 = counters()
        (k2,) = close_untriggered([(1, 10)])
        ctl = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(ctl)
        check_once([(ctl, "myfxbook"), (ctl, "webhook")], "a control trade meanwhile")
        time.sleep(6)       # three 2 s intervals
        t.is_(queue_pairs([k2]), [], "after 6 s (three former intervals) the trade has no row")
        t.is_(len(env.reqs_for(k2)), 0, "... and nothing was sent for it")
        t.is_(delta(c0, counters()), {}, "... and trust_trace_reconciled_total did not move")
        # "0 turns the sweep off": a worker that starts again does not sweep either.
        restart_worker()
        ctl2 = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(ctl2)
        check_once([(ctl2, "myfxbook"), (ctl2, "webhook")], "a control trade, new worker")
        wait_until(lambda: queue_pairs([k2]), 3)
        t.is_(queue_pairs([k2]), [], "trace.reconcile_interval = 0: the restarted worker did "
              "not sweep either (no row for the missed trade)")

    put_back()
    with t.case("the worker's sweep when it starts"):
        env.set_gucs({"trace.reconcile_interval": "1h"})
        (k3,) = close_untriggered([(3, 11)])
        missing = sorted(tuple(r) for r in env.sql(
            "SELECT trade_id, adapter FROM trace.reconcile(dry_run => true)"))
        t.ok((k3, "webhook") in missing, "set-up: a dry run lists the trade closed with the "
             "trigger disabled", repr(missing))
        notes_until_sentinel()
        c0 = counters()
        log_from = env.cluster.log_size()
        restart_worker()
        check_worker_swept(missing, c0, log_from, "a starting worker (interval 1h)")

    put_back()
    with t.case("no personal data, secrets only where they belong"):
        env.check_no_pii("reconcile")
finally:
    for c in (op, listener):
        try:
            c.close()
        except Exception:
            pass
    env.close()

sys.exit(t.done())
