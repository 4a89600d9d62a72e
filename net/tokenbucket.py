"""Token buckets and the rate-limiting policy built from them (decisions.md section 6).

Sans-I/O: time is always passed in (`now`, seconds on any monotonic clock), so the I/O loop can ask
per request without a system call of ours and tests are exact. A refused request uses no token:
`check()` only takes tokens when every bucket involved admits.
"""
from __future__ import annotations

from collections import OrderedDict

from pmdaemon.config.model import RateLimiting

# Enough for every client of a busy site; a flood of spoofed or rotating addresses evicts the least
# recently seen buckets instead of growing memory. An evicted bucket had refilled to full or belongs
# to a client idle longer than all 65536 others, so starting it over full costs little.
MAX_TRACKED_CLIENTS = 65536


class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate` tokens per second; one request = one token."""

    __slots__ = ("rate", "capacity", "tokens", "_updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"token bucket rate must be positive, got {rate!r}")
        self.rate = float(rate)
        # Below one token the bucket could never admit anything.
        self.capacity = max(float(capacity), 1.0)
        self.tokens = self.capacity
        self._updated = now

    def wait_time(self, now: float) -> float:
        """Seconds until a token is available (0.0 = one is available now). Takes nothing."""
        if now > self._updated:
            self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate)
            self._updated = now
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def try_take(self, now: float) -> float:
        """0.0 = admitted and one token used; otherwise seconds to wait (for Retry-After), nothing used."""
        wait = self.wait_time(now)
        if wait == 0.0:
            self.tokens -= 1.0
        return wait


class RateLimiter:
    """A global bucket plus one bucket per client IP, as the loop consults them per request.

    `None` for a limit means unlimited for that bucket (a `burst_size` left out defaults to
    `requests_per_second`, one second's worth). The per-IP bucket is checked first, so a
    client over its own limit is refused without draining the global bucket that other clients share.
    """

    def __init__(
        self,
        requests_per_second: float | None = None,
        burst_size: float | None = None,
        per_ip_limit: float | None = None,
        now: float = 0.0,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self._global = (
            TokenBucket(requests_per_second, burst_size if burst_size is not None else requests_per_second, now)
            if requests_per_second is not None
            else None
        )
        if per_ip_limit is not None and per_ip_limit <= 0:
            raise ValueError(f"per_ip_limit must be positive, got {per_ip_limit!r}")
        self._per_ip_limit = per_ip_limit
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_clients = max_clients

    @classmethod
    def from_config(cls, cfg: RateLimiting, now: float) -> RateLimiter:
        """The listener's limiter; a disabled `rate_limiting` block admits everything."""
        if not cfg.enabled:
            return cls(now=now)
        return cls(cfg.requests_per_second, cfg.burst_size, cfg.per_ip_limit, now=now)

    @property
    def tracked_clients(self) -> int:
        return len(self._clients)

    def check(self, client_ip: str, now: float) -> float:
        """0.0 = admitted (a token taken from each bucket); else seconds until retry, no token taken."""
        client = self._client_bucket(client_ip, now) if self._per_ip_limit is not None else None
        if client is not None:
            wait = client.wait_time(now)
            if wait:
                return wait
        if self._global is not None:
            wait = self._global.try_take(now)
            if wait:
                return wait
        if client is not None:
            client.try_take(now)
        return 0.0

    def _client_bucket(self, client_ip: str, now: float) -> TokenBucket:
        clients = self._clients
        bucket = clients.get(client_ip)
        if bucket is not None:
            clients.move_to_end(client_ip)
            return bucket
        limit = self._per_ip_limit
        assert limit is not None, "check() asks for a client's bucket only when per-IP limiting is on"
        bucket = clients[client_ip] = TokenBucket(limit, limit, now)
        if len(clients) > self._max_clients:
            clients.popitem(last=False)
        return bucket
