"""The Prometheus side of the tests: parsing the text exposition format,
and a prometheus-postgres-exporter serving monitoring/queries.yaml from a
test cluster (05_metrics.t, 24_tracker_health.t)."""

import os
import re
import subprocess
import urllib.request
from pathlib import Path

from cluster import free_port
from tap import wait_until

EXPORTER = "/usr/bin/prometheus-postgres-exporter"
QUERIES = Path(__file__).resolve().parents[2] / "monitoring" / "queries.yaml"
SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def parse(text, drop=("server",)):
    """Exposition text -> {(name, frozenset(labels)): float}.  The exporter
    adds a `server` label to every series; it is left out."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(kv for kv in re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")
                           if kv[0] not in drop)
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples, name, **labels):
    """The sample of that name with exactly those labels, or None."""
    return samples.get((name, frozenset(labels.items())))


class Exporter:
    """prometheus-postgres-exporter on a free loopback port, connected to a
    cluster's trade database as `user`, serving monitoring/queries.yaml."""

    def __init__(self, cluster, user, dbname="trades"):
        self.port = free_port()
        dsn = "host=%s port=%d user=%s dbname=%s sslmode=disable" % (
            cluster.sockdir, cluster.port, user, dbname)
        self.proc = subprocess.Popen(
            [EXPORTER, "--web.listen-address=127.0.0.1:%d" % self.port,
             "--extend.query-path=%s" % QUERIES,
             "--disable-default-metrics", "--disable-settings-metrics"],
            env=dict(os.environ, DATA_SOURCE_NAME=dsn),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def scrape(self, family, timeout=20):
        """/metrics once it serves `family`; None at the deadline."""
        def once():
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.port,
                                            timeout=5) as r:
                    body = r.read().decode()
                return body if family in body else None
            except OSError:
                return None
        return wait_until(once, timeout)

    def output(self):
        """What the exporter printed, if it has exited (for diagnostics)."""
        if self.proc.poll() is None:
            return "(exporter still running)"
        return self.proc.stdout.read().decode()[-2000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
