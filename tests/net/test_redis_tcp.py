"""Three real redis-server processes behind a TCP listener; redis-benchmark through it."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from support.looprunner import RunningLoop
from support.ports import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
                                reason="needs redis-server and redis-benchmark")


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16) == b"+PONG\r\n"
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_ports(tmp_path_factory):
    processes, ports = [], []
    try:
        for i in range(3):
            port = free_port()
            directory = tmp_path_factory.mktemp(f"redis{i}")
            processes.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(directory)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0))
            ports.append(port)
        deadline = time.monotonic() + 10
        while not all(ping(port) for port in ports):
            assert time.monotonic() < deadline, "redis-server did not come up"
            time.sleep(0.05)
        yield ports
    finally:
        for process in processes:
            process.kill()
            process.wait(5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["round_robin", "least_connections"])
def test_redis_benchmark_through_the_tcp_listener(redis_ports, strategy):
    lb = RunningLoop(redis_ports, type="tcp", strategy=strategy)
    try:
        run = subprocess.run(
            ["redis-benchmark", "-h", "127.0.0.1", "-p", str(lb.port), "-n", "2000", "-c", "20",
             "-t", "ping,set,get,incr,lpush,lpop", "-q"],
            capture_output=True, text=True, timeout=100)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert "error" not in output.lower(), output
        finals = [line for line in output.replace("\r", "\n").splitlines() if "requests per second" in line]
        assert len(finals) >= 6, output  # PING_INLINE, PING_MBULK, SET, GET, INCR, LPUSH, LPOP
        outcomes = lb.wait_outcomes(20)
        assert {o.backend for o in outcomes} == {0, 1, 2}  # connections spread over the three servers
        assert all(o.error is None for o in outcomes)
    finally:
        lb.close()
