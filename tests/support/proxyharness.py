"""Data-plane test helpers: `LB` (a `looprunner.RunningLoop` over RecordingBackends) and raw-socket helpers.

tests/net/conftest.py builds its `backends` and `lb` factory fixtures on them.
"""
from __future__ import annotations

import socket
import time

from support.looprunner import RunningLoop


class LB(RunningLoop):
    """A RunningLoop over RecordingBackends (all UP unless publish=False) whose `outcomes()` first
    waits out one report batch (reports are sent every 50 ms)."""

    def __init__(self, backends, publish: bool = True, strategy_factory=None, **listener_options):
        super().__init__([b.port for b in backends], publish=publish, strategy_factory=strategy_factory,
                         **listener_options)

    def outcomes(self, wait: float = 0.2) -> list:
        time.sleep(wait)
        return super().outcomes()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (or the socket timeout)."""
    out = []
    while True:
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
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
