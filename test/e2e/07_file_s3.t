#!/usr/bin/python3
"""The file adapter, S3 export, end to end.  A real worker PUTs closed
trades to a real S3-compatible server (s3rver, from npm, on 127.0.0.1),
which returns them on GET at <prefix>YYYY/MM/DD/<trade_id>.json, dated by
the UTC day the row was queued; a re-send overwrites the same key.
s3rver does not check signatures, so the signed PUT is also captured by
our own sink and its AWS Signature V4 recomputed independently with
botocore (a prefix with a space and a plus exercises the URI encoding),
including credentials from trace.secrets_file.  S3 refusals (403
AccessDenied, 5xx, 404 NoSuchBucket) and bad configuration are recorded
failures; the credentials appear in no log line, view or SHOW."""

import calendar
import hashlib
import os
import re
import secrets as pysecrets
import sys
import tempfile
import time
import traceback
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from capture_server import CaptureServer  # noqa: E402
from file_export import (chown_to_server, close_many, fail_count,  # noqa: E402
                         remove_dir, utc_date)
from s3 import (S3RVER_KEY, S3RVER_SECRET, S3rver, encode_key,  # noqa: E402
                object_key, parse_authorization, verify_sigv4)
from tap import Tap  # noqa: E402
from trace_e2e import TraceEnv, as_json_literals, ext_version  # noqa: E402

F = "file"
BUCKET = "trace-e2e"
CAPTURE_BUCKET = "capture-bucket"
PREFIX = "traces x+y/"          # a space and a plus: both must be %-encoded
REGION = "eu-west-3"


def s3_error(code, message):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
            '<Message>%s</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>'
            % (code, message))


def key_of(env, tid, prefix=PREFIX):
    """The object key the row of a trade must use: dated by the UTC day of
    its created_at."""
    row = env.rows(tid).get(F)
    return object_key(prefix, utc_date(row["created_at"]), tid) if row else None


def keys_of_trade(s3, tid):
    return sorted(k for k in s3.keys(PREFIX) if k.endswith("/%d.json" % tid))


t = Tap()
s3 = None
env = None
tmpdirs = []
try:
    s3 = S3rver(BUCKET).start()
    t.is_(s3.keys(), [], "s3rver answers on 127.0.0.1:%d: bucket %s exists and is empty"
          % (s3.port, BUCKET))
except Exception:
    t.fail("s3rver started (npm package s3rver at $TRACE_S3RVER)", traceback.format_exc())
    sys.exit(t.done())

env = TraceEnv.start_or_exit(t, on_failure=s3.stop, name="trace_e2e_file_s3", gucs={
    "trace.enabled_adapters": F,
    "trace.file_export_type": "s3",
    "trace.s3_endpoint": s3.endpoint,
    "trace.s3_bucket": BUCKET,
    "trace.s3_prefix": PREFIX,
    "trace.s3_region": "us-east-1",
    "trace.s3_access_key_id": S3RVER_KEY,
    "trace.s3_secret_access_key": S3RVER_SECRET,
    "trace.max_retries": 50,
    "trace.retry_backoff_cap": "1s",
})
env.add_secret(S3RVER_SECRET)

