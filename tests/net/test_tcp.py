"""TCP listeners (`type: "tcp"`): real tcp_echo.py backends behind a real IOLoop, real client sockets."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
import trustme

from pmdaemon.config.model import ConnectionPool, RateLimiting, Retries, Timeouts
from pmdaemon.states import BackendState

from support.looprunner import EchoServers, TlsFiles, recv_until_closed, running_loops, who
from support.ports import free_port
from support.wait import wait_until

MiB = 1 << 20


@pytest.fixture(scope="module")
def echo():
    servers = EchoServers(3)
    yield servers
    servers.stop()


@pytest.fixture
def balancer():
    """balancer(ports, **listener options) -> a running TCP listener; closed at teardown."""
    with running_loops(type="tcp") as start:
        yield start


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def payload(size: int) -> bytes:
    """Random bytes that never contain the echo server's WHO line."""
    while True:
        data = os.urandom(size)
        if b"WHO\n" not in data:
            return data


class BackendClosingFirst:
    """A one-connection backend that sends `greeting`, shuts down its sending side at once, then keeps
    what the client sends until the client closes. Use as a context manager (the listening socket is
    closed on exit); `port` is where it listens."""

    def __init__(self, greeting: bytes):
        self.greeting = greeting
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve)

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(self.greeting)
            conn.shutdown(socket.SHUT_WR)
            self._received.append(recv_until_closed(conn))

    def __enter__(self) -> BackendClosingFirst:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.close()

    def received(self) -> list[bytes]:
        """What the client sent, once the connection has ended (waits up to 5 s for that)."""
        self._thread.join(5)
        return self._received


def echo_through(sock: socket.socket, data: bytes) -> bytes:
    """Send `data` from a thread while reading the echo; returns what came back."""
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    got = bytearray()
    while len(got) < len(data):
        chunk = sock.recv(MiB)
        if not chunk:
            break
        got += chunk
    sender.join(10)
    return bytes(got)


def echo_in_steps(sock: socket.socket, data: bytes, step: int = 256 * 1024) -> bytes:
    """Like echo_through from one thread (an SSLSocket must not be read and written concurrently):
    send a step, read its echo, repeat."""
    got = bytearray()
    for start in range(0, len(data), step):
        sock.sendall(data[start:start + step])
        while len(got) < min(start + step, len(data)):
            chunk = sock.recv(MiB)
            if not chunk:
                return bytes(got)
            got += chunk
    return bytes(got)


def test_round_robin_rotates_connections(echo, balancer):
    lb = balancer(echo.ports)
    seen = []
    for _ in range(6):
        with connect(lb.port) as sock:
            seen.append(who(sock))
    assert seen == echo.ports * 2


def test_weighted_round_robin_follows_weights(echo, balancer):
    lb = balancer(echo.ports, weights=[3, 1, 1], strategy="weighted_round_robin")
    seen = []
    for _ in range(10):
        with connect(lb.port) as sock:
            seen.append(who(sock))
    a, b, c = echo.ports
    assert (seen.count(a), seen.count(b), seen.count(c)) == (6, 2, 2)


def test_ip_hash_keeps_a_client_on_one_backend(echo, balancer):
    lb = balancer(echo.ports, strategy="ip_hash")
    seen = set()
    for _ in range(5):
        with connect(lb.port) as sock:
            seen.add(who(sock))
    assert len(seen) == 1


def test_least_connections_counts_open_connections(echo, balancer):
    lb = balancer(echo.ports, strategy="least_connections")
    held = [connect(lb.port) for _ in range(3)]
    try:
        first = [who(sock) for sock in held]
        assert sorted(first) == sorted(echo.ports)  # one each
        freed = first[1]
        held[1].close()
        lb.wait_outcomes(1)  # the balancer saw it end
        with connect(lb.port) as sock:
            assert who(sock) == freed  # the only backend with no open connection
    finally:
        for sock in held:
            sock.close()


def test_five_mib_byte_exact_both_ways(echo, balancer):
    lb = balancer(echo.ports)
    data = payload(5 * MiB)
    with connect(lb.port, timeout=20) as sock:
        assert echo_through(sock, data) == data
    outcome = lb.wait_outcomes(1)[0]
    assert (outcome.status, outcome.bytes_in, outcome.bytes_out, outcome.error) == (0, len(data), len(data), None)


