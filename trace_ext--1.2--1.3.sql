/* trace_ext 1.2 -> 1.3: completeness and consent */

\echo Use "ALTER EXTENSION trace_ext UPDATE TO '1.3'" to load this file. \quit

/* ------------------------------------------------------------------------
 * Who queued a row.  The worker checks consent again at send time; a row
 * an operator queued with explicit adapters (trace.enqueue(id, adapters))
 * is the operator's choice of trackers, so the signal's list is not
 * consulted for it.  The user's opt-in always is.
 * ------------------------------------------------------------------------ */
ALTER TABLE trace.trace_queue
    ADD COLUMN by_operator boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN trace.trace_queue.by_operator IS
    'queued by trace.enqueue() with explicit adapters: sent whatever the signal lists (the user must still opt in)';

-- A cancelled row says why (last_error); it is not a failure, unless it
-- had failed before it was cancelled.
CREATE OR REPLACE VIEW trace.failures AS
SELECT q.id, q.trade_id, q.adapter, q.status, q.attempts,
       q.last_error, q.last_http_status, q.due_at
  FROM trace.trace_queue q
 WHERE (q.last_error IS NOT NULL AND (q.status <> 'cancelled' OR q.attempts > 0))
    OR q.status = 'abandoned';

/* ------------------------------------------------------------------------
 * Every path to CLOSED: an AFTER INSERT trigger beside the AFTER UPDATE
 * one.  It sees rows written already CLOSED (INSERT, COPY, an upsert's or
 * MERGE's insert) and the insert half of an UPDATE that moves a row to
 * another partition.  Triggers on a partitioned table are cloned to every
 * partition, those attached later included.
 * ------------------------------------------------------------------------ */
COMMENT ON FUNCTION trace._on_trade_close() IS
    'trigger: queue a trade that became CLOSED, by UPDATE or INSERT (SECURITY DEFINER; names resolve in pg_catalog only)';

CREATE FUNCTION trace._enabled_adapters() RETURNS text[]
    LANGUAGE c STABLE STRICT AS 'MODULE_PATHNAME', 'trace_enabled_adapters_fn';

REVOKE ALL ON FUNCTION trace._enabled_adapters() FROM PUBLIC;

COMMENT ON FUNCTION trace._enabled_adapters() IS
    'trace.enabled_adapters as an array';

DROP FUNCTION trace.attach(regclass);

CREATE FUNCTION trace.attach(trades regclass DEFAULT 'trades'::text::regclass,
                             replica boolean DEFAULT false)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nsp     name;
    users   regclass;
    signals regclass;
    col     text;
    typ     oid;
    state   text := CASE WHEN replica THEN 'ENABLE ALWAYS' ELSE 'ENABLE' END;
