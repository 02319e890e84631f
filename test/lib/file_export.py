"""Helpers for the end-to-end tests of the file adapter (local export).

An export directory owned by the server's OS user, the JSON Lines files
in it read back line by line, and the failure counters by reason from
trace.prometheus_metrics().
"""

import datetime
import json
import os
import pwd
import re
import shutil
import tempfile

from cluster import OS_USER
from trace_e2e import as_json_literals

FILE_RX = re.compile(r"^traces-(\d{4})-(\d{2})-(\d{2})\.jsonl$")


def make_export_dir(prefix="trace_e2e_export_"):
    """A fresh directory under /tmp that the server's OS user owns (0750)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    chown_to_server(d)
    os.chmod(d, 0o750)
    return d


def chown_to_server(path):
    if os.geteuid() == 0:
        pw = pwd.getpwnam(OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def remove_dir(path):
    if path and os.path.isdir(path):
        os.chmod(path, 0o755)
        shutil.rmtree(path, ignore_errors=True)


def file_name(utc_date):
    return "traces-%04d-%02d-%02d.jsonl" % (utc_date.year, utc_date.month, utc_date.day)


def utc_date(ts):
    """UTC calendar day of an aware datetime (or of a unix time)."""
    if isinstance(ts, (int, float)):
        return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).date()
    return ts.astimezone(datetime.timezone.utc).date()


class Line:
    """One line of an export file."""

    def __init__(self, fname, number, raw):
        self.file = fname
        self.number = number
        self.raw = raw              # bytes, without the newline
        self.obj = None
        self.error = None
        self.duplicate_keys = []
        try:
            self.obj = json.loads(raw.decode("utf-8"), parse_float=str, parse_int=str,
                                  parse_constant=str, object_pairs_hook=self._pairs)
        except (ValueError, UnicodeDecodeError) as e:
            self.error = str(e)

    def _pairs(self, pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                self.duplicate_keys.append(k)
            seen[k] = v
        return seen

    @property
    def trade_id(self):
        if isinstance(self.obj, dict) and "trade_id" in self.obj:
            try:
                return int(self.obj["trade_id"])
            except (TypeError, ValueError):
                return None
        return None

    def __repr__(self):
        return "%s:%d %r" % (self.file, self.number, self.raw[:200])


def read_export(d):
    """{file name: (raw bytes, [Line])} for every file in directory d."""
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            continue
        with open(p, "rb") as f:
            data = f.read()
        parts = data.split(b"\n")
        if parts and parts[-1] == b"":
            parts.pop()
        out[name] = (data, [Line(name, i + 1, raw) for i, raw in enumerate(parts)])
    return out


def lines_by_trade(export):
    """{trade_id: [Line, ...]} over every file of read_export()'s result."""
    out = {}
    for _, (_, lines) in export.items():
        for ln in lines:
            out.setdefault(ln.trade_id, []).append(ln)
    return out


def fail_count(env, adapter, reason):
    """trust_trace_fail_total{adapter,reason} from trace.prometheus_metrics()."""
    text = env.sql1("SELECT trace.prometheus_metrics()")
    rx = re.compile(r'^trust_trace_fail_total\{([^}]*)\} (\S+)$', re.M)
    for m in rx.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("adapter") == adapter and labels.get("reason") == reason:
            return float(m.group(2))
    return None


def parse_literals(text):
    return as_json_literals(text)


def close_many(env, tids):
    """Close several trades in one transaction, so that their rows become
    due together (and one close never races another's enqueue)."""
    env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912 + trade_id / 10000.0,
                      closed_at = now(), pnl = 10.25 + trade_id, fees = 1.25
                WHERE trade_id = ANY(%s)""", (list(tids),))
