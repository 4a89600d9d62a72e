"""A real IOLoop on a thread with one HTTP listener, for data-plane tests; plus raw-socket helpers.

Also a pytest plugin (conftest.py loads it): the `backends` and `lb` factory fixtures, which stop
what they made at teardown.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from backends import RecordingBackend
from net.config import BackendConfig, ListenerConfig
from net.loop import IOLoop
from net.snapshot import UP, BackendView, PoolSnapshot


class LB:
    """IOLoop + listener on 127.0.0.1:<free port> over `backends` (all UP unless publish=False)."""

    def __init__(self, backends, publish: bool = True, strategy_factory=None, **listener_options):
        self.reports = []
        self.loop = IOLoop(self.reports.append, strategy_factory)
        self.cfg = ListenerConfig(index=0, port=0, host="127.0.0.1",
                                  backends=tuple(BackendConfig("127.0.0.1", b.port) for b in backends),
                                  **listener_options)
        self.loop.add_listener(self.cfg)
        self.port = self.loop.listening_address(0)[1]
        self.version = 0
        if publish:
            self.publish([UP] * len(backends), backends)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def publish(self, states, backends) -> None:
        self.version += 1
        views = tuple(BackendView(i, "127.0.0.1", b.port, None, 1, state)
                      for i, (b, state) in enumerate(zip(backends, states)))
        self.loop.publish(PoolSnapshot(0, self.version, views))

    def outcomes(self, wait: float = 0.2) -> list:
        time.sleep(wait)  # reports are batched every 50 ms
        return [o for r in self.reports for o in r.outcomes]

    def close(self) -> None:
        self.loop.stop()
        self.thread.join(5)


@pytest.fixture
def backends():
    """Factory: `backends(n)` starts n more RecordingBackends, named "a", "b", ... in order."""
    made = []

    def make(n: int = 1) -> list[RecordingBackend]:
        new = [RecordingBackend(name) for name in "abcdefgh"[len(made):len(made) + n]]
        made.extend(new)
        return new

    yield make
    for backend in made:
        backend.stop()


@pytest.fixture
def lb():
    """Factory: `lb(backends, **listener_options)` starts an LB over them."""
    made = []

    def make(backends, **options) -> LB:
        instance = LB(backends, **options)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.close()


def get(conn: http.client.HTTPConnection, path: str, method: str = "GET", **kw):
    """One request on `conn`: (response, whole body)."""
    conn.request(method, path, **kw)
    resp = conn.getresponse()
    return resp, resp.read()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (or the socket timeout)."""
    out = []
    while True:
        try:
            data = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not data:
            break
        out.append(data)
    return b"".join(out)


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the LB sends until it closes."""
    with connect(port, timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_response(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One Content-Length-framed response from `sock`: (head, body, leftover bytes)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a full head: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed inside the body")
        rest += data
    return head, rest[:length], rest[length:]
