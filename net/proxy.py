"""HTTP reverse proxying: one `ClientConnection` state machine per client socket.

Theory of operation
-------------------
A client connection handles one request at a time (pipelined requests wait in its reader's buffer,
which is bounded: above `PIPELINE_BOUND` the socket is not read until the current answer is done),
so answers go out in request order without any reordering logic. Its states:

- WAIT_HEAD: reading a request head (`limits.header_timeout`, 408 when part of a head arrived);
  between requests, an idle keep-alive connection (`timeouts.idle`).
- EXCHANGE: one request in progress: its body forwarded as framed, its answer relayed. Back to
  WAIT_HEAD when both sides keep the connection, else CLOSING.
- TUNNEL: a 101 answer to a websocket upgrade made both connections a raw byte tunnel
  (net/tunnel.py) until either side ends.
- CLOSING: our last bytes are flushing. LINGER: our side is shut down; what the client still sends
  is read and discarded until it closes (at most `LINGER_TIME`), so a late pipelined request cannot
  make the kernel reset the connection and destroy the answer the client has not read yet.

For each request head: validate (net/http1.py), admit (token buckets, else 429), choose a backend
(the listener's strategy, a local read of the last published snapshot), take a pooled or new
backend connection, send the rewritten head (net/heads.py: hop-by-hop headers stripped,
X-Forwarded-* set) and stream the body exactly as framed. The response head is rewritten the same
way and the body streamed back raw. Backpressure: a side is not read while the other side holds
more than `BUFFER_HIGH` unsent bytes. The backend half of an exchange (attempts, the backend
connection's callbacks, relaying the response) is written in net/relay.py as functions that this
class binds as its methods: one object per client connection, nothing allocated per request for it.

Retries follow the listener's `RetryPolicy` (net/retry.py). A retry is possible only while the
whole request (head + body) is still held: up to `REPLAY_LIMIT` bytes are kept.

Each request ends in exactly one `Outcome`. A failed attempt that was followed by a retry also gets
one, with status 0, so that breakers and health-aware strategies see every live-traffic failure.
LB-made responses (400, 408, 413, 414, 431, 429, 502, 503, 504) have `lb_made=True`; when a
backend caused them (502/504) `backend` and `error` say which and why.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net import relay
from pmdaemon.net.accepting import accept_waiting
from pmdaemon.net.channel import Channel
from pmdaemon.net.heads import forward_head, upgrade_head
from pmdaemon.net.http1 import END, NEED_DATA, PAUSED, HttpError, RequestHead, RequestReader, ResponseHead
from pmdaemon.net.relay import BUFFER_HIGH, REPLAY_LIMIT
from pmdaemon.net.responses import lb_response
from pmdaemon.net.retry import RetryPolicy
from pmdaemon.net.snapshot import BackendView, Outcome, PoolSnapshot
from pmdaemon.net.strategies import Strategy
from pmdaemon.net.tokenbucket import RateLimiter
from pmdaemon.net.tunnel import WebsocketTunnel
from pmdaemon.net.upstream import RECV_SIZE, BackendConnection, UpstreamPool
from pmdaemon.states import ErrorKind

if TYPE_CHECKING:
    from pmdaemon.net.loop import Timer

PIPELINE_BOUND = 64 * 1024  # bytes buffered from a client while its current request is in progress
PENDING_BOUND = 64 * 1024  # request bytes held while no backend connection is ready
LINGER_TIME = 2.0  # after our last byte: read and discard until the client closes, at most this long
CLOSE_AFTER_ERROR = frozenset((400, 408, 413, 414, 431))

WAIT_HEAD, EXCHANGE, TUNNEL, CLOSING, LINGER = range(5)


class HttpListener:
    """A bound HTTP listening socket plus what its connections share: strategy, snapshot, pool."""

    def __init__(self, loop, cfg: ListenerConfig, sock: socket.socket, strategy):
        self.loop = loop
        self.cfg = cfg
        self.index = cfg.index
        self.sock = sock
        self.strategy = strategy
        # Only sticky sessions add response headers (Set-Cookie): skip the call per response otherwise.
        self.adds_response_headers = (getattr(type(strategy), "response_headers", Strategy.response_headers)
                                      is not Strategy.response_headers)
        self.snapshot: PoolSnapshot | None = None
        self.addresses: dict[int, tuple[str, int]] = {}
        self.pool = UpstreamPool(loop, cfg)
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in cfg.trusted_proxies)
        self._trust_cache: dict[str, bool] = {}
        # check(ip, now) -> 0.0 (admit) or seconds until a token is free (429 with Retry-After).
        self.rate_limiter = RateLimiter.from_config(cfg.rate_limiting, loop.now) if cfg.rate_limiting.enabled else None
        self.connections: set[ClientConnection] = set()
        self.closed = False
        limits = cfg.limits
        self.max_header_size = limits.max_header_size
        self.max_body = limits.max_body_size
        self.header_timeout = limits.header_timeout
        t = cfg.timeouts
        self.read_timeout, self.write_timeout, self.idle_timeout = t.read, t.write, t.idle
        self.retry_policy = RetryPolicy.from_config(cfg.retries)
        self.tls = cfg.ssl.enabled  # X-Forwarded-Proto: https

    def on_readable(self) -> None:
        accept_waiting(self.sock, self.accepted)

    def accepted(self, sock: socket.socket, ip: str) -> None:
        ClientConnection(self, sock, ip)

    def publish(self, snapshot: PoolSnapshot, addresses: dict[int, tuple[str, int]]) -> None:
        self.snapshot = snapshot
        self.addresses = addresses
        self.strategy.update(snapshot)

    def is_trusted(self, ip: str) -> bool:
        known = self._trust_cache.get(ip)
        if known is None:
            addr = ipaddress.ip_address(ip)
            known = any(addr in net for net in self.trusted)
            if len(self._trust_cache) > 10000:
                self._trust_cache.clear()
            self._trust_cache[ip] = known
        return known

    def stop_accepting(self) -> None:
        """Removed from the config: no new connections; idle keep-alive ones close now."""
        if self.closed:
            return
        self.closed = True
        self.loop.selector.unregister(self.sock)
        self.sock.close()
        self.pool.close_idle()
        for conn in list(self.connections):
            if conn.state == WAIT_HEAD and not conn.reader.buffered:
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()

    def take_over(self, old: HttpListener) -> None:
        """Config reload (`IOLoop.replace_listener`): this listener, built from the new config on the old
        one's socket, adopts the old one's client and backend connections. Their next requests follow
        the new config; exchanges in progress finish on the backend connections they have."""
        if old.snapshot is not None:
            self.publish(old.snapshot, old.addresses)
        for handshake in list(getattr(old, "handshakes", ())):
            handshake.close()  # TLS was turned off for this port (an HttpsListener adopts them instead)
        self.connections = old.connections
        for conn in self.connections:
            conn.listener = self
        self.pool.adopt(old.pool)


class ClientConnection(Channel):
    __slots__ = ("listener", "ip", "ip_bytes", "reader", "state", "head_since", "pumping", "head",
                 "t_head", "latency", "bytes_in", "bytes_out", "request_done", "replay", "replay_size",
                 "attempts", "exclude", "view", "up", "up_ready", "resp", "sent_to_client",
                 "keep_client", "last_error", "retry_timer", "status", "eof", "tunnel")

    def __init__(self, listener: HttpListener, sock: socket.socket, ip: str):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(listener.loop, sock, listener.write_timeout)
        self.listener = listener
        self.ip = ip
        self.ip_bytes = ip.encode()
        self.reader = RequestReader(listener.max_header_size, listener.max_body)
        self.state = WAIT_HEAD
        self.head_since: float | None = None
        self.pumping = False
        self.eof = False
        self.up: BackendConnection | None = None
        self.retry_timer: Timer | None = None
        self.tunnel: WebsocketTunnel | None = None
        self._reset_exchange()
        listener.connections.add(self)
        self.loop.gauge_clients(listener.index, 1)
        self.set_deadline(self.loop.now + listener.header_timeout)
        self._update_events()

    def _reset_exchange(self) -> None:
        self.head: RequestHead | None = None
        self.resp: ResponseHead | None = None
        self.t_head = self.latency = 0.0
        self.bytes_in = self.bytes_out = 0
        self.request_done = False
        self.replay: list[bytes] | None = None
        self.replay_size = 0
        self.attempts = 0
        self.exclude: frozenset[int] = frozenset()
        self.view: BackendView | None = None
        self.up_ready = False
        self.sent_to_client = False
        self.keep_client = False
        self.last_error: tuple[ErrorKind, int, str, int] | None = None  # kind, status, why, backend
        self.status = 0

    # ---- client socket events ----------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(ErrorKind.CLIENT_CLOSED)
            return
        state = self.state
        if not data:
            self._client_eof()
        elif state == TUNNEL:
            assert self.tunnel is not None
            self.tunnel.from_client(data)
        elif state == LINGER:
            return  # discarded: we are only waiting for the client to close
        elif state != CLOSING:
            self.reader.feed(data)
            if self.head is None and self.head_since is None:
                self.head_since = self.loop.now
                self.set_deadline(self.loop.now + self.listener.header_timeout)
            self.pump()

    def _client_eof(self) -> None:
        state = self.state
        if state == EXCHANGE and self.request_done:
            self.eof = True  # half-close: answer, then close
            self.keep_client = False
            self.pause_reading()
        elif state == EXCHANGE:
            self.abort(ErrorKind.CLIENT_CLOSED)
        elif state == TUNNEL:
            self.end_tunnel(flush=False)
        elif state == CLOSING:
            self.pause_reading()  # finish flushing; the linger step reads the EOF again and closes
        else:
            self.close()

    def on_drained(self) -> None:
        if self.state == CLOSING:
            self._linger()
            return
        up = self.up
        if up is not None and not up.reading:
            up.resume_reading()

    def on_timeout(self, now: float) -> None:
        state = self.state
        if state == WAIT_HEAD:
            if self.reader.buffered:
                self.respond(408, f"request head not received within {self.listener.header_timeout:g} s",
                             ErrorKind.LB_4XX)
            else:
                self.close()
        elif state == EXCHANGE:
            if self.sent_to_client:
                self.abort(ErrorKind.CLIENT_TIMEOUT)  # its request body stalled: the client's failure
            else:
                self.respond(408, f"request body stalled for {self.listener.idle_timeout:g} s", ErrorKind.LB_4XX)
        elif state == TUNNEL:
            self.end_tunnel(flush=False)
        else:
            self.close()

    def on_write_timeout(self) -> None:
        self.abort(ErrorKind.CLIENT_TIMEOUT)  # the client stopped reading its response

    def on_error(self, exc: OSError) -> None:
        self.abort(ErrorKind.CLIENT_CLOSED)

    # ---- request side ------------------------------------------------------------------------
    def pump(self) -> None:
        """Pull events from the request reader as far as the current state allows."""
        if self.pumping:
            return
        self.pumping = True
        try:
            self._pump()
        finally:
            self.pumping = False

    def _pump(self) -> None:
        reader = self.reader
        while not self.closed:
            if self.head is None:
                if self.state != WAIT_HEAD:
                    return
                try:
                    ev = reader.next_event()
                except HttpError as exc:
                    self.respond(exc.status, exc.reason, ErrorKind.LB_4XX)
                    return
                if ev is NEED_DATA:
                    if not self.reading:
                        self.resume_reading()
                    return
                self._begin(ev)
                continue
            if self.request_done:
                if reader.buffered > PIPELINE_BOUND:
                    self.pause_reading()
                return
            if not self._pull_body():
                return

    def _pull_body(self) -> bool:
        """Forward (or hold) one body event; False when nothing more can be done now."""
        up = self.up
        if not self.up_ready or up is None:
            if self.replay_size >= PENDING_BOUND:
                self.pause_reading()
                return False
        elif up.pending > BUFFER_HIGH:
            self.pause_reading()
            return False
        try:
            ev = self.reader.next_event()
        except HttpError as exc:
            if self.sent_to_client:
                self.abort(ErrorKind.LB_4XX)
            else:
                self.respond(exc.status, exc.reason, ErrorKind.LB_4XX)
            return False
        if ev is NEED_DATA:
            if not self.reading and not self.eof:
                self.resume_reading()
            return False
        if ev is END or ev is PAUSED:
            self.request_done = True
            self.set_deadline(None)
            if self.up_ready and up is not None and not up.pending:
                up.set_deadline(self.loop.now + self.listener.read_timeout)
            return True
        self.bytes_in += len(ev)
        self.set_deadline(self.loop.now + self.listener.idle_timeout)
        if self.replay is not None:
            self.replay.append(ev)
            self.replay_size += len(ev)
            if self.up_ready and self.replay_size > REPLAY_LIMIT:
                self.replay = None
        if self.up_ready and up is not None:
            up.write(ev)
        return True

    def _begin(self, head: RequestHead) -> None:
        listener = self.listener
        loop = self.loop
        self.head = head
        self.state = EXCHANGE
        self.t_head = loop.now
        self.bytes_in = head.size
        self.head_since = None
        self.set_deadline(None)
        if not head.chunked and not head.content_length:
            self.reader.next_event()  # END: no body
            self.request_done = True
        else:
            self.set_deadline(loop.now + listener.idle_timeout)
        limiter = listener.rate_limiter
        if limiter is not None:
            wait = limiter.check(self.ip, loop.now)
            if wait:
                self.respond(429, "rate limit exceeded", ErrorKind.RATE_LIMITED, retry_after=wait)
                return
        trusted = listener.is_trusted(self.ip) if listener.trusted else False
        fwd = forward_head(head, self.ip_bytes, trusted, listener.tls, listener.pool.reuse)
        self.replay = [fwd]
        self.replay_size = len(fwd)
        # Validate what already arrived of the body before anything reaches a backend.
        while not self.request_done and self.head is head and self._pull_body():
            pass
        if self.head is head and not self.closed:
            self._attempt()

    # ---- the backend half of the exchange (net/relay.py), bound as methods ---------------------
    _attempt = relay.attempt
    _end_attempt = relay.end_attempt
    _upstream_invalid = relay.upstream_invalid
    upstream_connected = relay.upstream_connected
    upstream_drained = relay.upstream_drained
    upstream_data = relay.upstream_data
    upstream_eof = relay.upstream_eof
    upstream_error = relay.upstream_error
    upstream_timeout = relay.upstream_timeout

    # ---- ending an exchange ------------------------------------------------------------------
    def _finish(self, status: int, error: ErrorKind | None, lb_made: bool, backend: int) -> None:
        """Record the outcome, then wait for the next request or close."""
        loop = self.loop
        listener = self.listener
        loop.record(Outcome(listener.index, backend, self.ip, error, status, self.latency, self.bytes_in,
                                  self.bytes_out, lb_made))
        keep = self.keep_client and self.request_done and not listener.closed and not self.eof
        self._reset_exchange()
        if not keep:
            self._close_soon()
            return
        self.state = WAIT_HEAD
        reader = self.reader
        reader.start_next()
        if not self.reading:
            self.resume_reading()
        if reader.buffered:  # a pipelined request is waiting
            self.head_since = loop.now
            self.set_deadline(loop.now + listener.header_timeout)
            self.pump()
        else:
            self.set_deadline(loop.now + listener.idle_timeout)

    def respond(self, status: int, why: str, error: ErrorKind, backend: int = -1,
                retry_after: float | None = None) -> None:
        """Answer with a response the load balancer makes itself."""
        if self.sent_to_client:
            self.abort(error)
            return
        head = self.head
        keep = (head is not None and head.keep_alive and self.request_done and not self.eof
                and status not in CLOSE_AFTER_ERROR and not self.listener.closed)
        data = lb_response(status, why, keep, head.version if head is not None else 11, retry_after)
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self._end_attempt(False)
        if head is None:
            self.bytes_in = self.reader.buffered
        else:
            self.latency = self.loop.now - self.t_head
        self.keep_client = keep
        self.sent_to_client = True
        self.bytes_out += len(data)
        self.write(data)
        self._finish(status, error, True, backend)

    # ---- websocket tunnel --------------------------------------------------------------------
    def _start_tunnel(self, up: BackendConnection, resp: ResponseHead) -> None:
        """A 101 answer: relay it, then both connections carry raw bytes (net/tunnel.py)."""
        head = self.head
        if head is None or not head.websocket:
            self._upstream_invalid("101 Switching Protocols to a request that asked for no upgrade")
            return
        data = upgrade_head(resp)
        self.latency = self.loop.now - self.t_head
        self.status = 101
        self.sent_to_client = True
        self.state = TUNNEL
        self.tunnel = WebsocketTunnel(self, up)
        self.bytes_out += len(data)
        self.write(data)
        rest = up.reader.take_buffer()
        if rest:
            self.bytes_out += len(rest)
            self.write(rest)
        early = self.reader.take_buffer()
        if early:
            self.bytes_in += len(early)
            up.write(early)
        up.set_deadline(None)
        self.set_deadline(self.loop.now + self.listener.idle_timeout)
        if not self.reading:
            self.resume_reading()

    def end_tunnel(self, flush: bool) -> None:
        """Either side of the tunnel ended: one Outcome (status 101) for the whole of it."""
        self.tunnel = None
        self.keep_client = False
        view = self.view
        self._end_attempt(False)
        self.loop.record(Outcome(self.listener.index, view.index if view is not None else -1, self.ip, None,
                                       101, self.latency, self.bytes_in, self.bytes_out))
        self._reset_exchange()
        if flush:
            self._close_soon()
        else:
            self.close()

    # ---- closing -----------------------------------------------------------------------------
    def _close_soon(self) -> None:
        """Close once our output is flushed, without resetting what the client still sends."""
        self.state = CLOSING
        if not self.out:
            self._linger()

    def _linger(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.state = LINGER
        self.set_deadline(self.loop.now + LINGER_TIME)
        if not self.reading:
            self.resume_reading()

    def abort(self, error: ErrorKind) -> None:
        """Drop the exchange and the connection at once (client gone, or a response cut short)."""
        if self.closed:
            return
        if self.head is not None:
            view = self.view
            self.loop.record(Outcome(self.listener.index, view.index if view is not None else -1, self.ip,
                                           error, self.status, self.latency, self.bytes_in, self.bytes_out))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self._end_attempt(False)
        self.tunnel = None
        Channel.close(self)
        listener = self.listener
        listener.connections.discard(self)
        self.loop.gauge_clients(listener.index, -1)
