#!/usr/bin/python3
"""The file adapter, local export, end to end: a real worker (two, in
fact) appends closed trades to <trace.file_export_dir>/traces-YYYY-MM-DD.jsonl.
Every line is JSON holding exactly the allowlisted columns as to_json
renders them, with no personal data; one line per delivered row; the file
is named by the UTC day of the write, which a second cluster, run under
libfaketime across a UTC midnight (in a non-UTC OS time zone), shows
rolling over; an unwritable or missing directory is a recorded, retried
`io` failure naming the file, and once fixed the row is written once."""

import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from file_export import (chown_to_server, close_many, fail_count, file_name,  # noqa: E402
                         lines_by_trade, make_export_dir, read_export,
                         remove_dir, utc_date)
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import PII_KEYS, TraceEnv  # noqa: E402

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
F = "file"


def accepted_files(ts, slack=2.0):
    """File names a write at (about) ts may go to: its UTC day, and the
    neighbouring day if ts is within `slack` seconds of a UTC midnight."""
    e = ts.timestamp()
    return {file_name(utc_date(e - slack)), file_name(utc_date(e)),
            file_name(utc_date(e + slack))}


def export_text(export):
    out = []
    for name, (data, _) in export.items():
        out.append("--- %s (%d bytes)" % (name, len(data)))
        out.append(data.decode("utf-8", "replace")[-3000:])
    return "\n".join(out)


t = Tap()
export_dir = make_export_dir()
later_dir = None
env = TraceEnv.start_or_exit(
    t, on_failure=lambda: remove_dir(export_dir), name="trace_e2e_file_local", gucs={
        "trace.enabled_adapters": F,
        "trace.file_export_type": "local",
        "trace.file_export_dir": export_dir,
        "trace.workers": 2,
        "trace.batch_size": 4,
        "trace.max_retries": 50,
        "trace.retry_backoff_cap": "1s",
    })

