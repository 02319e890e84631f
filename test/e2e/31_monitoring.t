#!/usr/bin/python3
"""Monitoring that scales, and alert rules that are tested (README,
"Monitoring that scales" and "Alert runbook").

- `promtool test rules monitoring/alerts_test.yml` passes, and every rule
  of monitoring/alerts.yml is tested there both firing (with its exact
  labels and rendered annotations) and quiet; every rule has a
  runbook_url whose anchor is a heading of README.md.
- On a queue of 1,000,000 delivered + 10,000 pending rows (plus some
  abandoned and sending ones), every query of monitoring/queries.yaml, run
  as a pg_monitor member, reads the queue through an index only (no
  sequential scan of trace.trace_queue, only the partial indexes) and
  touches a small fraction of its pages: checked in the plan (EXPLAIN
  ANALYZE, BUFFERS) and in the transaction's own table statistics.  So
  does trace.prometheus_metrics().  A control: trace.queue_summary, which
  counts every row, is seen scanning the whole table.
- trace.queue_backlog agrees with the queue; the exporter serves the new
  gauges (workers running/configured/held, backlog) with those values.
- The worker gauge without the preload: running 0 and configured 1, the
  condition of TraceExtWorkerNotRunning; and held = 1 when the queue names
  another cluster, 0 again after trace.adopt_queue().

The plans are printed (diag): README's EXPLAIN output comes from here."""

import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap  # noqa: E402
from exposition import EXPORTER, Exporter, parse, value  # noqa: E402
from trace_e2e import REPO, TraceEnv  # noqa: E402

import yaml  # noqa: E402  (python3-yaml, installed by the test command)

PROMTOOL = "/usr/bin/promtool"
ADAPTERS = ("myfxbook", "webhook", "file")
DELIVERED = 1000000
PENDING = 10000
ABANDONED = {"myfxbook": 3, "webhook": 7, "file": 0}
SENDING = 12
QUEUE_INDEXES = {"trace_queue_due_idx", "trace_queue_abandoned_idx"}
RUNBOOK_BASE = "https://pgxn.org/dist/trace_ext/#"

t = Tap()


def github_slug(heading):
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


# -- the rules ----------------------------------------------------------------
rules = yaml.safe_load((REPO / "monitoring" / "alerts.yml").read_text())
rule_list = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
tests = yaml.safe_load((REPO / "monitoring" / "alerts_test.yml").read_text())

with t.case("promtool test rules monitoring/alerts_test.yml"):
    p = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"],
                       cwd=str(REPO / "monitoring"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t.ok(p.returncode == 0, "promtool test rules: every case passes", p.stdout.decode())
    fired, quiet = set(), set()
    for case in tests["tests"]:
        for a in case.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    names = [r["alert"] for r in rule_list]
    t.ok(len(names) >= 11, "alerts.yml has %d rules" % len(names), repr(names))
    t.is_(sorted(n for n in names if n not in fired), [],
          "every rule is seen firing in alerts_test.yml")
    t.is_(sorted(n for n in names if n not in quiet), [],
          "every rule is seen quiet in alerts_test.yml (before its 'for', or on healthy series)")
    t.is_(sorted((fired | quiet) - set(names)), [],
          "alerts_test.yml tests no rule that alerts.yml lacks")
    full = [a["alertname"] for c in tests["tests"] for a in c.get("alert_rule_test", [])
            for e in a.get("exp_alerts") or []
            if not {"summary", "description", "runbook_url"} <= set(e.get("exp_annotations", {}))]
    t.is_(full, [], "each expected alert states its summary, description and runbook_url")

with t.case("each rule's runbook_url is a README section"):
    readme = (REPO / "README.md").read_text()
    slugs = {github_slug(m.group(1)) for m in re.finditer(r"(?m)^#+ (.+)$", readme)}
    bad = []
    for r in rule_list:
        url = (r.get("annotations") or {}).get("runbook_url", "")
        if not url.startswith(RUNBOOK_BASE) or url[len(RUNBOOK_BASE):] not in slugs:
            bad.append((r["alert"], url))
    t.is_(bad, [], "every rule has a runbook_url %s<anchor of a README heading>" % RUNBOOK_BASE)
    sev = sorted({(r.get("labels") or {}).get("severity") for r in rule_list})
    t.ok(set(sev) <= {"warning", "critical"}, "severities are warning or critical", repr(sev))

# -- a big queue ----------------------------------------------------------------
# Paused: the worker claims nothing, so the queue stays as built.
env = TraceEnv.start_or_exit(t, gucs={"trace.paused": "on"}, name="trace_e2e_monitoring")
exporter = None


def walk(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from walk(child)


def explain(conn, query):
    """(plan JSON, plan text) of query under EXPLAIN ANALYZE, BUFFERS."""
    cur = conn.cursor()
    cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query)
    plan = cur.fetchone()[0][0]
    cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + query)
    return plan, "\n".join(r[0] for r in cur.fetchall())


