#!/usr/bin/python3
"""A loopback HTTP sink that records every request and answers as told.

The end-to-end tests and the demo point trace_ext's trackers at this server.
It keeps every request it receives (arrival time, method, path, headers,
body) in memory, and answers each path from a programmable script: a list of
responses consumed in order (e.g. 503, 503, 200), then a default (200 unless
told otherwise).  A response can carry headers (Retry-After, Location), be
delayed, or never be sent at all ("hang": the connection is held open, then
closed without an answer).

It speaks HTTP/1.1 with keep-alive, binds 127.0.0.1 only, and never forwards
anything anywhere.  In a test, use the CaptureServer class; from a shell (the
demo), run it as a program: see `capture_server.py --help`.  Paths under
/_capture/ are the control interface of the program form and are not
recorded.

Response specs, in Python or on the command line:
    200, 503                    a status (int or "503")
    {"status": 429, "headers": {"Retry-After": "2"}}
    "429;Retry-After=2"         the same, as text: status;Header=Value;...
    "302;Location=http://127.0.0.1:9/elsewhere"
    "hang" / "hang:30"          read the request, answer nothing for 30 s
                                (or until the server stops), then close
    "delay:1.5" / "delay:1.5:503"   answer after 1.5 s (default status 200)
    {"status": 200, "delay": 1.5, "body": "..."}

Per-request behaviour (Python only): set_behaviour(path, ..., hook=fn)
calls fn(request) (a Captured, headers and body read) for each request to
that path, before the script; a spec it returns is the answer, None lets
the script and default answer as usual (and consumes one script entry).
E.g. a poisoned trade among healthy ones:
    srv.set_behaviour("/webhook", hook=lambda r: 422
                      if r.header("Idempotency-Key") == "1234-webhook" else None)
"""

import argparse
import base64
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CONTROL_PREFIX = "/_capture/"
MAX_BODY = 16 * 1024 * 1024


def normalise_response(spec):
    """Turn any accepted response spec into a dict with known keys."""
    if isinstance(spec, dict):
        out = {"status": int(spec.get("status", 200)),
               "headers": dict(spec.get("headers") or {}),
               "body": spec.get("body"),
               "delay": float(spec.get("delay") or 0),
               "hang": spec.get("hang")}
        if out["hang"] is not None and out["hang"] is not True:
            out["hang"] = float(out["hang"])
        return out
    if isinstance(spec, bool):
        raise ValueError("bad response spec: %r" % (spec,))
    if isinstance(spec, int):
        return normalise_response({"status": spec})
    if isinstance(spec, str):
        parts = spec.strip().split(";")
        main, extra = parts[0].strip(), parts[1:]
        headers = {}
        for h in extra:
            if not h.strip():
                continue
            name, sep, value = h.partition("=")
            if not sep:
                raise ValueError("bad header in response spec %r" % spec)
            headers[name.strip()] = value.strip()
        d = {"headers": headers}
        if main == "hang":
            d["hang"] = True
        elif main.startswith("hang:"):
            d["hang"] = float(main[5:])
        elif main.startswith("delay:"):
            bits = main.split(":")
            d["delay"] = float(bits[1])
            d["status"] = int(bits[2]) if len(bits) > 2 else 200
        else:
            d["status"] = int(main)
        return normalise_response(d)
    raise ValueError("bad response spec: %r" % (spec,))


