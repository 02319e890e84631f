"""S3 helpers for the end-to-end tests of the file adapter.

S3rver: a real S3-compatible server (the npm package s3rver), started on
127.0.0.1 with a port the kernel picks, a throwaway directory and one
bucket, read back with plain path-style HTTP GETs.  Its program is found
at $TRACE_S3RVER (default /tmp/trace_ext_npm/node_modules/.bin/s3rver);
a missing program is an error, never a reason to skip.

verify_sigv4: s3rver does not check signatures, so a PUT captured by our
own HTTP sink is verified independently with botocore: the same method,
URL, headers and body are signed with botocore's S3SigV4Auth at the
captured X-Amz-Date, over the same SignedHeaders, and the two
Authorization headers must be equal.
"""

import datetime
import hashlib
import http.client
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import types
import xml.etree.ElementTree as ET
from unittest import mock
from urllib.parse import quote

DEFAULT_S3RVER = "/tmp/trace_ext_npm/node_modules/.bin/s3rver"
S3RVER_KEY = "S3RVER"          # s3rver's default credentials
S3RVER_SECRET = "S3RVER"
AUTH_RX = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<cred>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<sig>[0-9a-f]{64})$")


class S3Error(RuntimeError):
    pass


def s3rver_path():
    return os.environ.get("TRACE_S3RVER") or DEFAULT_S3RVER


def encode_key(key):
    """A key as it appears in a path-style URL and in SigV4's canonical
    URI for S3: every byte but unreserved ones and '/' percent-encoded
    (upper-case hex)."""
    return quote(key, safe="/", encoding="utf-8")


def object_key(prefix, utc_date, trade_id):
    """<prefix><YYYY>/<MM>/<DD>/<trade_id>.json"""
    return "%s%04d/%02d/%02d/%d.json" % (prefix, utc_date.year, utc_date.month,
                                         utc_date.day, trade_id)


