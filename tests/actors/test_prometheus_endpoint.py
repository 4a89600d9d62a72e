"""The MetricsActor's /metrics endpoint over real HTTP on 127.0.0.1, and the actor's queries."""
import socket

import pykka
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmdaemon.actors.metrics import MetricsActor
from pmdaemon.config.model import BackendConfig, Endpoint, ListenerConfig, MonitoringConfig
from pmdaemon.net.snapshot import LoopReport, Outcome

from support.http import get
from support.ports import free_port


def listener(index: int, port: int, metrics_port: int | None, path: str = "/metrics") -> ListenerConfig:
    monitoring = MonitoringConfig(
        enabled=metrics_port is not None,
        prometheus=Endpoint("127.0.0.1", metrics_port, path) if metrics_port else None,
    )
    backends = (BackendConfig("127.0.0.1", port + 1, instance="web-0"), BackendConfig("127.0.0.1", port + 2))
    return ListenerConfig(index=index, port=port, backends=backends, monitoring=monitoring)


def counters(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def outcomes(listener_index: int, n: int, status: int = 200) -> tuple[Outcome, ...]:
    return tuple(Outcome(listener_index, i % 2, "127.0.0.1", None, status, 0.002, 50, 500) for i in range(n))


@pytest.fixture
def actors():
    yield
    pykka.ActorRegistry.stop_all()


def test_endpoint_serves_the_same_counters_as_stats(actors):
    metrics_port = free_port()
    ref = MetricsActor.start([listener(0, 18080, metrics_port), listener(1, 18090, None)])
    proxy = ref.proxy()
    ref.tell(LoopReport(outcomes(0, 40) + outcomes(1, 10, status=502), {}, {0: 3}))
    stats = proxy.stats().get(timeout=5)
    assert stats["requests"] == 50 and stats["responses"]["5xx"] == 10

    reply = get(metrics_port, "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = counters(reply.text)
    for row in stats["listeners"]:
        port = str(row["port"])
        for code_class, count in row["responses"].items():
            assert samples[("pmdaemon_requests_total", (("code_class", code_class), ("listener", port)))] == count
        assert samples[("pmdaemon_bytes_out_total", (("listener", port),))] == row["bytes_out"]
    assert samples[("pmdaemon_active_connections", (("listener", "18080"),))] == 3
    assert proxy.prometheus_urls().get(timeout=5) == [f"http://127.0.0.1:{metrics_port}/metrics"]


def test_detailed_query_and_404_elsewhere(actors):
    metrics_port = free_port()
    ref = MetricsActor.start([listener(0, 18080, metrics_port)])
    ref.tell(LoopReport(outcomes(0, 4), {}, {}))
    ref.proxy().stats().get(timeout=5)  # the report is processed before the scrape

    reply = get(metrics_port, "/metrics?detailed=1")
    assert reply.status == 200
    samples = counters(reply.text)
    key = ("pmdaemon_backend_requests_total",
           (("backend", "127.0.0.1:18081"), ("code_class", "2xx"), ("instance", "web-0"), ("listener", "18080")))
    assert samples[key] == 2
    assert "pmdaemon_backend_requests_total" not in get(metrics_port, "/metrics").text
    assert get(metrics_port, "/")[0] == 404
    assert get(metrics_port, "/metricsx")[0] == 404


def test_reconfigure_keeps_counters_and_moves_the_endpoint(actors):
    first_port, second_port = free_port(), free_port()
    ref = MetricsActor.start([listener(0, 18080, first_port)])
    proxy = ref.proxy()
    ref.tell(LoopReport(outcomes(0, 6), {}, {}))
    proxy.reconfigure([listener(0, 18080, second_port, path="/m")]).get(timeout=5)

    with pytest.raises(ConnectionRefusedError):
        get(first_port, "/metrics")
    reply = get(second_port, "/m")
    assert reply.status == 200
    assert counters(reply.text)[("pmdaemon_requests_total", (("code_class", "2xx"), ("listener", "18080")))] == 6
    assert proxy.stats().get(timeout=5)["requests"] == 6


def test_a_taken_port_does_not_stop_the_actor(actors):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ref = MetricsActor.start([listener(0, 18080, taken.getsockname()[1])])
        ref.tell(LoopReport(outcomes(0, 2), {}, {}))
        assert ref.proxy().stats().get(timeout=5)["requests"] == 2
        assert ref.proxy().prometheus_urls().get(timeout=5) == []


def test_stop_releases_the_port(actors):
    metrics_port = free_port()
    ref = MetricsActor.start([listener(0, 18080, metrics_port)])
    assert ref.proxy().prometheus_urls().get(timeout=5)  # bound once the actor has started
    assert get(metrics_port, "/metrics")[0] == 200
    ref.stop()
    with pytest.raises(ConnectionRefusedError):
        get(metrics_port, "/metrics")


def test_queries_for_the_cli(actors):
    ref = MetricsActor.start([listener(0, 18080, None)])
    proxy = ref.proxy()
    proxy.set_backend_states(0, {"127.0.0.1:18081": "up", "127.0.0.1:18082": "open"})
    proxy.set_instance_usage("web-0", 3.5, 1234)
    ref.tell(LoopReport(outcomes(0, 10), {(0, 0): 1}, {0: 2}))
    traffic = {row["address"]: row for row in proxy.traffic().get(timeout=5)}
    assert traffic["127.0.0.1:18081"]["share_total"] == 50.0
    assert proxy.status_rates().get(timeout=5)[0] > 0
    values = proxy.alert_values(0).get(timeout=5)
    assert values["healthy_backends"] == 1 and values["open_circuits"] == 1
    names = {s["name"] for s in proxy.samples(True).get(timeout=5)}
    assert {"pmdaemon_instance_cpu_percent", "pmdaemon_backend_active_requests"} <= names
