"""Loopback trackers that misbehave, for the hostile-input tests.

A HostileServer listens on 127.0.0.1 (a free port unless told one),
accepts connections in a thread of its own and runs one behaviour per
connection, in a thread per connection.  It counts what happened:
connections accepted, TLS handshakes that failed, requests read (method,
path, headers, body) and the bytes it managed to send.  It never connects
anywhere itself, and it is standard library only (socket, ssl, threading).

Behaviours, built by the functions below and passed to HostileServer:

    ok(status=200)              a well-formed HTTP/1.1 answer, keep-alive
    huge_body(status, total)    a status line and Content-Length: total,
                                then the body streamed in 64 KiB chunks from
                                a generator until the client hangs up
                                (nothing of that size is ever allocated)
    reset_mid_body(status)      headers and part of the body, then an RST
                                (SO_LINGER 0 close)
    silent()                    read the request, answer nothing; hold the
                                connection until the client closes it or
                                the server stops
    garbage(data)               answer bytes that are not HTTP, then close
    endless_headers()           a status line, then header lines forever
    drip(status)                a well-formed answer, one byte every 50 ms
    redirect(status, location)  a 3xx with a Location header, keep-alive

With ssl_context (a server-side ssl.SSLContext), every connection is
wrapped in TLS first; a handshake the client refuses is counted in
tls_failures and nothing more happens on that connection.
"""

import socket
import ssl
import struct
import threading
import time

READ_TIMEOUT = 15.0         # a client that stalls mid-request is dropped
CHUNK = 64 * 1024


class Request:
    def __init__(self, method, path, headers, body, time_):
        self.method = method
        self.path = path
        self.headers = headers          # list of (name, value)
        self.body = body
        self.time = time_

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class _Conn:
    """A connection with a read buffer, for request parsing."""

    def __init__(self, sock, server):
        self.sock = sock
        self.server = server
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def read_request(self):
        """The next request on the connection, or None when the client
        closed it cleanly before sending one."""
        try:
            while b"\r\n\r\n" not in self.buf:
                if len(self.buf) > 1024 * 1024:
                    raise ValueError("request head too large")
                self._fill()
        except EOFError:
            return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path = (lines[0].split(" ") + ["", ""])[:2]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        n = 0
        for k, v in headers:
            if k.lower() == "content-length":
                n = int(v)
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        req = Request(method, path, headers, body, time.time())
        self.server._record(req)
        return req

    def send(self, data):
        self.sock.sendall(data)
        self.server._sent(len(data))


def _response_head(status, headers, length):
    reason = {200: "OK", 301: "Moved Permanently", 302: "Found",
              307: "Temporary Redirect", 308: "Permanent Redirect",
              500: "Internal Server Error"}.get(status, "Status")
    lines = ["HTTP/1.1 %d %s" % (status, reason)]
    lines += ["%s: %s" % kv for kv in headers]
    lines.append("Content-Length: %d" % length)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def ok(status=200, body=b'{"ok":true}'):
    def run(c):
        while not c.server.stopping.is_set():
            if c.read_request() is None:
                return
            c.send(_response_head(status, [("Content-Type", "application/json")],
                                  len(body)) + body)
    return run


def redirect(status, location):
    def run(c):
        while not c.server.stopping.is_set():
            if c.read_request() is None:
                return
            c.send(_response_head(status, [("Location", location)], 0))
    return run


def _body_chunks(total):
    """The body, lazily: `total` bytes in CHUNK-sized pieces."""
    block = b"x" * CHUNK
    left = total
    while left > 0:
        n = min(CHUNK, left)
        yield block if n == CHUNK else block[:n]
        left -= n


def huge_body(status=200, total=1 << 30):
    def run(c):
        if c.read_request() is None:
            return
        c.send(_response_head(status, [("Content-Type", "application/octet-stream")],
                              total))
        for chunk in _body_chunks(total):
            if c.server.stopping.is_set():
                return
            c.send(chunk)           # raises once the client has hung up
    return run


def reset_mid_body(status=200, declared=100000, sent=1000):
    def run(c):
        if c.read_request() is None:
            return
        c.send(_response_head(status, [("Content-Type", "application/json")], declared))
        c.send(b"{" + b" " * (sent - 1))
        time.sleep(0.05)            # let the part reach the client first
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.server._reset()
    return run


def silent():
    def run(c):
        if c.read_request() is None:
            return
        c.sock.settimeout(0.2)
        while not c.server.stopping.is_set():
            try:
                if not c.sock.recv(4096):
                    return          # the client gave up
            except socket.timeout:
                continue
    return run


def garbage(data=b"\x00\xff\xfeNOT-HTTP \x1b[2J\x07 garbage \xc3\x28 \r\n\r\n"):
    def run(c):
        if c.read_request() is None:
            return
        c.send(data)
    return run


