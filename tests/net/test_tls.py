"""TLS termination on HTTP listeners and `backend_protocol: "https"`, over real sockets with a trustme CA."""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings

import pytest
import trustme

from pmdaemon.config.model import BackendTls, Limits
from pmdaemon.net.snapshot import BackendView, PoolSnapshot
from pmdaemon.states import BackendState

from support.backends import RecordingBackend, pattern_bytes
from support.http import get, https
from support.looprunner import TlsFiles, running_loops


@pytest.fixture
def backend():
    server = RecordingBackend("b0")
    yield server
    server.stop()


@pytest.fixture
def balancer():
    """balancer(ports, **listener options) -> a running HTTP(S) listener; closed at teardown."""
    with running_loops() as start:
        yield start


@pytest.fixture
def tls_files(tmp_path):
    return TlsFiles(tmp_path)


def header(request: dict, name: str) -> str | None:
    return next((v for n, v in request["headers"] if n.lower() == name.lower()), None)


@pytest.mark.parametrize("key_type", [trustme.KeyType.RSA, trustme.KeyType.ECDSA])
def test_https_through_the_balancer(backend, balancer, tmp_path, key_type):
    files = TlsFiles(tmp_path, key_type)
    lb = balancer([backend.port], ssl=files.ssl_config())
    conn = https(lb.port, files)
    status, _headers, body = get(conn, "/hello")
    assert (status, body) == (200, b"b0 GET /hello")
    status, _headers, body = get(conn, "/again")  # keep-alive over the same TLS connection
    assert (status, body) == (200, b"b0 GET /again")
    served = ssl.DER_cert_to_PEM_cert(conn.sock.getpeercert(binary_form=True))
    assert served.strip() == files.cert_file.read_text().strip()
    conn.close()
    assert header(backend.requests[0], "X-Forwarded-Proto") == "https"
    assert backend.accepts == 1


def test_large_bodies_both_ways_over_tls(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config())
    conn = https(lb.port, tls_files, timeout=30)
    body = pattern_bytes(3 << 20)
    conn.request("POST", "/sha", body=body)
    response = conn.getresponse()
    assert response.read().decode() == hashlib.sha256(body).hexdigest()
    status, _headers, data = get(conn, f"/big/{5 << 20}")
    assert status == 200 and data == pattern_bytes(5 << 20)
    conn.close()


def test_alpn_negotiates_http11(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config())
    context = tls_files.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", lb.port), timeout=5),
                             server_hostname="127.0.0.1") as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_key_exchange_groups_are_mozilla_intermediate_with_x25519_first(backend, balancer, tls_files):
    """sslyze's intermediate check rejects servers that accept X448 or secp521r1; X25519, the group
    clients send their first key share for, is taken without a HelloRetryRequest (one ClientHello)."""
    lb = balancer([backend.port], ssl=tls_files.ssl_config())

    def handshake(groups: str, version: str) -> bytes | None:
        """s_client's -msg trace of a completed handshake, or None when it failed."""
        result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{lb.port}", "-groups", groups,
                                 version, "-msg"], input=b"", capture_output=True, timeout=10)
        done = b"Cipher is" in result.stdout and b"Cipher is (NONE)" not in result.stdout
        return result.stdout if done else None

    assert handshake("P-256", "-tls1_2") is not None
    for group in ("P-256", "P-384"):  # (TLS 1.2 with an ECDSA P-256 certificate needs P-256 offered)
        assert handshake(group, "-tls1_3") is not None, group
    trace = handshake("X25519:P-256", "-tls1_3")
    assert b"Server Temp Key: X25519" in trace
    assert trace.count(b"ClientHello") == 1
    for group in ("X448", "secp521r1"):
        assert handshake(group, "-tls1_3") is None


def test_old_tls_versions_refused_without_harm_to_others(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config())
    good = https(lb.port, tls_files)
    assert get(good, "/before")[0] == 200
    for version in ("TLSv1", "TLSv1_1"):
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer the old versions at all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated is the point here
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = getattr(ssl.TLSVersion, version)
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):  # the balancer's refusal
            with old.wrap_socket(socket.create_connection(("127.0.0.1", lb.port), timeout=5)):
                pass
    assert get(good, "/after")[0] == 200  # same keep-alive connection, unharmed
    assert get(https(lb.port, tls_files), "/fresh")[0] == 200


def test_protocols_tls13_only_refuses_tls12(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config(protocols=("TLSv1.3",)))
    context = tls_files.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        context.wrap_socket(socket.create_connection(("127.0.0.1", lb.port), timeout=5), server_hostname="127.0.0.1")
    conn = https(lb.port, tls_files)
    assert get(conn, "/")[0] == 200
    assert conn.sock.version() == "TLSv1.3"