BEGIN
    SELECT n.nspname INTO nsp
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = trades AND c.relkind IN ('r', 'p');
    IF nsp IS NULL THEN
        RAISE EXCEPTION 'trace.attach: % is not a table', trades;
    END IF;

    -- The shape trace_ext reads.  Refused here, never accepted and then
    -- silent at the first close.
    FOREACH col IN ARRAY ARRAY['trade_id', 'user_id', 'signal_id', 'status'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                        WHERE attrelid = trades AND attname = col
                          AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'trace.attach: table % has no column "%"', trades, col
                USING HINT = 'trace_ext needs columns trade_id (an integer), user_id, signal_id and status.';
        END IF;
    END LOOP;
    typ := trace._base_type(trades, 'trade_id');
    IF typ NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype) THEN
        RAISE EXCEPTION 'trace.attach: column trade_id of table % is of type %, not an integer',
            trades, pg_catalog.format_type(typ, NULL)
            USING HINT = 'The queue refers to trades by a bigint trade_id: smallint, integer or bigint.';
    END IF;
    typ := trace._base_type(trades, 'status');
    IF NOT (typ IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype)
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_enum e
                        WHERE e.enumtypid = typ AND e.enumlabel = 'CLOSED')) THEN
        RAISE EXCEPTION 'trace.attach: column status of table % is of type %, which cannot hold ''CLOSED''',
            trades, pg_catalog.format_type(typ, NULL)
            USING HINT = 'status must be text, varchar, char or an enum with the label CLOSED.';
    END IF;

    users := pg_catalog.to_regclass(pg_catalog.quote_ident(nsp) || '.users');
    signals := pg_catalog.to_regclass(pg_catalog.quote_ident(nsp) || '.signals');
    IF users IS NULL OR signals IS NULL THEN
        RAISE EXCEPTION 'trace.attach: schema "%" has no tables "users" and "signals"', nsp
            USING HINT = 'trace_ext reads users.tracing_enabled and signals.tracing_adapters beside the trades table.';
    END IF;
    FOREACH col IN ARRAY ARRAY['user_id', 'tracing_enabled'] LOOP
        IF trace._base_type(users, col) IS NULL THEN
            RAISE EXCEPTION 'trace.attach: table % has no column "%"', users, col
                USING HINT = 'trace_ext reads users.tracing_enabled (boolean), by user_id.';
        END IF;
    END LOOP;
    IF trace._base_type(users, 'tracing_enabled') <> 'bool'::regtype THEN
        RAISE EXCEPTION 'trace.attach: column tracing_enabled of table % is not a boolean', users;
    END IF;
    FOREACH col IN ARRAY ARRAY['signal_id', 'tracing_adapters'] LOOP
        IF trace._base_type(signals, col) IS NULL THEN
            RAISE EXCEPTION 'trace.attach: table % has no column "%"', signals, col
                USING HINT = 'trace_ext reads signals.tracing_adapters (an array of adapter names), by signal_id.';
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type t
                    WHERE t.oid = trace._base_type(signals, 'tracing_adapters')
                      AND t.typcategory = 'A') THEN
        RAISE EXCEPTION 'trace.attach: column tracing_adapters of table % is not an array', signals;
    END IF;

    -- Attaching twice is harmless: what is missing is added, and both
    -- triggers are enabled as asked (replica: also for changes applied by
    -- logical replication, which run with session_replication_role =
    -- replica and fire only ALWAYS and REPLICA triggers).
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                    WHERE tgrelid = trades AND tgname = 'trace_ext_enqueue') THEN
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER trace_ext_enqueue AFTER UPDATE ON %s FOR EACH ROW '
            'WHEN (NEW.status IS DISTINCT FROM OLD.status) '
            'EXECUTE FUNCTION trace._on_trade_close()', trades);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                    WHERE tgrelid = trades AND tgname = 'trace_ext_enqueue_insert') THEN
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER trace_ext_enqueue_insert AFTER INSERT ON %s FOR EACH ROW '
            'WHEN (NEW.status OPERATOR(pg_catalog.=) ''CLOSED'') '
            'EXECUTE FUNCTION trace._on_trade_close()', trades);
    END IF;
    EXECUTE pg_catalog.format('ALTER TABLE %s %s TRIGGER trace_ext_enqueue', trades, state);
    EXECUTE pg_catalog.format('ALTER TABLE %s %s TRIGGER trace_ext_enqueue_insert', trades, state);
END
$$;

COMMENT ON FUNCTION trace.attach(regclass, boolean) IS
    'install the trace_ext triggers (AFTER UPDATE, AFTER INSERT) on a trades table; replica: also fire for logical replication';

REVOKE ALL ON FUNCTION trace.attach(regclass, boolean) FROM PUBLIC;

-- The type of a column, domains resolved to their base type; NULL if the
-- table has no such column.
CREATE FUNCTION trace._base_type(rel regclass, col name) RETURNS oid
    LANGUAGE sql STABLE STRICT
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE t(oid, base) AS (
        SELECT a.atttypid, ty.typbasetype
          FROM pg_catalog.pg_attribute a
          JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
         WHERE a.attrelid = rel AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT ty.oid, ty.typbasetype
          FROM t JOIN pg_catalog.pg_type ty ON ty.oid = t.base
         WHERE t.base <> 0)
    SELECT oid FROM t WHERE base = 0;
$$;

REVOKE ALL ON FUNCTION trace._base_type(regclass, name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION trace.detach(trades regclass DEFAULT 'trades'::text::regclass)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS trace_ext_enqueue ON %s', trades);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS trace_ext_enqueue_insert ON %s', trades);
END
$$;

REVOKE ALL ON FUNCTION trace.detach(regclass) FROM PUBLIC;

COMMENT ON FUNCTION trace.detach(regclass) IS
    'remove the trace_ext triggers from a trades table';

