"""HealthProbe + Listener actors against real HTTP backends on 127.0.0.1: what the loop would be told."""
from __future__ import annotations

import time

import pytest

from pmdaemon.config.model import BackendConfig, HealthCheckConfig, ListenerConfig
from pmdaemon.states import BackendState

from support.actorpool import Pool
from support.ports import free_port
from support.tinybackend import TinyBackend
from support.wait import wait_until


@pytest.fixture
def make_pool():
    pools = []

    def make(*backends: BackendConfig, strategy="round_robin") -> Pool:
        pool = Pool(ListenerConfig(index=0, port=free_port(), strategy=strategy, backends=tuple(backends)))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def checked(port: int, **check) -> BackendConfig:
    options = dict(interval=0.2, timeout=1.0, failure_threshold=2)
    options.update(check)
    return BackendConfig("127.0.0.1", port, health_check=HealthCheckConfig(**options))


def test_backend_starts_down_and_comes_up_at_its_first_passing_check(make_pool):
    with TinyBackend() as backend:
        backend.health_status = 503
        pool = make_pool(checked(backend.port))
        wait_until(lambda: backend.health_requests >= 2, message="two failing checks")
        assert pool.states() == [BackendState.DOWN]
        assert pool.health()[0].last_error == "status 503"
        backend.health_status = 200
        wait_until(lambda: pool.states() == [BackendState.UP], message="backend up")
        assert pool.health()[0].state == "up"


def test_down_after_failure_threshold_failed_rounds_then_up_again(make_pool):
    with TinyBackend() as backend:
        pool = make_pool(checked(backend.port, interval=0.1, failure_threshold=3))
        wait_until(lambda: pool.states() == [BackendState.UP], message="backend up")
        backend.health_status = 500
        failing_from = backend.health_requests
        wait_until(lambda: pool.states() == [BackendState.DOWN], message="backend down")
        assert backend.health_requests - failing_from >= 3  # three failed rounds, not one
        assert pool.health()[0].consecutive_failures >= 3
        backend.health_status = 204
        wait_until(lambda: pool.states() == [BackendState.UP], message="backend up again")


def test_a_round_is_a_probe_plus_retries_and_fails_only_when_all_fail(make_pool):
    with TinyBackend() as backend:
        pool = make_pool(checked(backend.port, interval=0.3, retries=2, failure_threshold=1))
        wait_until(lambda: pool.states() == [BackendState.UP], message="backend up")
        backend.health_status = 500
        before = backend.health_requests
        wait_until(lambda: pool.states() == [BackendState.DOWN], message="backend down")
        assert backend.health_requests - before == 3  # probe + 2 immediate re-probes, one round


def test_url_with_port_placeholder_is_checked_on_the_backend_port(make_pool):
    with TinyBackend() as backend:
        pool = make_pool(checked(backend.port, url="http://localhost:{{PORT}}/health?deep=1"))
        wait_until(lambda: pool.states() == [BackendState.UP], message="backend up")
        assert pool.health()[0].check == f"GET http://localhost:{backend.port}/health?deep=1"


def test_backend_without_check_is_up_once_its_port_accepts_and_down_when_it_closes(make_pool):
    port = free_port()
    pool = make_pool(BackendConfig("127.0.0.1", port))
    time.sleep(0.7)  # more than one connect-probe interval while nothing listens
    assert pool.states() == [BackendState.DOWN]
    backend = TinyBackend(port=port)
    try:
        wait_until(lambda: pool.states() == [BackendState.UP], message="backend up when its port accepts")
    finally:
        backend.close()
    wait_until(lambda: pool.states() == [BackendState.DOWN], timeout=8, message="backend down once its port closed")


def test_a_hanging_backend_does_not_delay_the_checks_of_the_others(make_pool):
    with TinyBackend("slow") as slow, TinyBackend("fast") as fast:
        slow.hang_health = True
        pool = make_pool(checked(slow.port, timeout=3.0), checked(fast.port))
        wait_until(lambda: pool.states()[1] == BackendState.UP, timeout=1.5, message="the fast backend up")
        assert pool.states()[0] == BackendState.DOWN
        wait_until(lambda: fast.health_requests >= 4, timeout=3, message="the fast backend checked on")


def test_check_now_runs_every_check_and_reports_each_result(make_pool):
    with TinyBackend("good") as good, TinyBackend("bad") as bad:
        bad.health_status = 503
        pool = make_pool(checked(good.port, interval=30), checked(bad.port, interval=30))
        results = [(info.backend, future.result(5)) for info, future in pool.probe.proxy().check_now().get()]
        assert results == [(f"127.0.0.1:{good.port}", None), (f"127.0.0.1:{bad.port}", "status 503")]
