#!/usr/bin/env bash
#
# test/live_untouched.sh: `make installcheck` leaves a live server alone
# (test/run.sh, layer "live"; as root, after `make install`).
#
# Starts a "production" server on the default port (5432, socket in
# /var/run/postgresql, where libpq looks by default) that preloads
# trace_ext and serves a trade store with pending queue rows, settings of
# its own in postgresql.conf and in postgresql.auto.conf (ALTER SYSTEM).
# Then, from a clean clone of the repository (git clone of HEAD), with
# PGHOST/PGPORT/PGUSER pointing at that server:
#   1. `make installcheck` passes (it runs on a temporary instance);
#   2. `make installcheck TRACE_LIVE=1` refuses, naming the trades;
# and after each, the live server's configuration files, every setting it
# reports, its databases, roles and a dump of the trade database are
# byte for byte what they were, and its log shows no connection to
# contrib_regression, no reload and no ALTER SYSTEM.
# Prints TAP and "N passed, N failed"; exits non-zero on failure.  If
# something else already listens on port 5432, it says so and skips (it
# never touches another server).
#
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bindir=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
port=5432
sockdir=/var/run/postgresql
export LC_ALL=C.UTF-8 LANG=C.UTF-8
n=0
failed=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=$((failed + 1)); fi; }
as_pg() { runuser -u postgres -- "$@"; }

[ "$(id -u)" = 0 ] || { echo "Bail out! run as root"; exit 1; }
if [ -S "$sockdir/.s.PGSQL.$port" ] || (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "1..0 # SKIP something already listens on port $port: this test starts its own server there"
    echo "0 passed, 0 failed"
    exit 0
fi

work=$(mktemp -d /tmp/trace_ext_live.XXXXXX)
chmod 755 "$work"
chown postgres "$work"
data=$work/data
log=$work/server.log
cleanup() {
    [ -f "$data/postmaster.pid" ] && as_pg "$bindir/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT
install -d -o postgres -g postgres -m 2775 "$sockdir"

# --- the live server -------------------------------------------------------
as_pg "$bindir/initdb" -D "$data" -A trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null ||
    { echo "Bail out! initdb"; exit 1; }
cat >>"$data/postgresql.conf" <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sockdir'
log_connections = on
log_statement = 'ddl'
shared_preload_libraries = 'trace_ext'
trace.database = 'trading'
trace.delay = '10min'
trace.enabled_adapters = 'webhook,myfxbook'
trace.webhook_endpoint = 'http://127.0.0.1:9/hook'
EOF
as_pg "$bindir/pg_ctl" -D "$data" -l "$log" -w start >/dev/null ||
    { cat "$log"; echo "Bail out! the live server did not start"; exit 1; }

psql_live() { as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$sockdir" -p "$port" "$@"; }
psql_live -d postgres -c "CREATE DATABASE trading" &&
psql_live -d trading -f "$repo/test/fixtures/trade_store.sql" >/dev/null &&
psql_live -d trading -c "SET client_min_messages = warning" -c "CREATE EXTENSION trace_ext" \
    -c "UPDATE trades SET status = 'CLOSED', closed_at = now() WHERE trade_id IN (3, 4)" \
    -c "ALTER SYSTEM SET trace.batch_size = 50" -c "SELECT pg_reload_conf()" >/dev/null ||
    { echo "Bail out! could not set up the live server"; exit 1; }
pending=$(psql_live -d trading -A -t -c "SELECT count(*) FROM trace.trace_queue WHERE status = 'pending'")
# The worker has taken the reload and done its start-up sweep.
for _ in $(seq 1 100); do
    [ "$(psql_live -d trading -A -t -c "SHOW trace.batch_size")" = 50 ] &&
        psql_live -d trading -A -t -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'trace_ext worker'" | grep -qx 1 &&
        break
    sleep 0.1
done
sleep 1
echo "# live server on port $port: database trading, $pending pending queue rows, trace.batch_size = 50 by ALTER SYSTEM"

snapshot() {   # snapshot FILE: everything that must not change
    {
        echo "== postgresql.conf"; cat "$data/postgresql.conf"
        echo "== postgresql.auto.conf"; cat "$data/postgresql.auto.conf"
        echo "== settings"
        psql_live -d postgres -A -t -c "SELECT name, setting, source FROM pg_settings ORDER BY name"
        echo "== databases"
        psql_live -d postgres -A -t -c "SELECT datname FROM pg_database ORDER BY 1"
        echo "== roles"
        psql_live -d postgres -A -t -c "SELECT rolname FROM pg_roles ORDER BY 1"
        echo "== dump of trading"
        # (less the random key of pg_dump's \restrict lines)
        as_pg "$bindir/pg_dump" -h "$sockdir" -p "$port" -d trading | grep -v '^\\\(un\)\{0,1\}restrict '
    } >"$1" 2>&1
}
snapshot "$work/before"
log_mark=$(wc -l <"$log")

untouched() {  # untouched WHAT
    snapshot "$work/after"
    if cmp -s "$work/before" "$work/after"; then
        ok 0 "after $1: the live server's settings, files, databases, roles and data are unchanged"
    else
        ok 1 "after $1: the live server's settings, files, databases, roles and data are unchanged"
        diff "$work/before" "$work/after" | head -20 | sed 's/^/#   /'
    fi
    local news
    news=$(tail -n +"$((log_mark + 1))" "$log" |
           grep -E 'contrib_regression|received SIGHUP|ALTER SYSTEM|regress_' || true)
    ok "$([ -z "$news" ] && echo 0 || echo 1)" \
       "after $1: the live server's log shows no test database, role, reload or ALTER SYSTEM"
    [ -z "$news" ] || echo "$news" | head -10 | sed 's/^/#   /'
}

# --- a clean clone, pointed at the live server --------------------------------
clone=$work/clone
git clone -q "$repo" "$clone" 2>/dev/null || { echo "Bail out! git clone of $repo"; exit 1; }
export PGHOST=$sockdir PGPORT=$port PGUSER=postgres
unset PGDATABASE

(cd "$clone" && make installcheck) >"$work/installcheck.log" 2>&1
rc=$?
ok "$rc" "make installcheck from a clean clone passes, on a temporary instance"
[ "$rc" = 0 ] || { tail -30 "$work/installcheck.log"; cat "$clone/regression.diffs" 2>/dev/null | head -40; } | sed 's/^/#   /'
grep -q -- '--temp-instance' "$work/installcheck.log"
ok $? "it ran pg_regress with --temp-instance"
untouched "make installcheck"

(cd "$clone" && make installcheck TRACE_LIVE=1) >"$work/live.log" 2>&1
rc=$?
ok "$([ "$rc" != 0 ] && echo 0 || echo 1)" "make installcheck TRACE_LIVE=1 fails against it"
grep -q 'REFUSED: .*trading.*holds rows in .*trades' "$work/live.log"
ok $? "... refusing, because trace.database holds trades"
grep 'REFUSED' "$work/live.log" | sed 's/^/#   /'
! grep -q 'running regression test queries' "$work/live.log"
ok $? "... before pg_regress ran anything"
untouched "make installcheck TRACE_LIVE=1"

echo "1..$n"
echo "$((n - failed)) passed, $failed failed"
[ "$failed" = 0 ]
