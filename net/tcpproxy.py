"""TCP stream balancing (`type: "tcp"` listeners): each client connection is paired with one backend
connection and bytes are shuttled both ways, in the I/O loop like HTTP.

Theory of operation
-------------------
A `TcpSession` owns two channels, `ClientSide` (the accepted socket, plain or `TlsSocket` after a
server handshake) and `BackendSide` (a non-blocking connect to the backend the strategy chose,
`head=None`). The client is not read until the backend connection is up, so nothing needs buffering
while a connect is retried.

- Choosing: once per connection; `strategy.started` when chosen and `finished` when the connection
  ends, so `least_connections` counts open connections per backend (divided by weight).
- Connect failures (refused, unreachable, `timeouts.connect`) move to another backend, at most
  `retries.max_attempts` attempts in all, apart as the listener's `RetryPolicy` says (net/retry.py).
  Each failed attempt is an `Outcome` (error connect/timeout) so breakers and health-aware strategies
  see it; when every attempt failed, the client is closed without a byte.
- Backpressure: a side is not read while the other side holds more than `BUFFER_HIGH` unsent bytes;
  it is read again when that drains.
- Half-close: end of stream from one side becomes a shutdown(SHUT_WR) towards the other once what
  is owed to it has been sent; the other direction keeps flowing. The session ends when both
  directions have ended (or on a reset, a stalled write after `timeouts.write`, or idleness).
- Idle: no byte either way for `timeouts.idle` (and, when `connection_pool` is enabled, for
  `connection_pool.idle_timeout`: the smaller wins) closes both sides. A side that stops reading
  what we owe it for `timeouts.write` closes the session too (`timeouts.read` has no TCP meaning).
- `connection_pool` (decisions.md section 6, TCP): at most `max_connections` client connections at
  once; at the cap the listener stops accepting (clients wait in the kernel's listen backlog) until
  one closes. `keep_alive` sets SO_KEEPALIVE on both sockets.
- Rate limiting counts new connections: a refused one is closed at once (Outcome `rate_limited`).

Each connection ends in one `Outcome`: status 0, latency = its duration, bytes from and to the
client, error None (normal end, idle close, client reset) or a backend failure kind (reset, timeout).
"""
from __future__ import annotations

import errno
import socket
import ssl
from selectors import EVENT_READ

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.accepting import accept_waiting
from pmdaemon.net.channel import Channel
from pmdaemon.net.retry import Failure, RetryPolicy
from pmdaemon.net.snapshot import BackendView, Outcome, PoolSnapshot
from pmdaemon.net.tls import ServerHandshake, handshake_step
from pmdaemon.net.tokenbucket import RateLimiter
from pmdaemon.states import ErrorKind

RECV_SIZE = 65536
BUFFER_HIGH = 256 * 1024  # stop reading a side while the other side has this much unsent


