#!/usr/bin/python3
"""A new tracker is one new file in adapters/ plus one line in
adapters/registry.c (README, Architecture).

A copy of this tree gets a test-only adapter, "echo" (adapters/echo.c:
its parameter trace.echo_url with a check hook, a secret trace.echo_token
sent as X-Echo-Token), and the one registry line; the test first checks
that the copy differs from the tree by exactly that.  Built and installed
in a private copy of PostgreSQL (test/lib/private_pg.py; the system
installation is untouched), the library then knows the tracker everywhere
without another edit: trace._adapters() and the trace.metrics rows, the
check hooks and hints that list the adapters, the queue's CHECK rule, the
trigger, the secret's masking, the worker's delivery, the Prometheus
series."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from tap import Tap  # noqa: E402
from private_pg import PrivatePG, copy_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

ECHO_C = r'''/*
 * echo.c: a test-only tracker (test/e2e/23_new_adapter.t adds it to a copy
 * of the tree).  POSTs the payload to trace.echo_url, with trace.echo_token
 * in an X-Echo-Token header.
 */
#include "postgres.h"

#include <curl/curl.h>

#include "utils/guc.h"

#include "adapters/adapter.h"

static char *url = NULL;

static bool
check_url(char **newval, void **extra, GucSource source)
{
	return trace_check_url(newval, "trace.echo_url");
}

static void
echo_define_gucs(void)
{
	DefineCustomStringVariable("trace.echo_url",
							   gettext_noop("URL the echo adapter posts to."),
							   NULL, &url, "", PGC_SIGHUP, 0,
							   check_url, NULL, NULL);
	trace_define_secret("echo_token", gettext_noop("Token of the echo adapter."));
}

static TracePrep
echo_prepare(TraceItem *item, TraceRequest *req)
{
	const char *token = trace_secret("echo_token");

	if (!trace_target_url(url, "trace.echo_url", item))
		return TRACE_PREP_DONE;
	req->url = url;
	req->method = "POST";
	req->body = item->payload;
	req->body_len = strlen(item->payload);
	req->headers = trace_common_headers(item);
	if (token[0] != '\0' &&
		!trace_add_header(&req->headers, "X-Echo-Token", token, item,
						  "trace.echo_token"))
	{
		curl_slist_free_all(req->headers);
		req->headers = NULL;
		return TRACE_PREP_DONE;
	}
	return TRACE_PREP_SEND;
}

const TraceAdapter trace_echo_adapter = {
	.name = "echo",
	.define_gucs = echo_define_gucs,
	.prepare = echo_prepare,
};
'''

REGISTRY_LINE = "\tX(echo) \\\n"
ANCHOR = "\tX(file) \\\n"


def tree_with_echo(work):
    """A copy of the tree with the echo adapter added: the new file, and
    the one line inserted after the last adapter of the registry."""
    tree = copy_tree(REPO, os.path.join(work, "echo"))
    with open(os.path.join(tree, "adapters", "echo.c"), "w") as f:
        f.write(ECHO_C)
    reg = os.path.join(tree, "adapters", "registry.c")
    text = open(reg).read()
    if ANCHOR not in text:
        raise RuntimeError("adapters/registry.c has no line %r to add after" % ANCHOR)
    open(reg, "w").write(text.replace(ANCHOR, ANCHOR + REGISTRY_LINE, 1))
    return tree


def tree_diff(a, b):
    """{relative path: (lines only in a, lines only in b)} of files that differ."""
    out = {}
    names = set()
    for root in (a, b):
        for d, _, files in os.walk(root):
            for f in files:
                names.add(os.path.relpath(os.path.join(d, f), root))
    for n in sorted(names):
        pa, pb = os.path.join(a, n), os.path.join(b, n)
        la = open(pa, "rb").read().decode("utf-8", "replace").splitlines(True) \
            if os.path.exists(pa) else []
        lb = open(pb, "rb").read().decode("utf-8", "replace").splitlines(True) \
            if os.path.exists(pb) else []
        if la != lb:
            gone = [x for x in la if x not in lb]
            new = [x for x in lb if x not in la]
            out[n] = (gone, new, os.path.exists(pa))
    return out


t = Tap()
pg = None
work = tempfile.mkdtemp(prefix="trace_new_adapter_", dir="/tmp")
try:
    base = copy_tree(REPO, os.path.join(work, "base"))
    tree = tree_with_echo(work)
    diff = tree_diff(base, tree)
    t.is_(sorted(diff), ["adapters/echo.c", "adapters/registry.c"],
          "the copy differs from the tree in adapters/echo.c and adapters/registry.c only")
    gone, new, _ = diff.get("adapters/registry.c", ([], [], True))
    t.is_((gone, new), ([], [REGISTRY_LINE]),
          "registry.c: one line added, none changed")
    t.ok("adapters/echo.c" in diff and not diff["adapters/echo.c"][2],
         "adapters/echo.c is a new file")
    pg = PrivatePG()
    pg.install(tree)
    t.ok(True, "the copy builds and installs with no other edit (Makefile, SQL, headers)")
except Exception as e:          # no build, no test: say why
    t.fail("a private PostgreSQL with the echo build installed", repr(e))
    if pg:
        pg.destroy()
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(t.done())

# cluster.py reads PG_BINDIR when it is imported.
os.environ["PG_BINDIR"] = pg.bindir
import psycopg2  # noqa: E402
from trace_e2e import TraceEnv, as_json_literals  # noqa: E402

env = TraceEnv.start_or_exit(t, name="trace_e2e_new_adapter",
                             on_failure=lambda: (pg.destroy(),
                                                 shutil.rmtree(work, ignore_errors=True)))
TOKEN = "echotok-7d0c1f9a52e4"
env.add_secret(TOKEN, adapter="echo", header="X-Echo-Token")


def refused(stmt):
    """The error text of a statement that must fail (None if it ran)."""
    try:
        env.sql(stmt)
        return None
    except psycopg2.Error as e:
        return e.pgerror


try:
    with t.case("SQL reads the list from the library"):
        t.is_(env.sql1("SELECT trace._adapters()"), ["myfxbook", "webhook", "file", "echo"],
              "trace._adapters() lists echo last, in registry order")
        t.is_([r[0] for r in env.sql("SELECT adapter FROM trace.metrics")],
              ["myfxbook", "webhook", "file", "echo"],
              "trace.metrics has a row for echo")

    with t.case("its parameters, defined by the adapter"):
        t.is_(env.sql1("SELECT setting FROM pg_settings WHERE name = 'trace.echo_url'"), "",
              "trace.echo_url exists, empty by default")
        err = refused("ALTER SYSTEM SET trace.echo_url = 'ftp://127.0.0.1/x'")
        t.ok(err is not None and "trace.echo_url must be an http:// or https:// URL" in err,
             "its check hook refuses a non-http URL, naming the parameter", err)
        err = refused("ALTER SYSTEM SET trace.enabled_adapters = 'echo,pigeon'")
        t.ok(err is not None and "the adapters are myfxbook, webhook, file and echo" in err,
             "trace.enabled_adapters' hint lists echo", err)
        env.cluster.set_conf({"trace.echo_token": TOKEN}, reload=False)
        env.set_gucs({"trace.echo_url": env.sink.url("/echo"),
                      "trace.enabled_adapters": "myfxbook,webhook,echo"})
        t.is_(env.sql1("SHOW trace.echo_token"), "********",
              "the secret trace.echo_token is masked")
        t.is_(env.sql1("SELECT setting FROM pg_settings WHERE name = 'trace.echo_token'"),
              "********", "... in pg_settings too")

    with t.case("queued by the trigger, delivered by the worker"):
        env.sql("UPDATE signals SET tracing_adapters = array_append(tracing_adapters, 'echo') "
                "WHERE signal_id = 11")
        tid = env.new_trade()
        env.close_trade(tid)
        # signal 11 lists webhook and now echo
        rows = env.wait_status(tid, ["webhook", "echo"], "delivered", 20)
        t.is_(sorted((a, r["status"]) for a, r in rows.items()),
              [("echo", "delivered"), ("webhook", "delivered")],
              "one row per tracker the signal lists, echo's delivered")
        reqs = env.wait_reqs(tid, "echo", path="/echo")
        t.is_(len(reqs), 1, "one request on echo's URL")
        if reqs:
            r = reqs[0]
            t.is_(r.header("Idempotency-Key"), "%d-echo" % tid,
                  "Idempotency-Key <trade_id>-echo (common.c knows the name)")
            t.is_(r.header("X-Echo-Token"), TOKEN, "the secret is sent as the adapter says")
            t.is_(as_json_literals(r.body.decode("utf-8")), env.trade_json(tid),
                  "the body is the allowlisted trade")

    with t.case("the rest of the surface"):
        t.is_(env.sql1("SELECT pushed_total FROM trace.metrics WHERE adapter = 'echo'"), 1,
              "trace.metrics counts echo's delivery")
        prom = env.sql1("SELECT trace.prometheus_metrics()")
        t.ok('trust_traces_pushed_total{adapter="echo"} 1' in prom,
             "trace.prometheus_metrics() has echo's series", prom[:2000])
        err = refused("SELECT trace.enqueue(%d, '{pigeon}')" % tid)
        t.ok(err is not None and "The adapters are myfxbook, webhook, file and echo." in err,
             "trace.enqueue's hint lists echo", err)
        err = refused("INSERT INTO trace.trace_queue (trade_id, adapter, trade_table) "
                      "VALUES (%d, 'pigeon', 'trades')" % tid)
        t.ok(err is not None and "trace_queue_values_check" in err,
             "the queue's CHECK rule refuses an unknown adapter", err)
        t.is_(env.sql1("SELECT trace.enqueue(%d, '{echo}')" % env.new_trade()), 1,
              "... and accepts echo")
        env.check_log_clean("server log: no error, no secret")
finally:
    env.close()
    pg.destroy()
    shutil.rmtree(work, ignore_errors=True)

sys.exit(t.done())
