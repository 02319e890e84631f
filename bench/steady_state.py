#!/usr/bin/python3
"""Benchmark, steady state: the platform's close throughput while the
worker is delivering.

pgbench closes trades (2 clients, 2 threads, -M prepared) on a signal with
two trackers (signal 10 lists myfxbook, webhook and file;
trace.enabled_adapters = 'myfxbook,webhook', both pointed at a loopback
nginx, trace.delay = 0), with trace_ext
  attached  triggers on trades (trace.attach): each close queues two rows,
            and the worker delivers them while pgbench runs;
  detached  no triggers (trace.detach): closes queue nothing, the worker
            sleeps.
Runs alternate, ROUNDS times (default 3) S seconds each (default 15): a
round is detached/attached, the next attached/detached, and so on, so that
a drift of the disk's fsync latency favours neither side.  With --paused a
third run per round is attached with trace.paused on (closes queue their
rows, the worker sends nothing), which tells the trigger's share of the
cost from the concurrent delivery's.

Every run does the same work: it starts from the same state (every trade
open, the queue empty, VACUUM, CHECKPOINT, the worker paused meanwhile)
and each pgbench client closes its own sequence of open trades, client c
closing trades c+1, c+1+C, c+1+2C, ... (C clients), so every close is a
first close (a re-close would not fire the trigger) and both modes close
the same trades in the same order.  The store holds --trades open trades
(default 200,000); a run that would need more says so.

Prints each run's TPS (and per 5 s), the machine's CPU busy share and
busy CPU time per close (all processes: pgbench, backends, WAL writer,
worker, nginx; /proc/stat), the WAL written per second and per close
during the run (the worker's writes included), each round's ratio
attached/detached and their median; for attached runs also the rows delivered during the run
per second, the backlog when pgbench ended (pending rows, and rows in
flight), the close -> delivered lag of the rows delivered during the run,
and the worker's CPU seconds per delivery.

Usage (as root, after make install; PG_BINDIR=... for a private copy):
    bench/steady_state.py [--rounds R] [--seconds S] [--clients C]
                          [--workers W] [--batch B] [--trades N] [--paused]
                          [--rate TPS] [--worker-nice N] [--setup-sql FILE]
                          [--waits] [--http-floor SHARE] [--modes LIST]
--rate: pgbench -R, closes at a fixed rate, to compare builds by the
worker's CPU per delivery at equal load.  --worker-nice (a diagnostic):
renice the workers.  --setup-sql FILE: run FILE on the trade database
before the runs (a schema change measured by hand).  --waits: sample
pg_stat_activity every 5 ms during each run and print what share of the
samples pgbench's backends and the workers spent in each wait event (CPU
when not waiting).  --http-floor SHARE: two more runs per round, both
while bench/http_load.c (built here with cc) sends nginx the HTTP requests
that closes at SHARE x the detached TPS would need (two per close, bodies
the size of a delivery's, 100 kept-alive connections, the cheapest client
there is): "http" detached (the requests alone), "floor" attached with the
worker paused (the trigger and the requests).  No worker can cost the
closes less than "floor" does, whatever it does in the database.
--modes LIST: only these modes beside detached (e.g. floor: more rounds of
the floor in the same time).
A benchmark, not a test: it asserts nothing.
"""

import argparse
import collections
import os
import statistics
import subprocess
import tempfile
import threading
import time

from benchlib import (CLOSE, DB, Nginx, conditions, cpu_seconds, fill_trade_store, machine_cpu,
                      percentile,
                      pgbench, pgbench_script, pgbench_version, print_block, reset_trade_store,
                      start_cluster, status_expr, wait_until, worker_pids)

# Client c (0-based :client_id) closes trades c+1, c+1+C, ... (pgbench keeps
# a client's variables from one transaction to the next; k starts at 0).
SCRIPT = ("\\set k :k + 1\n"
          "\\set id (:k - 1) * :clients + :client_id + 1\n"
          + CLOSE.format(id=":id") + ";\n")


def prepare_run(cluster, mode):
    """The same starting state for every run: pause the worker, reset the
    store (every trade open, the queue empty, VACUUM, CHECKPOINT), resume
    it (unless mode is "paused"), then attach the triggers (unless mode is
    "detached")."""
    cluster.alter_system({"trace.paused": True})
    conn = cluster.connect(DB)
    cur = conn.cursor()
    wait_until(lambda: _none_in_flight(cur), 60)
    cur.execute("SELECT trace.detach('trades')")
    conn.close()
    reset_trade_store(cluster)
    if mode not in ("paused", "floor"):
        cluster.alter_system({"trace.paused": None})
    if mode not in ("detached", "http"):
        cluster.psql(dbname=DB, sql="SELECT trace.attach('trades')")


