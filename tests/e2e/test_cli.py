"""The `pmdaemon` command line, run as a real subprocess against a real daemon (cli.md is the contract)."""
from __future__ import annotations

import errno
import http.client
import json
import os
import pty
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from pmdaemon.control.protocol import socket_path

from support.configs import http_app_config, write_config
from support.daemon import CLI, daemon_pid
from support.paths import REPO
from support.ports import free_port, free_port_range
from support.processes import process_alive, processes_of_home
from support.wait import wait_until


def _online(pmdaemon, count: int) -> list[dict]:
    def check():
        rows = pmdaemon.json("list")
        return rows if len(rows) == count and all(row["status"] == "online" for row in rows) else None
    return wait_until(check, 20, interval=0.1, message=f"{count} instances online")


def _run_in_terminal(pmdaemon, *args: str, env: dict | None = None, timeout: float = 30) -> tuple[int, str]:
    """Run the CLI with its stdout on a pseudo-terminal; returns (exit status, what the terminal got)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(CLI + list(args), env=pmdaemon.env(env), cwd=REPO, stdout=slave,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:  # EIO: the other side closed
            assert exc.errno == errno.EIO
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return process.wait(timeout), output.decode()


@pytest.fixture
def web_config(tmp_path, app_script):
    base = free_port_range(5)  # test_scale_up_and_down runs 5
    return write_config(tmp_path, {"apps": [http_app_config(app_script, "web", 3, base)]}), base


# -- usage and config errors: exit 2, nothing started --------------------------------------------


@pytest.mark.parametrize("args", [
    ["frobnicate"],
    ["scale", "web", "many"],
    ["scale", "web", "-1"],
    ["logs", "web", "--lines=lots"],
    ["lb", "monitor", "--interval=0"],
    ["lb", "monitor", "--count=0"],
    ["lb", "export", "apache"],
    ["reload"],
])
def test_usage_errors_exit_2_with_a_hint(pmdaemon, args):
    result = pmdaemon(*args)
    assert result.returncode == 2, result
    assert result.stderr.strip() and result.stdout == ""


def test_help_lists_every_command(pmdaemon):
    result = pmdaemon("--help")
    assert result.returncode == 0
    for command in ("start <config>", "validate", "list", "stop", "restart", "reload --config", "scale",
                    "delete", "logs", "kill", "lb status", "lb health", "lb stats", "lb monitor", "lb config",
                    "lb backends", "lb traffic", "lb health-check --test", "lb metrics", "lb drain",
                    "lb enable", "lb export"):
        assert f"pmdaemon {command}" in result.stdout


@pytest.fixture
def invalid_config(tmp_path, app_script):
    app = http_app_config(app_script, "web", 2, free_port_range(2),
                          load_balancer={"strategy": "round_robbin"})
    return write_config(tmp_path, {"apps": [app]}, name="invalid.json"), app_script


def test_invalid_config_exits_2_names_the_json_path_and_starts_nothing(pmdaemon, pmdaemon_home, invalid_config):
    config, script = invalid_config
    for command in (["validate", config], ["start", config], ["start", config, "--no-daemon"]):
        result = pmdaemon(*command)
        assert result.returncode == 2, result
        assert "apps[0].load_balancer.strategy" in result.stderr
        assert "round_robin" in result.stderr  # the suggested fix
    assert daemon_pid(pmdaemon_home) is None
    assert not socket_path(pmdaemon_home).exists()
    assert processes_of_home(pmdaemon_home) == []


def test_validate_json_reports_the_error_too(pmdaemon, invalid_config):
    config, _ = invalid_config
    result = pmdaemon("validate", config, "--json")
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert document["valid"] is False and "apps[0].load_balancer.strategy" in document["error"]


def test_a_missing_config_file_is_a_config_error(pmdaemon, tmp_path):
    result = pmdaemon("start", tmp_path / "nope.json")
    assert result.returncode == 2 and "nope.json" in result.stderr


@pytest.fixture
def examples_copy(tmp_path):
    """The examples directory with a fresh certificate for the TLS example (keys are not committed)."""
    if not (REPO / "examples" / "apps" / "server.py").exists():
        pytest.skip("examples/apps/server.py (the example app) has not landed yet")
    trustme = pytest.importorskip("trustme")
    copy = tmp_path / "examples"
    shutil.copytree(REPO / "examples", copy)
    (copy / "certs").mkdir(exist_ok=True)
    cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(copy / "certs" / "server.crt")
    cert.private_key_pem.write_to_path(copy / "certs" / "server.key")
    os.chmod(copy / "certs" / "server.key", 0o600)
    return copy


def test_every_example_config_validates(pmdaemon, examples_copy):
    configs = sorted(examples_copy.glob("*.json")) + sorted(examples_copy.glob("*.toml"))
    assert len(configs) >= 10
    for config in configs:
        result = pmdaemon("validate", config, "--json")
        assert result.returncode == 0, f"{config.name}: {result.stderr}"
        assert json.loads(result.stdout)["valid"] is True


def test_validate_summarises_a_good_config(pmdaemon, web_config):
    config, _ = web_config
    result = pmdaemon("validate", config)
    assert result.returncode == 0 and "valid" in result.stdout and "web" in result.stdout
    assert pmdaemon.json("validate", config)["apps"] == ["web"]


# -- without a daemon -----------------------------------------------------------------------------


def test_commands_without_a_daemon(pmdaemon):
    assert pmdaemon.json("list") == []
    assert "no instances" in pmdaemon("list").stdout
    stop = pmdaemon("stop", "web")
    assert stop.returncode == 1 and "no pmdaemon daemon is running" in stop.stderr and "pmdaemon start" in stop.stderr
    status = pmdaemon("lb", "status")
    assert status.returncode == 1
    kill = pmdaemon("kill", "--json")
    assert kill.returncode == 0 and json.loads(kill.stdout)["killed"] is False


# -- a running daemon -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_start_runs_a_detached_daemon_and_list_shows_the_instances(pmdaemon, pmdaemon_home, web_config):
    config, base = web_config
    result = pmdaemon("start", config, "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["started"]) == ["web-0", "web-1", "web-2"]
    rows = _online(pmdaemon, 3)
    assert [row["name"] for row in rows] == ["web-0", "web-1", "web-2"]
    assert [row["port"] for row in rows] == [base, base + 1, base + 2]
    assert {row["app"] for row in rows} == {"web"}
    assert all(process_alive(row["pid"]) for row in rows)
    assert all(row["restarts"] == 0 for row in rows)
    pid = daemon_pid(pmdaemon_home)
    assert pid != os.getpid() and process_alive(pid)
    assert (pmdaemon_home / "daemon.log").exists()
    # the daemon outlives the CLI that started it and answers the next one
    human = pmdaemon("list")
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "app", "status"]
    assert len(lines) == 4 and all("online" in line for line in lines[1:])
    assert "\x1b[" not in human.stdout


@pytest.mark.timeout(90)
def test_start_again_adds_new_apps_and_leaves_running_ones_alone(pmdaemon, tmp_path, app_script, web_config):
    config, base = web_config
    assert pmdaemon("start", config).returncode == 0
    before = {row["name"]: row["pid"] for row in _online(pmdaemon, 3)}
    api_base = free_port_range(1)
    both = write_config(tmp_path, {"apps": [http_app_config(app_script, "web", 3, base),
                                            http_app_config(app_script, "api", 1, api_base)]}, "both.json")
    report = pmdaemon.json("start", both)
    assert report["started"] == ["api-0"] and report["unchanged_apps"] == ["web"]
    rows = _online(pmdaemon, 4)
    assert {row["name"]: row["pid"] for row in rows if row["app"] == "web"} == before
    human = pmdaemon("start", both)
    assert human.returncode == 0 and "left alone: web, api" in human.stdout


def _answer_through(port: int) -> str | None:
    """The body a GET through the listener on `port` gets, or None until it answers 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read().decode()
        return body.strip() if response.status == 200 else None
    except OSError:
        return None
    finally:
        connection.close()