-- Tables attached before this update get the INSERT trigger too, in the
-- same ENABLE/DISABLE state as their UPDATE trigger.
DO
$$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tg.tgrelid::pg_catalog.regclass AS rel, tg.tgenabled
               FROM pg_catalog.pg_trigger tg
              WHERE tg.tgname = 'trace_ext_enqueue' AND tg.tgparentid = 0
                AND tg.tgfoid = 'trace._on_trade_close()'::pg_catalog.regprocedure
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger i
                                 WHERE i.tgrelid = tg.tgrelid
                                   AND i.tgname = 'trace_ext_enqueue_insert')
    LOOP
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER trace_ext_enqueue_insert AFTER INSERT ON %s FOR EACH ROW '
            'WHEN (NEW.status OPERATOR(pg_catalog.=) ''CLOSED'') '
            'EXECUTE FUNCTION trace._on_trade_close()', t.rel);
        IF t.tgenabled <> 'O' THEN
            EXECUTE pg_catalog.format('ALTER TABLE %s %s TRIGGER trace_ext_enqueue_insert', t.rel,
                                      CASE t.tgenabled WHEN 'D' THEN 'DISABLE'
                                                       WHEN 'R' THEN 'ENABLE REPLICA'
                                                       ELSE 'ENABLE ALWAYS' END);
        END IF;
    END LOOP;
END
$$;

/* ------------------------------------------------------------------------
 * Consent at send time: what the worker would decide for a queue row.
 * ------------------------------------------------------------------------ */
CREATE FUNCTION trace._send_verdict(id bigint) RETURNS text
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_send_verdict';

REVOKE ALL ON FUNCTION trace._send_verdict(bigint) FROM PUBLIC;

COMMENT ON FUNCTION trace._send_verdict(bigint) IS
    'NULL if the worker would send this queue row now, else why not (the worker''s own check)';

/* ------------------------------------------------------------------------
 * Reconciliation never looks before its horizon:
 *  - 'installed': when the extension was installed (closes before it are
 *    history, not holes) or, for an update from 1.2, the oldest queue row
 *    then (what came before may have been deleted by trace.ttl);
 *  - 'cleaned': the latest cutoff of trace.cleanup(): rows created before
 *    it are gone, and their trades must not look unqueued.
 * The horizon is the later of the earliest 'installed' and the latest
 * 'cleaned'.  The table is dumped with the queue (a restore adds its own
 * 'installed' row, later than the dumped one, which stays the earliest).
 * The few deleted rows whose trade closed after the horizon (closed_at set
 * later than the row was created) are kept in cleaned_rows until the
 * horizon passes them.
 * ------------------------------------------------------------------------ */
CREATE TABLE trace.reconcile_horizon (
    kind      text        NOT NULL CHECK (kind IN ('installed', 'cleaned')),
    not_before timestamptz NOT NULL
);

COMMENT ON TABLE trace.reconcile_horizon IS
    'trace.reconcile() never looks at trades closed before the later of the earliest installed and the latest cleaned time';

INSERT INTO trace.reconcile_horizon (kind, not_before)
SELECT 'installed', COALESCE(pg_catalog.min(q.created_at), pg_catalog.now())
  FROM trace.trace_queue q;

CREATE TABLE trace.cleaned_rows (
    trade_id  bigint      NOT NULL,
    adapter   text        NOT NULL,
    closed_at timestamptz NOT NULL,
    PRIMARY KEY (trade_id, adapter)
);

COMMENT ON TABLE trace.cleaned_rows IS
    'queue rows trace.cleanup() deleted whose trade closed after the reconciliation horizon: never queued again by trace.reconcile()';

SELECT pg_catalog.pg_extension_config_dump('trace.reconcile_horizon', '');
SELECT pg_catalog.pg_extension_config_dump('trace.cleaned_rows', '');

CREATE FUNCTION trace._reconcile_horizon() RETURNS timestamptz
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT GREATEST(pg_catalog.min(h.not_before) FILTER (WHERE h.kind = 'installed'),
                    pg_catalog.max(h.not_before) FILTER (WHERE h.kind = 'cleaned'))
      FROM trace.reconcile_horizon h;
$$;

REVOKE ALL ON FUNCTION trace._reconcile_horizon() FROM PUBLIC;

-- The time column reconciliation bounds its scan by: closed_at, if the
-- table has one of a date/time type.
CREATE FUNCTION trace._closed_at_type(trades regclass) RETURNS regtype
    LANGUAGE sql STABLE STRICT
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t::regtype FROM (SELECT trace._base_type(trades, 'closed_at') AS t) s
     WHERE t IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype);
$$;

REVOKE ALL ON FUNCTION trace._closed_at_type(regclass) FROM PUBLIC;

CREATE OR REPLACE FUNCTION trace.cleanup() RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff  timestamptz := pg_catalog.now() - trace._ttl();
    horizon timestamptz;
    tbl     regclass;
    n       bigint;
