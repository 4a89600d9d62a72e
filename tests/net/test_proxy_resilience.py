"""Backend failures, timeouts and lifecycle through a real IOLoop (decisions.md sections 5, 6, 8)."""
from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from pmdaemon.config.model import Retries, Timeouts

from support.http import get
from support.proxyharness import connect, read_all, read_response
from support.wait import wait_until


def test_stale_pooled_connection_is_not_a_backend_failure(backends, lb):
    (a,) = backends(1)
    proxy = lb([a])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    assert get(conn, "/then-drop").status == 200
    reply = get(conn, "/after")  # pooled connection is dropped on arrival; re-sent on a fresh one
    assert reply.status == 200 and reply.body == b"a GET /after"
    assert (a.accepts, a.dropped) == (2, 1)
    assert [o.status for o in proxy.outcomes()] == [200, 200]  # no failed attempt reported


def test_stale_pooled_connection_does_not_replay_a_post(backends, lb):
    (a,) = backends(1)
    proxy = lb([a])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    assert get(conn, "/then-drop").status == 200
    reply = get(conn, "/sha", method="POST", body=b"once")
    assert reply.status == 502 and a.dropped == 1
    assert len(a.requests) == 1


def test_retry_waits_the_configured_delay(backends, lb):
    a, b = backends(2)
    proxy = lb([a, b], retries=Retries(max_attempts=3, retry_delay=0.3, backoff_factor=2))
    a.stop()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    start = time.monotonic()
    reply = get(conn, "/x")  # round robin starts at a (dead): one retry on b after 0.3 s
    assert reply.status == 200 and reply.body == b"b GET /x"
    assert 0.28 < time.monotonic() - start < 2


def test_max_attempts_bounds_the_retries(backends, lb):
    a, b, c = backends(3)
    proxy = lb([a, b, c], retries=Retries(max_attempts=2))
    a.stop()
    b.stop()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    reply = get(conn, "/x")  # a, then b: both refuse; c is never tried
    assert reply.status == 502 and b"cannot connect" in reply.body
    outcomes = proxy.outcomes()
    assert [(o.backend, o.status, o.error) for o in outcomes] == [(0, 0, "connect"), (1, 502, "connect")]
    assert outcomes[-1].lb_made


def test_invalid_response_gives_502_and_is_not_retried(backends, lb):
    a, b = backends(2)
    proxy = lb([a, b])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    reply = get(conn, "/garbage")
    assert reply.status == 502 and b"invalid response" in reply.body
    assert len(a.requests) + len(b.requests) == 1
    [outcome] = proxy.outcomes()
    assert outcome.error == "invalid_response"


def test_connect_timeout_moves_on_to_another_backend(backends, lb):
    # A listener whose accept queue is full and never drained: further SYNs go unanswered.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(black_hole.getsockname())
        fillers.append(filler)
    time.sleep(0.1)
    (good,) = backends(1)

    class Hole:
        port = black_hole.getsockname()[1]

    proxy = lb([Hole, good], timeouts=Timeouts(connect=0.3))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        start = time.monotonic()
        reply = get(conn, "/x")
        elapsed = time.monotonic() - start
        assert reply.status == 200 and reply.body == b"a GET /x"
        assert 0.25 < elapsed < 3
        assert [(o.backend, o.error) for o in proxy.outcomes() if o.status == 0] == [(0, "timeout")]
    finally:
        for filler in fillers:
            filler.close()
        black_hole.close()


def test_idle_keep_alive_client_is_closed_after_idle_timeout(backends, lb):
    (a,) = backends(1)
    proxy = lb([a], timeouts=Timeouts(idle=0.3))
    with connect(proxy.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _head, body, rest = read_response(sock)
        start = time.monotonic()
        assert read_all(sock) == b""  # closed by the LB, without a response
        assert 0.25 < time.monotonic() - start < 3


def test_removed_listener_finishes_in_flight_requests(backends, lb):
    (a,) = backends(1)
    proxy = lb([a])
    result = {}

    def slow_request():
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        result["answer"] = get(conn, "/sleep/400")

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: a.requests, 5, message="the slow request at the backend")  # in flight for 400 ms
    proxy.loop.remove_listener(0)
    proxy.settle()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    thread.join(5)
    reply = result["answer"]
    assert reply.status == 200 and reply.body == b"a GET /sleep/400"
    assert reply.headers.get("Connection") == "close"


def test_a_failing_handler_costs_one_connection_not_the_loop(backends, lb, caplog):
    from pmdaemon.net.strategies import make_strategy

    def buggy_factory(cfg):
        strategy = make_strategy(cfg)
        choose = strategy.choose

        def choose_or_crash(ip, head, exclude):
            if head.target == b"/boom":
                raise RuntimeError("strategy bug")
            return choose(ip, head, exclude)

        strategy.choose = choose_or_crash
        return strategy

    (a,) = backends(1)
    proxy = lb([a], strategy_factory=buggy_factory)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(sock) == b""  # that connection is closed
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    reply = get(conn, "/fine")
    assert reply.status == 200 and reply.body == b"a GET /fine"
    assert "strategy bug" in caplog.text


def test_client_that_stops_reading_is_dropped_at_the_write_timeout(backends, lb):
    (a,) = backends(1)
    proxy = lb([a], timeouts=Timeouts(write=0.3))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    try:
        sock.sendall(b"GET /big/20000000 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        deadline = time.monotonic() + 5
        outcomes = []
        while time.monotonic() < deadline and not outcomes:
            outcomes = proxy.outcomes(wait=0.1)
        [outcome] = outcomes
        # The client's failure, not the backend's (breakers and passive ejection ignore it).
        assert (outcome.status, outcome.error, outcome.lb_made) == (200, "client_timeout", False)
        assert outcome.bytes_out < 20000000
    finally:
        sock.close()