def test_plain_http_on_the_tls_port_gets_400(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config())
    good = https(lb.port, tls_files)
    assert get(good, "/before")[0] == 200
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while True:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"https://" in answer
    assert get(good, "/after")[0] == 200
    assert [r["target"] for r in backend.requests] == ["/before", "/after"]


def test_stalled_handshake_closed_at_its_deadline(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config(), limits=Limits(header_timeout=0.5))
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as stalled:
        started = time.monotonic()
        assert get(https(lb.port, tls_files), "/meanwhile")[0] == 200  # the loop is not blocked
        assert stalled.recv(10) == b""
        assert 0.4 < time.monotonic() - started < 3


def test_half_sent_client_hello_closed_at_its_deadline(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config(), limits=Limits(header_timeout=0.5))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = tls_files.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as stalled:
        stalled.sendall(hello[: len(hello) // 2])
        started = time.monotonic()
        assert stalled.recv(10) == b""
        assert time.monotonic() - started < 3


def test_sticky_cookie_is_secure_under_tls(backend, balancer, tls_files):
    lb = balancer([backend.port], ssl=tls_files.ssl_config(), strategy="sticky_sessions")
    _status, headers, _body = get(https(lb.port, tls_files), "/")
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("PMDAEMON_SESSION=") and "; Secure" in cookie and "HttpOnly" in cookie


def test_certificates_are_read_again_for_a_new_listener(backend, balancer, tmp_path):
    """A reload builds contexts afresh (add_listener): renewed certificate files take effect."""
    old = TlsFiles(tmp_path)
    trusts_old = old.client_context()
    lb = balancer([backend.port], ssl=old.ssl_config())
    renewed = TlsFiles(tmp_path)  # same paths, new CA and certificate
    cfg = dataclasses.replace(lb.cfg, index=1)
    lb.loop.add_listener(cfg)
    lb.loop.publish(PoolSnapshot(1, 1, (BackendView(0, "127.0.0.1", backend.port, None, 1, BackendState.UP),)))
    port = lb.loop.listening_address(1)[1]
    assert get(https(port, renewed), "/new")[0] == 200
    assert get(https(lb.port, trusts_old), "/old")[0] == 200  # the running listener keeps its context
    with pytest.raises(ssl.SSLCertVerificationError):
        get(https(port, trusts_old), "/")


def test_unreadable_certificate_is_a_clear_error(balancer, tmp_path):
    files = TlsFiles(tmp_path)
    files.key_file.write_text("not a key")
    with pytest.raises(ValueError, match="cannot load the certificate"):
        balancer([1], ssl=files.ssl_config())


# ---- backend_protocol: "https" -----------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"tls backend saw {self.path} over {self.connection.version()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def tls_backend(tmp_path):
    """An HTTPS backend with a certificate for 127.0.0.1 from its own trustme CA."""
    files = TlsFiles(tmp_path, name="backend")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files.cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.files = files
    yield server
    server.shutdown()
    server.server_close()


def test_backend_https_verified(tls_backend, balancer):
    lb = balancer([tls_backend.server_address[1]], backend_protocol="https",
                  backend_tls=BackendTls(verify=True, ca_file=str(tls_backend.files.ca_file)))
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    status, _headers, body = get(conn, "/x")
    assert status == 200 and body.startswith(b"tls backend saw /x over TLSv1.")
    assert get(conn, "/y")[0] == 200


def test_backend_https_untrusted_certificate_is_502(tls_backend, balancer, tmp_path):
    stranger = TlsFiles(tmp_path, name="stranger")
    lb = balancer([tls_backend.server_address[1]], backend_protocol="https",
                  backend_tls=BackendTls(verify=True, ca_file=str(stranger.ca_file)))
    status, _headers, body = get(http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10), "/x")
    assert status == 502 and b"CERTIFICATE_VERIFY_FAILED" in body
    assert lb.wait_outcomes(1)[-1].error == "connect"


def test_backend_https_verify_false_skips_the_check(tls_backend, balancer):
    lb = balancer([tls_backend.server_address[1]], backend_protocol="https", backend_tls=BackendTls(verify=False))
    status, _headers, body = get(http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10), "/x")
    assert status == 200 and body.startswith(b"tls backend saw /x")


def test_tls_both_sides(tls_backend, balancer, tls_files):
    lb = balancer([tls_backend.server_address[1]], ssl=tls_files.ssl_config(), backend_protocol="https",
                  backend_tls=BackendTls(ca_file=str(tls_backend.files.ca_file)))
    status, _headers, body = get(https(lb.port, tls_files), "/both")
    assert status == 200 and body.startswith(b"tls backend saw /both")
