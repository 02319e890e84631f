#!/usr/bin/python3
"""The release files agree with trace_ext.control (test/run.sh, layer
"release").

The version lives in trace_ext.control (default_version); everything else
that names it is checked against it, never against a number written here:
- LICENSE exists and is the PostgreSQL License;
- CHANGELOG.md has a section "## <version>" (an "Unreleased" section is
  renamed to the version when it is released);
- META.json (PGXN, meta-spec 1.0.0) is valid JSON whose version, and the
  version of the extension it provides, are the control file's as SemVer
  ('1.3' is '1.3.0': PGXN wants three numbers), whose provided file is the
  flattened install script of that version, with license postgresql and a
  PostgreSQL prerequisite;
- debian/changelog's newest entry is that version (upstream part).
Prints TAP; exits non-zero if anything disagrees.
"""

import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
results = []


def check(ok, name, why=""):
    results.append(bool(ok))
    print("%sok %d - %s" % ("" if ok else "not ", len(results), name))
    if not ok and why:
        for line in why.splitlines():
            print("#   " + line)


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def semver(v):
    return v if v.count(".") >= 2 else v + ".0" * (2 - v.count("."))


control = read("trace_ext.control")
m = re.search(r"^default_version\s*=\s*'([^']+)'", control, re.M)
if not m:
    print("Bail out! no default_version in trace_ext.control")
    sys.exit(1)
version = m.group(1)
print("# trace_ext.control: default_version = %s" % version)

# LICENSE
lic = os.path.join(REPO, "LICENSE")
check(os.path.isfile(lic) and "PostgreSQL License" in read("LICENSE"),
      "LICENSE exists and is the PostgreSQL License")

# CHANGELOG.md
if os.path.isfile(os.path.join(REPO, "CHANGELOG.md")):
    changelog = read("CHANGELOG.md")
    sections = re.findall(r"^## (\S+)", changelog, re.M)
    check(version in sections, "CHANGELOG.md has a section for %s" % version,
          "sections found: %s\nadd '## %s (date)' (rename 'Unreleased' at the release)"
          % (", ".join(sections), version))
else:
    check(False, "CHANGELOG.md exists")

# META.json
try:
    meta = json.loads(read("META.json"))
except (OSError, ValueError) as e:
    meta = None
    check(False, "META.json exists and is valid JSON", str(e))
if meta is not None:
    check(True, "META.json exists and is valid JSON")
    want = semver(version)
    check(meta.get("meta-spec", {}).get("version") == "1.0.0", "META.json: meta-spec 1.0.0")
    check(meta.get("version") == want, "META.json: version is %s" % want,
          "META.json says %r; trace_ext.control says %r" % (meta.get("version"), version))
    prov = meta.get("provides", {}).get("trace_ext", {})
    check(prov.get("version") == want, "META.json: provides trace_ext %s" % want,
          "provides.trace_ext.version is %r" % prov.get("version"))
    script = "trace_ext--%s.sql" % version
    check(prov.get("file") == script and os.path.isfile(os.path.join(REPO, script)),
          "META.json: provides the install script %s" % script,
          "provides.trace_ext.file is %r" % prov.get("file"))
    check(meta.get("license") == "postgresql", "META.json: license postgresql")
    pg = meta.get("prereqs", {}).get("runtime", {}).get("requires", {}).get("PostgreSQL")
    check(pg is not None and str(pg).split(".")[0] == "15",
          "META.json: requires PostgreSQL 15 or later", "prereqs.runtime.requires.PostgreSQL is %r" % pg)
    check(isinstance(meta.get("resources"), dict) and meta["resources"], "META.json: resources")

# debian/changelog
try:
    first = read("debian/changelog").splitlines()[0]
    m = re.match(r"^\S+ \(([^)]+)\)", first)
    deb = m.group(1) if m else ""
    upstream = re.sub(r"-[^-]*$", "", re.sub(r"^\d+:", "", deb))
    check(upstream == version, "debian/changelog: newest entry is %s" % version,
          "debian/changelog's newest entry is %r; add one (dch -v %s-1)" % (deb, version))
except OSError as e:
    check(False, "debian/changelog exists", str(e))

# make dist: the PGXN zip of HEAD, named and rooted by the version.
if os.path.isdir(os.path.join(REPO, ".git")):
    import subprocess
    import tempfile
    import zipfile
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.run(["make", "-s", "-f", os.path.join(REPO, "Makefile"), "dist",
                            "VPATH=" + REPO, "PG_CONFIG=" + os.environ.get("PG_CONFIG", "pg_config")],
                           cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        z = os.path.join(out, "trace_ext-%s.zip" % version)
        names = []
        if p.returncode == 0 and os.path.isfile(z):
            names = zipfile.ZipFile(z).namelist()
        prefix = "trace_ext-%s/" % version
        check(all(prefix + f in names for f in ("META.json", "LICENSE", "CHANGELOG.md",
                                                  "Makefile", "trace_ext.control")),
              "make dist writes trace_ext-%s.zip with META.json, LICENSE, CHANGELOG.md" % version,
              p.stdout.decode("utf-8", "replace")[-2000:] + "\nzip holds %d files" % len(names))
else:
    print("# not a git clone: make dist not tried")

print("1..%d" % len(results))
print("%d passed, %d failed" % (results.count(True), results.count(False)))
sys.exit(0 if all(results) else 1)
