"""Minimal TAP producer for the Python test scripts (run by prove).

Each check prints `ok N - description` or `not ok N - description` with
`# ` diagnostics; the plan `1..N` is printed at the end, which TAP allows,
so a script that dies half way is still reported as failed.  A `case`
block turns an unexpected exception into a failed test with its traceback
instead of ending the script.
"""

import contextlib
import sys
import time
import traceback


class Tap:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.n = 0
        self.failed = []

    def _print(self, s):
        self.out.write(s + "\n")
        self.out.flush()

    def diag(self, msg):
        for line in str(msg).splitlines() or [""]:
            self._print("# " + line)

    def ok(self, cond, desc, diag=None):
        self.n += 1
        desc = desc.replace("#", "\\#")
        if cond:
            self._print("ok %d - %s" % (self.n, desc))
        else:
            self._print("not ok %d - %s" % (self.n, desc))
            self.failed.append(desc)
            if diag is not None:
                self.diag(diag() if callable(diag) else diag)
        return bool(cond)

    def is_(self, got, expected, desc, diag=None):
        def extra():
            # only on failure, as ok() does: a diag may run a query
            text = "     got: %r\nexpected: %r" % (got, expected)
            if diag:
                text += "\n" + (diag() if callable(diag) else str(diag))
            return text
        return self.ok(got == expected, desc, extra)

    def fail(self, desc, diag=None):
        return self.ok(False, desc, diag)

    def skip(self, desc, reason):
        self.n += 1
        self._print("ok %d - %s # SKIP %s" % (self.n, desc, reason))

    @contextlib.contextmanager
    def case(self, name):
        """Run a group of checks; an exception becomes one failed test."""
        self.diag("--- " + name)
        t0 = time.time()
        try:
            yield
        except Exception:
            self.fail("%s: raised an exception" % name, traceback.format_exc())
        finally:
            self.diag("    (%s: %.1fs)" % (name, time.time() - t0))

    def done(self):
        """Print the plan and return the exit status (0 when all passed)."""
        self._print("1..%d" % self.n)
        if self.failed:
            self.diag("%d of %d failed" % (len(self.failed), self.n))
            return 1
        return 0 if self.n else 1


def wait_until(fn, timeout, interval=0.05):
    """Call fn until it returns something truthy or the deadline passes;
    returns that value, or the last (falsy) one."""
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v or time.time() >= deadline:
            return v
        time.sleep(interval)
