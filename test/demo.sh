#!/usr/bin/env bash
#
# test/demo.sh: the trace_ext demo, in one command.
#
# For a fresh Debian 12 machine, as root (or it re-runs itself with sudo):
# installs the Debian packages that are missing, builds and installs the
# extension, then runs test/demo.py: a throwaway cluster, a local capture
# server playing two trackers, trades closing and arriving, a failing
# tracker retried, and the monitoring views printed.  Leaves nothing behind.
#
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
    exec sudo "$repo/test/demo.sh" "$@"
fi

export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 LANG=C.UTF-8
packages=(postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev
          python3-psycopg2 make gcc)
. "$repo/test/lib/packages.sh"
ensure_packages "${packages[@]}"

echo "== building and installing trace_ext"
cd "$repo"
make -s PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config >/dev/null
make -s PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config install >/dev/null

exec /usr/bin/python3 "$repo/test/demo.py"
