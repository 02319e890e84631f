#!/usr/bin/python3
"""Secrets stay out of the server log whatever language it speaks.

trace_ext's log filter recognises a logged statement, and PostgreSQL's
"parameter ... changed to ..." reload line, by the untranslated format
string PostgreSQL hands the hook (message_id), not by their English text.
For German, Russian and Japanese (lc_messages of the server and of the
session, PostgreSQL's own translations from Debian's .mo files), each
statement below names a secret parameter with a fresh value, and the
whole server log is then searched for the values:

- SET (refused: the parameter is reloadable), set_config() (refused),
  ALTER ROLE ... SET (refused), ALTER SYSTEM SET (accepted), logged by
  log_statement = all, and again by log_min_duration_statement = 0;
- the refused statements' error and STATEMENT lines;
- the reload after ALTER SYSTEM: the postmaster's "parameter ... changed
  to ..." line, and the "removed from configuration file" line of the
  RESET, in the server's language.

Each case also proves that the server spoke that language (the errors the
client saw are not English) and that the statements were logged (their
text replaced by the filter's placeholder, once per statement).

The locales are generated with locale-gen when missing (Debian's
`locales` package; test/run.sh installs it)."""

import os
import re
import secrets as pysecrets
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import TraceEnv  # noqa: E402

# (locale, the English error text that must not appear when it is active)
LOCALES = ("de_DE.UTF-8", "ru_RU.UTF-8", "ja_JP.UTF-8")
ENGLISH_ZERO = "division by zero"
PLACEHOLDER = "secret parameter of trace_ext, not logged"
RELOAD_LINE = 'parameter "trace.s3_secret_access_key" changed to "********"'


