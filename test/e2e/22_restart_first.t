#!/usr/bin/python3
"""Restart first: ALTER EXTENSION UPDATE before the restart fails and
changes nothing (README, Upgrading).

In a private copy of PostgreSQL (test/lib/private_pg.py; the system
installation is untouched), a cluster preloads this tree's trace_ext and
delivers.  Then a newer build is installed under it without a restart: the
same tree plus a version 1.3 -> 1.3.99 whose update script adds a column
to the queue and a C function only the new library has.  The server still
runs the library it preloaded, so:
- ALTER EXTENSION trace_ext UPDATE fails, and changes nothing: the version,
  the queue's columns and the functions are as before;
- the worker goes on delivering meanwhile;
- after the restart, the same ALTER EXTENSION UPDATE succeeds, and the
  worker delivers under the new version."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap  # noqa: E402
from private_pg import PrivatePG, copy_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NEW = "1.3.99"

t = Tap()
pg = None
work = tempfile.mkdtemp(prefix="trace_restart_first_", dir="/tmp")
try:
    pg = PrivatePG()
    old_tree = copy_tree(REPO, os.path.join(work, "old"))
    pg.install(old_tree)
    old_version = [ln.split("'")[1] for ln in open(os.path.join(old_tree, "trace_ext.control"))
                   if ln.startswith("default_version")][0]
except Exception as e:          # no private copy, no test: say why
    t.fail("a private PostgreSQL with this tree's build installed", repr(e))
    sys.exit(t.done())

# cluster.py reads PG_BINDIR when it is imported.
os.environ["PG_BINDIR"] = pg.bindir
from trace_e2e import TraceEnv  # noqa: E402


def newer_tree():
    """This tree plus a version NEW that needs a C function 1.3 lacks."""
    tree = copy_tree(REPO, os.path.join(work, "new"))
    with open(os.path.join(tree, "trace_ext.c"), "a") as f:
        f.write('''
/* (test/e2e/22_restart_first.t: a function only the newer build has) */
PG_FUNCTION_INFO_V1(trace_restart_probe);

Datum
trace_restart_probe(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(true);
}
''')
    with open(os.path.join(tree, "trace_ext--%s--%s.sql" % (old_version, NEW)), "w") as f:
        f.write('''\\echo Use "ALTER EXTENSION trace_ext UPDATE" to load this file. \\quit
ALTER TABLE trace.trace_queue ADD COLUMN restart_probe integer;
CREATE FUNCTION trace._restart_probe() RETURNS boolean
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_restart_probe';
REVOKE ALL ON FUNCTION trace._restart_probe() FROM PUBLIC;
''')
    ctl = os.path.join(tree, "trace_ext.control")
    text = open(ctl).read().replace("default_version = '%s'" % old_version,
                                    "default_version = '%s'" % NEW)
    open(ctl, "w").write(text)
    return tree


env = TraceEnv.start_or_exit(t, name="trace_e2e_restart_first")


def shape():
    return (env.sql1("SELECT extversion FROM pg_extension WHERE extname = 'trace_ext'"),
            env.sql1("SELECT count(*) FROM pg_attribute WHERE attrelid = "
                     "'trace.trace_queue'::regclass AND attnum > 0 AND NOT attisdropped"),
            env.sql1("SELECT count(*) FROM pg_proc WHERE pronamespace = 'trace'::regnamespace"))


def delivers(label):
    tid = env.new_trade(user_id=1, signal_id=11)
    env.close_trade(tid)
    rows = env.wait_status(tid, "webhook", "delivered", 15)
    t.is_(rows.get("webhook", {}).get("status"), "delivered", label)


try:
    with t.case("before: this tree's build, installed and delivering"):
        before = shape()
        t.is_(before[0], old_version, "version %s installed" % old_version)
        delivers("a close is delivered")

    with t.case("a newer build installed under the running server, no restart"):
        pg.install(newer_tree())
        available = env.sql1("SELECT default_version FROM pg_available_extensions "
                             "WHERE name = 'trace_ext'")
        t.is_(available, NEW, "the server sees version %s on disk" % NEW)
        env.sql("SET client_min_messages = error")
        try:
            env.sql("ALTER EXTENSION trace_ext UPDATE")
            error = None
        except Exception as e:
            error = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        env.sql("RESET client_min_messages")
        t.ok(error is not None, "ALTER EXTENSION trace_ext UPDATE fails before the restart",
             "error: %s" % error)
        t.diag("the error: %s" % error)
        t.is_(shape(), before, "... and changes nothing: version, queue columns and functions "
              "as before")
        delivers("the worker goes on delivering meanwhile")

    with t.case("after the restart the same update succeeds"):
        env.cluster.restart()
        env.reconnect(retry_for=30)
        env.sql("SET client_min_messages = error")
        env.sql("ALTER EXTENSION trace_ext UPDATE")
        env.sql("RESET client_min_messages")
        after = shape()
        t.is_(after[0], NEW, "version %s installed" % NEW)
        t.ok(after[1] == before[1] + 1 and after[2] == before[2] + 1,
             "with its new column and function", repr((before, after)))
        t.is_(env.sql1("SELECT trace._restart_probe()"), True,
              "the new C function answers")
        delivers("and the worker delivers under the new version")
finally:
    env.close()
    if pg is not None:
        pg.destroy()
    shutil.rmtree(work, ignore_errors=True)
sys.exit(t.done())
