#!/usr/bin/python3
"""Telemetry, end to end: after deliveries and failures whose outcome the
test knows, every counter of trace.metrics and trace.prometheus_metrics()
matches what the queue and the capture server say happened; the
exposition passes `promtool check metrics`; a real
prometheus-postgres-exporter, run with monitoring/queries.yaml as a
pg_monitor member, serves the same trust_* series; the alert rules pass
`promtool check rules`; and the counters survive a worker restart."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap, wait_until  # noqa: E402
from exposition import Exporter, parse, value  # noqa: E402
from trace_e2e import REPO, TraceEnv, free_port  # noqa: E402

PROMTOOL = "/usr/bin/promtool"
ADAPTERS = ("myfxbook", "webhook", "file")
REASONS = ("timeout", "connect", "tls", "http_4xx", "http_5xx", "redirect",
           "config", "io", "other")

t = Tap()
# Per-row failure rules: the trackers' breakers (tests 24, 25) are off.
env = TraceEnv.start_or_exit(t, gucs={"trace.breaker_threshold": 0, "trace.max_retries": 1}, name="trace_e2e_metrics")

exporter = None
try:
    with t.case("known deliveries and failures"):
        # myfxbook: 503 then 200 for the first trade; webhook: 200.
        env.sink.set_behaviour("/myfxbook", 503, default=200)
        a = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(a)
        rows = env.wait_status(a, ("myfxbook", "webhook"), "delivered", 15)
        t.is_({k: (r["status"], r["attempts"]) for k, r in rows.items()},
              {"myfxbook": ("delivered", 2), "webhook": ("delivered", 1)},
              "trade A: myfxbook delivered on attempt 2, webhook on attempt 1")
        # webhook: 422 -> abandoned at once.
        env.sink.set_behaviour("/webhook-422", default=422)
        env.point("webhook", "/webhook-422")
        b = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(b)
        rows = env.wait_status(b, "webhook", "abandoned", 15)
        t.is_(rows.get("webhook", {}).get("attempts"), 1, "trade B: 422 abandoned after 1 attempt")
        # webhook: nothing listens -> connect failures until abandoned (2 attempts).
        env.set_gucs({"trace.webhook_endpoint": "http://127.0.0.1:%d/" % free_port()})
        c = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(c)
        rows = env.wait_status(c, "webhook", "abandoned", 15)
        t.is_(rows.get("webhook", {}).get("attempts"), 2,
              "trade C: connection refused twice, abandoned (max_retries = 1)")

    metrics, text, samples = {}, "", {}

    with t.case("counters match the queue and the capture server"):
        metrics = {r[0]: r[1:] for r in env.sql(
            "SELECT adapter, pushed_total, fail_total, pending, post_duration_count, "
            "post_duration_sum FROM trace.metrics")}
        text = env.sql1("SELECT trace.prometheus_metrics()")
        samples = parse(text)
        got_2xx = {ad: 0 for ad in ADAPTERS}
        for r in env.sink.requests():
            _, ad = env.req_trade(r)
            if ad and r.response and 200 <= int(r.response["status"]) < 300:
                got_2xx[ad] += 1
        queue = {r[0]: r[1:] for r in env.sql(
            "SELECT adapter, count(*) FILTER (WHERE status = 'delivered'), sum(attempts) "
            "FROM trace.trace_queue GROUP BY adapter")}
        for ad in ("myfxbook", "webhook"):
            delivered, attempts = queue.get(ad, (0, 0))
            pushed, failed, pending, count, total = metrics[ad]
            t.ok(pushed == delivered == got_2xx[ad],
                 "%s: pushed_total = delivered rows = 2xx received by the sink (%d)" % (ad, pushed),
                 "pushed %s, delivered %s, 2xx %s" % (pushed, delivered, got_2xx[ad]))
            t.ok(count == attempts and failed == attempts - delivered,
                 "%s: post_duration_count = attempts (%d), fail_total = attempts - delivered (%d)"
                 % (ad, count, failed), repr(metrics[ad]))
            t.ok(total > 0 and pending == 0, "%s: a positive duration sum, nothing pending" % ad)
        t.is_(metrics["file"][:4], (0, 0, 0, 0), "file: all zero (no file export configured)")

    with t.case("trace.prometheus_metrics() says the same, by reason"):
        expect_fail = {("myfxbook", "http_5xx"): 1, ("webhook", "http_4xx"): 1,
                       ("webhook", "connect"): 2}
        for ad in ADAPTERS:
            wrong = ["reason=%s: %s, expected %s"
                     % (rs, value(samples, "trust_trace_fail_total", adapter=ad, reason=rs),
                        expect_fail.get((ad, rs), 0))
                     for rs in REASONS
                     if value(samples, "trust_trace_fail_total", adapter=ad, reason=rs)
                     != expect_fail.get((ad, rs), 0)]
            t.ok(not wrong, "%s: trust_trace_fail_total by reason as expected" % ad,
                 "\n".join(wrong))
        for ad in ADAPTERS:
            pushed, failed, pending, count, total = metrics[ad]
            inf = value(samples, "trust_trace_post_duration_seconds_bucket", adapter=ad, le="+Inf")
            t.ok(value(samples, "trust_traces_pushed_total", adapter=ad) == pushed
                 and value(samples, "trust_trace_queue_pending", adapter=ad) == pending
                 and value(samples, "trust_trace_post_duration_seconds_count", adapter=ad) == count
                 and inf == count
                 and abs(value(samples, "trust_trace_post_duration_seconds_sum", adapter=ad) - total) < 1e-3,
                 "%s: pushed, pending, _count, le=+Inf and _sum equal trace.metrics" % ad, text)
        buckets = [value(samples, "trust_trace_post_duration_seconds_bucket", adapter="webhook", le=le)
                   for le in ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
                              "2.5", "5", "10", "+Inf")]
        t.ok(None not in buckets and buckets == sorted(buckets),
             "webhook histogram buckets are cumulative", repr(buckets))
        for fam, typ in (("trust_traces_pushed_total", "counter"),
                         ("trust_trace_fail_total", "counter"),
                         ("trust_trace_queue_pending", "gauge"),
                         ("trust_trace_reconciled_total", "counter"),
                         ("trust_trace_post_duration_seconds", "histogram")):
            t.ok("# TYPE %s %s\n" % (fam, typ) in text and "# HELP %s " % fam in text,
                 "HELP and TYPE %s for %s" % (typ, fam))

    with t.case("promtool check metrics"):
        p = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t.ok(p.returncode == 0, "promtool accepts trace.prometheus_metrics()",
             p.stdout.decode())
        rules_file = REPO / "monitoring" / "alerts.yml"
        nrules = sum(1 for ln in open(rules_file) if ln.strip().startswith("- alert:"))
        p = subprocess.run([PROMTOOL, "check", "rules", str(rules_file)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t.ok(p.returncode == 0 and (b"%d rules found" % nrules) in p.stdout,
             "promtool accepts the %d alert rules of monitoring/alerts.yml" % nrules,
             p.stdout.decode())

    with t.case("pg_monitor reads the metrics; PUBLIC does not"):
        env.sql("CREATE ROLE trace_monitor LOGIN IN ROLE pg_monitor")
        env.sql("CREATE ROLE trace_nobody LOGIN")
        mon = env.cluster.connect("trades", user="trace_monitor")
        cur = mon.cursor()
        cur.execute("SELECT trace.prometheus_metrics()")
        t.ok("trust_traces_pushed_total" in cur.fetchone()[0],
             "a pg_monitor member calls trace.prometheus_metrics()")
        cur.execute("SELECT count(*) FROM trace.metrics")
        t.is_(cur.fetchone()[0], 3, "... and reads trace.metrics")
        mon.close()
        nobody = env.cluster.connect("trades", user="trace_nobody")
        try:
            nobody.cursor().execute("SELECT trace.prometheus_metrics()")
            t.fail("a role without pg_monitor cannot call trace.prometheus_metrics()")
        except Exception as e:
            t.ok("permission denied" in str(e),
                 "a role without pg_monitor cannot call trace.prometheus_metrics()", str(e))
        nobody.close()

    with t.case("prometheus-postgres-exporter serves the trust_* series"):
        exporter = Exporter(env.cluster, "trace_monitor")
        body = exporter.scrape("trust_traces_pushed_total")
        t.ok(body, "the exporter's /metrics has trust_traces_pushed_total", exporter.output)
        if body:
            exp = parse(body)
            t.is_(value(exp, "pg_exporter_last_scrape_error"), 0.0,
                  "the exporter ran every query of monitoring/queries.yaml without error",
                  exporter.output)
            now = parse(env.sql1("SELECT trace.prometheus_metrics()"))
            missing = [k for k in now if k not in exp]
            differ = [k for k in now if k in exp and exp[k] != now[k]
                      and not k[0].endswith("_sum")]
            t.ok(not missing, "every series of trace.prometheus_metrics() is on the exporter",
                 "missing: %r" % missing[:10])
            t.ok(not differ, "... with the same values",
                 "differ: %r" % [(k, exp[k], now[k]) for k in differ[:10]])
            t.ok(value(exp, "trust_trace_backlog_abandoned", adapter="webhook") == 2,
                 "trust_trace_backlog_abandoned{adapter=webhook} = 2 (for the alert rule)")

    with t.case("counters survive a worker restart"):
        before = parse(env.sql1("SELECT trace.prometheus_metrics()"))
        pid0 = env.worker_pid()
        env.sql("SELECT pg_terminate_backend(%s)", (pid0,))
        back = wait_until(lambda: (env.worker_pid() or pid0) != pid0, 15)
        t.ok(back, "the worker came back with a new pid")
        after = parse(env.sql1("SELECT trace.prometheus_metrics()"))
        t.ok(before == after, "every counter is unchanged after the worker restart")
finally:
    if exporter is not None:
        exporter.stop()
    env.close()

sys.exit(t.done())
