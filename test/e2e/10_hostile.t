#!/usr/bin/python3
"""Hostile input, end to end (issue 6).  Proves that:

1. hostile trades (a NULL signal, a user deleted after the close was
   queued, a user that never existed, the largest numerics the fixture's
   types hold, NaN, Infinity and 1e300-scale numbers in an allowlisted
   unconstrained column, infinite timestamps, and quotes, backslashes,
   line breaks, control characters, emoji, RTL and combining characters in
   every free-text allowlisted column) are delivered as strict JSON that is
   byte for byte what PostgreSQL's row_to_json renders, or not queued at
   all, and never crash the worker;
2. hostile trackers (a 1 GiB answer, a reset mid-body, silence, garbage
   that is not HTTP, header lines forever, an answer dripped a byte at a
   time, an S3 error code of hostile bytes, 301/302/307/308 redirects to
   http, file, gopher and dict URLs, TLS with an unknown CA, the wrong
   host name or a certificate name holding an escape) each end as a
   recorded failure with the right reason in trace.failures and
   trace.prometheus_metrics(), the redirect target and the other schemes
   never get a connection, a file:// target is never opened, the worker
   keeps its pid and its memory (VmRSS) grows by less than 20 MB; trusting
   the test CA with trace.ca_file (SIGHUP) makes the same TLS tracker
   deliver, and verification stays on for everything else;
3. URLs of other schemes (file://, gopher://, dict://) are refused for the
   three URL parameters whether set by ALTER SYSTEM or written into the
   configuration file, and with no usable URL the row is a `config`
   failure: no request leaves.

Loopback only; the hostile trackers are test/lib/hostile_server.py."""

import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
import hostile_server as hs  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DEFAULT_PAYLOAD_COLUMNS, TraceEnv  # noqa: E402

RSS_LIMIT_KB = 20 * 1024
MAX_RETRIES = 1             # every failure is seen twice, then abandoned

t = Tap()
# Per-row failure rules: the trackers' breakers (tests 24, 25) are off.
env = TraceEnv.start_or_exit(t, gucs={"trace.breaker_threshold": 0, "trace.max_retries": MAX_RETRIES,
                                      "trace.http_timeout": "1s"},
                             name="trace_e2e_hostile")
tmp = tempfile.mkdtemp(prefix="trace_hostile_")
os.chmod(tmp, 0o755)
servers = []


def serve(behaviour, **kw):
    s = hs.HostileServer(behaviour, **kw).start()
    servers.append(s)
    return s


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def fail_counts(adapter="webhook"):
    text = env.sql1("SELECT trace.prometheus_metrics()")
    return {m.group(1): int(m.group(2)) for m in re.finditer(
        r'^trust_trace_fail_total\{adapter="%s",reason="(\w+)"\} (\d+)$' % adapter,
        text, re.M)}


def webhook_trade():
    """An opted-in user's trade on signal 11 ({webhook}), closed."""
    tid = env.new_trade(user_id=1, signal_id=11)
    env.close_trade(tid)
    return tid


