#!/usr/bin/env bash
#
# test/mutants.sh: do the tests catch the bugs they are there to catch?
#
# For each of a handful of deliberate bugs (mutants), this script copies the
# tree to a temporary directory, plants the bug (a checked text edit: a
# mutant whose anchor text is gone is an error, never a pass), builds it,
# installs it into a PRIVATE copy of PostgreSQL 15, and runs only the test
# file(s) that should catch it, against that copy (PG_BINDIR, which
# test/lib/cluster.py honours).  A mutant is "killed" when its tests fail,
# "survived" when they pass.  The system installation (/usr/lib/postgresql/15,
# /usr/share/postgresql/15) is never written to.
#
# The private copy: /usr/lib/postgresql/15, /usr/share/postgresql/15 and
# /usr/include/postgresql copied under $tmp/pg with the same relative
# layout; PostgreSQL's binaries and pg_config are relocatable, so
# $tmp/pg/usr/lib/postgresql/15/bin/pg_config reports paths under $tmp/pg
# and `make PG_CONFIG=... install` installs there.
#
# First the unmutated tree is built and its tests run once (the baseline):
# a mutant only counts as killed if the same tests pass without it.
#
#   mutant                  bug planted                                       caught by
#   constant-backoff        backoff_seconds() waits base for every retry      e2e 02_retries
#   no-jitter               backoff_seconds() without its +-10 % jitter       e2e 02_retries
#   cap-ignored             backoff_seconds() ignores trace.retry_backoff_cap e2e 02_retries
#   one-retry-fewer         next_status() abandons after max_retries attempts e2e 02_retries
#   released-script-edited  a statement appended to trace_ext--1.0--1.1.sql   e2e 18_released_scripts
#   sigterm-delivered       a worker exiting on SIGTERM records the rows it   e2e 03_failures
#                           has in flight as delivered
#   auth-error-permanent    401 and 403 abandoned at once                     e2e 17_statuses
#   retry-after-date-ignored  Retry-After as an HTTP date not honoured        e2e 17_statuses
#   retry-after-uncapped    Retry-After honoured beyond 24 h                  e2e 17_statuses
#   no-periodic-cleanup     the worker never runs trace.cleanup()             e2e 17_statuses
#   workers-under-pg-upgrade  workers start under pg_upgrade's servers         e2e 21_pg_upgrade
#   english-only-log-filter the log filter knows English statement lines only e2e 20_locales
#   no-consent-check        withdrawn consent no longer vetoes a send         e2e 15_consent
#   no-insert-trigger       trace.attach() installs no AFTER INSERT trigger   e2e 14_trigger_paths
#
# Not part of test/run.sh.  Run as root (the e2e tests run their clusters
# as the postgres OS user), from anywhere:
#
#   test/mutants.sh                   every mutant (about 5 minutes on 2 cores)
#   test/mutants.sh no-jitter ...     only these
#   test/mutants.sh --list            the mutants and their tests
#   test/mutants.sh --no-baseline     skip the baseline run
#   test/mutants.sh --keep            keep $tmp (trees, builds, test logs)
#
# Environment: TRACE_E2E_CANARY (default 0 here: the canary scan is not
# what kills a mutant, and costs time); TMPDIR for the temporary directory.
# Output: one line per mutant, "killed" (with the first failed checks) or
# "survived"; exits 0 only if every mutant selected was killed and the
# baseline passed.
#
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=15

# name | test files (space separated, under test/e2e) | what the bug is
MUTANTS=(
    "constant-backoff|02_retries.t|backoff_seconds() returns base for every retry"
    "no-jitter|02_retries.t|backoff_seconds() without jitter"
    "cap-ignored|02_retries.t|backoff_seconds() ignores trace.retry_backoff_cap"
    "one-retry-fewer|02_retries.t|next_status(): attempts >= max_retries abandons (one retry fewer)"
    "released-script-edited|18_released_scripts.t|a statement appended to the released trace_ext--1.0--1.1.sql"
    "sigterm-delivered|03_failures.t|a worker exiting on SIGTERM records its in-flight rows as delivered"
    "auth-error-permanent|17_statuses.t|permanent_status(): 401 and 403 abandoned at once"
    "retry-after-date-ignored|17_statuses.t|on_header(): Retry-After as an HTTP date not honoured"
    "retry-after-uncapped|17_statuses.t|next_status(): Retry-After honoured beyond 24 h"
    "no-periodic-cleanup|17_statuses.t|the worker's loop never calls cleanup_if_due()"
    "workers-under-pg-upgrade|21_pg_upgrade.t|_PG_init registers the workers in binary upgrade mode too"
    "english-only-log-filter|20_locales.t|the log filter recognises logged statements by their English prefix only"
    "no-consent-check|15_consent.t|the worker no longer vetoes rows whose trader withdrew consent"
    "no-insert-trigger|14_trigger_paths.t|trace.attach() installs no AFTER INSERT trigger"
)

