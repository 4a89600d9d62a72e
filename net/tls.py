"""TLS for the I/O loop: contexts, non-blocking sockets, handshakes with a deadline.

Theory of operation
-------------------
The loop's channels (net/channel.py) speak the plain non-blocking socket contract: `recv()` returns
bytes, b"" at end of stream, or raises `BlockingIOError`; `send()` returns how many bytes it took or
raises `BlockingIOError`. `TlsSocket` is an `ssl.SSLSocket` (so the selector, `setsockopt` and
`shutdown` work on it as on any socket) that keeps that contract, which lets the HTTP proxy and the
TCP shuttle run unchanged over TLS:

- `recv`: OpenSSL's "want read" (a record arrived only in part) and "want write" become
  `BlockingIOError`. A clean close_notify and a peer that just closed both read as b"". After each
  read, what OpenSSL already decrypted but did not return (`pending()`) is taken too: the selector
  cannot see bytes that left the kernel, so they must not be left behind.
- `send`: OpenSSL writes all or nothing; "want write" becomes `BlockingIOError` and the channel keeps
  the bytes and offers them again, unchanged at the front, when the socket is writable, which is
  what OpenSSL requires of a retried write (the buffer may move: Python sets
  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER).
- `shutdown(SHUT_WR)`: a close_notify, then the TCP FIN; reading goes on (TLS 1.3 half-close). The
  caller must have read everything the kernel holds first: OpenSSL's second shutdown step reads one
  record, and an application record found there is an error (APPLICATION_DATA_AFTER_CLOSE_NOTIFY) that
  kills the session. That error is raised, never swallowed, so a lost record is never silent.

A handshake never blocks: `ServerHandshake` is a channel that calls `do_handshake()` whenever the
socket is ready the way OpenSSL last asked for (read or write interest, never both, so a readable
socket cannot spin while OpenSSL waits to write), under one deadline for the whole handshake
(`limits.header_timeout`). When it completes, the channel leaves the selector and hands the socket to
its owner, which builds the real connection on it. Backend connections (`backend_protocol: "https"`)
do the same after their TCP connect, within the connect deadline (`TlsBackendConnection`).

Contexts are made once per listener, outside the loop thread (reading certificate files is disk I/O),
by `server_context` and `backend_context`; each call reads the files again, so a reload that calls
them again picks up renewed certificates.
"""
from __future__ import annotations

import _ssl
import ctypes
import errno
import functools
import logging
import socket
import ssl
from typing import Protocol

from pmdaemon.config.model import ListenerConfig, SslConfig
from pmdaemon.net.channel import Channel
from pmdaemon.net.responses import lb_response
from pmdaemon.net.upstream import BackendConnection

# Mozilla's "intermediate" TLS 1.2 cipher list (ssl-config.mozilla.org, guideline 5.7). TLS 1.3 suites
# are OpenSSL's defaults, which are exactly Mozilla's. The DHE suites take effect only where OpenSSL
# has Diffie-Hellman parameters; ECDHE over MOZILLA_GROUPS is what clients get in practice.
MOZILLA_INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))
# Mozilla intermediate's key exchange groups, X25519 first: OpenSSL, curl, Python and browsers send
# their first key share for X25519, so offering it avoids a HelloRetryRequest per handshake.
MOZILLA_GROUPS = b"X25519:prime256v1:secp384r1"
TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
HTTP_ALPN = ("http/1.1",)
log = logging.getLogger(__name__)
PLAIN_HTTP_ANSWER = lb_response(400, "this port speaks HTTPS; a plain HTTP request was sent to it "
                                     "(use https://)", False)


class _SslConnection(Protocol):
    """What TlsSocket calls on `_ssl._SSLSocket`, the C-level SSL object behind an SSLSocket (the stdlib's type
    stubs leave that class out)."""

    def read(self, size: int, /) -> bytes: ...

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def pending(self) -> int: ...