class FileWatch:
    """inotify on one file: did anyone open or read it?"""
    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(
                self.fd, path.encode(), self.IN_ACCESS | self.IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify on %s" % path)

    def events(self):
        n = 0
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return n
            off = 0
            while off + 16 <= len(data):
                n += 1
                off += 16 + int.from_bytes(data[off + 12:off + 16], "little")


def hostile_tracker(label, server, reason, http_status=None, error_re=None,
                    path="/hook", final="abandoned"):
    """Point the webhook at `server`, close a trade, wait for the row to
    end `final`; check the reason (metrics delta; `reason` may be a tuple
    of acceptable ones), trace.failures, the worker's pid and its RSS.
    Returns (trade id, queue row, metrics delta)."""
    env.set_gucs({"trace.webhook_endpoint": server.url(path)})
    pid = env.worker_pid()
    rss0 = rss_kb(pid)
    before = fail_counts()
    t0 = time.time()
    tid = webhook_trade()
    rows = env.wait_status(tid, "webhook", [final, "delivered"] if final != "delivered"
                           else ["delivered", "abandoned"], 30)
    r = rows.get("webhook", {})
    took = time.time() - t0
    want_attempts = 1 if final == "delivered" else MAX_RETRIES + 1
    t.ok(r.get("status") == final and r.get("attempts") == want_attempts,
         "%s: the row ends %s after %d attempt(s)" % (label, final, want_attempts), repr(r))
    after = fail_counts()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v}
    if final == "delivered":
        t.is_(delta, {}, "%s: no failure counted" % label)
    else:
        reasons = reason if isinstance(reason, tuple) else (reason,)
        t.ok(len(delta) == 1 and list(delta.values()) == [want_attempts]
             and list(delta)[0] in reasons,
             "%s: trust_trace_fail_total counts %d failures with reason %s"
             % (label, want_attempts, " or ".join(reasons)), "delta: %r" % delta)
        f = env.sqld("SELECT * FROM trace.failures WHERE trade_id = %s", (tid,))
        err = f[0]["last_error"] if f else None
        t.ok(len(f) == 1 and f[0]["status"] == final
             and f[0]["last_http_status"] == http_status
             and err and (error_re is None or re.search(error_re, err, re.I)),
             "%s: trace.failures shows it, last_http_status %s, last_error %s"
             % (label, http_status, error_re or "set"), repr(f))
    t.is_(env.worker_pid(), pid, "%s: the same worker process (pid %s)" % (label, pid))
    rss1 = rss_kb(pid)
    t.ok(rss0 and rss1 and rss1 - rss0 < RSS_LIMIT_KB,
         "%s: worker VmRSS %d kB -> %d kB (grew %+d kB, limit %d kB)"
         % (label, rss0 or 0, rss1 or 0, (rss1 or 0) - (rss0 or 0), RSS_LIMIT_KB))
    t.ok(not server.errors, "%s: the tracker itself ran without errors" % label,
         repr(server.errors))
    t.diag("%s: %.1f s, %d connection(s), %d request(s), %d bytes sent by the tracker"
           % (label, took, server.connections, len(server.requests), server.bytes_sent))
    return tid, r, delta


# ---------------------------------------------------------------------------
# 1. Hostile trades
# ---------------------------------------------------------------------------
# The fixture's free text in the allowlist is `instrument` (`side` is CHECKed
# to buy/sell); its numerics are numeric(18,s), which refuse Infinity and
# anything past 18 digits.  An operator may allowlist more columns, so the
# trades table gets three here: free text, unconstrained numeric, float8.
EXTRA_COLUMNS = ["note", "big", "ratio"]
PAYLOAD = DEFAULT_PAYLOAD_COLUMNS + EXTRA_COLUMNS

TEXTS = [
    ("double quotes", 'EUR"USD" ""'),
    ("JSON injection", '","trade_id":999999,"user_id":1,"email":"x@y","z":"'),
    ("backslashes", 'C:\\path\\"x\\u0000\\n\\\\'),
    ("newlines, CR, tabs", "line1\nline2\r\nline3\tend\r"),
    ("every C0 control character and DEL", "".join(chr(c) for c in range(1, 32)) + "\x7f"),
    ("emoji (4-byte UTF-8, ZWJ sequence)", "\U0001f4c8\U0001f680 EUR/USD \U0001f468\u200d\U0001f469\u200d\U0001f467"),
    ("RTL override, Hebrew, Arabic", "\u202eDSUREU\u202c \u05e2\u05d1\u05e8\u05d9\u05ea \u0627\u0644\u0639\u0631\u0628\u064a\u0629"),
    ("combining characters", "e\u0301 a\u0308 Z\u0351\u0337\u0334\u0300\u0301"),
    ("BOM, U+2028/U+2029, NBSP, C1 control", "\ufeffX\u2028Y\u2029Z\u00a0\u0085"),
    ("highest code points", "\U0010ffff\U000e0001\uffff"),
    ("HTML and script", "</script><script>alert(1)</script><!--"),
    ("64 KiB mixed", ("\"\\\n\u00e9\U0001f600" * 8192)[:65536]),
]

