"""The example backends in examples/apps/, run as real processes and spoken to with real clients."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from support.paths import EXAMPLE_APPS
from support.ports import free_port
from support.wait import wait_until


@contextmanager
def running(argv: list[str], **env):
    """Run an example app on a free port until the block ends; yields the port."""
    port = free_port()
    process = subprocess.Popen(argv, env={**os.environ, "PORT": str(port), **{k: str(v) for k, v in env.items()}},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _accepts(port) or process.poll() is not None, message=f"{argv[-1]} listening")
        assert process.poll() is None, f"{argv} exited with {process.returncode}"
        yield port
    finally:
        process.kill()
        process.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def request(connection: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    connection.request(method, path, body=body, headers=headers or {},
                       encode_chunked=not isinstance(body, (bytes, type(None))))
    response = connection.getresponse()
    return response.status, response, response.read()


def test_server_py_routes_on_one_keep_alive_connection(tmp_path):
    flag = tmp_path / "fail-health"
    with running([sys.executable, str(EXAMPLE_APPS / "server.py")], PM2_INSTANCE_ID=3, FAIL_HEALTH_FILE=flag) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        status, response, body = request(connection, "GET", "/anything")
        assert (status, body) == (200, f"instance 3 port {port}\n".encode())
        assert response.getheader("X-Backend") == str(port) and response.getheader("X-Instance") == "3"
        sock = connection.sock
        assert request(connection, "GET", "/health")[::2] == (200, b"ok\n")
        flag.touch()
        assert request(connection, "GET", "/health")[::2] == (503, b"failing\n")
        assert request(connection, "GET", "/status/418")[0] == 418
        assert request(connection, "GET", "/status/204")[::2] == (204, b"")
        assert request(connection, "GET", "/bytes/200000")[2] == b"x" * 200000
        assert request(connection, "GET", "/slow?ms=20")[0] == 200
        payload = os.urandom(300_000)
        status, _, body = request(connection, "POST", "/echo", payload)
        assert json.loads(body)["length"] == len(payload)
        assert json.loads(body)["sha256"] == hashlib.sha256(payload).hexdigest()
        pieces = [payload[:1000], payload[1000:]]
        status, _, body = request(connection, "PUT", "/echo", iter(pieces))  # chunked
        assert (json.loads(body)["method"], json.loads(body)["length"]) == ("PUT", len(payload))
        assert connection.sock is sock  # every request above went over the same connection
        connection.close()


def test_server_py_delay_ms_slows_every_request():
    with running([sys.executable, str(EXAMPLE_APPS / "server.py")], DELAY_MS=150) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=0.05)
        connection.request("GET", "/")
        with pytest.raises(TimeoutError):
            connection.getresponse()
        connection.close()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_server_js_answers_health_and_names_its_port():
    with running(["node", str(EXAMPLE_APPS / "server.js")], PM2_INSTANCE_ID=1) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        assert request(connection, "GET", "/health")[::2] == (200, b"ok\n")
        status, response, body = request(connection, "POST", "/x", b"ignored body")
        assert (status, body) == (200, f"instance 1 port {port}\n".encode())
        assert response.getheader("X-Backend") == str(port) and response.getheader("X-Instance") == "1"
        connection.close()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_tcp_echo_echoes_answers_who_and_finishes_after_a_half_close():
    with running([sys.executable, str(EXAMPLE_APPS / "tcp_echo.py")]) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"hello\nWHO\n")
            assert read_exactly(sock, 6 + len(str(port)) + 1) == f"hello\n{port}\n".encode()
            sock.sendall(b"WH")  # a prefix of WHO is held until the line shows it is not WHO
            sock.sendall(b"AT\n")
            assert read_exactly(sock, 5) == b"WHAT\n"
        payload = os.urandom(2 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            def send_then_half_close():
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send_then_half_close)  # the echo comes back while we send
            sender.start()
            echoed = read_all(sock)
            sender.join()
            assert echoed == payload  # everything echoed, then the server closed


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data
