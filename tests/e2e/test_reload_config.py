"""`pmdaemon reload --config` and SIGHUP: a changed config applied in place, with traffic flowing.

The whole daemon: real instances, real listeners, real clients (tests/support/loadclient.py), the
CLI and signals. The plan (config/diff.py, pure) is tested in tests/unit/test_config_diff.py, the
Listener actor's pool replacement in tests/actors/test_replace_pool.py.
"""
from __future__ import annotations

import http.client
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from pmdaemon.config.loader import ConfigError, parse_config
from pmdaemon.control.runtime import Runtime

from support.configs import http_app_config, write_config
from support.loadclient import LoadClient
from support.ports import free_port, free_port_range
from support.wait import wait_until

HEALTH = {"url": "http://localhost:{{PORT}}/health", "interval": 0.2, "timeout": 1, "failure_threshold": 2}


# -- in place, with traffic -------------------------------------------------------------------------


def two_apps(app_script: Path, lb_port: int) -> dict:
    """web (3 instances) behind a round robin listener; api (2) defined but in no pool."""
    web = http_app_config(app_script, "web", 3, free_port_range(3), health_check=HEALTH)
    api = http_app_config(app_script, "api", 2, free_port_range(2), health_check=HEALTH)
    return {"apps": [web, api], "load_balancer": {"host": "127.0.0.1", "port": lb_port, "apps": ["web"]}}


def load(runtime: Runtime, tmp_path: Path, data: dict, name: str = "pmdaemon.json"):
    return parse_config(data, str(write_config(tmp_path, data, name)))


def up(runtime: Runtime, count: int) -> None:
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up"] * count, 20,
               message=f"{count} backends up")


def pids(runtime: Runtime) -> dict[str, int]:
    return {row.name: row.pid for row in runtime.supervisor.proxy().instances().get()}


def test_strategy_change_and_a_new_app_in_the_pool_without_a_failed_request(tmp_path, app_script, runtime):
    lb_port = free_port()
    data = two_apps(app_script, lb_port)
    runtime.apply(load(runtime, tmp_path, data))
    up(runtime, 3)
    before = pids(runtime)
    idle = socket.create_connection(("127.0.0.1", lb_port))  # accepted before, first request after
    keep_alive = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
    keep_alive.request("GET", "/")
    keep_alive.getresponse().read()
    sock = keep_alive.sock
    data["load_balancer"].update(strategy="least_connections", apps=["web", "api"])
    with LoadClient(lb_port) as traffic:
        traffic.wait_for(10)
        report = runtime.reload_config(load(runtime, tmp_path, data))
        up(runtime, 5)
        seen = traffic.snapshot()
        traffic.wait_for(60)
        api_ports = {str(app["env"]["PORT"] + i) for app in data["apps"][1:] for i in range(2)}
        assert api_ports <= traffic.seen_since(seen)  # the added app's instances serve
    assert traffic.failures == []
    assert report["listeners"]["kept"] == [lb_port] and report["apps"]["unchanged"] == ["web", "api"]
    assert pids(runtime) == before  # nothing was restarted: only the pool and the strategy changed
    assert runtime.lb_status()[0]["strategy"] == "least_connections"
    assert runtime.lb_config()["load_balancer"][0]["strategy"] == "least_connections"
    keep_alive.request("GET", "/")
    assert keep_alive.getresponse().status == 200 and keep_alive.sock is sock  # same client connection
    idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
    idle.close()
    keep_alive.close()


def test_removed_changed_and_rescaled_apps(tmp_path, app_script, runtime):
    lb_port = free_port()
    data = two_apps(app_script, lb_port)
    data["load_balancer"]["apps"] = ["web", "api"]
    runtime.apply(load(runtime, tmp_path, data))
    up(runtime, 5)
    before = pids(runtime)
    web = data["apps"][0]
    web["env"]["COLOUR"] = "blue"  # how web's processes start changes: rolled
    web["instances"] = 2  # and one fewer: web-2 goes
    data["apps"] = [web]  # api is removed from the config
    data["load_balancer"]["apps"] = ["web"]
    with LoadClient(lb_port) as traffic:
        traffic.wait_for(10)
        report = runtime.reload_config(load(runtime, tmp_path, data))
        traffic.wait_for(10)
    assert traffic.failures == []
    assert report["apps"]["stopped"] == ["api"] and report["apps"]["restarted"] == ["web"]
    assert report["reloaded"] == ["web-0", "web-1"]
    after = pids(runtime)
    assert sorted(after) == ["web-0", "web-1"] and all(after[n] != before[n] for n in after)
    assert [(b["instance"], b["state"]) for b in runtime.lb_backends()] == [("web-0", "up"), ("web-1", "up")]


def test_listeners_added_and_removed(tmp_path, app_script, runtime):
    first, second = free_port(), free_port()
    data = two_apps(app_script, first)
    runtime.apply(load(runtime, tmp_path, data))
    up(runtime, 3)
    data["load_balancer"] = [data["load_balancer"], {"host": "127.0.0.1", "port": second, "apps": ["api"]}]
    runtime.reload_config(load(runtime, tmp_path, data))
    wait_until(lambda: [r["backends_up"] for r in runtime.lb_status()] == [3, 2], 20, message="both listeners up")
    with LoadClient(second) as traffic:
        traffic.wait_for(10)
    assert traffic.failures == []
    data["load_balancer"] = {**data["load_balancer"][1], "type": "tcp"}  # the same port, another type
    report = runtime.reload_config(load(runtime, tmp_path, data))
    assert report["listeners"] == {"kept": [], "added": [], "removed": [first], "rebound": [second]}
    assert [(r["port"], r["type"]) for r in runtime.lb_status()] == [(second, "tcp")]
    wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", first)) != 0, 5, message=f"port {first} closed")
    wait_until(lambda: runtime.lb_status()[0]["backends_up"] == 2, 20, message="the tcp listener's backends up")
    with LoadClient(second) as traffic:
        traffic.wait_for(10)
    assert traffic.failures == []


