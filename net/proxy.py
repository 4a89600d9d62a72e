"""HTTP reverse proxying: one `ClientConnection` state machine per client socket.

Theory of operation
-------------------
A client connection handles one request at a time (pipelined requests wait in its reader's buffer,
which is bounded: above `PIPELINE_BOUND` the socket is not read until the current answer is done),
so answers go out in request order without any reordering logic.

For each request head: validate (net/http1.py), choose a backend (the listener's strategy, a local
read of the last published snapshot), take a pooled or new backend connection, send the rewritten
head (hop-by-hop headers stripped, X-Forwarded-* set) and stream the body exactly as framed. The
response head is rewritten the same way and the body streamed back raw. Backpressure: a side is
not read while the other side holds more than `BUFFER_HIGH` unsent bytes.

Retries (decisions.md sections 5 and 8): every attempt counts against `retries.max_attempts`.
A connect failure (refused, unreachable, connect timeout) moves to another backend for any method;
a backend that closes or resets before sending a response byte is retried only for idempotent
methods; nothing is retried once a response byte was forwarded, nor after a read timeout (504).
A retry is possible only while the whole request (head + body) is still held: up to
`REPLAY_LIMIT` bytes are kept. Attempt n+1 waits `retries.delay_before(n+1)` on a loop timer.
A reused pooled connection that turns out closed is not a backend failure: an idempotent request
is re-sent on a fresh connection to the same backend without using up an attempt.

Each request ends in exactly one `Outcome`. A failed attempt that was followed by a retry also gets
one, with status 0, so that breakers and health-aware strategies see every live-traffic failure.
LB-made responses (400, 408, 413, 414, 431, 429, 502, 503, 504) have `lb_made=True`; when a
backend caused them (502/504) `backend` and `error` say which and why.
"""
from __future__ import annotations

import ipaddress
import socket

from pmdaemon.net.accepting import accept_waiting
from pmdaemon.net.channel import Channel
from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.http1 import END, NEED_DATA, PAUSED, HttpError, RequestHead, RequestReader, ResponseHead, field_value
from pmdaemon.net.responses import lb_response
from pmdaemon.net.snapshot import Outcome, PoolSnapshot
from pmdaemon.net.strategies import Strategy
from pmdaemon.net.tokenbucket import RateLimiter
from pmdaemon.net.upstream import RECV_SIZE, BackendConnection, UpstreamPool

HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"))
HOP_BY_HOP_BUT_UPGRADE = HOP_BY_HOP - {b"upgrade"}
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"))
DROP_UNTRUSTED = HOP_BY_HOP | _FORWARDED  # the peer's X-Forwarded-* are replaced by ours
DROP_TRUSTED = HOP_BY_HOP | {b"x-forwarded-for"}  # re-added with the peer appended
# Never dropped because a Connection header names them (a known request-smuggling trick).
PROTECTED = frozenset((b"content-length", b"transfer-encoding", b"host")) | _FORWARDED
CRLF = b"\r\n"

