"""The Listener actor's pool table, as published to the loop: instance status, health, drain, breaker, quarantine.

Messages are told exactly as the supervisor, the CircuitBreaker and the Backend actors tell them;
health comes from a real HealthProbe checking real backends.
"""
from __future__ import annotations

import time

import pytest

from pmdaemon.actors.messages import BreakerEvent, Eject, InstanceEvent
from pmdaemon.config.model import BackendConfig, CircuitBreakerConfig, HealthCheckConfig, ListenerConfig
from pmdaemon.states import BackendState

from support.actorpool import Pool
from support.ports import free_port
from support.tinybackend import TinyBackend
from support.wait import wait_until

CHECK = HealthCheckConfig(interval=0.2, timeout=1.0, failure_threshold=2)


@pytest.fixture
def backends():
    servers = [TinyBackend(f"web-{i}") for i in range(2)]
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
def make_pool():
    pools = []

    def make(backends, **listener) -> Pool:
        pool = Pool(ListenerConfig(index=0, port=free_port(), backends=tuple(backends), **listener))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def instance_backend(server: TinyBackend, name: str) -> BackendConfig:
    return BackendConfig("127.0.0.1", server.port, instance=name, app="web", health_check=CHECK)


def online(name: str, status: str = "online") -> InstanceEvent:
    return InstanceEvent(name=name, app="web", status=status, pid=None, port=None)


def test_snapshot_follows_instance_events(backends, make_pool):
    pool = make_pool([instance_backend(backends[0], "web-0"), instance_backend(backends[1], "web-1")])
    time.sleep(0.5)
    assert pool.states() == [BackendState.DOWN, BackendState.DOWN]  # no instance is online yet: not even checked
    assert backends[0].health_requests == 0

    pool.listener.tell(online("web-0"))
    pool.listener.tell(online("web-1", "launching"))
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.DOWN], message="web-0 up")

    pool.listener.tell(online("web-0", "stopped"))
    wait_until(lambda: pool.states() == [BackendState.DOWN, BackendState.DOWN], timeout=0.5,
               message="stopped instance down at once")

    pool.listener.tell(online("web-0", "online"))
    pool.listener.tell(online("web-1", "online"))
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both up after passing checks")


def test_a_restarted_instance_is_down_until_its_next_passing_check(backends, make_pool):
    pool = make_pool([instance_backend(backends[0], "web-0")])
    pool.listener.tell(online("web-0"))
    wait_until(lambda: pool.states() == [BackendState.UP], message="web-0 up")
    backends[0].health_status = 503
    pool.listener.tell(online("web-0", "waiting restart"))
    pool.listener.tell(online("web-0", "online"))
    time.sleep(0.6)
    assert pool.states() == [BackendState.DOWN]  # the earlier "up" is not carried over the restart
    backends[0].health_status = 200
    wait_until(lambda: pool.states() == [BackendState.UP], message="web-0 up again")


def test_drain_and_enable(backends, make_pool):
    pool = make_pool([BackendConfig("127.0.0.1", s.port, health_check=CHECK) for s in backends])
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both up")
    rows = pool.listener.proxy().drain([1]).get()
    assert rows[0].address == f"127.0.0.1:{backends[1].port}" and rows[0].state == BackendState.DRAINING
    assert pool.states() == [BackendState.UP, BackendState.DRAINING]
    pool.listener.proxy().enable([1]).get()
    assert pool.states() == [BackendState.UP, BackendState.UP]


def test_breaker_events_open_and_half_open_with_trial_slots(backends, make_pool):
    pool = make_pool([BackendConfig("127.0.0.1", s.port, health_check=CHECK) for s in backends],
                     circuit_breaker=CircuitBreakerConfig(enabled=True, half_open_requests=2))
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both up")
    pool.listener.tell(BreakerEvent(0, "open"))
    wait_until(lambda: pool.states() == [BackendState.OPEN, BackendState.UP], message="breaker open")
    pool.listener.tell(BreakerEvent(0, "half_open"))
    wait_until(lambda: pool.states() == [BackendState.HALF_OPEN, BackendState.UP], message="breaker half-open")
    assert pool.snapshots[-1].backends[0].half_open_slots == 2
    pool.listener.tell(BreakerEvent(0, "closed"))
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="breaker closed")


def test_versions_increase_and_only_changes_are_published(backends, make_pool):
    pool = make_pool([BackendConfig("127.0.0.1", s.port, health_check=CHECK) for s in backends])
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both up")
    time.sleep(0.5)  # more passing rounds: nothing changes, nothing is published
    versions = [s.version for s in pool.snapshots]
    assert versions == list(range(1, len(versions) + 1))
    assert len(versions) <= 3  # all down, then one up, then both up


def test_passive_ejection_quarantines_but_never_the_last_routable_backend(backends, make_pool):
    pool = make_pool([BackendConfig("127.0.0.1", s.port, health_check=CHECK) for s in backends],
                     strategy="health_aware_round_robin", quarantine_duration=1.0)
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both up")
    pool.listener.tell(Eject(0, "reset"))
    wait_until(lambda: pool.states() == [BackendState.DOWN, BackendState.UP], timeout=0.5, message="web-0 ejected")
    ejected_at = time.monotonic()
    pool.listener.tell(Eject(1, "reset"))  # the last routable one: the passive rule alone keeps it
    time.sleep(0.3)
    assert pool.states() == [BackendState.DOWN, BackendState.UP]
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], timeout=3,
               message="web-0 back after quarantine")
    assert time.monotonic() - ejected_at >= 0.9
    assert pool.listener.proxy().backends().get()[0].health_error is None


def test_quarantine_keeps_a_recovered_backend_out(backends, make_pool):
    pool = make_pool([BackendConfig("127.0.0.1", s.port, health_check=CHECK) for s in backends],
                     strategy="health_aware_round_robin", quarantine_duration=1.5)
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both up")
    backends[0].health_status = 500
    wait_until(lambda: pool.states() == [BackendState.DOWN, BackendState.UP], message="web-0 unhealthy")
    down_at = time.monotonic()
    backends[0].health_status = 200
    wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], timeout=4, message="web-0 back")
    assert time.monotonic() - down_at >= 1.4  # passing checks alone did not bring it back earlier