def available_locales():
    out = subprocess.run(["locale", "-a"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout.decode()
    return {ln.strip().lower().replace("utf-8", "utf8") for ln in out.splitlines()}


def ensure_locales(names):
    """Generate the locales that `locale -a` lacks; the names missing after."""
    def missing():
        have = available_locales()
        return [n for n in names if n.lower().replace("utf-8", "utf8") not in have]
    if missing() and os.path.exists("/etc/locale.gen"):
        text = open("/etc/locale.gen").read()
        with open("/etc/locale.gen", "a") as f:
            for n in missing():
                line = "%s UTF-8" % n
                if not re.search(r"^%s$" % re.escape(line), text, re.M):
                    f.write("\n%s\n" % line)
        subprocess.run(["locale-gen"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return missing()


t = Tap()
lacking = ensure_locales(LOCALES)
if lacking:
    t.fail("locales %s are available (apt-get install locales; locale-gen)" % lacking)
    sys.exit(t.done())

env = TraceEnv.start_or_exit(t, name="trace_e2e_locales")


def describe(e):
    return "%s %s" % (e.pgcode, (e.pgerror or "").strip())


def statements(vals):
    return [
        "SET trace.webhook_auth_token TO %s" % vals[0],
        "SELECT set_config('trace.s3_secret_access_key', '%s', false)" % vals[1],
        "ALTER ROLE postgres SET trace.myfxbook_webhook_token = '%s'" % vals[2],
        "ALTER SYSTEM SET trace.webhook_signing_secret = '%s'" % vals[3],
    ]


try:
    for loc in LOCALES:
        with t.case("lc_messages = %s" % loc):
            env.cluster.alter_system({"lc_messages": loc}, dbname="trades")
            since = env.cluster.log_size()
            conn = env.cluster.connect("trades")
            cur = conn.cursor()
            cur.execute("SET lc_messages = %s", (loc,))
            vals = ["lc%d%s" % (i, pysecrets.token_hex(8)) for i in range(10)]
            errors = []
            # log_statement = all, then log_min_duration_statement = 0.
            for phase, sets in ((0, ("SET log_statement = 'all'",)),
                                (4, ("SET log_statement = 'none'",
                                     "SET log_min_duration_statement = 0"))):
                for s in sets:
                    cur.execute(s)
                for q in statements(vals[phase:phase + 4]):
                    try:
                        cur.execute(q)
                    except psycopg2.Error as e:
                        errors.append(describe(e))
            cur.execute("RESET log_min_duration_statement")
            cur.execute("RESET log_statement")
            cur.execute("ALTER SYSTEM RESET trace.webhook_signing_secret")

            # The reload line, in the postmaster's language: a secret that
            # was unset gets a value by ALTER SYSTEM (this statement is not
            # logged), then loses it again.
            reload_val = vals[8]
            cur.execute("ALTER SYSTEM SET trace.s3_secret_access_key = '%s'" % reload_val)
            cur.execute("SELECT pg_reload_conf()")
            rebuilt = env.cluster.wait_for_log(re.escape(RELOAD_LINE), since, 10)
            cur.execute("ALTER SYSTEM RESET trace.s3_secret_access_key")
            cur.execute("SELECT pg_reload_conf()")
            wait_until(lambda: env.cluster.log_text(since).count(
                "trace.s3_secret_access_key") >= 4, 10)
            try:
                cur.execute("SELECT 1 / 0")
            except psycopg2.Error as e:
                language = describe(e)
            # Back to the server's own language (the postmaster's "received
            # SIGHUP" line is translated too: wait on the setting instead).
            cur.execute("ALTER SYSTEM RESET lc_messages")
            cur.execute("SELECT pg_reload_conf()")
            conn.close()
            wait_until(lambda: env.sql1("SHOW lc_messages") != loc, 10)
            log = env.cluster.log_text(since)

            t.ok(language.startswith("22012") and ENGLISH_ZERO not in language,
                 "%s: the server answered in that language: %s" % (loc, language))
            t.is_(len(errors), 6, "%s: SET, set_config and ALTER ROLE refused, twice" % loc,
                  "\n".join(errors))
            # log_statement logs all four statements; log_min_duration_statement
            # only the one that completes (ALTER SYSTEM): 5 at least.
            t.ok(log.count(PLACEHOLDER) >= 5,
                 "%s: the 5 logged statements (4 by log_statement, the one that "
                 "completes by log_min_duration_statement) have their text replaced (%d)"
                 % (loc, log.count(PLACEHOLDER)),
                 "\n".join(ln for ln in log.splitlines() if "trace." in ln)[-3000:])
            t.ok(rebuilt, "%s: the reload line names the parameter and hides the value: %s"
                 % (loc, RELOAD_LINE),
                 "\n".join(ln for ln in log.splitlines() if "s3_secret_access_key" in ln))
            leaked = [v for v in vals if v in log]
            t.ok(not leaked, "%s: no value in the server log (SET, set_config, ALTER ROLE, "
                 "ALTER SYSTEM; log_statement, log_min_duration_statement, errors, "
                 "STATEMENT lines, the reload)" % loc,
                 lambda: "\n".join(ln for ln in log.splitlines()
                                   if any(v in ln for v in leaked)))
            t.ok(not any(v in e for e in errors for v in vals),
                 "%s: nor in the errors the client saw" % loc)
            t.is_(env.sql1("SHOW trace.webhook_auth_token"), "********",
                  "%s: (the configuration file's token is back in force)" % loc)

    with t.case("deliveries still carry the configured tokens"):
        tid = env.new_trade(user_id=1, signal_id=11)
        env.close_trade(tid)
        rows = env.wait_status(tid, "webhook", "delivered", 15)
        t.is_(rows.get("webhook", {}).get("status"), "delivered", "a webhook delivery succeeds")
        req = env.wait_reqs(tid, "webhook", count=1, timeout=5)
        t.ok(req and req[0].header(env.auth_header) == env.tokens["webhook"],
             "with the token from postgresql.conf")
finally:
    env.close()
sys.exit(t.done())
