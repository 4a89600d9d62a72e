"""statsd encoding, pure (the MetricsActor pushing it over UDP: tests/actors/test_statsd_actor.py)."""
import random

import pytest

from pmdaemon.control.metrics import Family
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
