"""Runtime: the daemon's assembly of supervisor, actors and I/O loop, driven as the daemon drives it."""
from __future__ import annotations

import http.client
import os
import socket
import threading
from pathlib import Path

import pytest

from pmdaemon.config.loader import parse_config
from pmdaemon.control.runtime import Runtime

from support.configs import http_app_config
from support.http import get
from support.paths import TCP_ECHO_APP
from support.ports import free_port, free_port_range
from support.processes import descendants
from support.wait import wait_until


def config(tmp_path: Path, data: dict):
    return parse_config(data, str(tmp_path / "pmdaemon.json"))


def stop_and_wait(runtime: Runtime, name: str) -> None:
    supervisor = runtime.supervisor.proxy()
    supervisor.settled(supervisor.stop(name).get()).get().get(timeout=10)


def online(runtime: Runtime) -> set[str]:
    return {row.name for row in runtime.supervisor.proxy().instances().get() if row.status == "online"}


def test_apply_starts_apps_and_shutdown_leaves_no_process_or_thread(tmp_path, app_script):
    threads_before = set(threading.enumerate())
    rt = Runtime(tmp_path / "home")
    try:
        rt.apply(config(tmp_path, {"apps": [http_app_config(app_script, "web", 2, free_port_range(2))]}))
        wait_until(lambda: online(rt) == {"web-0", "web-1"}, message="both instances online")
        pids = [row.pid for row in rt.supervisor.proxy().instances().get()]
        assert all(pids)
    finally:
        rt.shutdown()
    assert descendants(os.getpid()) == []
    wait_until(lambda: set(threading.enumerate()) <= threads_before, timeout=5,
               message=f"no thread left behind: {set(threading.enumerate()) - threads_before}")


def balanced_config(tmp_path, app_script, lb_port: int, instances: int = 2, **listener) -> dict:
    base = free_port_range(instances)
    app = http_app_config(app_script, "web", instances, base)
    app["health_check"] = {"url": "http://localhost:{{PORT}}/health", "interval": 0.2, "timeout": 1,
                           "failure_threshold": 2}
    return {"apps": [app], "load_balancer": {"port": lb_port, "host": "127.0.0.1", "apps": ["web"], **listener}}


def test_a_request_through_the_runtime_reaches_each_backend(tmp_path, app_script, runtime):
    lb_port = free_port()
    runtime.apply(config(tmp_path, balanced_config(tmp_path, app_script, lb_port)))
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up", "up"], message="both backends up")
    bodies = {get(lb_port).text for _ in range(4)}
    assert len(bodies) == 2  # round robin reached both instances
    assert all(get(lb_port).status == 200 for _ in range(2))
    status = runtime.lb_status()
    assert status[0]["port"] == lb_port and status[0]["backends_up"] == 2 and status[0]["backends_total"] == 2
    wait_until(lambda: runtime.lb_stats()["requests"] >= 6, message="requests counted")


def test_a_taken_listener_port_is_a_clear_error_and_starts_nothing(tmp_path, app_script, runtime):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = balanced_config(tmp_path, app_script, free_port())
        data["load_balancer"] = [data["load_balancer"], {**data["load_balancer"], "port": port}]
        with pytest.raises(RuntimeError, match=rf"^load_balancer\[1\]\.port: port {port} is already in use$"):
            runtime.apply(config(tmp_path, data))
    assert runtime.supervisor.proxy().instances().get() == []
    assert runtime.lb_status() == []


def test_drain_keeps_new_requests_off_a_backend_and_enable_brings_it_back(tmp_path, app_script, runtime):
    lb_port = free_port()
    runtime.apply(config(tmp_path, balanced_config(tmp_path, app_script, lb_port)))
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up", "up"], message="both backends up")
    result = runtime.lb_drain("web-1")
    assert [(b["instance"], b["state"]) for b in result["backends"]] == [("web-1", "draining")]
    assert {get(lb_port).text for _ in range(6)} == {get(lb_port).text}  # one backend answers everything
    assert [b["state"] for b in runtime.lb_backends()] == ["up", "draining"]
    address = runtime.lb_backends()[1]["address"]
    runtime.lb_enable(address)
    assert len({get(lb_port).text for _ in range(4)}) == 2
    with pytest.raises(ValueError, match="unknown backend 'web-7'.*web-0, web-1"):
        runtime.lb_drain("web-7")


def test_a_stopped_instance_leaves_the_pool_at_once(tmp_path, app_script, runtime):
    lb_port = free_port()
    runtime.apply(config(tmp_path, balanced_config(tmp_path, app_script, lb_port)))
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up", "up"], message="both backends up")
    runtime.supervisor.proxy().stop("web-0").get()
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["down", "up"], message="web-0 down")
    assert {get(lb_port).status for _ in range(5)} == {200}
    runtime.supervisor.proxy().restart("web-0").get()
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up", "up"], message="web-0 back")


def test_health_views_and_check_test(tmp_path, app_script, runtime):
    lb_port = free_port()
    runtime.apply(config(tmp_path, balanced_config(tmp_path, app_script, lb_port)))
    wait_until(lambda: all(row["state"] == "up" for row in runtime.lb_health()), message="healthy")
    rows = runtime.lb_health()
    assert [row["instance"] for row in rows] == ["web-0", "web-1"]
    assert all(row["last_check"] and row["consecutive_failures"] == 0 and row["last_error"] is None for row in rows)
    stop_and_wait(runtime, "web-1")
    results = runtime.lb_health_check_test()
    assert [(r["instance"], r["ok"]) for r in results] == [("web-0", True), ("web-1", False)]
    assert results[1]["error"] == "connection refused"


