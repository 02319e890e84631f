--
-- upgrade: the versions on offer, ALTER EXTENSION UPDATE, and that every
-- released version upgrades to exactly what a fresh install of the default
-- version creates.
--
-- Generic on purpose: when trace_ext--1.0--1.1.sql arrives, the loop below
-- installs 1.0, updates it, and compares it with a fresh 1.1; only the
-- version lists in this file's expected output change.
--
SET client_min_messages = warning;
\set SHOW_CONTEXT never

SELECT name, version, installed, superuser, trusted, relocatable, schema, requires
  FROM pg_available_extension_versions
 WHERE name = 'trace_ext'
 ORDER BY string_to_array(version, '.')::int[];
SELECT default_version, installed_version
  FROM pg_available_extensions WHERE name = 'trace_ext';

-- Every released version has an update path to the default version.
SELECT v.version,
       v.version = e.default_version
       OR EXISTS (SELECT 1 FROM pg_extension_update_paths('trace_ext') p
                   WHERE p.source = v.version AND p.target = e.default_version
                     AND p.path IS NOT NULL) AS reaches_default
  FROM pg_available_extension_versions v
  JOIN pg_available_extensions e ON e.name = v.name
 WHERE v.name = 'trace_ext'
 ORDER BY string_to_array(v.version, '.')::int[];

-- What an installed trace_ext looks like, as text without OIDs: members,
-- columns, constraints, indexes, function definitions, views, privileges,
-- the trigger and the pg_dump configuration.
CREATE FUNCTION pg_temp.trace_ext_shape() RETURNS SETOF text
LANGUAGE sql AS $$
    SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
      FROM pg_depend d
     WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
       AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'trace_ext')
    UNION ALL
    SELECT format('column %s.%s %s notnull=%s default=%s identity=%s',
                  c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                  a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), a.attidentity)
      FROM pg_class c
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
     WHERE c.relnamespace = 'trace'::regnamespace
    UNION ALL
    SELECT format('constraint %s %s', conrelid::regclass, pg_get_constraintdef(oid))
      FROM pg_constraint WHERE connamespace = 'trace'::regnamespace
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
     WHERE c.relnamespace = 'trace'::regnamespace
    UNION ALL
    SELECT format('function %s %s acl=%s', p.oid::regprocedure,
                  md5(pg_get_functiondef(p.oid)),
                  (SELECT string_agg(format('%s:%s:%s', x.grantee::regrole, x.privilege_type,
                                            x.is_grantable), ',' ORDER BY 1)
                     FROM aclexplode(p.proacl) x))
      FROM pg_proc p WHERE p.pronamespace = 'trace'::regnamespace
    UNION ALL
    SELECT format('relation %s kind=%s acl=%s', c.oid::regclass, c.relkind,
                  (SELECT string_agg(format('%s:%s:%s', x.grantee::regrole, x.privilege_type,
                                            x.is_grantable), ',' ORDER BY 1)
                     FROM aclexplode(c.relacl) x))
      FROM pg_class c WHERE c.relnamespace = 'trace'::regnamespace
    UNION ALL
    SELECT format('view %s %s', c.oid::regclass, md5(pg_get_viewdef(c.oid)))
      FROM pg_class c WHERE c.relnamespace = 'trace'::regnamespace AND c.relkind = 'v'
    UNION ALL
    SELECT format('schema acl=%s',
                  (SELECT string_agg(format('%s:%s:%s', x.grantee::regrole, x.privilege_type,
                                            x.is_grantable), ',' ORDER BY 1)
                     FROM aclexplode(n.nspacl) x))
      FROM pg_namespace n WHERE n.nspname = 'trace'
    UNION ALL
    SELECT 'trigger ' || pg_get_triggerdef(t.oid)
      FROM pg_trigger t
     WHERE t.tgfoid IN (SELECT oid FROM pg_proc WHERE pronamespace = 'trace'::regnamespace)
    UNION ALL
    SELECT format('dump %s %s', e.extconfig::regclass[], e.extcondition)
      FROM pg_extension e WHERE e.extname = 'trace_ext'
$$;

CREATE TEMP TABLE shape_installed AS SELECT pg_temp.trace_ext_shape() AS item;
SELECT count(*) > 20 AS shape_recorded FROM shape_installed;

-- Updating the installed (default) version is a no-op.
SET client_min_messages = notice;
ALTER EXTENSION trace_ext UPDATE;
SELECT format('ALTER EXTENSION trace_ext UPDATE TO %L', default_version)
  FROM pg_available_extensions WHERE name = 'trace_ext' \gexec
SET client_min_messages = warning;
SELECT extversion FROM pg_extension WHERE extname = 'trace_ext';
SELECT count(*) AS changed_by_update
  FROM ((SELECT item FROM shape_installed EXCEPT SELECT pg_temp.trace_ext_shape())
        UNION ALL
        (SELECT pg_temp.trace_ext_shape() EXCEPT SELECT item FROM shape_installed)) d;