def endless_headers(status=200):
    def run(c):
        if c.read_request() is None:
            return
        c.send(("HTTP/1.1 %d OK\r\n" % status).encode())
        line = b"X-Hostile: " + b"h" * 1000 + b"\r\n"
        block = line * 64
        while not c.server.stopping.is_set():
            c.send(block)           # raises once the client has hung up
    return run


def drip(status=200, interval=0.05):
    def run(c):
        if c.read_request() is None:
            return
        data = _response_head(status, [], 4096) + b" " * 4096
        for i in range(len(data)):
            if c.server.stopping.is_set():
                return
            c.send(data[i:i + 1])
            time.sleep(interval)
    return run


class HostileServer:
    """hs = HostileServer(huge_body(500)).start(); ... hs.url("/x") ...;
    hs.connections, hs.requests, hs.bytes_sent; hs.stop()."""

    def __init__(self, behaviour, ssl_context=None, host="127.0.0.1", port=0):
        self.behaviour = behaviour
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0
        self.tls_failures = 0
        self.resets = 0
        self.requests = []
        self.bytes_sent = 0
        self.errors = []            # exceptions in behaviours other than hang-ups
        self._sock = None
        self._thread = None

    @property
    def scheme(self):
        return "https" if self.ssl_context else "http"

    def url(self, path="/", host=None):
        return "%s://%s:%d%s" % (self.scheme, host or self.host, self.port, path)

    def start(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        s.settimeout(0.1)
        self._sock = s
        self.port = s.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="hostile-accept-%d" % self.port)
        self._thread.start()
        return self

    def stop(self):
        self.stopping.set()
        if self._thread:
            self._thread.join(5)
        if self._sock:
            self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- bookkeeping (called from connection threads) ----------------------
    def _record(self, req):
        with self._lock:
            self.requests.append(req)

    def _sent(self, n):
        with self._lock:
            self.bytes_sent += n

    def _reset(self):
        with self._lock:
            self.resets += 1

    # -- serving ------------------------------------------------------------
    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(READ_TIMEOUT)
        try:
            if self.ssl_context is not None:
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    with self._lock:
                        self.tls_failures += 1
                    return
            self.behaviour(_Conn(conn, self))
        except (EOFError, ConnectionError, socket.timeout, BrokenPipeError):
            pass                    # the client hung up: expected here
        except Exception as e:      # noqa: BLE001 (kept for the test to report)
            with self._lock:
                self.errors.append(repr(e))
        finally:
            try:
                conn.close()
            except OSError:
                pass


def make_tls_material(directory, openssl="openssl"):
    """A throwaway CA and three certificates signed by it, in directory:
    ca.pem (the CA), good.{pem,key} (SAN localhost, 127.0.0.1),
    wronghost.{pem,key} (SAN wrong.example only), badcn.{pem,key} (no
    SAN, a common name holding an ESC character), plus rogue-ca.pem and
    rogue.{pem,key} (SAN localhost, 127.0.0.1, signed by a CA nobody
    trusts).  EC P-256 keys, so it takes a fraction of a second."""
    import os
    import subprocess

    def run(*args):
        subprocess.run([openssl] + list(args), check=True, cwd=directory,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", *ec, "-keyout", ca + ".key", "-out", ca + ".pem",
            "-days", "2", "-subj", "/CN=trace_ext test %s" % ca,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ca, san in (("good", "ca", "DNS:localhost,IP:127.0.0.1"),
                          ("wronghost", "ca", "DNS:wrong.example"),
                          ("rogue", "rogue-ca", "DNS:localhost,IP:127.0.0.1")):
        run("req", *ec, "-keyout", name + ".key", "-out", name + ".csr",
            "-subj", "/CN=%s" % san.split(",")[0].split(":")[1])
        ext = os.path.join(directory, name + ".ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n"
                    "extendedKeyUsage=serverAuth\n" % san)
        run("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
            "-CAcreateserial", "-out", name + ".pem", "-days", "2", "-extfile", ext)
    # No subjectAltName, and a common name with an escape sequence in it:
    # libcurl quotes the peer's name in its error message.
    run("req", *ec, "-keyout", "badcn.key", "-out", "badcn.csr",
        "-subj", "/CN=evil\x1b[31mtracker")
    with open(os.path.join(directory, "badcn.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "badcn.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "badcn.pem", "-days", "2", "-extfile", "badcn.ext")
    for f in os.listdir(directory):
        os.chmod(os.path.join(directory, f), 0o644)
    os.chmod(directory, 0o755)
    return directory


def server_context(directory, name):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain("%s/%s.pem" % (directory, name), "%s/%s.key" % (directory, name))
    return ctx