def test_backend_failures_open_the_breaker_and_the_balancer_answers_503(tmp_path, app_script, runtime):
    lb_port = free_port()
    data = balanced_config(tmp_path, app_script, lb_port, instances=1,
                           circuit_breaker={"enabled": True, "failure_threshold": 3, "recovery_timeout": 60000})
    runtime.apply(config(tmp_path, data))
    wait_until(lambda: runtime.lb_backends()[0]["state"] == "up", message="backend up")
    assert [get(lb_port, "/status/500").status for _ in range(3)] == [500, 500, 500]
    wait_until(lambda: runtime.lb_backends()[0]["state"] == "open", message="breaker open")
    assert runtime.lb_backends()[0]["breaker"] == "open"
    assert get(lb_port).status == 503


def test_shutdown_with_listeners_leaves_no_process_or_thread(tmp_path, app_script):
    threads_before = set(threading.enumerate())
    rt = Runtime(tmp_path / "home")
    lb_port = free_port()
    try:
        rt.apply(config(tmp_path, balanced_config(tmp_path, app_script, lb_port,
                                                  circuit_breaker={"enabled": True},
                                                  rate_limiting={"enabled": True, "requests_per_second": 100})))
        wait_until(lambda: [b["state"] for b in rt.lb_backends()] == ["up", "up"], message="both backends up")
        assert get(lb_port).status == 200
    finally:
        rt.shutdown()
    assert descendants(os.getpid()) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", lb_port), timeout=1).close()
    wait_until(lambda: set(threading.enumerate()) <= threads_before, timeout=5,
               message=f"no thread left behind: {set(threading.enumerate()) - threads_before}")


def test_restart_unhealthy_restarts_an_instance_that_keeps_failing_its_check(tmp_path, app_script, runtime):
    failing = tmp_path / "fail-health"
    data = balanced_config(tmp_path, app_script, free_port(), instances=1)
    data["apps"][0]["env"]["FAIL_HEALTH_FILE"] = str(failing)
    data["apps"][0]["health_check"]["restart_unhealthy"] = True
    runtime.apply(config(tmp_path, data))
    wait_until(lambda: runtime.lb_backends()[0]["state"] == "up", message="backend up")
    failing.touch()
    wait_until(lambda: runtime.supervisor.proxy().instances().get()[0].restarts >= 1, message="a restart")
    failing.unlink()
    wait_until(lambda: runtime.lb_backends()[0]["state"] == "up", message="backend up after the restart")


def test_health_aware_ejects_a_failing_backend_for_the_quarantine(tmp_path, app_script, runtime):
    lb_port = free_port()
    data = balanced_config(tmp_path, app_script, lb_port, strategy="health_aware_round_robin",
                           quarantine_duration=1)
    runtime.apply(config(tmp_path, data))
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up", "up"], message="both backends up")
    connection = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
    connection.request("GET", "/status/500")
    response = connection.getresponse()
    response.read()
    connection.close()
    failed = int(response.getheader("X-Instance"))
    wait_until(lambda: runtime.lb_backends()[failed]["state"] == "down", timeout=1, message="ejected at once")
    other = f"instance {1 - failed}"
    assert all(get(lb_port).text.startswith(other) for _ in range(4))
    wait_until(lambda: runtime.lb_backends()[failed]["state"] == "up", timeout=4, message="back after quarantine")


def test_a_tcp_listener_balances_connections_over_connect_probed_backends(tmp_path, runtime):
    lb_port, base = free_port(), free_port_range(2)
    app = http_app_config(TCP_ECHO_APP, "echo", 2, base)
    data = {"apps": [app], "load_balancer": {"type": "tcp", "port": lb_port, "host": "127.0.0.1", "apps": ["echo"]}}
    runtime.apply(config(tmp_path, data))
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up", "up"], message="both backends up")
    assert [row["check"] for row in runtime.lb_health()] == [
        f"connect 127.0.0.1:{base}", f"connect 127.0.0.1:{base + 1}"]
    answered = set()
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", lb_port), timeout=5) as connection:
            connection.sendall(b"WHO\n")
            answered.add(connection.makefile("rb").readline().strip())
    assert answered == {str(base).encode(), str(base + 1).encode()}


def test_rate_limited_requests_get_429_and_are_counted(tmp_path, app_script, runtime):
    lb_port = free_port()
    data = balanced_config(tmp_path, app_script, lb_port, instances=1,
                           rate_limiting={"enabled": True, "requests_per_second": 1, "burst_size": 2})
    runtime.apply(config(tmp_path, data))
    wait_until(lambda: runtime.lb_backends()[0]["state"] == "up", message="backend up")
    statuses = [get(lb_port).status for _ in range(5)]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    refused = statuses.count(429)
    wait_until(lambda: runtime.lb_status()[0]["rate_limiting"]["refused"] == refused, message="refusals counted")
    assert runtime.lb_status()[0]["rate_limiting"]["top_refused_clients"] == {"127.0.0.1": refused}