BEGIN
    -- Rows about to go whose trade closed at or after the cutoff would
    -- look unqueued to a sweep: remember them.
    FOR tbl IN SELECT DISTINCT q.trade_table FROM trace.trace_queue q
                WHERE q.created_at < cutoff
    LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = tbl)
                   OR trace._closed_at_type(tbl) IS NULL;
        EXECUTE pg_catalog.format(
            'INSERT INTO trace.cleaned_rows (trade_id, adapter, closed_at) '
            'SELECT q.trade_id, q.adapter, t.closed_at '
            '  FROM trace.trace_queue q JOIN %s t ON t.trade_id = q.trade_id '
            ' WHERE q.trade_table = $1 AND q.created_at < $2 AND t.closed_at >= $2 '
            'ON CONFLICT (trade_id, adapter) DO UPDATE SET closed_at = EXCLUDED.closed_at',
            tbl) USING tbl, cutoff;
    END LOOP;

    DELETE FROM trace.trace_queue WHERE created_at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;

    UPDATE trace.reconcile_horizon SET not_before = GREATEST(not_before, cutoff)
     WHERE kind = 'cleaned';
    IF NOT FOUND THEN
        INSERT INTO trace.reconcile_horizon (kind, not_before) VALUES ('cleaned', cutoff);
    END IF;
    horizon := trace._reconcile_horizon();
    DELETE FROM trace.cleaned_rows WHERE closed_at < horizon;
    RETURN n;
END
$$;

COMMENT ON FUNCTION trace.cleanup() IS
    'delete queue rows older than trace.ttl, whatever their status (reconciliation will not queue them again)';

REVOKE ALL ON FUNCTION trace.cleanup() FROM PUBLIC;

CREATE FUNCTION trace._count_reconciled(adapter text, n bigint) RETURNS void
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_count_reconciled';

REVOKE ALL ON FUNCTION trace._count_reconciled(text, bigint) FROM PUBLIC;

/*
 * trace.reconcile(): CLOSED trades of consenting traders, closed since
 * `since`, with no queue row for a tracker their signal lists (and
 * trace.enabled_adapters allows): queued (unless dry_run) and returned.
 * A row that exists in any status (delivered, cancelled, abandoned, ...)
 * is left alone; so is a trade whose row trace.cleanup() deleted.  Only
 * tables with a closed_at column are swept (the window needs it); a
 * logical replication subscriber's table whose triggers do not fire for
 * replicated changes (attached without replica) is not swept either.
 */
CREATE FUNCTION trace.reconcile(
    since timestamptz DEFAULT pg_catalog.now() - pg_catalog.current_setting('trace.ttl')::interval,
    dry_run boolean DEFAULT false)
    RETURNS TABLE (trade_id bigint, adapter text)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    horizon     timestamptz;
    window_from timestamptz;
    enabled     text[] := trace._enabled_adapters();
    delay       interval := pg_catalog.current_setting('trace.delay')::interval;
    tbl         record;
    nsp         text;
    ctype       regtype;
    candidates  text;
    ids         bigint[] := '{}';
    adapters    text[] := '{}';
    more_ids    bigint[];
    more_adapters text[];
    closes      timestamptz[];
    r           record;