NUMERICS = [
    # label, SET clause values (text, cast by PostgreSQL)
    ("largest values numeric(18,s) holds",
     {"volume": "99999999999999.9999", "entry_price": "999999999999.999999",
      "exit_price": "-999999999999.999999", "pnl": "-9999999999999999.99",
      "fees": "9999999999999999.99"}),
    ("numeric NaN in the fixture's columns",
     {"exit_price": "NaN", "pnl": "NaN", "fees": "NaN"}),
    ("tiny values and negative zero",
     {"volume": "0.0001", "entry_price": "0.000001", "pnl": "-0.00", "fees": "0"}),
    ("1e300 in an unconstrained numeric", {"big": "1e300"}),
    ("2001 significant digits", {"big": "-" + "9" * 1000 + "." + "1" * 1000}),
    ("numeric Infinity", {"big": "Infinity"}),
    ("numeric -Infinity", {"big": "-Infinity"}),
    ("numeric NaN", {"big": "NaN"}),
    ("float8 Infinity", {"ratio": "Infinity"}),
    ("float8 -Infinity", {"ratio": "-Infinity"}),
    ("float8 NaN", {"ratio": "NaN"}),
    ("float8 extremes", {"ratio": "1.7976931348623157e308", "big": "4.9e-324"}),
    ("infinite timestamps", {"opened_at": "-infinity", "closed_at": "infinity"}),
    ("far-future timestamp", {"closed_at": "294276-12-31 23:59:59+00"}),
]
TYPES = {"volume": "numeric", "entry_price": "numeric", "exit_price": "numeric",
         "pnl": "numeric", "fees": "numeric", "big": "numeric", "ratio": "float8",
         "opened_at": "timestamptz", "closed_at": "timestamptz"}


def no_constants(name):
    raise ValueError("bare %s is not JSON" % name)


def strict_json(text):
    """json.loads as strictly as JSON allows: control characters in
    strings refused (strict=True), no NaN/Infinity tokens; numbers kept as
    their text (no float rounding, no int digit limit)."""
    return json.loads(text, strict=True, parse_constant=no_constants,
                      parse_float=str, parse_int=str)


def pg_rendering(tid):
    cols = ", ".join("t.%s" % env._ident(c) for c in PAYLOAD)
    return env.sql1("SELECT row_to_json(r)::text FROM (SELECT %s FROM trades t "
                    "WHERE trade_id = %%s) r" % cols, (tid,))


def close_hostile(tid, values):
    sets = ["status = 'CLOSED'"]
    args = []
    for col, val in values.items():
        sets.append("%s = %%s::%s" % (env._ident(col), TYPES.get(col, "text")))
        args.append(val)
    if "closed_at" not in values:
        sets.append("closed_at = now()")
    env.sql("UPDATE trades SET %s WHERE trade_id = %%s" % ", ".join(sets), args + [tid])


def check_delivered_body(label, tid, texts=None):
    """The one request of a delivered trade: strict JSON, the allowlist
    exactly, byte for byte row_to_json's rendering, text values intact."""
    reqs = env.reqs_for(tid, "webhook")
    if not t.is_(len(reqs), 1, "%s: exactly one request" % label):
        return None
    raw = reqs[0].body
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        t.fail("%s: body is UTF-8" % label, str(e))
        return None
    try:
        body = strict_json(text)
    except ValueError as e:
        t.fail("%s: body is strict JSON" % label, "%s\n%r" % (e, raw[:300]))
        return None
    t.ok(isinstance(body, dict) and list(body) == PAYLOAD,
         "%s: strict JSON whose keys are the allowlist, in order" % label,
         repr(list(body) if isinstance(body, dict) else body))
    want = pg_rendering(tid)
    t.ok(text == want, "%s: body is byte for byte PostgreSQL's row_to_json" % label,
         lambda: "body: %r\n  pg: %r" % (text[:400], (want or "")[:400]))
    for col, val in (texts or {}).items():
        t.ok(body.get(col) == val, "%s: %s round-trips exactly" % (label, col),
             lambda: "got %r\nwant %r" % (body.get(col, "")[:200], val[:200]))
    return body