def test_an_invalid_config_is_refused_whole_and_traffic_goes_on(tmp_path, app_script, runtime):
    lb_port = free_port()
    data = two_apps(app_script, lb_port)
    runtime.apply(load(runtime, tmp_path, data))
    up(runtime, 3)
    before = pids(runtime)
    garbage = tmp_path / "regions.mmdb"
    garbage.write_text("not a MaxMind database\n")
    bad = {"apps": [{**app, "region": "eu"} for app in data["apps"]],
           "load_balancer": {**data["load_balancer"], "strategy": "geographic", "geo_database": str(garbage)}}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = {**data, "load_balancer": [data["load_balancer"], {"host": "127.0.0.1", "apps": ["api"],
                                                                  "port": taken.getsockname()[1]}]}
        busy["apps"] = data["apps"] + [http_app_config(app_script, "extra", 1, free_port())]
        with LoadClient(lb_port) as traffic:
            traffic.wait_for(10)
            with pytest.raises(ConfigError, match=r"^load_balancer: .*regions.mmdb"):
                runtime.reload_config(load(runtime, tmp_path, bad, "bad.json"))
            with pytest.raises(RuntimeError, match=r"^load_balancer\[1\]\.port: port \d+ is already in use"):
                runtime.reload_config(load(runtime, tmp_path, busy, "busy.json"))
            traffic.wait_for(10)
    assert traffic.failures == []
    assert pids(runtime) == before  # "extra" was not started
    assert [(r["port"], r["strategy"]) for r in runtime.lb_status()] == [(lb_port, "round_robin")]
    assert runtime.lb_config()["source"] == str(tmp_path / "pmdaemon.json")


def test_certificates_are_read_again(tmp_path, app_script, runtime):
    lb_port = free_port()
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"

    def issue() -> trustme.CA:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return ca

    def client(ca: trustme.CA) -> http.client.HTTPSConnection:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return http.client.HTTPSConnection("127.0.0.1", lb_port, context=context, timeout=5)

    old_ca = issue()
    data = two_apps(app_script, lb_port)
    data["load_balancer"]["ssl"] = {"enabled": True, "cert_file": str(cert), "key_file": str(key)}
    runtime.apply(load(runtime, tmp_path, data))
    up(runtime, 3)
    old = client(old_ca)
    old.request("GET", "/")
    assert old.getresponse().read().startswith(b"instance ")
    new_ca = issue()  # renewed certificate, same files, same config
    runtime.reload_config(load(runtime, tmp_path, data))
    fresh = client(new_ca)
    fresh.request("GET", "/")
    assert fresh.getresponse().status == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        stale = client(old_ca)
        stale.request("GET", "/")
    old.request("GET", "/")  # a connection made with the old certificate goes on
    assert old.getresponse().status == 200
    for connection in (old, fresh):
        connection.close()


# -- through the daemon -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_cli_reload_config_under_load_and_an_invalid_one_exits_2(pmdaemon, tmp_path, app_script):
    lb_port = free_port()
    data = two_apps(app_script, lb_port)
    config = write_config(tmp_path, data)
    assert pmdaemon("start", config).returncode == 0
    wait_until(lambda: [b["state"] for b in pmdaemon.json("lb", "backends")] == ["up"] * 3, 20,
               message="three backends up")
    data["load_balancer"].update(strategy="weighted_round_robin", apps=["web", "api"])
    write_config(tmp_path, data)
    bad = write_config(tmp_path, {**data, "load_balancer": {**data["load_balancer"], "strategy": "round_robbin"}},
                       "bad.json")
    with LoadClient(lb_port) as traffic:
        traffic.wait_for(10)
        result = pmdaemon("reload", f"--config={config}", "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: [b["state"] for b in pmdaemon.json("lb", "backends")] == ["up"] * 5, 20,
                   message="five backends up")
        refused = pmdaemon("reload", f"--config={bad}")
        assert refused.returncode == 2 and "load_balancer.strategy" in refused.stderr
        traffic.wait_for(20)
    assert traffic.failures == []
    effective = pmdaemon.json("lb", "config")
    assert effective["load_balancer"][0]["strategy"] == "weighted_round_robin"
    assert [row["strategy"] for row in pmdaemon.json("lb", "status")] == ["weighted_round_robin"]


@pytest.mark.timeout(90)
def test_sighup_reloads_the_config_file(foreground_daemon, pmdaemon, tmp_path, app_script):
    lb_port = free_port()
    data = two_apps(app_script, lb_port)
    config = write_config(tmp_path, data)
    daemon = foreground_daemon(config)
    wait_until(lambda: [b["state"] for b in pmdaemon.json("lb", "backends")] == ["up"] * 3, 20,
               message="three backends up")
    with LoadClient(lb_port) as traffic:
        traffic.wait_for(10)
        config.write_text("{ not json")
        daemon.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert [row["strategy"] for row in pmdaemon.json("lb", "status")] == ["round_robin"]
        data["load_balancer"]["strategy"] = "least_connections"
        write_config(tmp_path, data)
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: [row["strategy"] for row in pmdaemon.json("lb", "status")] == ["least_connections"], 10,
                   message="the reloaded strategy")
        traffic.wait_for(10)
    assert traffic.failures == []
    assert daemon.process.poll() is None
    log = (tmp_path / "foreground-0.log").read_text()
    assert "SIGHUP: reload of" in log and "invalid JSON" in log