-- A version that does not exist.
ALTER EXTENSION trace_ext UPDATE TO '0.9';

-- Every older version, installed and then updated, ends up identical to a
-- fresh install of the default version (queue rows survive the update).
-- The fresh install is re-created first so both sides were made the same
-- way (CREATE EXTENSION with the trade store present).
DROP EXTENSION trace_ext CASCADE;
CREATE EXTENSION trace_ext;
TRUNCATE shape_installed;
INSERT INTO shape_installed SELECT pg_temp.trace_ext_shape();

-- The golden copy: the whole shape of a fresh install of the default
-- version, kept in this file's expected output, so that a change to what
-- CREATE EXTENSION makes shows here even if the update path changes with it.
SELECT item AS fresh_install_shape FROM shape_installed ORDER BY item COLLATE "C";

CREATE TEMP TABLE upgrade_result (from_version text, queue_row text);
CREATE TEMP TABLE upgrade_diff (from_version text, side text, item text);
SELECT format($f$
    DROP EXTENSION trace_ext CASCADE;
    CREATE EXTENSION trace_ext VERSION %1$L;
    INSERT INTO trace.trace_queue (trade_id, adapter, trade_table, status, attempts, last_error,
                                   last_http_status)
    VALUES (3, 'webhook', 'trades', 'pending', 2, 'HTTP 503', 503);
    ALTER EXTENSION trace_ext UPDATE;
    INSERT INTO upgrade_diff
    SELECT %1$L, 'only in the fresh install', item
      FROM (SELECT item FROM shape_installed EXCEPT SELECT pg_temp.trace_ext_shape()) d
    UNION ALL
    SELECT %1$L, 'only in the updated install', item
      FROM (SELECT pg_temp.trace_ext_shape() AS item EXCEPT SELECT item FROM shape_installed) d;
    INSERT INTO upgrade_result
    SELECT %1$L, format('%%s %%s %%s %%s %%s %%s %%s due_at=created_at:%%s by_operator=%%s',
                        q.trade_id, q.adapter, q.trade_table, q.status, q.attempts,
                        q.last_error, q.last_http_status, q.due_at = q.created_at,
                        q.by_operator)
      FROM trace.trace_queue q;
    $f$, v.version)
  FROM pg_available_extension_versions v JOIN pg_available_extensions e USING (name)
 WHERE v.name = 'trace_ext' AND v.version <> e.default_version
 ORDER BY string_to_array(v.version, '.')::int[] \gexec
-- Versions tried, and the queue row each kept across its update, value by value.
SELECT * FROM upgrade_result ORDER BY string_to_array(from_version, '.')::int[];
-- Any difference between an updated and a fresh install (none expected).
SELECT * FROM upgrade_diff
 ORDER BY string_to_array(from_version, '.')::int[], side COLLATE "C", item COLLATE "C";

-- 1.1 -> 1.2 rewrites the WHEN clause of the triggers already attached, and
-- 1.2 -> 1.3 adds the INSERT trigger beside them; either keeps the state its
-- DBA gave the trigger: DISABLE, ENABLE REPLICA, ENABLE ALWAYS.
CREATE TEMP TABLE trigger_states (from_version text, state text, tgname name,
                                  tgenabled "char", definition text);
SELECT format($f$
    DROP EXTENSION trace_ext CASCADE;
    CREATE EXTENSION trace_ext VERSION %1$L;
    ALTER TABLE trades %2$s TRIGGER trace_ext_enqueue;
    ALTER EXTENSION trace_ext UPDATE TO %3$L;
    INSERT INTO trigger_states
    SELECT %1$L, %2$L, tgname, tgenabled, pg_get_triggerdef(oid)
      FROM pg_trigger WHERE tgrelid = 'trades'::regclass AND tgname LIKE 'trace_ext%%';
    $f$, v.from_version, st.state, v.to_version)
  FROM (VALUES ('1.1', '1.2'), ('1.2', '1.3')) AS v(from_version, to_version),
       (VALUES ('DISABLE'), ('ENABLE REPLICA'), ('ENABLE ALWAYS')) AS st(state)
 ORDER BY 1 \gexec
SELECT from_version, state, tgname, tgenabled
  FROM trigger_states ORDER BY from_version, state COLLATE "C", tgname COLLATE "C";
SELECT DISTINCT from_version, tgname COLLATE "C" AS tgname, definition
  FROM trigger_states ORDER BY 1, 2;

-- Whatever happened above, leave the default version installed and empty.
DROP EXTENSION trace_ext CASCADE;
CREATE EXTENSION trace_ext;
SELECT extversion FROM pg_extension WHERE extname = 'trace_ext';
SELECT count(*) AS triggers FROM pg_trigger WHERE tgname = 'trace_ext_enqueue';
