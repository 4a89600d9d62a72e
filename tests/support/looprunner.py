"""A real IOLoop on a thread serving one listener of any type (HTTP, HTTPS, TCP, TCP over TLS), plus
real TCP echo backends (examples/apps/tcp_echo.py processes) and TLS material from a trustme CA."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import trustme

from pmdaemon.config.model import BackendConfig, ListenerConfig, SslConfig
from pmdaemon.net.loop import IOLoop
from pmdaemon.net.snapshot import BackendView, PoolSnapshot
from pmdaemon.states import BackendState

from support.paths import TCP_ECHO_APP
from support.ports import free_port


class RunningLoop:
    """IOLoop + listener 0 on 127.0.0.1:<free port> over backends at `ports` (all up, weights given)."""

    def __init__(self, ports, weights=None, publish: bool = True, strategy_factory=None, **listener_options):
        self.reports = []
        self.loop = IOLoop(self.reports.append, strategy_factory)
        self.ports = list(ports)
        self.weights = list(weights) if weights else [1] * len(self.ports)
        self.cfg = ListenerConfig(index=0, port=0, host="127.0.0.1",
                                  backends=tuple(BackendConfig("127.0.0.1", p) for p in self.ports),
                                  **listener_options)
        self.loop.add_listener(self.cfg)
        self.port = self.loop.listening_address(0)[1]
        self.version = 0
        if publish:
            self.publish([BackendState.UP] * len(self.ports))
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def publish(self, states) -> None:
        self.version += 1
        views = tuple(BackendView(i, "127.0.0.1", port, None, weight, state)
                      for i, (port, weight, state) in enumerate(zip(self.ports, self.weights, states)))
        self.loop.publish(PoolSnapshot(0, self.version, views))

    def settle(self, timeout: float = 5.0) -> None:
        """Return once the loop thread has run every call made to it before (publish, remove_listener,
        ...): the loop runs them in the order they were made."""
        done = threading.Event()
        self.loop._call(done.set)
        if not done.wait(timeout):
            raise AssertionError(f"the loop did not run its pending calls within {timeout:g} s")

    def outcomes(self) -> list:
        return [o for r in list(self.reports) for o in r.outcomes]

    def wait_outcomes(self, count: int, timeout: float = 5.0) -> list:
        """At least `count` outcomes (reports are batched every 50 ms)."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} outcomes, got {self.outcomes()}")
            time.sleep(0.02)
        return self.outcomes()

    def close(self) -> None:
        self.loop.stop()
        self.thread.join(5)


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class EchoServers:
    """`count` tcp_echo.py processes on free ports (each answers "WHO\\n" with its port)."""

    def __init__(self, count: int):
        self.processes: list[subprocess.Popen] = []
        self.ports: list[int] = []
        try:
            for _ in range(count):
                port = free_port()
                env = dict(os.environ, PORT=str(port), HOST="127.0.0.1")
                self.processes.append(subprocess.Popen([sys.executable, str(TCP_ECHO_APP)], env=env,
                                                       stdout=subprocess.DEVNULL, process_group=0))
                self.ports.append(port)
            for port in self.ports:
                wait_listening(port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(5)


def who(sock: socket.socket) -> int:
    """Ask an echo backend (through the balancer) which port it listens on."""
    sock.sendall(b"WHO\n")
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(64)
        if not data:
            raise ConnectionError(f"closed after {line!r}")
        line += data
    return int(line)


def recv_until_closed(sock: socket.socket, limit: int | None = None) -> bytes:
    parts, size = [], 0
    while limit is None or size < limit:
        data = sock.recv(1 << 20)
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)


class TlsFiles:
    """A trustme CA and a server certificate for 127.0.0.1/localhost written as PEM files."""

    def __init__(self, directory: Path, key_type: trustme.KeyType = trustme.KeyType.ECDSA, name: str = "server"):
        self.ca = trustme.CA(key_type=key_type)
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost", key_type=key_type)
        directory = Path(directory)
        self.cert_file = directory / f"{name}.crt"
        self.key_file = directory / f"{name}.key"
        self.ca_file = directory / f"{name}-ca.pem"
        self.cert.cert_chain_pems[0].write_to_path(str(self.cert_file))
        self.cert.private_key_pem.write_to_path(str(self.key_file))
        os.chmod(self.key_file, 0o600)
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def ssl_config(self, **options) -> SslConfig:
        return SslConfig(enabled=True, cert_file=str(self.cert_file), key_file=str(self.key_file), **options)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@contextmanager
def running_loops(**defaults):
    """Yield `start(ports, **listener options) -> RunningLoop` (options over `defaults`); every loop
    started through it is closed on exit. The body of the tests' `balancer` fixtures."""
    running = []

    def start(ports, **options):
        lb = RunningLoop(ports, **{**defaults, **options})
        running.append(lb)
        return lb

    try:
        yield start
    finally:
        for lb in running:
            lb.close()