BUFFER_HIGH = 256 * 1024  # stop reading a side while the other side has this much unsent
PIPELINE_BOUND = 64 * 1024  # bytes buffered from a client while its current request is in progress
PENDING_BOUND = 64 * 1024  # request bytes held while no backend connection is ready
REPLAY_LIMIT = 64 * 1024  # requests up to this size can be re-sent to another backend
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
        self.addresses: dict[int, tuple] = {}
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
        self.max_attempts = max(1, cfg.retries.max_attempts)
        self.retries = cfg.retries
        self.forwarded_proto = b"X-Forwarded-Proto: https\r\n" if cfg.ssl.enabled else b"X-Forwarded-Proto: http\r\n"

    def on_readable(self) -> None:
        accept_waiting(self.sock, self.accepted)

    def accepted(self, sock: socket.socket, ip: str) -> None:
        ClientConnection(self, sock, ip)

    def publish(self, snapshot: PoolSnapshot, addresses: dict[int, tuple]) -> None:
        self.snapshot = snapshot
        self.addresses = addresses
        self.strategy.update(snapshot)

    def choose(self, ip: str, head: RequestHead, exclude: frozenset):
        if self.snapshot is None:
            return None
        return self.strategy.choose(ip, head, exclude)

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

    def take_over(self, old: "HttpListener") -> None:
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
    __slots__ = ("listener", "ip", "ip_bytes", "forwarded_for", "reader", "state", "head_since", "pumping", "head",
                 "t_head", "latency", "bytes_in", "bytes_out", "request_done", "replay", "replay_size",
                 "attempts", "exclude", "view", "up", "up_ready", "resp", "sent_to_client",
                 "keep_client", "last_error", "retry_timer", "status", "eof")

    def __init__(self, listener: HttpListener, sock: socket.socket, ip: str):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(listener.loop, sock, listener.write_timeout)
        self.listener = listener
        self.ip = ip
        self.ip_bytes = ip.encode()
        self.forwarded_for = b"X-Forwarded-For: " + self.ip_bytes + CRLF + listener.forwarded_proto
        self.reader = RequestReader(listener.max_header_size, listener.max_body)
        self.state = WAIT_HEAD
        self.head_since: float | None = None
        self.pumping = False
        self.eof = False
        self.up: BackendConnection | None = None
        self.retry_timer = None
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
        self.exclude = frozenset()
        self.view = None
        self.up_ready = False
        self.sent_to_client = False
        self.keep_client = False
        self.last_error = None
        self.status = 0

    # ---- client socket events ----------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort("client_closed")
            return
        state = self.state
        if not data:
            self._client_eof()
        elif state == TUNNEL:
            self.bytes_in += len(data)
            self.set_deadline(self.loop.now + self.listener.idle_timeout)
            self.up.write(data)
            if self.up.pending > BUFFER_HIGH:
                self.pause_reading()
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
            self.abort("client_closed")
        elif state == TUNNEL:
            self._end_tunnel(flush=False)
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
                self.respond(408, f"request head not received within {self.listener.header_timeout:g} s", "lb_4xx")
            else:
                self.close()
        elif state == EXCHANGE:
            if self.sent_to_client:
                self.abort("client_timeout")  # its request body stalled: the client's failure, not the backend's
            else:
                self.respond(408, f"request body stalled for {self.listener.idle_timeout:g} s", "lb_4xx")
        elif state == TUNNEL:
            self._end_tunnel(flush=False)
        else:
            self.close()

    def on_write_timeout(self) -> None:
        self.abort("client_timeout")  # the client stopped reading its response

    def on_error(self, exc: OSError) -> None:
        self.abort("client_closed")

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
                    self.respond(exc.status, exc.reason, "lb_4xx")
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
        if not self.up_ready:
            if self.replay_size >= PENDING_BOUND:
                self.pause_reading()
                return False
        elif self.up.pending > BUFFER_HIGH:
            self.pause_reading()
            return False
        try:
            ev = self.reader.next_event()
        except HttpError as exc:
            if self.sent_to_client:
                self.abort("lb_4xx")
            else:
                self.respond(exc.status, exc.reason, "lb_4xx")
            return False
        if ev is NEED_DATA:
            if not self.reading and not self.eof:
                self.resume_reading()
            return False
        if ev is END or ev is PAUSED:
            self.request_done = True
            self.set_deadline(None)
            up = self.up
            if self.up_ready and not up.pending:
                up.set_deadline(self.loop.now + self.listener.read_timeout)
            return True
        self.bytes_in += len(ev)
        self.set_deadline(self.loop.now + self.listener.idle_timeout)
        if self.replay is not None:
            self.replay.append(ev)
            self.replay_size += len(ev)
            if self.up_ready and self.replay_size > REPLAY_LIMIT:
                self.replay = None
        if self.up_ready:
            self.up.write(ev)
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
                self.respond(429, "rate limit exceeded", "rate_limited", retry_after=wait)
                return
        fwd = self._forward_head(head)
        self.replay = [fwd]
        self.replay_size = len(fwd)
        # Validate what already arrived of the body before anything reaches a backend.
        while not self.request_done and self.head is head and self._pull_body():
            pass
        if self.head is head and not self.closed:
            self._attempt()

    def _forward_head(self, head: RequestHead) -> bytes:
        """The request head as the backend gets it: hop-by-hop fields dropped, X-Forwarded-* set."""
        listener = self.listener
        trusted = listener.trusted and listener.is_trusted(self.ip)
        drop = DROP_TRUSTED if trusted else DROP_UNTRUSTED
        if head.websocket:
            drop = drop - {b"upgrade"}
        tokens = head.connection_tokens
        if tokens:
            extra = [t for t in tokens if t not in HOP_BY_HOP and t not in PROTECTED]
            if extra:
                drop = drop.union(extra)
        fields = head.fields
        kept = [line for lname, line in fields if lname not in drop]
        parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n" if head.version == 11 else b" HTTP/1.0\r\n"]
        if kept:
            parts.append(b"\r\n".join(kept))
            parts.append(CRLF)
        if trusted:
            prior = [field_value(lname, line) for lname, line in fields if lname == b"x-forwarded-for"]
            if prior:
                parts += (b"X-Forwarded-For: ", b", ".join(prior), b", ", self.ip_bytes, CRLF)
            else:
                parts += (b"X-Forwarded-For: ", self.ip_bytes, CRLF)
            if head.header(b"x-forwarded-proto") is None:
                parts.append(listener.forwarded_proto)
            if head.host is not None and head.header(b"x-forwarded-host") is None:
                parts += (b"X-Forwarded-Host: ", head.host, CRLF)
        else:
            parts.append(self.forwarded_for)
            if head.host is not None:
                parts += (b"X-Forwarded-Host: ", head.host, CRLF)
        if head.websocket:
            parts.append(b"Connection: Upgrade\r\n\r\n")
        elif not listener.pool.reuse:
            parts.append(b"Connection: close\r\n\r\n")
        elif head.version == 10:
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(CRLF)
        return b"".join(parts)

    # ---- choosing a backend ------------------------------------------------------------------
    def _attempt(self, fresh: bool = False) -> None:
        self.retry_timer = None
        if self.closed or self.head is None:
            return
        listener = self.listener
        over_capacity = False
        while True:
            if fresh:
                view = self.view
            else:
                # listener.choose inlined (one call less per request)
                view = None if listener.snapshot is None else listener.strategy.choose(self.ip, self.head,
                                                                                       self.exclude)
                if view is None:
                    break
            address = listener.addresses.get(view.index) or (view.host, view.port)
            up = listener.pool.acquire(view, address, self, fresh)
            if up is None:
                if fresh:
                    break
                self.exclude = self.exclude | {view.index}
                over_capacity = True
                continue
            if self.last_error is not None and not fresh:
                self._record_failed_attempt()
            if not fresh:
                self.attempts += 1
            self.view = view
            self.up = up
            self.up_ready = False
            listener.strategy.started(view.index)
            self.loop.gauge_active(listener.index, view.index, 1)
            if up.connected:
                self.upstream_connected(up)
            return
        if self.last_error is not None:
            kind, status, why, backend = self.last_error
            self.respond(status, why, kind, backend)
        elif over_capacity:
            self.respond(503, "every eligible backend is at its connection limit (over capacity)", "lb_5xx")
        else:
            self.respond(503, "no healthy backend available", "no_backend")

    def _record_failed_attempt(self) -> None:
        kind, _status, _why, backend = self.last_error
        self.last_error = None
        self.loop.record(Outcome(self.listener.index, backend, 0, self.loop.now - self.t_head, 0, 0, kind,
                                 self.ip, False))

    def _end_attempt(self, reusable: bool) -> None:
        up = self.up
        if up is None:
            return
        self.up = None
        self.up_ready = False
        listener = self.listener
        index = self.view.index
        listener.strategy.finished(index)
        self.loop.gauge_active(listener.index, index, -1)
        if reusable:
            listener.pool.release(up, True)
        else:
            listener.pool.discard(up)

    def _attempt_failed(self, kind: str, status: int, why: str, retryable: bool) -> None:
        """This attempt is over without a response byte sent: retry elsewhere or answer the error."""
        view = self.view
        self._end_attempt(False)
        self.last_error = (kind, status, why, view.index)
        # A backend failure (every kind here is one); its Outcome is recorded only once the retry has
        # chosen (after retry_delay), and no other request may reach this backend meanwhile.
        self.listener.strategy.live_failure(view.index)
        if not retryable or self.attempts >= self.listener.max_attempts or self.replay is None:
            self.respond(status, why, kind, view.index)
            return
        self.exclude = self.exclude | {view.index}
        delay = self.listener.retries.delay_before(self.attempts + 1)
        if delay > 0:
            self.retry_timer = self.loop.call_later(delay, self._attempt)
        else:
            self._attempt()

    # ---- backend connection callbacks -------------------------------------------------------
    def upstream_connected(self, up: BackendConnection) -> None:
        if up is not self.up:
            self.listener.pool.discard(up)
            return
        self.up_ready = True
        up.reader.start(self.head.method)
        replay = self.replay
        up.write(replay[0] if len(replay) == 1 else b"".join(replay))
        if self.replay_size > REPLAY_LIMIT:
            self.replay = None
        if self.request_done:
            if not up.out:
                up.set_deadline(self.loop.now + self.listener.read_timeout)
        else:
            self.pump()

    def upstream_drained(self, up: BackendConnection) -> None:
        if up is not self.up:
            return
        if self.state == TUNNEL:
            self.resume_reading()
            return
        if self.request_done:
            up.set_deadline(self.loop.now + self.listener.read_timeout)
        elif not self.eof:
            self.resume_reading()
            self.pump()

    def upstream_data(self, up: BackendConnection, data: bytes) -> None:
        if up is not self.up:
            self.listener.pool.discard(up)
            return
        if self.state == TUNNEL:
            self.bytes_out += len(data)
            self.set_deadline(self.loop.now + self.listener.idle_timeout)
            self.write(data)
            if self.pending > BUFFER_HIGH:
                up.pause_reading()
            return
        reader = up.reader
        try:
            whole = reader.feed_whole(data)
        except HttpError as exc:
            self._upstream_invalid(exc.reason)
            return
        if whole is not None:
            # Fast path (see ResponseReader.feed_whole): this read is the whole response. The same
            # steps as the event loop below takes for head, body and END, without the loop.
            resp, body = whole
            self.bytes_out += len(body)
            self.write(self._response_head(resp) + body)
            self._response_complete()
            return
        out = []  # everything for the client from this read, sent with one write (head + body)
        while True:
            try:
                ev = reader.next_event()
            except HttpError as exc:
                self._flush(out)
                self._upstream_invalid(exc.reason)
                return
            if ev is NEED_DATA or ev is PAUSED:
                break
            if ev is END:
                self._flush(out)
                self._response_complete()
                return
            if type(ev) is bytes:
                self.bytes_out += len(ev)
                out.append(ev)
            elif ev.status >= 200:
                out.append(self._response_head(ev))
            elif ev.status == 101:
                self._flush(out)
                self._start_tunnel(ev)
                return
            elif self.head.version == 11:  # no 1xx to HTTP/1.0 clients (RFC 9110 15.2)
                out.append(self._interim_head(ev))
        self._flush(out)
        if self.closed or self.up is not up:
            return
        up.set_deadline(self.loop.now + self.listener.read_timeout)
        if self.pending > BUFFER_HIGH:
            up.pause_reading()

    def _flush(self, out: list) -> None:
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))

    def upstream_eof(self, up: BackendConnection) -> None:
        if up is not self.up:
            self.listener.pool.discard(up)
            return
        if self.state == TUNNEL:
            self._end_tunnel(flush=True)
            return
        try:
            up.reader.feed_eof()
        except HttpError:
            self._upstream_lost(up, "backend closed the connection")
            return
        self._response_complete()

    def upstream_error(self, up: BackendConnection, exc: OSError, connecting: bool) -> None:
        if up is not self.up:
            self.listener.pool.discard(up)
            return
        if self.state == TUNNEL:
            self._end_tunnel(flush=True)
        elif connecting:
            reason = exc.strerror or str(exc)
            self._attempt_failed("connect", 502, f"cannot connect to backend {self.view.address}: {reason}", True)
        else:
            self._upstream_lost(up, f"backend connection failed: {exc.strerror or exc}")

    def upstream_timeout(self, up: BackendConnection, connecting: bool) -> None:
        if up is not self.up:
            self.listener.pool.discard(up)
            return
        listener = self.listener
        if connecting:
            self._attempt_failed("timeout", 504, f"connecting to backend {self.view.address} timed out", True)
        elif self.sent_to_client:
            if not up.reading:  # held back while the client drains what it has: no backend delay
                up.set_deadline(self.loop.now + listener.read_timeout)
                return
            self.abort("timeout")
        elif up.pending:
            self._attempt_failed("timeout", 504, f"backend {self.view.address} stopped reading the request", False)
        else:
            self._attempt_failed("timeout", 504, f"backend {self.view.address} did not answer within "
                                                 f"{listener.read_timeout:g} s", False)

    def _upstream_lost(self, up: BackendConnection, why: str) -> None:
        """The backend closed or reset the connection before the response was complete."""
        if self.sent_to_client:
            self.abort("reset")
            return
        replayable = self.replay is not None and self.head.idempotent and up.received == 0
        if up.reused and replayable:
            # A stale pooled connection: not the backend's fault; same backend, fresh connection.
            self._end_attempt(False)
            self._attempt(fresh=True)
            return
        self._attempt_failed("reset", 502, why, replayable)

    def _upstream_invalid(self, why: str) -> None:
        if self.sent_to_client:
            self.abort("invalid_response")
            return
        self._attempt_failed("invalid_response", 502, f"invalid response from backend: {why}", False)

    # ---- response side -----------------------------------------------------------------------
    def _filtered_response(self, resp: ResponseHead, keep_upgrade: bool) -> list[bytes]:
        """Status line and end-to-end fields of a response, each line CRLF-terminated, as parts."""
        drop = HOP_BY_HOP_BUT_UPGRADE if keep_upgrade else HOP_BY_HOP
        tokens = resp.connection_tokens
        if tokens:
            extra = [t for t in tokens if t not in HOP_BY_HOP and t not in PROTECTED]
            if extra:
                drop = drop.union(extra)
        kept = [line for lname, line in resp.fields if lname not in drop]
        if kept:
            return [resp.status_line, CRLF, b"\r\n".join(kept), CRLF]
        return [resp.status_line, CRLF]

    def _response_head(self, resp: ResponseHead) -> bytes:
        """The final response head as the client gets it (the caller writes it)."""
        head = self.head
        keep = head.keep_alive and not resp.until_close and self.request_done and not self.eof \
            and not self.listener.closed
        self.keep_client = keep
        self.resp = resp
        self.status = resp.status
        parts = self._filtered_response(resp, False)
        if self.listener.adds_response_headers:
            for name, value in self.listener.strategy.response_headers(head, self.view):
                parts += (name, b": ", value, CRLF)
        if not keep:
            parts.append(b"Connection: close\r\n\r\n")
        elif head.version == 10:
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(CRLF)
        data = b"".join(parts)
        self.latency = self.loop.now - self.t_head
        self.sent_to_client = True
        self.bytes_out += len(data)
        return data

    def _interim_head(self, resp: ResponseHead) -> bytes:
        parts = self._filtered_response(resp, False)
        parts.append(CRLF)
        data = b"".join(parts)
        self.sent_to_client = True
        self.bytes_out += len(data)
        return data

    def _response_complete(self) -> None:
        up = self.up
        reusable = (self.resp.keep_alive and self.request_done and not up.out
                    and not up.reader.buffered)
        if not self.request_done:
            self.keep_client = False
        self._end_attempt(reusable)
        self._finish(self.status, None, False, self.view.index)

    def _finish(self, status: int, error: str | None, lb_made: bool, backend: int) -> None:
        """Record the outcome, then wait for the next request or close."""
        loop = self.loop
        loop.record(Outcome(self.listener.index, backend, status, self.latency, self.bytes_in, self.bytes_out,
                            error, self.ip, lb_made))
        keep = self.keep_client and self.request_done and not self.listener.closed and not self.eof
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
            self.set_deadline(loop.now + self.listener.header_timeout)
            self.pump()
        else:
            self.set_deadline(loop.now + self.listener.idle_timeout)

    def respond(self, status: int, why: str, error: str, backend: int = -1, retry_after: float | None = None) -> None:
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
    def _start_tunnel(self, resp: ResponseHead) -> None:
        up = self.up
        if not self.head.websocket:
            self._upstream_invalid("101 Switching Protocols to a request that asked for no upgrade")
            return
        parts = self._filtered_response(resp, True)
        parts.append(b"Connection: Upgrade\r\n\r\n")
        data = b"".join(parts)
        self.latency = self.loop.now - self.t_head
        self.status = 101
        self.sent_to_client = True
        self.state = TUNNEL
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

    def _end_tunnel(self, flush: bool) -> None:
        self.keep_client = False
        self._end_attempt(False)
        view = self.view
        self.loop.record(Outcome(self.listener.index, view.index, 101, self.latency, self.bytes_in,
                                 self.bytes_out, None, self.ip, False))
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

    def abort(self, error: str) -> None:
        """Drop the exchange and the connection at once (client gone, or a response cut short)."""
        if self.closed:
            return
        if self.head is not None:
            self.loop.record(Outcome(self.listener.index, self.view.index if self.view else -1, self.status,
                                     self.latency, self.bytes_in, self.bytes_out, error, self.ip, False))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self._end_attempt(False)
        Channel.close(self)
        listener = self.listener
        listener.connections.discard(self)
        self.loop.gauge_clients(listener.index, -1)
