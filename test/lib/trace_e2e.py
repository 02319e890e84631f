"""The world an end-to-end test of trace_ext runs in.

TraceEnv starts a capture sink and a throwaway cluster that preloads
trace_ext, creates the trade database from the reference fixture
(../shared/fixtures/trade_store.sql, beside the repository), adds extra
personal "canary" columns to trades so the allowlist is tested against
columns nobody told it about, installs the extension and waits for the
worker.  It then offers the small vocabulary the test scripts are written
in: make and close trades, read the queue, wait for outcomes, change
settings the way an operator does (ALTER SYSTEM + pg_reload_conf), and
scan everything the sink received and the server log for personal data
and secrets.

The demo script reuses this module; nothing here asserts by itself except
the check_* functions, which report through the Tap they are given.

Canaries.  Every personal column of the trade store (users.email, name,
client_id; trades.account_number, client_id, and the extra passport and
iban columns) carries a unique marker of this TraceEnv, and every secret is
a unique random token.  With TRACE_E2E_CANARY=1 (test/run.sh sets it) the
cluster runs with log_statement = all, log_min_messages = debug1 and
pg_stat_statements (track = all), and close() reports one check per place
the markers and secrets must never reach: the captured requests (outside
a token's own auth header), the whole server log, pg_stat_statements,
pg_stat_activity sampled at close, and the messages clients saw.  For that
to measure the extension rather than the test, the test's own statements
carry neither: personal values are built on the server from a table
written while statement logging was off, and secrets are set the way
README recommends, in a configuration file (set_gucs), never with
ALTER SYSTEM (whose statement text the log and pg_stat_statements keep).
"""

import base64
import hashlib
import hmac
import json
import os
import re
import secrets as pysecrets
import shutil
import sys
import time
import traceback
from decimal import Decimal
from pathlib import Path

from capture_server import CaptureServer
from cluster import Cluster, ClusterError, free_port  # noqa: F401 (re-exported)
from tap import wait_until

REPO = Path(__file__).resolve().parents[2]
DB = "trades"

DEFAULT_PAYLOAD_COLUMNS = ("trade_id,signal_id,instrument,side,volume,entry_price,"
                           "exit_price,opened_at,closed_at,pnl,fees").split(",")
ADAPTERS = ("myfxbook", "webhook")
SECRET_GUCS = ("trace.myfxbook_webhook_token", "trace.webhook_auth_token",
               "trace.webhook_signing_secret", "trace.s3_access_key_id",
               "trace.s3_secret_access_key")

# Columns that are personal data: the fixture's, plus our canaries.
PII_SQL = """
    SELECT email FROM users UNION ALL SELECT name FROM users
    UNION ALL SELECT client_id FROM users
    UNION ALL SELECT account_number FROM trades UNION ALL SELECT client_id FROM trades
    UNION ALL SELECT passport FROM trades UNION ALL SELECT iban FROM trades
"""
PII_KEYS = {"user_id", "account_number", "client_id", "email", "name",
            "passport", "iban"}
# Every personal text column of the trade store, each given its own canary.
PII_COLUMNS = ("users.email", "users.name", "users.client_id",
               "trades.account_number", "trades.client_id",
               "trades.passport", "trades.iban")


def canary_mode():
    """TRACE_E2E_CANARY=1: log everything and scan it at close()."""
    return os.environ.get("TRACE_E2E_CANARY", "") not in ("", "0")


def fixture_path():
    """The reference trade store: ../shared/fixtures beside the repository
    (as CI lays it out), else a copy in test/fixtures."""
    for p in (REPO.parent / "shared" / "fixtures" / "trade_store.sql",
              REPO / "test" / "fixtures" / "trade_store.sql"):
        if p.is_file():
            return str(p)
    raise FileNotFoundError("trade_store.sql not found in ../shared/fixtures "
                            "or test/fixtures")


def ext_version():
    """default_version from trace_ext.control (the one source of truth)."""
    text = (REPO / "trace_ext.control").read_text()
    m = re.search(r"^\s*default_version\s*=\s*'([^']*)'", text, re.M)
    if not m:
        raise RuntimeError("no default_version in trace_ext.control")
    return m.group(1)