def test_half_close_client_still_receives_the_rest(echo, balancer):
    lb = balancer(echo.ports)
    data = payload(2 * MiB)
    with connect(lb.port, timeout=20) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # done sending; the echo of everything must still arrive
        assert recv_until_closed(sock) == data
    outcome = lb.wait_outcomes(1)[0]
    assert outcome.error is None and outcome.bytes_out == len(data)


def test_half_close_from_the_backend_side_keeps_the_client_direction(balancer):
    """A backend that shuts down its sending side first: the client sees EOF and may still send."""
    with BackendClosingFirst(b"banner then EOF\n") as backend:
        lb = balancer([backend.port])
        with connect(lb.port) as sock:
            assert recv_until_closed(sock) == b"banner then EOF\n"
            sock.sendall(b"late words")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
        assert backend.received() == [b"late words"]


def test_backpressure_holds_a_fast_backend_to_a_slow_client(balancer):
    """A client that does not read: the balancer stops reading the backend (bounded memory), so the
    backend's send blocks; when the client reads, everything arrives intact."""
    size = 32 * MiB  # well past what loopback socket buffers and the balancer's bound can hold
    data = payload(size)
    server = socket.create_server(("127.0.0.1", 0))
    sent = threading.Event()

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.sendall(data)
            sent.set()
            conn.shutdown(socket.SHUT_WR)
            recv_until_closed(conn)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        lb = balancer([server.getsockname()[1]])
        with connect(lb.port, timeout=20) as sock:
            time.sleep(0.5)
            assert not sent.is_set()  # held back: nobody buffers 32 MiB for a client that does not read
            assert recv_until_closed(sock) == data
        thread.join(10)
        assert sent.is_set()
    finally:
        server.close()


def test_idle_connection_is_closed(echo, balancer):
    lb = balancer(echo.ports, timeouts=Timeouts(idle=0.3))
    with connect(lb.port) as sock:
        who(sock)
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert 0.2 < time.monotonic() - started < 3
    assert lb.wait_outcomes(1)[0].error is None  # idleness is nobody's failure


def test_pool_idle_timeout_closes_too(echo, balancer):
    lb = balancer(echo.ports, connection_pool=ConnectionPool(idle_timeout=0.3))
    with connect(lb.port) as sock:
        who(sock)
        assert sock.recv(10) == b""


def test_traffic_keeps_a_connection_alive_past_the_idle_timeout(echo, balancer):
    lb = balancer(echo.ports, timeouts=Timeouts(idle=0.4))
    with connect(lb.port) as sock:
        for _ in range(6):
            who(sock)
            time.sleep(0.15)
        who(sock)


def test_max_connections_holds_extra_clients_in_the_backlog(echo, balancer):
    lb = balancer(echo.ports, connection_pool=ConnectionPool(max_connections=2))
    first, second = connect(lb.port), connect(lb.port)
    try:
        who(first), who(second)
        third = connect(lb.port, timeout=0.5)  # the kernel completes the handshake; nobody serves it
        third.sendall(b"WHO\n")
        with pytest.raises(socket.timeout):
            third.recv(10)
        first.close()
        third.settimeout(5)
        line = third.recv(10)
        assert int(line) in echo.ports
        third.close()
    finally:
        first.close()
        second.close()


def test_refused_backend_is_retried_on_the_next(echo, balancer):
    dead = free_port()
    lb = balancer([dead, echo.ports[0]])
    for _ in range(4):
        with connect(lb.port) as sock:
            assert who(sock) == echo.ports[0]
    outcomes = lb.wait_outcomes(6)
    failures = [o for o in outcomes if o.error == "connect"]
    assert failures and all(o.backend == 0 for o in failures)
    assert [o.backend for o in outcomes if o.error is None] == [1, 1, 1, 1]


def test_every_backend_refusing_closes_the_client(balancer):
    lb = balancer([free_port(), free_port()], retries=Retries(max_attempts=2))
    with connect(lb.port) as sock:
        assert sock.recv(10) == b""
    outcomes = lb.wait_outcomes(2)
    assert sorted(o.backend for o in outcomes) == [0, 1]
    assert all(o.error == "connect" for o in outcomes)


def test_no_backend_up_closes_the_client(echo, balancer):
    lb = balancer(echo.ports[:1])
    lb.publish([BackendState.DOWN])
    lb.settle()
    with connect(lb.port) as sock:
        assert sock.recv(10) == b""
    assert lb.wait_outcomes(1)[0].error == "no_backend"
    lb.publish([BackendState.UP])
    lb.settle()
    with connect(lb.port) as sock:
        assert who(sock) == echo.ports[0]


