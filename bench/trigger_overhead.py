#!/usr/bin/python3
"""Benchmark 2, trigger overhead: pgbench closing random trades, with and
without trace_ext attached, and the closing backend's memory over 50,000
closes.

The trade store holds N open trades (default 1,000,000) of opted-in users
on a signal with two adapters (myfxbook, webhook, both enabled), so each
first close of a trade queues two rows.  pgbench runs the application's
close statement (2 clients, 2 threads, prepared, T seconds, default 60):

    UPDATE trades SET status = 'CLOSED', exit_price = 1.0912, closed_at = now(),
                      pnl = 42.10, fees = 1.25 WHERE trade_id = :random_id

without the trigger (trace.detach) and with it (trace.attach), ROUNDS times
(default 6), in the order without/with, with/without, without/with, ... so
that a drift of the disk's fsync latency favours neither side.  Every run
starts from the same state (all trades open, queue empty, VACUUM,
CHECKPOINT).  trace.delay keeps its default (5min): rows wait for their T+X
delay, so the runs measure the trigger, not the worker's sending.  Prints
the TPS of each run, the per-10 s progress (stability), the ratio of the
medians and of each back-to-back pair, and the closing backend's own CPU
time per close with and without.

The TPS of this workload is mostly the commit's fsync, which on a VM
drifts by tens of per cent from run to run; so the script also counts, with
valgrind (callgrind), the instructions a backend executes per close, and
per UPDATE that leaves status alone, with and without the trigger.  Those
counts are exact and repeatable: the same build gives the same figures on
any machine.  (valgrind is optional: without it that part is skipped.)

Then one session closes 50,000 trades, one transaction each, and reports
its TopMemoryContext and the total of its memory contexts
(pg_backend_memory_contexts) before and after.

Usage (as root, after make install):
    bench/trigger_overhead.py [--trades N] [--seconds T] [--rounds R] [--no-valgrind]
                              [--valgrind-only [--only-close]] [--keep-callgrind DIR]
                              [--setup-sql FILE]
--valgrind-only prints the instruction counts alone: no pgbench runs, no
CPU, WAL or memory figures (quick, and insensitive to the machine's load).
--keep-callgrind DIR keeps the callgrind output files there, one per run
(for callgrind_annotate).  --setup-sql FILE runs FILE on the trade store
once it is filled: a schema change measured by hand (e.g. the queue
without an index), on this throwaway cluster only.
A benchmark, not a test: it asserts nothing.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess

from benchlib import (CLOSE, DB, PG_BINDIR, conditions, cpu_seconds, fill_trade_store, pgbench,
                      pgbench_script, pgbench_version, print_block, reset_trade_store,
                      start_cluster)

SCRIPT = "\\set id random(1, :ntrades)\n" + CLOSE.format(id=":id") + ";\n"

# Server-side loops, one transaction per row like the pgbench clients:
# closes of a range of trades, closes of random trades (the same ones on
# every call), and updates that leave status alone; and one UPDATE of a
# range of trades that leaves status alone (per row: what a trigger's WHEN
# clause costs once per statement is spread over its rows).
PROCEDURES = """
CREATE PROCEDURE public.bench_close(a bigint, b bigint) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN a..b LOOP
        %(close_i)s;
        COMMIT;
    END LOOP;
END $$;
CREATE PROCEDURE public.bench_close_random(n int, ntrades int) LANGUAGE plpgsql AS $$
DECLARE
    tid bigint;
BEGIN
    PERFORM setseed(0.5);
    FOR i IN 1..n LOOP
        tid := 1 + (random() * (ntrades - 1))::int;
        %(close_tid)s;
        COMMIT;
    END LOOP;
END $$;
CREATE PROCEDURE public.bench_touch(a bigint, b bigint) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN a..b LOOP
        UPDATE trades SET fees = 1.50 WHERE trade_id = i;
        COMMIT;
    END LOOP;
END $$;
CREATE PROCEDURE public.bench_touch_bulk(a bigint, b bigint) LANGUAGE plpgsql AS $$
BEGIN
    UPDATE trades SET fees = 1.50 WHERE trade_id BETWEEN a AND b;
    COMMIT;
