#!/usr/bin/python3
"""Failover, end to end: a streaming standby sends nothing while it is in
recovery; promoted after its primary dies, it delivers everything still
pending, does not send again what the old primary had delivered (as far
as that reached the standby), and any repeat carries the same
Idempotency-Key.

The standby (test/lib/standby.py: pg_basebackup -R of the primary, same
preload and settings) is pointed at a second capture sink, so that every
request it ever makes is told apart from the primary's.  The primary is
stopped with pg_ctl stop -m immediate, as a crashed server would be, while
requests are in flight and rows are pending."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from capture_server import CaptureServer  # noqa: E402
from standby import Standby  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

BOTH = ("myfxbook", "webhook")
WORKER = "trace_ext worker"

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"synchronous_commit": "on",
                                      "trace.max_retries": 100,
                                      "trace.retry_backoff_cap": "2s"},
                             name="trace_e2e_primary")
sink2 = CaptureServer().start()
standby = None
_next_id = [3_000_000]


def bulk_close(db_sql, n, signal_id=10):
    """Insert n OPEN trades of user 1 (opted in) and close them in one
    UPDATE, on the primary; returns their ids."""
    first = _next_id[0]
    last = first + n - 1
    _next_id[0] = last + 1
    env.add_trades(first, last, signal_id=signal_id, run_sql=db_sql)
    db_sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(),
                     pnl = 10, fees = 1
               WHERE trade_id BETWEEN %s AND %s""", (first, last))
    return list(range(first, last + 1))


def q(conn, sql, args=None):
    cur = conn.cursor()
    cur.execute(sql, args)
    return cur.fetchall() if cur.description else []


def pairs(conn, lo, hi, status=None):
    sql = "SELECT trade_id, adapter FROM trace.trace_queue WHERE trade_id BETWEEN %s AND %s"
    if status:
        sql += " AND status = %s"
    return {(r[0], r[1]) for r in q(conn, sql, (lo, hi, status) if status else (lo, hi))}


def status_counts(conn, lo, hi):
    """Rows by status as the views show it: a row a worker is sending is
    leased in that server's shared memory (trace._leased()), 'sending'."""
    return dict(q(conn, "SELECT CASE WHEN status = 'pending' AND trace._leased(id) "
                  "            THEN 'sending' ELSE status END, count(*) "
                  "  FROM trace.trace_queue "
                  " WHERE trade_id BETWEEN %s AND %s GROUP BY 1", (lo, hi)))


def requests_by_pair(sink, paths, lo, hi):
    """(trade, adapter) -> requests at `paths` (path -> adapter), and the
    requests whose Idempotency-Key is not <trade_id>-<adapter>."""
    seen, bad = {}, []
    for path, adapter in paths.items():
        for r in sink.requests(path):
            tid = (r.json() or {}).get("trade_id")
            if not isinstance(tid, int) or not lo <= tid <= hi:
                bad.append("request #%d at %s for an unexpected trade %r" % (r.seq, path, tid))
                continue
            if r.header("Idempotency-Key") != "%d-%s" % (tid, adapter):
                bad.append("request #%d for (%d, %s) has Idempotency-Key %r"
                           % (r.seq, tid, adapter, r.header("Idempotency-Key")))
            seen.setdefault((tid, adapter), []).append(r)
    return seen, bad


