#!/usr/bin/python3
"""A burst and the idle worker's wake-ups, end to end.

- A burst of 10,000 trades closed in one statement is fully delivered:
  every row ends delivered, the tracker received exactly one request per
  trade (no duplicates, none missing), by the same worker process.
- While the queue is idle the worker runs no statement, although it wakes
  every trace.poll_interval: pg_stat_statements (track = all, loaded here
  whatever the canary mode) counts no call of any statement on the queue,
  and the worker's query_start does not move either.
- Everything that makes a row due sooner wakes it at commit, though it
  planned to sleep until the earliest due_at it knew of (rows held an hour
  by trace.delay): an operator's own UPDATE or INSERT on the queue,
  trace.retry(), and COMMIT PREPARED of a transaction that closed a trade
  with trace.delay 0.
No timing is asserted: the waits are generous upper bounds."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

BURST = 10000
FIRST = 700000

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"trace.enabled_adapters": "webhook",
                                      "max_prepared_transactions": 4,
                                      "shared_preload_libraries": "trace_ext,pg_stat_statements",
                                      "pg_stat_statements.track": "all"},
                             name="trace_e2e_burst")
env.sql("SET client_min_messages = warning")
env.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
env.sql("RESET client_min_messages")


def queue_statement_calls():
    """Calls of every statement that reads or writes the queue, by anyone
    (the worker's claim, next-due, record, clean-up...), counted by
    pg_stat_statements, independent of what the worker reports itself."""
    return env.sql1("SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
                    " WHERE query ILIKE '%%trace_queue%%' "
                    "   AND query NOT ILIKE '%%pg_stat_statements%%'")


def worker_query_start():
    return env.sql1("SELECT query_start FROM pg_stat_activity "
                    " WHERE backend_type = 'trace_ext worker'")


def status_of(trade_id):
    return env.sql1("SELECT status FROM trace.trace_queue WHERE trade_id = %s", (trade_id,))


try:
    with t.case("a burst of %d closes in one statement is fully delivered" % BURST):
        pid0 = env.worker_pid()
        env.sql("""
            INSERT INTO trades (trade_id, user_id, signal_id, account_number, client_id,
                                instrument, side, volume, entry_price, opened_at)
            SELECT g, 1, 11, 'ACC-' || g, 'CL-0001', 'EURUSD', 'buy', 1.5, 1.0842, now()
              FROM generate_series(%s, %s) g""", (FIRST, FIRST + BURST - 1))
        env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(),
                                     pnl = 42.10, fees = 1.25
                    WHERE trade_id BETWEEN %s AND %s""", (FIRST, FIRST + BURST - 1))
        t.is_(env.sql1("SELECT count(*) FROM trace.trace_queue WHERE trade_id >= %s",
                       (FIRST,)), BURST, "the close queued one row per trade")
        done = wait_until(lambda: env.sql1(
            "SELECT count(*) FROM trace.trace_queue WHERE trade_id >= %s "
            "   AND status = 'delivered'", (FIRST,)) == BURST, 180, interval=0.5)
        t.ok(done, "every row ended delivered",
             repr(env.sql("SELECT status, count(*) FROM trace.trace_queue GROUP BY 1")))
        keys = [r.header("Idempotency-Key") for r in env.sink.requests()
                if (r.header("Idempotency-Key") or "").endswith("-webhook")
                and int(r.header("Idempotency-Key").split("-")[0]) >= FIRST]
        t.is_(len(set(keys)), BURST, "the tracker received every trade")
        t.is_(len(keys), BURST, "... each exactly once (no duplicate request)")
        t.is_(env.sql1("SELECT max(attempts) FROM trace.trace_queue WHERE trade_id >= %s",
                       (FIRST,)), 1, "each in one attempt")
        t.is_(env.worker_pid(), pid0, "by the same worker process")

    with t.case("an idle worker runs no statement"):
        time.sleep(1)
        before = worker_query_start()
        calls = queue_statement_calls()
        time.sleep(3)     # 30 x trace.poll_interval (100ms): the window observed
        t.is_(queue_statement_calls(), calls,
              "no statement on the queue over 3 s of wake-ups (pg_stat_statements: "
              "no claim, no next-due query)")
        t.ok(calls > 0, "(pg_stat_statements does see the worker's statements: %d calls "
             "during the burst)" % calls)
        t.is_(worker_query_start(), before,
              "query_start unchanged too")
        t.is_(env.sql1("SELECT state FROM pg_stat_activity "
                       " WHERE backend_type = 'trace_ext worker'"), "idle", "state idle")

    with t.case("what makes a row due sooner wakes the worker"):
        env.set_gucs({"trace.delay": "1h"})
        held = [env.new_trade() for _ in range(3)]
        for tid in held:
            env.close_trade(tid)
        time.sleep(1)
        t.is_([status_of(x) for x in held], ["pending"] * 3,
              "closed with trace.delay 1h: pending, the worker plans to sleep an hour")
        env.sql("UPDATE trace.trace_queue SET due_at = now() WHERE trade_id = %s", (held[0],))
        t.ok(wait_until(lambda: status_of(held[0]) == "delivered", 20),
             "an operator's UPDATE making a row due now: delivered")

        env.sql("DELETE FROM trace.trace_queue WHERE trade_id = %s", (held[1],))
        env.sql("INSERT INTO trace.trace_queue (trade_id, adapter, trade_table) "
                "VALUES (%s, 'webhook', 'trades')", (held[1],))
        t.ok(wait_until(lambda: status_of(held[1]) == "delivered", 20),
             "an operator's INSERT of a due row: delivered")

        env.sql("UPDATE trace.trace_queue SET status = 'abandoned', attempts = 9 "
                " WHERE trade_id = %s", (held[2],))
        time.sleep(0.5)
        env.sql("SELECT trace.retry(id) FROM trace.trace_queue WHERE trade_id = %s",
                (held[2],))
        t.ok(wait_until(lambda: status_of(held[2]) == "delivered", 20),
             "trace.retry() of an abandoned row: delivered")

        env.set_gucs({"trace.delay": "0"})
        tid = env.new_trade()
        conn = env.cluster.connect("trades")
        cur = conn.cursor()
        cur.execute("BEGIN")
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now(), "
                    "exit_price = 1.0912, pnl = 1, fees = 0.1 WHERE trade_id = %s", (tid,))
        cur.execute("PREPARE TRANSACTION 'trace_burst_2pc'")
        time.sleep(1)
        t.is_(status_of(tid), None, "a prepared close is not visible yet")
        cur.execute("COMMIT PREPARED 'trace_burst_2pc'")
        conn.close()
        t.ok(wait_until(lambda: status_of(tid) == "delivered", 20),
             "COMMIT PREPARED of a close with trace.delay 0: delivered")
        t.ok(all(len(env.reqs_for(x)) == 1 for x in held + [tid]),
             "each of these trades reached the tracker exactly once")

    env.check_no_pii()
    env.check_log_clean()
finally:
    env.close()

sys.exit(t.done())