def test_rate_limit_counts_new_connections(echo, balancer):
    lb = balancer(echo.ports, rate_limiting=RateLimiting(enabled=True, requests_per_second=0.5, burst_size=2))
    served = refused = 0
    for _ in range(4):
        with connect(lb.port) as sock:
            try:
                sock.sendall(b"WHO\n")
                answered = bool(sock.recv(10))
            except ConnectionResetError:  # closed with our bytes unread
                answered = False
            served += answered
            refused += not answered
    assert (served, refused) == (2, 2)
    assert sum(o.error == "rate_limited" for o in lb.wait_outcomes(4)) == 2


def test_outcome_reports_duration_and_bytes(echo, balancer):
    lb = balancer(echo.ports)
    with connect(lb.port) as sock:
        sock.sendall(b"abc\n")
        assert sock.recv(10) == b"abc\n"
        time.sleep(0.2)
    outcome = lb.wait_outcomes(1)[0]
    assert outcome.status == 0 and outcome.backend == 0 and not outcome.lb_made
    assert 0.2 <= outcome.latency < 2
    assert (outcome.bytes_in, outcome.bytes_out) == (4, 4)


def test_open_connections_are_reported_as_gauges(echo, balancer):
    lb = balancer(echo.ports)
    with connect(lb.port) as sock:
        who(sock)

        def reported():
            latest = lb.reports[-1] if lb.reports else None
            return latest if latest is not None and latest.active else None
        report = wait_until(reported, 5, message="the open connections reported")
        assert report.active == {(0, 0): 1}
        assert report.client_connections[0] == 1


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to see socket timers")
def test_keep_alive_sets_so_keepalive_on_both_sides(echo, balancer):
    lb = balancer(echo.ports)
    with connect(lb.port) as sock:
        who(sock)
        # columns: Recv-Q Send-Q Local Peer [timer:(keepalive,...)]
        rows = [line.split() for line in subprocess.run(["ss", "-tnoH", "state", "established"],
                                                        capture_output=True, text=True).stdout.splitlines()]
        to_client = [row for row in rows if row[2] == f"127.0.0.1:{lb.port}"]
        to_backend = [row for row in rows if row[3] == f"127.0.0.1:{echo.ports[0]}"]
        assert len(to_client) == 1 and len(to_backend) == 1
        assert "keepalive" in to_client[0][-1] and "keepalive" in to_backend[0][-1]


def test_tls_terminated_tcp(echo, balancer, tmp_path):
    files = TlsFiles(tmp_path, trustme.KeyType.RSA)
    lb = balancer(echo.ports, ssl=files.ssl_config())
    context = files.client_context()
    with context.wrap_socket(connect(lb.port, timeout=20), server_hostname="127.0.0.1") as sock:
        assert sock.selected_alpn_protocol() is None  # a TCP listener does not claim to speak HTTP
        assert who(sock) == echo.ports[0]
        data = payload(3 * MiB)
        assert echo_in_steps(sock, data) == data
    with context.wrap_socket(connect(lb.port), server_hostname="127.0.0.1") as sock:
        assert who(sock) == echo.ports[1]


def test_tls_terminated_tcp_backend_closes_first(balancer, tmp_path):
    """The backend ends its side: the TLS client reads everything, then a clean close_notify (not a
    truncation); when the client closes too the session ends normally. (Client data sent after our
    close_notify is forwarded unless it races OpenSSL's shutdown step: see net/tls.py.)"""
    files = TlsFiles(tmp_path)
    with BackendClosingFirst(b"bye\n") as backend:
        lb = balancer([backend.port], ssl=files.ssl_config())
        raw = connect(lb.port)
        with files.client_context().wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as sock:
            assert recv_until_closed(sock) == b"bye\n"  # a ragged EOF would raise SSLEOFError here
        assert backend.received() == [b""]
        outcome = lb.wait_outcomes(1)[0]
        assert (outcome.error, outcome.bytes_out) == (None, 4)


def test_tls_backends_from_a_tcp_listener(balancer, tmp_path):
    """backend_protocol https on a TCP listener: TLS towards a TLS echo backend, verified."""
    from pmdaemon.config.model import BackendTls

    files = TlsFiles(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files.cert.configure_cert(server_context)
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(100).upper())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        lb = balancer([server.getsockname()[1]], backend_protocol="https",
                      backend_tls=BackendTls(ca_file=str(files.ca_file)))
        with connect(lb.port) as sock:
            sock.sendall(b"shout")
            assert sock.recv(100) == b"SHOUT"
        thread.join(5)
    finally:
        server.close()
