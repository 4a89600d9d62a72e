"""Backend actor: the roll-up of one backend's live traffic, and passive ejection.

It hears its share of every LoopReport (`BackendOutcomes`: the outcomes of requests this backend
served plus the in-flight gauge) and keeps what `lb backends` and the performance_based scorer need:
an EWMA of response time (half-life 10 s; shorter for a performance_based listener that updates more
often, see `ewma_half_life`), the error rate over the last minute and as an EWMA of the same half-life
(what the scorer uses), request and byte counts.

Passive ejection (health_aware_round_robin): a live-traffic failure (connect error, reset, timeout,
5xx) tells the Listener actor to `Eject` this backend at once; the Listener decides whether it may
(it never ejects the last routable backend by this rule alone) and for how long.
"""
from __future__ import annotations

import time
from collections import deque

import pykka

from pmdaemon.actors.breaker import is_backend_failure
from pmdaemon.actors.messages import BackendOutcomes, BackendTraffic, Eject
from pmdaemon.config.model import ListenerConfig
from pmdaemon.control.perfscore import Ewma

LATENCY_HALF_LIFE = 10.0  # seconds: a response time counts half as much 10 s later
ERROR_WINDOW = 60.0  # seconds of history behind error_rate and requests_per_second
RATE_WINDOW = 10.0  # seconds behind requests_per_second


def ewma_half_life(listener: ListenerConfig) -> float:
    """LATENCY_HALF_LIFE, or a quarter of the `update_interval` of a performance_based listener when
    that is shorter: each score must reflect the interval before it (older samples weigh 1/16 or
    less), or a backend that slowed down or recovered would be scored on its past for many intervals.
    The samples are per request, so a backend that gets little traffic would otherwise be judged on
    its old requests the longest."""
    if listener.strategy == "performance_based":
        return min(LATENCY_HALF_LIFE, listener.update_interval / 4)
    return LATENCY_HALF_LIFE


class Backend(pykka.ThreadingActor):
    def __init__(self, listener: ListenerConfig, index: int, listener_ref: pykka.ActorRef):
        super().__init__()
        self._index = index
        self._address = listener.backends[index].address
        self._listener_ref = listener_ref
        self._ejects = listener.strategy == "health_aware_round_robin"
        self._requests = 0
        self._errors = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._latency = Ewma(ewma_half_life(listener))
        self._failing = Ewma(ewma_half_life(listener))  # samples: 1.0 per failed request, 0.0 per other
        self._active = 0
        self._recent: deque[tuple[float, int, int]] = deque()  # (time.monotonic(), requests, errors) per report

    def on_receive(self, message: object) -> None:
        match message:
            case BackendOutcomes(outcomes=outcomes, active=active):
                self._active = active
                if outcomes:
                    self._count(outcomes)

    def _count(self, outcomes) -> None:
        errors = 0
        first_failure = None
        now = time.monotonic()
        for outcome in outcomes:
            self._requests += 1
            self._bytes_in += outcome.bytes_in
            self._bytes_out += outcome.bytes_out
            if is_backend_failure(outcome):
                errors += 1
                first_failure = first_failure or outcome
                self._failing.add(1.0, now)
            else:
                self._latency.add(outcome.latency, now)
                self._failing.add(0.0, now)
        self._errors += errors
        self._recent.append((now, len(outcomes), errors))
        while self._recent and self._recent[0][0] < now - ERROR_WINDOW:
            self._recent.popleft()
        if first_failure is not None and self._ejects:
            reason = first_failure.error or f"status {first_failure.status}"
            self._listener_ref.tell(Eject(self._index, reason))

    def stats(self) -> BackendTraffic:
        now = time.monotonic()
        window = [r for r in self._recent if r[0] >= now - ERROR_WINDOW]
        recent_requests = sum(r[1] for r in window)
        recent_errors = sum(r[2] for r in window)
        rate_requests = sum(r[1] for r in window if r[0] >= now - RATE_WINDOW)
        return BackendTraffic(
            address=self._address,
            active=self._active,
            requests=self._requests,
            errors=self._errors,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            latency_ewma=self._latency.value,
            error_rate=recent_errors / recent_requests if recent_requests else None,
            error_rate_ewma=self._failing.value,
            requests_per_second=rate_requests / RATE_WINDOW,
        )
