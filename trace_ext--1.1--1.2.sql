/* trace_ext 1.1 -> 1.2: less work for the trades table's writers */

\echo Use "ALTER EXTENSION trace_ext UPDATE TO '1.2'" to load this file. \quit

-- The queue's CHECK constraint becomes one call to a C function.  PostgreSQL
-- rebuilds CHECK expressions from their stored text at every statement that
-- writes rows, and the two "IN (...)" lists were about a fifth of the work of
-- queueing a closed trade.  The allowed values are unchanged.  A role that a
-- superuser lets write the queue by hand also needs EXECUTE on the function.
CREATE FUNCTION trace._queue_values_ok(adapter text, status text) RETURNS boolean
    LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'trace_queue_values_ok';

REVOKE ALL ON FUNCTION trace._queue_values_ok(text, text) FROM PUBLIC;

COMMENT ON FUNCTION trace._queue_values_ok(text, text) IS
    'the queue''s CHECK rule: adapter is myfxbook, webhook or file; status is pending, sending, delivered, abandoned or cancelled';

ALTER TABLE trace.trace_queue
    DROP CONSTRAINT trace_queue_adapter_check,
    DROP CONSTRAINT trace_queue_status_check,
    ADD CONSTRAINT trace_queue_values_check
        CHECK (trace._queue_values_ok(adapter, status));

COMMENT ON CONSTRAINT trace_queue_values_check ON trace.trace_queue IS
    'adapter is myfxbook, webhook or file; status is pending, sending, delivered, abandoned or cancelled';

-- The trades trigger's WHEN clause becomes "status changed", the smallest
-- test that keeps the trigger from firing on the writes that leave status
-- alone; the trigger function checks for the change to CLOSED itself.
-- PostgreSQL rebuilds a WHEN clause from its stored text at every UPDATE
-- statement on the table, closing or not, so a shorter one is cheaper for
-- every writer.
CREATE OR REPLACE FUNCTION trace.attach(trades regclass DEFAULT 'trades'::text::regclass)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nsp  name;
    col  text;
BEGIN
    SELECT n.nspname INTO nsp
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = trades AND c.relkind IN ('r', 'p');
    IF nsp IS NULL THEN
        RAISE EXCEPTION 'trace.attach: % is not a table', trades;
    END IF;

    FOREACH col IN ARRAY ARRAY['trade_id', 'user_id', 'signal_id', 'status'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                        WHERE attrelid = trades AND attname = col
                          AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'trace.attach: table % has no column "%"', trades, col;
        END IF;
    END LOOP;
    IF pg_catalog.to_regclass(pg_catalog.quote_ident(nsp) || '.users') IS NULL
       OR pg_catalog.to_regclass(pg_catalog.quote_ident(nsp) || '.signals') IS NULL THEN
        RAISE EXCEPTION 'trace.attach: schema "%" has no tables "users" and "signals"', nsp
            USING HINT = 'trace_ext reads users.tracing_enabled and signals.tracing_adapters beside the trades table.';
    END IF;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                WHERE tgrelid = trades AND tgname = 'trace_ext_enqueue') THEN
        RETURN;     -- attaching twice is harmless
    END IF;

    EXECUTE pg_catalog.format(
        'CREATE TRIGGER trace_ext_enqueue AFTER UPDATE ON %s FOR EACH ROW '
        'WHEN (NEW.status IS DISTINCT FROM OLD.status) '
        'EXECUTE FUNCTION trace._on_trade_close()', trades);
END
$$;

-- (OR REPLACE keeps the function's privileges; restated for the reader.)
REVOKE ALL ON FUNCTION trace.attach(regclass) FROM PUBLIC;

-- Tables attached before this update get the new WHEN clause too, and keep
-- whatever ENABLE/DISABLE state their DBA gave the trigger.
DO
$$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tg.tgrelid::pg_catalog.regclass AS rel, tg.tgenabled
               FROM pg_catalog.pg_trigger tg
              WHERE tg.tgname = 'trace_ext_enqueue'
                AND tg.tgfoid = 'trace._on_trade_close()'::pg_catalog.regprocedure
    LOOP
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE TRIGGER trace_ext_enqueue AFTER UPDATE ON %s FOR EACH ROW '
            'WHEN (NEW.status IS DISTINCT FROM OLD.status) '
            'EXECUTE FUNCTION trace._on_trade_close()', t.rel);
        IF t.tgenabled <> 'O' THEN
            EXECUTE pg_catalog.format('ALTER TABLE %s %s TRIGGER trace_ext_enqueue', t.rel,
                                      CASE t.tgenabled WHEN 'D' THEN 'DISABLE'
                                                       WHEN 'R' THEN 'ENABLE REPLICA'
                                                       ELSE 'ENABLE ALWAYS' END);
        END IF;
    END LOOP;
END
$$;