def xact_reads(conn, query):
    """Run query in a transaction of its own; what it did to
    trace.trace_queue: (sequential scans, blocks read or hit).  The
    counters are this backend's, not yet flushed to the cumulative
    statistics, so they are read before and after, in the transaction."""
    cur = conn.cursor()
    probe = ("SELECT COALESCE(seq_scan, 0), "
             "       pg_stat_get_xact_blocks_fetched('trace.trace_queue'::regclass) "
             "  FROM pg_stat_xact_all_tables "
             " WHERE relid = 'trace.trace_queue'::regclass")
    cur.execute("BEGIN")
    # A parallel scan's blocks would be counted in its workers, not here.
    cur.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    cur.execute(probe)
    before = cur.fetchone()
    cur.execute(query)
    cur.fetchall()
    cur.execute(probe)
    after = cur.fetchone()
    cur.execute("COMMIT")
    return after[0] - before[0], after[1] - before[1]


try:
    with t.case("a queue of 1,000,000 delivered and 10,000 pending rows"):
        env.sql("""
            INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status, attempts,
                                           due_at, delivered_at, created_at)
            SELECT 10000000 + g, (ARRAY['myfxbook', 'webhook', 'file'])[1 + g %% 3], 'trades',
                   'delivered', 1, now() - interval '2 days', now() - interval '2 days',
                   now() - interval '2 days'
              FROM generate_series(1, %s) g""", (DELIVERED,))
        env.sql("""
            INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status, due_at)
            SELECT 20000000 + g, (ARRAY['myfxbook', 'webhook', 'file'])[1 + g %% 3], 'trades',
                   'pending', now() - make_interval(secs => g)
              FROM generate_series(1, %s) g""", (PENDING,))
        n = 0
        for a, k in ABANDONED.items():
            env.sql("""
                INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status, attempts,
                                               last_error)
                SELECT 30000000 + %s + g, %s, 'trades', 'abandoned', 5, 'HTTP 500'
                  FROM generate_series(1, %s) g""", (n, a, k))
            n += k
        env.sql("""
            INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status, attempts,
                                           due_at, lease_owner)
            SELECT 40000000 + g, 'webhook', 'trades', 'sending', 1,
                   now() + interval '1 hour', pg_backend_pid()
              FROM generate_series(1, %s) g""", (SENDING,))
        env.sql("VACUUM ANALYZE trace.trace_queue")
        relpages = env.sql1("SELECT relpages FROM pg_class WHERE oid = 'trace.trace_queue'::regclass")
        size = env.sql1("SELECT pg_size_pretty(pg_total_relation_size('trace.trace_queue'))")
        t.ok(relpages > 5000, "the queue has %d heap pages (%s with its indexes)" % (relpages, size))
        bound = relpages // 20
        env.sql("CREATE ROLE trace_monitor LOGIN IN ROLE pg_monitor")
        mon = env.cluster.connect("trades", user="trace_monitor")

    with t.case("trace.queue_backlog agrees with the queue"):
        got = {r[0]: r[1:] for r in env.sql(
            "SELECT adapter, pending, sending, abandoned, oldest_due_at FROM trace.queue_backlog")}
        want = {r[0]: r[1:] for r in env.sql("""
            SELECT k.a,
                   count(q.*) FILTER (WHERE q.status = 'pending'),
                   count(q.*) FILTER (WHERE q.status = 'sending'),
                   count(q.*) FILTER (WHERE q.status = 'abandoned'),
                   min(q.due_at) FILTER (WHERE q.status = 'pending')
              FROM unnest(trace._adapters()) k(a)
              LEFT JOIN trace.trace_queue q ON q.adapter = k.a
             GROUP BY k.a""")}
        t.is_(got, want, "pending, sending, abandoned and the oldest due_at, per adapter")
        t.is_(sorted(got), sorted(ADAPTERS), "one row per adapter, abandoned 0 included")

    queries = yaml.safe_load((REPO / "monitoring" / "queries.yaml").read_text())
    plans = {}
    with t.case("every exporter query reads the queue through an index only"):
        for ns, spec in queries.items():
            q = spec["query"]
            plan, text = explain(mon, q)
            plans[ns] = text
            nodes = list(walk(plan["Plan"]))
            on_queue = [n for n in nodes if n.get("Relation Name") == "trace_queue"]
            seq = [n for n in on_queue if n["Node Type"] == "Seq Scan"]
            idx = {n.get("Index Name") for n in on_queue if n.get("Index Name")}
            buffers = (plan["Plan"].get("Shared Hit Blocks", 0)
                       + plan["Plan"].get("Shared Read Blocks", 0))
            t.ok(not seq and idx <= QUEUE_INDEXES,
                 "%s: no sequential scan of the queue; indexes %s"
                 % (ns, ", ".join(sorted(idx)) or "none (does not read the queue)"), text)
            scans, blocks = xact_reads(mon, q)
            t.ok(scans == 0 and blocks <= bound and buffers <= bound,
                 "%s: %d buffers in the plan, %d queue blocks in its transaction (bound %d, "
                 "1/20 of the table), %.1f ms"
                 % (ns, buffers, blocks, bound, plan.get("Execution Time", 0)),
                 "seq scans %d\n%s" % (scans, text))

    with t.case("the views the exporter reads, and trace.prometheus_metrics()"):
        for q in ("SELECT * FROM trace.queue_backlog", "SELECT * FROM trace.metrics",
                  "SELECT trace.prometheus_metrics()"):
            scans, blocks = xact_reads(mon, q)
            t.ok(scans == 0 and blocks <= bound,
                 "%s: no sequential scan, %d queue blocks (bound %d)" % (q, blocks, bound))
        plan, text = explain(mon, "SELECT * FROM trace.queue_backlog")
        t.diag("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM trace.queue_backlog\n" + text)
        plan, text = explain(mon, "SELECT * FROM trace.metrics")
        t.diag("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM trace.metrics\n" + text)

    with t.case("control: trace.queue_summary scans every row"):
        scans, blocks = xact_reads(mon, "SELECT * FROM trace.queue_summary")
        t.ok(scans >= 1 and blocks >= relpages,
             "the check sees a whole-table read: %d seq scan(s), %d blocks" % (scans, blocks))

    with t.case("the exporter serves the gauges for the alert rules"):
        if not Path(EXPORTER).exists():
            t.skip("the exporter serves trust_trace_workers_*", "prometheus-postgres-exporter missing")
        else:
            exporter = Exporter(env.cluster, "trace_monitor")
            body = exporter.scrape("trust_trace_workers_running")
            t.ok(body, "the exporter's /metrics has trust_trace_workers_running", exporter.output)
            if body:
                exp = parse(body)
                t.is_(value(exp, "pg_exporter_last_scrape_error"), 0.0,
                      "every query of monitoring/queries.yaml ran without error")
                t.is_([value(exp, "trust_trace_workers_" + k)
                       for k in ("running", "configured", "held")], [1.0, 1.0, 0.0],
                      "workers running 1, configured 1, held 0")
                t.is_({a: value(exp, "trust_trace_backlog_abandoned", adapter=a) for a in ADAPTERS},
                      {a: float(k) for a, k in ABANDONED.items()},
                      "trust_trace_backlog_abandoned per adapter")
                oldest = value(exp, "trust_trace_backlog_oldest_pending_seconds", adapter="myfxbook")
                t.ok(oldest is not None and oldest >= PENDING - 3,
                     "trust_trace_backlog_oldest_pending_seconds{myfxbook} = %s (the oldest "
                     "pending row is %d s overdue)" % (oldest, PENDING - 2))
                t.is_(value(exp, "trust_trace_paused"), 1.0, "trust_trace_paused = 1")
            exporter.stop()
            exporter = None

    workers_q = queries["trust_trace_workers"]["query"]

    with t.case("held: the queue names another cluster"):
        env.sql("UPDATE trace.queue_origin SET system_identifier = system_identifier + 1")
        cur = mon.cursor()
        cur.execute(workers_q)
        t.is_(cur.fetchone()[2], 1, "trust_trace_workers_held = 1 (read as pg_monitor)")
        env.sql("SELECT trace.adopt_queue()")
        cur.execute(workers_q)
        t.is_(cur.fetchone()[2], 0, "0 again after trace.adopt_queue()")
        mon.close()

    with t.case("no worker: the server started without the preload"):
        env.db.close()
        env.cluster.stop()
        env.cluster.start(overrides={"shared_preload_libraries": "''"})
        env.reconnect()
        mon = env.cluster.connect("trades", user="trace_monitor")
        cur = mon.cursor()
        cur.execute(workers_q)
        t.is_(list(cur.fetchone()), [0, 1, 0],
              "running 0, configured 1, held 0: TraceExtWorkerNotRunning's condition "
              "(running < configured)")
        cur.execute(queries["trust"]["query"])
        t.is_(cur.fetchone()[0], 1, "the paused query answers without the preload too "
              "(1: postgresql.conf says trace.paused = on)")
        mon.close()
        env.cluster.stop()
        env.cluster.start()
        env.reconnect()
finally:
    if exporter:
        exporter.stop()
    env.close()

for ns in ("trust_trace_backlog", "trust_trace_queue"):
    if ns in plans:
        t.diag("EXPLAIN (ANALYZE, BUFFERS) of monitoring/queries.yaml %s\n%s" % (ns, plans[ns]))
sys.exit(t.done())
