#!/usr/bin/python3
"""Clone protection: a queue restored on another cluster sends nothing
until it is adopted (README, Backup, restore and clones).

Cluster A (trace.paused, so that its rows stay pending) holds 10 pending
rows (5 trades, 2 trackers).  pg_dump of its trade database is restored
into cluster B, which has A's configuration, trackers and tokens included:
- B's worker holds the queue: state held in trace.worker_status, a
  WARNING naming trace.adopt_queue() and trace.cancel_queue(), no request
  in 3 s, and a trade closed on B is queued and held too;
- SELECT trace.adopt_queue() (12 rows pending) and every row is delivered,
  one request per (trade, tracker);
- the same dump restored into cluster C: trace.cancel_queue() cancels the
  10 rows (last_error says why), and C still sends nothing, a new close
  included, until adopted;
- on A, trace.cancel_queue() refuses: A's queue is its own.
(A promoted streaming standby keeps delivering without intervention:
09_standby.t.)"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from cluster import Cluster  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DB, TraceEnv  # noqa: E402

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"trace.paused": "on"}, name="trace_e2e_clone")
BOTH = ("myfxbook", "webhook")
clones = []


def clone(name, dump):
    """A cluster with A's configuration and the dump restored into it."""
    same = {k: v for k, v in env.cluster.settings.items() if k.startswith("trace.")}
    same["trace.paused"] = "off"
    c = Cluster(settings=same, name=name)
    clones.append(c)
    c.init()
    c.start()
    c.create_database(DB)
    args = ["-h", c.sockdir, "-p", str(c.port), "-U", "postgres"]
    rc, out = c.run_server_cmd(["pg_restore"] + args + ["--exit-on-error", "-d", DB, dump],
                               check=False)
    t.is_(rc, 0, "%s: pg_restore of A's dump succeeded" % name, out)
    return c


def requests_for(trades):
    return [r for r in env.sink.requests() if env.req_trade(r)[0] in trades]


def state(conn):
    cur = conn.cursor()
    cur.execute("SELECT state FROM trace.worker_status")
    return [r[0] for r in cur.fetchall()]


try:
    with t.case("A: 10 rows pending, dumped"):
        trades = [env.new_trade(signal_id=10) for _ in range(5)]
        for tid in trades:
            env.close_trade(tid)
        t.is_(env.sql1("SELECT count(*) FROM trace.trace_queue WHERE trade_id = ANY(%s) "
                       "AND status = 'pending'", (trades,)), 10, "10 rows pending on A (paused)")
        dump = os.path.join(env.cluster.base, "trades.dump")
        env.cluster.run_server_cmd(["pg_dump", "-h", env.cluster.sockdir, "-p",
                                    str(env.cluster.port), "-U", "postgres", "-Fc",
                                    "-f", dump, DB])
        err = None
        try:
            env.sql("SELECT trace.cancel_queue()")
        except psycopg2.Error as e:
            err = e.pgerror
        t.ok(err and "not restored from another cluster" in err,
             "on A, trace.cancel_queue() refuses: the queue is its own", err)

    with t.case("B: restored, held"):
        b = clone("trace_e2e_clone_b", dump)
        since = 0
        bc = b.connect(DB)
        t.ok(wait_until(lambda: state(bc) == ["held"], 20), "B's worker is held",
             lambda: repr(state(bc)))
        t.ok(b.wait_for_log(r"WARNING:  the delivery queue was filled on another cluster",
                            since, 10) is not None, "a WARNING says why")
        t.ok("trace.adopt_queue()" in b.log_text() and "trace.cancel_queue()" in b.log_text(),
             "... and names trace.adopt_queue() and trace.cancel_queue()")
        cur = bc.cursor()
        new = 4_000_001
        cur.execute("INSERT INTO trades (trade_id, user_id, signal_id, account_number, "
                    "client_id, instrument, side, volume, entry_price, opened_at) "
                    "SELECT %s, 1, 10, 'ACC', 'C', 'EURUSD', 'buy', 1, 1.1, now()", (new,))
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now(), exit_price = 1.2, "
                    "pnl = 1, fees = 0.1 WHERE trade_id = %s", (new,))
        cur.execute("SELECT count(*) FROM trace.trace_queue WHERE trade_id = %s", (new,))
        t.is_(cur.fetchone()[0], 2, "a trade closed on B is queued")
        time.sleep(3)           # the time being measured: nothing may be sent in it
        t.is_(len(requests_for(trades + [new])), 0, "no request from B in 3 s")

    with t.case("B: adopted, delivered"):
        cur.execute("SELECT trace.adopt_queue()")
        t.is_(cur.fetchone()[0], 12, "trace.adopt_queue() releases the 12 pending rows")
        cur.execute("SELECT count(*) FROM trace.trace_queue WHERE status = 'delivered' "
                    "AND trade_id = ANY(%s)", (trades + [new],))
        t.ok(wait_until(lambda: (cur.execute(
            "SELECT count(*) FROM trace.trace_queue WHERE status = 'delivered' "
            "AND trade_id = ANY(%s)", (trades + [new],)) or cur.fetchone()[0]) == 12, 20),
            "all 12 rows delivered by B")
        keys = [r.header("Idempotency-Key") for r in requests_for(trades + [new])]
        t.is_(sorted(keys), sorted("%d-%s" % (x, a) for x in trades + [new] for a in BOTH),
              "one request per (trade, tracker)")
        t.ok(wait_until(lambda: state(bc) == ["idle"], 10), "B's worker is idle again")
        bc.close()

    with t.case("C: restored, queue discarded"):
        c = clone("trace_e2e_clone_c", dump)
        cc = c.connect(DB)
        cur = cc.cursor()
        t.ok(wait_until(lambda: state(cc) == ["held"], 20), "C's worker is held")
        before = len(env.sink.requests())
        cur.execute("SELECT trace.cancel_queue()")
        t.is_(cur.fetchone()[0], 10, "trace.cancel_queue() cancels the 10 copied rows")
        cur.execute("SELECT DISTINCT status, last_error FROM trace.trace_queue "
                    "WHERE trade_id = ANY(%s)", (trades,))
        t.is_(cur.fetchall(), [("cancelled", "cancelled: queued on another cluster")],
              "... cancelled, last_error says why")
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now() "
                    "WHERE trade_id = (SELECT min(trade_id) FROM trades WHERE status = 'OPEN' "
                    "AND signal_id = 10 AND user_id = 1)")
        time.sleep(2)           # the time being measured: nothing may be sent in it
        t.is_(len(env.sink.requests()), before, "C sends nothing, a new close included")
        t.ok(state(cc) == ["held"], "C stays held until adopted")
        cc.close()
finally:
    for c in clones:
        c.destroy()
    env.close()

sys.exit(t.done())
