#!/usr/bin/python3
"""The worker's session is its own, end to end.

A background worker picks up the settings of its database and of the role
it connects as (the bootstrap superuser, postgres here) when it connects.
For each setting the worker must not inherit:

    default_transaction_isolation = 'serializable', 'repeatable read'
    statement_timeout = '1ms', lock_timeout = '1ms',
    idle_in_transaction_session_timeout = '1ms',
    default_transaction_read_only = on

set at database level (ALTER DATABASE trades SET ...) and at role level
(ALTER ROLE postgres SET ...), the workers are restarted
(pg_terminate_backend; the postmaster starts them again) so that they
connect under it, a fresh client session is shown to run with it, and 100
trades (200 queue rows, two trackers) are closed from 4 client sessions at
once while the two workers claim and record.  Then:

- every queue row ends delivered;
- the sink received exactly one request per (trade, tracker): a record
  transaction that failed would have left its rows leased, to be sent
  again when the lease ends;
- the workers logged no ERROR, FATAL or PANIC since they connected;
- with default_transaction_read_only, the worker says (LOG) that it runs
  read-write although the database or role asks for read-only.

The application's sessions run under the isolation level the database or
role sets (retrying their own serialization failures, as an application
on such a platform does) and set the other settings back as they connect
(PGOPTIONS): what is tested is the worker's session, not theirs.

A record transaction that fails for a transient reason is retried: a
trigger on the queue (test-only) raises serialization_failure (40001),
then deadlock_detected (40P01), on the first recording attempt of a
trade's row only (a sequence, which a rollback does not undo, counts the
attempts).  The worker logs the retry, the row is delivered in one
attempt, one request, and no ERROR from the worker.
No timing is asserted: the waits are generous upper bounds."""

import os
import re
import sys
import threading
from collections import Counter
from pathlib import Path

import psycopg2
import psycopg2.errors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DB, TraceEnv  # noqa: E402

ROLE = "postgres"           # the worker's role: the bootstrap superuser
TRADES = 100                # per scenario; signal 10 lists both trackers
CLIENTS = 4
WORKERS = 2
SETTINGS = [
    ("default_transaction_isolation", "serializable"),
    ("default_transaction_isolation", "repeatable read"),
    ("statement_timeout", "1ms"),
    ("lock_timeout", "1ms"),
    ("idle_in_transaction_session_timeout", "1ms"),
    ("default_transaction_read_only", "on"),
]
# What the application's sessions set back for themselves, as they connect
# (PGOPTIONS: a client's settings win over the database's and the role's).
CLIENT_OPTIONS = ("-c statement_timeout=0 -c lock_timeout=0 "
                  "-c idle_in_transaction_session_timeout=0 "
                  "-c default_transaction_read_only=off")
WORKER_LINE = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] trace_ext worker ")
BAD_LEVEL = re.compile(r"\b(ERROR|FATAL|PANIC):")

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"trace.workers": WORKERS},
                             name="trace_e2e_session")


def level_sql(level, verb):
    """ALTER DATABASE trades / ALTER ROLE postgres, then SET ... or RESET ..."""
    target = ("DATABASE %s" % DB) if level == "database" else ("ROLE %s" % ROLE)
    return "ALTER %s %s" % (target, verb)


def restart_workers():
    """Terminate the workers and wait for the postmaster to start as many
    new ones (they read the database's and role's settings as they
    connect); returns the server log offsets before the restart and from
    where the new workers are the only ones logging."""
    before = env.cluster.log_size()
    old = set(env.worker_pids())
    env.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            " WHERE backend_type = 'trace_ext worker'")
    new = wait_until(lambda: (lambda p: p if len(p) == WORKERS and not p & old else None)(
        set(env.worker_pids())), 20)
    if not new:
        raise RuntimeError("the workers were not restarted: %r" % env.worker_pids())
    return before, env.cluster.log_size()


def worker_problems(since):
    """ERROR, FATAL or PANIC lines of a worker in the log after `since`."""
    out = []
    for entry in env.cluster.log_entries(since):
        if WORKER_LINE.match(entry) and BAD_LEVEL.search(entry):
            out.append(entry)
    return out


def close_concurrently(first, last):
    """Close trades first..last from CLIENTS sessions at once, one
    transaction per close, retrying the application's own serialization
    failures and deadlocks."""
    errors = []

    def client(ids):
        try:
            conn = env.cluster.connect(DB)
            cur = conn.cursor()
            for tid in ids:
                for _ in range(50):
                    try:
                        cur.execute("UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, "
                                    "       closed_at = now(), pnl = 42.10, fees = 1.25 "
                                    " WHERE trade_id = %s", (tid,))
                        break
                    except (psycopg2.errors.SerializationFailure,
                            psycopg2.errors.DeadlockDetected):
                        continue
                else:
                    errors.append("trade %d: not closed after 50 tries" % tid)
            conn.close()
        except Exception as e:
            errors.append(repr(e))

    ids = list(range(first, last + 1))
    threads = [threading.Thread(target=client, args=(ids[i::CLIENTS],))
               for i in range(CLIENTS)]
    saved = os.environ.get("PGOPTIONS")
    os.environ["PGOPTIONS"] = CLIENT_OPTIONS
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        if saved is None:
            del os.environ["PGOPTIONS"]
        else:
            os.environ["PGOPTIONS"] = saved
    return errors


def requests_by_pair(first, last):
    return Counter(p for p in (env.req_trade(r) for r in env.sink.requests())
                   if p[0] is not None and first <= p[0] <= last)