def _none_in_flight(cur):
    cur.execute("SELECT count(*) = 0 FROM trace.trace_queue WHERE "
                + status_expr(cur) + " = 'sending'")
    return cur.fetchone()[0]


class WaitSampler:
    """--waits: what pgbench's backends and the workers are doing, sampled
    from pg_stat_activity every 5 ms while pgbench runs: wait_event_type:
    wait_event, or CPU when not waiting (idle: the backend waits for
    pgbench)."""

    SQL = ("SELECT backend_type = 'trace_ext worker', state, "
           "       coalesce(wait_event_type || ':' || wait_event, 'CPU') "
           "  FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
           "   AND (application_name = 'pgbench' OR backend_type = 'trace_ext worker')")

    def __init__(self, cluster):
        self.conn = cluster.connect(DB)
        self.backends = collections.Counter()
        self.workers = collections.Counter()
        self.stopping = False
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        cur = self.conn.cursor()
        while not self.stopping:
            cur.execute(self.SQL)
            for worker, state, wait in cur.fetchall():
                if worker:
                    self.workers[wait] += 1
                else:
                    self.backends["idle (pgbench)" if state == "idle" else wait] += 1
            time.sleep(0.005)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping = True
        self.thread.join()
        self.conn.close()

    @staticmethod
    def shares(counter, top=6):
        total = sum(counter.values()) or 1
        return ", ".join("%s %.0f %%" % (k, 100.0 * v / total)
                         for k, v in counter.most_common(top))


def build_http_load():
    """bench/http_load.c built with cc into a temp dir; its path."""
    out = os.path.join(tempfile.mkdtemp(prefix="trace_bench_http_load_"), "http_load")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "http_load.c")
    subprocess.run(["cc", "-O2", "-o", out, src], check=True)
    return out


def payload_bytes(cur):
    """About the size of a delivery's body: to_json of the allowlisted
    columns of a trade of the store (open after the reset: a closed
    trade's exit columns add a few dozen bytes)."""
    cur.execute("SELECT current_setting('trace.payload_columns')")
    cols = cur.fetchone()[0]
    cur.execute("SELECT length(to_json(t)::text) FROM (SELECT %s FROM trades "
                "ORDER BY trade_id LIMIT 1) t" % cols)
    return cur.fetchone()[0]


def start_http_load(args, nginx, rate, body):
    """--http-floor: http_load sending `rate` requests/s to nginx for the
    run's seconds, over 100 kept-alive connections (the default batch)."""
    return subprocess.Popen([args.http_load, str(nginx.port), "/webhook", "%.0f" % rate,
                             str(args.seconds), "100", str(body)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run(cluster, cur, pids, script, args, mode, http=None):
    prepare_run(cluster, mode)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    busy0, all0 = machine_cpu()
    cur.execute("SELECT pg_current_wal_lsn()")
    lsn0 = cur.fetchone()[0]
    t0 = time.time()
    waits = WaitSampler(cluster).start() if args.waits else None
    load = start_http_load(args, *http) if http else None
    r = pgbench(cluster, script, args.seconds, clients=args.clients,
                defines={"k": 0, "clients": args.clients}, progress=5, rate=args.rate)
    if waits:
        waits.stop()
    load_out = load.communicate()[0].decode().strip() if load else None
    t1 = time.time()
    busy1, all1 = machine_cpu()
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn0,))
    wal = float(cur.fetchone()[0])
    # At once, while the worker goes on: the backlog as pgbench ended.
    st = status_expr(cur)
    cur.execute("SELECT count(*) FILTER (WHERE " + st + " = 'pending'), "
                "       count(*) FILTER (WHERE " + st + " = 'sending'), "
                "       count(*) FILTER (WHERE status = 'delivered' "
                "                        AND delivered_at <= to_timestamp(%s)), "
                "       count(*) "
                "  FROM trace.trace_queue", (t1,))
    pending, sending, delivered, queued = cur.fetchone()
    cur.execute("SELECT extract(epoch FROM delivered_at - created_at) * 1000 "
                "  FROM trace.trace_queue WHERE status = 'delivered' "
                "   AND delivered_at <= to_timestamp(%s)", (t1,))
    lag = [float(x) for (x,) in cur.fetchall()]
    cur.execute("SELECT count(*) FROM trades WHERE status = 'CLOSED'")
    closed = cur.fetchone()[0]
    return {"tps": r.tps, "progress": r.progress, "transactions": r.transactions,
            "closed": closed, "seconds": t1 - t0, "cpu": cpu,
            "waits": waits, "wal": wal, "busy": busy1 - busy0, "busy_share": (busy1 - busy0) / max(1e-9, all1 - all0),
            "pending": pending, "http": http, "load": load_out,
            "sending": sending, "delivered": delivered, "queued": queued, "lag": lag}


