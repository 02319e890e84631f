#!/usr/bin/python3
"""Every path to CLOSED, end to end: whichever way a trade becomes CLOSED,
the real worker posts it to the capture sink exactly once per (trade,
tracker), and its queue rows name the table trace.attach() was called on.

Paths, each with a real statement and the real worker:
- INSERT of a row already CLOSED (an OPEN one is not queued), COPY of
  CLOSED rows (psycopg2 copy_expert), INSERT ... ON CONFLICT DO UPDATE
  (its insert branch, its update branch, and an upsert of a row already
  CLOSED, which queues nothing more), MERGE (insert and update actions in
  one statement);
- close -> reopen -> close: one delivery, the row stays delivered;
- an opted-out user's CLOSED insert: nothing queued, nothing sent;
- a status enum with the label CLOSED is accepted and traced;
- partitioned trades tables, each in its own schema beside its own copies
  of users and signals: LIST by status (the hot/cold layout: the close
  moves the row, PostgreSQL runs it as DELETE + INSERT; a reopen moves it
  back; close again: still one delivery), RANGE by closed_at (a default
  partition holds the open trades), a partition attached with ALTER TABLE
  ... ATTACH PARTITION after trace.attach() (it gets the cloned triggers;
  closes moving into it, and a CLOSED row inserted into the partition
  itself, are queued against the root), HASH by trade_id (closes that stay
  in their partition);
- logical replication: a second cluster publishes trades (a plain table
  and one whose subscriber copy is the hot/cold layout) into this
  database.  Attached without replica, replicated closes arrive but are
  not queued or sent; after trace.attach(..., replica => true) (both
  triggers, and the partitions' clones, ENABLE ALWAYS) the next replicated
  close and CLOSED insert are sent exactly once, a partition move applied
  by the apply worker included; attaching again without replica turns it
  off.

And the shapes trace.attach() refuses (a view, a missing column, a
trade_id that is not an integer, a status that cannot hold 'CLOSED', no
users/signals beside the table, users without tracing_enabled, signals
without tracing_adapters, ...): the exact message, and no trigger left
behind.

At the end a sentinel trade is delivered, and every request the sink ever
received is tallied: each expected (trade, tracker) exactly once, nothing
else; and the worker's reconciliation sweep queued nothing (it would
otherwise hide a path the triggers miss): every queue row came from a
trigger.  Personal values are built on the server (e2e_canary, users), so the
canary scan of TRACE_E2E_CANARY=1 measures the extension, not the test."""

import io
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import psycopg2  # noqa: E402
from tap import Tap, wait_until  # noqa: E402
from trace_e2e import DB, Cluster, TraceEnv, as_json_literals, fixture_path  # noqa: E402

BOTH = ("myfxbook", "webhook")
ADAPTERS_OF = {10: BOTH, 11: ("webhook",)}     # enabled adapters each signal lists
TRIGGERS = ("trace_ext_enqueue", "trace_ext_enqueue_insert")
COLS = ("trade_id, user_id, signal_id, account_number, client_id, instrument, side, volume, "
        "entry_price, opened_at, passport, iban, status, exit_price, closed_at, pnl, fees")

t = Tap()
env = TraceEnv.start_or_exit(t, name="trace_e2e_paths")
pub = None                  # the publishing cluster of the replication case
EXPECTED = {}               # trade_id -> set of adapters it must reach (once each)
_next_id = [7_000_000]


# -- trades, built on the server -----------------------------------------
def new_ids(n):
    first = _next_id[0]
    _next_id[0] += n + 100
    return list(range(first, first + n))


def rows_sql(closed, status_type="text", closed_at="now()"):
    """A SELECT of complete trades rows (columns named as COLS), one per
    id of %(ids)s, for user %(u)s and signal %(s)s.  The personal values
    come from the server (users, e2e_canary): the statement has none."""
    if closed:
        tail = ("'CLOSED'::{st} AS status, 1.091200 AS exit_price, {ca} AS closed_at, "
                "42.10 AS pnl, 1.25 AS fees").format(st=status_type, ca=closed_at)
    else:
        tail = ("'OPEN'::{st} AS status, NULL::numeric AS exit_price, "
                "NULL::timestamptz AS closed_at, NULL::numeric AS pnl, "
                "NULL::numeric AS fees").format(st=status_type)
    return """
        SELECT g AS trade_id, u.user_id, %(s)s::bigint AS signal_id,
               k.account || g AS account_number, u.client_id,
               'EURUSD'::text AS instrument, 'buy'::text AS side, 2.5 AS volume,
               1.084250 AS entry_price,
               timestamptz '2026-01-05 08:00:00+00' + g * interval '1 second' AS opened_at,
               k.passport || g AS passport, k.iban || lpad(g::text, 8, '0') AS iban,
               {tail}
          FROM unnest(%(ids)s::bigint[]) AS g, public.users u, public.e2e_canary k
         WHERE u.user_id = %(u)s""".format(tail=tail)


def row_args(ids, user_id, signal_id):
    return {"ids": list(ids), "u": user_id, "s": signal_id}


def insert(table, ids, closed, user_id=1, signal_id=10, run_sql=None, **kw):
    (run_sql or env.sql)("INSERT INTO %s (%s) %s" % (table, COLS, rows_sql(closed, **kw)),
                         row_args(ids, user_id, signal_id))