def scenario(level, name, value, first):
    last = first + TRADES - 1
    label = "%s = '%s' (%s level)" % (name, value, level)
    env.sql(level_sql(level, "SET %s = %%s" % name), (value,))
    try:
        restarted, since = restart_workers()
        probe = env.cluster.connect(DB)
        try:
            cur = probe.cursor()
            # With statement_timeout = 1ms even SHOW may be cancelled on a
            # busy machine: try a few times.
            for attempt in range(20):
                try:
                    cur.execute("SHOW %s" % name)
                    break
                except psycopg2.errors.QueryCanceled:
                    if attempt == 19:
                        raise
            t.is_(cur.fetchone()[0], value, "%s: a new session of the worker's role in %s "
                  "runs with it" % (label, DB))
        finally:
            probe.close()
        env.add_trades(first, last, user_id=1, signal_id=10)
        errors = close_concurrently(first, last)
        t.ok(not errors, "%s: %d trades closed from %d sessions at once"
             % (label, TRADES, CLIENTS), "\n".join(errors[:10]))
        pairs = {(r[0], r[1]) for r in env.sql(
            "SELECT trade_id, adapter FROM trace.trace_queue WHERE trade_id BETWEEN %s AND %s",
            (first, last))}
        t.is_(len(pairs), 2 * TRADES, "%s: one queue row per (trade, tracker)" % label)
        done = wait_until(lambda: env.sql1(
            "SELECT count(*) FROM trace.trace_queue WHERE trade_id BETWEEN %s AND %s "
            "   AND status = 'delivered'", (first, last)) == 2 * TRADES, 30, 0.1)
        t.ok(done, "%s: every row delivered" % label, lambda: repr(env.sql(
            "SELECT status, attempts, count(*) FROM trace.trace_queue "
            " WHERE trade_id BETWEEN %s AND %s GROUP BY 1, 2", (first, last))))
        got = requests_by_pair(first, last)
        repeated = {p: n for p, n in got.items() if n > 1}
        t.ok(set(got) == pairs and not repeated,
             "%s: exactly one request per (trade, tracker) at the sink" % label,
             lambda: "%d pairs received, %d expected; %d sent more than once, e.g. %r"
             % (len(got), len(pairs), len(repeated), sorted(repeated.items())[:5]))
        bad = worker_problems(since)
        t.ok(not bad, "%s: no ERROR from the workers" % label, "\n".join(bad[:10]))
        if name == "default_transaction_read_only":
            t.ok(re.search(r"trace_ext worker LOG:.*default_transaction_read_only",
                           env.cluster.log_text(restarted)),
                 "%s: the worker logs that it runs read-write nonetheless" % label)
    finally:
        env.sql(level_sql(level, "RESET %s" % name))


INJECT = """
    CREATE SEQUENCE public.e2e_record_calls;
    CREATE TABLE public.e2e_inject (trade_id bigint PRIMARY KEY, code text NOT NULL);
    CREATE FUNCTION public.e2e_fail_first_record() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        code text;
    BEGIN
        SELECT i.code INTO code FROM public.e2e_inject i WHERE i.trade_id = NEW.trade_id;
        IF code IS NOT NULL AND OLD.status IN ('pending', 'sending')
           AND NEW.status IN ('pending', 'delivered', 'abandoned')
           AND (NEW.status, NEW.attempts, NEW.due_at)
               IS DISTINCT FROM (OLD.status, OLD.attempts, OLD.due_at)
           AND pg_catalog.nextval('public.e2e_record_calls') = 1 THEN
            RAISE EXCEPTION 'e2e: injected failure of a record transaction'
                USING ERRCODE = code;
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER e2e_fail_first_record BEFORE UPDATE ON trace.trace_queue
        FOR EACH ROW EXECUTE FUNCTION public.e2e_fail_first_record();
"""


def transient_record_failure(code, name):
    """The first recording attempt of one trade's row fails with `code`;
    the worker retries the transaction instead of dropping the outcome."""
    env.sql("ALTER SEQUENCE public.e2e_record_calls RESTART")
    tid = env.new_trade(user_id=1, signal_id=11)     # webhook only: one row
    env.sql("INSERT INTO public.e2e_inject VALUES (%s, %s)", (tid, code))
    since = env.cluster.log_size()
    env.close_trade(tid)
    rows = env.wait_status(tid, "webhook", "delivered", 20)
    t.is_(rows.get("webhook", {}).get("status"), "delivered",
          "%s (%s) in the record transaction: the row is delivered" % (name, code))
    t.is_(rows.get("webhook", {}).get("attempts"), 1, "... in one attempt")
    t.is_(env.sql1("SELECT last_value FROM public.e2e_record_calls"), 2,
          "... the record transaction ran twice (the first failed)")
    t.is_(len(env.reqs_for(tid)), 1, "... one request at the sink")
    log = env.cluster.log_text(since)
    t.ok(re.search(r"trace_ext worker LOG:  .*record.*retry", log),
         "... the worker logged the retry",
         "\n".join(ln for ln in log.splitlines() if "trace_ext worker" in ln))
    bad = worker_problems(since)
    t.ok(not bad, "... no ERROR from the worker", "\n".join(bad[:10]))


try:
    first = 100000
    for level in ("database", "role"):
        for name, value in SETTINGS:
            with t.case("%s = '%s' at %s level" % (name, value, level)):
                scenario(level, name, value, first)
            first += 1000

    with t.case("a record transaction failing for a transient reason is retried"):
        restart_workers()       # connected with no database or role setting
        env.sql(INJECT)
        try:
            transient_record_failure("40001", "a serialization failure")
            transient_record_failure("40P01", "a deadlock")
        finally:
            env.sql("DROP TRIGGER e2e_fail_first_record ON trace.trace_queue")

    env.check_log_clean()
finally:
    env.close()

sys.exit(t.done())
