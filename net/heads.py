"""Message heads as the other side gets them: the proxy's header rewriting, as pure functions.

No connection objects here: each function takes a parsed head (net/http1.py) and the plain facts
that decide the rewrite (the client's address, whether it is a trusted proxy, TLS, keep-alive), and
returns the bytes to send, so every rule is tested bytes-in/bytes-out (tests/unit/test_heads.py).
Each is called once per head, never per body chunk.

Rules, both directions (RFC 9110 7.6.1):
- Hop-by-hop fields (`HOP_BY_HOP`) are dropped, and so is every field the `Connection` header names,
  except the `PROTECTED` ones: naming Content-Length, Transfer-Encoding or Host in `Connection` is a
  known request-smuggling trick, and X-Forwarded-* are ours to set.
- `Upgrade` survives only on a websocket upgrade (request) and its 101 answer.
- Our own `Connection` field ends the head: `close` when the connection ends after this message,
  `keep-alive` for HTTP/1.0 peers that keep it, nothing when HTTP/1.1's default applies.

Request heads to the backend also get `X-Forwarded-For/-Proto/-Host`: from an untrusted client the
peer's own X-Forwarded-* are replaced by ours; from a trusted proxy (`trusted_proxies`) its
X-Forwarded-For is kept with the client address appended and its -Proto/-Host are kept when present.
"""
from __future__ import annotations

from collections.abc import Iterable

from pmdaemon.net.http1 import RequestHead, ResponseHead, field_value

HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"))
HOP_BY_HOP_BUT_UPGRADE = HOP_BY_HOP - {b"upgrade"}
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"))
DROP_UNTRUSTED = HOP_BY_HOP | _FORWARDED  # the peer's X-Forwarded-* are replaced by ours
DROP_TRUSTED = HOP_BY_HOP | {b"x-forwarded-for"}  # re-added with the peer appended
# Never dropped because a Connection header names them (a known request-smuggling trick).
PROTECTED = frozenset((b"content-length", b"transfer-encoding", b"host")) | _FORWARDED
CRLF = b"\r\n"
_PROTO_HTTPS = b"X-Forwarded-Proto: https\r\n"
_PROTO_HTTP = b"X-Forwarded-Proto: http\r\n"


def _named_by_connection(tokens: list[bytes], drop: frozenset[bytes]) -> frozenset[bytes]:
    """`drop` plus the fields the Connection header names, protected ones excepted. Callers skip the
    call when every token is hop-by-hop already (`close`, `keep-alive`, `upgrade`: nearly every head)."""
    extra = [t for t in tokens if t not in HOP_BY_HOP and t not in PROTECTED]
    return drop.union(extra) if extra else drop


def forward_head(head: RequestHead, client_ip: bytes, trusted: bool, tls: bool, backend_keep_alive: bool) -> bytes:
    """The request head as the backend gets it: hop-by-hop fields dropped, X-Forwarded-* set.

    `client_ip`: the peer's address; `trusted`: the peer is one of `trusted_proxies`; `tls`: the
    client reached us over TLS; `backend_keep_alive`: the backend connection may be reused after
    this exchange (`Connection: close` otherwise)."""
    drop = DROP_TRUSTED if trusted else DROP_UNTRUSTED
    if head.websocket:
        drop = drop - {b"upgrade"}
    tokens = head.connection_tokens
    if tokens and not HOP_BY_HOP.issuperset(tokens):
        drop = _named_by_connection(tokens, drop)
    fields = head.fields
    kept = [line for lname, line in fields if lname not in drop]
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n" if head.version == 11 else b" HTTP/1.0\r\n"]
    if kept:
        parts.append(b"\r\n".join(kept))
        parts.append(CRLF)
    proto = _PROTO_HTTPS if tls else _PROTO_HTTP
    if trusted:
        prior = [field_value(lname, line) for lname, line in fields if lname == b"x-forwarded-for"]
        if prior:
            parts += (b"X-Forwarded-For: ", b", ".join(prior), b", ", client_ip, CRLF)
        else:
            parts += (b"X-Forwarded-For: ", client_ip, CRLF)
        if head.header(b"x-forwarded-proto") is None:
            parts.append(proto)
        if head.host is not None and head.header(b"x-forwarded-host") is None:
            parts += (b"X-Forwarded-Host: ", head.host, CRLF)
    else:
        parts += (b"X-Forwarded-For: ", client_ip, CRLF, proto)
        if head.host is not None:
            parts += (b"X-Forwarded-Host: ", head.host, CRLF)
    if head.websocket:
        parts.append(b"Connection: Upgrade\r\n\r\n")
    elif not backend_keep_alive:
        parts.append(b"Connection: close\r\n\r\n")
    elif head.version == 10:
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(CRLF)
    return b"".join(parts)


def filtered_response(resp: ResponseHead, keep_upgrade: bool) -> list[bytes]:
    """Status line and end-to-end fields of a response, each line CRLF-terminated, as parts to which
    the caller appends its own fields and the blank line."""
    drop = HOP_BY_HOP_BUT_UPGRADE if keep_upgrade else HOP_BY_HOP
    tokens = resp.connection_tokens
    if tokens and not HOP_BY_HOP.issuperset(tokens):
        drop = _named_by_connection(tokens, drop)
    kept = [line for lname, line in resp.fields if lname not in drop]
    if kept:
        return [resp.status_line, CRLF, b"\r\n".join(kept), CRLF]
    return [resp.status_line, CRLF]


def response_head(resp: ResponseHead, client_version: int, keep_alive: bool,
                  extra: Iterable[tuple[bytes, bytes]] | None = None) -> bytes:
    """The final (status >= 200) response head as the client gets it.

    `client_version`: the request's HTTP version (10 or 11); `keep_alive`: the client connection
    stays open after this response; `extra`: (name, value) fields to add, such as a sticky
    session's Set-Cookie."""
    parts = filtered_response(resp, False)
    if extra is not None:
        for name, value in extra:
            parts += (name, b": ", value, CRLF)
    if not keep_alive:
        parts.append(b"Connection: close\r\n\r\n")
    elif client_version == 10:
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(CRLF)
    return b"".join(parts)


def interim_head(resp: ResponseHead) -> bytes:
    """A 1xx interim response (100 Continue, 103 Early Hints) as an HTTP/1.1 client gets it."""
    parts = filtered_response(resp, False)
    parts.append(CRLF)
    return b"".join(parts)


def upgrade_head(resp: ResponseHead) -> bytes:
    """The 101 Switching Protocols answer to a websocket upgrade, `Upgrade` kept."""
    parts = filtered_response(resp, True)
    parts.append(b"Connection: Upgrade\r\n\r\n")
    return b"".join(parts)