try:
    pid_start = env.worker_pid()

    with t.case("hostile trades: set-up"):
        env.sql("ALTER TABLE trades ADD COLUMN note text, ADD COLUMN big numeric, "
                "ADD COLUMN ratio float8")
        env.set_gucs({"trace.payload_columns": ",".join(PAYLOAD)})
        env.payload_columns = list(PAYLOAD)
        t.is_(env.sql1("SHOW trace.payload_columns"), ",".join(PAYLOAD),
              "the allowlist names the extra columns")
        for col, expr, why in (("pnl", "'1e300'", "numeric field overflow"),
                               ("pnl", "'Infinity'", "numeric field overflow"),
                               ("instrument", "'a' || chr(0)", "null character not permitted")):
            err = None
            try:
                env.sql("UPDATE trades SET %s = %s WHERE trade_id = 1" % (col, expr))
            except psycopg2.Error as e:
                err = e
            t.ok(err is not None and why in str(err),
                 "the fixture refuses %s = %s (%s): nothing to deliver" % (col, expr, why),
                 str(err))

    with t.case("hostile text in every free-text column of the allowlist"):
        cases = []
        for label, s in TEXTS:
            tid = env.new_trade(user_id=1, signal_id=11)
            close_hostile(tid, {"instrument": s, "note": s[::-1]})
            cases.append((label, tid, {"instrument": s, "note": s[::-1]}))
        tids = [c[1] for c in cases]
        ok = wait_until(lambda: env.sql1(
            "SELECT count(*) FROM trace.trace_queue WHERE trade_id = ANY(%s) "
            "AND status IN ('delivered', 'abandoned')", (tids,)) == len(tids), 30)
        t.ok(ok, "all %d hostile-text trades reached an end state" % len(tids))
        for label, tid, texts in cases:
            r = env.rows(tid).get("webhook", {})
            if t.is_(r.get("status"), "delivered", "%s: delivered" % label, repr(r)):
                check_delivered_body(label, tid, texts)

    with t.case("hostile numbers and timestamps"):
        cases = []
        for label, values in NUMERICS:
            tid = env.new_trade(user_id=1, signal_id=11)
            close_hostile(tid, values)
            cases.append((label, tid, values))
        tids = [c[1] for c in cases]
        wait_until(lambda: env.sql1(
            "SELECT count(*) FROM trace.trace_queue WHERE trade_id = ANY(%s) "
            "AND status IN ('delivered', 'abandoned')", (tids,)) == len(tids), 30)
        for label, tid, values in cases:
            r = env.rows(tid).get("webhook", {})
            if not t.is_(r.get("status"), "delivered", "%s: delivered" % label, repr(r)):
                continue
            body = check_delivered_body(label, tid)
            raw = env.reqs_for(tid, "webhook")[0].body.decode("utf-8")
            specials = [c for c, v in values.items()
                        if v.lstrip("-").lower() in ("nan", "infinity")]
            for c in specials:
                t.ok(re.search(r'"%s":"-?(NaN|Infinity|infinity)"' % c, raw),
                     "%s: %s is a JSON string, not a bare token" % (label, c),
                     raw[:300])
        big = env.reqs_for(cases[4][1], "webhook")
        t.ok(big and len(big[0].body) > 2000,
             "the 2001-digit numeric arrived with all its digits (%d bytes)"
             % (len(big[0].body) if big else 0))

    with t.case("NULL signal"):
        tid = env.new_trade(user_id=1, signal_id=None)
        env.close_trade(tid)
        t.is_(env.rows(tid), {}, "a trade without a signal is not queued by the trigger")
        t.is_(env.sql1("SELECT trace.enqueue(%s, ARRAY['webhook'])", (tid,)), 1,
              "trace.enqueue(id, ARRAY['webhook']) queues it by hand")
        rows = env.wait_status(tid, "webhook", ["delivered", "abandoned"], 15)
        if t.is_(rows.get("webhook", {}).get("status"), "delivered",
                 "the signal-less trade is delivered"):
            body = check_delivered_body("NULL signal", tid)
            t.ok(body is not None and body.get("signal_id") is None,
                 "signal_id is JSON null", repr(body and body.get("signal_id")))

    with t.case("a user deleted after the close was queued (cancelled); a user that never existed"):
        env.sql("INSERT INTO users VALUES (77, 'gone@example.com', 'Gone User', 'CL-0077', true)")
        tid = env.new_trade(user_id=77, signal_id=11)
        # The FK (trades.user_id REFERENCES users) forbids the delete; an
        # operator's erasure may bypass it, as session_replication_role =
        # replica does (which also disables ordinary triggers, so the close
        # happens first, in the same transaction).
        tx = env.cluster.connect("trades", autocommit=False)
        cur = tx.cursor()
        cur.execute("UPDATE trades SET status = 'CLOSED', closed_at = now(), pnl = 1, "
                    "fees = 0.5, exit_price = 1.1 WHERE trade_id = %s", (tid,))
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute("DELETE FROM users WHERE user_id = 77")
        tx.commit()
        tx.close()
        t.is_(env.sql1("SELECT count(*) FROM users WHERE user_id = 77"), 0,
              "the user row is gone; its trade still references it")
        rows = env.wait_status(tid, "webhook", ["delivered", "abandoned", "cancelled"], 15)
        t.is_((rows.get("webhook", {}).get("status"), rows.get("webhook", {}).get("last_error")),
              ("cancelled", "user no longer exists"),
              "the trade of a deleted user is cancelled at send time: no consent without a user")
        t.is_(env.reqs_for(tid), [], "... and nothing of it was sent")

        tx = env.cluster.connect("trades", autocommit=False)
        cur = tx.cursor()
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute("""INSERT INTO trades (trade_id, user_id, signal_id, instrument, side,
                                           volume, entry_price, opened_at)
                       VALUES (9901, 4242, 11, 'EURUSD', 'buy', 1, 1.1, now())""")
        tx.commit()
        tx.close()
        env.close_trade(9901)
        t.is_(env.rows(9901), {}, "a trade whose user never existed is not queued by the trigger")
        t.is_(env.sql1("SELECT trace.enqueue(9901, ARRAY['webhook'])"), 0,
              "... nor by trace.enqueue (no opt-in without a user)")

    with t.case("hostile trades: the worker survived"):
        t.is_(env.worker_pid(), pid_start, "the same worker pid as before the hostile trades")
        env.check_no_pii("hostile trades")

    # -----------------------------------------------------------------------
    # 3a. Other schemes in the configuration file (before any ALTER SYSTEM
    #     of the URLs, which would override the file)
    # -----------------------------------------------------------------------
    with t.case("file://, gopher://, dict:// are never used"):
        canary = os.path.join(tmp, "canary")
        with open(canary, "w") as f:
            f.write("canary-must-not-be-read\n")
        os.chmod(canary, 0o644)
        watch = FileWatch(canary)
        with open(canary) as f:
            f.read()
        t.ok(watch.events() > 0, "the inotify watch on the canary file sees an open")
        listener = serve(hs.silent())       # gopher and dict would connect here
        urls = {"file": "file://" + canary,
                "gopher": "gopher://127.0.0.1:%d/1hostile" % listener.port,
                "dict": "dict://127.0.0.1:%d/d:hostile" % listener.port}
        for scheme, url in sorted(urls.items()):
            for guc in ("trace.webhook_endpoint", "trace.myfxbook_webhook_url",
                        "trace.s3_endpoint"):
                err = None
                try:
                    env.sql("ALTER SYSTEM SET %s = %%s" % guc, (url,))
                except psycopg2.Error as e:
                    err = e
                t.ok(err is not None and guc in str(err) and "http" in str(err),
                     "ALTER SYSTEM SET %s = '%s://...' is refused, naming it" % (guc, scheme),
                     str(err))

        conf = os.path.join(env.cluster.datadir, "postgresql.conf")
        original = open(conf).read()
        before = env.sql1("SHOW trace.webhook_endpoint")
        sink_before = len(env.sink.requests())
        for scheme, url in sorted(urls.items()):
            since = env.cluster.log_size()
            with open(conf, "a") as f:
                f.write("\ntrace.webhook_endpoint = '%s'\n" % url)
            env.cluster.reload()
            m = env.cluster.wait_for_log(
                r'invalid value for parameter "trace\.webhook_endpoint": "%s://' % scheme,
                since, 10)
            t.ok(m, "%s:// in postgresql.conf: the reload logs the refusal, naming the "
                 "parameter" % scheme)
            t.is_(env.sql1("SHOW trace.webhook_endpoint"), before,
                  "%s:// in postgresql.conf: the endpoint keeps its last good value" % scheme)
            tid = webhook_trade()
            rows = env.wait_status(tid, "webhook", ["delivered", "abandoned"], 15)
            t.is_(rows.get("webhook", {}).get("status"), "delivered",
                  "%s:// in postgresql.conf: the worker kept delivering to the last good "
                  "URL" % scheme)
            with open(conf, "w") as f:
                f.write(original)
        env.cluster.reload()
        t.is_(len(env.sink.requests()) - sink_before, 3, "three deliveries reached the sink")

        # No usable URL at all: a config failure, nothing leaves.
        pid = env.worker_pid()
        env.set_gucs({"trace.webhook_endpoint": ""})
        before_fail = fail_counts()
        sink_before = len(env.sink.requests())
        tid = webhook_trade()
        rows = env.wait_status(tid, "webhook", ["abandoned", "delivered"], 15)
        r = rows.get("webhook", {})
        t.ok(r.get("status") == "abandoned"
             and r.get("last_error") == "trace.webhook_endpoint is not set"
             and r.get("last_http_status") is None,
             "no endpoint: a recorded failure naming trace.webhook_endpoint", repr(r))
        after_fail = fail_counts()
        t.is_(after_fail.get("config", 0) - before_fail.get("config", 0), MAX_RETRIES + 1,
              "... counted with reason config")
        t.is_(len(env.sink.requests()), sink_before, "... and no request left")
        t.is_(listener.connections, 0, "the gopher/dict listener never got a connection")
        t.is_(watch.events(), 0, "the file:// canary was never opened or read")
        leaked = [s for s in ("canary-must-not-be-read", "root:x:0:0")
                  if s in env.cluster.log_text()
                  or any(s.encode() in q.raw() for q in env.sink.requests())
                  or env.sql1("SELECT count(*) FROM trace.trace_queue "
                              "WHERE last_error LIKE %s", ("%" + s + "%",))]
        t.ok(not leaked, "no file content in the log, a request or last_error", repr(leaked))
        t.is_(env.worker_pid(), pid, "the same worker process")

    # -----------------------------------------------------------------------
    # 2. Hostile trackers
    # -----------------------------------------------------------------------
    rss_start = rss_kb(env.worker_pid())

    with t.case("a tracker that answers 500 with a 1 GiB body"):
        s = serve(hs.huge_body(500, 1 << 30))
        hostile_tracker("1 GiB body with 500", s, "http_5xx", 500, r"HTTP 500")
        t.ok(s.bytes_sent < 64 * 1024 * 1024,
             "the worker hung up after %.1f MiB of the 1024 MiB (cap 1 MiB, plus "
             "socket buffers)" % (s.bytes_sent / 1048576.0))

    with t.case("a tracker that answers 200 with a 1 GiB body"):
        s = serve(hs.huge_body(200, 1 << 30))
        hostile_tracker("1 GiB body with 200", s, None, final="delivered")
        t.ok(s.bytes_sent < 64 * 1024 * 1024,
             "a 200 with a huge body is judged by its status line; the worker hung up "
             "after %.1f MiB" % (s.bytes_sent / 1048576.0))

    with t.case("a tracker that resets the connection mid-body"):
        s = serve(hs.reset_mid_body(200))
        hostile_tracker("reset mid-body", s, "other", None, r"reset")
        t.is_(s.resets, MAX_RETRIES + 1, "the tracker sent an RST after part of the body, "
              "each time (a 200 cut short is not a delivery)")

    with t.case("a tracker that never answers"):
        s = serve(hs.silent())
        hostile_tracker("never answers", s, "timeout", None, r"^timeout: ")
        t.is_(len(s.requests), MAX_RETRIES + 1, "it received the request each time")

    with t.case("a tracker that answers garbage"):
        s = serve(hs.garbage())
        _, _, delta = hostile_tracker("garbage", s, "other", None, r"HTTP/0\.9")
        t.is_(delta, {"other": MAX_RETRIES + 1},
              "garbage: the reason is other, not config (the operator's configuration is fine)")

    with t.case("a tracker that sends header lines forever"):
        s = serve(hs.endless_headers())
        hostile_tracker("endless headers", s, "other", None, r"header")
        t.ok(s.bytes_sent < 64 * 1024 * 1024,
             "the worker hung up after %.1f MiB of headers" % (s.bytes_sent / 1048576.0))

    with t.case("a tracker that drips its answer a byte at a time"):
        s = serve(hs.drip())
        hostile_tracker("drip", s, "timeout", None, r"^timeout: ")

    with t.case("redirects are not followed, to any scheme"):
        target = serve(hs.ok())
        canary = os.path.join(tmp, "canary")
        watch = FileWatch(canary)
        listener = serve(hs.silent())
        for status, location in ((301, target.url("/moved")),
                                 (302, "file://" + canary),
                                 (307, "gopher://127.0.0.1:%d/1x" % listener.port),
                                 (308, "dict://127.0.0.1:%d/d:x" % listener.port)):
            s = serve(hs.redirect(status, location))
            hostile_tracker("%d to %s" % (status, location.split(":")[0]), s, "redirect",
                            status, r"HTTP %d \(redirects are not followed\)" % status)
        t.is_(target.connections, 0, "the http redirect target never got a connection")
        t.is_(listener.connections, 0, "the gopher/dict targets never got a connection")
        t.is_(watch.events(), 0, "the file:// target was never opened")

    with t.case("TLS: unknown CA, then trusted by trace.ca_file, then the wrong host"):
        certs = os.path.join(tmp, "tls")
        os.mkdir(certs)
        hs.make_tls_material(certs)
        good = serve(hs.ok(), ssl_context=hs.server_context(certs, "good"))
        hostile_tracker("unknown CA", good, "tls", None, r"^tls: .*certificate",
                               path="/tls")
        t.ok(good.tls_failures >= MAX_RETRIES + 1 and not good.requests,
             "the handshake was refused each time; no request was sent",
             "tls failures %d, requests %d" % (good.tls_failures, len(good.requests)))
        t.is_(env.sql1("SHOW trace.ca_file"), "", "trace.ca_file was unset")

        env.set_gucs({"trace.ca_file": os.path.join(certs, "ca.pem"),
                      "trace.webhook_endpoint": good.url("/tls", host="localhost")})
        tid = webhook_trade()
        rows = env.wait_status(tid, "webhook", ["delivered", "abandoned"], 15)
        t.is_(rows.get("webhook", {}).get("status"), "delivered",
              "with trace.ca_file = the test CA (SIGHUP), https://localhost delivers",
              repr(rows))
        got = [q for q in good.requests if q.header("Idempotency-Key") == "%d-webhook" % tid]
        t.ok(len(got) == 1 and strict_json(got[0].body.decode()).get("trade_id") == str(tid),
             "the TLS tracker received that trade once", repr([q.path for q in good.requests]))

        wrong = serve(hs.ok(), ssl_context=hs.server_context(certs, "wronghost"))
        hostile_tracker("wrong host name, CA trusted", wrong, "tls", None,
                        r"^tls: .*(subject name|host ?name)")
        t.ok(wrong.connections >= MAX_RETRIES + 1 and not wrong.requests,
             "the wrong-host certificate was refused after the handshake each time; "
             "no request was sent",
             "connections %d, requests %d" % (wrong.connections, len(wrong.requests)))

        badcn = serve(hs.ok(), ssl_context=hs.server_context(certs, "badcn"))
        _, r, _ = hostile_tracker("certificate name with an escape sequence", badcn, "tls",
                                  None, r"^tls: .*does not match target host name")
        t.ok(not re.search(r"[\x00-\x1f\x7f]", r.get("last_error") or ""),
             "the peer's certificate name reaches last_error without its control characters",
             repr(r.get("last_error")))

        rogue = serve(hs.ok(), ssl_context=hs.server_context(certs, "rogue"))
        hostile_tracker("unknown CA, another CA trusted", rogue, "tls", None,
                        r"^tls: .*certificate")
        t.ok(rogue.tls_failures >= MAX_RETRIES + 1 and not rogue.requests,
             "trusting one CA does not turn verification off for others")
        # A CA bundle removed after it was set: recorded, naming the file.
        gone = os.path.join(certs, "gone-ca.pem")
        shutil.copy(os.path.join(certs, "ca.pem"), gone)
        os.chmod(gone, 0o644)
        env.set_gucs({"trace.ca_file": gone})
        os.unlink(gone)
        n_before = len(good.requests)
        _, r, _ = hostile_tracker("trace.ca_file removed after it was set", good,
                                  "tls", None, r"gone-ca\.pem", path="/tls")
        t.diag("last_error: %s" % r.get("last_error"))
        t.is_(len(good.requests), n_before,
              "no request reached the tracker without the CA bundle")
        env.set_gucs({"trace.ca_file": ""})

    with t.case("an S3 tracker whose error code is hostile bytes"):
        # file.c keeps S3's <Code> in last_error: it must stay valid text.
        s = serve(hs.ok(403, b"<Error><Code>\xff\xfe\x01Evil\x1b[31m\"'\\\xc3</Code></Error>"))
        env.set_gucs({"trace.enabled_adapters": "webhook,file",
                      "trace.file_export_type": "s3", "trace.s3_endpoint": s.url(""),
                      "trace.s3_bucket": "hostile", "trace.s3_access_key_id": "AKIAHOSTILE",
                      "trace.s3_secret_access_key": "hostile-secret-key"})
        env.add_secret("AKIAHOSTILE")
        env.add_secret("hostile-secret-key")
        pid = env.worker_pid()
        tid = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(tid)
        err = None
        try:
            rows = env.wait_status(tid, "file", "abandoned", 15)
            r = rows.get("file", {})
        except UnicodeDecodeError as e:
            r, err = {}, e
            env.reconnect()
        t.ok(err is None and r.get("status") == "abandoned" and r.get("last_http_status") == 403,
             "the 403 is recorded, and last_error reads back as valid UTF-8", repr(err or r))
        le = r.get("last_error") or ""
        t.ok(le.startswith("HTTP 403 (") and "Evil" in le
             and not re.search(r"[\x00-\x1f\x7f-\uffff]", le),
             "last_error keeps the code's printable ASCII, and nothing else", repr(le))
        t.ok(len(s.requests) == MAX_RETRIES + 1, "the S3 tracker got the PUT each time")
        t.is_(env.worker_pid(), pid, "the same worker process")
        env.set_gucs({"trace.enabled_adapters": "myfxbook,webhook",
                      "trace.file_export_type": "local"})

    with t.case("hostile trackers: the worker survived"):
        t.is_(env.worker_pid(), pid_start, "the same worker pid since the start of the file")
        rss_end = rss_kb(pid_start)
        t.ok(rss_start and rss_end and rss_end - rss_start < RSS_LIMIT_KB,
             "worker VmRSS over all the hostile trackers: %d kB -> %d kB (grew %+d kB)"
             % (rss_start or 0, rss_end or 0, (rss_end or 0) - (rss_start or 0)))
        env.check_log_clean("hostile")
finally:
    for s in servers:
        s.stop()
    env.close()
    shutil.rmtree(tmp, ignore_errors=True)

sys.exit(t.done())
