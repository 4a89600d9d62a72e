"""Runtime: the daemon's assembly of supervisor, actors and I/O loop, driven as the daemon drives it."""
from __future__ import annotations

import http.client
import os
import threading
from pathlib import Path

import pytest

from conftest import descendants, free_port, free_port_range, http_app_config, wait_until
from net.configfile import parse_config

from actors.runtime import Runtime


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(tmp_path / "home")
    yield rt
    rt.shutdown()


def config(tmp_path: Path, data: dict):
    return parse_config(data, str(tmp_path / "pmdaemon.json"))


def get(port: int, path: str = "/") -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def online(runtime: Runtime) -> set[str]:
    return {row["name"] for row in runtime.supervisor.proxy().list().get() if row["status"] == "online"}


def test_apply_starts_apps_and_shutdown_leaves_no_process_or_thread(tmp_path, app_script):
    threads_before = set(threading.enumerate())
    rt = Runtime(tmp_path / "home")
    try:
        rt.apply(config(tmp_path, {"apps": [http_app_config(app_script, "web", 2, free_port_range(2))]}))
        wait_until(lambda: online(rt) == {"web-0", "web-1"}, message="both instances online")
        pids = [row["pid"] for row in rt.supervisor.proxy().list().get()]
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
    bodies = {get(lb_port)[1] for _ in range(4)}
    assert len(bodies) == 2  # round robin reached both instances
    assert all(status == 200 for status, _ in (get(lb_port) for _ in range(2)))
    status = runtime.lb_status()
    assert status[0]["port"] == lb_port and status[0]["backends_up"] == 2 and status[0]["backends_total"] == 2
    wait_until(lambda: runtime.lb_stats()["requests"] >= 6, message="requests counted")
