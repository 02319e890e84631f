#!/usr/bin/python3
"""Security, end to end: where secrets come from and what cannot steer the
extension.

- trace.secrets_file: the tokens of a 0600 file owned by the server's OS
  user win over the GUCs; rotating the file and reloading makes the next
  request carry the new token and no request the old one again; a file
  with looser permissions (0640, 0644), owned by another user, a symlink to
  another user's file, a directory, a missing file or a relative path is
  refused with an error naming trace.secrets_file and never its content;
  a file loosened while in use stops being used; a malformed line is
  reported without its content; a pg_monitor member cannot read the file.
- Hostile objects: trojan functions, operators and aggregates (with the
  exact signatures of what the extension's SQL uses) in a schema ahead of
  pg_catalog, trojans and tables in pg_temp, a pre-existing schema trace
  and a pre-existing table named like the queue: CREATE EXTENSION and
  ALTER EXTENSION UPDATE call none of them; a database owner who is not a
  superuser puts trojans in the delivery worker's search_path (ALTER
  DATABASE ... SET search_path): the worker, a superuser, must call none.
- Every trace_ext--*.sql script (install and update) keeps the rules that
  make that true, checked on the text so that a future update script that
  forgets them fails here.
- The canary scan itself (TRACE_E2E_CANARY) finds a marker where one is.

Each trojan records its call in trojan.calls (who called it, whether a
superuser) and raises a WARNING "TROJAN CALLED", so a call is seen even
when the calling transaction rolls back.
"""

import glob
import os
import pwd
import re
import secrets as pysecrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from cluster import OS_USER, describe_error  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DB, REPO, TraceEnv, fixture_path  # noqa: E402

t = Tap()


# -- trojans ---------------------------------------------------------------
# (operator, left type, right type, result type)
TROJAN_OPERATORS = [
    ("=", "text", "text", "boolean"), ("=", "bigint", "bigint", "boolean"),
    ("=", "integer", "integer", "boolean"), ("=", "oid", "oid", "boolean"),
    ("=", "name", "name", "boolean"), ("=", '"char"', '"char"', "boolean"),
    ("<>", "text", "text", "boolean"), ("<>", "integer", "integer", "boolean"),
    ("<", "timestamptz", "timestamptz", "boolean"),
    ("<=", "timestamptz", "timestamptz", "boolean"),
    (">", "timestamptz", "timestamptz", "boolean"),
    ("+", "timestamptz", "interval", "timestamptz"),
    ("-", "timestamptz", "interval", "timestamptz"),
    ("+", "integer", "integer", "integer"), ("-", "integer", "integer", "integer"),
    ("||", "text", "text", "text"),
]
# (signature, result, body expression calling the real one)
TROJAN_FUNCTIONS = [
    ("now()", "timestamptz", "pg_catalog.now()"),
    ("pg_backend_pid()", "integer", "pg_catalog.pg_backend_pid()"),
    ("make_interval(years int DEFAULT 0, months int DEFAULT 0, weeks int DEFAULT 0, "
     "days int DEFAULT 0, hours int DEFAULT 0, mins int DEFAULT 0, "
     "secs double precision DEFAULT 0.0)", "interval",
     "pg_catalog.make_interval(years, months, weeks, days, hours, mins, secs)"),
    ("pg_notify(a text, b text)", "void", "pg_catalog.pg_notify(a, b)"),
    ("lower(a text)", "text", "pg_catalog.lower(a)"),
    ("quote_ident(a text)", "text", "pg_catalog.quote_ident(a)"),
    ("format(a text)", "text", "pg_catalog.format(a)"),
    ("format(a text, b regclass)", "text", "pg_catalog.format(a, b)"),
    ("to_regclass(a text)", "regclass", "pg_catalog.to_regclass(a)"),
    ("current_setting(a text)", "text", "pg_catalog.current_setting(a)"),
    ("current_setting(a text, b boolean)", "text", "pg_catalog.current_setting(a, b)"),
    ("set_config(a text, b text, c boolean)", "text", "pg_catalog.set_config(a, b, c)"),
    ("current_database()", "name", "pg_catalog.current_database()"),
    ("pg_extension_config_dump(a regclass, b text)", "void",
     "pg_catalog.pg_extension_config_dump(a, b)"),
    ("jsonb_build_object(a text, b text)", "jsonb", "pg_catalog.jsonb_build_object(a, b)"),
    ("json_build_object(a text, b bigint)", "json", "pg_catalog.json_build_object(a, b)"),
    ("row_to_json(a record)", "json", "pg_catalog.row_to_json(a)"),
]


