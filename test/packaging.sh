#!/usr/bin/env bash
#
# test/packaging.sh: the Debian package, as a DBA gets it (test/run.sh,
# layer "packaging"; as root, on Debian 12).
#
#  1. a clean copy of the tree: git archive of HEAD (commit first: what is
#     not committed is not packaged), else the tracked files;
#  2. dpkg-buildpackage -us -uc -b: builds postgresql-15-trace-ext in
#     build-15/ (VPATH) and runs the regression suite at build time in a
#     throwaway cluster on the staged files (debian/rules);
#  3. lintian: no error (the warnings kept are listed in README.md,
#     "Debian package");
#  4. the package holds the library, every SQL script of the tree and
#     trace_ctl (in PostgreSQL's bindir, beside psql);
#  5. installs it (apt-get install ./….deb, which pulls its dependencies
#     from Debian's archive; dpkg -i with --no-install), after removing
#     trace_ext files that no package owns (a `make install`: set aside,
#     put back at the end), so that only the package's files are there, as
#     on a fresh machine;
#  6. a fresh cluster preloading trace_ext from the installed files:
#     CREATE EXTENSION, the version, a running worker; the installed
#     trace_ctl prints the version and finds it healthy (trace_ctl status);
#  7. the regression suite against the installed files
#     (debian/tests/installcheck, the autopkgtest: a temporary instance);
#  8. purges the package, and puts back the files set aside in 5.
#
# Usage: test/packaging.sh [--no-install]
# The system's PostgreSQL installation is shared: whoever runs this holds
# the lock the developers use for installs (flock /tmp/trace_ext_install.lock).
# Exits non-zero on the first failure.
#
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
no_install=
[ "${1:-}" = --no-install ] && no_install=1
v=15
pkg=postgresql-$v-trace-ext
extdir=/usr/share/postgresql/$v/extension
libdir=/usr/lib/postgresql/$v/lib
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 LANG=C.UTF-8

