#!/usr/bin/env bash
#
# test/run.sh: every test of trace_ext, in one command.
#
# For a fresh Debian 12 machine, as root (or it re-runs itself with sudo):
# installs the Debian packages that are missing, builds and installs the
# extension, then runs these layers and exits non-zero if any fails:
#
#   release    test/release_check.py: LICENSE, CHANGELOG.md, META.json,
#              debian/changelog and make dist agree with trace_ext.control
#   build      make clean && make && make install (make COPT=-Werror when
#              CI is set, or TRACE_WERROR=1)
#   regress    sql/ + expected/: the SQL surface (make installcheck: a
#              temporary instance that pg_regress starts, test/regress.conf)
#   live       test/live_untouched.sh: make installcheck from a clean clone
#              leaves a live server on port 5432 untouched
#   pgtap      test/pgtap/: trigger and queue specs (throwaway cluster with
#              the preload, pg_virtualenv)
#   e2e        test/e2e/: a real worker and tracker (its own clusters)
#   packaging  test/packaging.sh: the .deb built from a clean copy (HEAD),
#              lintian, installed, a fresh cluster and the regression suite
#              from the installed files, then purged; the build layer's
#              installed files are set aside meanwhile and put back
#
# It never touches an existing cluster: the throwaway ones live in
# temporary directories and are dropped on exit.  The last line of output
# is always "N passed, N failed" (layers).
#
# Usage: test/run.sh [--no-install] [--no-build] [--only LAYER]...
#   --no-install  do not call apt-get (the packages are already there)
#   --no-build    do not run make clean/make/make install
#   --only LAYER  run only this layer (release, regress, live, pgtap, e2e,
#                 packaging); repeatable
# Environment: TRACE_E2E_CANARY=0 runs the e2e layer without its canary
# scan for personal data and secrets (on by default; see test/e2e/README.md).
#
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
self="$repo/test/run.sh"