def describe(mode, i, x):
    line = "%-8s run %d: %.0f TPS (%d closes, %d trades closed); per 5 s: %s" % (
        mode, i + 1, x["tps"], x["transactions"], x["closed"],
        " ".join("%.0f" % v for v in x["progress"]))
    line += "; machine CPU busy %.0f %%, %.0f us per close; WAL %.1f MB/s, %.0f bytes per close" % (
        100 * x["busy_share"], x["busy"] * 1e6 / max(1, x["transactions"]),
        x["wal"] / 1e6 / x["seconds"], x["wal"] / max(1, x["transactions"]))
    if x["transactions"] > x["closed"]:
        line += "; RAN OUT: %d closes found no open trade, raise --trades" % (
            x["transactions"] - x["closed"])
    lines = [line]
    if x["waits"]:
        lines.append("           pgbench's backends: %s" % WaitSampler.shares(x["waits"].backends))
        if mode != "detached":
            lines.append("           worker: %s" % WaitSampler.shares(x["waits"].workers))
    if x["load"] is not None:
        lines.append("           http_load at %.0f requests/s, %d-byte bodies: %s"
                     % (x["http"][1], x["http"][2], x["load"]))
    if mode == "attached":
        lines.append(
            "           queued %d rows; delivered during the run %d = %.0f/s; backlog when "
            "pgbench ended: %d pending, %d in flight; lag close -> delivered p50 %.0f ms, "
            "p99 %.0f ms; worker CPU %.1f s = %.0f us per delivery"
            % (x["queued"], x["delivered"], x["delivered"] / x["seconds"], x["pending"],
               x["sending"], percentile(x["lag"], 50), percentile(x["lag"], 99), x["cpu"],
               x["cpu"] * 1e6 / max(1, x["delivered"])))
    else:
        lines.append("           queued %d rows; worker CPU %.2f s" % (x["queued"], x["cpu"]))
    return lines