class TcpListener:
    """A bound `type: "tcp"` listening socket (optionally TLS-terminating) and its sessions."""

    answers_plain_http = False  # a TLS handshake failure is just closed: the stream is not HTTP

    def __init__(self, loop, cfg: ListenerConfig, sock: socket.socket, strategy,
                 tls_context: ssl.SSLContext | None = None, backend_tls: ssl.SSLContext | None = None):
        self.loop = loop
        self.cfg = cfg
        self.index = cfg.index
        self.sock = sock
        self.strategy = strategy
        self.tls_context = tls_context  # terminate TLS from clients
        self.backend_tls = backend_tls  # speak TLS to backends (`backend_protocol: "https"`)
        self.snapshot: PoolSnapshot | None = None
        self.addresses: dict[int, tuple] = {}
        self.sessions: set[TcpSession] = set()
        self.handshakes: set[ServerHandshake] = set()
        self.open = 0  # accepted client connections not yet closed (handshakes included)
        self.closed = False
        self.accepting = True  # registered for reading (the loop registers it at install)
        pool = cfg.connection_pool
        timeouts = cfg.timeouts
        self.max_connections = pool.max_connections if pool.enabled else None
        self.keep_alive = pool.enabled and pool.keep_alive
        self.idle_timeout = min(timeouts.idle, pool.idle_timeout) if pool.enabled else timeouts.idle
        self.connect_timeout = timeouts.connect
        self.write_timeout = timeouts.write
        self.handshake_timeout = cfg.limits.header_timeout
        self.retry_policy = RetryPolicy.from_config(cfg.retries)
        self.rate_limiter = RateLimiter.from_config(cfg.rate_limiting, loop.now) if cfg.rate_limiting.enabled else None

    # ---- accepting -----------------------------------------------------------------------------
    def on_readable(self) -> None:
        if not self._paused_at_cap():
            accept_waiting(self.sock, self.accepted)

    def accepted(self, sock: socket.socket, ip: str) -> bool:
        """Start a session (or a handshake) for a new client; True when that reached the cap."""
        loop = self.loop
        limiter = self.rate_limiter
        if limiter is not None and limiter.check(ip, loop.now):
            sock.close()
            loop.record(Outcome(self.index, -1, ip, ErrorKind.RATE_LIMITED, lb_made=True))
            return False
        self.open += 1
        loop.gauge_clients(self.index, 1)
        try:
            if self.tls_context is not None:
                ServerHandshake(self, sock, ip)
            else:
                TcpSession(self, sock, ip)
        except OSError:  # the client reset before we could set the socket up
            sock.close()
            self.connection_closed()
        return self._paused_at_cap()

    def _paused_at_cap(self) -> bool:
        """At `max_connections`: stop accepting (clients wait in the backlog) and say so."""
        if self.max_connections is not None and self.open >= self.max_connections:
            self._pause_accepting()
            return True
        return False

    def _pause_accepting(self) -> None:
        if self.accepting and not self.closed:
            self.accepting = False
            self.loop.selector.unregister(self.sock)

    def connection_closed(self) -> None:
        """A client connection ended: a slot is free again."""
        self.open -= 1
        self.loop.gauge_clients(self.index, -1)
        if not self.accepting and not self.closed:
            self.accepting = True
            self.loop.selector.register(self.sock, EVENT_READ, self)
            self.loop.call_soon(self.on_readable)  # clients may be waiting in the backlog already

    # ---- TLS handshake callbacks (ServerHandshake) ----------------------------------------------
    def tls_ready(self, sock: socket.socket, ip: str) -> None:
        try:
            TcpSession(self, sock, ip)
        except OSError:  # the client reset right after the handshake
            sock.close()
            self.connection_closed()

    def tls_failed(self) -> None:
        self.connection_closed()

    # ---- control plane -------------------------------------------------------------------------
    def publish(self, snapshot: PoolSnapshot, addresses: dict[int, tuple]) -> None:
        self.snapshot = snapshot
        self.addresses = addresses
        self.strategy.update(snapshot)

    def choose(self, ip: str, exclude: frozenset):
        if self.snapshot is None:
            return None
        return self.strategy.choose(ip, None, exclude)

    def stop_accepting(self) -> None:
        """Removed from the config: no new connections; open ones run until they end."""
        if self.closed:
            return
        self.closed = True
        if self.accepting:
            self.loop.selector.unregister(self.sock)
        self.sock.close()
        for handshake in list(self.handshakes):
            handshake.close()
            self.connection_closed()

    def close_all(self) -> None:
        for handshake in list(self.handshakes):
            handshake.close()
            self.connection_closed()
        for session in list(self.sessions):
            session.close(None)

    def take_over(self, old: TcpListener) -> None:
        """Config reload (`IOLoop.replace_listener`): open sessions and handshakes continue under this
        listener, which counts them against its connection cap; new connections follow the new config."""
        if old.snapshot is not None:
            self.publish(old.snapshot, old.addresses)
        self.sessions, self.handshakes = old.sessions, old.handshakes
        self.open, self.accepting = old.open, old.accepting
        for session in self.sessions:
            session.listener = self
        for handshake in self.handshakes:
            handshake.owner = self


class ClientSide(Channel):
    __slots__ = ("session",)

    def __init__(self, session: TcpSession, sock: socket.socket, write_timeout: float):
        super().__init__(session.loop, sock, write_timeout)
        self.session = session

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.session.close(None)  # the client reset: its choice, not a failure
            return
        if data:
            self.session.from_client(data)
        else:
            self.session.client_ended()

    def on_drained(self) -> None:
        self.session.client_drained()

    def on_timeout(self, now: float) -> None:
        self.session.close(None)  # idle both ways

    def on_write_timeout(self) -> None:
        self.session.close(None)  # the client stopped reading

    def on_error(self, exc: OSError) -> None:
        self.session.close(None)