def _balanced_app_config(tmp_path, app_script, app: str, port: int, name: str) -> tuple[Path, int]:
    """A config of one instance of `app` behind an HTTP listener on `port`; returns (path, the app's port)."""
    base = free_port_range(1)
    return write_config(tmp_path, {
        "apps": [http_app_config(app_script, app, 1, base)],
        "load_balancer": {"host": "127.0.0.1", "port": port, "apps": [app],
                          "health_check": {"path": "/health", "interval": 0.2}},
    }, name), base


@pytest.mark.timeout(90)
def test_start_again_adds_listeners_on_new_ports_and_leaves_running_ones_alone(pmdaemon, tmp_path, app_script):
    port_a, port_b = free_port(), free_port()
    config_a, base_a = _balanced_app_config(tmp_path, app_script, "a", port_a, "a.json")
    config_b, base_b = _balanced_app_config(tmp_path, app_script, "b", port_b, "b.json")
    assert pmdaemon("start", config_a).returncode == 0
    report = pmdaemon.json("start", config_b)
    assert report["started"] == ["b-0"] and report["listeners"] == [f"127.0.0.1:{port_b}"]
    assert report["unchanged_listeners"] == []
    before = {row["name"]: row["pid"] for row in _online(pmdaemon, 2)}
    assert sorted(before) == ["a-0", "b-0"]
    for port, base in ((port_a, base_a), (port_b, base_b)):
        body = wait_until(lambda port=port: _answer_through(port), 10, message=f"an answer through port {port}")
        assert body == f"instance 0 port {base}"
    assert sorted(row["port"] for row in pmdaemon.json("lb", "status")) == sorted([port_a, port_b])
    assert [listener["port"] for listener in pmdaemon.json("lb", "config")["load_balancer"]] == [port_a, port_b]
    # the same config again: everything is already running, nothing changes
    again = pmdaemon("start", config_b)
    assert again.returncode == 0, again.stderr
    assert "started: nothing new" in again.stdout
    assert f"listeners already running, left alone: 127.0.0.1:{port_b}" in again.stdout
    assert {row["name"]: row["pid"] for row in _online(pmdaemon, 2)} == before
    assert sorted(row["port"] for row in pmdaemon.json("lb", "status")) == sorted([port_a, port_b])
    # a config whose new port something else holds starts none of its apps
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        config_c, _ = _balanced_app_config(tmp_path, app_script, "c", taken, "c.json")
        refused = pmdaemon("start", config_c)
        assert refused.returncode == 1 and f"port {taken} is already in use" in refused.stderr
    assert {row["name"]: row["pid"] for row in pmdaemon.json("list")} == before
    assert sorted(row["port"] for row in pmdaemon.json("lb", "status")) == sorted([port_a, port_b])
    assert _answer_through(port_b) == f"instance 0 port {base_b}"


