"""Metric roll-ups and their exposition: pure, fed synthetic outcomes with an explicit clock."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmdaemon.config.alertrule import METRICS as ALERT_METRICS
from pmdaemon.config.model import BackendConfig, ListenerConfig, MonitoringConfig
from pmdaemon.control.metrics import (
    ERROR_KINDS,
    LATENCY_BUCKETS,
    Family,
    LatencyHistogram,
    LoadBalancerMetrics,
    json_samples,
    render_prometheus,
)
from pmdaemon.net.snapshot import Outcome

A = BackendConfig("127.0.0.1", 3001, instance="web-0", app="web")
B = BackendConfig("127.0.0.1", 3002, instance="web-1", app="web")


def listener(index=0, port=8080, backends=(A, B), **kw) -> ListenerConfig:
    return ListenerConfig(index=index, port=port, backends=backends, **kw)


def outcome(backend=0, status=200, latency=0.010, bytes_in=100, bytes_out=1000, error=None,
            listener=0, lb_made=False) -> Outcome:
    return Outcome(listener, backend, "127.0.0.1", error, status, latency, bytes_in, bytes_out, lb_made)


def traffic() -> list[Outcome]:
    return (
        [outcome(0, 200, 0.004)] * 6
        + [outcome(1, 200, 0.020)] * 3
        + [outcome(1, 503, 0.050)]
        + [outcome(0, 0, 5.0, bytes_out=0, error="connect")]
        + [outcome(-1, 429, 0.0001, bytes_out=60, error="rate_limited", lb_made=True)]
        + [outcome(-1, 503, 0.0002, bytes_out=70, error="no_backend", lb_made=True)]
        + [outcome(0, 302, 0.003)]
    )


def metrics_with(outcomes, now=100.0, listeners=None) -> LoadBalancerMetrics:
    m = LoadBalancerMetrics()
    m.reconfigure(listeners or [listener()], now=now - 30)
    m.record(outcomes, now)
    return m


def parse(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} from Prometheus text, via the reference parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---------------------------------------------------------------- histogram


def test_histogram_quantiles_come_from_buckets_and_are_ordered():
    h = LatencyHistogram()
    for ms in range(1, 101):  # 1 ms .. 100 ms, uniform
        h.observe(ms / 1000.0)
    p50, p95, p99 = h.quantile(0.5), h.quantile(0.95), h.quantile(0.99)
    assert 0.025 <= p50 <= 0.075  # inside the bucket that holds the 50th value
    assert 0.075 <= p95 <= 0.1 and 0.075 <= p99 <= 0.1
    assert p50 <= p95 <= p99


def test_histogram_estimate_is_clamped_to_what_was_observed():
    h = LatencyHistogram()
    for _ in range(50):
        h.observe(0.0012)
    assert h.quantile(0.5) == pytest.approx(0.0012)
    assert h.quantile(0.99) == pytest.approx(0.0012)


def test_histogram_slower_than_last_bucket_reports_the_slowest_seen():
    h = LatencyHistogram()
    h.observe(45.0)
    assert h.quantile(0.99) == pytest.approx(45.0)
    assert h.cumulative()[-1] == ("+Inf", 1)
    assert h.cumulative()[-2] == ("30.0", 0)


def test_empty_histogram_quantile_is_zero():
    assert LatencyHistogram().quantile(0.99) == 0.0


def test_histogram_memory_is_fixed():
    h = LatencyHistogram()
    for i in range(10_000):
        h.observe(i / 1000.0)
    assert len(h.counts) == len(LATENCY_BUCKETS) + 1 and h.count == 10_000


# ---------------------------------------------------------------- counters from outcomes


def test_stats_count_requests_classes_errors_and_bytes():
    stats = metrics_with(traffic()).stats(now=100.0)
    assert stats["requests"] == 14
    assert stats["responses"] == {"1xx": 0, "2xx": 9, "3xx": 1, "4xx": 1, "5xx": 2}
    assert stats["errors"] == 3
    assert stats["errors_by_kind"]["connect"] == 1
    assert stats["errors_by_kind"]["rate_limited"] == 1
    assert stats["errors_by_kind"]["no_backend"] == 1
    assert stats["bytes_in"] == 1400
    assert stats["bytes_out"] == 11 * 1000 + 60 + 70
    latency = stats["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert latency["p50"] == pytest.approx(4, abs=1.5)  # most requests took 4 ms
    [only] = stats["listeners"]
    assert only["port"] == 8080 and only["requests"] == 14 and only["responses"]["2xx"] == 9


def test_outcomes_of_unknown_listeners_or_backends_are_not_misattributed():
    m = metrics_with([outcome(listener=7), outcome(backend=9)])
    stats = m.stats(now=100.0)
    assert stats["requests"] == 1  # the listener-7 one is dropped, backend 9 counts for the listener
    assert all(row["requests_total"] == 0 for row in m.traffic(now=100.0))


def test_traffic_shares_per_backend():
    rows = {r["address"]: r for r in metrics_with(traffic()).traffic(now=100.0)}
    a, b = rows["127.0.0.1:3001"], rows["127.0.0.1:3002"]
    assert (a["requests_total"], b["requests_total"]) == (8, 4)  # LB-made responses have no backend
    assert a["share_total"] == pytest.approx(66.67, abs=0.01)
    assert b["share_last_minute"] == pytest.approx(33.33, abs=0.01)
    assert a["instance"] == "web-0" and a["listener"] == 8080


def test_last_minute_forgets_old_traffic_but_totals_do_not():
    m = LoadBalancerMetrics()
    m.reconfigure([listener()], now=0.0)
    m.record([outcome(0)] * 5, now=10.0)
    m.record([outcome(1)] * 5, now=100.0)
    rows = {r["address"]: r for r in m.traffic(now=100.0)}
    assert rows["127.0.0.1:3001"]["requests_last_minute"] == 0
    assert rows["127.0.0.1:3002"]["share_last_minute"] == 100.0
    assert rows["127.0.0.1:3001"]["share_total"] == 50.0


def test_requests_per_second_over_the_last_ten_seconds():
    m = LoadBalancerMetrics()
    m.reconfigure([listener()], now=0.0)
    for second in range(100, 110):
        m.record([outcome()] * 20, now=second + 0.5)
    assert m.status_rates(now=109.5) == {0: pytest.approx(200 / 9.5, rel=0.01)}
    assert m.status_rates(now=200.0) == {0: 0.0}


def test_rate_of_a_young_listener_is_not_diluted():
    m = LoadBalancerMetrics()
    m.reconfigure([listener()], now=50.0)
    m.record([outcome()] * 10, now=51.0)
    assert m.status_rates(now=52.0)[0] == pytest.approx(5.0)


# ---------------------------------------------------------------- alert values


def test_alert_values_count_backends_and_failures():
    m = metrics_with(traffic())
    m.set_backend_states(0, {"127.0.0.1:3001": "up", "127.0.0.1:3002": "open"})
    m.set_connections({(0, 0): 2}, {0: 5})
    v = m.alert_values(0, now=100.0)
    assert (v["healthy_backends"], v["unhealthy_backends"], v["open_circuits"]) == (1, 1, 1)
    assert v["active_connections"] == 5
    # failures: the 503 from a backend, connect, no_backend; rate_limited is the client's problem
    assert v["error_rate"] == pytest.approx(100 * 3 / 14)
    assert 0 < v["p50_response_time"] <= v["p95_response_time"] <= v["p99_response_time"]
    assert v["requests_per_second"] > 0
    assert m.alert_values(3, now=100.0) == {}
    assert set(v) == set(ALERT_METRICS)  # every metric a rule may name has a value


def test_alert_values_recover_once_failures_age_out():
    m = metrics_with([outcome(status=502, error="invalid_response")] * 10, now=100.0)
    assert m.alert_values(0, now=100.0)["error_rate"] == 100.0
    m.record([outcome()] * 10, now=170.0)
    after = m.alert_values(0, now=170.0)
    assert after["error_rate"] == 0.0
    assert after["p99_response_time"] == pytest.approx(0.010)


def test_backends_start_down_and_draining_counts_as_healthy():
    m = metrics_with([])
    assert m.alert_values(0, now=100.0)["healthy_backends"] == 0
    m.set_backend_states(0, {"127.0.0.1:3001": "draining", "127.0.0.1:3002": "half_open", "10.0.0.1:1": "up"})
    assert m.alert_values(0, now=100.0)["healthy_backends"] == 2


# ---------------------------------------------------------------- reload


def test_counters_survive_a_reload_and_follow_the_port():
    m = metrics_with(traffic())
    c = BackendConfig("127.0.0.1", 3003, instance="web-2", app="web")
    # the listener moved to index 1, backend A is gone, C is new
    m.reconfigure([listener(index=0, port=9090, backends=(A,)), listener(index=1, backends=(B, c))], now=110.0)
    m.record([outcome(listener=1, backend=1)], now=111.0)
    by_port = {s["port"]: s for s in m.stats(now=111.0)["listeners"]}
    assert by_port[8080]["requests"] == 15 and by_port[9090]["requests"] == 0
    rows = {(r["listener"], r["address"]): r["requests_total"] for r in m.traffic(now=111.0)}
    assert rows == {(9090, "127.0.0.1:3001"): 0, (8080, "127.0.0.1:3002"): 4, (8080, "127.0.0.1:3003"): 1}


# ---------------------------------------------------------------- exposition


def test_prometheus_text_parses_and_matches_stats():
    m = metrics_with(traffic())
    m.set_backend_states(0, {"127.0.0.1:3001": "up", "127.0.0.1:3002": "open"})
    m.set_connections({(0, 0): 2}, {0: 5})
    stats = m.stats(now=100.0)
    samples = parse(render_prometheus(m.families(detailed=False, now=100.0)))
    lbl = ("listener", "8080")

    for code_class, count in stats["responses"].items():
        assert samples[("pmdaemon_requests_total", frozenset({lbl, ("code_class", code_class)}))] == count
    assert sum(v for (name, _), v in samples.items() if name == "pmdaemon_requests_total") == stats["requests"]
    for kind in ERROR_KINDS:
        assert samples[("pmdaemon_errors_total", frozenset({lbl, ("kind", kind)}))] == stats["errors_by_kind"][kind]
    assert samples[("pmdaemon_bytes_in_total", frozenset({lbl}))] == stats["bytes_in"]
    assert samples[("pmdaemon_bytes_out_total", frozenset({lbl}))] == stats["bytes_out"]
    assert samples[("pmdaemon_response_time_seconds_count", frozenset({lbl}))] == stats["requests"]
    assert samples[("pmdaemon_response_time_seconds_bucket", frozenset({lbl, ("le", "+Inf")}))] == stats["requests"]
    assert samples[("pmdaemon_active_connections", frozenset({lbl}))] == 5
    backend_a = frozenset({lbl, ("backend", "127.0.0.1:3001"), ("instance", "web-0")})
    backend_b = frozenset({lbl, ("backend", "127.0.0.1:3002"), ("instance", "web-1")})
    assert samples[("pmdaemon_backend_up", backend_a)] == 1
    assert samples[("pmdaemon_backend_up", backend_b)] == 0
    assert samples[("pmdaemon_backend_circuit_state", backend_b)] == 2
    assert samples[("pmdaemon_backends_healthy", frozenset({lbl}))] == 1
    assert not any(name == "pmdaemon_backend_requests_total" for name, _ in samples)


def test_detailed_adds_per_backend_and_per_status_series():
    m = metrics_with(traffic())
    m.set_connections({(0, 1): 3}, {0: 3})
    samples = parse(render_prometheus(m.families(detailed=True, now=100.0)))
    lbl = ("listener", "8080")
    backend_b = {lbl, ("backend", "127.0.0.1:3002"), ("instance", "web-1")}
    assert samples[("pmdaemon_backend_requests_total", frozenset(backend_b | {("code_class", "2xx")}))] == 3
    assert samples[("pmdaemon_backend_requests_total", frozenset(backend_b | {("code_class", "5xx")}))] == 1
    assert samples[("pmdaemon_responses_total", frozenset({lbl, ("code", "503")}))] == 2
    assert samples[("pmdaemon_responses_total", frozenset({lbl, ("code", "429")}))] == 1
    assert samples[("pmdaemon_backend_active_requests", frozenset(backend_b))] == 3


def test_switches_choose_families_per_listener():
    quiet = MonitoringConfig(enabled=True, metrics={"response_times": False, "backend_health": False})
    m = LoadBalancerMetrics()
    m.reconfigure([listener(monitoring=quiet), listener(index=1, port=8081)], now=0.0)
    m.record([outcome(), outcome(listener=1)], now=1.0)
    names = {(s["name"], s["labels"].get("listener")) for s in json_samples(m.families(False, now=1.0))}
    assert ("pmdaemon_response_time_seconds_count", "8080") not in names
    assert ("pmdaemon_response_time_seconds_count", "8081") in names
    assert ("pmdaemon_backends_healthy", "8080") not in names
    assert ("pmdaemon_requests_total", "8080") in names


def test_tcp_listener_counts_connections_without_code_classes():
    m = LoadBalancerMetrics()
    m.reconfigure([listener(type="tcp")], now=0.0)
    m.record([outcome(status=0, latency=2.0)] * 3, now=1.0)
    samples = parse(render_prometheus(m.families(False, now=1.0)))
    requests = {labels: v for (name, labels), v in samples.items() if name == "pmdaemon_requests_total"}
    assert requests == {frozenset({("listener", "8080"), ("code_class", "none")}): 3}


def test_instance_usage_gauges():
    m = metrics_with([])
    m.set_instance_usage("web-0", 12.5, 50_000_000)
    m.set_instance_usage("web-1", 1.0, 40_000_000)
    m.forget_instance("web-1")
    samples = parse(render_prometheus(m.families(False, now=100.0)))
    assert samples[("pmdaemon_instance_cpu_percent", frozenset({("instance", "web-0")}))] == 12.5
    assert samples[("pmdaemon_instance_memory_bytes", frozenset({("instance", "web-0")}))] == 50_000_000
    assert ("pmdaemon_instance_cpu_percent", frozenset({("instance", "web-1")})) not in samples


def test_label_values_and_help_are_escaped():
    family = Family("pmdaemon_test", "gauge", "a help\\text\nwith a newline")
    family.add((("instance", 'we"ird\\name\nx'),), 1)
    text = render_prometheus([family])
    assert 'instance="we\\"ird\\\\name\\nx"' in text
    assert "# HELP pmdaemon_test a help\\\\text\\nwith a newline" in text
    [parsed] = text_string_to_metric_families(text)
    assert parsed.samples[0].labels == {"instance": 'we"ird\\name\nx'}


def test_every_family_has_help_and_type_once():
    m = metrics_with(traffic())
    m.set_instance_usage("web-0", 1.0, 1)
    text = render_prometheus(m.families(detailed=True, now=100.0))
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert helps == types and len(set(helps)) == len(helps)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names >= {"pmdaemon_requests", "pmdaemon_response_time_seconds"}


def test_json_samples_are_the_prometheus_samples():
    m = metrics_with(traffic())
    families = m.families(detailed=True, now=100.0)
    from_text = parse(render_prometheus(families))
    from_json = {(s["name"], frozenset(s["labels"].items())): s["value"] for s in json_samples(families)}
    assert from_json == from_text