def trojan_sql(schema="trojan"):
    """Plant the trojans in `schema` (created here); every one logs its
    call and then does what the real one does."""
    s = schema
    out = ["""
CREATE SCHEMA {s};
CREATE TABLE {s}.calls (what text, by_user name, superuser boolean,
                        backend_type text, at timestamptz DEFAULT pg_catalog.clock_timestamp());
GRANT USAGE ON SCHEMA {s} TO PUBLIC;
GRANT INSERT, SELECT ON {s}.calls TO PUBLIC;
CREATE FUNCTION {s}.called(what text) RETURNS void LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $t$
BEGIN
    INSERT INTO {s}.calls (what, by_user, superuser, backend_type)
    SELECT what, current_user, r.rolsuper,
           (SELECT a.backend_type FROM pg_stat_activity a WHERE a.pid = pg_backend_pid())
      FROM pg_roles r WHERE r.rolname = current_user;
    RAISE WARNING 'TROJAN CALLED: %', what;
END $t$;
""".format(s=s)]
    for i, (op, lt, rt, res) in enumerate(TROJAN_OPERATORS):
        out.append("""
CREATE FUNCTION {s}.op{i}(a {lt}, b {rt}) RETURNS {res} LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $t$
BEGIN PERFORM {s}.called('operator {op}({lt},{rt})'); RETURN a OPERATOR(pg_catalog.{op}) b; END $t$;
CREATE OPERATOR {s}.{op} (LEFTARG = {lt}, RIGHTARG = {rt}, FUNCTION = {s}.op{i});
""".format(s=s, i=i, op=op, lt=lt, rt=rt, res=res))
    for sig, res, call in TROJAN_FUNCTIONS:
        name = sig.split("(")[0]
        body = ("PERFORM {call}; RETURN;" if res == "void" else "RETURN {call};").format(call=call)
        out.append("""
CREATE FUNCTION {s}.{sig} RETURNS {res} LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $t$
BEGIN PERFORM {s}.called('{name}()'); {body} END $t$;
""".format(s=s, sig=sig, res=res, name=name, body=body))
    out.append("""
CREATE FUNCTION {s}.unnest(a anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $t$
BEGIN PERFORM {s}.called('unnest(anyarray)'); RETURN QUERY SELECT pg_catalog.unnest(a); END $t$;
CREATE FUNCTION {s}.min_sf(a timestamptz, b timestamptz) RETURNS timestamptz LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $t$
BEGIN
    PERFORM {s}.called('min(timestamptz)');
    IF a IS NULL OR (b IS NOT NULL AND b OPERATOR(pg_catalog.<) a) THEN RETURN b; END IF;
    RETURN a;
END $t$;
CREATE AGGREGATE {s}.min(timestamptz) (SFUNC = {s}.min_sf, STYPE = timestamptz);
CREATE FUNCTION {s}.count_sf(n bigint) RETURNS bigint LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $t$
BEGIN PERFORM {s}.called('count(*)'); RETURN n OPERATOR(pg_catalog.+) 1; END $t$;
CREATE AGGREGATE {s}.count(*) (SFUNC = {s}.count_sf, STYPE = bigint, INITCOND = '0');
CREATE FUNCTION {s}.array_agg_sf(a text[], b text) RETURNS text[] LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $t$
BEGIN PERFORM {s}.called('array_agg(text)'); RETURN pg_catalog.array_append(a, b); END $t$;
CREATE AGGREGATE {s}.array_agg(text) (SFUNC = {s}.array_agg_sf, STYPE = text[]);
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO PUBLIC;
""".format(s=s))
    return "\n".join(out)


def run(conn, sql):
    cur = conn.cursor()
    cur.execute(sql)
    return cur.fetchall() if cur.description else []


def trojan_calls(conn, schema="trojan"):
    """What the trojans recorded, read with a safe search_path (a plain
    ORDER BY would itself call a trojan <)."""
    path = run(conn, "SELECT pg_catalog.current_setting('search_path')")[0][0]
    run(conn, "SET search_path = pg_catalog, pg_temp")
    try:
        return run(conn, "SELECT what, by_user, superuser, backend_type FROM %s.calls "
                         "ORDER BY at" % schema)
    finally:
        conn.cursor().execute("SELECT pg_catalog.set_config('search_path', %s, false)", (path,))


TROJAN_PATH = "trojan, pg_catalog, public"
TRIGGER_ON = """SELECT n.nspname::text, c.relname::text FROM pg_trigger g
                  JOIN pg_class c ON c.oid = g.tgrelid
                  JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE g.tgname = 'trace_ext_enqueue'"""


def as_trojan_path(conn, sql, args=None):
    """Run one statement with the trojans ahead in search_path; the test's
    own statements run with pg_catalog first, so that any call comes from
    the extension."""
    cur = conn.cursor()
    cur.execute("SET search_path = " + TROJAN_PATH)
    try:
        cur.execute(sql, args)
    finally:
        conn.cursor().execute("SET search_path = pg_catalog, public")


def split_statements(text):
    """Split SQL into statements, respecting quotes, dollar quotes and
    comments (enough for extension scripts)."""
    out, cur, i, n = [], [], 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if ch == "'":
            j = i + 1
            while j < n:
                if text[j] == "'" and text.startswith("''", j):
                    j += 2
                    continue
                if text[j] == "'":
                    break
                j += 1
            cur.append(text[i:j + 1])
            i = j + 1
            continue
        m = re.match(r"\$[A-Za-z_]*\$", text[i:]) if ch == "$" else None
        if m:
            tag = m.group(0)
            j = text.find(tag, i + len(tag))
            j = n if j < 0 else j + len(tag)
            cur.append(text[i:j])
            i = j
            continue
        if ch == ";":
            out.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return [s for s in out if s]


