"""`reload <app>` and `scale` with traffic flowing: no failed request, no connection error.

Real instances (examples/apps/server.py) behind a real listener, real clients (tests/support/loadclient.py:
keep-alive and fresh connections, http.client, short timeouts). Most tests drive the Runtime the way
the daemon does; the last one goes through the `pmdaemon` command line.
"""
from __future__ import annotations

import http.client
import threading
from pathlib import Path

import pytest

from pmdaemon.config.loader import parse_config
from pmdaemon.control.rollout import RolloutAborted
from pmdaemon.control.runtime import Runtime

from support.configs import http_app_config, write_config
from support.loadclient import LoadClient
from support.paths import TEST_APPS
from support.ports import free_port, free_port_range
from support.wait import wait_until

HEALTH = {"url": "http://localhost:{{PORT}}/health", "interval": 0.2, "timeout": 1, "failure_threshold": 2}
BREAKABLE = TEST_APPS / "breakable.py"


def balanced(tmp_path: Path, script: Path, instances: int, env: dict | None = None,
             **app_options) -> tuple[dict, int, int]:
    """A config: `instances` of `script` (health-checked every 0.2 s) behind a listener, room for scaling
    up to 4 more; returns (data, listener port, the first instance's port)."""
    base, lb_port = free_port_range(instances + 4), free_port()
    app = http_app_config(script, "web", instances, base, health_check=HEALTH, **app_options)
    app["env"].update(env or {})
    return {"apps": [app], "load_balancer": {"host": "127.0.0.1", "port": lb_port, "apps": ["web"]}}, lb_port, base


def start(runtime: Runtime, tmp_path: Path, data: dict) -> None:
    runtime.apply(parse_config(data, str(tmp_path / "pmdaemon.json")))
    count = data["apps"][0]["instances"]
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up"] * count, 20,
               message=f"{count} backends up")


def pids(runtime: Runtime) -> dict[str, int]:
    return {row.name: row.pid for row in runtime.supervisor.proxy().instances().get()}


def states(runtime: Runtime) -> list[tuple[str, str]]:
    return [(b["instance"], b["state"]) for b in runtime.lb_backends()]


def test_reload_restarts_every_instance_without_a_failed_request(tmp_path, app_script, runtime):
    data, lb_port, base = balanced(tmp_path, app_script, 3)
    start(runtime, tmp_path, data)
    before = pids(runtime)
    with LoadClient(lb_port) as load:
        load.wait_for(20)
        result = runtime.reload_app("web")
        seen = load.snapshot()
        load.wait_for(30)
        assert load.seen_since(seen) == {str(base + i) for i in range(3)}  # every new instance serves
    assert result == {"target": "web", "reloaded": ["web-0", "web-1", "web-2"]}
    after = pids(runtime)
    assert all(after[name] != before[name] for name in before)
    assert load.failures == []
    assert states(runtime) == [("web-0", "up"), ("web-1", "up"), ("web-2", "up")]


def test_reload_of_one_instance_leaves_the_others_alone(tmp_path, app_script, runtime):
    data, lb_port, _ = balanced(tmp_path, app_script, 2)
    start(runtime, tmp_path, data)
    before = pids(runtime)
    with LoadClient(lb_port) as load:
        load.wait_for(10)
        assert runtime.reload_app("web-1")["reloaded"] == ["web-1"]
        load.wait_for(10)
    after = pids(runtime)
    assert after["web-0"] == before["web-0"] and after["web-1"] != before["web-1"]
    assert load.failures == []
    with pytest.raises(LookupError, match="no app or instance named 'nope'"):
        runtime.reload_app("nope")


def test_scale_up_joins_once_healthy_and_down_drains_the_highest_first(tmp_path, app_script, runtime):
    data, lb_port, base = balanced(tmp_path, app_script, 2)
    start(runtime, tmp_path, data)
    with LoadClient(lb_port) as load:
        load.wait_for(10)
        result = runtime.scale("web", 4)
        assert result["added"] == ("web-2", "web-3") and result["pending"] == {}
        # `scale` returns once they serve: they are up in the pool and answer requests.
        assert states(runtime) == [(f"web-{i}", "up") for i in range(4)]
        seen = load.snapshot()
        load.wait_for(40)
        assert load.seen_since(seen) == {str(base + i) for i in range(4)}  # next increment_var ports
        result = runtime.scale("web", 1)
        assert result["removed"] == ("web-3", "web-2", "web-1")
        assert states(runtime) == [("web-0", "up")]
        seen = load.snapshot()
        load.wait_for(10)
        assert load.seen_since(seen) == {str(base)}
    assert [row.name for row in runtime.supervisor.proxy().instances().get()] == ["web-0"]
    assert load.failures == []
    assert [app["instances"] for app in runtime.lb_config()["apps"]] == [1]