class TlsSocket(ssl.SSLSocket):
    """An SSLSocket that honours the non-blocking socket contract the loop's channels rely on."""

    _sslobj: _SslConnection | None  # set by SSLSocket itself; None until the socket is wrapped

    # recv and send call the C-level SSL object (`_sslobj`) directly, as SSLSocket.read and .send do
    # once past their checks (one Python frame per call instead of three on the per-request path);
    # an unwrapped socket (no `_sslobj`) or flags take SSLSocket's own route.
    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        sslobj = self._sslobj
        if sslobj is None or flags:
            return super().recv(bufsize, flags)
        try:
            data = sslobj.read(bufsize)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS record not complete yet") from None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a close without one
            return b""
        if not data:
            return data
        pending = sslobj.pending()
        if not pending:
            return data
        parts = [data]
        while pending:
            try:
                more = sslobj.read(pending)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not more:
                break
            parts.append(more)
            pending = sslobj.pending()
        return b"".join(parts)

    def send(self, data, flags: int = 0) -> int:
        sslobj = self._sslobj
        if sslobj is None or flags:
            return super().send(data, flags)
        try:
            return sslobj.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError(errno.EAGAIN, "TLS write must be retried") from None

    def shutdown(self, how: int) -> None:
        """close_notify, then the TCP shutdown; unlike SSLSocket.shutdown, reading TLS goes on."""
        if how != socket.SHUT_RD and self._sslobj is not None:
            try:
                self.unwrap()  # sends close_notify; completes only if the peer's arrived already
            except ssl.SSLWantReadError:
                pass  # the peer's close_notify is still to come: the normal half-close
            except ssl.SSLWantWriteError:
                pass  # no room for the alert: the FIN below still ends the stream
        socket.socket.shutdown(self, how)


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    """The OpenSSL that Python's `ssl` runs on (dlsym through `_ssl` finds the libssl it links)."""
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    return lib


