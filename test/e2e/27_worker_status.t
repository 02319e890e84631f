#!/usr/bin/python3
"""trace.worker_status: one row per worker, what it is doing (README,
Monitoring).

Two workers.  The view has one row each, with the pids pg_stat_activity
shows; idle between passes; sending, with its requests in flight counted,
while a slow tracker holds them; paused under trace.paused; delivered and
failed outcomes counted since the worker started, a finished pass after a
started one.  After kill -9 of a worker (PostgreSQL restarts every
process) the view shows the new workers, counting from zero.  pg_monitor
may read it."""

import os
import signal
import sys
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

t = Tap()
# Requests take 2 s at the slow tracker: a timeout well above that.
env = TraceEnv.start_or_exit(t, gucs={"trace.workers": 2, "trace.http_timeout": "10s"},
                             name="trace_e2e_worker_status")
BOTH = ("myfxbook", "webhook")
COLS = ["worker", "pid", "state", "in_flight", "next_wake_at", "last_pass_started",
        "last_pass_finished", "delivered", "failed", "started_at"]


def status():
    return env.sqld("SELECT * FROM trace.worker_status ORDER BY worker")


def states():
    return sorted(r["state"] for r in status())


try:
    with t.case("one row per worker"):
        t.ok(wait_until(lambda: len(env.worker_pids()) == 2, 20), "two workers run")
        rows = status()
        t.is_(list(rows[0].keys()) if rows else None, COLS, "the view's columns")
        t.is_(sorted(r["pid"] for r in rows), sorted(env.worker_pids()),
              "one row per worker, with the pids pg_stat_activity shows")
        t.is_([r["worker"] for r in rows], [1, 2], "workers numbered 1 and 2")
        t.ok(wait_until(lambda: states() == ["idle", "idle"], 10),
             "both idle between passes", repr(status()))
        t.ok(all(r["started_at"] is not None and r["in_flight"] == 0 for r in status()),
             "started_at set, nothing in flight")

    with t.case("sending, with requests in flight"):
        for a in BOTH:
            env.sink.set_behaviour(env.paths[a], default="delay:2:200")
        trades = [env.new_trade(signal_id=10) for _ in range(3)]
        for tid in trades:
            env.close_trade(tid)
        seen = wait_until(lambda: any(r["state"] == "sending" and r["in_flight"] > 0
                                      for r in status()), 10, 0.05)
        t.ok(seen, "a worker shows sending, with its requests in flight", repr(status()))
        t.ok(all(env.wait_status(tid, BOTH, "delivered", 15) for tid in trades),
             "the six rows are delivered")
        for a in BOTH:
            env.sink.set_behaviour(env.paths[a], default=200)
        t.ok(wait_until(lambda: states() == ["idle", "idle"]
                        and sum(r["in_flight"] for r in status()) == 0, 10),
             "then idle again, nothing in flight", repr(status()))
        rows = status()
        t.is_(sum(r["delivered"] for r in rows), 6, "6 deliveries counted, across the workers")
        t.is_(sum(r["failed"] for r in rows), 0, "no failure counted")
        busy = [r for r in rows if r["delivered"] > 0]
        t.ok(busy and all(r["last_pass_finished"] is not None
                          and r["last_pass_finished"] >= r["last_pass_started"] for r in busy),
             "the last pass of a worker that delivered has finished", repr(busy))

    with t.case("paused"):
        env.set_gucs({"trace.paused": "on"})
        t.ok(wait_until(lambda: states() == ["paused", "paused"], 10),
             "trace.paused on: both paused", repr(status()))
        env.set_gucs({"trace.paused": "off"})
        t.ok(wait_until(lambda: states() == ["idle", "idle"], 10),
             "off again: both idle", repr(status()))

    with t.case("after kill -9 of a worker"):
        old = sorted(env.worker_pids())
        os.kill(old[0], signal.SIGKILL)

        def new_pids():
            """The workers' pids, reconnecting after the crash restart."""
            try:
                return sorted(env.worker_pids())
            except psycopg2.Error:
                env.reconnect()
                return []
        t.ok(wait_until(lambda: (lambda p: len(p) == 2 and not set(p) & set(old))(new_pids()),
                        60, 0.5), "two new workers after the restart")
        t.ok(wait_until(lambda: sorted(r["pid"] for r in status())
                        == sorted(env.worker_pids()), 10),
             "the view shows the new workers' pids", repr(status()))
        t.is_(sum(r["delivered"] + r["failed"] for r in status()), 0,
              "their counts start from zero")
        tid = env.new_trade(signal_id=10)
        env.close_trade(tid)
        t.ok(env.wait_status(tid, BOTH, "delivered", 15), "they deliver")
        t.ok(wait_until(lambda: sum(r["delivered"] for r in status()) == 2, 10),
             "... and count it", repr(status()))

    with t.case("pg_monitor may read it"):
        env.sql("CREATE ROLE trace_status_reader LOGIN IN ROLE pg_monitor")
        conn = env.cluster.connect("trades", user="trace_status_reader")
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM trace.worker_status")
        t.is_(cur.fetchone()[0], 2, "a pg_monitor member reads trace.worker_status")
        conn.close()
finally:
    env.close()

sys.exit(t.done())