try:
    P = {"/p-mfx": "myfxbook", "/p-wh": "webhook"}
    S = {"/s-mfx": "myfxbook", "/s-wh": "webhook"}
    sb = None
    with t.case("a streaming standby of the primary, pointed at its own sink"):
        env.point("myfxbook", "/p-mfx")
        env.point("webhook", "/p-wh")
        standby = Standby(env.cluster, settings={
            "trace.myfxbook_webhook_url": sink2.url("/s-mfx"),
            "trace.webhook_endpoint": sink2.url("/s-wh"),
        })
        standby.init()
        standby.start()
        t.ok(standby.wait_streaming(60), "the primary streams WAL to the standby")
        t.ok(standby.in_recovery(), "the standby is in recovery")
        sb = standby.connect("trades", retry_for=30)
        t.is_(q(sb, "SHOW trace.webhook_endpoint")[0][0], sink2.url("/s-wh"),
              "the standby's webhook endpoint is the second sink")
        t.is_(q(sb, "SHOW trace.myfxbook_webhook_url")[0][0], sink2.url("/s-mfx"),
              "... and so is its myfxbook URL")
        preload = q(sb, "SHOW shared_preload_libraries")[0][0]
        t.ok(preload == env.sql1("SHOW shared_preload_libraries")
             and "trace_ext" in [x.strip() for x in preload.split(",")],
             "the standby preloads trace_ext too, as the primary does (%s)" % preload)
        env.pii_values()        # remembered for the scan at the end, primary or not

    with t.case("while in recovery the standby sends nothing; the primary delivers"):
        first = bulk_close(env.sql, 200)
        lo = first[0]
        ok = wait_until(lambda: status_counts(env.db, lo, first[-1]) == {"delivered": 400}, 60)
        t.ok(ok, "the primary delivered 200 trades x 2 trackers",
             lambda: repr(status_counts(env.db, lo, first[-1])))
        lsn = env.sql1("SELECT pg_current_wal_lsn()::text")
        t.ok(standby.wait_replayed(lsn, 60), "the standby replayed it")
        t.is_(status_counts(sb, lo, first[-1]), {"delivered": 400},
              "the standby's copy of the queue says delivered")
        workers = []
        for _ in range(30):
            workers += q(sb, "SELECT pid FROM pg_stat_activity WHERE backend_type = %s",
                         (WORKER,))
            time.sleep(0.1)
        t.is_(workers, [], "no trace_ext worker in the standby's pg_stat_activity (30 samples)")
        t.ok(env.worker_pid() is not None, "(the primary runs one)")
        t.is_(len(sink2.requests()), 0, "the standby's sink received no request")

    with t.case("the primary dies mid-delivery; the promoted standby delivers the rest"):
        # The first 40 requests per tracker are answered (slowly), the rest
        # hang: rows stay leased until the primary dies (this case cannot be
        # skipped).  A lease is the primary's shared memory, not WAL: the
        # standby's copy of those rows says pending.
        env.sink.set_behaviour("/p-mfx", *["delay:0.3"] * 40, default="hang:60")
        env.sink.set_behaviour("/p-wh", *["delay:0.3"] * 40, default="hang:60")
        env.set_gucs({"trace.batch_size": 20})
        second = bulk_close(env.sql, 300)
        hi = second[-1]

        def leased():
            return sorted(r[0] for r in env.sql(
                "SELECT l.id FROM trace._leases() l JOIN trace.trace_queue qq ON qq.id = l.id "
                " WHERE qq.trade_id BETWEEN %s AND %s", (second[0], hi)))

        # Midway, and no answered request in flight: no row delivered in the
        # 1 s after the leases are read (answers take 0.3 s), so every row
        # leased then is one whose request hangs (and times out, after
        # trace.http_timeout, into a retry that hangs again): none of them
        # is recorded delivered before the stop.
        def midway():
            c = status_counts(env.db, second[0], hi)
            if c.get("delivered", 0) < 60 or c.get("sending", 0) == 0:
                return None
            ids = leased()
            time.sleep(1.0)
            delivered = status_counts(env.db, second[0], hi).get("delivered", 0)
            return delivered == c["delivered"] and (c, ids)
        settled = wait_until(midway, 60, 0.02)
        at_stop, leased_at_stop = settled if settled else (None, leased())
        # ... and the standby has replayed some of the deliveries.
        wait_until(lambda: status_counts(sb, second[0], hi).get("delivered", 0) >= 60, 30, 0.05)
        env.cluster.stop(mode="immediate")
        stopped_at = time.time()
        t.ok(at_stop and at_stop.get("pending", 0) > 0,
             "the primary stopped (immediate) with rows delivered, leased and pending: %r"
             % (at_stop,))
        # Whatever WAL the standby received, it has replayed (a condition,
        # not a sleep): received = replayed, twice 0.2 s apart.
        def caught_up():
            r = q(sb, "SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), "
                      "       pg_last_wal_replay_lsn()::text")[0]
            return r[0] and r[1]
        first_lsn = wait_until(caught_up, 30, 0.05)
        time.sleep(0.2)
        t.ok(first_lsn and caught_up() == first_lsn,
             "the standby replayed all the WAL it received (%s)" % first_lsn)
        t.ok(standby.in_recovery(), "the standby is still in recovery")
        t.is_(len(sink2.requests()), 0, "... and has still sent nothing")
        t.is_(q(sb, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = %s",
                (WORKER,))[0][0], 0, "... and runs no worker")
        seen_delivered = pairs(sb, lo, hi, "delivered")
        all_pairs = pairs(sb, lo, hi)
        t.is_(len(all_pairs), 1000, "the standby has all 1,000 queued rows")
        before = status_counts(sb, lo, hi)
        standby_view = q(sb, "SELECT status, count(*) FROM trace.trace_queue "
                             "WHERE id = ANY (%s) GROUP BY 1", (leased_at_stop,))
        t.ok(leased_at_stop and dict(standby_view) == {"pending": len(leased_at_stop)},
             "the %d rows the old primary was sending are pending on the standby (a lease "
             "is shared memory, not WAL)" % len(leased_at_stop), repr(standby_view))
        t.diag("on the standby before promotion: %r" % before)

        t.ok(standby.promote(60), "SELECT pg_promote() succeeds")
        t.ok(not standby.in_recovery(), "the standby is a primary now")
        pid = wait_until(lambda: q(sb, "SELECT pid FROM pg_stat_activity "
                                   "WHERE backend_type = %s", (WORKER,)), 30)
        t.ok(pid, "a trace_ext worker started after promotion")
        done = wait_until(lambda: status_counts(sb, lo, hi) == {"delivered": 1000}, 120, 0.2)
        t.ok(done, "the promoted standby delivered every row still pending",
             lambda: repr(status_counts(sb, lo, hi)))

        new, bad2 = requests_by_pair(sink2, S, lo, hi)
        old, bad1 = requests_by_pair(env.sink, P, lo, hi)
        t.ok(not bad1 and not bad2, "every request, on either sink, carries "
             "<trade_id>-<adapter> as its Idempotency-Key", "\n".join((bad1 + bad2)[:20]))
        resent = sorted(set(new) & seen_delivered)
        t.ok(seen_delivered and not resent,
             "none of the %d rows the standby had seen delivered was sent again"
             % len(seen_delivered), "re-sent: %r" % resent[:20])
        owed = all_pairs - seen_delivered
        t.is_(sorted(owed - set(new)), [],
              "each of the %d rows not yet delivered reached the new primary's tracker"
              % len(owed))
        lost = all_pairs - set(new) - set(old)
        t.is_(sorted(lost), [], "0 lost: every (trade, adapter) reached a tracker")
        repeats = sorted(k for k in set(new) & set(old))
        t.diag("%d delivered before the failover, %d sent by the new primary, of which %d "
               "had also reached the old primary's tracker (in flight at its death)"
               % (len(seen_delivered), len(new), len(repeats)))
        t.ok(all(r.time > stopped_at for v in new.values() for r in v),
             "the new primary sent only after the old one was gone")

    with t.case("the promoted standby leaks nothing either"):
        pii = [v.encode() for v in env.pii_values()]
        secrets = [v.encode() for v in env.secret_values()]
        reqs = sink2.requests()
        bad = ["request #%d holds a personal value" % r.seq for r in reqs
               if any(v in r.raw() for v in pii)]
        t.ok(reqs and not bad, "no personal value in any of the %d requests the standby sent"
             % len(reqs), "\n".join(bad[:10]))
        log = standby.log_bytes()
        t.ok(log and not [v for v in pii + secrets if v in log],
             "no personal value or secret in the standby's server log")
finally:
    if t.failed and standby is not None and standby.base:
        t.diag("standby log tail:\n" + standby.log_tail(40))
    for closer in (lambda: sb is not None and sb.close(),
                   lambda: standby is not None and standby.destroy(),
                   sink2.stop, env.close):
        try:
            closer()
        except Exception as e:      # tear down the rest whatever happens
            t.diag("tear-down: %s" % e)

sys.exit(t.done())