class BackendSide(Channel):
    """The backend end of a session: a non-blocking connect (deadline `timeouts.connect`), then, for
    `backend_protocol: "https"`, a TLS handshake within the same deadline, then the byte stream."""

    __slots__ = ("session", "connected", "tcp_connected", "tls_wants_write")

    def __init__(self, session: TcpSession, address: tuple):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(session.loop, sock, session.listener.write_timeout)
        self.session = session
        self.connected = False
        self.tcp_connected = False
        self.tls_wants_write = False
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            self.loop.call_soon(session.connect_failed, self, ErrorKind.CONNECT)
            return
        self.set_deadline(self.loop.now + session.listener.connect_timeout)
        self._update_events()

    def _wants_write(self) -> bool:
        return not self.connected and (not self.tcp_connected or self.tls_wants_write)

    def on_writable(self) -> None:
        if self.connected:
            Channel.on_writable(self)
            return
        context = self.session.listener.backend_tls
        if not self.tcp_connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.session.connect_failed(self, ErrorKind.CONNECT)
                return
            self.tcp_connected = True
            if context is not None:
                if self.events:
                    self.loop.selector.unregister(self.sock)
                    self.events = 0
                view = self.session.view
                assert view is not None  # chosen before this connect started
                self.sock = context.wrap_socket(self.sock, server_hostname=view.host, do_handshake_on_connect=False)
        if context is not None:
            try:
                if not handshake_step(self):
                    return
            except OSError:  # ssl.SSLError included: the certificate did not verify, or no TLS there
                self.session.connect_failed(self, ErrorKind.CONNECT)
                return
        self.connected = True
        self.deadline = None
        self._update_events()
        self.session.backend_connected(self)

    def on_readable(self) -> None:
        if not self.connected:
            self.on_writable()  # a refused connect shows up as readable too; a handshake reads
            return
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.session.close(ErrorKind.RESET)
            return
        if data:
            self.session.from_backend(data)
        else:
            self.session.backend_ended()

    def on_drained(self) -> None:
        self.session.backend_drained()

    def on_timeout(self, now: float) -> None:
        if not self.connected:
            self.session.connect_failed(self, ErrorKind.TIMEOUT)
        else:
            self.session.close(None)

    def on_write_timeout(self) -> None:
        self.session.close(ErrorKind.TIMEOUT)  # the backend stopped reading

    def on_error(self, exc: OSError) -> None:
        if self.session.backend_eof:
            self.session.close(None)  # it closed its end first: a write it refuses is not a failure
        elif self.connected:
            self.session.close(ErrorKind.RESET)
        else:
            self.session.connect_failed(self, ErrorKind.CONNECT)