die() { echo "mutants.sh: $*" >&2; exit 2; }

# --- the mutants -------------------------------------------------------------
# edit FILE PERL: apply a perl -0 substitution to FILE in the current tree;
# fails unless the file changed.
edit() {
    local file=$1 expr=$2
    [ -f "$file" ] || { echo "no file $file" >&2; return 1; }
    cp "$file" "$file.orig"
    perl -0pi -e "$expr" "$file" || return 1
    if cmp -s "$file" "$file.orig"; then
        echo "the anchor text of this mutant is not in $file any more: update test/mutants.sh" >&2
        return 1
    fi
    rm -f "$file.orig"
}

mutate() {
    case $1 in
        constant-backoff)
            edit src/queue.c 's/(double\s+wait = )base \* pow\(6\.0, Max\(attempts, 1\) - 1\);/${1}base;/' ;;
        no-jitter)
            edit src/queue.c 's/return wait \* \(0\.9 \+ 0\.2 \* pg_prng_double\(&pg_global_prng_state\)\);/return wait;/' ;;
        cap-ignored)
            edit src/queue.c 's/\n\tif \(wait > cap\)\n\t\twait = cap;\n/\n\t(void) cap;\n/' ;;
        one-retry-fewer)
            edit src/queue.c 's/item->attempts > trace_max_retries/item->attempts >= trace_max_retries/' ;;
        released-script-edited)
            [ -f trace_ext--1.0--1.1.sql ] || { echo "no trace_ext--1.0--1.1.sql" >&2; return 1; }
            cat >>trace_ext--1.0--1.1.sql <<'SQL'

-- (mutant) a harmless-looking statement added after the release
COMMENT ON TRIGGER trace_queue_wake ON trace.trace_queue IS
    'wakes the delivery workers when a statement that queued or rescheduled rows commits';
SQL
            ;;
        sigterm-delivered)
            edit src/worker.c 's/(#include "access\/xact\.h"\n)/${1}#include "executor\/spi.h"\n#include "utils\/snapmgr.h"\n/' &&
            edit src/worker.c 's/(\nvoid\ntrace_worker_main\(Datum arg\)\n)/