_CHATTY_APP = """
import os, sys, time
name = "chatty-" + os.environ["PM2_INSTANCE_ID"]
for n in range(30):
    print(f"{name} out line {n}", flush=True)
print(f"{name} err line", file=sys.stderr, flush=True)
time.sleep(300)
"""


@pytest.mark.timeout(90)
def test_logs_show_the_last_lines_of_each_instance(pmdaemon, tmp_path):
    script = tmp_path / "chatty.py"
    script.write_text(_CHATTY_APP)
    config = write_config(tmp_path, {"apps": [{"name": "chatty", "script": str(script), "instances": 2,
                                               "min_uptime": 200, "kill_timeout": 500}]})
    assert pmdaemon("start", config).returncode == 0
    _online(pmdaemon, 2)
    logs = wait_until(lambda: (lambda doc: doc if all("err line" in v["err"] for v in doc.values()) else None)(
        pmdaemon.json("logs", "chatty")), 10, message="the apps' log lines")
    assert sorted(logs) == ["chatty-0", "chatty-1"]
    assert logs["chatty-1"]["out"].splitlines()[-1] == "chatty-1 out line 29"
    assert len(logs["chatty-1"]["out"].splitlines()) == 15  # the default, like PM2
    assert "chatty-1 err line" in logs["chatty-1"]["err"]
    human = pmdaemon("logs", "chatty", "--lines=2")
    assert human.returncode == 0
    assert "chatty-0 out line 28\nchatty-0 out line 29" in human.stdout and "out line 27" not in human.stdout
    assert "chatty-0 err line" in human.stdout
    assert human.stdout.count("==>") == 4  # out and err of two instances
    unknown = pmdaemon("logs", "nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr


@pytest.mark.timeout(90)
def test_stop_restart_and_delete_by_app_instance_and_all(pmdaemon, web_config):
    config, _ = web_config
    assert pmdaemon("start", config).returncode == 0
    pids = {row["name"]: row["pid"] for row in _online(pmdaemon, 3)}
    assert pmdaemon.json("stop", "web-1")["stopped"] == ["web-1"]
    rows = {row["name"]: row for row in pmdaemon.json("list")}
    assert rows["web-1"]["status"] == "stopped" and rows["web-1"]["pid"] is None
    assert not process_alive(pids["web-1"])
    assert rows["web-0"]["status"] == "online"
    assert pmdaemon.json("restart", "web")["restarted"] == ["web-0", "web-1", "web-2"]
    rows = _online(pmdaemon, 3)
    assert all(row["pid"] != pids[row["name"]] for row in rows)
    unknown = pmdaemon("stop", "nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr and "pmdaemon list" in unknown.stderr
    human = pmdaemon("delete", "all")
    assert human.returncode == 0 and "deleted: web-0, web-1, web-2" in human.stdout
    assert pmdaemon.json("list") == []


@pytest.mark.timeout(90)
def test_foreground_daemon_serves_the_cli_and_kill_ends_it(foreground_daemon, pmdaemon, web_config):
    config, _ = web_config
    daemon = foreground_daemon(config)
    _online(pmdaemon, 3)
    assert pmdaemon.json("kill")["pid"] == daemon.pid
    assert daemon.process.wait(10) == 0


@pytest.mark.timeout(90)
def test_a_taken_listener_port_fails_start_and_leaves_nothing_behind(pmdaemon, pmdaemon_home, tmp_path, app_script):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = write_config(tmp_path, {"apps": [http_app_config(app_script, "web", 2, free_port_range(2))],
                                         "load_balancer": {"host": "127.0.0.1", "port": port, "apps": ["web"]}})
        for command in (["start", config], ["start", config, "--no-daemon"]):
            result = pmdaemon(*command)
            assert result.returncode == 1, result
            assert f"port {port} is already in use" in result.stderr
            assert daemon_pid(pmdaemon_home) is None  # the daemon started for this config is gone too
            assert processes_of_home(pmdaemon_home) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_foreground_daemon_exits_0_on_sigint_and_sigterm(foreground_daemon, pmdaemon, web_config, signum):
    config, _ = web_config
    daemon = foreground_daemon(config)
    pids = [row["pid"] for row in _online(pmdaemon, 3)]
    daemon.process.send_signal(signum)
    assert daemon.process.wait(20) == 0
    assert not any(process_alive(pid) for pid in pids)
    assert pmdaemon.json("list") == []


# -- scale and reload -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_scale_up_and_down(pmdaemon, web_config):
    config, base = web_config
    assert pmdaemon("start", config).returncode == 0
    _online(pmdaemon, 3)
    assert pmdaemon("scale", "web", "5").returncode == 0
    rows = _online(pmdaemon, 5)
    assert [row["port"] for row in rows] == [base + i for i in range(5)]
    assert pmdaemon("scale", "web", "1").returncode == 0
    rows = wait_until(lambda: (lambda r: r if len(r) == 1 else None)(pmdaemon.json("list")), 20,
                      message="scale down to one instance")
    assert rows[0]["name"] == "web-0"  # the highest-numbered go first
    unknown = pmdaemon("scale", "nope", "2")
    assert unknown.returncode == 1 and "nope" in unknown.stderr


@pytest.mark.timeout(120)
def test_reload_restarts_every_instance(pmdaemon, web_config):
    config, _ = web_config
    assert pmdaemon("start", config).returncode == 0
    before = {row["name"]: row["pid"] for row in _online(pmdaemon, 3)}
    result = pmdaemon("reload", "web", timeout=90)
    assert result.returncode == 0, result.stderr
    after = _online(pmdaemon, 3)
    assert all(row["pid"] != before[row["name"]] for row in after)


@pytest.mark.timeout(90)
def test_reload_config_refuses_an_invalid_config_whole(pmdaemon, web_config, invalid_config):
    config, _ = web_config
    assert pmdaemon("start", config).returncode == 0
    before = _online(pmdaemon, 3)
    bad, _ = invalid_config
    result = pmdaemon("reload", f"--config={bad}")
    assert result.returncode == 2 and "apps[0].load_balancer.strategy" in result.stderr
    assert [(row["name"], row["pid"]) for row in pmdaemon.json("list")] == [(r["name"], r["pid"]) for r in before]


# -- lb commands ----------------------------------------------------------------------------------


@pytest.fixture
def balanced(pmdaemon, tmp_path, app_script):
    """Two app instances behind an HTTP listener on a free port. Returns (listener port, app base port)."""
    base, port = free_port_range(2), free_port()
    config = write_config(tmp_path, {
        "apps": [http_app_config(app_script, "web", 2, base)],
        "load_balancer": {"host": "127.0.0.1", "port": port, "apps": ["web"],
                          "health_check": {"path": "/health", "interval": 0.2}},
    })
    result = pmdaemon("start", config)
    assert result.returncode == 0, result.stderr
    _online(pmdaemon, 2)
    return port, base


def test_lb_status_json_fields(pmdaemon, balanced):
    port, _ = balanced
    listeners = pmdaemon.json("lb", "status")
    listener = next(row for row in listeners if row["port"] == port)
    assert listener["type"] == "http" and listener["strategy"] == "round_robin"
    assert listener["backends_total"] == 2
    wait_until(lambda: next(r for r in pmdaemon.json("lb", "status") if r["port"] == port)["backends_up"] == 2,
               10, message="both backends up")


def test_lb_backends_json_fields(pmdaemon, balanced):
    _, base = balanced
    backends = pmdaemon.json("lb", "backends")
    assert sorted(row["address"] for row in backends) == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    assert sorted(row["instance"] for row in backends) == ["web-0", "web-1"]
    for row in backends:
        assert row["state"] in ("up", "down", "draining", "open")
        assert isinstance(row["weight"], int) and isinstance(row["active"], int)


def test_lb_stats_json_fields(pmdaemon, balanced):
    stats = pmdaemon.json("lb", "stats")
    assert {"requests", "responses", "errors", "latency_ms"} <= set(stats)
    assert {"2xx", "3xx", "4xx", "5xx"} <= set(stats["responses"])
    assert {"p50", "p95", "p99"} <= set(stats["latency_ms"])


def test_lb_health_check_test_exit_status_follows_the_checks(pmdaemon, balanced):
    result = pmdaemon("lb", "health-check", "--test", "--json")
    assert result.returncode == 0, result.stderr
    assert all(row["ok"] for row in json.loads(result.stdout))
    assert pmdaemon.json("stop", "web-1")["stopped"] == ["web-1"]
    failing = pmdaemon("lb", "health-check", "--test")
    assert failing.returncode == 1 and "failed" in failing.stderr


def test_lb_metrics_text_and_json(pmdaemon, balanced):
    text = pmdaemon("lb", "metrics", "--detailed")
    assert text.returncode == 0 and "# TYPE" in text.stdout
    samples = pmdaemon.json("lb", "metrics")
    assert samples and all({"name", "labels", "value"} <= set(sample) for sample in samples)


def test_lb_export_nginx_and_haproxy(pmdaemon, balanced):
    _, base = balanced
    nginx = pmdaemon("lb", "export", "nginx")
    assert nginx.returncode == 0 and "upstream" in nginx.stdout and f"127.0.0.1:{base}" in nginx.stdout
    haproxy = pmdaemon("lb", "export", "haproxy")
    assert haproxy.returncode == 0 and "backend" in haproxy.stdout and f"127.0.0.1:{base + 1}" in haproxy.stdout
    assert pmdaemon.json("lb", "export", "nginx")["format"] == "nginx"


def test_lb_monitor_prints_count_frames_without_escape_codes_when_piped(pmdaemon, balanced):
    result = pmdaemon("lb", "monitor", "--interval=0.1", "--count=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pmdaemon lb monitor") == 3
    assert "requests/s" in result.stdout and "\x1b" not in result.stdout
    frames = pmdaemon("lb", "monitor", "--interval=0.1", "--count=2", "--json")
    assert frames.returncode == 0
    documents = [json.loads(line) for line in frames.stdout.splitlines()]
    assert len(documents) == 2 and all("time" in frame for frame in documents)


def test_lb_monitor_on_a_terminal_clears_the_screen_and_restores_it(pmdaemon, balanced):
    status, output = _run_in_terminal(pmdaemon, "lb", "monitor", "--interval=0.1", "--count=2")
    assert status == 0
    assert output.count("\x1b[H\x1b[2J") == 2
    assert output.startswith("\x1b[?1049h") and output.rstrip().endswith("\x1b[?1049l")


def test_lb_monitor_restores_the_terminal_on_ctrl_c(pmdaemon, balanced):
    master, slave = pty.openpty()
    process = subprocess.Popen(CLI + ["lb", "monitor", "--interval=0.1"], env=pmdaemon.env(), cwd=REPO,
                               stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    try:
        while output.count(b"pmdaemon lb monitor") < 2:
            output += os.read(master, 65536)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    assert output.rstrip().endswith(b"\x1b[?25h\x1b[?1049l")


# -- colour ---------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_states_are_coloured_only_on_a_terminal_without_no_color(pmdaemon, web_config):
    config, _ = web_config
    assert pmdaemon("start", config).returncode == 0
    _online(pmdaemon, 3)
    status, coloured = _run_in_terminal(pmdaemon, "list", env={"NO_COLOR": None})
    assert status == 0 and "\x1b[32monline\x1b[0m" in coloured
    status, plain = _run_in_terminal(pmdaemon, "list", env={"NO_COLOR": "1"})
    assert status == 0 and "\x1b" not in plain and "online" in plain
    assert "\x1b" not in pmdaemon("list", env={"NO_COLOR": None}).stdout  # piped