class TcpSession:
    __slots__ = ("listener", "loop", "ip", "client", "backend", "view", "attempts", "exclude", "started",
                 "bytes_in", "bytes_out", "client_eof", "backend_eof", "client_shut", "backend_shut",
                 "retry_timer", "done", "tls")  # tls: the client side is a TlsSocket

    def __init__(self, listener: TcpListener, sock: socket.socket, ip: str):
        self.listener = listener
        self.loop = listener.loop
        self.ip = ip
        self.tls = isinstance(sock, ssl.SSLSocket)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if listener.keep_alive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.client = ClientSide(self, sock, listener.write_timeout)
        self.client.reading = False  # not read until a backend is connected
        self.backend: BackendSide | None = None
        self.view: BackendView | None = None
        self.attempts = 0
        self.exclude: frozenset = frozenset()
        self.started = self.loop.now
        self.bytes_in = self.bytes_out = 0
        self.client_eof = self.backend_eof = False  # that side sent its end of stream
        self.client_shut = self.backend_shut = False  # we sent our end of stream to that side
        self.retry_timer = None
        self.done = False
        listener.sessions.add(self)
        self._connect()

    # ---- connecting ----------------------------------------------------------------------------
    def _connect(self) -> None:
        self.retry_timer = None
        if self.done:
            return
        listener = self.listener
        view = listener.choose(self.ip, self.exclude)
        if view is None:
            if self.attempts == 0:
                self.loop.record(Outcome(listener.index, -1, self.ip, ErrorKind.NO_BACKEND,
                                               latency=self.loop.now - self.started, lb_made=True))
            self._discard()
            return
        self.attempts += 1
        self.view = view
        listener.strategy.started(view.index)
        self.loop.gauge_active(listener.index, view.index, 1)
        address = listener.addresses.get(view.index) or (view.host, view.port)
        try:
            self.backend = BackendSide(self, address)
        except OSError:  # out of sockets
            self.backend = None
            self.connect_failed(None, ErrorKind.CONNECT)

    def connect_failed(self, side: BackendSide | None, kind: ErrorKind) -> None:
        """This attempt did not connect: count it as the backend's failure, then retry elsewhere."""
        if self.done or side is not self.backend:
            return
        listener = self.listener
        view = self.view
        assert view is not None  # chosen before this attempt started
        if side is not None:
            side.close()
        self.backend = None
        listener.strategy.finished(view.index)
        self.loop.gauge_active(listener.index, view.index, -1)
        self.view = None
        self.loop.record(Outcome(listener.index, view.index, self.ip, kind, latency=self.loop.now - self.started))
        self.exclude = self.exclude | {view.index}
        delay = listener.retry_policy.next_delay(Failure.CONNECT, self.attempts)
        if delay is None:
            self._discard()  # the failed attempt's Outcome is the connection's
            return
        if delay > 0:
            self.retry_timer = self.loop.call_later(delay, self._connect)
        else:
            self._connect()

    def backend_connected(self, backend: BackendSide) -> None:
        listener = self.listener
        if listener.keep_alive:
            backend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client = self.client
        client.set_deadline(self.loop.now + listener.idle_timeout)
        if self.client_eof:
            self._shut_backend()
            return
        client.resume_reading()
        if self.tls and isinstance(client.sock, ssl.SSLSocket) and client.sock.pending():
            self.loop.call_soon(client.on_readable)  # decrypted during the handshake, invisible to epoll

    # ---- shuttling -----------------------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.client.set_deadline(self.loop.now + self.listener.idle_timeout)
        backend = self.backend
        assert backend is not None  # the client is read only while its backend is connected
        backend.write(data)
        if backend.pending > BUFFER_HIGH:
            self.client.pause_reading()

    def from_backend(self, data: bytes) -> None:
        self.bytes_out += len(data)
        client = self.client
        client.set_deadline(self.loop.now + self.listener.idle_timeout)
        client.write(data)
        if client.pending > BUFFER_HIGH and self.backend is not None:
            self.backend.pause_reading()

    def backend_drained(self) -> None:
        if self.client_eof:
            self._shut_backend()
        elif not self.client.reading:
            self.client.resume_reading()

    def client_drained(self) -> None:
        if self.backend_eof:
            self._shut_client()
        elif self.backend is not None and not self.backend.reading:
            self.backend.resume_reading()

    # ---- half-close ----------------------------------------------------------------------------
    def client_ended(self) -> None:
        self.client_eof = True
        self.client.pause_reading()
        backend = self.backend
        if backend is not None and backend.connected and not backend.pending:
            self._shut_backend()

    def backend_ended(self) -> None:
        self.backend_eof = True
        if self.backend is not None:
            self.backend.pause_reading()
        if not self.client.pending:
            self._shut_client()

    def _shut_backend(self) -> None:
        if self.backend_shut:
            return
        self.backend_shut = True
        backend = self.backend
        assert backend is not None  # shut only once connected
        try:
            if self.listener.backend_tls is not None and not self.backend_eof:
                self._drain(backend)  # see net/tls.py: no record may arrive after our close_notify
                if self.done:
                    return
            backend.sock.shutdown(socket.SHUT_WR)
        except OSError:  # ssl.SSLError included: the backend's data raced our close_notify
            self.close(ErrorKind.RESET)
            return
        self._maybe_done()

    def _shut_client(self) -> None:
        if self.client_shut:
            return
        self.client_shut = True
        client = self.client
        try:
            if self.tls and not self.client_eof:
                self._drain(client)  # see net/tls.py: no record may arrive after our close_notify
                if self.done:
                    return
            client.sock.shutdown(socket.SHUT_WR)
        except ssl.SSLError:
            self.close(None)  # the client's data raced our close_notify: end visibly, not truncated
            return
        except OSError:
            self.close(None)
            return
        self._maybe_done()

    def _drain(self, side: Channel) -> None:
        """Forward whatever `side` already sent, before TLS-closing towards it."""
        client = side is self.client
        while not self.done and not (self.client_eof if client else self.backend_eof):
            try:
                data = side.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self.client_ended() if client else self.backend_ended()
                return
            self.from_client(data) if client else self.from_backend(data)

    def _maybe_done(self) -> None:
        if self.client_shut and self.backend_shut and self.client_eof and self.backend_eof:
            self.close(None)

    # ---- ending --------------------------------------------------------------------------------
    def close(self, error: ErrorKind | None) -> None:
        """End the session: both sockets closed, one Outcome recorded."""
        if self.done:
            return
        view = self.view
        self.loop.record(Outcome(self.listener.index, view.index if view is not None else -1, self.ip, error,
                                       latency=self.loop.now - self.started, bytes_in=self.bytes_in,
                                       bytes_out=self.bytes_out))
        self._discard()

    def _discard(self) -> None:
        """Close everything without recording (the caller did, when there is anything to record)."""
        if self.done:
            return
        self.done = True
        listener = self.listener
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.view is not None:
            listener.strategy.finished(self.view.index)
            self.loop.gauge_active(listener.index, self.view.index, -1)
            self.view = None
        self.client.close()
        listener.sessions.discard(self)
        listener.connection_closed()