END $$;
CREATE PROCEDURE public.bench_open(a bigint, b bigint) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN a..b LOOP
        INSERT INTO trades (trade_id, user_id, signal_id, instrument, side, volume,
                            entry_price, opened_at)
        VALUES (100000000 + i, 1, 10, 'EURUSD', 'buy', 1.5, 1.0842, now());
        COMMIT;
    END LOOP;
END $$""" % {"close_i": CLOSE.format(id="i"), "close_tid": CLOSE.format(id="tid")}


reset = reset_trade_store


def memory_over_closes(cluster, first_id, n):
    conn = cluster.connect(DB)
    cur = conn.cursor()

    def sample():
        cur.execute("SELECT sum(total_bytes) FILTER (WHERE name = 'TopMemoryContext' "
                    "                                AND level = 0), "
                    "       sum(total_bytes) FROM pg_backend_memory_contexts")
        return cur.fetchone()

    def close(ids):
        for tid in ids:
            cur.execute(CLOSE.format(id="%s"), (tid,))

    close(range(first_id, first_id + 1000))          # warm up: plans, caches
    before = sample()
    close(range(first_id + 1000, first_id + 1000 + n))
    after = sample()
    cur.execute("SELECT count(*) FROM trace.trace_queue WHERE trade_id BETWEEN %s AND %s",
                (first_id, first_id + 1000 + n))
    queued = cur.fetchone()[0]
    conn.close()
    return before, after, queued


def cpu_per_close(cluster, attached, first, n=8000, repeat=5):
    """The closing backend's own CPU time (utime + stime) per close, one
    transaction each, run server-side (no client round trip): the best of
    `repeat` runs of n closes.  Steadier than TPS, which the disk's fsync
    latency dominates."""
    conn = cluster.connect(DB)
    cur = conn.cursor()
    cur.execute("SELECT trace.%s('trades')" % ("attach" if attached else "detach"))
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    cur.execute("CALL public.bench_close(%s, %s)", (first, first + 999))   # warm up
    best = None
    for k in range(repeat):
        lo = first + 1000 + k * n
        c0 = cpu_seconds(pid)
        cur.execute("CALL public.bench_close(%s, %s)", (lo, lo + n - 1))
        us = (cpu_seconds(pid) - c0) * 1e6 / n
        best = us if best is None else min(best, us)
    conn.close()
    return best


def callgrind_instructions(cluster, proc, n, keep=None):
    """Instructions (callgrind's Ir) of a single-user backend inside CALL
    statements: a warm-up CALL of 200 rows, then one of n rows.  The
    cluster must be stopped.  keep: where to move the output file, if
    anywhere."""
    out = os.path.join(cluster.base, "callgrind.out")
    stdin = "CALL public.%s(1, 200)\nCALL public.%s(201, %d)\n" % (proc, proc, 200 + n)
    cmd = ["runuser", "-u", "postgres", "--", "valgrind", "--tool=callgrind",
           "--callgrind-out-file=" + out, "--toggle-collect=ExecuteCallStmt",
           os.path.join(PG_BINDIR, "postgres"), "--single", "-D", cluster.datadir, DB]
    p = subprocess.run(cmd, input=stdin.encode(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, cwd=cluster.base)
    text = open(out).read() if os.path.exists(out) else ""
    m = re.search(r"^summary: (\d+)", text, re.M)
    if p.returncode != 0 or not m or b"ERROR" in p.stdout:
        raise RuntimeError("callgrind run failed:\n" + p.stdout.decode()[-3000:])
    if keep:
        shutil.move(out, keep)
    else:
        os.unlink(out)
    return int(m.group(1))


def instructions_per_row(cluster, attached, proc, n1=300, n2=1300, keep_dir=None):
    """Instructions per row of proc: the difference between runs of n2 and
    n1 rows, over n2 - n1 (start-up and warm-up cancel out)."""
    counts = []
    for n in (n1, n2):
        cluster.psql(dbname=DB, sql="SELECT trace.%s('trades')"
                     % ("attach" if attached else "detach"))
        reset(cluster)
        cluster.stop()
        try:
            keep = None
            if keep_dir:
                keep = os.path.join(keep_dir, "callgrind.%s.%s.%d"
                                    % (proc, "with" if attached else "without", n))
            counts.append(callgrind_instructions(cluster, proc, n, keep))
        finally:
            cluster.start()
    return (counts[1] - counts[0]) / float(n2 - n1)


STATEMENTS = (("bench_close", "close"),
              ("bench_touch", "UPDATE that leaves status alone"),
              ("bench_touch_bulk", "row of one UPDATE of many rows that leaves status alone"),
              ("bench_open", "INSERT of an OPEN trade"))


def instruction_counts(cluster, keep_dir=None, procs=None):
    counts = {}
    for proc in procs or [p for p, _ in STATEMENTS]:
        for attached in (False, True):
            counts[(proc, attached)] = instructions_per_row(cluster, attached, proc,
                                                            keep_dir=keep_dir)
    return counts


def instruction_lines(ir):
    lines = []
    for proc, what in STATEMENTS:
        if (proc, False) not in ir:
            continue
        wo, w = ir[(proc, False)], ir[(proc, True)]
        lines.append("instructions per %s (callgrind, single-user backend, "
                     "1,000 rows): %.0f without, %.0f with trace_ext (+%.0f, +%.0f %%)"
                     % (what, wo, w, w - wo, 100 * (w - wo) / wo))
    return lines


def wal_per_close(cluster, attached, ntrades, n=20000):
    """WAL bytes per close over the first n random closes after a
    checkpoint (full-page images included, as in production); the same
    trade ids both ways."""
    cluster.psql(dbname=DB, sql="SELECT trace.%s('trades')"
                 % ("attach" if attached else "detach"))
    reset(cluster)
    conn = cluster.connect(DB)
    cur = conn.cursor()
    cur.execute("SELECT pg_current_wal_lsn()")
    start = cur.fetchone()[0]
    cur.execute("CALL public.bench_close_random(%s, %s)", (n, ntrades))
    cur.execute("SELECT (pg_current_wal_lsn() - %s::pg_lsn) / %s", (start, n))
    per_close = float(cur.fetchone()[0])
    conn.close()
    return per_close


def pair_ratios(runs):
    return [w / wo for (w, _), (wo, _) in zip(runs["with"], runs["without"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trades", type=int, default=1000000)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--no-valgrind", action="store_true",
                    help="skip the instruction counts")
    ap.add_argument("--valgrind-only", action="store_true",
                    help="only the instruction counts: no pgbench, CPU, WAL or memory runs")
    ap.add_argument("--only-close", action="store_true",
                    help="with --valgrind-only: count the close alone")
    ap.add_argument("--setup-sql", metavar="FILE",
                    help="SQL run on the trade store before the runs (a schema change "
                         "to measure by hand; nothing here applies it otherwise)")
    ap.add_argument("--keep-callgrind", metavar="DIR",
                    help="keep the callgrind output files in DIR")
    args = ap.parse_args()
    use_valgrind = not args.no_valgrind and shutil.which("valgrind") is not None
    if args.valgrind_only and not use_valgrind:
        ap.error("--valgrind-only needs valgrind (and not --no-valgrind)")
    if args.keep_callgrind:
        os.makedirs(args.keep_callgrind, exist_ok=True)
        os.chmod(args.keep_callgrind, 0o777)

    cluster = start_cluster({"trace.enabled_adapters": "myfxbook,webhook",
                             "trace.myfxbook_webhook_url": "http://127.0.0.1:9/unused",
                             "trace.webhook_endpoint": "http://127.0.0.1:9/unused"},
                            "trace_bench_trigger",
                            pg_settings={"shared_buffers": "512MB", "max_wal_size": "4GB"})
    script = pgbench_script(SCRIPT)
    try:
        # N open trades, all of opted-in users, on signal 10 whose adapters
        # are myfxbook, webhook and file (two of them enabled).
        fill_trade_store(cluster, args.trades)
        cluster.psql(dbname=DB, sql=PROCEDURES)
        if args.setup_sql:
            cluster.psql(dbname=DB, file=args.setup_sql)
        if args.valgrind_only:
            ir = instruction_counts(cluster, args.keep_callgrind,
                                    ["bench_close"] if args.only_close else None)
            print_block("trigger overhead: instructions per row, with and without trace_ext",
                        conditions(cluster, {
                            "trace_ext": "attached via trace.attach(); opted-in users; signal "
                                         "with myfxbook+webhook",
                        }))
            print_block("result", instruction_lines(ir))
            return
        runs = {"without": [], "with": []}
        for r in range(args.rounds):
            order = ("without", "with") if r % 2 == 0 else ("with", "without")
            for variant in order:
                cluster.psql(dbname=DB, sql="SELECT trace.%s('trades')"
                             % ("attach" if variant == "with" else "detach"))
                reset(cluster)
                r = pgbench(cluster, script, args.seconds, defines={"ntrades": args.trades})
                runs[variant].append((r.tps, r.progress))
        cluster.psql(dbname=DB, sql="SELECT trace.attach('trades')")
        reset(cluster)
        before, after, queued = memory_over_closes(cluster, 1, 50000)
        reset(cluster)
        cpu = {"without": cpu_per_close(cluster, False, 1)}
        reset(cluster)
        cpu["with"] = cpu_per_close(cluster, True, 1)
        wal = {"without": wal_per_close(cluster, False, args.trades),
               "with": wal_per_close(cluster, True, args.trades)}
        ir = instruction_counts(cluster, args.keep_callgrind) if use_valgrind else None
        cluster.psql(dbname=DB, sql="SELECT trace.attach('trades')")

        med = {v: statistics.median(t for t, _ in runs[v]) for v in runs}
        print_block("trigger overhead: pgbench close workload, with and without trace_ext",
                    conditions(cluster, {
                        "pgbench": "%s; -n -M prepared -c 2 -j 2 -T %d, random trade of %d"
                                   % (pgbench_version(), args.seconds, args.trades),
                        "trace_ext": "attached via trace.attach(); opted-in users; signal with "
                                     "myfxbook+webhook; trace.delay default (rows wait, "
                                     "the worker sends nothing during the runs)",
                        "server": "shared_buffers 512MB, max_wal_size 4GB, otherwise defaults",
                    }))
        lines = []
        for variant in ("without", "with"):
            for i, (tps, prog) in enumerate(runs[variant]):
                lines.append("%-7s run %d: %.0f TPS; per 10 s: %s"
                             % (variant, i + 1, tps, " ".join("%.0f" % x for x in prog)))
        lines.append("median: %.0f TPS without, %.0f TPS with trace_ext = %.1f %% kept"
                     % (med["without"], med["with"], 100 * med["with"] / med["without"]))
        ratios = pair_ratios(runs)
        lines.append("per round (with / without, run back to back): %s; median %.1f %%"
                     % (" ".join("%.1f%%" % (100 * r) for r in ratios),
                        100 * statistics.median(ratios)))
        lines.append("closing backend's CPU per close (best of 5 x 8,000, server-side loop): "
                     "%.1f us without, %.1f us with trace_ext (+%.1f us)"
                     % (cpu["without"], cpu["with"], cpu["with"] - cpu["without"]))
        lines.append("WAL per close (first 20,000 random closes after a checkpoint): "
                     "%.0f bytes without, %.0f bytes with trace_ext"
                     % (wal["without"], wal["with"]))
        if ir:
            lines.extend(instruction_lines(ir))
        else:
            lines.append("instructions per close: skipped (valgrind not installed, "
                         "or --no-valgrind)")
        lines.append("one session, 50,000 closes (one transaction each, %d rows queued):"
                     % queued)
        lines.append("  TopMemoryContext %d -> %d bytes; all contexts %d -> %d bytes"
                     % (before[0], after[0], before[1], after[1]))
        print_block("result", lines)
    finally:
        os.unlink(script)
        cluster.destroy()


if __name__ == "__main__":
    main()