# ---------------------------------------------------------------------------
# Inner mode: run inside pg_virtualenv (PG* variables point at the
# throwaway cluster).  Writes one status file per layer into $2.
# ---------------------------------------------------------------------------
if [ "${1:-}" = "--inside-virtualenv" ]; then
    status_dir=$2
    shift 2
    cd "$repo" || exit 1
    want() { [ -z "${ONLY_LAYERS:-}" ] || [[ " $ONLY_LAYERS " == *" $1 "* ]]; }

    if want pgtap; then
        echo "=== pgTAP (pg_prove test/pgtap) ==="
        # The reference trade store: ../shared/fixtures beside the
        # repository when it is there, else the copy in test/fixtures (which
        # pg_regress always uses).
        fixture="$repo/../shared/fixtures/trade_store.sql"
        if [ -f "$fixture" ]; then
            cmp -s "$fixture" "$repo/test/fixtures/trade_store.sql" ||
                echo "WARNING: test/fixtures/trade_store.sql differs from $fixture" >&2
        else
            fixture="$repo/test/fixtures/trade_store.sql"
        fi
        db=trace_pgtap
        # The specs expect two adapters of three enabled, so that the
        # intersection with a signal's adapters shows.  A reloadable setting:
        # ALTER SYSTEM, reload, and new connections see it.
        prepare_pgtap_db() {
            PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d postgres \
                 -c "DROP DATABASE IF EXISTS $db" \
                 -c "CREATE DATABASE $db" \
                 -c "ALTER SYSTEM SET trace.enabled_adapters = 'myfxbook,webhook'" \
                 -c "SELECT pg_reload_conf()" >/dev/null &&
            psql -X -q -v ON_ERROR_STOP=1 -d "$db" -f "$fixture" >/dev/null &&
            psql -X -q -v ON_ERROR_STOP=1 -d "$db" \
                 -c "SET client_min_messages = error" \
                 -c "CREATE EXTENSION pgtap" \
                 -c "CREATE EXTENSION trace_ext" >/dev/null
        }
        if prepare_pgtap_db
        then
            if pg_prove -d "$db" "$repo"/test/pgtap/*.sql; then
                echo pass >"$status_dir/pgtap"
            else
                echo fail >"$status_dir/pgtap"
            fi
        else
            echo "could not prepare database $db for pgTAP" >&2
            echo fail >"$status_dir/pgtap"
        fi
        psql -X -q -d postgres -c "ALTER SYSTEM RESET trace.enabled_adapters" \
             -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true
    fi
    exit 0
fi

# ---------------------------------------------------------------------------
# Outer mode.
# ---------------------------------------------------------------------------
args=("$@")
do_install=1
do_build=1
ONLY_LAYERS=""
while [ $# -gt 0 ]; do
    case $1 in
        --no-install) do_install= ;;
        --no-build) do_build= ;;
        --only) ONLY_LAYERS="$ONLY_LAYERS ${2:?--only needs a layer}"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$self" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done
export ONLY_LAYERS

if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
        exec sudo --preserve-env=CI "$self" "${args[@]}"
    fi
    echo "test/run.sh must run as root (it installs packages and the extension)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C.UTF-8 LANG=C.UTF-8
export PGVERSION=15
export PATH="/usr/lib/postgresql/15/bin:$PATH"
export PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
cd "$repo" || exit 1

start=$(date +%s)
declare -A result
layers=(release build regress live pgtap e2e packaging)
for l in "${layers[@]}"; do result[$l]=skip; done

want() { [ -z "$ONLY_LAYERS" ] || [[ " $ONLY_LAYERS " == *" $1 "* ]]; }

# --- packages --------------------------------------------------------------
packages=(postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev
          postgresql-15-pgtap pgtap python3-psycopg2 python3-yaml make gcc
          prometheus prometheus-postgres-exporter python3-botocore faketime
          nodejs locales)
. "$repo/test/lib/packages.sh"
want packaging && packages+=("${packaging_packages[@]}")
if [ -n "$do_install" ]; then
    ensure_packages "${packages[@]}" || exit 1
    # Debian's nodejs comes without npm (NodeSource's includes it).
    command -v npm >/dev/null || ensure_packages npm || exit 1
fi

# --- s3rver (npm), the S3-compatible server of the file export tests --------
export TRACE_S3RVER="${TRACE_S3RVER:-/tmp/trace_ext_npm/node_modules/.bin/s3rver}"
if [ -n "$do_install" ] && [ ! -x "$TRACE_S3RVER" ] && want e2e; then
    echo "=== npm install s3rver@3.7.1 ==="
    npm install --no-audit --no-fund --prefix /tmp/trace_ext_npm s3rver@3.7.1 </dev/null \
        || echo "npm install s3rver failed: the S3 tests will fail" >&2
fi

# --- release files ------------------------------------------------------------
if want release; then
    echo "=== release files (test/release_check.py) ==="
    if python3 "$repo/test/release_check.py"; then result[release]=pass; else result[release]=fail; fi
fi

# --- build -----------------------------------------------------------------
# Warnings are errors under CI (a CI option, not the default).
werror=()
[ -n "${CI:-}${TRACE_WERROR:-}" ] && [ "${TRACE_WERROR:-1}" != 0 ] && werror=(COPT=-Werror)
if [ -n "$do_build" ]; then
    echo "=== build: make clean && make ${werror[*]} && make install ==="
    if make -s clean && make -s "${werror[@]}" && make -s install; then
        result[build]=pass
    else
        result[build]=fail
    fi
else
    result[build]=pass
fi

status_dir=$(mktemp -d)
trap 'rm -rf "$status_dir"' EXIT

# --- pg_regress: make installcheck, as a DBA runs it ------------------------
# A temporary instance that pg_regress starts with test/regress.conf (the
# preload); as root, test/lib/regress_runner.sh runs it as postgres.
if want regress; then
    if [ "${result[build]}" != pass ]; then
        result[regress]=fail
    else
        echo "=== pg_regress (make installcheck) ==="
        rm -rf results regression.diffs regression.out
        if make installcheck; then
            result[regress]=pass
        else
            result[regress]=fail
            if [ -f regression.diffs ]; then
                echo "--- regression.diffs ---"
                cat regression.diffs
            fi
        fi
    fi
fi

# --- make installcheck leaves a live server alone ----------------------------
if want live; then
    if [ "${result[build]}" != pass ]; then
        result[live]=fail
    else
        echo "=== make installcheck beside a live server (test/live_untouched.sh) ==="
        if "$repo/test/live_untouched.sh"; then result[live]=pass; else result[live]=fail; fi
    fi
fi

# --- pgTAP, on a throwaway cluster with the preload ---------------------------
if [ "${result[build]}" = pass ] && want pgtap; then
    # A temporary directory (-t) even as root, so that an existing cluster
    # or a stale /etc/postgresql/15/regress is never in the way.  The
    # cluster takes its locale from LC_ALL (C.UTF-8, the same everywhere).
    pg_virtualenv -t -v 15 \
        -o shared_preload_libraries=trace_ext \
        "$self" --inside-virtualenv "$status_dir"
    if [ -f "$status_dir/pgtap" ]; then
        result[pgtap]=$(cat "$status_dir/pgtap")
    else
        result[pgtap]=fail     # the throwaway cluster did not come up
    fi
elif [ "${result[build]}" != pass ] && want pgtap; then
    result[pgtap]=fail
fi

# --- end to end --------------------------------------------------------------
if want e2e; then
    if [ "${result[build]}" != pass ]; then
        result[e2e]=fail
    elif [ -d "$repo/test/e2e" ] && compgen -G "$repo/test/e2e/*.t" >/dev/null; then
        echo "=== end to end (prove test/e2e) ==="
        # Verbose TAP goes to a log; shown here: every failed test with its
        # diagnostics, a count per file, and prove's own summary.
        e2e_log="$status_dir/e2e.log"
        # Canary mode (test/lib/trace_e2e.py): every cluster runs with
        # log_statement = all, debug1 and pg_stat_statements, and each file
        # ends with a scan for the personal-data markers and the secrets in
        # the captured requests, the whole server log, pg_stat_statements,
        # pg_stat_activity and what the clients saw.  TRACE_E2E_CANARY=0
        # turns it off.
        export TRACE_E2E_CANARY="${TRACE_E2E_CANARY:-1}"
        echo "(TRACE_E2E_CANARY=$TRACE_E2E_CANARY)"
        if prove -v --exec /usr/bin/python3 "$repo"/test/e2e/ >"$e2e_log" 2>&1; then
            result[e2e]=pass
        else
            result[e2e]=fail
        fi
        awk '
            /\.t \.+ $/        { file = $1; order[++n] = file; next }
            /^not ok [0-9].*# TODO/ { todo[file]++; indiag = 0; next }
            /^not ok [0-9]/    { bad[file]++; print file ": " $0; indiag = 1; next }
            indiag && /^#/     { print "    " $0; next }
                               { indiag = 0 }
            /^ok [0-9]/        { good[file]++ }
            /^(Test Summary Report|All tests successful)/ { tail = 1 }
            tail               { rest = rest $0 "\n" }
            END {
                for (i = 1; i <= n; i++)
                    printf "  %-50s %d passed, %d failed%s\n", order[i], good[order[i]], bad[order[i]],
                           todo[order[i]] ? sprintf(", %d TODO (known, not yet fixed)", todo[order[i]]) : ""
                printf "%s", rest
            }' "$e2e_log"
    else
        echo "no end-to-end tests found in $repo/test/e2e" >&2
        result[e2e]=fail
    fi
fi

# --- the Debian package ---------------------------------------------------------
if want packaging; then
    echo "=== Debian package (test/packaging.sh) ==="
    pkg_args=()
    [ -n "$do_install" ] || pkg_args=(--no-install)
    if "$repo/test/packaging.sh" "${pkg_args[@]}"; then
        result[packaging]=pass
    else
        result[packaging]=fail
    fi
fi

# --- summary -----------------------------------------------------------------
passed=0
failed=0
echo
echo "=== summary ($(( $(date +%s) - start ))s) ==="
for l in "${layers[@]}"; do
    case ${result[$l]} in
        pass) passed=$((passed + 1)); printf '  %-10s PASS\n' "$l" ;;
        fail) failed=$((failed + 1)); printf '  %-10s FAIL\n' "$l" ;;
        *) printf '  %-10s skipped\n' "$l" ;;
    esac
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
