"""Which class serves a listener config: HTTP, HTTPS (TLS termination), TCP, or TCP over TLS; and the
TLS contexts each needs, built outside the loop thread.

`ListenerTls.build(cfg)` runs in the thread that calls `IOLoop.add_listener` (it reads certificate and
CA files; errors surface there, before anything is bound). `make_listener` runs in the loop thread and
only wires objects together.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.proxy import ClientConnection, HttpListener
from pmdaemon.net.tcpproxy import TcpListener
from pmdaemon.net.tls import HTTP_ALPN, ServerHandshake, TlsBackendConnection, backend_context, server_context

# What the loop registers for a listening socket (HttpsListener is an HttpListener).
Listener = HttpListener | TcpListener

@dataclass(frozen=True)
class ListenerTls:
    """The contexts of one listener: `server` terminates client TLS, `backend` re-encrypts to
    backends (`backend_protocol: "https"`); None where not configured."""

    server: ssl.SSLContext | None = None
    backend: ssl.SSLContext | None = None

    @classmethod
    def build(cls, cfg: ListenerConfig) -> ListenerTls:
        """Fresh contexts from the files named in `cfg` (read now: a reload gets renewed certificates).
        Raises ValueError naming the file when one cannot be loaded."""
        alpn = HTTP_ALPN if cfg.type == "http" else ()
        server = backend = None
        if cfg.ssl.enabled:
            try:
                server = server_context(cfg.ssl, alpn)
            except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
                raise ValueError(f"ssl: cannot load the certificate {cfg.ssl.cert_file} with its key "
                                 f"{cfg.ssl.key_file}: {err}") from None
        if cfg.backend_protocol == "https":
            try:
                backend = backend_context(cfg, alpn)
            except (OSError, ValueError) as err:
                raise ValueError(f"ca_file: cannot load {cfg.backend_tls.ca_file}: {err}") from None
        return cls(server, backend)


class HttpsListener(HttpListener):
    """An HTTP listener that terminates TLS: every accepted socket completes a handshake (deadline
    `limits.header_timeout`) before it becomes a `ClientConnection`. Backends see
    `X-Forwarded-Proto: https`; session cookies the balancer sets carry `Secure`."""

    answers_plain_http = True

    def __init__(self, loop, cfg: ListenerConfig, sock: socket.socket, strategy, tls_context: ssl.SSLContext):
        super().__init__(loop, cfg, sock, strategy)
        self.tls_context = tls_context
        self.handshake_timeout = cfg.limits.header_timeout
        self.handshakes: set[ServerHandshake] = set()

    def accepted(self, sock: socket.socket, ip: str) -> None:
        try:
            ServerHandshake(self, sock, ip)
        except OSError:  # the client reset before the handshake began
            sock.close()

    def tls_ready(self, sock: socket.socket, ip: str) -> None:
        try:
            conn = ClientConnection(self, sock, ip)
        except OSError:  # the client reset right after the handshake
            sock.close()
            return
        # The first request usually arrives with the client's Finished, and what OpenSSL decrypted
        # already (pending()) epoll would never report: read now rather than after a selector round.
        self.loop.call_soon(conn.on_readable)

    def tls_failed(self) -> None:
        """A failed or stalled handshake is not a request: nothing to record."""

    def stop_accepting(self) -> None:
        super().stop_accepting()
        for handshake in list(self.handshakes):
            handshake.close()

    def close_all(self) -> None:
        for handshake in list(self.handshakes):
            handshake.close()
        super().close_all()

    def take_over(self, old: HttpListener) -> None:
        """Config reload: handshakes in progress complete under this listener (a plain one has none)."""
        if isinstance(old, HttpsListener):
            for handshake in old.handshakes:
                handshake.owner = self
                self.handshakes.add(handshake)
            old.handshakes = set()  # adopted, so HttpListener.take_over does not close them
        super().take_over(old)


def make_listener(loop, cfg: ListenerConfig, sock: socket.socket, strategy, tls: ListenerTls) -> Listener:
    """The listener object the loop registers for `sock` (loop thread)."""
    if cfg.type == "tcp":  # a TcpListener sets up its own backend TLS
        return TcpListener(loop, cfg, sock, strategy, tls.server, tls.backend)
    if tls.server is not None:
        listener: HttpListener = HttpsListener(loop, cfg, sock, strategy, tls.server)
    else:
        listener = HttpListener(loop, cfg, sock, strategy)
    if tls.backend is not None:
        listener.pool.tls_context = tls.backend
        listener.pool.connection_class = TlsBackendConnection
    return listener
