"""The MetricsActor pushing statsd datagrams to a real UDP socket on 127.0.0.1."""
import socket

import pykka
import pytest

from pmdaemon.actors.metrics import MetricsActor
from pmdaemon.config.model import BackendConfig, Endpoint, ListenerConfig, MonitoringConfig
from pmdaemon.control.statsd import MAX_PAYLOAD
from pmdaemon.net.snapshot import LoopReport, Outcome


@pytest.fixture
def udp_server():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def receive_flush(sock: socket.socket, first_line: str) -> tuple[list[str], list[int]]:
    """Lines and datagram sizes of the flush that contains `first_line` (read until the UDP socket is quiet)."""
    lines, sizes = [], []
    sock.settimeout(5)
    while not any(line.startswith(first_line) for line in lines):
        data = sock.recv(65535)
        lines, sizes = data.decode().split("\n"), [len(data)]  # a flush starts with this line
    sock.settimeout(0.1)  # the rest of the flush follows at once; the next one is 0.2 s away
    try:
        while True:
            data = sock.recv(65535)
            sizes.append(len(data))
            lines.extend(data.decode().split("\n"))
    except TimeoutError:
        return lines, sizes


@pytest.mark.timeout(20)
def test_metrics_actor_pushes_statsd_datagrams(udp_server):
    port = udp_server.getsockname()[1]
    backends = tuple(BackendConfig("127.0.0.1", 20000 + i, instance=f"web-{i}") for i in range(60))
    monitoring = MonitoringConfig(enabled=True, statsd=Endpoint("127.0.0.1", port, "pmd."))
    listener = ListenerConfig(index=0, port=8080, backends=backends, monitoring=monitoring)
    ref = MetricsActor.start([listener], statsd_interval=0.2)
    try:
        outcomes = tuple(Outcome(0, i % 60, "127.0.0.1", None, 200, 0.001 * (i % 50), 10, 20)
                         for i in range(3000))
        ref.tell(LoopReport(outcomes, {(0, 1): 4}, {0: 7}))
        lines, sizes = receive_flush(udp_server, "pmd.8080.requests.2xx:")
        assert "pmd.8080.requests.2xx:3000|c" in lines
        assert "pmd.8080.active_connections:7|g" in lines
        assert "pmd.8080.bytes_out:60000|c" in lines
        assert any(line.startswith("pmd.8080.backend_up.127_0_0_1_20059.web-59:") for line in lines)
        timings = [line for line in lines if line.startswith("pmd.8080.response_time:")]
        assert timings and all(line.endswith("|@" + line.rsplit("@", 1)[1]) for line in timings)
        assert len(timings) <= 100
        assert max(sizes) <= MAX_PAYLOAD and len(sizes) > 1

        # next flush: only the increase is sent
        ref.tell(LoopReport(outcomes[:5], {}, {0: 1}))
        lines, _ = receive_flush(udp_server, "pmd.8080.requests.2xx:")
        assert "pmd.8080.requests.2xx:5|c" in lines
    finally:
        pykka.ActorRegistry.stop_all()
