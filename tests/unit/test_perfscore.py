"""Performance scores -> weights, and the time-aware EWMA."""
import pytest

from pmdaemon.control.perfscore import FLOOR, MAX_WEIGHT, BackendMetrics, Ewma, PerformanceScorer

CONFIG_WEIGHTS = {"response_time": 0.4, "cpu_usage": 0.3, "memory_usage": 0.2, "error_rate": 0.1}
FAST, SLOW = 0.001, 0.051  # seconds per request: slow = 50 ms more


def pool(slow: str | None = None, **overrides) -> dict[str, BackendMetrics]:
    base = dict(response_time=FAST, error_rate=0.0, cpu_usage=20.0, memory_usage=100e6)
    result = {}
    for name in ("a", "b", "c"):
        values = dict(base)
        if name == slow:
            values.update(response_time=SLOW, **overrides)
        result[name] = BackendMetrics(**values)
    return result


def test_equal_backends_keep_equal_full_weights():
    scorer = PerformanceScorer(CONFIG_WEIGHTS)
    for _ in range(5):
        assert scorer.update(pool()) == {"a": MAX_WEIGHT, "b": MAX_WEIGHT, "c": MAX_WEIGHT}


def test_small_jitter_moves_nothing():
    scorer = PerformanceScorer({"response_time": 1.0})
    metrics = {"a": BackendMetrics(response_time=0.0010), "b": BackendMetrics(response_time=0.0013)}
    for _ in range(10):
        weights = scorer.update(metrics)
    assert weights["b"] >= 0.85 * weights["a"]


def test_slowed_backend_gets_less_than_half_the_share_after_two_updates():
    scorer = PerformanceScorer(CONFIG_WEIGHTS)
    first = scorer.update(pool(slow="b"))
    assert first["a"] == first["c"] == MAX_WEIGHT
    # Gradual: one update does not take everything away at once.
    assert first["b"] > MAX_WEIGHT / 2
    second = scorer.update(pool(slow="b"))
    assert second["b"] < second["a"] / 2


def test_traffic_shifts_gradually_and_never_below_the_floor():
    scorer = PerformanceScorer({"response_time": 1.0})
    very_slow = {"a": BackendMetrics(response_time=FAST), "b": BackendMetrics(response_time=2.0)}
    history = [scorer.update(very_slow)["b"] for _ in range(30)]
    assert history == sorted(history, reverse=True)
    assert history[-1] == FLOOR


def test_recovers_when_fast_again():
    scorer = PerformanceScorer(CONFIG_WEIGHTS)
    for _ in range(10):
        scorer.update(pool(slow="b"))
    recovering = [scorer.update(pool())["b"] for _ in range(8)]
    assert recovering == sorted(recovering)
    assert recovering[1] < MAX_WEIGHT
    assert recovering[-1] >= 0.95 * MAX_WEIGHT


def test_error_rate_cpu_and_memory_each_count():
    for metric, bad in (("error_rate", 0.5), ("cpu_usage", 190.0), ("memory_usage", 2e9)):
        scorer = PerformanceScorer({metric: 1.0})
        metrics = pool()
        metrics["c"] = BackendMetrics(**{**metrics["c"].__dict__, metric: bad})
        for _ in range(5):
            weights = scorer.update(metrics)
        assert weights["c"] < weights["a"] / 2, metric
        assert weights["a"] == weights["b"] == MAX_WEIGHT


def test_metric_weights_decide_what_matters():
    metrics = pool(slow="b")
    metrics["a"] = BackendMetrics(response_time=FAST, cpu_usage=190.0)
    only_latency = PerformanceScorer({"response_time": 1.0, "cpu_usage": 0.0})
    for _ in range(5):
        weights = only_latency.update(metrics)
    assert weights["a"] == MAX_WEIGHT and weights["b"] < MAX_WEIGHT / 2


def test_missing_values_are_neutral():
    scorer = PerformanceScorer(CONFIG_WEIGHTS)
    metrics = {
        "managed": BackendMetrics(response_time=FAST, error_rate=0.0, cpu_usage=20.0, memory_usage=100e6),
        "external": BackendMetrics(response_time=FAST, error_rate=0.0),
        "unknown": BackendMetrics(),
    }
    assert scorer.update(metrics) == dict.fromkeys(metrics, MAX_WEIGHT)


def test_new_backends_start_full_and_gone_ones_are_forgotten():
    scorer = PerformanceScorer({"response_time": 1.0})
    for _ in range(5):
        scorer.update(pool(slow="b"))
    metrics = pool(slow="b")
    del metrics["a"]
    metrics["d"] = BackendMetrics(response_time=FAST)
    weights = scorer.update(metrics)
    assert set(weights) == {"b", "c", "d"}
    assert weights["d"] == MAX_WEIGHT
    assert scorer.weights == weights


def test_empty_config_uses_the_documented_default_weights():
    default = PerformanceScorer({})
    explicit = PerformanceScorer(CONFIG_WEIGHTS)
    for _ in range(3):
        assert default.update(pool(slow="a")) == explicit.update(pool(slow="a"))


def test_invalid_metric_weights():
    with pytest.raises(ValueError, match="unknown performance metric 'latency'"):
        PerformanceScorer({"latency": 1.0})
    with pytest.raises(ValueError):
        PerformanceScorer({"response_time": -1.0})
    with pytest.raises(ValueError):
        PerformanceScorer({"response_time": 0.0})


def test_ewma_empty_then_first_sample():
    ewma = Ewma(half_life=10)
    assert ewma.value is None
    ewma.add(4.0, 0.0)
    assert ewma.value == 4.0


def test_ewma_samples_at_one_instant_all_count():
    ewma = Ewma(half_life=10)
    for value in (1.0, 2.0, 3.0):
        ewma.add(value, 5.0)
    assert ewma.value == pytest.approx(2.0)


def test_ewma_older_samples_weigh_half_after_one_half_life():
    ewma = Ewma(half_life=10)
    ewma.add(0.0, 0.0)
    ewma.add(3.0, 10.0)
    # weights 0.5 and 1: (0 x 0.5 + 3 x 1) / 1.5
    assert ewma.value == pytest.approx(2.0)


def test_ewma_follows_a_level_change_within_a_few_half_lives():
    ewma = Ewma(half_life=1.0)
    for t in range(100):
        ewma.add(0.001, t * 0.1)
    for t in range(100, 150):
        ewma.add(0.051, t * 0.1)
    assert ewma.value == pytest.approx(0.051, rel=0.05)


def test_ewma_rejects_nonpositive_half_life():
    with pytest.raises(ValueError):
        Ewma(0)
