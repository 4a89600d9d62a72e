"""Scorer actor (performance_based listeners): every `update_interval`, new backend weights from live metrics.

It gathers each backend's response-time and error-rate EWMAs from the Backend actors and the CPU
and memory of each instance's process tree from the supervisor, hands them to
`pmdaemon.control.perfscore.PerformanceScorer` (which moves weights gradually) and tells the Listener actor the
result as `EffectiveWeights`. It is the only actor that asks others on a timer; none of those it
asks ever asks it or the Listener back, so no wait cycle can form.
"""
from __future__ import annotations

import logging

import pykka

from pmdaemon.actors.messages import BackendScore, EffectiveWeights, Tick
from pmdaemon.config.model import ListenerConfig
from pmdaemon.control.perfscore import MAX_WEIGHT, BackendMetrics, PerformanceScorer
from pmdaemon.control.timers import Timers

log = logging.getLogger(__name__)

ASK_TIMEOUT = 5.0
_SCORE = Tick("score")


class Scorer(pykka.ThreadingActor):
    def __init__(self, listener: ListenerConfig, listener_ref: pykka.ActorRef,
                 backend_refs: tuple[pykka.ActorRef, ...], supervisor_ref: pykka.ActorRef, timers: Timers):
        super().__init__()
        self._backends = listener.backends
        self._interval = listener.update_interval
        self._scorer = PerformanceScorer(listener.metrics_weights)
        self._listener_ref = listener_ref
        self._backend_refs = backend_refs
        self._supervisor_ref = supervisor_ref
        self._timers = timers
        self._last: dict[int, BackendMetrics] = {}

    def on_start(self) -> None:
        # Every backend starts with the same weight, so the pool begins as an even rotation.
        self._listener_ref.tell(EffectiveWeights(tuple(MAX_WEIGHT for _ in self._backends)))
        self._timers.tell_later(self._interval, self.actor_ref, _SCORE)

    def on_receive(self, message: object) -> None:
        if message == _SCORE:
            try:
                self._score()
            except (pykka.Timeout, pykka.ActorDeadError) as e:
                log.warning("performance scores not updated this interval: %r", e)
            self._timers.tell_later(self._interval, self.actor_ref, _SCORE)

    def scores(self) -> list[BackendScore]:
        """Per backend, in ListenerConfig.backends order."""
        scores = self._scorer.scores
        return [BackendScore(scores.get(i, MAX_WEIGHT), self._last.get(i)) for i in range(len(self._backends))]

    def _score(self) -> None:
        stats = pykka.get_all([ref.proxy().stats() for ref in self._backend_refs], timeout=ASK_TIMEOUT)
        usage = {info.name: info for info in self._supervisor_ref.proxy().instances().get(timeout=ASK_TIMEOUT)
                 if info.pid is not None}
        metrics = {}
        for i, (backend, traffic) in enumerate(zip(self._backends, stats)):
            process = usage.get(backend.instance) if backend.instance else None
            metrics[i] = BackendMetrics(
                response_time=traffic.latency_ewma,
                error_rate=traffic.error_rate_ewma,
                cpu_usage=process.cpu if process else None,
                memory_usage=process.memory if process else None,
            )
        self._last = metrics
        weights = self._scorer.update(metrics)
        self._listener_ref.tell(EffectiveWeights(tuple(weights[i] for i in range(len(self._backends)))))
