# test/lib/packages.sh: sourced by test/run.sh and test/demo.sh.
#
# ensure_packages PKG...: install the Debian packages that are missing
# (apt-get update first), non-interactively.  Returns non-zero on failure.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "=== installing: ${missing[*]} ==="
    DEBIAN_FRONTEND=noninteractive apt-get update -q || { echo "apt-get update failed" >&2; return 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null \
        || { echo "apt-get install failed" >&2; return 1; }
}

# What the packaging layer (test/packaging.sh) needs besides the packages
# of the other layers: Debian's build tools, and the package's
# Build-Depends (debian/control: postgresql-all brings the server, the
# -dev packages and pg_buildext; libcurl4-openssl-dev).  All from Debian 12.
# shellcheck disable=SC2034  # used by test/run.sh
packaging_packages=(debhelper devscripts lintian dpkg-dev fakeroot
                    postgresql-server-dev-all postgresql-all libcurl4-openssl-dev git)
