#!/usr/bin/python3
"""The test harness itself: the capture sink answers as scripted and
records faithfully, and a throwaway cluster starts, reloads, stops and
leaves nothing behind.  If these fail, nothing else in test/e2e means
anything.  Needs no trace_ext build."""

import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from capture_server import CaptureServer  # noqa: E402
from cluster import Cluster  # noqa: E402
from tap import Tap  # noqa: E402

t = Tap()


def post(conn, path, body=b'{"a":1}', headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    conn.request("POST", path, body=body, headers=h)
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


with t.case("capture server"):
    srv = CaptureServer().start()
    try:
        t.ok(srv.port > 0, "binds a free port on 127.0.0.1")
        srv.set_behaviour("/s", 503, 503, 200)
        srv.set_behaviour("/always", default=500)
        srv.set_behaviour("/ra", "429;Retry-After=2")
        srv.set_behaviour("/redir", {"status": 302, "headers": {"Location": srv.url("/elsewhere")}})
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        got = [post(conn, "/s")[0] for _ in range(4)]
        t.is_(got, [503, 503, 200, 200], "a script is consumed in order, then the default")
        t.is_([post(conn, "/always")[0] for _ in range(3)], [500] * 3, "an always-500 path")
        st, hd, _ = post(conn, "/ra")
        t.ok(st == 429 and hd.get("Retry-After") == "2", "429 with Retry-After", repr((st, hd)))
        t.is_(post(conn, "/ra")[0], 200, "after the script, the server default (200)")
        st, hd, _ = post(conn, "/redir")
        t.ok(st == 302 and hd.get("Location", "").endswith("/elsewhere"), "302 with Location")
        ports = {r.client_port for r in srv.requests()}
        t.is_(len(ports), 1, "HTTP/1.1 keep-alive: all requests came on one connection")

        post(conn, "/body?x=1", body=b'{"k":"v"}', headers={"X-Thing": "yes"})
        r = srv.requests("/body")[-1]
        t.ok(r.method == "POST" and r.body == b'{"k":"v"}' and r.header("x-thing") == "yes"
             and r.path == "/body?x=1" and abs(r.time - time.time()) < 5,
             "records method, path, headers (case-insensitive lookup), body, time")
        d = json.loads(srv.dump_json())
        t.ok(len(d) == len(srv.requests()) and d[-1]["body"] == '{"k":"v"}',
             "dumps the requests as JSON")

        srv.set_behaviour("/hang", "hang:2")
        c2 = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=0.5)
        t0 = time.time()
        try:
            post(c2, "/hang")
            hung = False
        except (socket.timeout, TimeoutError):
            hung = True
        t.ok(hung and len(srv.requests("/hang")) == 1,
             "hang: the request is recorded and never answered", "elapsed %.2f" % (time.time() - t0))
        srv.set_behaviour("/slow", "delay:0.5")
        c3 = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        t0 = time.time()
        st = post(c3, "/slow")[0]
        t.ok(st == 200 and time.time() - t0 >= 0.45, "delay: answers after the delay")
    finally:
        srv.stop()

with t.case("capture server as a program"):
    import subprocess
    import tempfile
    d = tempfile.mkdtemp()
    pf = os.path.join(d, "port")
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1]
                                            / "lib" / "capture_server.py"),
                          "--port-file", pf, "--behave", "/x=503,*201",
                          "--dump", os.path.join(d, "dump.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if os.path.exists(pf):
                break
            time.sleep(0.05)
        port = int(open(pf).read())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        t.is_([post(conn, "/x")[0] for _ in range(3)], [503, 201, 201],
              "CLI --behave script and default")
        conn.request("POST", "/_capture/behaviour",
                     body=json.dumps({"path": "/y", "script": [422]}))
        conn.getresponse().read()
        t.is_(post(conn, "/y")[0], 422, "behaviour set over the control interface")
        conn.request("GET", "/_capture/requests")
        reqs = json.loads(conn.getresponse().read())
        t.is_([r["path"] for r in reqs], ["/x", "/x", "/x", "/y"],
              "requests listed over the control interface (control calls not recorded)")
    finally:
        p.terminate()
        p.wait(10)
        ok = os.path.exists(os.path.join(d, "dump.json")) and \
            len(json.load(open(os.path.join(d, "dump.json")))) == 4
        t.ok(ok, "dumps requests to a file on SIGTERM")

with t.case("throwaway cluster"):
    c = Cluster(preload=False, settings={"work_mem": "8MB"}, name="trace_harness")
    base = c.base
    try:
        c.init().start()
        conn = c.connect()
        cur = conn.cursor()
        cur.execute("SHOW work_mem")
        t.is_(cur.fetchone()[0], "8MB", "starts with the given settings")
        cur.execute("SELECT inet_server_addr()::text, current_setting('port')::int")
        addr = cur.fetchone()
        t.is_(addr, (None, c.port), "clients connect over the unix socket; port as chosen")
        c.alter_system({"work_mem": "9MB"})
        cur.execute("SHOW work_mem")
        t.is_(cur.fetchone()[0], "9MB", "ALTER SYSTEM + pg_reload_conf, waited for")
        conn.close()
        c.set_conf({"work_mem": "10MB"}, reload=True)
        conn = c.connect()
        cur = conn.cursor()
        cur.execute("SHOW work_mem")
        t.is_(cur.fetchone()[0], "9MB", "postgresql.auto.conf still wins over postgresql.conf")
        conn.close()
        rc, out = c.psql("SELECT 40 + 2", check=False)
        t.ok(rc == 0 and "42" in out, "psql helper")
        t.ok("database system is ready to accept connections" in c.log_text(),
             "server log is readable at log_path")
        took = c.stop()
        t.ok(not c.running, "stops (%.1fs)" % took)
    finally:
        c.destroy()
    t.ok(not os.path.exists(base), "tear-down removes the directory")

sys.exit(t.done())