try:
    with t.case("local export: JSON lines, the allowlist, to_json values, no PII"):
        t.ok(wait_until(lambda: len(env.worker_pids()) == 2, 15), "two workers running")
        # Fixture trades of user 1 (opted in) on signal 10 {myfxbook,webhook,file},
        # plus new ones: 16 rows due at once, claimed 4 at a time by 2 workers.
        tids = [g for g in range(1, 31) if g % 3 == 0]
        tids += [env.new_trade(user_id=1, signal_id=10) for _ in range(6)]
        close_many(env, tids)
        queued = env.sql("SELECT count(*) FROM trace.trace_queue WHERE adapter = 'file' "
                         "AND trade_id = ANY(%s)", (tids,))[0][0]
        t.is_(queued, len(tids), "one 'file' row queued per closed trade (%d)" % len(tids))
        ok = wait_until(lambda: env.sql1(
            "SELECT count(*) FROM trace.trace_queue WHERE adapter = 'file' "
            "AND status = 'delivered' AND trade_id = ANY(%s)", (tids,)) == len(tids), 20)
        # Read the files at once: a delivered row's line must already be there.
        export = read_export(export_dir)
        t.ok(ok, "all %d rows delivered" % len(tids),
             lambda: repr(env.sql("SELECT trade_id, status, attempts, last_error "
                                  "FROM trace.trace_queue WHERE trade_id = ANY(%s)", (tids,))))
        rows = {r["trade_id"]: r for r in env.sqld(
            "SELECT trade_id, status, attempts, delivered_at, last_error, last_http_status "
            "FROM trace.trace_queue WHERE adapter = 'file' AND trade_id = ANY(%s)", (tids,))}
        t.ok(all(r["attempts"] == 1 and r["last_error"] is None and r["delivered_at"]
                 for r in rows.values()),
             "each delivered on the first attempt, no error, delivered_at set",
             lambda: repr([r for r in rows.values() if r["attempts"] != 1 or r["last_error"]]))

        names = sorted(export)
        t.ok(names and all(n.startswith("traces-") and n.endswith(".jsonl") for n in names),
             "the directory holds only traces-YYYY-MM-DD.jsonl files", repr(names))
        bad_name = [(tid, r["delivered_at"].isoformat(), ln.file)
                    for tid, r in rows.items()
                    for ln in lines_by_trade(export).get(tid, [])
                    if ln.file not in accepted_files(r["delivered_at"])]
        t.ok(not bad_name, "each line is in traces-<UTC day of the write>.jsonl",
             lambda: repr(bad_name[:5]))
        t.ok(all(data.endswith(b"\n") for data, _ in export.values()),
             "every file ends with a newline (no partial line)")
        lines = [ln for _, ls in export.values() for ln in ls]
        unparsable = [ln for ln in lines if ln.error or not isinstance(ln.obj, dict)
                      or ln.duplicate_keys]
        t.ok(lines and not unparsable,
             "all %d lines parse as one JSON object each (two concurrent workers)" % len(lines),
             lambda: "\n".join("%r: %s" % (ln, ln.error or ln.duplicate_keys)
                               for ln in unparsable[:5]))
        by_trade = lines_by_trade(export)
        delivered_ids = set(r[0] for r in env.sql(
            "SELECT trade_id FROM trace.trace_queue WHERE adapter = 'file' AND status = 'delivered'"))
        t.is_(sorted(k for k in by_trade), sorted(delivered_ids),
              "the trades in the files are exactly the rows delivered")
        t.ok(all(len(v) == 1 for v in by_trade.values()),
             "exactly one line per delivered trade",
             lambda: repr({k: len(v) for k, v in by_trade.items() if len(v) != 1}))
        cols = sorted(env.payload_columns)
        badkeys = [ln for ln in lines if not isinstance(ln.obj, dict) or sorted(ln.obj) != cols]
        t.ok(not badkeys, "every line's keys are exactly trace.payload_columns",
             lambda: "allowlist %r\n%r" % (cols, [sorted(ln.obj) for ln in badkeys[:3]
                                                  if isinstance(ln.obj, dict)]))
        wrong = []
        for tid in tids:
            for ln in by_trade.get(tid, []):
                want = env.trade_json(tid)
                if ln.obj != want:
                    wrong.append("trade %d\n line: %r\n want: %r" % (tid, ln.obj, want))
        t.ok(not wrong, "every line's values are what PostgreSQL's to_json renders "
             "(numbers as literals, timestamptz as ISO 8601)", lambda: "\n".join(wrong[:3]))
        raw = b"".join(data for data, _ in export.values())
        pii = [v for v in env.pii_values() if v.encode() in raw]
        t.ok(not pii, "no personal value (email, name, client_id, account_number, "
             "passport/iban canaries) in the files", lambda: repr(pii[:10]))
        pkeys = sorted(set(k for ln in lines if isinstance(ln.obj, dict) for k in ln.obj) & PII_KEYS)
        t.is_(pkeys, [], "no personal key in any line")
        m = env.sqld("SELECT pushed_total, fail_total FROM trace.metrics WHERE adapter = 'file'")[0]
        t.is_((m["pushed_total"], m["fail_total"]), (len(lines), 0),
              "trace.metrics: file pushed_total = lines written, fail_total = 0")

    with t.case("trace.payload_columns decides the keys of a line"):
        narrow = ["trade_id", "instrument", "closed_at", "pnl"]
        env.set_gucs({"trace.payload_columns": ",".join(narrow)})
        tid = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(tid)
        env.wait_status(tid, F, "delivered", 15)
        got = lines_by_trade(read_export(export_dir)).get(tid, [])
        t.ok(len(got) == 1 and isinstance(got[0].obj, dict) and sorted(got[0].obj) == sorted(narrow),
             "with trace.payload_columns = %s the line has exactly those keys" % ",".join(narrow),
             repr(got))
        if got:
            t.is_(got[0].obj, env.trade_json(tid, narrow), "... with to_json's values")
        env.set_gucs({"trace.payload_columns": None})
        t.is_(env.sql1("SHOW trace.payload_columns"), ",".join(env.payload_columns),
              "trace.payload_columns back to the default")

    def fail_then_fix(label, target_dir, breaker, fixer, errno_text):
        """Break the directory, close a trade, see a recorded retried io
        failure naming the file, fix the directory, see one line."""
        pids = env.worker_pids()
        io0 = fail_count(env, F, "io") or 0
        breaker()
        tid = env.new_trade(user_id=1, signal_id=10)
        t0 = time.time()
        env.close_trade(tid)
        rows = env.wait_rows(tid, lambda rs: F in rs and rs[F]["attempts"] >= 2
                             and rs[F]["last_error"] is not None, 15)
        t1 = time.time()
        r = rows.get(F, {})
        t.ok(r.get("attempts", 0) >= 2 and r.get("status") in ("pending", "sending"),
             "%s: the write fails, is recorded, and is retried (attempts >= 2, not abandoned)"
             % label, repr(r))
        err = r.get("last_error") or ""
        names = {os.path.join(target_dir, file_name(utc_date(x))) for x in (t0 - 1, t1 + 1)}
        t.ok(any(n in err for n in names) and errno_text in err,
             "%s: last_error names the file and says %r" % (label, errno_text),
             "last_error: %r\nexpected one of %r" % (err, sorted(names)))
        t.is_(r.get("last_http_status"), None, "%s: last_http_status is NULL" % label)
        f = env.sqld("SELECT status, attempts, last_error FROM trace.failures WHERE id = %s",
                     (r.get("id"),))
        t.ok(f and f[0]["last_error"] == err, "%s: the row is in trace.failures" % label, repr(f))
        io1 = fail_count(env, F, "io") or 0
        t.ok(io1 - io0 >= 2, "%s: trust_trace_fail_total{adapter=file,reason=io} counts "
             "the failed attempts" % label, "before %s, after %s" % (io0, io1))
        t.is_(env.worker_pids(), pids, "%s: the same worker processes (no crash)" % label)
        fixer()
        rows = env.wait_status(tid, F, "delivered", 15)
        t.is_(rows.get(F, {}).get("status"), "delivered",
              "%s: delivered once the directory is fixed" % label)
        got = lines_by_trade(read_export(target_dir)).get(tid, [])
        t.ok(len(got) == 1 and got[0].obj == env.trade_json(tid),
             "%s: exactly one line for the trade, with its payload" % label, repr(got))
        return tid

    with t.case("unwritable directory (mode 000), then fixed"):
        def breaker():
            os.chmod(export_dir, 0o000)

        def fixer():
            os.chmod(export_dir, 0o750)
        fail_then_fix("mode 000", export_dir, breaker, fixer, "Permission denied")

    with t.case("missing directory, then created"):
        later_dir = os.path.join(export_dir, "created-later")
        env.set_gucs({"trace.file_export_dir": later_dir})

        def mkdir():
            os.mkdir(later_dir, 0o750)
            chown_to_server(later_dir)
        fail_then_fix("missing directory", later_dir, lambda: None, mkdir,
                      "No such file or directory")
        env.set_gucs({"trace.file_export_dir": export_dir})

    with t.case("configuration errors"):
        try:
            env.cluster.alter_system({"trace.file_export_dir": "relative/dir"}, dbname="trades")
            t.fail("a relative trace.file_export_dir is rejected")
        except psycopg2.Error as e:
            t.ok("trace.file_export_dir" in str(e),
                 "a relative trace.file_export_dir is rejected, naming the parameter", str(e))
        try:
            env.cluster.alter_system({"trace.file_export_type": "ftp"}, dbname="trades")
            t.fail("trace.file_export_type = ftp is rejected")
        except psycopg2.Error as e:
            t.ok("trace.file_export_type" in str(e),
                 "trace.file_export_type = ftp is rejected, naming the parameter", str(e))
        t.is_(env.sql1("SHOW trace.file_export_dir"), export_dir, "the setting is unchanged")
        cfg0 = fail_count(env, F, "config") or 0
        env.set_gucs({"trace.file_export_dir": ""})
        tid = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(tid)
        rows = env.wait_rows(tid, lambda rs: F in rs and rs[F]["last_error"], 10)
        r = rows.get(F, {})
        t.ok("trace.file_export_dir" in (r.get("last_error") or "")
             and r.get("status") in ("pending", "sending"),
             "trace.file_export_dir unset: a retried failure naming trace.file_export_dir",
             repr(r))
        t.ok((fail_count(env, F, "config") or 0) > cfg0, "... counted with reason config")
        env.set_gucs({"trace.file_export_dir": export_dir})
        env.wait_status(tid, F, "delivered", 15)
        t.is_(len(lines_by_trade(read_export(export_dir)).get(tid, [])), 1,
              "... and written once the directory is set")

    with t.case("no personal data or secret in the server log"):
        env.check_log_clean("local export")