\/* MUTANT: the rows this worker has in flight are recorded delivered as it exits. *\/
static void
mutant_inflight_delivered(int code, Datum arg)
{
	AbortOutOfAnyTransaction();
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	SPI_execute("UPDATE trace.trace_queue SET status = \x27delivered\x27, delivered_at = now(), "
				"due_at = now(), lease_owner = NULL "
				"WHERE status = \x27sending\x27 AND lease_owner = pg_backend_pid()", false, 0);
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
}
${1}/' &&
            edit src/worker.c 's/(\n\ttrace_http_init\(\);\n)/${1}\tbefore_shmem_exit(mutant_inflight_delivered, (Datum) 0);\n/' ;;
        auth-error-permanent)
            edit src/http.c 's/return code == 400 \|\| code == 404/return code == 400 || code == 401 || code == 403 || code == 404/' ;;
        retry-after-date-ignored)
            edit src/http.c 's/t->retry_after = \(int\) Max\(0, when - time\(NULL\)\);/(void) when;/' ;;
        retry-after-uncapped)
            edit src/queue.c 's/(#define MAX_RETRY_AFTER_S\s+)\(24 \* 3600\)/${1}INT_MAX/' ;;
        no-periodic-cleanup)
            edit src/worker.c 's/\n\t\tcleanup_if_due\(\);\n/\n/' ;;
        workers-under-pg-upgrade)
            edit trace_ext.c 's/if \(!trace_preloaded \|\| IsBinaryUpgrade\)/if (!trace_preloaded)/' ;;
        english-only-log-filter)
            edit src/secrets.c 's/(static bool\nis_statement_log\(const ErrorData \*edata\)\n\{\n)/${1}\tif (edata->message == NULL || strncmp(edata->message, "statement: ", 11) != 0)\n\t\treturn false;\n/' ;;
        no-consent-check)
            edit src/payload.c 's/\tif \(t->user_veto\)\n\t\treturn t->user_veto;\n//' ;;
        no-insert-trigger)
            # attach() in the fresh install script (a new install) and in
            # the update's (installs updated from 1.2) alike
            for f in trace_ext--1.3.sql trace_ext--1.2--1.3.sql; do
                edit $f "s/    EXECUTE pg_catalog.format\('ALTER TABLE %s %s TRIGGER trace_ext_enqueue_insert', trades, state\);\n//" &&
                edit $f "s/IF NOT EXISTS \(SELECT 1 FROM pg_catalog.pg_trigger\n                    WHERE tgrelid = trades AND tgname = 'trace_ext_enqueue_insert'\) THEN/IF false THEN/" ||
                    return 1
            done ;;
        *) echo "unknown mutant $1" >&2; return 1 ;;
    esac
}

# --- options -----------------------------------------------------------------
keep=
baseline=1
selected=()
while [ $# -gt 0 ]; do
    case $1 in
        --keep) keep=1 ;;
        --no-baseline) baseline= ;;
        --list)
            for m in "${MUTANTS[@]}"; do
                IFS='|' read -r name tests what <<<"$m"
                printf '%-24s %-24s %s\n' "$name" "$tests" "$what"
            done
            exit 0 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) selected+=("$1") ;;
    esac
    shift
done
todo=()
for m in "${MUTANTS[@]}"; do
    name=${m%%|*}
    if [ ${#selected[@]} -eq 0 ] || [[ " ${selected[*]} " == *" $name "* ]]; then
        todo+=("$m")
    fi
done
for s in "${selected[@]}"; do
    printf '%s\n' "${MUTANTS[@]}" | grep -q "^$s|" || die "unknown mutant $s (see --list)"
done

[ "$(id -u)" = 0 ] || die "run as root (the e2e tests start clusters as the postgres user)"
for d in /usr/lib/postgresql/$PG_MAJOR /usr/share/postgresql/$PG_MAJOR /usr/include/postgresql; do
    [ -d "$d" ] || die "$d is missing (postgresql-$PG_MAJOR, postgresql-server-dev-$PG_MAJOR)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/trace_mutants.XXXXXX") || die "mktemp failed"
chmod 755 "$tmp"
if [ -n "$keep" ]; then
    trap 'echo "kept $tmp"' EXIT
else
    trap 'rm -rf "$tmp"' EXIT
fi

# --- a private PostgreSQL ----------------------------------------------------
pg=$tmp/pg
mkdir -p "$pg/usr/lib/postgresql" "$pg/usr/share/postgresql" "$pg/usr/include"
cp -a "/usr/lib/postgresql/$PG_MAJOR" "$pg/usr/lib/postgresql/" &&
cp -a "/usr/share/postgresql/$PG_MAJOR" "$pg/usr/share/postgresql/" &&
cp -a /usr/include/postgresql "$pg/usr/include/" || die "could not copy PostgreSQL to $pg"
# PostgreSQL's message translations (e2e 20_locales), found relative to bindir too.
for mo in /usr/share/locale/*/LC_MESSAGES/postgres-$PG_MAJOR.mo; do
    [ -f "$mo" ] || continue
    rel=${mo#/}
    mkdir -p "$pg/$(dirname "$rel")" && cp -a "$mo" "$pg/$rel"
done
bindir=$pg/usr/lib/postgresql/$PG_MAJOR/bin
pg_config=$bindir/pg_config
[ "$("$pg_config" --sharedir)" = "$pg/usr/share/postgresql/$PG_MAJOR" ] &&
[ "$("$pg_config" --pkglibdir)" = "$pg/usr/lib/postgresql/$PG_MAJOR/lib" ] ||
    die "the copied pg_config does not report paths under $pg: not relocatable here"
echo "private PostgreSQL: $bindir"

# install TREE: build TREE and install it into the private copy only.
install_tree() {
    local tree=$1
    rm -f "$pg/usr/lib/postgresql/$PG_MAJOR/lib/trace_ext.so" \
          "$pg/usr/share/postgresql/$PG_MAJOR/extension/"trace_ext[.-]*
    make -C "$tree" -s PG_CONFIG="$pg_config" >"$tree/build.log" 2>&1 &&
    make -C "$tree" -s PG_CONFIG="$pg_config" install >>"$tree/build.log" 2>&1
}

# run_tests TREE LOG FILES...: the e2e files of TREE against the private copy.
run_tests() {
    local tree=$1 log=$2
    shift 2
    local files=()
    for f in "$@"; do files+=("test/e2e/$f"); done
    (cd "$tree" &&
     PG_BINDIR="$bindir" TRACE_E2E_CANARY="${TRACE_E2E_CANARY:-0}" \
         prove -v --exec /usr/bin/python3 "${files[@]}") >"$log" 2>&1
}

failed_checks() {
    grep -E '^not ok' "$1" | head -"${2:-4}" | sed 's/^/        /'
}

# --- the baseline: the tree as it is ----------------------------------------
base=$tmp/base
mkdir -p "$base"
tar -C "$repo" --exclude=./.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
    --exclude=./results --exclude='./regression.*' --exclude='__pycache__' -cf - . |
    tar -C "$base" -xf - || die "could not copy the tree"
echo "building the tree (baseline) ..."
install_tree "$base" || { tail -30 "$base/build.log"; die "the unmutated tree does not build"; }

all_tests=$(for m in "${todo[@]}"; do IFS='|' read -r _ tests _ <<<"$m"; echo $tests; done |
            tr ' ' '\n' | sort -u | tr '\n' ' ')
if [ -n "$baseline" ]; then
    echo "baseline: $all_tests"
    t0=$(date +%s)
    if ! run_tests "$base" "$tmp/baseline.log" $all_tests; then
        echo "baseline FAILED ($(( $(date +%s) - t0 ))s): the tests fail without any mutant"
        failed_checks "$tmp/baseline.log" 20
        tail -5 "$tmp/baseline.log"
        exit 2
    fi
    echo "baseline passed ($(( $(date +%s) - t0 ))s)"
fi

# --- the mutants -------------------------------------------------------------
killed=0
survived=0
errors=0
summary=()
for m in "${todo[@]}"; do
    IFS='|' read -r name tests what <<<"$m"
    tree=$tmp/$name
    mkdir -p "$tree"
    # From the baseline build: only what the mutant touches is compiled again.
    tar -C "$base" -cf - . | tar -C "$tree" -xf -
    printf '%-24s %s\n' "$name" "$what"
    if ! (cd "$tree" && mutate "$name"); then
        echo "    ERROR: could not plant the mutant"
        errors=$((errors + 1)); summary+=("$name: error (not planted)")
        continue
    fi
    if ! install_tree "$tree"; then
        echo "    ERROR: the mutant does not build"
        tail -20 "$tree/build.log" | sed 's/^/        /'
        errors=$((errors + 1)); summary+=("$name: error (does not build)")
        continue
    fi
    t0=$(date +%s)
    if run_tests "$tree" "$tree/tests.log" $tests; then
        echo "    SURVIVED: $tests passed ($(( $(date +%s) - t0 ))s)"
        survived=$((survived + 1)); summary+=("$name: survived ($tests)")
    else
        n=$(grep -cE '^not ok' "$tree/tests.log")
        echo "    killed by $tests: $n failed checks ($(( $(date +%s) - t0 ))s), first:"
        failed_checks "$tree/tests.log"
        killed=$((killed + 1)); summary+=("$name: killed ($tests, $n failed checks)")
    fi
done

echo
echo "=== mutants: $killed killed, $survived survived, $errors errors ==="
printf '  %s\n' "${summary[@]}"
[ "$survived" -eq 0 ] && [ "$errors" -eq 0 ]
