"""A private copy of the machine's PostgreSQL, to install builds into.

PostgreSQL's binaries and pg_config are relocatable: a copy of
/usr/lib/postgresql/15, /usr/share/postgresql/15, /usr/include/postgresql
and the message catalogs under one directory, with the same relative
layout, reports and uses paths under that directory.  A test can then
install a build of its own (an older or a newer trace_ext) there and run
clusters from it (test/lib/cluster.py honours PG_BINDIR), leaving the
system installation untouched.  test/mutants.sh does the same in shell.
"""

import glob
import os
import shutil
import subprocess
import tempfile

PG_MAJOR = "15"


class PrivatePG:
    def __init__(self, prefix="trace_pg_"):
        self.root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        os.chmod(self.root, 0o755)
        for src in ("/usr/lib/postgresql/" + PG_MAJOR, "/usr/share/postgresql/" + PG_MAJOR,
                    "/usr/include/postgresql"):
            dst = self.root + src
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            subprocess.run(["cp", "-a", src, dst], check=True)
        for mo in glob.glob("/usr/share/locale/*/LC_MESSAGES/postgres-%s.mo" % PG_MAJOR):
            dst = self.root + mo
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(mo, dst)
        self.bindir = os.path.join(self.root, "usr/lib/postgresql", PG_MAJOR, "bin")
        self.pg_config = os.path.join(self.bindir, "pg_config")
        share = subprocess.run([self.pg_config, "--sharedir"], stdout=subprocess.PIPE,
                               check=True).stdout.decode().strip()
        if share != os.path.join(self.root, "usr/share/postgresql", PG_MAJOR):
            raise RuntimeError("pg_config of the copy reports %s: not relocatable" % share)

    def install(self, tree):
        """Build the trace_ext source tree `tree` and install it into the
        copy (replacing whatever trace_ext was there); returns the log."""
        ext = os.path.join(self.root, "usr/share/postgresql", PG_MAJOR, "extension")
        for f in glob.glob(os.path.join(ext, "trace_ext[.-]*")):
            os.unlink(f)
        log = []
        for target in ([], ["install"]):
            p = subprocess.run(["make", "-C", tree, "-s", "PG_CONFIG=" + self.pg_config]
                               + target, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            log.append(p.stdout.decode("utf-8", "replace"))
            if p.returncode != 0:
                raise RuntimeError("make %s failed:\n%s" % (" ".join(target), log[-1][-3000:]))
        return "".join(log)

    def destroy(self):
        shutil.rmtree(self.root, ignore_errors=True)


def copy_tree(repo, dst):
    """The files git tracks in `repo` (plus uncommitted edits), copied to dst."""
    files = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], stdout=subprocess.PIPE,
                           check=True).stdout.decode().split("\0")
    for f in files:
        if not f:
            continue
        src = os.path.join(str(repo), f)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, f))
    return dst
