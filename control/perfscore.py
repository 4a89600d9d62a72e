"""`performance_based` weights (decisions.md section 4): backend metrics -> smooth-rotation weights.

Every `update_interval` the control plane hands `PerformanceScorer.update()` one `BackendMetrics` per
backend. Scoring, per metric (lower is better for all four):

    cost = (value + noise) / (best value among backends + noise)      # 1.0 for the best backend

`noise` is the difference that still counts as "the same" (2 ms of response time, 2 points of
error rate, 10 points of CPU, 64 MiB of memory), so jitter between equally good backends moves
nothing. A backend's cost is the weighted mean of its metric costs (the `metrics` weights of the
config); its target weight is `MAX_WEIGHT x lowest cost / its cost`, never below `FLOOR`, so a slow
backend keeps a trickle of traffic and is seen to recover. Weights move halfway to their target
each update, so traffic shifts over a few intervals, never all at once. A metric a backend has no
value for (an external backend has no process to sample) costs it 1.0: neither reward nor penalty.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

MAX_WEIGHT = 100
FLOOR = max(1, MAX_WEIGHT * 5 // 100)
SMOOTHING = 0.5  # share of the old weight kept at each update

# The load-balancing.md example, used when the config names no metrics.
DEFAULT_METRIC_WEIGHTS = {"response_time": 0.4, "cpu_usage": 0.3, "memory_usage": 0.2, "error_rate": 0.1}

_NOISE = {"response_time": 0.002, "error_rate": 0.02, "cpu_usage": 10.0, "memory_usage": 64 * 1024 * 1024}


@dataclass(frozen=True)
class BackendMetrics:
    response_time: float | None = None  # seconds (EWMA of request latency)
    error_rate: float | None = None  # fraction of failed requests, 0..1
    cpu_usage: float | None = None  # percent of one CPU, process tree
    memory_usage: float | None = None  # bytes RSS, process tree


METRICS = tuple(f.name for f in fields(BackendMetrics))


class Ewma:
    """Exponentially weighted moving average over irregular samples, with a half-life in seconds.

    Kept as decayed sums (`sum x weight`, `weight`): each sample weighs 1 when it arrives and half as
    much `half_life` seconds later. A burst of samples at one instant all count, and a sample after a
    long silence dominates, as it should.
    """

    __slots__ = ("half_life", "_sum", "_weight", "_at")

    def __init__(self, half_life: float) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self.half_life = half_life
        self._sum = 0.0
        self._weight = 0.0
        self._at: float | None = None

    def add(self, value: float, now: float) -> None:
        if self._at is not None and now > self._at:
            decay = 0.5 ** ((now - self._at) / self.half_life)
            self._sum *= decay
            self._weight *= decay
        if self._at is None or now > self._at:
            self._at = now
        self._sum += value
        self._weight += 1.0

    @property
    def value(self) -> float | None:
        """The average; None before the first sample."""
        return self._sum / self._weight if self._weight else None


class PerformanceScorer:
    def __init__(self, metric_weights: Mapping[str, float]) -> None:
        weights = dict(metric_weights) or DEFAULT_METRIC_WEIGHTS
        unknown = sorted(set(weights) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown performance metric {unknown[0]!r}; known: {', '.join(METRICS)}")
        if any(w < 0 or not math.isfinite(w) for w in weights.values()) or not any(weights.values()):
            raise ValueError("performance metric weights must be non-negative and not all zero")
        total = sum(weights.values())
        self._weights = {name: w / total for name, w in weights.items() if w > 0}
        self._current: dict[str, float] = {}
        self._targets: dict[str, float] = {}

    @property
    def weights(self) -> dict[str, int]:
        return {key: _as_int(w) for key, w in self._current.items()}

    @property
    def scores(self) -> dict[str, int]:
        """Each backend's score at the last update: the weight it is moving to (MAX_WEIGHT for the
        best backend, less for the others in proportion to their cost, never below FLOOR)."""
        return {key: _as_int(t) for key, t in self._targets.items()}

    def update(self, metrics: Mapping[str, BackendMetrics]) -> dict[str, int]:
        """New integer weights for the backends in `metrics` (keyed as given, e.g. by address).
        A backend seen for the first time starts from MAX_WEIGHT, like all did at the beginning."""
        costs = dict.fromkeys(metrics, 0.0)
        for name, share in self._weights.items():
            values = [getattr(m, name) for m in metrics.values()]
            present = [v for v in values if v is not None]
            noise = _NOISE[name]
            best = min(present) if present else 0.0
            for key, value in zip(metrics, values):
                costs[key] += share * ((value + noise) / (best + noise) if value is not None else 1.0)
        lowest = min(costs.values(), default=1.0)
        current, targets = {}, {}
        for key, cost in costs.items():
            target = targets[key] = max(MAX_WEIGHT * lowest / cost, FLOOR)
            current[key] = self._current.get(key, MAX_WEIGHT) * SMOOTHING + target * (1 - SMOOTHING)
        self._current = current
        self._targets = targets
        return self.weights


def _as_int(weight: float) -> int:
    return max(1, round(weight))