def _openssl_context_pointer(lib: ctypes.CDLL, context: ssl.SSLContext) -> int | None:
    """The `SSL_CTX *` behind `context`, or None when it cannot be confirmed.

    CPython's SSLContext object is `PyObject_HEAD` followed by the `SSL_CTX *` (Modules/_ssl.c, every
    3.x). The pointer read there is used only after OpenSSL, asked through it, reports the options
    the context reports; any mismatch means a layout we do not know, and None."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != context.options:
        return None
    return pointer


_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is this SSL_CTX_ctrl call (openssl/ssl.h)


def set_groups(context: ssl.SSLContext, groups: bytes) -> bool:
    """Set the key exchange groups a context offers, most preferred first (OpenSSL's
    `SSL_CTX_set1_groups_list`; Python's `ssl` only has `set_ecdh_curve`, one group). False, with
    the context unchanged, where OpenSSL cannot be reached this way."""
    lib = _libssl()
    pointer = None if lib is None else _openssl_context_pointer(lib, context)
    if lib is None or pointer is None:
        log.warning("cannot set the TLS key exchange groups through OpenSSL; offering P-256 only")
        return False
    return lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups) == 1


def server_context(cfg: SslConfig, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A fresh server context for one listener: its certificate (PEM, RSA or ECDSA) read now, TLS
    versions from `protocols`, Mozilla intermediate ciphers and groups, client cipher preference (Mozilla's
    choice for intermediate), no renegotiation, ALPN `alpn` when given. Raises OSError or
    ssl.SSLError when the files cannot be read or do not belong together."""
    assert cfg.cert_file is not None, "the config loader requires cert_file where ssl is enabled"
    versions = [TLS_VERSIONS[name] for name in cfg.protocols]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = min(versions)
    context.maximum_version = max(versions)
    context.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # OpenSSL's default groups also offer X448 and secp521r1, which Mozilla's intermediate profile
    # rejects (sslyze flags them).
    if not set_groups(context, MOZILLA_GROUPS):
        context.set_ecdh_curve("prime256v1")  # one group every client supports, at a retry's cost
    context.load_cert_chain(cfg.cert_file, cfg.key_file)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    context.sslsocket_class = TlsSocket
    return context


def backend_context(cfg: ListenerConfig, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """The client context for `backend_protocol: "https"`: certificates verified against `ca_file`
    (or the system store) and the backend's host or IP, unless `verify: false`."""
    tls = cfg.backend_tls
    context = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(list(alpn))
    context.sslsocket_class = TlsSocket
    return context


def handshake_step(channel) -> bool:
    """One `do_handshake()` on `channel.sock`: True when done; False when OpenSSL waits for the socket
    (the channel's interest is set to what it waits for, via `channel.tls_wants_write`). Raises
    ssl.SSLError / OSError when the handshake failed."""
    try:
        channel.sock.do_handshake()
    except ssl.SSLWantReadError:
        channel.tls_wants_write = False
        channel.reading = True
    except ssl.SSLWantWriteError:
        channel.tls_wants_write = True
        channel.reading = False
    else:
        channel.tls_wants_write = False
        channel.reading = True
        return True
    channel._update_events()
    return False


def is_plain_http(exc: ssl.SSLError) -> bool:
    """OpenSSL saw an HTTP request where a ClientHello should be."""
    return getattr(exc, "reason", None) == "HTTP_REQUEST"


class ServerHandshake(Channel):
    """The server side of a handshake on an accepted socket, before the connection is served.

    `owner` (the listener) provides `loop`, `tls_context`, `handshake_timeout`, `write_timeout`,
    `answers_plain_http` (an HTTP listener answers a plain HTTP request with 400), `handshakes` (a
    set this channel stays in while it runs) and the callbacks `tls_ready(sock, ip)` (the handshake
    completed: serve `sock`) and `tls_failed()` (the connection is closed already)."""

    __slots__ = ("owner", "ip", "tls_wants_write")

    def __init__(self, owner, sock: socket.socket, ip: str):
        sock.setblocking(False)
        tls_sock = owner.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        super().__init__(owner.loop, tls_sock, owner.write_timeout)
        self.owner = owner
        self.ip = ip
        self.tls_wants_write = False
        owner.handshakes.add(self)
        self.set_deadline(self.loop.now + owner.handshake_timeout)
        # The ClientHello has usually arrived by the time the connection is accepted: answer it now
        # rather than one selector round later (the step registers the interest OpenSSL asks for).
        self._step()

    def _wants_write(self) -> bool:
        return self.tls_wants_write

    def on_readable(self) -> None:
        self._step()

    def on_writable(self) -> None:
        self._step()

    def _step(self) -> None:
        try:
            done = handshake_step(self)
        except ssl.SSLError as exc:
            if is_plain_http(exc) and self.owner.answers_plain_http:
                self._answer_plain_http()
            self._fail(f"TLS handshake failed: {exc.reason or exc}")
            return
        except OSError as exc:
            self._fail(f"TLS handshake failed: {exc.strerror or exc}")
            return
        if done:
            self._hand_over()

    def _answer_plain_http(self) -> None:
        """Best effort, like nginx's 400 'plain HTTP request was sent to HTTPS port': take what the
        client sent (so closing does not reset the answer away), answer in clear text, send FIN."""
        raw = socket.socket
        try:
            raw.recv(self.sock, 65536)
        except OSError:
            pass
        try:
            raw.send(self.sock, PLAIN_HTTP_ANSWER)
            raw.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass

    def _hand_over(self) -> None:
        """Leave the selector without closing the socket; the owner builds the connection on it."""
        if self.events:
            self.loop.selector.unregister(self.sock)
            self.events = 0
        self.closed = True  # stale timer entries and ready events for this object are ignored
        self._drop_timer()
        self.owner.handshakes.discard(self)
        self.owner.tls_ready(self.sock, self.ip)

    def _fail(self, why: str) -> None:
        log.debug("connection from %s closed: %s", self.ip, why)
        self.close()
        self.owner.tls_failed()

    def on_timeout(self, now: float) -> None:
        self._fail(f"TLS handshake not completed within {self.owner.handshake_timeout:g} s")

    def on_error(self, exc: OSError) -> None:
        self._fail(f"TLS handshake failed: {exc.strerror or exc}")

    def close(self) -> None:
        self.owner.handshakes.discard(self)
        Channel.close(self)


class TlsBackendConnection(BackendConnection):
    """A pooled HTTP backend connection that speaks TLS (`backend_protocol: "https"`): after the TCP
    connect it wraps the socket with the pool's `tls_context` and completes the handshake, all within
    the connect deadline, before the owner hears `upstream_connected`. A certificate that fails
    verification is a connect failure (the request goes to another backend, else 502)."""

    __slots__ = ("tcp_connected", "tls_wants_write")

    def __init__(self, pool, view, address: tuple, owner):
        self.tcp_connected = False
        self.tls_wants_write = False
        super().__init__(pool, view, address, owner)

    def _wants_write(self) -> bool:
        return not self.connected and (not self.tcp_connected or self.tls_wants_write)

    def on_writable(self) -> None:
        if self.connected:
            BackendConnection.on_writable(self)
            return
        if not self.tcp_connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._connect_failed(OSError(err, errno.errorcode.get(err, "connect")))
                return
            self.tcp_connected = True
            if self.events:
                self.loop.selector.unregister(self.sock)
                self.events = 0
            context = self.pool.tls_context
            assert context is not None, "listeners.make_listener gives the pool a context with this class"
            self.sock = context.wrap_socket(self.sock, server_hostname=self.view.host, do_handshake_on_connect=False)
        self._handshake()

    def on_readable(self) -> None:
        if self.connected:
            BackendConnection.on_readable(self)
        elif self.tcp_connected:
            self._handshake()

    def _handshake(self) -> None:
        try:
            done = handshake_step(self)
        except (ssl.SSLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (exc.strerror or str(exc))
            self._connect_failed(OSError(errno.ECONNABORTED, f"TLS handshake with the backend failed: {reason}"))
            return
        if not done:
            return
        self.connected = True
        self.deadline = None
        self._update_events()
        self.owner.upstream_connected(self)
