#!/usr/bin/python3
"""Two sessions queueing the same (trade, adapter) at the same time: the
second waits for the first to end, then queues nothing more (the first
committed) or its own rows (the first rolled back); never an error, never
a duplicate row.  Both orders: the trades trigger first and trace.enqueue()
second, and the other way round; and two trace.enqueue() calls.

The trigger writes its rows without the SQL executor (src/queue_insert.c)
and hands a taken key to the enqueue statement, whose ON CONFLICT waits for
the other inserter: this is what the test watches (the waiting session
shows a lock wait in pg_stat_activity before the first one ends).  And
what the trigger keeps for the session (the queue's defaults, CHECK and
indexes; how to read users and signals) follows another session's changes:
a CHECK added to the queue, users rewritten with a new index, an opt-out."""

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from cluster import Cluster  # noqa: E402
from tap import Tap  # noqa: E402
from trace_e2e import fixture_path  # noqa: E402

CLOSE = "UPDATE trades SET status = 'CLOSED' WHERE trade_id = %s"
ENQUEUE = "SELECT trace.enqueue(%s)"

t = Tap()
cluster = Cluster(name="trace_e2e_concurrent", settings={
    "trace.database": "trades",
    "trace.enabled_adapters": "myfxbook,webhook",
    "trace.myfxbook_webhook_url": "http://127.0.0.1:9/unused",
    "trace.webhook_endpoint": "http://127.0.0.1:9/unused",
})


def session():
    conn = cluster.connect("trades", autocommit=False)
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    return conn, cur, cur.fetchone()[0]


def waits_for_lock(pid, timeout=10):
    admin = cluster.connect("trades")
    cur = admin.cursor()
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
            row = cur.fetchone()
            if row and row[0] == "Lock":
                return True
            time.sleep(0.05)
        return False
    finally:
        admin.close()


def queue_rows(trade_id):
    conn = cluster.connect("trades")
    cur = conn.cursor()
    cur.execute("SELECT adapter, status, by_operator FROM trace.trace_queue "
                "WHERE trade_id = %s ORDER BY adapter", (trade_id,))
    rows = cur.fetchall()
    conn.close()
    return rows


def race(trade_id, first_sql, second_sql, first_ends, label):
    """first_sql in an open transaction, then second_sql in another
    session (it must wait), then the first ends with first_ends."""
    a, acur, _ = session()
    b, bcur, bpid = session()
    outcome = {}

    acur.execute(first_sql, (trade_id,))

    def second():
        try:
            bcur.execute(second_sql, (trade_id,))
            outcome["result"] = bcur.fetchone() if bcur.description else None
            b.commit()
        except Exception as e:  # noqa: BLE001 - any error fails the test
            outcome["error"] = e
            b.rollback()

    th = threading.Thread(target=second)
    th.start()
    t.ok(waits_for_lock(bpid), "%s: the second session waits for the first" % label)
    getattr(a, first_ends)()
    th.join(30)
    t.ok(not th.is_alive(), "%s: the second session finishes once the first ends" % label)
    t.ok("error" not in outcome, "%s: no error in the second session" % label,
         repr(outcome.get("error")))
    a.close()
    b.close()
    return outcome.get("result")


try:
    with t.case("setup"):
        cluster.init()
        cluster.start()
        cluster.create_database("trades")
        cluster.psql(file=str(fixture_path()), dbname="trades")
        cluster.psql(sql="SET client_min_messages = error; CREATE EXTENSION trace_ext",
                     dbname="trades")

    pending_both = [("myfxbook", "pending", False), ("webhook", "pending", False)]

    with t.case("the trigger first, trace.enqueue() second"):
        race(3, CLOSE, ENQUEUE, "commit", "close then enqueue, close commits")
        t.is_(queue_rows(3), pending_both,
              "close then enqueue, close commits: one row per adapter, the close's")
        result = race(6, CLOSE, ENQUEUE, "rollback", "close then enqueue, close rolls back")
        t.is_(result, (2,), "close then enqueue, close rolls back: the enqueue queues its rows")
        t.is_(queue_rows(6), pending_both,
              "close then enqueue, close rolls back: one row per adapter, the enqueue's")

    with t.case("trace.enqueue() first, the trigger second"):
        race(9, ENQUEUE, CLOSE, "commit", "enqueue then close, enqueue commits")
        t.is_(queue_rows(9), pending_both,
              "enqueue then close, enqueue commits: one row per adapter")
        race(12, ENQUEUE, CLOSE, "rollback", "enqueue then close, enqueue rolls back")
        t.is_(queue_rows(12), pending_both,
              "enqueue then close, enqueue rolls back: the close queues its rows")

    with t.case("two trace.enqueue() with adapters"):
        explicit = "SELECT trace.enqueue(%s, ARRAY['webhook'])"
        result = race(15, explicit, explicit, "commit", "two enqueues, the first commits")
        t.is_(result, (0,), "two enqueues, the first commits: the second queues nothing")
        t.is_(queue_rows(15), [("webhook", "pending", True)],
              "two enqueues, the first commits: one row")

    with t.case("another session changes the tables"):
        # Session a has written rows directly (its session caches are
        # built); session b then changes the queue and users.
        a = cluster.connect("trades")
        acur = a.cursor()
        acur.execute(CLOSE, (18,))
        b = cluster.connect("trades")
        b.cursor().execute("ALTER TABLE trace.trace_queue "
                           "ADD CONSTRAINT test_not_21 CHECK (trade_id <> 21)")
        try:
            acur.execute(CLOSE, (21,))
            t.fail("a CHECK added by another session is enforced on the next close")
        except Exception as e:  # noqa: BLE001
            t.is_(getattr(e, "pgcode", None), "23514",
                  "a CHECK added by another session is enforced on the next close")
        t.is_(queue_rows(21), [], "the rejected close queued nothing")
        b.cursor().execute("ALTER TABLE trace.trace_queue DROP CONSTRAINT test_not_21")
        acur.execute(CLOSE, (21,))
        t.is_(queue_rows(21), pending_both, "once the CHECK is dropped, the close queues")
        # users.user_id rewritten (a new index): the next close reads it.
        b.cursor().execute("ALTER TABLE users ALTER COLUMN user_id TYPE integer")
        acur.execute(CLOSE, (24,))
        t.is_(queue_rows(24), pending_both,
              "users rewritten by another session (new index): the close reads the new one")
        b.cursor().execute("UPDATE users SET tracing_enabled = false WHERE user_id = 1")
        acur.execute(CLOSE, (27,))
        t.is_(queue_rows(27), [], "an opt-out committed by another session: nothing queued")
        a.close()
        b.close()

    with t.case("server log"):
        log = "\n".join(ln for ln in cluster.log_text().splitlines()
                        if "test_not_21" not in ln and "trade_id = %s" not in ln
                        and "UPDATE trades SET status = 'CLOSED' WHERE trade_id = 21" not in ln)
        t.ok("ERROR:" not in log, "no other error in the server log",
             lambda: cluster.log_tail(20))
finally:
    cluster.destroy()

sys.exit(t.done())