finally:
    env.close()
    remove_dir(export_dir)


# -- a UTC midnight, under libfaketime ----------------------------------------
# The server's clock is shifted (FAKETIME="+Ns": the same offset in every
# process, forked or exec'd) so that it reaches 2031-01-01 00:00:00 UTC,
# a new year, month and day at once, about LEAD seconds after the cluster
# is created.  The server's OS time zone is Asia/Tokyo (UTC+9), where
# that instant is 09:00 the same day, so a file named by local time would
# not roll over.
#
# libfaketime hands out the real time while a process sits in select() or
# epoll_wait() (its own wrappers of them), and so inside a signal handler
# that interrupts one; the postmaster starts background workers from its
# SIGCHLD handler at start-up, so the first worker inherits the real clock.
# A worker restarted after it exits is started from the postmaster's main
# loop, with the fake clock: restart_on_fake_clock() does that, and proves
# it with a delivery (a worker on the real clock, years before the rows'
# due_at, delivers nothing).
LEAD = 22


def restart_on_fake_clock(env, tries=3):
    """Restart the worker until it delivers under the fake clock; returns
    the id of the trade that proved it (delivered), or None."""
    for _ in range(tries):
        pid0 = env.worker_pid()
        env.sql("SELECT pg_terminate_backend(%s)", (pid0,))
        if not wait_until(lambda: (env.worker_pid() or pid0) != pid0, 10):
            continue
        tid = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(tid)
        if env.wait_status(tid, F, "delivered", 3).get(F, {}).get("status") == "delivered":
            return tid
        env.sql("UPDATE trades SET status = 'OPEN' WHERE trade_id = %s", (tid,))
    return None