try:
    first = []

    with t.case("s3rver receives one object per trade and returns it on GET"):
        # Fixture trade 3: user 1 (opted in), signal 10 {myfxbook,webhook,file}.
        first = [3, env.new_trade(user_id=1, signal_id=10)]
        close_many(env, first)
        for tid in first:
            r = env.wait_status(tid, F, "delivered", 15).get(F, {})
            t.ok(r.get("status") == "delivered" and r.get("attempts") == 1
                 and r.get("last_http_status") == 200,
                 "trade %d: delivered on the first attempt, HTTP 200" % tid, repr(r))
        want_keys = sorted(key_of(env, tid) for tid in first)
        t.is_(sorted(s3.keys(PREFIX)), want_keys,
              "the bucket holds exactly <prefix>YYYY/MM/DD/<trade_id>.json for each "
              "(UTC day of the row's created_at)")
        for tid in first:
            status, headers, body = s3.get(key_of(env, tid))
            t.is_(status, 200, "trade %d: GET %s/%s returns 200" % (tid, BUCKET, key_of(env, tid)))
            try:
                got = as_json_literals(body.decode("utf-8"))
            except Exception as e:
                got = "not JSON: %s: %r" % (e, body[:300])
            t.is_(got, env.trade_json(tid),
                  "trade %d: the object is the allowlisted payload as to_json renders it" % tid)
            ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
            t.is_(ctype.split(";")[0].strip(), "application/json",
                  "trade %d: stored with Content-Type application/json" % tid)
        pii = [v for v in env.pii_values()
               for k in s3.keys(PREFIX) if v.encode() in s3.get(k)[2]]
        t.ok(not pii, "no personal value in any stored object", repr(pii[:5]))

    with t.case("the key is dated by the UTC day the row was queued"):
        # A row queued yesterday at 23:30 UTC (13:30 today in the server's
        # time zone, Pacific/Kiritimati, UTC+14), sent today.
        env.set_gucs({"trace.delay": "1h", "timezone": "Pacific/Kiritimati"})
        tid = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(tid)
        env.sql("""UPDATE trace.trace_queue
                      SET created_at = date_trunc('day', now() AT TIME ZONE 'UTC')
                                       AT TIME ZONE 'UTC' - interval '30 minutes',
                          due_at = now()
                    WHERE trade_id = %s AND adapter = 'file'""", (tid,))
        row = env.wait_status(tid, F, "delivered", 15).get(F, {})
        created = row.get("created_at")
        t.ok(row.get("status") == "delivered", "the back-dated row was delivered", repr(row))
        if created is not None:
            day = utc_date(created)
            t.ok(day < utc_date(time.time()) and
                 created.astimezone(ZoneInfo("Pacific/Kiritimati")).date() != day,
                 "(its created_at is yesterday in UTC, another day in the server's zone)",
                 "created_at %s" % created)
            t.is_(keys_of_trade(s3, tid), [object_key(PREFIX, day, tid)],
                  "its one object is under the UTC day of created_at (%s), not today's "
                  "or the server time zone's" % day.isoformat())
        env.set_gucs({"trace.delay": "0", "timezone": None})

    with t.case("re-sending a row overwrites the same key"):
        tid = first[1] if len(first) > 1 else None
        before = env.rows(tid).get(F, {})
        key = key_of(env, tid)
        env.sql("UPDATE trades SET fees = 9.99, pnl = 31.17 WHERE trade_id = %s", (tid,))
        # Put the delivered row through the operator's path: abandoned, then
        # trace.retry() (the worker sends it again, same created_at).
        env.sql("UPDATE trace.trace_queue SET status = 'abandoned' WHERE id = %s", (before["id"],))
        t.is_(env.sql1("SELECT trace.retry(%s)", (before["id"],)), True,
              "trace.retry() re-arms the row")
        row = env.wait_rows(tid, lambda rs: F in rs and rs[F]["status"] == "delivered"
                            and rs[F]["delivered_at"] is not None
                            and before.get("delivered_at") is not None
                            and rs[F]["delivered_at"] > before["delivered_at"], 15).get(F, {})
        t.ok(row.get("delivered_at") and before.get("delivered_at")
             and row["delivered_at"] > before["delivered_at"],
             "the row was delivered again", repr(row))
        t.is_(keys_of_trade(s3, tid), [key], "still one object for the trade, at the same key")
        status, _, body = s3.get(key)
        got = as_json_literals(body.decode("utf-8")) if status == 200 else None
        t.ok(status == 200 and got == env.trade_json(tid) and got.get("fees") == "9.99",
             "the object now holds the trade as it is (fees 9.99)", repr(got))
        t.is_(sorted(s3.keys(PREFIX)), sorted(set(s3.keys(PREFIX))), "no duplicate keys")

    key_id = "AKIAE2E" + pysecrets.token_hex(7).upper()
    secret = pysecrets.token_urlsafe(30)
    env.add_secret(key_id)
    env.add_secret(secret)

    def signed_put(label):
        """Close a trade, wait for its PUT on the sink; returns (tid, req)."""
        tid = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(tid)
        row = env.wait_status(tid, F, "delivered", 15).get(F, {})
        reqs = env.reqs_for(tid, F)
        t.ok(row.get("status") == "delivered" and len(reqs) == 1,
             "%s: the PUT reached the capture sink once and was delivered" % label,
             lambda: "row %r\nrequests %r" % (row, [r.to_dict() for r in env.sink.requests()][-3:]))
        return tid, (reqs[0] if reqs else None)

    with t.case("AWS Signature V4, verified independently with botocore"):
        env.set_gucs({"trace.s3_endpoint": env.sink.base_url,
                      "trace.s3_bucket": CAPTURE_BUCKET,
                      "trace.s3_region": REGION,
                      "trace.s3_access_key_id": key_id,
                      "trace.s3_secret_access_key": secret})
        tid, req = signed_put("capture")
        if req is not None:
            key = key_of(env, tid)
            t.is_(req.method, "PUT", "method PUT")
            want_path = "/%s/%s" % (CAPTURE_BUCKET, encode_key(key))
            t.is_(req.path, want_path, "path-style /<bucket>/<key>, the key URI-encoded "
                  "(space %20, plus %2B, '/' kept)")
            t.ok("/traces%20x%2By/" in req.path, "the prefix 'traces x+y/' is sent as "
                 "traces%20x%2By/", req.path)
            body_hash = hashlib.sha256(req.body).hexdigest()
            t.is_(req.header("x-amz-content-sha256"), body_hash,
                  "x-amz-content-sha256 is the hex SHA-256 of the body")
            try:
                got = as_json_literals(req.body.decode("utf-8"))
            except Exception as e:
                got = "not JSON: %s" % e
            t.is_(got, env.trade_json(tid), "the body is the allowlisted payload")
            t.is_(req.header("Content-Type"), "application/json", "Content-Type: application/json")
            t.is_(req.header("Idempotency-Key"), "%d-file" % tid, "Idempotency-Key <trade_id>-file")
            t.is_(req.header("User-Agent"), "trace_ext/" + ext_version(), "User-Agent trace_ext/<version>")
            amz_date = req.header("x-amz-date") or ""
            t.ok(re.fullmatch(r"\d{8}T\d{6}Z", amz_date) is not None and
                 abs(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")) - req.time) < 120,
                 "X-Amz-Date is the UTC time of sending", "X-Amz-Date %r" % amz_date)
            auth = parse_authorization(req.header("Authorization"))
            t.ok(auth is not None, "Authorization: AWS4-HMAC-SHA256 Credential=..., "
                 "SignedHeaders=..., Signature=<64 hex>", repr(req.header("Authorization")))
            if auth:
                t.is_(auth["key_id"], key_id, "Credential starts with trace.s3_access_key_id")
                t.is_(auth["scope"], [amz_date[:8], REGION, "s3", "aws4_request"],
                      "credential scope <X-Amz-Date day>/<trace.s3_region>/s3/aws4_request")
                sent = {k.lower() for k, _ in req.headers}
                need = {"host", "x-amz-date", "x-amz-content-sha256"} | \
                    {h for h in sent if h.startswith("x-amz-")}
                t.ok(need <= set(auth["signed_headers"]),
                     "SignedHeaders covers host, x-amz-date, x-amz-content-sha256 "
                     "(every x-amz-* header sent)", repr(auth["signed_headers"]))
            url = env.sink.base_url + req.path
            check = verify_sigv4(req.method, url, req.headers, req.body, secret, REGION)
            t.ok(check.ok, "botocore's S3SigV4Auth, at the captured X-Amz-Date over the same "
                 "SignedHeaders, computes the same signature", check.report)
            wrong = verify_sigv4(req.method, url, req.headers, req.body, secret + "x", REGION)
            t.ok(not wrong.ok, "(with another secret it does not: the check can fail)")
            tampered = verify_sigv4(req.method, url, req.headers,
                                    req.body.replace(b'"fees":', b'"fees":1'), secret, REGION)
            t.ok(not tampered.ok, "(nor over another body: the payload is signed)")

    with t.case("credentials from trace.secrets_file win, and sign"):
        sdir = tempfile.mkdtemp(prefix="trace_e2e_secrets_", dir="/tmp")
        tmpdirs.append(sdir)
        chown_to_server(sdir)
        key_id2 = "AKIAFILE" + pysecrets.token_hex(6).upper()
        secret2 = pysecrets.token_urlsafe(30)
        env.add_secret(key_id2)
        env.add_secret(secret2)
        path = os.path.join(sdir, "trace_ext.secrets")
        with open(path, "w") as f:
            f.write("# S3 credentials\ns3_access_key_id = %s\ns3_secret_access_key = %s\n"
                    % (key_id2, secret2))
        os.chmod(path, 0o600)
        chown_to_server(path)
        env.set_gucs({"trace.secrets_file": path})
        tid, req = signed_put("secrets file")
        if req is not None:
            auth = parse_authorization(req.header("Authorization")) or {}
            t.is_(auth.get("key_id"), key_id2, "Credential uses the file's s3_access_key_id")
            url = env.sink.base_url + req.path
            check = verify_sigv4(req.method, url, req.headers, req.body, secret2, REGION)
            t.ok(check.ok, "the signature verifies with the file's s3_secret_access_key",
                 check.report)
        env.set_gucs({"trace.secrets_file": ""})

    def failing_sink(label, response, expect_status, expect_text, reason, retried=True):
        """Point the endpoint at a sink that always answers `response`;
        check the recorded failure; then answer 200 (if retried) and see
        the row delivered."""
        sink = CaptureServer(default=response).start()
        try:
            env.set_gucs({"trace.s3_endpoint": sink.base_url})
            n0 = fail_count(env, F, reason) or 0
            tid = env.new_trade(user_id=1, signal_id=10)
            env.close_trade(tid)
            if retried:
                rows = env.wait_rows(tid, lambda rs: F in rs and rs[F]["attempts"] >= 2
                                     and rs[F]["last_error"], 15)
            else:
                rows = env.wait_status(tid, F, "abandoned", 15)
            r = rows.get(F, {})
            t.is_(r.get("last_http_status"), expect_status,
                  "%s: last_http_status %d" % (label, expect_status))
            t.ok(expect_text in (r.get("last_error") or ""),
                 "%s: last_error names %s" % (label, expect_text), repr(r.get("last_error")))
            if retried:
                t.ok(r.get("status") in ("pending", "sending") and r.get("attempts", 0) >= 2,
                     "%s: retried (attempts %s, not abandoned)" % (label, r.get("attempts")),
                     repr(r))
            else:
                t.ok(r.get("status") == "abandoned" and r.get("attempts") == 1,
                     "%s: abandoned at once" % label, repr(r))
            f = env.sqld("SELECT last_error, last_http_status FROM trace.failures "
                         "WHERE trade_id = %s AND adapter = 'file'", (tid,))
            t.ok(f and f[0]["last_http_status"] == expect_status,
                 "%s: the row is in trace.failures" % label, repr(f))
            t.ok((fail_count(env, F, reason) or 0) > n0,
                 "%s: counted as trust_trace_fail_total{adapter=file,reason=%s}" % (label, reason))
            if retried:
                reqs = sink.requests()
                for route in {q.route for q in reqs}:
                    sink.set_behaviour(route, default=200)
                r = env.wait_status(tid, F, "delivered", 15).get(F, {})
                t.is_(r.get("status"), "delivered", "%s: delivered once S3 answers 200" % label)
                t.ok(len({q.path for q in reqs}) == 1,
                     "%s: every attempt PUT the same key" % label,
                     repr(sorted({q.path for q in reqs})))
        finally:
            sink.stop()

    with t.case("S3 refusals: 403 AccessDenied, 500, 404 NoSuchBucket"):
        failing_sink("403", {"status": 403, "headers": {"Content-Type": "application/xml"},
                             "body": s3_error("AccessDenied", "Access Denied")},
                     403, "AccessDenied", "http_4xx")
        failing_sink("500", {"status": 500, "headers": {"Content-Type": "application/xml"},
                             "body": s3_error("InternalError", "We encountered an internal error.")},
                     500, "500", "http_5xx")
        failing_sink("404", {"status": 404, "headers": {"Content-Type": "application/xml"},
                             "body": s3_error("NoSuchBucket", "The specified bucket does not exist")},
                     404, "NoSuchBucket", "http_4xx", retried=False)
        env.set_gucs({"trace.s3_endpoint": env.sink.base_url})

    def config_failure(label, settings, expect_text, restore):
        n0 = fail_count(env, F, "config") or 0
        env.set_gucs(settings)
        tid = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(tid)
        r = env.wait_rows(tid, lambda rs: F in rs and rs[F]["last_error"], 10).get(F, {})
        t.ok(expect_text in (r.get("last_error") or "") and r.get("status") in ("pending", "sending"),
             "%s: a retried failure whose last_error names %s" % (label, expect_text), repr(r))
        t.is_(r.get("last_http_status"), None, "%s: no HTTP status" % label)
        t.ok((fail_count(env, F, "config") or 0) > n0, "%s: counted with reason config" % label)
        t.is_(len(env.reqs_for(tid, F)), 0, "%s: nothing was sent" % label)
        env.set_gucs(restore)
        r = env.wait_status(tid, F, "delivered", 15).get(F, {})
        t.is_(r.get("status"), "delivered", "%s: delivered once fixed" % label)

    with t.case("bad configuration"):
        config_failure("no bucket", {"trace.s3_bucket": ""}, "trace.s3_bucket",
                       {"trace.s3_bucket": CAPTURE_BUCKET})
        config_failure("no access key id", {"trace.s3_access_key_id": ""},
                       "trace.s3_access_key_id", {"trace.s3_access_key_id": key_id})
        try:
            env.cluster.alter_system({"trace.s3_endpoint": "file:///tmp/x"}, dbname="trades")
            t.fail("trace.s3_endpoint = file:///tmp/x is rejected")
        except psycopg2.Error as e:
            t.ok("trace.s3_endpoint" in str(e),
                 "trace.s3_endpoint = file:///tmp/x is rejected by ALTER SYSTEM, naming "
                 "trace.s3_endpoint", str(e))
        t.is_(env.sql1("SHOW trace.s3_endpoint"), env.sink.base_url, "the endpoint is unchanged")

    with t.case("the S3 credentials stay secret"):
        for g in ("trace.s3_access_key_id", "trace.s3_secret_access_key"):
            t.is_(env.sql1("SHOW " + g), "********", "SHOW %s: ********" % g)
        needles = [key_id, secret, key_id2, secret2, S3RVER_SECRET]
        for what, q in (("trace.failures", "SELECT row_to_json(f)::text FROM trace.failures f"),
                        ("trace.trace_queue", "SELECT row_to_json(q)::text FROM trace.trace_queue q"),
                        ("pg_settings", "SELECT row_to_json(s)::text FROM pg_settings s "
                                        "WHERE name LIKE 'trace.%'")):
            text = "\n".join(r[0] for r in env.sql(q))
            found = [n for n in needles if n in text]
            t.ok(text and not found, "no S3 key id or secret in %s" % what,
                 "%d of the values found" % len(found))
        env.check_log_clean("S3 export")
finally:
    env.close()
    s3.stop()
    for d in tmpdirs:
        remove_dir(d)

sys.exit(t.done())