def close(table, ids, closed_at="now()", run_sql=None):
    (run_sql or env.sql)(
        "UPDATE %s SET status = 'CLOSED', exit_price = 1.091200, closed_at = %s, "
        "pnl = 42.10, fees = 1.25 WHERE trade_id = ANY(%%s)" % (table, closed_at),
        (list(ids),))


def reopen(table, ids):
    env.sql("UPDATE %s SET status = 'OPEN', exit_price = NULL, closed_at = NULL, pnl = NULL, "
            "fees = NULL WHERE trade_id = ANY(%%s)" % table, (list(ids),))


def copy_rows(table, closed_ids, open_ids, signal_id=10):
    """COPY trades FROM STDIN (psycopg2 copy_expert): the CLOSED rows, then
    the OPEN ones.  The rows are made on the server (COPY ... TO STDOUT)
    and only pass through here: COPY data is never a statement, nor
    logged.  Returns (lines copied in, rows COPY reported)."""
    cur = env.db.cursor()
    data = io.StringIO()
    for ids, closed in ((closed_ids, True), (open_ids, False)):
        if not ids:
            continue
        q = cur.mogrify("COPY (%s) TO STDOUT" % rows_sql(closed),
                        row_args(ids, 1, signal_id)).decode()
        env.cluster.sent.append(q)
        cur.copy_expert(q, data)
    lines = data.getvalue().count("\n")
    data.seek(0)
    q = "COPY %s (%s) FROM STDIN" % (table, COLS)
    env.cluster.sent.append(q)
    cur.copy_expert(q, data)
    return lines, cur.rowcount


def merge(table, ids):
    """One MERGE: trades of `ids` that exist are closed (update action),
    the others are inserted CLOSED (insert action)."""
    env.sql("""
        MERGE INTO %s t
        USING (%s) s ON t.trade_id = s.trade_id
        WHEN MATCHED THEN UPDATE SET status = s.status, exit_price = s.exit_price,
                                     closed_at = s.closed_at, pnl = s.pnl, fees = s.fees
        WHEN NOT MATCHED THEN INSERT (%s)
             VALUES (s.trade_id, s.user_id, s.signal_id, s.account_number, s.client_id,
                     s.instrument, s.side, s.volume, s.entry_price, s.opened_at,
                     s.passport, s.iban, s.status, s.exit_price, s.closed_at, s.pnl,
                     s.fees)""" % (table, rows_sql(True), COLS),
            row_args(ids, 1, 10))


def copy_beside(schema):
    """users and signals copies in a schema (attach() wants them beside
    the trades table), copied on the server."""
    env.sql("""
        CREATE SCHEMA {s};
        CREATE TABLE {s}.users (LIKE public.users INCLUDING ALL);
        INSERT INTO {s}.users SELECT * FROM public.users;
        CREATE TABLE {s}.signals (LIKE public.signals INCLUDING ALL);
        INSERT INTO {s}.signals SELECT * FROM public.signals;""".format(s=schema))


# -- what the queue and the sink say --------------------------------------
def queue_rows(ids):
    """(trade_id, adapter) -> status, attempts and trade_table (schema.name)."""
    rows = env.sqld("""
        SELECT q.trade_id, q.adapter, q.status, q.attempts,
               format('%%I.%%I', n.nspname, c.relname) AS tbl
          FROM trace.trace_queue q
          LEFT JOIN pg_class c ON c.oid = q.trade_table
          LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE q.trade_id = ANY(%s)""", (list(ids),))
    return {(r["trade_id"], r["adapter"]): r for r in rows}


def trade_json(table, tid):
    """The allowlisted columns of a trade as to_json renders them, read
    from the given table."""
    cols = env.payload_columns
    args = ", ".join("%s, %s" % (env._lit(c), env._ident(c)) for c in cols)
    text = env.sql1("SELECT json_build_object(%s)::text FROM %s WHERE trade_id = %%s"
                    % (args, table), (tid,))
    return as_json_literals(text) if text is not None else None


def request_counts(ids):
    return {(i, a): len(env.reqs_for(i, a)) for i in ids for a in BOTH}


def where_rows(table, ids):
    """trade_id -> the partition (relname) holding it."""
    return dict(env.sql("SELECT trade_id, tableoid::regclass::text FROM %s "
                        "WHERE trade_id = ANY(%%s)" % table, (list(ids),)))