step() { echo "--- packaging: $*"; }
die() { echo "packaging: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs a package)"

work=$(mktemp -d /tmp/trace_ext_pkg.XXXXXX)
chmod 755 "$work"
# What a `make install` had put there is set aside, and put back at the
# end: the system installation is left as it was found.
stash=$work/stash
cleanup() {
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        dpkg --purge "$pkg" >/dev/null 2>&1 || true
    fi
    if [ -d "$stash" ]; then
        cp -a "$stash/." / && echo "    (put back the trace_ext files of the make install found before)" || { echo "could not put back $stash" >&2; return; }
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# 1. a clean copy
src=$work/trace-ext
mkdir -p "$src"
if git -C "$repo" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    step "clean copy: git archive HEAD ($(git -C "$repo" rev-parse --short HEAD))"
    git -C "$repo" archive HEAD | tar -x -C "$src"
    if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
        echo "    (the working tree has uncommitted changes: they are not in the package)"
    fi
else
    step "clean copy: the tree's files (not a git clone)"
    (cd "$repo" && tar --exclude=./.git --exclude='*.o' --exclude='*.so' --exclude='*.d' \
        --exclude=./results --exclude=./tmp_check --exclude='./build-*' -c .) | tar -x -C "$src"
fi
version=$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$src/trace_ext.control")
debversion=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
echo "    default_version $version, package version $debversion"

# 5 (first half). Nothing of trace_ext but the package's, as on a fresh
# machine: an older package goes, and so do files `make install` left.
if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    step "purging the $pkg installed before"
    dpkg --purge "$pkg" >/dev/null
fi
stale=()
for f in "$extdir"/trace_ext.control "$extdir"/trace_ext--*.sql "$libdir"/trace_ext.so \
         "$libdir"/bitcode/trace_ext.index.bc; do
    [ -e "$f" ] && ! dpkg -S "$f" >/dev/null 2>&1 && stale+=("$f")
done
[ -d "$libdir/bitcode/trace_ext" ] && stale+=("$libdir/bitcode/trace_ext")
if [ ${#stale[@]} -gt 0 ]; then
    step "setting aside trace_ext files no package owns (a make install): ${stale[*]}"
    for f in "${stale[@]}"; do
        mkdir -p "$stash$(dirname "$f")"
        mv "$f" "$stash$f"
    done
fi

# 2. build (its Build-Depends from Debian's archive, if any is missing)
if ! (cd "$src" && dpkg-checkbuilddeps) 2>"$work/builddeps.log"; then
    cat "$work/builddeps.log"
    [ -z "$no_install" ] || die "Build-Depends missing (and --no-install)"
    step "apt-get build-dep ./"
    (cd "$src" && apt-get build-dep -y -q ./ </dev/null) >"$work/builddep.log" 2>&1 ||
        { tail -20 "$work/builddep.log"; die "apt-get build-dep"; }
fi
step "dpkg-buildpackage -us -uc -b (build-time regression suite included)"
if ! (cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1; then
    tail -80 "$work/build.log"
    die "dpkg-buildpackage"
fi
grep -E '^(test |.*tests (passed|failed)|### )' "$work/build.log" | sed 's/^/    /' || true
deb=$(ls "$work"/${pkg}_"${debversion}"_*.deb)
changes=$(ls "$work"/trace-ext_"${debversion}"_*.changes)
echo "    built $(basename "$deb")"

# 3. lintian
step "lintian $(basename "$changes")"
lintian_rc=0
lintian --allow-root -I "$changes" >"$work/lintian.log" 2>&1 || lintian_rc=$?
sed 's/^/    /' "$work/lintian.log"
grep -q '^E: ' "$work/lintian.log" && die "lintian reports errors"
[ "$lintian_rc" = 0 ] || die "lintian exited $lintian_rc"

# 4. contents
step "package contents"
dpkg -c "$deb" >"$work/contents"
want=("./usr/lib/postgresql/$v/lib/trace_ext.so" ".$extdir/trace_ext.control"
      "./usr/lib/postgresql/$v/bin/trace_ctl")
for f in "$src"/trace_ext--*.sql; do want+=(".$extdir/$(basename "$f")"); done
for f in "${want[@]}"; do
    grep -q " $f\$" "$work/contents" || die "$(basename "$deb") lacks $f"
done
echo "    the library, the control file, trace_ctl and ${#want[@]} files in all are there"

# 5. install
if [ -n "$no_install" ]; then
    step "dpkg -i $(basename "$deb")"
    dpkg -i "$deb" >/dev/null
else
    step "apt-get install ./$(basename "$deb")"
    (cd "$work" && apt-get install -y -q --no-install-recommends "./$(basename "$deb")" </dev/null) \
        >"$work/install.log" 2>&1 || { tail -20 "$work/install.log"; die "apt-get install"; }
fi
dpkg-query -W -f='    installed ${Package} ${Version}\n' "$pkg"
owner=$(dpkg -S "$libdir/trace_ext.so" | cut -d: -f1)
[ "$owner" = "$pkg" ] || die "$libdir/trace_ext.so belongs to '$owner'"
trace_ctl=/usr/lib/postgresql/$v/bin/trace_ctl
owner=$(dpkg -S "$trace_ctl" | cut -d: -f1)
[ "$owner" = "$pkg" ] || die "$trace_ctl belongs to '$owner'"
got=$("$trace_ctl" --version) || die "$trace_ctl --version failed"
echo "    $got"
[ "$got" = "trace_ctl (trace_ext) $version" ] || die "$trace_ctl --version: '$got'"

# 6. a fresh cluster from the installed files
step "a fresh cluster preloading trace_ext: CREATE EXTENSION, a worker"
out=$(cd / && pg_virtualenv -t -v "$v" -o shared_preload_libraries=trace_ext sh -c '
    psql -X -q -A -t -v ON_ERROR_STOP=1 -c "SET client_min_messages = error" \
         -c "CREATE EXTENSION trace_ext" \
         -c "SELECT extversion FROM pg_extension WHERE extname = '\''trace_ext'\''" &&
    for i in $(seq 1 50); do
        n=$(psql -X -A -t -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = '\''trace_ext worker'\''")
        [ "$n" -ge 1 ] && break
        sleep 0.2
    done; echo "workers $n"
    # the installed trace_ctl, through the PG* variables pg_virtualenv sets
    s=$('"$trace_ctl"' status); rc=$?; echo "$s" | head -1; echo "trace_ctl status exit $rc"' 2>&1) ||
    { echo "$out"; die "the fresh cluster"; }
echo "$out" | sed 's/^/    /'
echo "$out" | grep -qx "$version" || die "the installed extension is not $version"
echo "$out" | grep -q '^workers [1-9]' || die "no trace_ext worker started"
echo "$out" | grep -q '^TRACE_EXT OK - ' || die "trace_ctl status does not say OK"
echo "$out" | grep -qx 'trace_ctl status exit 0' || die "trace_ctl status did not exit 0"

# 7. the regression suite against the installed files (the autopkgtest)
step "debian/tests/installcheck (make installcheck on a temporary instance)"
if ! (cd "$src" && debian/tests/installcheck) >"$work/installcheck.log" 2>&1; then
    tail -80 "$work/installcheck.log"
    die "installcheck against the installed package"
fi
grep -E '^(test |.*tests passed|### )' "$work/installcheck.log" | sed 's/^/    /' || true

# 8. purge (trap)
step "purging $pkg"
dpkg --purge "$pkg" >/dev/null
echo "packaging: PASS ($(basename "$deb"), lintian without errors, installcheck from the installed files)"
