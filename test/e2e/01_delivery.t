#!/usr/bin/python3
"""Delivery, end to end: a real worker posts closed trades to a capture
sink.  What arrives (headers, body, signature), for whom (opt-in, adapter
rules), when (the delay; fees final at send time; reopen cancels), that a
reload changes the endpoint without a restart, that secrets stay secret,
and that a fast shutdown is prompt."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import base64  # noqa: E402
import secrets as pysecrets  # noqa: E402

import psycopg2  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import SECRET_GUCS, TraceEnv  # noqa: E402

t = Tap()
env = TraceEnv.start_or_exit(t, gucs={"trace.max_retries": 5}, name="trace_e2e_delivery")

BOTH = ("myfxbook", "webhook")

# The default allowlist (README.md, Configuration), written out here rather than read
# from the server, and the body trade 3 must arrive as, computed by hand
# from test/fixtures/trade_store.sql: trade g = 3 has signal 10 + 3 % 3,
# instrument EURUSD (element 1 + 3 % 3), side sell (3 is odd), volume
# 1.0 + 3 % 5 as numeric(18,4), entry_price 1.08 + 3 % 7 / 100.0 as
# numeric(18,6), opened_at 2026-01-05 08:00 UTC + 3 minutes; the rest is
# what the close below sets.  PostgreSQL's to_json: no spaces, numerics
# with their scale, timestamptz in ISO 8601 with the offset (TimeZone UTC).
DEFAULT_ALLOWLIST = ["trade_id", "signal_id", "instrument", "side", "volume", "entry_price",
                     "exit_price", "opened_at", "closed_at", "pnl", "fees"]
TRADE_3_BODY = (b'{"trade_id":3,"signal_id":10,"instrument":"EURUSD","side":"sell",'
                b'"volume":4.0000,"entry_price":1.110000,"exit_price":1.091200,'
                b'"opened_at":"2026-01-05T08:03:00+00:00","closed_at":"2026-01-05T09:00:00+00:00",'
                b'"pnl":42.10,"fees":1.25}')

try:
    with t.case("delivery to myfxbook and webhook"):
        # Fixture trade 3: user 1 (opted in), signal 10 (myfxbook, webhook, file).
        env.sql("""UPDATE trades SET status = 'CLOSED', exit_price = 1.0912,
                          closed_at = '2026-01-05 09:00:00+00', pnl = 42.10, fees = 1.25
                    WHERE trade_id = 3""")
        t.is_(env.sql1("SHOW trace.payload_columns").split(","), DEFAULT_ALLOWLIST,
              "trace.payload_columns is the default allowlist, as README.md lists it")
        rows = env.rows(3)
        t.is_(sorted(rows), ["myfxbook", "webhook"],
              "closing trade 3 queued one row per enabled adapter of its signal")
        rows = env.wait_status(3, BOTH, "delivered", 15)
        for a in BOTH:
            r = rows.get(a, {})
            t.ok(r.get("status") == "delivered" and r.get("attempts") == 1
                 and r.get("delivered_at") is not None,
                 "%s row delivered on the first attempt" % a, repr(r))
        for a in BOTH:
            reqs = env.reqs_for(3, a, env.paths[a])
            if not t.is_(len(reqs), 1, "%s: exactly one request at its URL" % a,
                         lambda: repr([x.to_dict() for x in env.sink.requests()])):
                continue
            env.check_delivery(reqs[0], 3, a, a)
            t.is_(reqs[0].body, TRADE_3_BODY,
                  "%s: the body is, byte for byte, the literal computed from the fixture" % a)
        mfx = env.reqs_for(3, "myfxbook")
        wh = env.reqs_for(3, "webhook")
        t.ok(mfx and wh and mfx[0].header(env.auth_header) is None
             and wh[0].header("Authorization") is None
             and wh[0].header("webhook-signature") is None,
             "each adapter sends only its own auth header; no signature without a secret")

    def signed_case(secret, label):
        env.set_gucs({"trace.webhook_signing_secret": secret})
        tid = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(tid)
        rows = env.wait_status(tid, "webhook", "delivered", 15)
        reqs = env.wait_reqs(tid, "webhook", count=1, timeout=5)
        if t.ok(len(reqs) == 1, "%s: signed delivery arrived" % label,
                lambda: "queue row: %r\nserver log:\n%s" % (rows, env.cluster.log_tail(40))):
            env.check_signature(reqs[0], tid, secret, label)
            t.is_(reqs[0].header(env.auth_header), env.tokens["webhook"],
                  "%s: the auth header is still sent" % label)

    with t.case("Standard Webhooks signature, whsec_ secret"):
        signed_case("whsec_" + base64.b64encode(pysecrets.token_bytes(24)).decode(),
                    "whsec_ secret")
    with t.case("Standard Webhooks signature, raw secret"):
        signed_case("raw-signing-" + pysecrets.token_hex(10), "raw secret")
    env.set_gucs({"trace.webhook_signing_secret": ""})

    with t.case("opt-in and adapter rules"):
        t_optout = env.new_trade(user_id=2, signal_id=10)     # tracing_enabled = false
        t_noadapt = env.new_trade(user_id=3, signal_id=12)    # tracing_adapters NULL
        t_whonly = env.new_trade(user_id=1, signal_id=11)     # {webhook}
        t_ctrl = env.new_trade(user_id=1, signal_id=10)       # both: the control
        for x in (t_optout, t_noadapt, t_whonly, t_ctrl):
            env.close_trade(x)
        t.is_(env.rows(t_optout), {}, "user with tracing_enabled = false: nothing queued")
        t.is_(env.rows(t_noadapt), {}, "signal with NULL tracing_adapters: nothing queued")
        t.is_(sorted(env.rows(t_whonly)), ["webhook"], "signal {webhook}: only webhook queued")
        env.wait_status(t_ctrl, BOTH, "delivered", 15)
        env.wait_status(t_whonly, "webhook", "delivered", 15)
        done = wait_until(lambda: len(env.reqs_for(t_ctrl)) >= 2 and env.reqs_for(t_whonly), 5)
        t.ok(done, "the control trade (opted in, both adapters) was delivered to both")
        t.is_(len(env.reqs_for(t_optout)) + len(env.reqs_for(t_noadapt)), 0,
              "nothing sent for the opted-out user or the signal without adapters")
        t.is_(sorted(env.req_trade(r)[1] for r in env.reqs_for(t_whonly)), ["webhook"],
              "signal {webhook}: only the webhook request was sent")

        env.set_gucs({"trace.enabled_adapters": "webhook"})
        t_inter = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(t_inter)
        t.is_(sorted(env.rows(t_inter)), ["webhook"],
              "signal {myfxbook,webhook,file} with trace.enabled_adapters=webhook: only webhook queued")
        env.wait_status(t_inter, "webhook", "delivered", 15)
        t.is_(sorted(env.req_trade(r)[1] for r in env.reqs_for(t_inter)), ["webhook"],
              "... and only webhook was sent")
        env.set_gucs({"trace.enabled_adapters": "myfxbook,webhook"})

    with t.case("the delay, fees final at send time, reopen cancels"):
        env.set_gucs({"trace.delay": "2s"})
        t.is_(env.sql1("SHOW trace.delay"), "2s", "trace.delay is 2s after the reload")
        t_delay = env.new_trade(user_id=1, signal_id=11)
        t_fees = env.new_trade(user_id=1, signal_id=11)
        t_reopen = env.new_trade(user_id=1, signal_id=10)
        env.close_trade(t_delay)
        env.close_trade(t_fees, pnl="42.10", fees="1.25")
        # The broker books the final fees after the close, before the delay ends.
        env.sql("UPDATE trades SET fees = 3.75, pnl = 40.60 WHERE trade_id = %s", (t_fees,))
        env.close_trade(t_reopen)
        env.sql("UPDATE trades SET status = 'OPEN' WHERE trade_id = %s", (t_reopen,))

        row = env.rows(t_delay).get("webhook", {})
        lag = row.get("due_epoch", 0) - row.get("created_epoch", 0)
        t.ok(1.9 <= lag <= 2.1, "due_at = enqueue time + trace.delay", "due - created = %.3f" % lag)
        due = row.get("due_epoch", 0)
        reqs = env.wait_reqs(t_delay, "webhook", count=1, timeout=15)
        t.ok(len(reqs) >= 1, "the delayed trade arrived after its delay")
        if reqs:
            t.ok(reqs[0].time >= due - 0.01, "not received before due_at",
                 "received %.3f s after due_at" % (reqs[0].time - due))
            t.ok(reqs[0].time <= due + 3, "received soon after due_at (poll interval 100ms)",
                 "received %.3f s after due_at" % (reqs[0].time - due))

        env.wait_status(t_fees, "webhook", "delivered", 15)
        reqs = env.reqs_for(t_fees, "webhook")
        body = reqs[0].json(parse_float=str) if reqs else None
        t.ok(body is not None and body.get("fees") == "3.75" and body.get("pnl") == "40.60",
             "fees and pnl changed after the close arrive as they are at send time",
             "body: %r" % (body,))
        if reqs:
            env.check_delivery(reqs[0], t_fees, "webhook", "fees-final trade")

        rows = env.wait_status(t_reopen, BOTH, "cancelled", 15)
        t.is_({a: r["status"] for a, r in rows.items()},
              {"myfxbook": "cancelled", "webhook": "cancelled"},
              "trade reopened before due: its rows end cancelled")
        t.is_(len(env.reqs_for(t_reopen)), 0, "... and nothing was sent for it")
        env.set_gucs({"trace.delay": "0"})

    with t.case("SIGHUP: a new webhook endpoint takes effect without a restart"):
        pid0 = env.worker_pid()
        env.point("webhook", "/webhook-moved")
        tid = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(tid)
        env.wait_status(tid, "webhook", "delivered", 15)
        t.is_(len(env.reqs_for(tid, "webhook", "/webhook-moved")), 1,
              "delivered to the new endpoint")
        t.is_(len(env.reqs_for(tid, "webhook", "/webhook")), 0, "not to the old one")
        t.is_(env.worker_pid(), pid0, "same worker process (no restart)")

    with t.case("connections are kept alive and reused"):
        tids = []
        for _ in range(4):
            tid = env.new_trade(user_id=1, signal_id=11)
            env.close_trade(tid)
            env.wait_status(tid, "webhook", "delivered", 15)
            tids.append(tid)
        reqs = [r for tid in tids for r in env.reqs_for(tid, "webhook")]
        ports = {r.client_port for r in reqs}
        t.ok(len(reqs) == 4 and len(ports) == 1,
             "4 deliveries one after another to one tracker used one connection",
             "client ports: %s" % sorted(r.client_port for r in reqs))

    with t.case("secret settings are masked"):
        for g in ("trace.myfxbook_webhook_token", "trace.webhook_auth_token"):
            t.is_(env.sql1("SHOW " + g), "********", "SHOW %s to a superuser: ********" % g)
        env.set_gucs({"trace.webhook_signing_secret": "whsec_" +
                      base64.b64encode(pysecrets.token_bytes(24)).decode()})
        t.is_(env.sql1("SHOW trace.webhook_signing_secret"), "********",
              "SHOW trace.webhook_signing_secret to a superuser: ********")
        t.is_(env.sql1("SHOW trace.s3_secret_access_key"), "",
              "an unset secret shows as empty")
        t.is_(env.sql1("SELECT current_setting('trace.webhook_auth_token')"), "********",
              "current_setting() masks too")
        rows = env.sql("SELECT row_to_json(s)::text FROM pg_settings s WHERE name = ANY(%s)",
                       (list(SECRET_GUCS),))
        text = "\n".join(r[0] for r in rows)
        leaks = [s for s in env.secret_values() if s in text]
        def masked(text):
            for s in leaks:
                text = text.replace(s, "<secret value>")
            return text
        t.ok(len(rows) == len(SECRET_GUCS) and not leaks,
             "pg_settings (every column) holds no secret value",
             lambda: "rows: %d\n" % len(rows) + masked(
                 "\n".join(r[0] for r in rows if any(s in r[0] for s in leaks))))
        env.sql("CREATE ROLE e2e_app LOGIN")
        app = env.cluster.connect("trades", user="e2e_app")
        try:
            app.cursor().execute("SHOW trace.webhook_auth_token")
            t.fail("a non-superuser cannot SHOW a secret setting")
        except psycopg2.Error as e:
            t.ok("trace.webhook_auth_token" in str(e),
                 "a non-superuser cannot SHOW a secret setting (error names it)", str(e))
        finally:
            app.close()
        # One more signed delivery, so the scan below covers the current secret.
        tid = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(tid)
        env.wait_status(tid, "webhook", "delivered", 15)

    with t.case("no personal data, secrets only where they belong"):
        env.check_no_pii("delivery")

    with t.case("SIGTERM: fast shutdown is prompt"):
        took = env.cluster.stop(mode="fast")
        t.ok(took < 5, "pg_ctl stop -m fast returns in < 5 s", "took %.1f s" % took)
        env.check_log_clean("after shutdown")
finally:
    env.close()

sys.exit(t.done())
