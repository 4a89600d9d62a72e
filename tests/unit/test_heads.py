"""Head rewriting (net/heads.py), bytes in, bytes out: what the backend and the client get."""
from __future__ import annotations

import pytest

from pmdaemon.net.heads import forward_head, interim_head, response_head, upgrade_head
from pmdaemon.net.http1 import parse_request_head, parse_response_head

XFF = b"X-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\n"


def request(*lines: str) -> bytes:
    return "\r\n".join(lines).encode()


FORWARD_CASES = [
    # (id, request head, trusted, tls, backend keep-alive, expected head at the backend)
    ("plain", request("GET /a?b=1 HTTP/1.1", "Host: h", "Accept: */*"), False, False, True,
     b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n" + XFF + b"\r\n"),
    ("hop-by-hop dropped",
     request("GET / HTTP/1.1", "Host: h", "Keep-Alive: timeout=5", "Proxy-Connection: x", "TE: trailers",
             "Trailer: X-T", "Upgrade: h2c", "A: 1"), False, False, True,
     b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\n" + XFF + b"\r\n"),
    ("connection close is not forwarded", request("GET / HTTP/1.1", "Host: h", "Connection: close"),
     False, False, True, b"GET / HTTP/1.1\r\nHost: h\r\n" + XFF + b"\r\n"),
    ("fields named by Connection dropped",
     request("GET / HTTP/1.1", "Host: h", "Connection: keep-alive, X-Secret", "X-Secret: s", "B: 2"),
     False, False, True, b"GET / HTTP/1.1\r\nHost: h\r\nB: 2\r\n" + XFF + b"\r\n"),
    ("protected fields survive Connection",
     request("POST / HTTP/1.1", "Host: h", "Content-Length: 3", "Connection: Content-Length, Host"),
     False, False, True, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n" + XFF + b"\r\n"),
    ("untrusted peer's X-Forwarded-* replaced",
     request("GET / HTTP/1.1", "Host: h", "X-Forwarded-For: 6.6.6.6", "X-Forwarded-Proto: https",
             "X-Forwarded-Host: evil"), False, False, True, b"GET / HTTP/1.1\r\nHost: h\r\n" + XFF + b"\r\n"),
    ("trusted proxy: X-Forwarded-For appended, its -Proto/-Host kept",
     request("GET / HTTP/1.1", "Host: h", "X-Forwarded-For: 1.1.1.1", "X-Forwarded-For: 2.2.2.2",
             "X-Forwarded-Proto: https", "X-Forwarded-Host: orig"), True, False, True,
     b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: orig\r\n"
     b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\n\r\n"),
    ("trusted proxy without X-Forwarded-*: ours added", request("GET / HTTP/1.1", "Host: h"), True, False, True,
     b"GET / HTTP/1.1\r\nHost: h\r\n" + XFF + b"\r\n"),
    ("TLS: X-Forwarded-Proto https", request("GET / HTTP/1.1", "Host: h"), False, True, True,
     b"GET / HTTP/1.1\r\nHost: h\r\n" + XFF.replace(b"Proto: http", b"Proto: https") + b"\r\n"),
    ("no backend keep-alive: Connection close", request("GET / HTTP/1.1", "Host: h"), False, False, False,
     b"GET / HTTP/1.1\r\nHost: h\r\n" + XFF + b"Connection: close\r\n\r\n"),
    ("HTTP/1.0 keep-alive to the backend", request("GET / HTTP/1.0", "Connection: keep-alive"), False, False, True,
     b"GET / HTTP/1.0\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nConnection: keep-alive\r\n\r\n"),
    ("websocket upgrade keeps Upgrade",
     request("GET /ws HTTP/1.1", "Host: h", "Connection: Upgrade", "Upgrade: websocket",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"), False, False, True,
     b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
     b"Sec-WebSocket-Version: 13\r\n" + XFF + b"Connection: Upgrade\r\n\r\n"),
    ("duplicate fields keep their order", request("GET / HTTP/1.1", "Host: h", "Cookie: a=1", "Cookie: b=2"),
     False, False, True, b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n" + XFF + b"\r\n"),
]


@pytest.mark.parametrize("raw, trusted, tls, keep, expected", [case[1:] for case in FORWARD_CASES],
                         ids=[case[0] for case in FORWARD_CASES])
def test_forward_head(raw: bytes, trusted: bool, tls: bool, keep: bool, expected: bytes) -> None:
    assert forward_head(parse_request_head(raw), b"10.0.0.9", trusted, tls, keep) == expected


COOKIE = [(b"Set-Cookie", b"lb=abc; Path=/; HttpOnly")]
RESPONSE_CASES = [
    # (id, response head, client HTTP version, keep the client connection, extra fields, expected)
    ("keep-alive HTTP/1.1", b"HTTP/1.1 200 OK\r\nContent-Length: 2", 11, True, None,
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
    ("closing", b"HTTP/1.1 200 OK\r\nContent-Length: 2", 11, False, None,
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"),
    ("HTTP/1.0 client kept alive", b"HTTP/1.1 200 OK\r\nContent-Length: 2", 10, True, None,
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"),
    ("hop-by-hop and Connection-named fields dropped",
     b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nKeep-Alive: timeout=5\r\nX-Internal: 1\r\n"
     b"Upgrade: h2\r\nContent-Length: 0", 11, True, None, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("Connection may not drop Content-Length", b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 0",
     11, True, None, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("sticky Set-Cookie added", b"HTTP/1.1 200 OK\r\nContent-Length: 0", 11, True, COOKIE,
     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nSet-Cookie: lb=abc; Path=/; HttpOnly\r\n\r\n"),
    ("no fields at all", b"HTTP/1.1 204 No Content", 11, True, None, b"HTTP/1.1 204 No Content\r\n\r\n"),
]


@pytest.mark.parametrize("raw, version, keep, extra, expected", [case[1:] for case in RESPONSE_CASES],
                         ids=[case[0] for case in RESPONSE_CASES])
def test_response_head(raw: bytes, version: int, keep: bool, extra, expected: bytes) -> None:
    assert response_head(parse_response_head(raw, b"GET"), version, keep, extra) == expected


def test_interim_head_is_relayed_without_hop_by_hop_fields() -> None:
    resp = parse_response_head(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x", b"GET")
    assert interim_head(resp) == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"


def test_upgrade_head_keeps_upgrade() -> None:
    resp = parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"GET")
    assert upgrade_head(resp) == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nConnection: Upgrade\r\n\r\n")
