"""RateLimiter actor: one listener's rate limits as the control plane sees them.

The token buckets themselves live in the I/O loop (net/tokenbucket.py), which builds them from the
listener's `rate_limiting` config and checks them per request as a local read; asking an actor per
request is exactly what the data plane must never do. This actor owns the limits on the control side
and counts what the loop refused (outcomes with error `rate_limited`, 429 responses or refused TCP
connections), overall and for the clients refused most, for `lb stats` and alerts.
"""
from __future__ import annotations

from collections import Counter

import pykka

from pmdaemon.actors.messages import BackendOutcomes
from pmdaemon.config.model import RateLimiting
from pmdaemon.states import ErrorKind

MAX_TRACKED_CLIENTS = 10_000  # refusal counts per client IP; beyond it, the smallest counts are dropped


class RateLimiter(pykka.ThreadingActor):
    def __init__(self, limits: RateLimiting):
        super().__init__()
        self._limits = limits
        self._refused = 0
        self._refused_by_client: Counter[str] = Counter()

    def on_receive(self, message: object) -> None:
        match message:
            case BackendOutcomes(outcomes=outcomes):
                for outcome in outcomes:
                    if outcome.error == ErrorKind.RATE_LIMITED:
                        self._refused += 1
                        self._refused_by_client[outcome.client_ip] += 1
                if len(self._refused_by_client) > MAX_TRACKED_CLIENTS:
                    kept = self._refused_by_client.most_common(MAX_TRACKED_CLIENTS // 2)
                    self._refused_by_client = Counter(dict(kept))

    def status(self, top: int = 10) -> dict:
        return {
            "enabled": self._limits.enabled,
            "requests_per_second": self._limits.requests_per_second,
            "burst_size": self._limits.burst_size,
            "per_ip_limit": self._limits.per_ip_limit,
            "refused": self._refused,
            "top_refused_clients": dict(self._refused_by_client.most_common(top)),
        }
