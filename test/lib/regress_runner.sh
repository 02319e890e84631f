#!/bin/sh
#
# test/lib/regress_runner.sh SRCDIR PG_REGRESS [ARG]...: how `make
# installcheck` runs pg_regress (the Makefile passes its own command line).
#
# As an ordinary user, or against an existing server (no --temp-instance),
# it runs the command as it is.  As root with --temp-instance it cannot:
# initdb and postgres refuse to run as root.  It then copies what
# pg_regress reads (sql/, expected/, test/: fixtures, regress.conf) into
# a private directory, runs pg_regress there as the postgres OS user
# (TRACE_REGRESS_USER), and copies results/, regression.out and
# regression.diffs back into the current directory, so the result looks the
# same either way.  It never touches a running server.
#
set -eu

srcdir=${1:?srcdir}
shift

temp_instance=
for a in "$@"; do
    case $a in --temp-instance=*) temp_instance=1 ;; esac
done

if [ "$(id -u)" != 0 ] || [ -z "$temp_instance" ]; then
    exec "$@"
fi

user=${TRACE_REGRESS_USER:-postgres}
if ! id -u "$user" >/dev/null 2>&1; then
    echo "regress_runner.sh: running as root, and there is no OS user '$user' to run" >&2
    echo "the temporary instance as (initdb refuses root); set TRACE_REGRESS_USER" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/trace_ext_regress.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/run"
for d in sql expected input output data test; do
    [ -d "$srcdir/$d" ] && cp -R "$srcdir/$d" "$work/src/"
done
# sql/install.sql reads test/fixtures/… relative to where pg_regress runs.
ln -s ../src/test "$work/run/test"
chown -R "$user" "$work"

# The same command, with the source directory replaced by the copy and the
# temporary instance kept inside it.
abs_src=$(cd "$srcdir" && pwd)
n=$#
i=0
while [ "$i" -lt "$n" ]; do
    a=$1
    shift
    case $a in
        --inputdir=*) a="--inputdir=$work/src" ;;
        --temp-instance=*) a="--temp-instance=$work/run/tmp_check" ;;
        --temp-config=*)
            f=${a#--temp-config=}
            case $f in
                "$srcdir"/*) f="$work/src/${f#"$srcdir"/}" ;;
                "$abs_src"/*) f="$work/src/${f#"$abs_src"/}" ;;
            esac
            a="--temp-config=$f" ;;
    esac
    set -- "$@" "$a"
    i=$((i + 1))
done

rc=0
(cd "$work/run" && runuser -u "$user" -- "$@") || rc=$?
[ "$rc" = 0 ] || echo "(regression.diffs and regression.out are copied to $(pwd))" >&2

rm -rf results regression.out regression.diffs
[ -d "$work/run/results" ] && cp -R "$work/run/results" .
for f in regression.out regression.diffs; do
    [ -f "$work/run/$f" ] && cp "$work/run/$f" .
done
exit "$rc"