class S3rver:
    """s3rver on 127.0.0.1 (port picked by the kernel) with one bucket.

        s3 = S3rver("trace-bucket").start()
        status, headers, body = s3.get("some/key.json")
        s3.keys(prefix="some/")
        s3.stop()
    """

    def __init__(self, bucket, program=None):
        self.bucket = bucket
        self.program = program or s3rver_path()
        self.dir = None
        self.proc = None
        self.port = None
        self._out = []
        self._reader = None

    def start(self, timeout=30):
        if not (os.path.isfile(self.program) and os.access(self.program, os.X_OK)):
            raise S3Error("s3rver not found at %s (set TRACE_S3RVER, or run "
                          "`npm install --prefix /tmp/trace_ext_npm s3rver@3.7.1`)"
                          % self.program)
        self.dir = tempfile.mkdtemp(prefix="trace_e2e_s3rver_", dir="/tmp")
        self.proc = subprocess.Popen(
            [self.program, "-d", self.dir, "-a", "127.0.0.1", "-p", "0",
             "--configure-bucket", self.bucket],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        found = threading.Event()

        def read():
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._out.append(line)
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()
        self._reader = threading.Thread(target=read, name="s3rver-out", daemon=True)
        self._reader.start()
        deadline = time.time() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.time() > deadline:
                out = self.output()
                self.stop()
                raise S3Error("s3rver did not start:\n" + out)
        # The bucket exists once s3rver listens; make sure it answers.
        while True:
            try:
                status, _, body = self.request("GET", "/%s?list-type=2" % self.bucket)
                if status == 200:
                    break
                err = "GET bucket: %d %r" % (status, body[:300])
            except OSError as e:
                err = str(e)
            if time.time() > deadline:
                self.stop()
                raise S3Error("s3rver bucket %s not ready: %s" % (self.bucket, err))
            time.sleep(0.1)
        return self

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def output(self):
        return "\n".join(self._out[-50:])

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.port

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def get(self, key):
        """Plain path-style GET of an object: (status, headers, body)."""
        return self.request("GET", "/%s/%s" % (self.bucket, encode_key(key)))

    def keys(self, prefix=""):
        """Every key of the bucket under prefix (ListObjectsV2, paged)."""
        out, token = [], None
        while True:
            q = "list-type=2&prefix=" + quote(prefix, safe="")
            if token:
                q += "&continuation-token=" + quote(token, safe="")
            status, _, body = self.request("GET", "/%s?%s" % (self.bucket, q))
            if status != 200:
                raise S3Error("ListObjectsV2: %d %r" % (status, body[:300]))
            root = ET.fromstring(body)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            out += [e.text for e in root.iter(ns + "Key")]
            trunc = root.find(ns + "IsTruncated")
            token_el = root.find(ns + "NextContinuationToken")
            if trunc is None or trunc.text != "true" or token_el is None:
                return out
            token = token_el.text


# -- SigV4, verified by botocore -----------------------------------------

def parse_authorization(value):
    """The parts of an AWS4-HMAC-SHA256 Authorization header, or None."""
    m = AUTH_RX.match(value or "")
    if not m:
        return None
    cred = m.group("cred").split("/")
    return {
        "credential": m.group("cred"),
        "key_id": "/".join(cred[:-4]) if len(cred) >= 5 else None,
        "scope": cred[-4:] if len(cred) >= 5 else None,  # date, region, service, aws4_request
        "signed_headers": m.group("signed").split(";"),
        "signature": m.group("sig"),
    }


class SigV4Check:
    """What verify_sigv4 found; ok when botocore signs the request as it
    was received to the same Authorization header."""

    def __init__(self):
        self.problems = []
        self.auth = None             # parsed captured Authorization
        self.sent_authorization = None
        self.expected = None         # botocore's Authorization header
        self.canonical_request = None
        self.string_to_sign = None
        self.client_canonical_request = None   # see verify_sigv4

    @property
    def ok(self):
        return not self.problems

    def report(self):
        out = list(self.problems)
        out.append("sent Authorization:     %s" % self.sent_authorization)
        out.append("botocore Authorization: %s" % self.expected)
        out.append("botocore canonical request (the request as received):\n%s"
                   % self.canonical_request)
        out.append("botocore string to sign:\n%s" % self.string_to_sign)
        if self.client_canonical_request:
            out.append("canonical request the client's signature matches:\n%s"
                       % self.client_canonical_request)
        return "\n".join(out)


def _botocore_sign(method, url, headers, body, key_id, secret_key, region,
                   service, signed, amz_date):
    """Sign with botocore's S3SigV4Auth at amz_date over exactly the
    headers named in `signed`; returns (Authorization, canonical request,
    string to sign, the signed request's headers)."""
    # Imported here so that a missing python3-botocore fails the check
    # with its message instead of failing the whole script's import.
    import botocore.auth
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.compat import HTTPHeaders
    from botocore.credentials import Credentials

    fixed = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")

    class _AtCapturedTime(datetime.datetime):
        @classmethod
        def utcnow(cls):
            return fixed

    class _SameSignedHeaders(S3SigV4Auth):
        # A verifier signs what the client says it signed (botocore's own
        # choice would leave out user-agent and expect).
        def headers_to_sign(self, request):
            hm = HTTPHeaders()
            for name, value in request.headers.items():
                if name.lower() in signed:
                    hm[name.lower()] = value
            return hm

    sent = HTTPHeaders()
    for k, v in headers:
        if k.lower() != "authorization":
            sent[k] = v         # appends: a repeated header stays repeated
    req = AWSRequest(method=method, url=url, data=body, headers=sent)
    signer = _SameSignedHeaders(Credentials(key_id, secret_key), service, region)
    # botocore takes the signing time from datetime.datetime.utcnow() in
    # botocore.auth; give it the captured X-Amz-Date.
    with mock.patch.object(botocore.auth, "datetime",
                           types.SimpleNamespace(datetime=_AtCapturedTime)):
        signer.add_auth(req)
        canonical = signer.canonical_request(req)
        sts = signer.string_to_sign(req, canonical)
    return req.headers.get("Authorization"), canonical, sts, req.headers


def verify_sigv4(method, url, headers, body, secret_key, region, service="s3"):
    """Recompute the SigV4 signature of a captured request with botocore.

    headers: list of (name, value) as received.  The captured request's
    own X-Amz-Date is the signing time and its SignedHeaders the headers
    signed, as a server verifies it.  A header named in SignedHeaders but
    not received is a failure (a server cannot verify it); to say what the
    client signed instead, the canonical request with such headers given
    empty values is tried too and shown when it matches.
    """
    res = SigV4Check()
    hmap = {}
    for k, v in headers:
        hmap.setdefault(k.lower(), []).append(v)
    res.sent_authorization = (hmap.get("authorization") or [None])[0]
    auth = parse_authorization(res.sent_authorization)
    res.auth = auth
    if auth is None:
        res.problems.append("Authorization is not 'AWS4-HMAC-SHA256 Credential=..., "
                            "SignedHeaders=..., Signature=<64 hex>'")
        return res
    amz_date = (hmap.get("x-amz-date") or [None])[0]
    if not amz_date or not re.fullmatch(r"\d{8}T\d{6}Z", amz_date):
        res.problems.append("X-Amz-Date missing or not YYYYMMDDTHHMMSSZ: %r" % amz_date)
        return res
    signed = auth["signed_headers"]
    key_id = auth["key_id"] or ""
    missing = [h for h in signed if h not in hmap]
    if missing:
        res.problems.append("SignedHeaders names header(s) that were not sent: %s "
                            "(a server cannot verify this signature)" % ", ".join(missing))

    res.expected, res.canonical_request, res.string_to_sign, signed_headers = _botocore_sign(
        method, url, headers, body, key_id, secret_key, region, service, signed, amz_date)
    exp = parse_authorization(res.expected)
    if exp is None:
        res.problems.append("botocore produced no Authorization header")
    elif exp["signature"] != auth["signature"]:
        res.problems.append("signature differs: sent %s, botocore %s"
                            % (auth["signature"], exp["signature"]))
    elif res.expected != "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=%s, Signature=%s" % (
            auth["credential"], ";".join(signed), auth["signature"]):
        res.problems.append("Authorization differs in form from botocore's")
    if signed_headers.get("X-Amz-Date") != amz_date:
        res.problems.append("botocore signed at %r, not the captured %r"
                            % (signed_headers.get("X-Amz-Date"), amz_date))
    body_hash = hashlib.sha256(body).hexdigest()
    if signed_headers.get("X-Amz-Content-SHA256") != body_hash:
        res.problems.append("botocore's payload hash %r is not sha256(body) %s"
                            % (signed_headers.get("X-Amz-Content-SHA256"), body_hash))
    if missing and exp is not None and exp["signature"] != auth["signature"]:
        alt = _botocore_sign(method, url, list(headers) + [(h, "") for h in missing], body,
                             key_id, secret_key, region, service, signed, amz_date)
        alt_auth = parse_authorization(alt[0])
        if alt_auth and alt_auth["signature"] == auth["signature"]:
            res.client_canonical_request = alt[1]
            res.problems.append("the sent signature matches a canonical request in which "
                                "%s is signed with an empty value, although it was not sent"
                                % ", ".join(missing))
    return res