def expect_traced(label, ids, table, signal_id=10, timeout=15):
    """The trades were queued against `table` once per tracker of their
    signal, delivered on the first attempt, and the sink got exactly one
    request per (trade, tracker), whose body is the trade as it is in
    `table`."""
    ids = list(ids)
    adapters = ADAPTERS_OF[signal_id]
    for i in ids:
        EXPECTED[i] = set(adapters)
    want = sorted((i, a) for i in ids for a in adapters)

    def all_delivered():
        rows = queue_rows(ids)
        return sorted(rows) == want and all(r["status"] == "delivered" for r in rows.values())
    wait_until(all_delivered, timeout, 0.05)
    rows = queue_rows(ids)
    t.is_(sorted(rows), want, "%s: one queue row per (trade, tracker of its signal), no other"
          % label)
    t.is_(sorted({r["tbl"] for r in rows.values()}), [table],
          "%s: the queue rows' trade_table is %s" % (label, table))
    bad = ["%r: %s, %d attempts" % (k, r["status"], r["attempts"]) for k, r in sorted(rows.items())
           if r["status"] != "delivered" or r["attempts"] != 1]
    t.ok(rows and not bad, "%s: every row delivered on the first attempt" % label,
         lambda: "\n".join(bad) + "\nserver log:\n" + env.cluster.log_tail(30))
    wait_until(lambda: all(len(env.reqs_for(i, a)) >= 1 for i, a in want), 5, 0.02)
    time.sleep(0.3)     # a second request for any of them would arrive by now
    expect = {(i, a): int(a in adapters) for i in ids for a in BOTH}
    t.is_(request_counts(ids), expect,
          "%s: the sink got exactly one request per (trade, tracker), none for another tracker"
          % label)
    bad = []
    for i, a in want:
        for r in env.reqs_for(i, a):
            body = as_json_literals(r.body.decode("utf-8", "replace"))
            if body != trade_json(table, i):
                bad.append("%d %s: %r" % (i, a, body))
    t.ok(not bad, "%s: each body is the trade as %s holds it (allowlist, to_json)"
         % (label, table), lambda: "\n".join(bad[:5]))


def sentinel():
    """A trade closed by the plain UPDATE (user 1, signal 11: webhook) and
    delivered: once it has arrived, a request the worker would have sent
    before it has arrived too.  True if it arrived."""
    tid = new_ids(1)
    EXPECTED[tid[0]] = {"webhook"}
    insert("public.trades", tid, closed=False, signal_id=11)
    close("public.trades", tid)
    tid = tid[0]
    return bool(env.wait_reqs(tid, "webhook", count=1, timeout=15))


def expect_untraced(label, ids, why):
    """Nothing queued for the trades and, once a later sentinel trade has
    been delivered, nothing sent."""
    ids = list(ids)
    for i in ids:
        EXPECTED[i] = set()
    t.is_(queue_rows(ids), {}, "%s: nothing queued (%s)" % (label, why))
    t.ok(sentinel(), "%s: (a sentinel trade closed after them was delivered)" % label)
    t.is_(sum(request_counts(ids).values()), 0, "%s: 0 requests" % label)


def triggers_of(table):
    """(relation, trigger name, tgenabled, is a clone) of trace_ext's
    triggers on a table and every partition under it."""
    return sorted(env.sql("""
        SELECT c.oid::regclass::text, tg.tgname::text, tg.tgenabled::text, tg.tgparentid <> 0
          FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
         WHERE tg.tgname IN ('trace_ext_enqueue', 'trace_ext_enqueue_insert')
           AND (c.oid = %s::regclass
                OR c.oid IN (SELECT relid FROM pg_partition_tree(%s::regclass)))""",
        (table, table)))


def trigger_states(table):
    """relation -> sorted tgenabled of the two triggers."""
    out = {}
    for rel, _, enabled, _ in triggers_of(table):
        out.setdefault(rel, []).append(enabled)
    return {k: sorted(v) for k, v in out.items()}