BEGIN
    IF since IS NULL THEN
        since := pg_catalog.now() - trace._ttl();
    END IF;
    -- Never before the install, nor before what trace.cleanup() deleted.
    horizon := trace._reconcile_horizon();
    window_from := GREATEST(since, horizon);

    FOR tbl IN SELECT tg.tgrelid::pg_catalog.regclass AS rel, tg.tgenabled
                 FROM pg_catalog.pg_trigger tg
                WHERE tg.tgname = 'trace_ext_enqueue' AND tg.tgparentid = 0
                  AND tg.tgfoid = 'trace._on_trade_close()'::pg_catalog.regprocedure
                ORDER BY tg.tgrelid
    LOOP
        ctype := trace._closed_at_type(tbl.rel);
        IF ctype IS NULL THEN
            RAISE WARNING 'trace.reconcile: table % has no closed_at column (timestamptz, timestamp or date): not swept', tbl.rel
                USING HINT = 'Reconciliation bounds its scan by closed_at; add the column, or queue missed trades with trace.enqueue().';
            CONTINUE;
        END IF;
        IF tbl.tgenabled <> 'A' AND EXISTS (SELECT 1 FROM pg_catalog.pg_subscription_rel sr
                                             WHERE sr.srrelid = tbl.rel) THEN
            RAISE NOTICE 'trace.reconcile: table % is filled by logical replication and attached without replica: not swept', tbl.rel;
            CONTINUE;
        END IF;
        SELECT pg_catalog.quote_ident(n.nspname) INTO nsp
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = tbl.rel;

        -- $1 window start, $2 enabled adapters
        candidates := pg_catalog.format(
            'SELECT t.trade_id::pg_catalog.int8 AS trade_id, a.adapter, t.closed_at '
            '  FROM %1$s t '
            '  JOIN %2$s.users u ON u.user_id = t.user_id AND u.tracing_enabled '
            '  JOIN %2$s.signals s ON s.signal_id = t.signal_id '
            ' CROSS JOIN LATERAL (SELECT DISTINCT x::pg_catalog.text AS adapter '
            '                       FROM pg_catalog.unnest(s.tracing_adapters) x) a '
            ' WHERE t.status = ''CLOSED'' AND t.closed_at >= $1::%3$s '
            '   AND a.adapter = ANY ($2) '
            '   AND NOT EXISTS (SELECT 1 FROM trace.trace_queue q '
            '                    WHERE q.trade_id = t.trade_id AND q.adapter = a.adapter) '
            '   AND NOT EXISTS (SELECT 1 FROM trace.cleaned_rows c '
            '                    WHERE c.trade_id = t.trade_id AND c.adapter = a.adapter)',
            tbl.rel, nsp, ctype);

        -- Find first, then insert: an INSERT reading the queue it writes to
        -- (the anti-join) would re-read the rows it has just added.
        EXECUTE pg_catalog.format(
            'SELECT pg_catalog.array_agg(trade_id), pg_catalog.array_agg(adapter), '
            '       pg_catalog.array_agg(closed_at::pg_catalog.timestamptz) FROM (%s) c',
            candidates)
            INTO more_ids, more_adapters, closes USING window_from, enabled;
        IF NOT dry_run AND more_ids IS NOT NULL THEN
            -- Due a trace.delay after the close (fees are final then), or now.
            EXECUTE
                'WITH queued AS ( '
                '  INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, due_at) '
                '  SELECT c.t, c.a, $4, GREATEST(pg_catalog.now(), c.closed OPERATOR(pg_catalog.+) $5) '
                '    FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), '
                '                    pg_catalog.unnest($3)) AS c(t, a, closed) '
                '  ON CONFLICT (trade_id, adapter) DO NOTHING '
                '  RETURNING trade_id, adapter) '
                'SELECT pg_catalog.array_agg(trade_id), pg_catalog.array_agg(adapter) FROM queued'
                INTO more_ids, more_adapters
                USING more_ids, more_adapters, closes, tbl.rel, delay;
        END IF;
        ids := ids || COALESCE(more_ids, '{}');
        adapters := adapters || COALESCE(more_adapters, '{}');
    END LOOP;

    IF NOT dry_run THEN
        FOR r IN SELECT x.a AS adapter, pg_catalog.count(*) AS n
                   FROM pg_catalog.unnest(adapters) AS x(a) GROUP BY x.a ORDER BY x.a
        LOOP
            PERFORM trace._count_reconciled(r.adapter, r.n);
            RAISE WARNING 'trace_ext: reconciliation queued % closed trades for adapter % that no trigger had queued', r.n, r.adapter
                USING HINT = 'A trigger was disabled or bypassed (session_replication_role = replica, pg_restore --disable-triggers), or a queue row was deleted by hand.';
            PERFORM pg_catalog.pg_notify('trace_alert', pg_catalog.json_build_object(
                'event', 'reconciled', 'adapter', r.adapter, 'count', r.n,
                'since', window_from)::text);
        END LOOP;
    END IF;

    RETURN QUERY SELECT x.t, x.a
                   FROM ROWS FROM (pg_catalog.unnest(ids), pg_catalog.unnest(adapters)) AS x(t, a)
                  ORDER BY 1, 2;
END
$$;

COMMENT ON FUNCTION trace.reconcile(timestamptz, boolean) IS
    'queue CLOSED trades of consenting traders that have no queue row for a tracker their signal lists';

REVOKE ALL ON FUNCTION trace.reconcile(timestamptz, boolean) FROM PUBLIC;

-- How many times each running worker has re-read its configuration: when
-- a changed setting is in force in every worker.
CREATE FUNCTION trace._worker_reloads(OUT pid integer, OUT reloads bigint)
    RETURNS SETOF record
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_worker_reloads';

REVOKE ALL ON FUNCTION trace._worker_reloads() FROM PUBLIC;

-- trust_trace_reconciled_total, for postgres_exporter (monitoring/queries.yaml).
CREATE FUNCTION trace._reconciled_counters(OUT adapter text, OUT reconciled_total bigint)
    RETURNS SETOF record
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'trace_reconciled_counters';

REVOKE ALL ON FUNCTION trace._reconciled_counters() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trace._reconciled_counters() TO pg_monitor;
REVOKE ALL ON TABLE trace.reconcile_horizon, trace.cleaned_rows FROM PUBLIC;