# C functions that pin name resolution in C instead of a SET clause: the
# trigger function pushes an override search path of pg_catalog alone
# around its one statement (src/trigger.c, catalog_only), since 1.1.
PINNED_IN_C = {"trace._on_trade_close"}


def script_problems(name, text, created_before):
    """What breaks the extension-script rules in one trace_ext--*.sql:
    the \\echo guard; functions created in schema trace; SQL, plpgsql and
    SECURITY DEFINER functions pinning search_path = pg_catalog, pg_temp;
    every new function revoked from PUBLIC; no IF NOT EXISTS; no OR
    REPLACE of a function no earlier script created; tables, views,
    indexes and triggers schema-qualified; no bare SET search_path.
    created_before: functions earlier scripts created (updated here)."""
    # psql meta-commands (the \echo guard) are not SQL
    stmts = split_statements(re.sub(r"^\\.*$", "", text, flags=re.M))
    is_update = name.count("--") == 2
    problems = []
    if not re.search(r"^\\echo .*\\quit\s*$", text, re.M):
        problems.append("no \\echo ... \\quit guard")
    revoked_all = [i for i, s in enumerate(stmts) if re.search(
        r"REVOKE\s+ALL\s+ON\s+ALL\s+FUNCTIONS\s+IN\s+SCHEMA\s+trace\s+FROM\s+PUBLIC",
        s, re.I)]
    for i, s in enumerate(stmts):
        st = s.strip()
        # (function bodies aside: plpgsql's IF NOT EXISTS (...) is fine)
        if re.search(r"\bIF\s+NOT\s+EXISTS\b",
                     re.sub(r"\$(\w*)\$.*?\$\1\$", "$$", st, flags=re.S), re.I):
            problems.append("IF NOT EXISTS (an existing object would be adopted): "
                            + st[:80])
        m = re.match(r"CREATE\s+(OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE)\s+([\w.\"]+)",
                     st, re.I)
        if m:
            fname = m.group(3)
            if not fname.startswith("trace."):
                problems.append("%s %s is not created in schema trace"
                                % (m.group(2), fname))
            if m.group(1) and (fname not in created_before or not is_update):
                problems.append("CREATE OR REPLACE of %s, which no earlier script "
                                "created" % fname)
            lang = re.search(r"LANGUAGE\s+(\w+)", st, re.I)
            lang = lang.group(1).lower() if lang else "?"
            secdef = re.search(r"SECURITY\s+DEFINER", st, re.I)
            pinned = re.search(r"SET\s+search_path\s*(=|TO)\s*pg_catalog\s*,\s*pg_temp\b",
                               st, re.I)
            if (lang in ("sql", "plpgsql") or secdef) and not pinned \
                    and not (lang == "c" and fname.split("(")[0] in PINNED_IN_C):
                problems.append("%s (LANGUAGE %s%s) does not SET search_path = "
                                "pg_catalog, pg_temp" % (fname, lang,
                                                         ", SECURITY DEFINER" if secdef else ""))
            base = fname.split("(")[0]
            revoked = any(j > i for j in revoked_all) or any(
                re.search(r"REVOKE\s+.*ON\s+FUNCTION\s+%s\s*\(.*FROM\s+PUBLIC"
                          % re.escape(base), s2, re.I | re.S)
                for s2 in stmts[i + 1:])
            if not revoked:
                problems.append("%s: no REVOKE ... FROM PUBLIC after it (a new "
                                "function is executable by PUBLIC)" % fname)
            created_before.add(fname)
        m = re.match(r"CREATE\s+(TABLE|VIEW|MATERIALIZED\s+VIEW|SEQUENCE|TYPE|DOMAIN)\s+"
                     r"([\w.\"]+)", st, re.I)
        if m and not m.group(2).startswith("trace."):
            problems.append("%s %s is not schema-qualified with trace."
                            % (m.group(1), m.group(2)))
        m = re.match(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+\w*\s*ON\s+([\w.\"]+)", st, re.I) \
            or re.match(r"CREATE\s+TRIGGER\s+\w+\s+.*?\bON\s+([\w.\"]+)", st, re.I | re.S)
        if m and not m.group(1).startswith("trace."):
            problems.append("index/trigger on %s: not schema-qualified" % m.group(1))
        if re.match(r"SET\s+(LOCAL\s+)?search_path", st, re.I):
            problems.append("a bare SET search_path in the script: " + st[:80])
    return problems


# -- the secrets file -------------------------------------------------------
SERVER = pwd.getpwnam(OS_USER)


def chown_server(path):
    os.chown(path, SERVER.pw_uid, SERVER.pw_gid, follow_symlinks=False)


def write_secrets(path, values, mode=0o600, owner_server=True):
    """Write `name = value` lines the way an operator rotates a file:
    a new file renamed over the old one."""
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("# trace_ext secrets (test)\n")
        for k, v in values.items():
            f.write("%s = %s\n" % (k, v))
    os.chmod(tmp, mode)
    if owner_server:
        chown_server(tmp)
    os.rename(tmp, path)


env = TraceEnv.start_or_exit(t, name="trace_e2e_security",
                             gucs={"trace.max_retries": 5})
sdir = tempfile.mkdtemp(prefix="trace_e2e_secrets_", dir="/tmp")
chown_server(sdir)
os.chmod(sdir, 0o755)
good = os.path.join(sdir, "trace_ext.secrets")


def deliver(label, adapters=("myfxbook", "webhook")):
    """Close a trade of user 1 on signal 10 (myfxbook and webhook) and
    return {adapter: request} once both are delivered."""
    tid = env.new_trade(user_id=1, signal_id=10)
    env.close_trade(tid)
    rows = env.wait_status(tid, adapters, "delivered", 15)
    got = {a: env.reqs_for(tid, a) for a in adapters}
    t.ok(all(rows.get(a, {}).get("status") == "delivered" and len(got[a]) == 1
             for a in adapters),
         "%s: delivered to %s" % (label, " and ".join(adapters)), repr(rows))
    return tid, {a: (got[a][0] if got[a] else None) for a in adapters}


def auth_of(reqs):
    m, w = reqs.get("myfxbook"), reqs.get("webhook")
    return (m.header("Authorization") if m else None,
            w.header(env.auth_header) if w else None)


def refused(path, label, content_marker):
    """ALTER SYSTEM SET trace.secrets_file = path must fail naming the
    parameter and not showing the file's content."""
    since = env.cluster.log_size()
    try:
        env.sql("ALTER SYSTEM SET trace.secrets_file = %s", (path,))
        err = None
    except psycopg2.Error as e:
        err = describe_error(e)
    t.ok(err is not None and "trace.secrets_file" in err,
         "%s: refused, the error names trace.secrets_file" % label, err)
    t.ok(err is None or content_marker not in err,
         "%s: the error does not show the file's content" % label, err)
    t.ok(content_marker not in env.cluster.log_text(since),
         "%s: nor does the server log" % label)
    return err or ""


try:
    file_tokens = {}

    with t.case("trace.secrets_file: its tokens win over the GUCs"):
        file_tokens = {"myfxbook": "mfxfile-" + pysecrets.token_hex(12),
                       "webhook": "whfile-" + pysecrets.token_hex(12)}
        for k, v in file_tokens.items():
            env.tokens["%s.file1" % k] = v
        write_secrets(good, {"myfxbook_webhook_token": file_tokens["myfxbook"],
                             "webhook_auth_token": file_tokens["webhook"]})
        env.set_gucs({"trace.secrets_file": good})
        tid, reqs = deliver("file tokens")
        mfx, wh = auth_of(reqs)
        t.is_(mfx, "Bearer " + file_tokens["myfxbook"],
              "myfxbook: Authorization carries the file's myfxbook_webhook_token")
        t.is_(wh, file_tokens["webhook"],
              "webhook: %s carries the file's webhook_auth_token" % env.auth_header)
        t.is_(env.sql1("SHOW trace.webhook_auth_token"), "********",
              "the GUC still shows ******** (the file does not change what SHOW says)")

    with t.case("trace.secrets_file: rotation on SIGHUP"):
        old = dict(file_tokens)
        new = {"myfxbook": "mfxrot-" + pysecrets.token_hex(12),
               "webhook": "whrot-" + pysecrets.token_hex(12)}
        for k, v in new.items():
            env.tokens["%s.file2" % k] = v
        seq_before = len(env.sink.requests())
        write_secrets(good, {"myfxbook_webhook_token": new["myfxbook"],
                             "webhook_auth_token": new["webhook"]})
        env.set_gucs({})        # a reload, nothing else changed
        tid, reqs = deliver("after rotation")
        mfx, wh = auth_of(reqs)
        t.is_(mfx, "Bearer " + new["myfxbook"], "the next myfxbook request carries the new token")
        t.is_(wh, new["webhook"], "the next webhook request carries the new token")
        tid2, _ = deliver("again after rotation")
        later = env.sink.requests()[seq_before:]
        stale = [r.seq for r in later if any(old[a].encode() in r.raw() for a in old)]
        t.ok(later and not stale, "no request after the rotation carries an old token "
             "(%d requests)" % len(later), "requests with an old token: %r" % stale)
        file_tokens = new

    with t.case("trace.secrets_file: a file loosened while in use stops being used"):
        since = env.cluster.log_size()
        os.chmod(good, 0o644)
        env.cluster.reload()
        m = env.cluster.wait_for_log(r"trace\.secrets_file[^\n]*(group or others|0600)",
                                     since=since, timeout=10)
        t.ok(m is not None, "the server logs a refusal naming trace.secrets_file",
             lambda: env.cluster.log_text(since)[-2000:])
        time.sleep(0.3)
        tid, reqs = deliver("loosened file")
        mfx, wh = auth_of(reqs)
        t.ok(mfx is not None and file_tokens["myfxbook"] not in mfx
             and wh is not None and file_tokens["webhook"] not in wh,
             "the loosened file's tokens are no longer sent",
             "Authorization %r, %s %r" % (mfx, env.auth_header, wh))
        t.ok(file_tokens["webhook"] not in env.cluster.log_text(since),
             "the log does not show the loosened file's content")
        os.chmod(good, 0o600)
        env.set_gucs({"trace.secrets_file": ""})

    with t.case("trace.secrets_file: looser or foreign files are refused at ALTER SYSTEM"):
        marker = "FILECONTENT" + pysecrets.token_hex(8)
        env.add_secret(marker)
        body = {"webhook_auth_token": marker}
        cases = []
        for mode in (0o640, 0o644, 0o604, 0o660):
            p = os.path.join(sdir, "mode%o.secrets" % mode)
            write_secrets(p, body, mode=mode)
            cases.append((p, "mode %04o" % mode, "group or others"))
        p = os.path.join(sdir, "root.secrets")
        write_secrets(p, body, owner_server=False)      # root, 0600
        cases.append((p, "owned by root (mode 0600)", "not owned"))
        p = os.path.join(sdir, "nobody.secrets")
        write_secrets(p, body, owner_server=False)
        nobody = pwd.getpwnam("nobody")
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
        cases.append((p, "owned by nobody (mode 0600)", "not owned"))
        link = os.path.join(sdir, "link.secrets")
        os.symlink(os.path.join(sdir, "root.secrets"), link)
        os.lchown(link, SERVER.pw_uid, SERVER.pw_gid)
        cases.append((link, "a symlink (owned by the server user) to root's file", "not owned"))
        d = os.path.join(sdir, "adir")
        os.mkdir(d, 0o700)
        chown_server(d)
        cases.append((d, "a directory", "not a regular file"))
        cases.append((os.path.join(sdir, "missing.secrets"), "a missing file", "cannot be read"))
        cases.append(("relative/trace.secrets", "a relative path", "absolute"))
        for path, label, why in cases:
            err = refused(path, label, marker)
            t.ok(why in err, "%s: the error says why (%r)" % (label, why), err)
        t.is_(env.sql1("SELECT setting FROM pg_settings WHERE name = 'trace.secrets_file'"), "",
              "trace.secrets_file is still unset after the refusals")
        ok_link = os.path.join(sdir, "ok_link.secrets")
        os.symlink(good, ok_link)
        os.lchown(ok_link, SERVER.pw_uid, SERVER.pw_gid)
        try:
            env.sql("ALTER SYSTEM SET trace.secrets_file = %s", (ok_link,))
            err = None
        except psycopg2.Error as e:
            err = describe_error(e)
        t.ok(err is None, "(a symlink to the server user's own 0600 file is accepted: "
             "the refusals are about the file, not the path)", err)
        env.sql("ALTER SYSTEM RESET trace.secrets_file")

    with t.case("trace.secrets_file: a malformed line is reported without its content"):
        marker2 = "LINECONTENT" + pysecrets.token_hex(8)
        env.add_secret(marker2)
        bad = os.path.join(sdir, "malformed.secrets")
        with open(bad, "w") as f:
            f.write("%s\n" % marker2)                           # no '='
            f.write("%s==\n" % marker2)                         # base64-looking, no name
            f.write("webhook_auth_tokn = %s\n" % marker2)       # misspelt name
            f.write("webhook_auth_token = %s\n" % file_tokens["webhook"])
        os.chmod(bad, 0o600)
        chown_server(bad)
        since = env.cluster.log_size()
        env.set_gucs({"trace.secrets_file": bad})
        tid, reqs = deliver("malformed file")
        m = env.cluster.wait_for_log(r"secrets_file[^\n]*line 3", since=since, timeout=5)
        t.ok(m is not None, "the misspelt name's line is reported (line 3)",
             lambda: env.cluster.log_text(since)[-1500:])
        t.ok(marker2 not in env.cluster.log_text(since),
             "no part of a malformed line's value appears in the log",
             lambda: "\n".join(ln for ln in env.cluster.log_text(since).splitlines()
                               if marker2 in ln)[:1500])
        _, wh = auth_of(reqs)
        t.is_(wh, file_tokens["webhook"], "the well-formed line is still used")
        env.set_gucs({"trace.secrets_file": ""})

    with t.case("a pg_monitor member cannot read the secrets file or the configuration"):
        env.sql("CREATE ROLE trace_e2e_monitor LOGIN IN ROLE pg_monitor")
        mon = env.cluster.connect(DB, user="trace_e2e_monitor")
        try:
            for label, q in (("pg_read_file(<secrets file>)", "SELECT pg_read_file(%s)"),
                             ("pg_read_binary_file(<secrets file>)",
                              "SELECT pg_read_binary_file(%s)"),
                             ("pg_stat_file(<secrets file>)", "SELECT pg_stat_file(%s)")):
                try:
                    run_args = mon.cursor()
                    run_args.execute(q, (good,))
                    err = None
                except psycopg2.Error as e:
                    err = e.pgcode
                t.is_(err, "42501", "pg_monitor: %s is refused" % label)
            try:
                mon.cursor().execute("SELECT pg_read_file('postgresql.auto.conf')")
                err = None
            except psycopg2.Error as e:
                err = e.pgcode
            t.is_(err, "42501", "pg_monitor: pg_read_file('postgresql.auto.conf') is refused")
            cur = mon.cursor()
            cur.execute("SELECT row_to_json(s)::text FROM pg_settings s "
                        "WHERE name LIKE 'trace.%%'")
            leaks = [r[0] for r in cur.fetchall()
                     if any(v in r[0] for v in env.secret_values())]
            t.ok(not leaks, "pg_monitor: no trace.* row of pg_settings holds a secret value",
                 repr(leaks))
        finally:
            mon.close()
            env.sql("DROP ROLE trace_e2e_monitor")

    with t.case("a statement naming a secret parameter is logged without its value"):
        # However the operator spells it; the redaction cannot know a value
        # that is not yet in effect, so it must go by the parameter's name.
        vals = ["stmtval%d-%s" % (i, pysecrets.token_hex(6)) for i in range(8)]
        tries = [
            "ALTER SYSTEM SET TRACE.Webhook_Auth_Token = '%s'" % vals[0],
            "ALTER SYSTEM SET trace.webhook_auth_token = $$%s$$" % vals[1],
            "ALTER SYSTEM SET trace.webhook_auth_token = $q$%s$q$" % vals[2],
            "ALTER SYSTEM SET trace.webhook_auth_token TO %s" % vals[3].replace("-", "_"),
            "ALTER SYSTEM SET \"trace.webhook_signing_secret\" = E'%s'" % vals[4],
            "ALTER ROLE postgres SET trace.myfxbook_webhook_token = '%s'" % vals[5],
            "SET trace.s3_secret_access_key = '%s'" % vals[6],
            "SELECT set_config('trace.s3_access_key_id', '%s', false)" % vals[7],
        ]
        vals[3] = vals[3].replace("-", "_")
        since = env.cluster.log_size()
        env.sql("SET log_statement = 'all'")
        errors = []
        for q in tries:
            try:
                env.sql(q)
            except psycopg2.Error as e:
                errors.append(describe_error(e))
        env.sql("RESET log_statement")
        for g in ("trace.webhook_auth_token", "trace.webhook_signing_secret"):
            env.sql("ALTER SYSTEM RESET %s" % g)
        log = env.cluster.log_text(since)
        t.ok(log.count("secret parameter of trace_ext, not logged") >= len(tries) - 3,
             "the statements are logged, their text replaced", log[-3000:])
        leaked = [v for v in vals if v in log]
        t.ok(not leaked, "no value appears in the log (mixed case, $$, $tag$, unquoted, "
             "quoted name, E'', refused ALTER ROLE, refused SET, set_config)",
             lambda: "\n".join(ln for ln in log.splitlines() if any(v in ln for v in leaked)))
        stmt_lines = [ln for ln in log.splitlines()
                      if "STATEMENT:" in ln and re.search(r"token|secret|key", ln, re.I)]
        t.ok(not stmt_lines, "no STATEMENT: line repeats a refused statement that names a "
             "secret parameter", "\n".join(stmt_lines))
        t.ok(errors and not any(v in e for e in errors for v in vals),
             "the errors the client saw (%d) do not show the values either" % len(errors),
             "\n".join(errors))
        if env.canary:
            pgss = [r[0] for r in env.sql("SELECT query FROM pg_stat_statements")]
            t.ok(any(vals[0] in q for q in pgss),
                 "(as README says: pg_stat_statements keeps an ALTER SYSTEM statement's text, "
                 "value included: secrets belong in a file, not in ALTER SYSTEM)")

    # -- hostile objects at CREATE EXTENSION / ALTER EXTENSION UPDATE -------
    with t.case("CREATE EXTENSION with trojans in search_path and pg_temp"):
        c = env.cluster
        c.create_database("hostile")
        c.psql(file=fixture_path(), dbname="hostile")
        c.psql(dbname="hostile", sql=trojan_sql())
        # What the install script's DO block takes as "the user's search
        # path" (reset_val) and the session's own: trojans first.
        c.psql(dbname="hostile", sql="ALTER ROLE postgres IN DATABASE hostile "
                                     "SET search_path = trojan, pg_catalog, public")
        h = c.connect("hostile")
        run(h, "SET search_path = pg_catalog, public")
        # A schema "trace" that someone else made, with a function the
        # extension will create: CREATE EXTENSION must not adopt it.
        run(h, "CREATE SCHEMA trace")
        run(h, """CREATE FUNCTION trace.attach(trades regclass DEFAULT 'trades')
                  RETURNS void LANGUAGE plpgsql AS
                  $$BEGIN PERFORM trojan.called('pre-existing trace.attach'); END$$""")
        try:
            as_trojan_path(h, "CREATE EXTENSION trace_ext")
            err = None
        except psycopg2.Error as e:
            err = describe_error(e)
        t.ok(err is not None and 'schema "trace" already exists' in err,
             "CREATE EXTENSION refuses a pre-existing schema trace", err)
        run(h, "DROP SCHEMA trace CASCADE")
        # Planted in the installing session's pg_temp: functions (never
        # searched for functions) and tables named like ours.
        run(h, """
            CREATE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE plpgsql AS
                $$BEGIN PERFORM trojan.called('pg_temp.now()'); RETURN pg_catalog.now(); END$$;
            CREATE FUNCTION pg_temp.format(a text, b regclass) RETURNS text LANGUAGE plpgsql AS
                $$BEGIN PERFORM trojan.called('pg_temp.format()'); RETURN pg_catalog.format(a, b); END$$;
            CREATE TEMP TABLE trace_queue (id bigint, trade_id bigint, adapter text);
            CREATE TABLE public.trace_queue (id bigint, trade_id bigint, adapter text);
            CREATE TABLE public.queue_summary (adapter text);
        """)
        versions = [r[0] for r in run(h, """
            SELECT version FROM pg_available_extension_versions
             WHERE name = 'trace_ext' ORDER BY string_to_array(version, '.')::int[]""")]
        default = run(h, "SELECT default_version FROM pg_available_extensions "
                         "WHERE name = 'trace_ext'")[0][0]
        first = versions[0]
        t.diag("available versions %s, default %s: installing %s, then updating"
               % (versions, default, first))
        del h.notices[:]
        as_trojan_path(h, "CREATE EXTENSION trace_ext VERSION %s", (first,))
        calls = trojan_calls(h)
        t.is_(calls, [], "CREATE EXTENSION trace_ext VERSION '%s' calls no trojan "
              "(search_path and pg_temp)" % first)
        as_trojan_path(h, "ALTER EXTENSION trace_ext UPDATE")
        calls = trojan_calls(h)
        t.is_(calls, [], "ALTER EXTENSION trace_ext UPDATE (%s -> %s) calls no trojan"
              % (first, default))
        as_trojan_path(h, "ALTER EXTENSION trace_ext UPDATE")
        t.ok(any("already installed" in n for n in h.notices),
             "ALTER EXTENSION trace_ext UPDATE at the current version is a no-op "
             "(\"already installed\")", "".join(h.notices))
        t.is_(trojan_calls(h), [], "... and calls no trojan either")
        t.ok(not any("TROJAN" in n for n in h.notices),
             "no trojan WARNING reached the installing session", "".join(h.notices))
        t.is_(run(h, """SELECT c.oid::regclass::text FROM pg_depend d JOIN pg_class c
                          ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
                         WHERE d.refobjid = (SELECT oid FROM pg_extension
                                              WHERE extname = 'trace_ext')
                           AND d.deptype = 'e' AND c.relname = 'trace_queue'"""),
              [("trace.trace_queue",)],
              "the extension's queue is trace.trace_queue, not a planted table")
        t.is_(run(h, "SELECT count(*) FROM public.trace_queue")[0][0]
              + run(h, "SELECT count(*) FROM pg_temp.trace_queue")[0][0], 0,
              "the planted tables named like the queue are untouched")
        t.is_(run(h, TRIGGER_ON), [("public", "trades")], "the trigger is on public.trades")
        # Close a trade with the trojans ahead in search_path.
        as_trojan_path(h, "UPDATE public.trades SET status = 'CLOSED', exit_price = 1.0912, "
                          "closed_at = pg_catalog.now(), pnl = 42.10, fees = 1.25 "
                          "WHERE trade_id OPERATOR(pg_catalog.=) 3")
        t.ok(run(h, "SELECT pg_catalog.count(*) FROM trace.trace_queue "
                    "WHERE trade_id OPERATOR(pg_catalog.=) 3")[0][0] > 0,
             "hostile database: closing a trade queues it")
        t.is_(trojan_calls(h), [], "hostile database: closing a trade calls no trojan")
        h.close()

    with t.case("CREATE EXTENSION: a trades table in the installer's pg_temp"):
        c.create_database("hostile2")
        c.psql(file=fixture_path(), dbname="hostile2")
        h = c.connect("hostile2")
        run(h, """CREATE TEMP TABLE trades (LIKE public.trades);
                  CREATE TEMP TABLE users (LIKE public.users);
                  CREATE TEMP TABLE signals (LIKE public.signals)""")
        h.cursor().execute("CREATE EXTENSION trace_ext")
        where = run(h, TRIGGER_ON)
        t.ok(where == [("public", "trades")],
             "the install attaches to public.trades, not to a trades table in the "
             "installing session's pg_temp", "trigger on: %r" % (where,))
        h.close()

    # -- the delivery worker and a database owner's search_path -------------
    with t.case("a database owner's trojans in the worker's search_path are never called"):
        env.sql("CREATE ROLE trace_e2e_owner LOGIN")
        env.sql("ALTER DATABASE %s OWNER TO trace_e2e_owner" % DB)
        own = env.cluster.connect(DB, user="trace_e2e_owner")
        run(own, trojan_sql())
        run(own, "ALTER DATABASE %s SET search_path = trojan, pg_catalog, public" % DB)
        old = env.worker_pid()
        env.sql("SELECT pg_terminate_backend(%s)", (old,))
        pid = wait_until(lambda: (lambda p: p if p and p != old else None)(env.worker_pid()), 20)
        t.ok(pid, "the worker restarted (it now starts with the owner's search_path)")
        # Only the worker connects while the setting is in place.
        run(own, "ALTER DATABASE %s RESET search_path" % DB)
        wpath = env.sql1("SELECT setting FROM pg_db_role_setting s, "
                         "unnest(s.setconfig) AS setting WHERE setting LIKE 'search_path%%' "
                         "AND s.setdatabase = (SELECT oid FROM pg_database "
                         "WHERE datname = current_database())")
        t.is_(wpath, None, "(the database-level setting is gone again: only the worker has it)")
        since = env.cluster.log_size()
        tid, reqs = deliver("worker with trojans in its search_path")
        env.sql("SELECT trace.cleanup()")
        time.sleep(0.5)
        calls = trojan_calls(own)
        log_calls = [ln for ln in env.cluster.log_text(since).splitlines()
                     if "TROJAN CALLED" in ln]
        t.ok(not calls and not log_calls,
             "the delivery worker (a superuser) calls no function or operator a "
             "database owner planted in its search_path",
             "%d calls, of: %s (as %s)\nlog: %s" % (
                 len(calls), ", ".join(sorted(set(c[0] for c in calls))),
                 ", ".join(sorted(set("%s/%s superuser=%s" % (c[3], c[1], c[2]) for c in calls))),
                 "\n".join(log_calls[:5])))
        escal = [c for c in calls if c[2]]
        t.ok(not escal, "no owner's code ran as a superuser in the worker", repr(escal[:5]))
        run(own, "DROP SCHEMA trojan CASCADE")
        own.close()
        env.sql("ALTER DATABASE %s OWNER TO postgres" % DB)
        old = env.worker_pid()
        env.sql("SELECT pg_terminate_backend(%s)", (old,))
        wait_until(lambda: (lambda p: p if p and p != old else None)(env.worker_pid()), 20)
        env.sql("DROP ROLE trace_e2e_owner")

    # -- the scripts' rules, on their text -----------------------------------
    with t.case("every trace_ext--*.sql keeps the extension-script rules"):
        scripts = sorted(glob.glob(str(REPO / "trace_ext--*.sql")))
        t.ok(scripts, "found the extension scripts", repr(scripts))
        created_before = set()
        for path in sorted(scripts, key=lambda p: [int(x) for x in re.findall(r"\d+", Path(p).name)]):
            name = Path(path).name
            problems = script_problems(name, open(path).read(), created_before)
            t.ok(not problems, "%s: guard; functions in schema trace, SQL/plpgsql and "
                 "SECURITY DEFINER ones pin search_path = pg_catalog, pg_temp; every new "
                 "function revoked from PUBLIC; no IF NOT EXISTS; no OR REPLACE of what an "
                 "earlier script did not create; objects schema-qualified" % name,
                 "\n".join(problems))

    with t.case("(the script check fails a script that breaks the rules)"):
        bad_script = """\\echo Use "ALTER EXTENSION trace_ext UPDATE" to load this file. \\quit
CREATE FUNCTION trace.f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;
CREATE OR REPLACE FUNCTION trace.g() RETURNS int LANGUAGE sql
    SET search_path = pg_catalog, pg_temp AS $$ SELECT 1 $$;
REVOKE ALL ON FUNCTION trace.g() FROM PUBLIC;
CREATE TABLE IF NOT EXISTS trace.t (x int);
CREATE TABLE unqualified (x int);
CREATE INDEX i ON unqualified (x);
SET search_path = public;
"""
        got = script_problems("trace_ext--9.0--9.1.sql", bad_script, {"trace.attach"})
        for want in ("trace.f (LANGUAGE plpgsql) does not SET search_path",
                     "trace.f: no REVOKE", "CREATE OR REPLACE of trace.g",
                     "IF NOT EXISTS", "TABLE unqualified is not schema-qualified",
                     "index/trigger on unqualified", "a bare SET search_path"):
            t.ok(any(want in g for g in got), "it reports: %s" % want, "\n".join(got))
        t.ok(script_problems("trace_ext--9.0.sql", "CREATE SCHEMA trace;\n", set())
             == ["no \\echo ... \\quit guard"], "it reports a missing \\echo guard")

    with t.case("the canary scan finds a marker where there is one"):
        marker = env.canaries["users.email"]
        needles = env._needles()
        t.ok(env._hits(needles, "LOG:  statement: SELECT '%s'" % marker, "x"),
             "a personal-value marker in a log line is found")
        t.ok(env._hits(needles, "Bearer %s" % env.tokens["webhook"], "x"),
             "a secret in a text is found")
        t.ok(not env._hits(needles, "LOG:  statement: SELECT 1", "x"),
             "(and a clean line is clean)")
        t.ok(all(v in str(env.pii_values()) for v in env.canaries.values()),
             "every personal column's marker is in the scanned set")
        # Compared here, not in SQL: a marker in a statement would be logged.
        k = env.canaries
        users = env.sql("SELECT email, name, client_id FROM users")
        t.ok(users and all(k["users.email"] in e and k["users.name"] in n
                           and k["users.client_id"] in c for e, n, c in users),
             "every user's email, name and client_id carry their column's marker")
        trades = env.sql("SELECT account_number, client_id, passport, iban FROM trades")
        t.ok(trades and all(k["trades.account_number"] in a and k["users.client_id"] in c
                            and k["trades.passport"] in p and k["trades.iban"] in i
                            for a, c, p, i in trades),
             "every trade's account_number, client_id, passport and iban carry a marker")

    with t.case("no personal data, secrets only where they belong"):
        env.check_no_pii("security")
finally:
    env.close()
    shutil.rmtree(sdir, ignore_errors=True)

sys.exit(t.done())
