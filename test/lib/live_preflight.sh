#!/bin/sh
#
# test/lib/live_preflight.sh SRCDIR BINDIR: what `make installcheck
# TRACE_LIVE=1` runs before pg_regress touches an existing server (the one
# PGHOST, PGPORT, PGUSER point at; libpq's defaults otherwise).
#
# The regression suite is written for a throwaway server: it drops and
# re-creates the database contrib_regression, creates and drops roles
# named regress_*, and several tests change trace.* settings with ALTER
# SYSTEM and pg_reload_conf() (resetting them at the end), which the
# worker of any database on that server obeys meanwhile.  So this refuses
# a server that
#   - does not preload trace_ext (the suite would fail anyway);
#   - has any trace.* setting of its own, in postgresql.conf or
#     postgresql.auto.conf, beyond the lines of test/regress.conf (the
#     suite's RESETs would delete those in postgresql.auto.conf, and
#     any other value changes what the tests see);
#   - has trades or queue rows in the database trace.database names (a
#     trade store in use: its worker would act on the suite's settings);
# and says, loudly, what it is about to change on any other.  Exits
# non-zero to stop make.
#
set -eu

srcdir=${1:?srcdir}
bindir=${2:-}
psql=psql
[ -n "$bindir" ] && [ -x "$bindir/psql" ] && psql="$bindir/psql"
conf="$srcdir/test/regress.conf"

q() {   # q DB SQL: one value, unaligned
    "$psql" -X -A -t -q -v ON_ERROR_STOP=1 -d "$1" -c "$2"
}
refuse() {
    echo "make installcheck TRACE_LIVE=1: REFUSED: $*" >&2
    echo "(plain 'make installcheck' runs on a temporary instance and touches no server)" >&2
    exit 1
}
problems=""
problem() {    # every reason is reported, then refuse_if_problems stops
    echo "make installcheck TRACE_LIVE=1: REFUSED: $*" >&2
    problems=1
}

where=$(q postgres "SELECT coalesce(inet_server_addr()::text, 'socket '
                           || current_setting('unix_socket_directories'))
                           || ' port ' || current_setting('port')
                           || ', data directory ' || current_setting('data_directory')") ||
    refuse "cannot connect to the server (PGHOST=${PGHOST:-} PGPORT=${PGPORT:-})"

[ "$(q postgres "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")" = t ] ||
    refuse "the suite needs a superuser connection (PGUSER)"

q postgres "SELECT 'trace_ext' = ANY (string_to_array(replace(current_setting('shared_preload_libraries'), ' ', ''), ','))" |
    grep -qx t ||
    problem "the server at $where does not preload trace_ext (shared_preload_libraries)"

# trace.* lines in the server's files, as written (name=value), against
# test/regress.conf's.
want=$(sed -n "s/^[[:space:]]*\(trace\.[a-z_]*\)[[:space:]]*=[[:space:]]*'\{0,1\}\([^']*\)'\{0,1\}.*/\1=\2/p" "$conf" | sort)
have=$(q postgres "SELECT name || '=' || setting FROM pg_file_settings
                    WHERE name LIKE 'trace.%' AND applied ORDER BY 1" | sort)
if [ "$want" != "$have" ]; then
    echo "trace.* lines the server's configuration files hold:" >&2
    echo "${have:-  (none)}" | sed 's/^/  /' >&2
    echo "the lines of $conf:" >&2
    echo "$want" | sed 's/^/  /' >&2
    problem "the server at $where has trace.* settings of its own, or lacks those of test/regress.conf (include that file, and nothing else of trace.*)"
fi
nondefault=$(q postgres "SELECT string_agg(name, ', ' ORDER BY name) FROM pg_settings
                          WHERE name LIKE 'trace.%' AND setting IS DISTINCT FROM boot_val")
[ -z "$nondefault" ] || problem "trace.* settings differ from their defaults: $nondefault"

tracedb=$(q postgres "SELECT current_setting('trace.database')")
if [ "$(q postgres "SELECT count(*) FROM pg_database WHERE datname = '$(printf %s "$tracedb" | sed "s/'/''/g")'")" = 1 ]; then
    tables=$(q "$tracedb" "SELECT c.oid::regclass FROM pg_class c
                            WHERE c.relname IN ('trades', 'trace_queue') AND c.relkind IN ('r', 'p')") ||
        refuse "cannot inspect database \"$tracedb\" (trace.database)"
    busy=""
    while IFS= read -r t; do
        [ -n "$t" ] || continue
        [ "$(q "$tracedb" "SELECT EXISTS (SELECT 1 FROM $t)")" = t ] && busy="$busy $t"
    done <<EOF
$tables
EOF
    [ -z "$busy" ] ||
        problem "database \"$tracedb\" (trace.database) holds rows in$busy: a trade store in use"
fi

if [ -n "$problems" ]; then
    echo "(plain 'make installcheck' runs on a temporary instance and touches no server)" >&2
    exit 1
fi

cat >&2 <<EOF
============================================================================
make installcheck TRACE_LIVE=1 runs the regression suite on an EXISTING
server: $where
It will, while it runs:
  - DROP and CREATE DATABASE contrib_regression (and its contents);
  - CREATE and DROP roles named regress_*;
  - ALTER SYSTEM SET trace.* (adapters, delay, ttl, secrets) and
    pg_reload_conf() in the hostile_gucs, trigger, operator, privileges
    and security tests, then ALTER SYSTEM RESET them: the worker of
    database "$tracedb" runs with those settings meanwhile, and an
    interrupted run leaves them in postgresql.auto.conf.
Checked first: trace_ext is preloaded, no trace.* setting of the server's
own, no trades or queue rows in "$tracedb".
============================================================================
EOF
