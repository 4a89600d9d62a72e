"""statsd encoding (pure) and the MetricsActor pushing it to a real UDP socket on 127.0.0.1."""
import random
import socket

import pykka
import pytest

from pmdaemon.net.snapshot import LoopReport
from pmdaemon.actors.metrics import MetricsActor
from pmdaemon.config.model import BackendConfig, Endpoint, ListenerConfig, MonitoringConfig
from pmdaemon.control.metrics import Family
from pmdaemon.net.snapshot import Outcome
from pmdaemon.control.statsd import MAX_PAYLOAD, StatsdEncoder, TimingSample, gauge_lines, name_part, pack, timing_line


def test_pack_never_exceeds_the_limit_and_keeps_every_line():
    lines = [f"pmdaemon.8080.line{i}:{i}|c" for i in range(500)]
    payloads = pack(lines)
    assert all(len(p) <= MAX_PAYLOAD for p in payloads)
    assert b"\n".join(payloads).decode().split("\n") == lines
    assert len(payloads) > 1


def test_pack_drops_a_line_that_cannot_fit_any_datagram():
    assert pack(["a:1|c", "x" * 2000 + ":1|c", "b:2|c"]) == [b"a:1|c\nb:2|c"]


def test_negative_gauge_is_reset_first():
    assert gauge_lines("g", -3) == ["g:0|g", "g:-3|g"]
    assert gauge_lines("g", 2.5) == ["g:2.5|g"]


def test_timing_line_carries_the_sample_rate():
    assert timing_line("t", 12.34567, 1.0) == "t:12.346|ms"
    assert timing_line("t", 5, 0.25) == "t:5|ms|@0.25"


def test_label_values_cannot_break_the_line_format():
    assert name_part("127.0.0.1:3000") == "127_0_0_1_3000"
    assert name_part("a|b@c d") == "a_b_c_d"


def test_counters_are_sent_as_increases_since_the_last_flush():
    encoder = StatsdEncoder("pmdaemon.")
    counter = Family("pmdaemon_requests_total", "counter", "h")
    counter.add((("listener", "8080"), ("code_class", "2xx")), 5)
    counter.add((("listener", "8080"), ("code_class", "5xx")), 0)
    gauge = Family("pmdaemon_active_connections", "gauge", "h")
    gauge.add((("listener", "8080"),), 3)
    first = b"\n".join(encoder.encode([counter, gauge], {})).decode().split("\n")
    assert first == ["pmdaemon.8080.requests.2xx:5|c", "pmdaemon.8080.active_connections:3|g"]
    counter.samples[0] = counter.samples[0]._replace(value=12)
    second = b"\n".join(encoder.encode([counter, gauge], {})).decode().split("\n")
    assert second == ["pmdaemon.8080.requests.2xx:7|c", "pmdaemon.8080.active_connections:3|g"]


def test_names_skip_empty_labels_and_histograms_are_replaced_by_timings():
    encoder = StatsdEncoder("app")  # the dot is added
    up = Family("pmdaemon_backend_up", "gauge", "h")
    up.add((("listener", "80"), ("backend", "10.0.0.1:80"), ("instance", "")), 1)
    cpu = Family("pmdaemon_instance_cpu_percent", "gauge", "h")
    cpu.add((("instance", "web-0"),), 12.5)
    histogram = Family("pmdaemon_response_time_seconds", "histogram", "h")
    histogram.add((("listener", "80"),), 3, "_count")
    [payload] = encoder.encode([up, cpu, histogram], {"80": ([0.002, 0.010], 0.5)})
    assert payload.decode().split("\n") == [
        "app.80.backend_up.10_0_0_1_80:1|g",
        "app.instance_cpu_percent.web-0:12.5|g",
        "app.80.response_time:2|ms|@0.5",
        "app.80.response_time:10|ms|@0.5",
    ]


def test_timing_sample_is_bounded_and_reports_its_rate():
    sample = TimingSample(capacity=10, rng=random.Random(1))
    for i in range(1000):
        sample.offer(float(i))
    values, rate = sample.take()
    assert len(values) == 10 and rate == pytest.approx(0.01)
    assert max(values) > 100  # later values get their chance, not only the first ten
    assert sample.take() == ([], 1.0)


# ---------------------------------------------------------------- over real UDP


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
    except socket.timeout:
        return lines, sizes


@pytest.mark.timeout(20)
def test_metrics_actor_pushes_statsd_datagrams(udp_server):
    port = udp_server.getsockname()[1]
    backends = tuple(BackendConfig("127.0.0.1", 20000 + i, instance=f"web-{i}") for i in range(60))
    monitoring = MonitoringConfig(enabled=True, statsd=Endpoint("127.0.0.1", port, "pmd."))
    listener = ListenerConfig(index=0, port=8080, backends=backends, monitoring=monitoring)
    ref = MetricsActor.start([listener], statsd_interval=0.2)
    try:
        outcomes = tuple(Outcome(0, i % 60, 200, 0.001 * (i % 50), 10, 20, None, "127.0.0.1", False)
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