# What each mode's runs are, in the summary lines.
MODE_LABELS = {
    "attached": "attached (the worker delivering)",
    "paused": "attached, worker paused (the trigger alone)",
    "http": "detached, with the HTTP requests alone (http_load at 2 x %(share).2f x the "
            "detached TPS)",
    "floor": "attached, worker paused, with the same HTTP requests (the floor under any "
             "worker: no delivery work in the database)",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="trace.workers")
    ap.add_argument("--batch", type=int, default=None, help="trace.batch_size")
    ap.add_argument("--trades", type=int, default=200000, help="open trades in the store")
    ap.add_argument("--rate", type=int, default=None, metavar="TPS",
                    help="pgbench -R: close at this fixed rate (all clients together), so "
                         "that runs compare the worker's CPU per delivery at equal load")
    ap.add_argument("--waits", action="store_true",
                    help="sample the wait events of pgbench's backends and the workers")
    ap.add_argument("--setup-sql", metavar="FILE",
                    help="run FILE on the trade database once, before the runs (a schema "
                         "change measured by hand, e.g. the queue's fillfactor)")
    ap.add_argument("--worker-nice", type=int, default=None, metavar="N",
                    help="diagnostic: renice the workers to N (setpriority) after they start")
    ap.add_argument("--http-floor", type=float, default=None, metavar="SHARE",
                    help="also run detached while bench/http_load.c sends the HTTP requests "
                         "that 2 x SHARE x the detached TPS closes would need (the floor: "
                         "the requests alone, no trace_ext work)")
    ap.add_argument("--modes", metavar="LIST",
                    help="the modes to run beside detached, comma-separated, out of "
                         "attached, paused, http, floor (default: attached, plus what "
                         "--paused and --http-floor add)")
    ap.add_argument("--paused", action="store_true",
                    help="also run attached with the worker paused (the trigger alone)")
    args = ap.parse_args()

    nginx = Nginx(log=False).start()
    settings = {"trace.enabled_adapters": "myfxbook,webhook",
                "trace.myfxbook_webhook_url": nginx.url("/myfxbook"),
                "trace.webhook_endpoint": nginx.url("/webhook"),
                "trace.delay": "0",
                "trace.workers": args.workers}
    if args.batch:
        settings["trace.batch_size"] = args.batch
    cluster = start_cluster(settings, "trace_bench_steady",
                            pg_settings={"shared_buffers": "512MB", "max_wal_size": "4GB"})
    script = pgbench_script(SCRIPT)
    try:
        fill_trade_store(cluster, args.trades)
        if args.setup_sql:
            cluster.psql(dbname=DB, file=args.setup_sql)
        conn = cluster.connect(DB)
        cur = conn.cursor()
        pids = wait_until(lambda: worker_pids(cur), 20)
        if args.worker_nice is not None:
            for p in pids:
                os.setpriority(os.PRIO_PROCESS, p, args.worker_nice)
        if args.modes:
            modes = ["detached"] + [m for m in args.modes.split(",") if m != "detached"]
        else:
            modes = (["detached", "attached"] + (["paused"] if args.paused else [])
                     + (["http", "floor"] if args.http_floor else []))
        if ("http" in modes or "floor" in modes) and not args.http_floor:
            args.http_floor = 0.85
        runs = {m: [] for m in modes}
        if args.http_floor:
            args.http_load = build_http_load()
            body = payload_bytes(cur)
        for i in range(args.rounds):
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                http = None
                if mode in ("http", "floor"):
                    # Round 1 runs detached first; later rounds use every
                    # detached run so far.
                    det = statistics.median(x["tps"] for x in runs["detached"])
                    http = (nginx, 2 * args.http_floor * det, body)
                runs[mode].append(run(cluster, cur, pids, script, args, mode, http))
        cluster.alter_system({"trace.paused": None})

        print_block("steady state: pgbench closes while the worker delivers, trace_ext "
                    "attached vs detached",
                    conditions(cluster, {
                        "pgbench": "%s; -n -M prepared -c %d -j %d -T %d%s; each client "
                                   "closes its own sequence of open trades (first closes "
                                   "only), the same trades in every run"
                                   % (pgbench_version(), args.clients, args.clients,
                                      args.seconds, " -R %d" % args.rate if args.rate else ""),
                        "worker nice": str(args.worker_nice) if args.worker_nice is not None
                                       else "as started",
                        "store": "%d open trades of opted-in users on signal 10 "
                                 "(myfxbook, webhook, file); reset before every run"
                                 % args.trades,
                        "trackers": "myfxbook + webhook enabled, both to %s" % nginx.describe(),
                        "server": "shared_buffers 512MB, max_wal_size 4GB, otherwise defaults",
                    }))
        lines = []
        for mode in modes:
            for i, x in enumerate(runs[mode]):
                lines += describe(mode, i, x)
        for mode in modes[1:]:
            r = [x["tps"] / d["tps"] for x, d in zip(runs[mode], runs["detached"])]
            lines.append("%s / detached, per round: %s; median %.1f %%"
                         % (MODE_LABELS[mode] % {"share": args.http_floor or 0},
                            " ".join("%.1f%%" % (100 * x) for x in r),
                            100 * statistics.median(r)))
        med = {m: statistics.median(x["tps"] for x in runs[m]) for m in runs}
        lines.append("median TPS: %s" % ", ".join("%.0f %s" % (med[m], m) for m in modes))
        if "attached" not in runs:
            print_block("result", lines)
            conn.close()
            return
        det_us = statistics.median(x["busy"] * 1e6 / max(1, x["transactions"])
                                   for x in runs["detached"])
        att_us = statistics.median(x["busy"] * 1e6 / max(1, x["transactions"])
                                   for x in runs["attached"])
        lines.append("machine CPU per close (all processes, median): %.0f us detached, %.0f us "
                     "attached; where the CPUs are the limit, %.0f %% of the TPS is what that "
                     "allows" % (det_us, att_us, 100 * det_us / att_us))
        att = runs["attached"]
        lines.append("attached runs: deliveries/s %s; backlog at the end %s pending; "
                     "worker CPU per delivery %s us"
                     % (" ".join("%.0f" % (x["delivered"] / x["seconds"]) for x in att),
                        " ".join("%d" % x["pending"] for x in att),
                        " ".join("%.0f" % (x["cpu"] * 1e6 / max(1, x["delivered"]))
                                 for x in att)))
        print_block("result", lines)
        conn.close()
    finally:
        os.unlink(script)
        cluster.destroy()
        nginx.stop()


if __name__ == "__main__":
    main()