def as_json_literals(text):
    """Parse JSON keeping numbers as their literal text, so that 1.080000
    and 1.08 differ, as they do in to_json's output."""
    return json.loads(text, parse_float=str, parse_int=str,
                      parse_constant=str)


def standard_webhooks_signature(secret, msg_id, timestamp, body):
    """v1 signature of the Standard Webhooks spec: base64 HMAC-SHA256 over
    "id.timestamp.body"; a whsec_ secret is the base64 of the key."""
    if secret.startswith("whsec_"):
        key = base64.b64decode(secret[len("whsec_"):])
    else:
        key = secret.encode("utf-8")
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class TraceEnv:
    @classmethod
    def start_or_exit(cls, tap, on_failure=None, **kw):
        """A TraceEnv, or (after reporting the failed set-up as a failed
        test and running on_failure) the end of the script."""
        try:
            return cls(tap, **kw)
        except Exception:
            tap.fail("set-up: cluster with trace_ext, trade store, extension, worker",
                     traceback.format_exc())
            if on_failure:
                on_failure()
            sys.exit(tap.done())

    def __init__(self, tap, gucs=None, debug=None, name="trace_e2e", server_env=None,
                 canary=None):
        if canary is None:      # TRACE_E2E_CANARY=1: log everything, scan it at close
            canary = canary_mode()
        if debug is None:       # TRACE_E2E_DEBUG=1: log_min_messages = debug1
            debug = canary or os.environ.get("TRACE_E2E_DEBUG", "") not in ("", "0")
        self.tap = tap
        self.canary = canary
        tag = pysecrets.token_hex(5).upper()
        # One unique marker per personal column (see PII_COLUMNS).
        self.canaries = {col: "CNRY%s%s" % (col.split(".")[1].replace("_", "").upper()[:6], tag)
                         for col in PII_COLUMNS}
        self.sink = CaptureServer().start()
        self.paths = {"myfxbook": "/myfxbook", "webhook": "/webhook"}
        self.tokens = {
            "myfxbook": "mfxtok-" + pysecrets.token_hex(12),
            "webhook": "whtok-" + pysecrets.token_hex(12),
        }
        self.auth_header = "X-Tracker-Key"
        self.signing_secrets = []          # every signing secret ever set
        self.payload_columns = list(DEFAULT_PAYLOAD_COLUMNS)
        self._next_trade = 1000
        base = {
            "trace.database": DB,
            "trace.enabled_adapters": "myfxbook,webhook",
            "trace.delay": "0",
            "trace.poll_interval": "100ms",
            "trace.http_timeout": "1000ms",
            "trace.retry_backoff_base": "200ms",
            "trace.myfxbook_webhook_url": self.sink.url(self.paths["myfxbook"]),
            "trace.myfxbook_webhook_token": self.tokens["myfxbook"],
            "trace.webhook_endpoint": self.sink.url(self.paths["webhook"]),
            "trace.webhook_auth_header": self.auth_header,
            "trace.webhook_auth_token": self.tokens["webhook"],
        }
        if canary:
            base.update({
                "shared_preload_libraries": "trace_ext,pg_stat_statements",
                "pg_stat_statements.track": "all",
                "log_statement": "all",
                "log_min_messages": "debug1",
                "track_activity_query_size": 8192,
            })
        base.update(gucs or {})
        self.extra_secrets = []            # add_secret(): more values to keep out of logs
        self.header_secrets = set()        # add_secret(): (value, adapter, header) allowed
        self.cluster = Cluster(settings=base, debug=debug, name=name,
                               server_env=server_env)
        self.db = None
        self._sentinel = 1000
        try:
            self._setup()
        except Exception:
            self.tap.diag("set-up failed; server log tail:\n" + self.cluster.log_tail(40))
            raise

    # -- set up -----------------------------------------------------------
    def _setup(self):
        c = self.cluster
        c.init()
        # Create the trade database before the worker exists, so that the
        # worker never sees trace.database missing.
        # The personal data is written while statements are not logged: the
        # application's own statements are not what the canaries measure.
        c.start(overrides={"shared_preload_libraries": "''", "log_statement": "none"})
        c.create_database(DB)
        c.psql(file=fixture_path(), dbname=DB)
        k = self.canaries
        c.psql(dbname=DB, sql="""
            ALTER TABLE trades ADD COLUMN passport text, ADD COLUMN iban text;
            -- What new_trade() builds personal values from, so that its
            -- statements carry none.
            CREATE TABLE e2e_canary (account text, passport text, iban text);
            INSERT INTO e2e_canary VALUES ('ACC-E2E-{a}-', 'PASSPORT-CANARY-{p}-',
                                           'DE00CANARY{i}IBAN');
            UPDATE users
               SET email = replace(email, '@', '+{e}@'),
                   name = name || ' {n}',
                   client_id = client_id || '-{uc}';
            UPDATE trades t
               SET passport = 'PASSPORT-CANARY-{p}-' || t.trade_id,
                   iban = 'DE00CANARY{i}IBAN' || lpad(t.trade_id::text, 8, '0'),
                   account_number = t.account_number || '-{a}',
                   client_id = u.client_id || '-{tc}'
              FROM users u WHERE u.user_id = t.user_id;
        """.format(a=k["trades.account_number"], p=k["trades.passport"],
                   i=k["trades.iban"], e=k["users.email"], n=k["users.name"],
                   uc=k["users.client_id"], tc=k["trades.client_id"]))
        c.stop()
        c.start()
        self.db = c.connect(DB)
        if self.canary:
            self.sql("CREATE EXTENSION pg_stat_statements")
        self.sql("CREATE EXTENSION trace_ext")
        pid = wait_until(self.worker_pid, 20)
        if not pid:
            raise ClusterError("no 'trace_ext worker' in pg_stat_activity after 20 s")
        cols = self.sql1("SHOW trace.payload_columns")
        self.payload_columns = [x.strip() for x in cols.split(",") if x.strip()]

    # -- SQL --------------------------------------------------------------
    def reconnect(self, retry_for=30):
        try:
            if self.db is not None:
                self.db.close()
        except Exception:
            pass
        self.db = self.cluster.connect(DB, retry_for=retry_for)
        return self.db

    def sql(self, query, args=None):
        cur = self.db.cursor()
        cur.execute(query, args)
        if cur.description is None:
            return []
        return cur.fetchall()

    def sql1(self, query, args=None):
        rows = self.sql(query, args)
        return rows[0][0] if rows else None

    def sqld(self, query, args=None):
        """Rows as dicts."""
        cur = self.db.cursor()
        cur.execute(query, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def worker_pids(self):
        return [r[0] for r in self.sql(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'trace_ext worker' "
            "ORDER BY pid")]

    def worker_pid(self):
        pids = self.worker_pids()
        return pids[0] if pids else None

    # -- settings, as an operator changes them ----------------------------
    def set_gucs(self, settings):
        """ALTER SYSTEM SET + pg_reload_conf(), then wait until our own
        session sees the reload (a sentinel setting changes with it), so
        that the trigger in this session and the worker, signalled at the
        same moment, both run with the new values.  Secret settings are
        written to postgresql.conf instead (and any ALTER SYSTEM value of
        theirs reset), as README recommends: an ALTER SYSTEM statement
        carrying a secret is kept by the statement log and by
        pg_stat_statements."""
        self._sentinel += 1
        settings = dict(settings)
        reloads = self.worker_reloads()
        secret = {k: ("" if v is None else v) for k, v in settings.items()
                  if k in SECRET_GUCS}
        if secret:
            self.cluster.set_conf(secret, reload=False)
        system = {k: (None if k in secret else v) for k, v in settings.items()}
        system["log_autovacuum_min_duration"] = self._sentinel
        self.cluster.alter_system(system, dbname=DB, settle=0)
        want = str(self._sentinel)
        ok = wait_until(lambda: self.sql1(
            "SELECT setting FROM pg_settings WHERE name = 'log_autovacuum_min_duration'")
            == want, 10)
        if not ok:
            raise ClusterError("reload not seen by the session within 10 s")
        if reloads is None:
            # An extension older than 1.3 cannot say when the workers
            # reloaded: give them a moment.
            time.sleep(0.2)
        elif not wait_until(lambda: self._workers_reloaded(reloads), 10):
            raise ClusterError("the workers did not reload within 10 s: %r -> %r"
                               % (reloads, self.worker_reloads()))
        for k, v in settings.items():
            if k == "trace.webhook_signing_secret" and v:
                self.signing_secrets.append(v)
            if k == "trace.myfxbook_webhook_token" and v:
                self.tokens["myfxbook.%d" % self._sentinel] = v
            if k == "trace.webhook_auth_token" and v:
                self.tokens["webhook.%d" % self._sentinel] = v

    def worker_reloads(self):
        """{pid: configuration reloads} of the running workers
        (trace._worker_reloads()); None when the installed extension has
        no such function (older than 1.3)."""
        if not self.sql1("SELECT to_regprocedure('trace._worker_reloads()') IS NOT NULL"):
            return None
        return dict(self.sql("SELECT pid, reloads FROM trace._worker_reloads()"))

    def _workers_reloaded(self, before):
        """Has every worker running before re-read its configuration since
        (or stopped)?"""
        now = self.worker_reloads() or {}
        return all(pid not in now or now[pid] > n for pid, n in before.items())

    def point(self, adapter, path):
        """Point an adapter at a path of the sink (SIGHUP)."""
        guc = {"myfxbook": "trace.myfxbook_webhook_url",
               "webhook": "trace.webhook_endpoint"}[adapter]
        self.set_gucs({guc: self.sink.url(path)})
        self.paths[adapter] = path

    # -- trades -----------------------------------------------------------
    def new_trade(self, user_id=1, signal_id=11, instrument="EURUSD"):
        """Insert an OPEN trade for a user and a signal; returns its id."""
        self._next_trade += 1
        tid = self._next_trade
        self.add_trades(tid, tid, user_id, signal_id, instrument)
        return tid

    def add_trades(self, first, last, user_id=1, signal_id=11, instrument="EURUSD",
                   run_sql=None):
        """Insert OPEN trades first..last for a user and a signal (through
        run_sql, e.g. another cluster's, if given).  The personal values
        are built on the server (e2e_canary): the statement carries none."""
        (run_sql or self.sql)("""
            INSERT INTO trades (trade_id, user_id, signal_id, account_number, client_id,
                                instrument, side, volume, entry_price, opened_at,
                                passport, iban)
            SELECT g, u.user_id, %(s)s, k.account || g, u.client_id,
                   %(i)s, 'buy', 2.5, 1.084250,
                   timestamptz '2026-01-05 08:00:00+00' + g * interval '1 second',
                   k.passport || g, k.iban || lpad(g::text, 8, '0')
              FROM generate_series(%(a)s::bigint, %(b)s::bigint) g, users u, e2e_canary k
             WHERE u.user_id = %(u)s""",
            {"a": first, "b": last, "u": user_id, "s": signal_id, "i": instrument})

    def close_trade(self, trade_id, pnl="42.10", fees="1.25", exit_price="1.091200"):
        """Close a trade the way the trading application does."""
        self.sql("""
            UPDATE trades SET status = 'CLOSED', exit_price = %s, closed_at = now(),
                              pnl = %s, fees = %s
             WHERE trade_id = %s""", (Decimal(exit_price), Decimal(pnl),
                                      Decimal(fees), trade_id))

    def trade_json(self, trade_id, columns=None):
        """The allowlisted columns of a trade as to_json renders them."""
        cols = columns or self.payload_columns
        args = ", ".join("%s, %s" % (self._lit(c), self._ident(c)) for c in cols)
        text = self.sql1("SELECT json_build_object(%s)::text FROM trades WHERE trade_id = %%s"
                         % args, (trade_id,))
        return as_json_literals(text) if text is not None else None

    @staticmethod
    def _ident(name):
        return '"' + name.replace('"', '""') + '"'

    @staticmethod
    def _lit(name):
        return "'" + name.replace("'", "''") + "'"

    # -- the queue --------------------------------------------------------
    def status_sql(self, alias=""):
        """The SQL expression of a queue row's status as the views show it:
        from 1.6 a row being sent stays 'pending' in the table and is
        leased in shared memory (trace._leased()), which the views show as
        'sending'; before 1.6 the claim wrote 'sending' into the row."""
        q = alias + "." if alias else ""
        if self.sql1("SELECT to_regprocedure('trace._leased(bigint)') IS NOT NULL"):
            return ("CASE WHEN %sstatus = 'pending' AND trace._leased(%sid) THEN 'sending' "
                    "ELSE %sstatus END" % (q, q, q))
        return q + "status"

    def rows(self, trade_id):
        """Queue rows of a trade, keyed by adapter (status as the views
        show it: status_sql())."""
        return {r["adapter"]: r for r in self.sqld(
            "SELECT id, trade_id, adapter, " + self.status_sql() + " AS status, "
            "attempts, due_at, last_error, "
            "last_http_status, delivered_at, created_at, "
            "extract(epoch FROM due_at)::float8 AS due_epoch, "
            "extract(epoch FROM created_at)::float8 AS created_epoch "
            "FROM trace.trace_queue WHERE trade_id = %s", (trade_id,))}

    def wait_rows(self, trade_id, pred, timeout):
        """Wait until pred(rows of the trade) holds; returns the rows (the
        last ones seen, whether or not pred held)."""
        last = {}

        def probe():
            nonlocal last
            last = self.rows(trade_id)
            return pred(last)
        wait_until(probe, timeout, 0.05)
        return last

    def wait_status(self, trade_id, adapters, statuses, timeout):
        adapters = [adapters] if isinstance(adapters, str) else list(adapters)
        statuses = [statuses] if isinstance(statuses, str) else list(statuses)
        return self.wait_rows(
            trade_id,
            lambda rs: all(a in rs and rs[a]["status"] in statuses for a in adapters),
            timeout)

    # -- what the sink saw ------------------------------------------------
    @staticmethod
    def req_trade(req):
        """(trade_id, adapter) a request is for, from its Idempotency-Key,
        else from its body."""
        key = req.header("Idempotency-Key") or ""
        m = re.match(r"^(\d+)-(\w+)$", key)
        if m:
            return int(m.group(1)), m.group(2)
        body = req.json()
        if isinstance(body, dict) and "trade_id" in body:
            try:
                return int(body["trade_id"]), None
            except (TypeError, ValueError):
                pass
        return None, None

    def reqs_for(self, trade_id, adapter=None, path=None):
        out = []
        for r in self.sink.requests(path):
            t, a = self.req_trade(r)
            if t == trade_id and (adapter is None or a == adapter or a is None):
                out.append(r)
        return out

    def wait_reqs(self, trade_id, adapter=None, path=None, count=1, timeout=10):
        got = wait_until(lambda: len(self.reqs_for(trade_id, adapter, path)) >= count,
                         timeout, 0.02)
        return self.reqs_for(trade_id, adapter, path) if got else \
            self.reqs_for(trade_id, adapter, path)

    # -- checks -----------------------------------------------------------
    def check_delivery(self, req, trade_id, adapter, label):
        """One ok per property of a delivered request."""
        t = self.tap
        t.is_(req.method, "POST", "%s: method POST" % label)
        ctype = (req.header("Content-Type") or "")
        t.ok(ctype.split(";")[0].strip().lower() == "application/json",
             "%s: Content-Type: application/json" % label, "got %r" % ctype)
        t.is_(req.header("Idempotency-Key"), "%d-%s" % (trade_id, adapter),
              "%s: Idempotency-Key <trade_id>-<adapter>" % label)
        t.is_(req.header("User-Agent"), "trace_ext/" + ext_version(),
              "%s: User-Agent trace_ext/<version of trace_ext.control>" % label)
        try:
            body = as_json_literals(req.body.decode("utf-8"))
        except Exception as e:
            body = None
            t.fail("%s: body is JSON" % label, "%s\n%r" % (e, req.body[:500]))
        if body is not None:
            t.ok(isinstance(body, dict) and sorted(body) == sorted(self.payload_columns),
                 "%s: body keys are exactly trace.payload_columns" % label,
                 lambda: "keys: %r\nallowlist: %r" % (
                     sorted(body) if isinstance(body, dict) else body,
                     sorted(self.payload_columns)))
            expect = self.trade_json(trade_id)
            t.is_(body, expect, "%s: body values are what to_json renders" % label)
        if adapter == "myfxbook":
            t.is_(req.header("Authorization"), "Bearer " + self.tokens["myfxbook"],
                  "%s: Authorization: Bearer <trace.myfxbook_webhook_token>" % label)
        else:
            t.is_(req.header(self.auth_header), self.tokens["webhook"],
                  "%s: %s: <trace.webhook_auth_token>" % (label, self.auth_header))

    def check_signature(self, req, trade_id, secret, label):
        t = self.tap
        wid = req.header("webhook-id")
        ts = req.header("webhook-timestamp")
        sig = req.header("webhook-signature")
        t.is_(wid, "%d-webhook" % trade_id, "%s: webhook-id is the idempotency key" % label)
        ts_ok = ts is not None and re.fullmatch(r"\d+", ts) is not None \
            and abs(int(ts) - req.time) < 60
        t.ok(ts_ok, "%s: webhook-timestamp is the unix time of sending" % label,
             "got %r, received at %.0f" % (ts, req.time))
        if wid is None or ts is None or sig is None:
            t.fail("%s: webhook-signature v1,<base64 HMAC-SHA256(id.timestamp.body)>" % label,
                   "headers: %r" % (req.headers,))
            return
        want = standard_webhooks_signature(secret, wid, ts, req.body)
        have = [s.split(",", 1)[1] for s in sig.split() if s.startswith("v1,")]
        t.ok(want in have,
             "%s: webhook-signature v1,<base64 HMAC-SHA256(id.timestamp.body)>" % label,
             "got %r\nexpected v1,%s" % (sig, want))

    def add_secret(self, value, adapter=None, header=None):
        """Remember a secret value set outside set_gucs' known tokens (e.g.
        S3 credentials) so that check_log_clean() scans for it too.  With
        adapter and header: the one header of that adapter's requests
        where the value may be sent, as it is."""
        if value and value not in self.extra_secrets:
            self.extra_secrets.append(value)
        if adapter and header:
            self.header_secrets.add((value, adapter, header.lower()))

    def secret_values(self):
        vals = set(v for v in self.tokens.values() if v)
        vals.update(self.extra_secrets)
        for s in self.signing_secrets:
            vals.add(s)
            if s.startswith("whsec_"):
                vals.add(s[len("whsec_"):])
        return sorted(vals)

    def pii_values(self):
        """Every personal value in the trade store (remembered, so that the
        log can still be scanned once the server is down)."""
        try:
            vals = {r[0] for r in self.sql(PII_SQL) if r[0]}
            vals.add("CANARY")
            vals.update(self.canaries.values())
            self._pii_cache = sorted(vals)
        except Exception:
            if not getattr(self, "_pii_cache", None):
                if self.canary:     # the server is gone: the markers still tell
                    return sorted(set(self.canaries.values()) | {"CANARY"})
                raise
        return self._pii_cache

    def check_no_pii(self, label="no PII"):
        """No personal value in any request; no unknown key in any body;
        each token only in its own auth header; no secret in the log."""
        t = self.tap
        reqs = self.sink.requests()
        t.ok(len(reqs) > 0, "%s: the sink received requests to scan" % label)
        bad = self._request_pii_problems(reqs)
        t.ok(not bad, "%s: no personal value or key in any of %d requests (headers, body)"
             % (label, len(reqs)), "\n".join(bad[:20]))
        bad = self._request_secret_problems(reqs)
        t.ok(not bad, "%s: tokens only in their own auth header, signing secret in no request"
             % label, "\n".join(bad[:20]))
        self.check_log_clean(label)

    def _request_pii_problems(self, reqs):
        pii = [v.encode() for v in self.pii_values()]
        bad = []
        for r in reqs:
            raw = r.raw()
            for v in pii:
                if v in raw:
                    bad.append("request #%d %s contains %r" % (r.seq, r.path, v))
            body = r.json()
            keys = set()

            def walk(o):
                if isinstance(o, dict):
                    for k, v in o.items():
                        keys.add(k)
                        walk(v)
                elif isinstance(o, list):
                    for v in o:
                        walk(v)
            walk(body)
            if keys & PII_KEYS:
                bad.append("request #%d has key(s) %r" % (r.seq, sorted(keys & PII_KEYS)))
        return bad

    def _request_secret_problems(self, reqs):
        """Tokens only where they belong (their adapter's auth header; an S3
        access key id only as the Credential of an AWS4 Authorization);
        signing secrets and secret keys nowhere."""
        bad = []
        mfx_tokens = {v for k, v in self.tokens.items() if k.startswith("myfxbook")}
        wh_tokens = {v for k, v in self.tokens.items() if k.startswith("webhook")}
        for r in reqs:
            _, adapter = self.req_trade(r)
            for sv in self.secret_values():
                b = sv.encode()
                if b in r.body or b in r.path.encode():
                    bad.append("request #%d: a secret in body/path" % r.seq)
                for name, value in r.headers:
                    if sv not in value and sv not in name:
                        continue
                    allowed = (
                        (sv in mfx_tokens and adapter == "myfxbook"
                         and name.lower() == "authorization" and value == "Bearer " + sv)
                        or (sv in wh_tokens and adapter == "webhook"
                            and name.lower() == self.auth_header.lower() and value == sv)
                        or (sv in self.extra_secrets and adapter == "file"
                            and name.lower() == "authorization"
                            and value.startswith("AWS4-HMAC-SHA256 Credential=" + sv + "/")
                            and value.count(sv) == 1)
                        or ((sv, adapter, name.lower()) in self.header_secrets
                            and value == sv))
                    if not allowed:
                        bad.append("request #%d (%s): a secret in header %s"
                                   % (r.seq, adapter, name))
        return bad

    def check_log_clean(self, label="server log"):
        """No secret anywhere in the server log; no personal value in any
        log entry but the test's own statements (which log_statement = all
        logs as they were sent: the application's statements, not the
        extension's doing)."""
        log = self.cluster.log_bytes()
        leaks = [s for s in self.secret_values() if s.encode() in log]
        self.tap.ok(not leaks, "%s: no token or secret value in the server log" % label,
                    lambda: "\n".join(self._log_lines_with(leaks)))
        bad, own = self._pii_log_entries()
        self.tap.ok(not bad, "%s: no personal value in the server log%s"
                    % (label, " (the tests' own %d logged statements aside)" % own if own else ""),
                    lambda: "\n".join(bad[:20]))

    def _pii_log_entries(self):
        """(log entries holding a personal value, number of the tests' own
        logged statements that hold one and are not counted)."""
        log = self.cluster.log_text()
        needles = [("personal value", v) for v in self.pii_values() if v in log]
        bad, own = [], 0
        if not needles:             # the usual case: no entry to look at
            return bad, own
        for entry in self.cluster.log_entries():
            hits = self._hits(needles, entry, "server log")
            if not hits:
                continue
            if self.cluster.own_statement(entry) is not None:
                own += 1
                continue
            bad += hits
        return bad, own

    def _log_lines_with(self, needles):
        out = []
        for line in self.cluster.log_text().splitlines():
            for n in needles:
                if n in line:
                    out.append(line.replace(n, "<<%d chars>>" % len(n)))
        return out[:20]

    # -- canaries ---------------------------------------------------------
    def _needles(self):
        """(what, value) of every marker and secret to look for."""
        out = [("personal value", v) for v in self.pii_values()]
        out += [("secret", v) for v in self.secret_values()]
        return out

    @staticmethod
    def _hits(needles, text, where):
        bad = []
        for what, v in needles:
            if v and v in text:
                i = text.index(v)
                ctx = text[max(0, i - 80):i + len(v) + 80].replace(v, "<<%s>>" % what)
                bad.append("%s: a %s: ...%s..." % (where, what, ctx.replace("\n", " ")))
        return bad

    def _unless_own(self, needles, text):
        """The needles to look for in a text: all of them, or, when the text
        is (or is logged as) a statement a test sent itself, the secrets
        only: personal values in the application's own statements are
        theirs (set-up, hostile rows), the secrets never are (the helpers
        set them in a file)."""
        stmt = self.cluster.own_statement(text)
        if stmt is None and text.strip() and any(text.strip() in s for s in self.cluster.sent):
            stmt = text
        if stmt is None:
            return needles
        return [(what, v) for what, v in needles if what != "personal value"]

    def _server_for_canaries(self):
        """A connection to the server for reading pg_stat_statements and
        pg_stat_activity, starting it again if a test stopped it (the
        statistics are kept across a clean shutdown); None if it cannot."""
        try:
            conn = self.cluster.connect(DB, retry_for=2)
        except Exception:
            try:
                self.cluster.start(timeout=30)
                conn = self.cluster.connect(DB, retry_for=10)
            except Exception as e:
                self.tap.diag("canary: the server could not be reached: %s" % e)
                return None
        return conn

    def check_canaries(self, label="canary"):
        """One check per place the personal-value markers and the secrets
        must never reach (see the module's docstring)."""
        t = self.tap
        conn = self._server_for_canaries()
        if conn is not None:
            try:
                self.sql1("SELECT 1")
            except Exception:
                try:
                    self.reconnect(retry_for=5)
                except Exception:
                    pass
        needles = self._needles()
        self.tap.diag("canary: %d personal markers/values, %d secrets"
                      % (len(self.pii_values()), len(self.secret_values())))

        reqs = self.sink.requests()
        bad = self._request_pii_problems(reqs) + self._request_secret_problems(reqs)
        t.ok(not bad, "%s: no personal value in any of %d captured requests (headers, body), "
             "each secret only in its own auth header" % (label, len(reqs)),
             lambda: "\n".join(bad[:20]))

        if conn is None:
            t.skip("%s: pg_stat_statements query texts hold no personal value or secret" % label,
                   "the server could not be started again")
            t.skip("%s: pg_stat_activity query texts hold no personal value or secret" % label,
                   "the server could not be started again")
        else:
            try:
                cur = conn.cursor()
                cur.execute("SELECT query FROM pg_stat_statements")
                rows = [r[0] or "" for r in cur.fetchall()]
                bad = []
                for q in rows:
                    bad += self._hits(self._unless_own(needles, q), q, "pg_stat_statements")
                t.ok(rows and not bad,
                     "%s: none of the %d pg_stat_statements query texts holds a personal "
                     "value or a secret" % (label, len(rows)),
                     lambda: "\n".join(bad[:20]) if rows else "pg_stat_statements is empty")
                cur.execute("SELECT backend_type, coalesce(query, '') FROM pg_stat_activity")
                rows = cur.fetchall()
                bad = []
                for bt, q in rows:
                    bad += self._hits(self._unless_own(needles, q), q,
                                      "pg_stat_activity (%s)" % bt)
                t.ok(not bad, "%s: none of the %d pg_stat_activity query texts (sampled at "
                     "close) holds a personal value or a secret" % (label, len(rows)),
                     lambda: "\n".join(bad[:20]))
            finally:
                conn.close()

        entries = self.cluster.log_entries()
        log = self.cluster.log_text()
        present = [n for n in needles if n[1] in log]   # look per entry only for these
        bad, own = [], 0
        for entry in (entries if present else []):
            hits = self._hits(present, entry, "server log")
            if hits and self.cluster.own_statement(entry) is not None:
                kept = self._hits(self._unless_own(present, entry), entry, "server log")
                own += len(kept) < len(hits)
                hits = kept
            bad += hits
        t.ok(entries and not bad, "%s: the whole server log (%d entries, log_statement = all, "
             "debug1) holds no secret, and no personal value but in the %d statements the "
             "tests sent themselves" % (label, len(entries), own),
             lambda: "\n".join(bad[:20]))

        bad = []
        for kind, msg in list(self.cluster.seen):
            bad += self._hits(needles, str(msg), "a client's %s" % kind)
        t.ok(not bad, "%s: none of the %d errors, notices and warnings clients saw holds "
             "a personal value or a secret" % (label, len(self.cluster.seen)),
             lambda: "\n".join(bad[:20]))

    # -- tear-down --------------------------------------------------------
    def close(self):
        """Stop everything and remove the cluster; on failure, show the
        log tail (and keep artifacts if TRACE_E2E_ARTIFACTS names a dir).
        In canary mode, first report the canary scan."""
        t = self.tap
        if self.canary and self.cluster.base:
            try:
                self.check_canaries()
            except Exception:
                t.fail("canary: the scan ran", traceback.format_exc())
        art = os.environ.get("TRACE_E2E_ARTIFACTS")
        if art:
            try:
                d = Path(art) / self.cluster.base.split("/")[-1]
                d.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.cluster.log_path, d / "server.log")
                self.sink.dump(str(d / "requests.json"))
                t.diag("artifacts in %s" % d)
            except Exception as e:
                t.diag("could not save artifacts: %s" % e)
        if t.failed and self.cluster.base:
            t.diag("server log tail:\n" + self.cluster.log_tail(60))
        try:
            if self.db is not None:
                self.db.close()
        except Exception:
            pass
        self.sink.stop()
        self.cluster.destroy()