class Captured:
    """One recorded request."""

    __slots__ = ("seq", "time", "method", "path", "headers", "body",
                 "client_port", "response", "finished")

    def __init__(self, seq, t, method, path, headers, body, client_port):
        self.seq = seq
        self.time = t               # time.time() when the headers had arrived
        self.method = method
        self.path = path            # as sent, query string included
        self.headers = headers      # list of (name, value), order and case kept
        self.body = body            # bytes
        self.client_port = client_port
        self.response = None       # what was answered (normalised spec), filled later
        self.finished = None       # when the answer was sent or the connection dropped

    @property
    def route(self):
        """The path without query string: what behaviours are keyed on."""
        return urlsplit(self.path).path

    def header(self, name, default=None):
        """The first header of that name (case-insensitive)."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return default

    def header_all(self, name):
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self, **kw):
        """The body parsed as JSON (None if it is not JSON)."""
        try:
            return json.loads(self.body.decode("utf-8"), **kw)
        except (ValueError, UnicodeDecodeError):
            return None

    def raw(self):
        """Request line, headers and body as bytes: what PII scans search."""
        head = "%s %s\r\n" % (self.method, self.path)
        head += "".join("%s: %s\r\n" % (k, v) for k, v in self.headers)
        return head.encode("utf-8", "surrogateescape") + b"\r\n" + self.body

    def to_dict(self):
        d = {"seq": self.seq, "time": self.time, "method": self.method,
             "path": self.path, "headers": [list(h) for h in self.headers],
             "body": self.text()}
        try:
            self.body.decode("utf-8")
        except UnicodeDecodeError:
            d["body_base64"] = base64.b64encode(self.body).decode("ascii")
        if self.response is not None:
            d["answered"] = ("hang" if self.response.get("hang")
                             else self.response["status"])
        return d


class _Route:
    def __init__(self):
        self.script = []
        self.default = None
        self.hook = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "capture-sink/1"
    sys_version = ""

    def log_message(self, fmt, *args):
        if self.server.owner.verbose:
            sys.stderr.write("capture: " + (fmt % args) + "\n")

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, socket.timeout, OSError):
            # The client went away (timeout, crash): nothing to answer.
            self.close_connection = True

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers, up to the empty line
                    while True:
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(n) if n > 0 else b""

    def _any(self):
        owner = self.server.owner
        t = time.time()
        body = self._read_body()
        route = urlsplit(self.path).path
        if owner.control and route.startswith(CONTROL_PREFIX):
            return self._control(route, body)
        rec = owner._record(t, self.command, self.path,
                            list(self.headers.items()), body,
                            self.client_address[1])
        resp = owner._next_response(route, rec)
        rec.response = resp
        if resp.get("hang"):
            limit = None if resp["hang"] is True else resp["hang"]
            owner._stopping.wait(limit)
            self.close_connection = True
            rec.finished = time.time()
            return
        if resp["delay"] > 0:
            if owner._stopping.wait(resp["delay"]):
                self.close_connection = True
                rec.finished = time.time()
                return
        payload = resp["body"]
        if payload is None:
            payload = '{"ok":true}' if 200 <= resp["status"] < 300 else ""
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        self.send_response(resp["status"])
        ctype_set = False
        for k, v in resp["headers"].items():
            self.send_header(k, v)
            ctype_set = ctype_set or k.lower() == "content-type"
        if data and not ctype_set:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()
        rec.finished = time.time()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

    def _control(self, route, body):
        owner = self.server.owner
        status, out = 200, {"ok": True}
        try:
            what = route[len(CONTROL_PREFIX):]
            if what == "requests":
                out = [r.to_dict() for r in owner.requests()]
            elif what == "behaviour" and self.command in ("POST", "PUT"):
                spec = json.loads(body.decode("utf-8"))
                owner.set_behaviour(spec["path"], *(spec.get("script") or []),
                                    default=spec.get("default"))
            elif what == "clear" and self.command == "POST":
                owner.clear()
            else:
                status, out = 404, {"error": "unknown control request"}
        except Exception as e:          # a bad control request is a 400, not a crash
            status, out = 400, {"error": str(e)}
        data = json.dumps(out).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A burst opens a connection per request in flight (300 with three
    # workers): a short listen queue drops SYNs, and a connect retried
    # after 1 + 2 s can outlast trace.http_timeout, a retry no test means.
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        if self.owner.verbose:
            super().handle_error(request, client_address)


class CaptureServer:
    """In-process capture sink.

        srv = CaptureServer().start()
        srv.set_behaviour("/webhook", 503, 503, 200)
        srv.set_behaviour("/broken", default=500)       # always 500
        ... srv.url("/webhook") ...
        srv.requests("/webhook")
        srv.stop()
    """

    def __init__(self, host="127.0.0.1", port=0, default=200, control=False,
                 verbose=False, log_file=None):
        self.host = host
        self._port = port
        self.default = normalise_response(default)
        self.control = control
        self.verbose = verbose
        self.log_file = log_file
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._routes = {}
        self._reqs = []
        self._stopping = threading.Event()
        self._httpd = None
        self._thread = None
        self._log = None

    # -- life cycle -------------------------------------------------------
    def start(self):
        self._httpd = _Server((self.host, self._port), _Handler)
        self._httpd.owner = self
        self._port = self._httpd.server_address[1]
        if self.log_file:
            self._log = open(self.log_file, "a", buffering=1)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="capture-server", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving; requests that hang are released and closed."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._port

    @property
    def base_url(self):
        return "http://%s:%d" % (self.host, self._port)

    def url(self, path="/"):
        return self.base_url + path

    # -- behaviour --------------------------------------------------------
    def set_behaviour(self, path, *script, default=None, hook=None):
        """Answer `path` with the responses in `script`, in order, then
        with `default` (the server-wide default if None).  Replaces any
        earlier behaviour of that path.  hook: a callable given each
        request (a Captured) first; the response spec it returns answers
        that request, None leaves it to the script and default."""
        if hook is not None and not callable(hook):
            raise ValueError("hook must be callable: %r" % (hook,))
        r = _Route()
        r.script = [normalise_response(s) for s in script]
        r.default = normalise_response(default) if default is not None else None
        r.hook = hook
        with self._lock:
            self._routes[path] = r

    def _next_response(self, route, rec=None):
        with self._lock:
            r = self._routes.get(route)
        if r is None:
            return self.default
        if r.hook is not None and rec is not None:
            # Outside the lock: a hook may look at the recorded requests.
            spec = r.hook(rec)
            if spec is not None:
                return normalise_response(spec)
        with self._lock:
            if r.script:
                return r.script.pop(0)
            return r.default or self.default

    # -- records ----------------------------------------------------------
    def _record(self, t, method, path, headers, body, client_port):
        with self._cond:
            rec = Captured(len(self._reqs) + 1, t, method, path, headers, body,
                           client_port)
            self._reqs.append(rec)
            self._cond.notify_all()
        if self._log:
            try:
                self._log.write(json.dumps(rec.to_dict()) + "\n")
            except ValueError:
                pass
        return rec

    def requests(self, path=None):
        """Recorded requests, oldest first; only those for `path` if given
        (compared without the query string)."""
        with self._lock:
            reqs = list(self._reqs)
        if path is not None:
            reqs = [r for r in reqs if r.route == path]
        return reqs

    def clear(self):
        with self._lock:
            self._reqs = []

    def wait_for(self, predicate, timeout):
        """Wait until predicate(list of all requests) is true; returns the
        list of requests, or None at the deadline."""
        deadline = time.time() + timeout
        with self._cond:
            while True:
                reqs = list(self._reqs)
                if predicate(reqs):
                    return reqs
                left = deadline - time.time()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.1))

    def dump_json(self, indent=None):
        return json.dumps([r.to_dict() for r in self.requests()], indent=indent)

    def dump(self, filename):
        with open(filename, "w") as f:
            f.write(self.dump_json(indent=1))


def _parse_behave(arg):
    """'/path=503,503,200' or '/path=*500' (always) or '/path=503,*200'."""
    path, sep, specs = arg.partition("=")
    if not sep or not path.startswith("/"):
        raise argparse.ArgumentTypeError("expected /path=SPEC[,SPEC...]: %r" % arg)
    script, default = [], None
    for s in specs.split(","):
        s = s.strip()
        if not s:
            continue
        if s.startswith("*"):
            default = s[1:]
        else:
            script.append(s)
    for s in script + ([default] if default else []):
        normalise_response(s)
    return path, script, default


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Record HTTP requests on 127.0.0.1 and answer as scripted.",
        epilog="Control (when running as a program): GET /_capture/requests, "
               "POST /_capture/behaviour {\"path\":..,\"script\":[..],\"default\":..}, "
               "POST /_capture/clear.")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--port-file", help="write the port number to this file")
    ap.add_argument("--default", default="200", help="default response spec")
    ap.add_argument("--behave", action="append", type=_parse_behave, default=[],
                    metavar="/PATH=SPEC,...",
                    help="script for a path, e.g. /webhook=503,503,200 or "
                         "/broken=*500 (a leading * marks the default)")
    ap.add_argument("--log", help="append each request as a JSON line to this file")
    ap.add_argument("--dump", help="write all requests as JSON here on exit")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    srv = CaptureServer(port=args.port, default=args.default, control=True,
                        verbose=args.verbose, log_file=args.log)
    for path, script, default in args.behave:
        srv.set_behaviour(path, *script, default=default)
    srv.start()
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % srv.port)
        os.replace(tmp, args.port_file)
    print("capture server listening on %s" % srv.base_url, flush=True)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    srv.stop()
    if args.dump:
        srv.dump(args.dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
