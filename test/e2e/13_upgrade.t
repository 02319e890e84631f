#!/usr/bin/python3
"""Upgrading in place, with the worker running: every released version of
the SQL objects works with the library this tree builds (the window
between restarting onto a new library and ALTER EXTENSION ... UPDATE), and
ALTER EXTENSION UPDATE walks through every version while trades close,
without losing or repeating a queued row.

Starts from the oldest version (DROP EXTENSION, CREATE EXTENSION ...
VERSION), then updates one version at a time up to the default one.  A
trade closed just before each update is still pending while the update
runs (trace.delay = 2s) and must be delivered afterwards, once per
adapter; a trade closed after it must be delivered too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"trace.delay": "2s"}, name="trace_e2e_upgrade")

BOTH = ("myfxbook", "webhook")


def versions():
    """Released versions, oldest first, and the default one."""
    rows = env.sql("SELECT version FROM pg_available_extension_versions "
                   " WHERE name = 'trace_ext' ORDER BY string_to_array(version, '.')::int[]")
    default = env.sql1("SELECT default_version FROM pg_available_extensions "
                       " WHERE name = 'trace_ext'")
    return [r[0] for r in rows], default


def close_one():
    tid = env.new_trade(user_id=1, signal_id=10)     # signal 10: myfxbook and webhook
    env.close_trade(tid)
    return tid


def delivered_once(tid, label):
    rows = env.wait_status(tid, BOTH, "delivered", 20)
    t.ok(all(rows.get(a, {}).get("status") == "delivered" for a in BOTH),
         "%s: both rows delivered" % label, repr(rows))
    for a in BOTH:
        reqs = env.wait_reqs(tid, a, env.paths[a])
        t.is_(len(reqs), 1, "%s: exactly one %s request" % (label, a))
        if reqs:
            env.check_delivery(reqs[0], tid, a, "%s, %s" % (label, a))


try:
    all_versions, default = versions()
    older = [v for v in all_versions if v != default]
    t.ok(len(older) >= 1, "there is an older version to upgrade from", repr(all_versions))
    closed = []
    with t.case("the oldest version's objects with this library"):
        first = all_versions[0]
        env.sql("DROP EXTENSION trace_ext CASCADE")
        env.sql("CREATE EXTENSION trace_ext VERSION %s", (first,))
        t.is_(env.sql1("SELECT extversion FROM pg_extension WHERE extname = 'trace_ext'"),
              first, "installed at version %s" % first)
        tid = close_one()
        closed.append(tid)
        delivered_once(tid, "closed at %s" % first)
        worker = env.worker_pid()

    for v in all_versions[1:]:
        with t.case("ALTER EXTENSION UPDATE TO %s while a row is pending" % v):
            pending = close_one()
            closed.append(pending)
            env.sql("ALTER EXTENSION trace_ext UPDATE TO %s", (v,))
            t.is_(env.sql1("SELECT extversion FROM pg_extension WHERE extname = 'trace_ext'"),
                  v, "now at version %s" % v)
            t.is_(env.sql1("SELECT status FROM trace.trace_queue WHERE trade_id = %s "
                           "AND adapter = 'webhook'", (pending,)),
                  "pending", "the row queued before the update is still pending after it")
            delivered_once(pending, "closed before the update to %s" % v)
            after = close_one()
            closed.append(after)
            delivered_once(after, "closed after the update to %s" % v)

    with t.case("nothing lost, nothing repeated, one worker throughout"):
        t.is_(env.sql1("SELECT count(*) FROM trace.trace_queue WHERE trade_id = ANY(%s) "
                       "AND status = 'delivered' AND attempts = 1", (closed,)),
              2 * len(closed), "every row queued across the updates: delivered on the first attempt")
        t.is_(sum(len(env.reqs_for(tid)) for tid in closed), 2 * len(closed),
              "one request per row")
        t.is_(env.worker_pid(), worker, "the same worker process served every version")
        t.is_(env.sql1("SELECT extversion FROM pg_extension WHERE extname = 'trace_ext'"),
              default, "ends at the default version")
        log = env.cluster.log_text()
        ends = [line for line in log.splitlines() if "trace_ext" in line and (
            "terminated by signal" in line or "exited with exit code" in line)]
        t.is_(ends, [], "no trace_ext worker crashed or exited with an error")
finally:
    env.close()

sys.exit(t.done())
