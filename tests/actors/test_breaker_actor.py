"""CircuitBreaker actor: outcomes in (as the Runtime's report fan-out tells them), breaker states out
to the Listener actor and from there into the snapshot the loop routes by."""
from __future__ import annotations

import time

import pytest

from pmdaemon.actors.breaker import CircuitBreaker
from pmdaemon.actors.messages import BackendOutcomes
from pmdaemon.config.model import BackendConfig, CircuitBreakerConfig, HealthCheckConfig, ListenerConfig
from pmdaemon.net.snapshot import Outcome
from pmdaemon.states import BackendState

from support.actorpool import Pool
from support.ports import free_port
from support.tinybackend import TinyBackend
from support.wait import wait_until

CHECK = HealthCheckConfig(interval=0.2, timeout=1.0)


def outcome(backend: int, status: int = 200, error: str | None = None, lb_made: bool = False) -> Outcome:
    return Outcome(listener=0, backend=backend, status=status, latency=0.001, bytes_in=10, bytes_out=20,
                   error=error, client_ip="127.0.0.1", lb_made=lb_made)


@pytest.fixture
def breaker_pool():
    servers = [TinyBackend(f"web-{i}") for i in range(2)]
    listener = ListenerConfig(
        index=0, port=free_port(),
        backends=tuple(BackendConfig("127.0.0.1", s.port, health_check=CHECK) for s in servers),
        circuit_breaker=CircuitBreakerConfig(enabled=True, failure_threshold=3, recovery_timeout=0.5,
                                             half_open_requests=2))
    pool = Pool(listener)
    breaker = CircuitBreaker.start(listener, pool.listener, pool.timers)
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both backends up")
    yield pool, breaker
    breaker.stop()
    pool.close()
    for server in servers:
        server.close()


def test_opens_after_threshold_consecutive_failures_and_half_opens_after_recovery_timeout(breaker_pool):
    pool, breaker = breaker_pool
    breaker.tell(BackendOutcomes((outcome(0, 502, "connect"), outcome(0, 500), outcome(1))))
    time.sleep(0.1)
    assert pool.states() == [BackendState.UP, BackendState.UP]  # two failures: below the threshold of three
    breaker.tell(BackendOutcomes((outcome(0, 504, "timeout"),)))
    wait_until(lambda: pool.states() == [BackendState.OPEN, BackendState.UP], timeout=0.5, message="breaker open")
    opened_at = time.monotonic()
    wait_until(lambda: pool.states() == [BackendState.HALF_OPEN, BackendState.UP], timeout=2,
               message="breaker half-open")
    assert time.monotonic() - opened_at >= 0.4
    assert pool.snapshots[-1].backends[0].half_open_slots == 2
    breaker.tell(BackendOutcomes((outcome(0), outcome(0))))  # both trials succeed
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], timeout=0.5, message="breaker closed")


def test_a_failed_trial_reopens_and_restarts_the_timer(breaker_pool):
    pool, breaker = breaker_pool
    breaker.tell(BackendOutcomes(tuple(outcome(1, 503) for _ in range(3))))
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.OPEN], timeout=0.5, message="breaker open")
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.HALF_OPEN], timeout=2,
               message="breaker half-open")
    breaker.tell(BackendOutcomes((outcome(1, 0, "reset"),)))
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.OPEN], timeout=0.5, message="breaker open again")
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.HALF_OPEN], timeout=2,
               message="breaker half-open again")


def test_responses_the_balancer_made_never_count(breaker_pool):
    pool, breaker = breaker_pool
    made = tuple(outcome(0, 503, "no_backend", lb_made=True) for _ in range(5))
    breaker.tell(BackendOutcomes(made + tuple(outcome(-1, 429, "rate_limited", lb_made=True) for _ in range(5))))
    time.sleep(0.2)
    assert pool.states() == [BackendState.UP, BackendState.UP]
    assert [s["state"] for s in breaker.proxy().states().get()] == ["closed", "closed"]
