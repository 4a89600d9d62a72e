"""The backend half of an HTTP exchange: choosing a backend, attempts and retries, the backend
connection's callbacks, and relaying the response to the client.

These are functions of a `ClientConnection` (net/proxy.py) that the class binds as its methods
(`upstream_data = relay.upstream_data`, ...): the client connection and its current exchange stay one
object with one set of slots, so a request allocates nothing for its backend side and no call
crosses objects on the hot path. The client side, the request body and the connection's states stay
in net/proxy.py; these functions move an exchange from "request head parsed" to `_finish`, `respond`
or `abort` there.

Attempts: `attempt` asks the strategy for a backend not yet tried (`exclude`), takes a pooled or new
connection from the listener's `UpstreamPool` and sends what `replay` holds (the rewritten head and
the body so far). A failure before a response byte reached the client ends the attempt
(`_attempt_failed`): the strategy hears of it at once (`live_failure`), and the listener's
`RetryPolicy` (net/retry.py) says whether and when to try the next backend; otherwise the client gets
the 502/504 that names the failure. Once a response byte was forwarded, a failure aborts the exchange.

Relaying: `upstream_data` feeds the `ResponseReader`; a response that arrived whole in one read takes
a fast path (head and body in one write); otherwise each read's head, interim (1xx) heads and body
bytes go out together in one write.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pmdaemon.net.heads import interim_head, response_head
from pmdaemon.net.http1 import END, NEED_DATA, PAUSED, HttpError, ResponseHead
from pmdaemon.net.retry import Failure
from pmdaemon.net.snapshot import Outcome
from pmdaemon.net.upstream import BackendConnection
from pmdaemon.states import ErrorKind

if TYPE_CHECKING:
    from pmdaemon.net.proxy import ClientConnection

BUFFER_HIGH = 256 * 1024  # stop reading a side while the other side has this much unsent
REPLAY_LIMIT = 64 * 1024  # requests up to this size can be re-sent to another backend


# ---- attempts ----------------------------------------------------------------------------
def attempt(conn: ClientConnection, fresh: bool = False) -> None:
    """Start the next attempt: a backend the strategy chooses, or (`fresh`) the same backend on a
    new connection; answer 503 when there is none."""
    conn.retry_timer = None
    head = conn.head
    if conn.closed or head is None:
        return
    listener = conn.listener
    over_capacity = False
    while True:
        if fresh:
            view = conn.view
        else:
            view = None if listener.snapshot is None else listener.strategy.choose(conn.ip, head, conn.exclude)
        if view is None:
            break
        address = listener.addresses.get(view.index) or (view.host, view.port)
        up = listener.pool.acquire(view, address, conn, fresh)
        if up is None:
            if fresh:
                break
            conn.exclude = conn.exclude | {view.index}
            over_capacity = True
            continue
        if conn.last_error is not None and not fresh:
            _record_failed_attempt(conn)
        if not fresh:
            conn.attempts += 1
        conn.view = view
        conn.up = up
        conn.up_ready = False
        listener.strategy.started(view.index)
        conn.loop.gauge_active(listener.index, view.index, 1)
        if up.connected:
            upstream_connected(conn, up)
        return
    if conn.last_error is not None:
        kind, status, why, backend = conn.last_error
        conn.respond(status, why, kind, backend)
    elif over_capacity:
        conn.respond(503, "every eligible backend is at its connection limit (over capacity)", ErrorKind.LB_5XX)
    else:
        conn.respond(503, "no healthy backend available", ErrorKind.NO_BACKEND)


def _record_failed_attempt(conn: ClientConnection) -> None:
    """The previous attempt failed and another one started: its Outcome (status 0)."""
    assert conn.last_error is not None
    kind, _status, _why, backend = conn.last_error
    conn.last_error = None
    conn.loop.record(Outcome(conn.listener.index, backend, conn.ip, kind, latency=conn.loop.now - conn.t_head))


def end_attempt(conn: ClientConnection, reusable: bool) -> None:
    """Give the backend connection back (pooled when `reusable`) and the strategy its slot."""
    up = conn.up
    if up is None:
        return
    conn.up = None
    conn.up_ready = False
    listener = conn.listener
    assert conn.view is not None
    index = conn.view.index
    listener.strategy.finished(index)
    conn.loop.gauge_active(listener.index, index, -1)
    if reusable:
        listener.pool.release(up, True)
    else:
        listener.pool.discard(up)


def _attempt_failed(conn: ClientConnection, kind: ErrorKind, status: int, why: str, failure: Failure) -> None:
    """This attempt is over without a response byte sent: retry elsewhere or answer the error."""
    view = conn.view
    head = conn.head
    assert view is not None and head is not None
    end_attempt(conn, False)
    conn.last_error = (kind, status, why, view.index)
    # A backend failure (every kind here is one); its Outcome is recorded only once the retry has
    # chosen (after the delay), and no other request may reach this backend meanwhile.
    conn.listener.strategy.live_failure(view.index)
    delay = conn.listener.retry_policy.next_delay(failure, conn.attempts, head.idempotent, conn.replay is not None)
    if delay is None:
        conn.respond(status, why, kind, view.index)
        return
    conn.exclude = conn.exclude | {view.index}
    if delay > 0:
        conn.retry_timer = conn.loop.call_later(delay, attempt, conn)
    else:
        attempt(conn)


# ---- backend connection callbacks -------------------------------------------------------
def upstream_connected(conn: ClientConnection, up: BackendConnection) -> None:
    if up is not conn.up:
        conn.listener.pool.discard(up)
        return
    head = conn.head
    replay = conn.replay
    assert head is not None and replay is not None  # an attempt starts only while the request is held
    conn.up_ready = True
    up.reader.start(head.method)
    up.write(replay[0] if len(replay) == 1 else b"".join(replay))
    if conn.replay_size > REPLAY_LIMIT:
        conn.replay = None
    if conn.request_done:
        if not up.out:
            up.set_deadline(conn.loop.now + conn.listener.read_timeout)
    else:
        conn.pump()


def upstream_drained(conn: ClientConnection, up: BackendConnection) -> None:
    if up is not conn.up:
        return
    if conn.request_done:
        up.set_deadline(conn.loop.now + conn.listener.read_timeout)
    elif not conn.eof:
        conn.resume_reading()
        conn.pump()


def upstream_data(conn: ClientConnection, up: BackendConnection, data: bytes) -> None:
    if up is not conn.up:
        conn.listener.pool.discard(up)
        return
    reader = up.reader
    try:
        whole = reader.feed_whole(data)
    except HttpError as exc:
        upstream_invalid(conn, exc.reason)
        return
    if whole is not None:
        # Fast path (see ResponseReader.feed_whole): this read is the whole response. The same
        # steps as the event loop below takes for head, body and END, without the loop.
        resp, body = whole
        conn.bytes_out += len(body)
        conn.write(_response_head(conn, resp) + body)
        _response_complete(conn, up)
        return
    out: list[bytes] = []  # everything for the client from this read, sent with one write (head + body)
    while True:
        try:
            ev = reader.next_event()
        except HttpError as exc:
            _flush(conn, out)
            upstream_invalid(conn, exc.reason)
            return
        if ev is NEED_DATA or ev is PAUSED:
            break
        if ev is END:
            _flush(conn, out)
            _response_complete(conn, up)
            return
        if type(ev) is bytes:
            conn.bytes_out += len(ev)
            out.append(ev)
        elif ev.status >= 200:
            out.append(_response_head(conn, ev))
        elif ev.status == 101:
            _flush(conn, out)
            conn._start_tunnel(up, ev)
            return
        elif conn.head is not None and conn.head.version == 11:  # no 1xx to HTTP/1.0 (RFC 9110 15.2)
            interim = interim_head(ev)
            conn.sent_to_client = True
            conn.bytes_out += len(interim)
            out.append(interim)
    _flush(conn, out)
    if conn.closed or conn.up is not up:
        return
    up.set_deadline(conn.loop.now + conn.listener.read_timeout)
    if conn.pending > BUFFER_HIGH:
        up.pause_reading()


def _flush(conn: ClientConnection, out: list[bytes]) -> None:
    if out:
        conn.write(out[0] if len(out) == 1 else b"".join(out))


def upstream_eof(conn: ClientConnection, up: BackendConnection) -> None:
    if up is not conn.up:
        conn.listener.pool.discard(up)
        return
    try:
        up.reader.feed_eof()
    except HttpError:
        _upstream_lost(conn, up, "backend closed the connection")
        return
    _response_complete(conn, up)


def upstream_error(conn: ClientConnection, up: BackendConnection, exc: OSError, connecting: bool) -> None:
    if up is not conn.up:
        conn.listener.pool.discard(up)
    elif connecting:
        reason = exc.strerror or str(exc)
        _attempt_failed(conn, ErrorKind.CONNECT, 502, f"cannot connect to backend {up.view.address}: {reason}",
                        Failure.CONNECT)
    else:
        _upstream_lost(conn, up, f"backend connection failed: {exc.strerror or exc}")


def upstream_timeout(conn: ClientConnection, up: BackendConnection, connecting: bool) -> None:
    if up is not conn.up:
        conn.listener.pool.discard(up)
        return
    listener = conn.listener
    address = up.view.address
    if connecting:
        _attempt_failed(conn, ErrorKind.TIMEOUT, 504, f"connecting to backend {address} timed out", Failure.CONNECT)
    elif conn.sent_to_client:
        if not up.reading:  # held back while the client drains what it has: no backend delay
            up.set_deadline(conn.loop.now + listener.read_timeout)
            return
        conn.abort(ErrorKind.TIMEOUT)
    elif up.pending:
        _attempt_failed(conn, ErrorKind.TIMEOUT, 504, f"backend {address} stopped reading the request",
                        Failure.TIMEOUT)
    else:
        _attempt_failed(conn, ErrorKind.TIMEOUT, 504, f"backend {address} did not answer within "
                                                      f"{listener.read_timeout:g} s", Failure.TIMEOUT)


def _upstream_lost(conn: ClientConnection, up: BackendConnection, why: str) -> None:
    """The backend closed or reset the connection before the response was complete."""
    if conn.sent_to_client:
        conn.abort(ErrorKind.RESET)
        return
    failure = Failure.CLOSED if up.received == 0 else Failure.CUT_SHORT
    head = conn.head
    assert head is not None
    if conn.listener.retry_policy.resend_fresh(failure, up.reused, head.idempotent, conn.replay is not None):
        # A stale pooled connection: not the backend's fault; same backend, fresh connection.
        end_attempt(conn, False)
        attempt(conn, fresh=True)
        return
    _attempt_failed(conn, ErrorKind.RESET, 502, why, failure)


def upstream_invalid(conn: ClientConnection, why: str) -> None:
    if conn.sent_to_client:
        conn.abort(ErrorKind.INVALID_RESPONSE)
        return
    _attempt_failed(conn, ErrorKind.INVALID_RESPONSE, 502, f"invalid response from backend: {why}", Failure.INVALID)


# ---- response side -----------------------------------------------------------------------
def _response_head(conn: ClientConnection, resp: ResponseHead) -> bytes:
    """The final response head as the client gets it (the caller writes it)."""
    head = conn.head
    assert head is not None
    listener = conn.listener
    keep = head.keep_alive and not resp.until_close and conn.request_done and not conn.eof \
        and not listener.closed
    conn.keep_client = keep
    conn.resp = resp
    conn.status = resp.status
    extra = listener.strategy.response_headers(head, conn.view) if listener.adds_response_headers else None
    data = response_head(resp, head.version, keep, extra)
    conn.latency = conn.loop.now - conn.t_head
    conn.sent_to_client = True
    conn.bytes_out += len(data)
    return data


def _response_complete(conn: ClientConnection, up: BackendConnection) -> None:
    resp = conn.resp
    reusable = (resp is not None and resp.keep_alive and conn.request_done and not up.out
                and not up.reader.buffered)
    if not conn.request_done:
        conn.keep_client = False
    end_attempt(conn, reusable)
    assert conn.view is not None
    conn._finish(conn.status, None, False, conn.view.index)
