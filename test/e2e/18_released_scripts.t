#!/usr/bin/python3
"""Released extension scripts are never edited.

A database that ran trace_ext--1.0--1.1.sql keeps what that file said when
it ran; ALTER EXTENSION UPDATE never runs it again.  An edit to a released
script (even a harmless-looking statement) makes fresh installs and
upgraded ones differ in ways sql/upgrade.sql's shape comparison need not
see, so every released script is pinned by its SHA-256 in
test/released_scripts.sha256.  Released: a script whose target version is
older than default_version in trace_ext.control (the version in the
making may still change).  The installed copies (pg_config --sharedir of
PG_BINDIR) must match too, when they are there.  Needs no cluster."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from cluster import PG_BINDIR  # noqa: E402
from tap import Tap  # noqa: E402
from trace_e2e import REPO, ext_version  # noqa: E402

LIST = REPO / "test" / "released_scripts.sha256"
SCRIPT = re.compile(r"^trace_ext--(?:(\d+(?:\.\d+)*)--)?(\d+(?:\.\d+)*)\.sql$")

t = Tap()


def vtuple(v):
    return tuple(int(x) for x in v.split("."))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_list():
    pinned, bad = {}, []
    for n, line in enumerate(LIST.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-f]{64})  (\S+)", line)
        if not m:
            bad.append("line %d: %r" % (n, line))
            continue
        pinned[m.group(2)] = m.group(1)
    return pinned, bad


default = ext_version()
pinned, bad = read_list()
t.ok(pinned and not bad, "%s lists %d released scripts, one SHA-256 each"
     % (LIST.relative_to(REPO), len(pinned)), "\n".join(bad))

scripts = sorted(p.name for p in REPO.glob("trace_ext--*.sql"))
released = [s for s in scripts if SCRIPT.match(s)
            and vtuple(SCRIPT.match(s).group(2)) < vtuple(default)]
t.ok(released, "there are released scripts (target version older than %s)" % default,
     repr(scripts))
missing = [s for s in released if s not in pinned]
t.ok(not missing, "every released script (older than %s) is pinned in %s"
     % (default, LIST.name), "not pinned: %s" % ", ".join(missing))

for name, digest in sorted(pinned.items()):
    path = REPO / name
    got = sha256(path) if path.is_file() else None
    t.is_(got, digest, "%s is the released file, byte for byte" % name,
          "a released script was edited (or removed): put the change in a new "
          "upgrade script, and restore this one (git checkout -- %s)" % name)

try:
    sharedir = subprocess.run([os.path.join(PG_BINDIR, "pg_config"), "--sharedir"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              check=True).stdout.decode().strip()
except (OSError, subprocess.CalledProcessError):
    sharedir = None
installed = {n: Path(sharedir, "extension", n) for n in pinned} if sharedir else {}
installed = {n: p for n, p in installed.items() if p.is_file()}
if not installed:
    t.skip("the installed released scripts are the released files",
           "none installed under %s" % (sharedir or PG_BINDIR))
else:
    for name, path in sorted(installed.items()):
        t.is_(sha256(path), pinned[name], "installed %s is the released file" % path)

sys.exit(t.done())