try:
    with t.case("the worker is past its start-up reconciliation sweep"):
        # The worker sweeps once when it starts (trace.reconcile() queues
        # CLOSED trades that have no queue row), after its first pass, and
        # then only every trace.reconcile_interval (an hour).  A trade a
        # trigger missed but the sweep queued would look traced: let the
        # first passes go by before closing anything, and check at the end
        # that the sweep queued nothing (it logs a WARNING when it does).
        t.ok(sentinel() and sentinel(), "two sentinel trades delivered one after the other")

    with t.case("the attached trades table has both triggers"):
        t.is_([r[1:] for r in triggers_of("public.trades")],
              [("trace_ext_enqueue", "O", False), ("trace_ext_enqueue_insert", "O", False)],
              "CREATE EXTENSION attached trace_ext_enqueue and trace_ext_enqueue_insert "
              "to public.trades, enabled (origin)")

    # -- plain table: the statements that write a row CLOSED ----------------
    with t.case("INSERT of a CLOSED row"):
        both = new_ids(2)
        wh = new_ids(1)
        opened = new_ids(1)
        insert("public.trades", both, closed=True, signal_id=10)
        insert("public.trades", wh, closed=True, signal_id=11)
        insert("public.trades", opened, closed=False, signal_id=10)
        t.is_(queue_rows(opened), {}, "INSERT of an OPEN row: nothing queued")
        EXPECTED[opened[0]] = set()
        expect_traced("INSERT CLOSED, signal 10", both, "public.trades")
        expect_traced("INSERT CLOSED, signal 11", wh, "public.trades", signal_id=11)

    with t.case("COPY of CLOSED rows (copy_expert)"):
        closed_ids = new_ids(3)
        open_ids = new_ids(1)
        lines, rowcount = copy_rows("public.trades", closed_ids, open_ids)
        t.is_((lines, rowcount), (4, 4), "COPY wrote 3 CLOSED rows and 1 OPEN row")
        t.is_(queue_rows(open_ids), {}, "the OPEN row of the COPY: nothing queued")
        EXPECTED[open_ids[0]] = set()
        expect_traced("COPY CLOSED", closed_ids, "public.trades")

    with t.case("INSERT ... ON CONFLICT DO UPDATE"):
        upsert = ("INSERT INTO public.trades (%s) %s ON CONFLICT (trade_id) DO UPDATE "
                  "SET status = EXCLUDED.status, exit_price = EXCLUDED.exit_price, "
                  "closed_at = EXCLUDED.closed_at, pnl = EXCLUDED.pnl, fees = EXCLUDED.fees"
                  % (COLS, rows_sql(True)))
        ins = new_ids(1)
        env.sql(upsert, row_args(ins, 1, 10))
        expect_traced("upsert, insert branch (a new CLOSED trade)", ins, "public.trades")
        upd = new_ids(1)
        insert("public.trades", upd, closed=False)
        t.is_(queue_rows(upd), {}, "(the OPEN trade to be upserted: nothing queued yet)")
        env.sql(upsert, row_args(upd, 1, 10))
        t.is_(env.sql1("SELECT status FROM public.trades WHERE trade_id = %s", (upd[0],)),
              "CLOSED", "the upsert took its update branch (same row, now CLOSED)")
        expect_traced("upsert, update branch (OPEN -> CLOSED)", upd, "public.trades")
        env.sql(upsert, row_args(upd, 1, 10))       # CLOSED -> CLOSED
        rows = queue_rows(upd)
        t.ok(len(rows) == 2 and all(r["status"] == "delivered" and r["attempts"] == 1
                                     for r in rows.values()),
             "an upsert of the already CLOSED trade queues nothing more", repr(rows))
        t.ok(sentinel(), "(a sentinel trade closed after it was delivered)")
        t.is_(request_counts(upd), {(upd[0], a): 1 for a in BOTH},
              "... and sends nothing more: still one request per tracker")

    with t.case("MERGE: insert and update actions"):
        matched = new_ids(1)
        fresh = new_ids(1)
        insert("public.trades", matched, closed=False)
        merge("public.trades", matched + fresh)
        t.is_(env.sql1("SELECT count(*) FROM public.trades WHERE trade_id = ANY(%s) "
                       "AND status = 'CLOSED'", (matched + fresh,)), 2,
              "one MERGE closed the existing trade and inserted the new one CLOSED")
        expect_traced("MERGE, update action", matched, "public.trades")
        expect_traced("MERGE, insert action", fresh, "public.trades")

    with t.case("close -> reopen -> close: one delivery"):
        tid = new_ids(1)
        insert("public.trades", tid, closed=False)
        close("public.trades", tid)
        expect_traced("closed once", tid, "public.trades")
        reopen("public.trades", tid)
        close("public.trades", tid)
        rows = queue_rows(tid)
        t.ok(len(rows) == 2 and all(r["status"] == "delivered" and r["attempts"] == 1
                                     for r in rows.values()),
             "closed again after a reopen: still the two rows, delivered, 1 attempt each",
             repr(rows))
        t.ok(sentinel(), "(a sentinel trade closed after it was delivered)")
        t.is_(request_counts(tid), {(tid[0], a): 1 for a in BOTH},
              "closed, reopened, closed again: one request per tracker in all")

    with t.case("an opted-out user's CLOSED insert"):
        tid = new_ids(2)
        insert("public.trades", tid, closed=True, user_id=2, signal_id=10)
        expect_untraced("user 2 (tracing_enabled = false), INSERT CLOSED", tid,
                        "the user did not opt in")

    with t.case("a status enum with the label CLOSED, an integer trade_id: accepted, traced"):
        env.sql("""
            CREATE TYPE public.trade_status AS ENUM ('OPEN', 'CLOSED');
            CREATE TABLE public.trades_enum (LIKE public.trades INCLUDING CONSTRAINTS);
            ALTER TABLE public.trades_enum
                ALTER COLUMN status TYPE public.trade_status USING status::public.trade_status,
                ALTER COLUMN trade_id TYPE integer;
            SELECT trace.attach('public.trades_enum');""")
        t.is_(len(triggers_of("public.trades_enum")), 2, "attach() installed both triggers")
        ins = new_ids(1)
        upd = new_ids(1)
        insert("public.trades_enum", ins, closed=True, status_type="public.trade_status")
        insert("public.trades_enum", upd, closed=False, status_type="public.trade_status")
        close("public.trades_enum", upd)
        expect_traced("enum status, INSERT CLOSED", ins, "public.trades_enum")
        expect_traced("enum status, UPDATE to CLOSED", upd, "public.trades_enum")

    # -- partitioned tables ---------------------------------------------------
    with t.case("LIST by status: hot (OPEN) and cold (CLOSED) partitions"):
        copy_beside("hot")
        env.sql("""
            CREATE TABLE hot.trades (LIKE public.trades INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
                PARTITION BY LIST (status);
            CREATE TABLE hot.trades_open PARTITION OF hot.trades FOR VALUES IN ('OPEN');
            CREATE TABLE hot.trades_closed PARTITION OF hot.trades FOR VALUES IN ('CLOSED');
            SELECT trace.attach('hot.trades');""")
        t.is_(triggers_of("hot.trades"), [
            ("hot.trades", "trace_ext_enqueue", "O", False),
            ("hot.trades", "trace_ext_enqueue_insert", "O", False),
            ("hot.trades_closed", "trace_ext_enqueue", "O", True),
            ("hot.trades_closed", "trace_ext_enqueue_insert", "O", True),
            ("hot.trades_open", "trace_ext_enqueue", "O", True),
            ("hot.trades_open", "trace_ext_enqueue_insert", "O", True)],
            "attach('hot.trades'): both triggers on the root, cloned to each partition")
        moved = new_ids(3)
        insert("hot.trades", moved, closed=False)
        t.is_(set(where_rows("hot.trades", moved).values()), {"hot.trades_open"},
              "the OPEN trades live in hot.trades_open")
        t.is_(queue_rows(moved), {}, "(OPEN: nothing queued)")
        close("hot.trades", moved)
        t.is_(set(where_rows("hot.trades", moved).values()), {"hot.trades_closed"},
              "the close moved them to hot.trades_closed (DELETE + INSERT)")
        expect_traced("LIST, close moving open -> closed", moved, "hot.trades")
        ins = new_ids(1)
        insert("hot.trades", ins, closed=True, signal_id=11)
        expect_traced("LIST, INSERT CLOSED into the root", ins, "hot.trades", signal_id=11)

        copied = new_ids(2)
        opened = new_ids(1)
        t.is_(copy_rows("hot.trades", copied, opened), (3, 3),
              "COPY into hot.trades wrote 2 CLOSED rows and 1 OPEN row")
        t.is_(where_rows("hot.trades", copied + opened),
              dict([(i, "hot.trades_closed") for i in copied] + [(opened[0], "hot.trades_open")]),
              "(COPY routed them to hot.trades_closed and hot.trades_open)")
        EXPECTED[opened[0]] = set()
        t.is_(queue_rows(opened), {}, "the OPEN row of the COPY into hot.trades: nothing queued")
        expect_traced("LIST, COPY CLOSED into the root", copied, "hot.trades")
        m_upd = new_ids(1)
        m_ins = new_ids(1)
        insert("hot.trades", m_upd, closed=False)
        merge("hot.trades", m_upd + m_ins)
        t.is_(set(where_rows("hot.trades", m_upd + m_ins).values()), {"hot.trades_closed"},
              "one MERGE moved the OPEN trade to hot.trades_closed and inserted the other there")
        expect_traced("LIST, MERGE update action moving open -> closed", m_upd, "hot.trades")
        expect_traced("LIST, MERGE insert action", m_ins, "hot.trades")

        again = moved[:1]
        reopen("hot.trades", again)
        t.is_(set(where_rows("hot.trades", again).values()), {"hot.trades_open"},
              "a reopen moved the trade back to hot.trades_open")
        close("hot.trades", again)
        t.is_(set(where_rows("hot.trades", again).values()), {"hot.trades_closed"},
              "closing it again moved it to hot.trades_closed again")
        rows = queue_rows(again)
        t.ok(len(rows) == 2 and all(r["status"] == "delivered" and r["attempts"] == 1
                                     for r in rows.values()),
             "LIST, close -> reopen -> close: still the two delivered rows", repr(rows))
        t.ok(sentinel(), "(a sentinel trade closed after it was delivered)")
        t.is_(request_counts(again), {(again[0], a): 1 for a in BOTH},
              "LIST, close -> reopen -> close: one request per tracker in all")

    with t.case("RANGE by closed_at, a default partition for open trades"):
        copy_beside("rng")
        cut = env.sql1("SELECT (date_trunc('day', now()) - interval '1 day')::text")
        env.sql("""
            CREATE TABLE rng.trades (LIKE public.trades INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
                PARTITION BY RANGE (closed_at);
            CREATE TABLE rng.trades_open PARTITION OF rng.trades DEFAULT;
            CREATE TABLE rng.trades_early PARTITION OF rng.trades
                FOR VALUES FROM (MINVALUE) TO (%(cut)s);
            SELECT trace.attach('rng.trades');""", {"cut": cut})
        t.is_(sorted({r[0] for r in triggers_of("rng.trades")}),
              ["rng.trades", "rng.trades_early", "rng.trades_open"],
              "attach('rng.trades'): triggers on the root and both partitions")
        early = new_ids(3)
        insert("rng.trades", early, closed=False)
        t.is_(set(where_rows("rng.trades", early).values()), {"rng.trades_open"},
              "open trades (closed_at NULL) live in the default partition")
        close("rng.trades", early, closed_at="%s::timestamptz - interval '1 hour'"
              % psycopg2.extensions.adapt(cut).getquoted().decode())
        t.is_(set(where_rows("rng.trades", early).values()), {"rng.trades_early"},
              "closing them moved them to rng.trades_early")
        expect_traced("RANGE, close moving default -> range partition", early, "rng.trades")

    with t.case("a partition attached after trace.attach() (ATTACH PARTITION)"):
        env.sql("""
            CREATE TABLE rng.trades_late (LIKE rng.trades INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
            ALTER TABLE rng.trades ATTACH PARTITION rng.trades_late
                FOR VALUES FROM (%(cut)s) TO (MAXVALUE);""", {"cut": cut})
        t.is_([r[1:] for r in triggers_of("rng.trades") if r[0] == "rng.trades_late"],
              [("trace_ext_enqueue", "O", True), ("trace_ext_enqueue_insert", "O", True)],
              "the attached partition got both triggers, cloned, without calling attach again")
        late = new_ids(2)
        insert("rng.trades", late, closed=False)
        close("rng.trades", late)
        t.is_(set(where_rows("rng.trades", late).values()), {"rng.trades_late"},
              "closing now moved the trades into the attached partition")
        expect_traced("ATTACH PARTITION, close moving into it", late, "rng.trades")
        direct = new_ids(1)
        insert("rng.trades_late", direct, closed=True)
        t.is_(set(where_rows("rng.trades", direct).values()), {"rng.trades_late"},
              "(a CLOSED row inserted into the partition itself, not the root)")
        expect_traced("ATTACH PARTITION, INSERT CLOSED into the partition", direct,
                      "rng.trades")

    with t.case("HASH by trade_id"):
        copy_beside("hsh")
        env.sql("""
            CREATE TABLE hsh.trades (LIKE public.trades INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                                     PRIMARY KEY (trade_id))
                PARTITION BY HASH (trade_id);
            CREATE TABLE hsh.trades_0 PARTITION OF hsh.trades FOR VALUES WITH (MODULUS 3, REMAINDER 0);
            CREATE TABLE hsh.trades_1 PARTITION OF hsh.trades FOR VALUES WITH (MODULUS 3, REMAINDER 1);
            CREATE TABLE hsh.trades_2 PARTITION OF hsh.trades FOR VALUES WITH (MODULUS 3, REMAINDER 2);
            SELECT trace.attach('hsh.trades');""")
        t.is_(len(triggers_of("hsh.trades")), 8,
              "attach('hsh.trades'): 2 triggers on the root, 2 cloned on each of 3 partitions")
        ids = new_ids(9)
        insert("hsh.trades", ids, closed=False)
        before = where_rows("hsh.trades", ids)
        t.is_(len(set(before.values())), 3, "the 9 trades are spread over the 3 partitions")
        close("hsh.trades", ids)
        t.is_(where_rows("hsh.trades", ids), before, "the close left each in its partition")
        expect_traced("HASH, close within the partition", ids, "hsh.trades")
        ins = new_ids(3)
        insert("hsh.trades", ins, closed=True)
        expect_traced("HASH, INSERT CLOSED", ins, "hsh.trades")

    # -- refused shapes -------------------------------------------------------
    with t.case("trace.attach() refuses shapes it cannot trace"):
        env.sql("""
            CREATE VIEW public.trades_v AS SELECT * FROM public.trades;
            CREATE TABLE public.bad3 (trade_id bigint, user_id bigint, status text);
            CREATE TABLE public.bad (trade_id text, user_id bigint, signal_id bigint, status text);
            CREATE TYPE public.st AS ENUM ('OPEN', 'DONE');
            CREATE TABLE public.bad2 (trade_id bigint, user_id bigint, signal_id bigint,
                                      status public.st);
            CREATE TABLE public.bad4 (trade_id integer, user_id bigint, signal_id bigint,
                                      status integer);
            CREATE SCHEMA x;
            CREATE TABLE x.trades (LIKE public.trades);
            CREATE SCHEMA y;
            CREATE TABLE y.trades (LIKE public.trades);
            CREATE TABLE y.users (user_id bigint, email text);
            CREATE TABLE y.signals (LIKE public.signals);
            CREATE SCHEMA z;
            CREATE TABLE z.trades (LIKE public.trades);
            CREATE TABLE z.users (LIKE public.users);
            CREATE TABLE z.signals (signal_id bigint, name text);
            CREATE SCHEMA w;
            CREATE TABLE w.trades (LIKE public.trades);
            CREATE TABLE w.users (user_id bigint, tracing_enabled text);
            CREATE TABLE w.signals (LIKE public.signals);
            CREATE SCHEMA v;
            CREATE TABLE v.trades (LIKE public.trades);
            CREATE TABLE v.users (LIKE public.users);
            CREATE TABLE v.signals (signal_id bigint, tracing_adapters text);""")
        cases = [
            ("a view", "public.trades_v",
             "trace.attach: public.trades_v is not a table"),
            ("no signal_id", "public.bad3",
             'trace.attach: table public.bad3 has no column "signal_id"'),
            ("trade_id text", "public.bad",
             "trace.attach: column trade_id of table public.bad is of type text, not an integer"),
            ("status an enum without CLOSED", "public.bad2",
             "trace.attach: column status of table public.bad2 is of type public.st, "
             "which cannot hold 'CLOSED'"),
            ("status integer", "public.bad4",
             "trace.attach: column status of table public.bad4 is of type integer, "
             "which cannot hold 'CLOSED'"),
            ("no users and signals beside it", "x.trades",
             'trace.attach: schema "x" has no tables "users" and "signals"'),
            ("users without tracing_enabled", "y.trades",
             'trace.attach: table y.users has no column "tracing_enabled"'),
            ("signals without tracing_adapters", "z.trades",
             'trace.attach: table z.signals has no column "tracing_adapters"'),
            ("users.tracing_enabled not a boolean", "w.trades",
             "trace.attach: column tracing_enabled of table w.users is not a boolean"),
            ("signals.tracing_adapters not an array", "v.trades",
             "trace.attach: column tracing_adapters of table v.signals is not an array"),
        ]
        for label, rel, msg in cases:
            for replica in (False, True):
                what = "%s%s" % (label, ", replica => true" if replica else "")
                try:
                    env.sql("SELECT trace.attach(%s, replica => %s)", (rel, replica))
                    t.fail("%s: refused" % what, "attach(%s) succeeded" % rel)
                except psycopg2.Error as e:
                    t.is_(e.diag.message_primary, msg, "%s: refused: %s" % (what, msg))
            t.is_(env.sql1("SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass",
                           (rel,)), 0, "%s: no trigger on %s after the refusals" % (label, rel))
        attached = sorted(r[0] for r in env.sql(
            "SELECT tgrelid::regclass::text FROM pg_trigger "
            " WHERE tgname = ANY(%s) AND tgparentid = 0", (list(TRIGGERS),)))
        t.is_(attached, sorted(["hot.trades", "hot.trades", "hsh.trades", "hsh.trades",
                                "rng.trades", "rng.trades", "trades", "trades",
                                "trades_enum", "trades_enum"]),
              "trace_ext's triggers are on the attached tables only (two each)")

    # -- logical replication ---------------------------------------------------
    with t.case("logical replication: a publisher, this database subscribing"):
        k = env.canaries
        pub = Cluster(settings={"wal_level": "logical"}, preload=False,
                      name="trace_e2e_publisher")
        pub.init()
        pub.start()
        pub.create_database(DB)
        pub.psql(file=fixture_path(), dbname=DB)
        # The publisher's rows carry this run's markers too (its statements
        # and log are its own; the canary scan reads the subscriber's).
        pub.psql(dbname=DB, sql="""
            ALTER TABLE trades ADD COLUMN passport text, ADD COLUMN iban text;
            CREATE TABLE e2e_canary (account text, passport text, iban text);
            INSERT INTO e2e_canary VALUES ('ACC-E2E-{a}-', 'PASSPORT-CANARY-{p}-',
                                           'DE00CANARY{i}IBAN');
            CREATE SCHEMA hot;
            CREATE TABLE hot.trades (LIKE public.trades INCLUDING ALL);
            ALTER TABLE hot.trades REPLICA IDENTITY FULL;
            CREATE PUBLICATION trace_pub FOR TABLE public.trades, hot.trades;
            """.format(a=k["trades.account_number"], p=k["trades.passport"],
                       i=k["trades.iban"]))
        pconn = pub.connect(DB)

        def pub_sql(q, args=None):
            cur = pconn.cursor()
            cur.execute(q, args)
            return cur.fetchall() if cur.description else []

        env.sql("SELECT trace.attach('public.trades', replica => false)")
        t.is_(trigger_states("public.trades"), {"trades": ["O", "O"]},
              "attach('trades', replica => false): both triggers ENABLE (origin only)")
        t.is_(trigger_states("hot.trades"),
              {r: ["O", "O"] for r in ("hot.trades", "hot.trades_open", "hot.trades_closed")},
              "hot.trades and its partitions: ENABLE (origin only)")
        env.sql("CREATE SUBSCRIPTION trace_sub CONNECTION %s PUBLICATION trace_pub "
                "WITH (copy_data = false)",
                ("host=%s port=%d dbname=%s user=postgres" % (pub.sockdir, pub.port, DB),))
        streaming = wait_until(lambda: pub_sql(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'trace_sub' "
            "AND state = 'streaming'")[0][0] == 1, 30)
        t.ok(streaming, "the subscription streams from the publisher")

    def replicated(table, ids, status="CLOSED", timeout=20):
        """Wait until the subscriber's table holds the trades with that
        status (the apply worker has committed them)."""
        return wait_until(lambda: env.sql1(
            "SELECT count(*) FROM %s WHERE trade_id = ANY(%%s) AND status = %%s" % table,
            (list(ids), status)) == len(ids), timeout)

    with t.case("replica => false: replicated closes arrive but are not sent"):
        p_upd, p_ins = new_ids(1), new_ids(1)
        h_upd, h_ins = new_ids(1), new_ids(1)
        insert("public.trades", p_upd, closed=False, run_sql=pub_sql)
        insert("hot.trades", h_upd, closed=False, run_sql=pub_sql)
        close("public.trades", p_upd, run_sql=pub_sql)
        close("hot.trades", h_upd, run_sql=pub_sql)
        insert("public.trades", p_ins, closed=True, run_sql=pub_sql)
        insert("hot.trades", h_ins, closed=True, run_sql=pub_sql)
        t.ok(replicated("public.trades", p_upd + p_ins),
             "the publisher's closed trades reached the subscriber's public.trades")
        t.ok(replicated("hot.trades", h_upd + h_ins),
             "... and its hot.trades")
        t.is_(set(where_rows("hot.trades", h_upd + h_ins).values()), {"hot.trades_closed"},
              "the apply worker moved the closed trade to hot.trades_closed")
        expect_untraced("replicated UPDATE and INSERT, attached without replica",
                        p_upd + p_ins + h_upd + h_ins,
                        "the publisher traces its own trades")

    with t.case("replica => true: the next replicated close is sent once"):
        env.sql("SELECT trace.attach('trades', replica => true)")
        env.sql("SELECT trace.attach('hot.trades', replica => true)")
        t.is_(trigger_states("public.trades"), {"trades": ["A", "A"]},
              "attach('trades', replica => true): both triggers ENABLE ALWAYS")
        t.is_(trigger_states("hot.trades"),
              {r: ["A", "A"] for r in ("hot.trades", "hot.trades_open", "hot.trades_closed")},
              "attach('hot.trades', replica => true): the root's triggers and the "
              "partitions' clones ENABLE ALWAYS")
        env.sql("""
            CREATE TABLE hot.trades_other (LIKE hot.trades INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
            ALTER TABLE hot.trades ATTACH PARTITION hot.trades_other
                FOR VALUES IN ('CANCELLED', 'SETTLED');""")
        t.is_(trigger_states("hot.trades").get("hot.trades_other"), ["A", "A"],
              "a partition attached after attach(replica => true) gets ENABLE ALWAYS clones")
        p_upd, p_ins = new_ids(1), new_ids(1)
        h_upd, h_ins = new_ids(1), new_ids(1)
        insert("public.trades", p_upd, closed=False, run_sql=pub_sql)
        insert("hot.trades", h_upd, closed=False, run_sql=pub_sql)
        t.ok(replicated("public.trades", p_upd, "OPEN") and replicated("hot.trades", h_upd, "OPEN"),
             "(the OPEN trades reached the subscriber)")
        t.is_(queue_rows(p_upd + h_upd), {}, "replicated OPEN inserts: nothing queued")
        close("public.trades", p_upd, run_sql=pub_sql)
        close("hot.trades", h_upd, run_sql=pub_sql)
        insert("public.trades", p_ins, closed=True, run_sql=pub_sql)
        insert("hot.trades", h_ins, closed=True, run_sql=pub_sql)
        replicated("public.trades", p_upd + p_ins)
        replicated("hot.trades", h_upd + h_ins)
        expect_traced("replica, replicated UPDATE to CLOSED", p_upd, "public.trades")
        expect_traced("replica, replicated INSERT CLOSED", p_ins, "public.trades")
        t.is_(set(where_rows("hot.trades", h_upd).values()), {"hot.trades_closed"},
              "the apply worker moved the replicated close to hot.trades_closed")
        expect_traced("replica, replicated close moving partitions (hot/cold)", h_upd,
                      "hot.trades")
        expect_traced("replica, replicated INSERT CLOSED into hot.trades", h_ins, "hot.trades")

        env.sql("SELECT trace.attach('trades')")
        t.is_(trigger_states("public.trades"), {"trades": ["O", "O"]},
              "attach('trades') again, replica defaulting to false: ENABLE (origin only)")
        off = new_ids(1)
        insert("public.trades", off, closed=True, run_sql=pub_sql)
        t.ok(replicated("public.trades", off), "(the next replicated CLOSED insert arrived)")
        expect_untraced("replicated INSERT CLOSED after re-attaching without replica", off,
                        "replica is off again")

    # -- everything the sink ever received --------------------------------------
    with t.case("every request the sink received, over the whole file"):
        t.ok(sentinel(), "a last sentinel trade was delivered")
        time.sleep(0.3)
        got = Counter()
        unexpected = []
        for r in env.sink.requests():
            tid, adapter = env.req_trade(r)
            if tid in EXPECTED:
                got[(tid, adapter)] += 1
            else:
                unexpected.append("request #%d for %r" % (r.seq, (tid, adapter)))
        want = Counter({(tid, a): 1 for tid, ads in EXPECTED.items() for a in ads})
        t.is_(unexpected, [], "no request for a trade this file did not close")
        diff = sorted((k, got.get(k, 0), want.get(k, 0)) for k in set(got) | set(want)
                      if got.get(k, 0) != want.get(k, 0))
        t.ok(not diff, "each of the %d expected (trade, tracker) pairs got exactly one request "
             "(%d trades, %d of them never to be sent), nothing else"
             % (len(want), len(EXPECTED), sum(1 for v in EXPECTED.values() if not v)),
             lambda: "(pair, got, expected):\n" + "\n".join(repr(d) for d in diff[:30]))
        log = env.cluster.log_text()
        ends = [line for line in log.splitlines() if "terminated by signal" in line
                or ("exited with exit code" in line and "trace_ext" in line)]
        t.is_(ends, [], "no server process crashed, no trace_ext worker exited with an error")
        swept = [line for line in log.splitlines() if "reconciliation queued" in line]
        t.is_(swept, [], "the reconciliation sweep queued nothing: every queue row came "
              "from a trigger")
finally:
    try:
        if pub is not None:
            env.sql("DROP SUBSCRIPTION IF EXISTS trace_sub")
    except Exception as e:
        t.diag("could not drop the subscription: %s" % e)
    env.close()
    if pub is not None:
        pub.destroy()

sys.exit(t.done())
