"""Backend connections and the per-listener keep-alive pool (`listener.connection_pool`).

A `BackendConnection` is a non-blocking socket to one backend, connected without blocking (connect
deadline = `timeouts.connect`) and carrying one request at a time for its `owner` (the client
connection's proxy state machine), which it calls back: `upstream_connected`, `upstream_data`,
`upstream_eof`, `upstream_error`, `upstream_timeout`, `upstream_drained`.

Pool rules: idle connections are kept per backend address, newest first (LIFO keeps few sockets
warm), and closed after `idle_timeout` or as soon as the backend closes them (an idle socket stays
registered for reading, so its EOF is seen at once). At most `max_connections` exist per backend,
idle ones included. When a backend is at its limit `acquire` returns None and the proxy tries
another backend; when every candidate is full the client gets 503 "over capacity" at once: a
waiting queue would only move the overload into the load balancer's memory.
"""
from __future__ import annotations

import errno
import socket
import ssl

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.channel import Channel
from pmdaemon.net.http1 import ResponseReader
from pmdaemon.net.snapshot import BackendView

RECV_SIZE = 65536


class BackendConnection(Channel):
    __slots__ = ("pool", "view", "key", "owner", "connected", "reused", "reader", "received")

    def __init__(self, pool: UpstreamPool, view: BackendView, address: tuple, owner):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(pool.loop, sock, pool.write_timeout)
        self.pool = pool
        self.view = view
        self.key = address
        self.owner = owner
        self.connected = False
        self.reused = False
        self.reader = ResponseReader()
        self.received = 0  # response bytes received for the current request
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            self.loop.call_soon(self._connect_failed, OSError(err, errno.errorcode.get(err, "connect")))
            return
        self.set_deadline(self.loop.now + pool.connect_timeout)
        self._update_events()

    def _wants_write(self) -> bool:
        return not self.connected

    def _connect_failed(self, exc: OSError) -> None:
        if not self.closed and self.owner is not None:
            self.owner.upstream_error(self, exc, True)

    def on_writable(self) -> None:
        if self.connected:
            Channel.on_writable(self)
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(OSError(err, errno.errorcode.get(err, "connect")))
            return
        self.connected = True
        self.deadline = None
        self._update_events()
        self.owner.upstream_connected(self)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if self.owner is None:
                self.pool.discard(self)
            else:
                self.owner.upstream_error(self, exc, not self.connected)
            return
        owner = self.owner
        if owner is None:  # idle in the pool: EOF (or stray bytes) makes it unusable
            self.pool.discard(self)
        elif data:
            self.received += len(data)
            owner.upstream_data(self, data)
        else:
            owner.upstream_eof(self)

    def on_drained(self) -> None:
        if self.owner is not None:
            self.owner.upstream_drained(self)

    def on_timeout(self, now: float) -> None:
        if self.owner is None:
            self.pool.discard(self)
        else:
            self.owner.upstream_timeout(self, not self.connected)

    def on_write_timeout(self) -> None:
        if self.owner is None:
            self.pool.discard(self)
        else:
            self.owner.upstream_timeout(self, False)

    def on_error(self, exc: OSError) -> None:
        if self.owner is None:
            self.pool.discard(self)
        else:
            self.owner.upstream_error(self, exc, False)


class _HostPool:
    __slots__ = ("idle", "count")

    def __init__(self):
        self.idle: list[BackendConnection] = []
        self.count = 0


class UpstreamPool:
    """All backend connections of one listener, keyed by backend address."""

    def __init__(self, loop, cfg: ListenerConfig):
        pool = cfg.connection_pool
        self.loop = loop
        self.reuse = pool.enabled and pool.keep_alive
        self.max_connections = pool.max_connections
        self.idle_timeout = pool.idle_timeout
        self.connect_timeout = cfg.timeouts.connect
        self.write_timeout = cfg.timeouts.write
        self.hosts: dict[tuple, _HostPool] = {}
        self.closing = False
        # backend_protocol "https": net.listeners sets net.tls.TlsBackendConnection and its context
        self.connection_class: type[BackendConnection] = BackendConnection
        self.tls_context: ssl.SSLContext | None = None

    def acquire(self, view: BackendView, address: tuple, owner, fresh: bool = False) -> BackendConnection | None:
        """A connected idle connection (reused=True) or a new connecting one; None at the limit."""
        host = self.hosts.get(address)
        if host is None:
            host = self.hosts[address] = _HostPool()
        if not fresh:
            idle = host.idle
            while idle:
                conn = idle.pop()
                if conn.closed:
                    continue
                conn.owner = owner
                conn.view = view
                conn.reused = True
                conn.received = 0
                conn.deadline = None
                return conn
        if host.count >= self.max_connections:
            return None
        host.count += 1
        return self.connection_class(self, view, address, owner)

    def release(self, conn: BackendConnection, reusable: bool) -> None:
        """The exchange on `conn` is over; keep it for the next request or close it."""
        conn.owner = None
        if not (reusable and self.reuse and not self.closing) or conn.closed or conn.out:
            self.discard(conn)
            return
        conn.set_deadline(self.loop.now + self.idle_timeout)
        conn.resume_reading()
        self.hosts[conn.key].idle.append(conn)

    def discard(self, conn: BackendConnection) -> None:
        if conn.closed:
            return
        conn.close()
        host = self.hosts.get(conn.key)
        if host is None:
            return
        host.count -= 1
        if conn.owner is None:
            try:
                host.idle.remove(conn)
            except ValueError:
                pass
        conn.owner = None

    def adopt(self, old: UpstreamPool) -> None:
        """Config reload: take over the old pool's connections and counts, so connections busy now are
        released into this pool and the per-backend limit still counts them. Idle ones are closed when
        the TLS settings towards the backends changed (a new context is built on every reload)."""
        self.hosts = old.hosts
        if old.connection_class is not self.connection_class or old.tls_context is not self.tls_context:
            for host in self.hosts.values():
                while host.idle:
                    host.idle.pop().close()
                    host.count -= 1

    def close_idle(self) -> None:
        """Listener removed: close idle connections now and busy ones when their exchange ends."""
        self.closing = True
        for host in self.hosts.values():
            while host.idle:
                conn = host.idle.pop()
                conn.close()
                host.count -= 1