midnight_dir = make_export_dir(prefix="trace_e2e_export_midnight_")
env = None
try:
    with t.case("day rollover at UTC midnight (libfaketime)"):
        if not os.path.exists(LIBFAKETIME):
            raise RuntimeError("%s missing: apt-get install faketime" % LIBFAKETIME)
        midnight = datetime.datetime(2031, 1, 1, tzinfo=datetime.timezone.utc)
        utc_day = midnight.date() - datetime.timedelta(days=1)
        offset = int(midnight.timestamp() - LEAD - time.time())
        env = TraceEnv(t, name="trace_e2e_file_midnight", gucs={
            "trace.enabled_adapters": F,
            "trace.file_export_type": "local",
            "trace.file_export_dir": midnight_dir,
            "autovacuum": False,    # no SIGUSR1 to the postmaster meanwhile
        }, server_env={
            "LD_PRELOAD": LIBFAKETIME,
            "FAKETIME": "%+ds" % offset,
            "TZ": "Asia/Tokyo",
        })
        now = env.sql1("SELECT clock_timestamp()")
        t.ok(midnight - datetime.timedelta(seconds=LEAD) < now
             < midnight - datetime.timedelta(seconds=8),
             "the server's clock runs just before UTC midnight", "server clock: %s" % now)
        probe = restart_on_fake_clock(env)
        t.ok(probe, "the restarted worker delivers under the fake clock",
             lambda: env.cluster.log_tail(20))
        before = [env.new_trade(user_id=1, signal_id=10) for _ in range(2)]
        close_many(env, before)
        before += [probe] if probe else []
        for tid in before:
            env.wait_status(tid, F, "delivered", 10)
        pid0 = env.worker_pid()
        rows = {tid: env.rows(tid).get(F, {}) for tid in before}
        t.ok(len(rows) == 3 and all(r.get("status") == "delivered" and r["delivered_at"]
                                    < midnight - datetime.timedelta(seconds=1)
                                    for r in rows.values()),
             "three trades delivered before midnight (server clock)",
             repr([(r.get("status"), r.get("delivered_at")) for r in rows.values()]))
        crossed = wait_until(lambda: env.sql1("SELECT clock_timestamp()") >
                             midnight + datetime.timedelta(seconds=1), 30, 0.2)
        t.ok(crossed, "the server's clock passed UTC midnight")
        after = [env.new_trade(user_id=1, signal_id=10) for _ in range(3)]
        close_many(env, after)
        for tid in after:
            env.wait_status(tid, F, "delivered", 10)
        export = read_export(midnight_dir)
        day1, day2 = file_name(utc_day), file_name(utc_day + datetime.timedelta(days=1))
        t.is_(sorted(export), [day1, day2],
              "two files: %s and %s" % (day1, day2), lambda: export_text(export))
        in1 = sorted(ln.trade_id for ln in export.get(day1, (b"", []))[1])
        in2 = sorted(ln.trade_id for ln in export.get(day2, (b"", []))[1])
        t.is_(in1, sorted(before), "the deliveries before midnight are the lines of %s" % day1)
        t.is_(in2, sorted(after), "the deliveries after midnight are the lines of %s" % day2)
        lines = [ln for name in (day1, day2) for ln in export.get(name, (b"", []))[1]]
        wrong = ["line %r\nwant %r" % (ln.obj, env.trade_json(ln.trade_id))
                 for ln in lines if ln.obj != env.trade_json(ln.trade_id)]
        t.ok(len(lines) == 6 and not wrong, "their lines hold the trades' payloads",
             lambda: "\n".join(wrong[:3]) or export_text(export))
        t.is_(env.worker_pid(), pid0, "the same worker wrote both days")
finally:
    if env is not None:
        env.close()
    remove_dir(midnight_dir)

sys.exit(t.done())