def test_drain_lets_a_slow_request_finish_and_keeps_new_ones_off(tmp_path, app_script, runtime):
    data, lb_port, base = balanced(tmp_path, app_script, 2, kill_timeout=10000)
    start(runtime, tmp_path, data)
    slow: dict = {}

    def slow_request():
        connection = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=15)
        connection.request("GET", "/slow?ms=2500")
        response = connection.getresponse()
        slow.update(status=response.status, backend=response.getheader("X-Backend"), body=response.read())
        connection.close()

    client = threading.Thread(target=slow_request)
    client.start()
    busy = wait_until(lambda: [b for b in runtime.lb_backends() if b["active"] == 1], 5,
                      message="the slow request in flight")[0]
    reload = threading.Thread(target=runtime.reload_app, args=(busy["instance"],))
    reload.start()
    wait_until(lambda: dict(states(runtime))[busy["instance"]] == "draining", 5, message="drain")
    with LoadClient(lb_port) as load:
        load.wait_for(10)
        assert dict(states(runtime))[busy["instance"]] == "draining"  # still waiting for the slow one
    assert load.failures == []
    assert str(busy["address"].rsplit(":", 1)[1]) not in load.backends  # no new request went there
    client.join(15)
    reload.join(30)
    # The slow request was answered by the instance it started on: not cut, not retried elsewhere.
    assert slow["status"] == 200 and slow["backend"] == busy["address"].rsplit(":", 1)[1]
    assert dict(states(runtime))[busy["instance"]] == "up"


@pytest.mark.timeout(60)
def test_reload_aborts_when_a_restarted_instance_crashes_and_the_rest_keep_serving(tmp_path, runtime):
    broken = tmp_path / "broken"
    data, lb_port, base = balanced(tmp_path, BREAKABLE, 3, env={"BROKEN_FILE": str(broken)}, max_restarts=2)
    start(runtime, tmp_path, data)
    before = pids(runtime)
    broken.write_text("from now on instances fail to start\n")
    with LoadClient(lb_port) as load:
        load.wait_for(10)
        with pytest.raises(RolloutAborted, match=r"web-0 is errored.*not reloaded \(still serving\): web-1, web-2"):
            runtime.reload_app("web")
        seen = load.snapshot()
        load.wait_for(20)
        assert load.seen_since(seen) == {str(base + 1), str(base + 2)}
    assert load.failures == []
    after = pids(runtime)
    assert after["web-1"] == before["web-1"] and after["web-2"] == before["web-2"]
    assert states(runtime) == [("web-0", "down"), ("web-1", "up"), ("web-2", "up")]  # not left draining


@pytest.mark.timeout(60)
def test_reload_aborts_when_a_restarted_instance_never_becomes_healthy(tmp_path, runtime):
    broken = tmp_path / "broken"
    data, lb_port, _ = balanced(tmp_path, BREAKABLE, 2, env={"BROKEN_FILE": str(broken), "BROKEN_MODE": "unhealthy"})
    start(runtime, tmp_path, data)
    broken.write_text("from now on /health answers 503\n")
    with LoadClient(lb_port) as load:
        with pytest.raises(RolloutAborted, match=r"web-0 did not become healthy within 10 s \(last check: .*503"):
            runtime.reload_app("web")
        load.wait_for(10)
    assert load.failures == []
    assert states(runtime) == [("web-0", "down"), ("web-1", "up")]


def test_an_operator_drain_outlasts_a_reload(tmp_path, app_script, runtime):
    data, lb_port, _ = balanced(tmp_path, app_script, 3)
    start(runtime, tmp_path, data)
    runtime.lb_drain("web-2")
    with LoadClient(lb_port) as load:
        runtime.reload_app("web")
        load.wait_for(10)
    assert load.failures == []
    assert states(runtime) == [("web-0", "up"), ("web-1", "up"), ("web-2", "draining")]


@pytest.mark.timeout(120)
def test_cli_reload_and_scale_under_load(pmdaemon, tmp_path, app_script):
    data, lb_port, base = balanced(tmp_path, app_script, 3)
    assert pmdaemon("start", write_config(tmp_path, data)).returncode == 0
    wait_until(lambda: [b["state"] for b in pmdaemon.json("lb", "backends")] == ["up"] * 3, 20,
               message="three backends up")
    before = {row["name"]: row["pid"] for row in pmdaemon.json("list")}
    with LoadClient(lb_port) as load:
        load.wait_for(10)
        result = pmdaemon("reload", "web", timeout=90)
        assert result.returncode == 0, result.stderr
        assert pmdaemon.json("scale", "web", "4", timeout=60)["added"] == ["web-3"]
        assert pmdaemon.json("scale", "web", "2", timeout=60)["removed"] == ["web-3", "web-2"]
        load.wait_for(10)
        unknown = pmdaemon("reload", "nope")
        assert unknown.returncode == 1 and "nope" in unknown.stderr
    assert load.failures == []
    rows = pmdaemon.json("list")
    assert [(row["name"], row["port"]) for row in rows] == [("web-0", base), ("web-1", base + 1)]
    assert all(row["pid"] != before[row["name"]] for row in rows)
    assert [(b["instance"], b["state"]) for b in pmdaemon.json("lb", "backends")] == [("web-0", "up"), ("web-1", "up")]
