"""Observability end to end: every `lb` command of cli.md, the Prometheus endpoint, statsd, alerts and
per-instance usage, against `pmdaemon start <config> --no-daemon` with real backend processes.

What a user would check is checked: the counts `lb stats` shows equal the requests this test sent, the
/metrics endpoint (parsed with prometheus_client's parser) says the same, statsd datagrams arrive on a
UDP socket, a webhook and an email arrive when the pool loses its instances and a "resolved" webhook
when they are back, and `lb config` never shows the SMTP password.

Most read-only checks share one daemon (`stack`, module scope); tests that need exact counts or that
stop instances get their own.
"""
from __future__ import annotations

import email
import email.policy
import http.client
import json
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.configs import http_app_config, write_config
from support.daemon import CLI, ForegroundDaemon, PmdaemonRunner
from support.paths import REPO
from support.ports import free_port, free_port_range
from support.wait import wait_until

SMTP_PASSWORD = "observability-secret-8c1f"  # only ever in the daemon's environment
APP_SECRET = "token-value-3e57"  # an app env value whose name looks secret


# ---------------------------------------------------------------- observers the daemon reports to


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that keeps every POSTed JSON body, in order of arrival."""

    def __init__(self) -> None:
        self.received: queue.Queue = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.put((self.path, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def wait_for(self, predicate, timeout: float) -> dict:
        """The first body for which predicate(body) holds; bodies before it are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no matching webhook within {timeout:g} s")
            try:
                _, body = self.received.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(body):
                return body

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Mailbox:
    """aiosmtpd handler: keeps every envelope."""

    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.put(envelope)
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        self.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == SMTP_PASSWORD.encode())


class StatsdSocket:
    """A UDP socket on 127.0.0.1 standing in for statsd: collects the lines of every datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []

    def read(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            while True:
                data, _ = self.sock.recvfrom(65536)
                self.lines.extend(data.decode().split("\n"))
                self.sock.settimeout(0.05)
        except TimeoutError:
            pass

    def counter_total(self, name: str) -> float:
        """Sum of a counter's `|c` increments received so far."""
        total = 0.0
        for line in self.lines:
            key, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if key == name and kind.startswith("c"):
                total += float(value)
        return total

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- the stack under test


def stack_config(app_script: Path, base: int, port: int, *, metrics_port: int | None = None,
                 statsd_port: int | None = None, alerts: dict | None = None, metrics_collection: bool = True,
                 **listener) -> dict:
    """Two instances of the example app behind an HTTP listener on 127.0.0.1:`port`, short intervals."""
    export = {}
    if metrics_port is not None:
        export["prometheus"] = {"host": "127.0.0.1", "port": metrics_port, "path": "/metrics"}
    if statsd_port is not None:
        export["statsd"] = {"host": "127.0.0.1", "port": statsd_port, "prefix": "pmdaemon."}
    app = http_app_config(app_script, "web", 2, base,
                          monitoring={"enabled": True, "metrics_collection": metrics_collection})
    app["env"]["API_TOKEN"] = APP_SECRET
    balancer = {
        "host": "127.0.0.1", "port": port, "apps": ["web"],
        "health_check": {"path": "/health", "interval": 0.2, "timeout": 1},
        "monitoring": {"enabled": True, "export": export},
        **listener,
    }
    if alerts is not None:
        balancer["alerts"] = alerts
    return {"apps": [app], "load_balancer": balancer}


def start_foreground(home: Path, config: Path, log: Path, env: dict | None = None) -> ForegroundDaemon:
    """`pmdaemon start <config> --no-daemon` in `home`, returned once the config is applied."""
    from pmdaemon.control.protocol import CommandFailed, ControlClient

    runner = PmdaemonRunner(home)
    with open(log, "w") as out:
        process = subprocess.Popen(CLI + ["start", str(config), "--no-daemon"], env=runner.env(env), cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT)
    daemon = ForegroundDaemon(process, home)
    client = ControlClient(home, timeout=5)

    def ready():
        if process.poll() is not None:
            pytest.fail(f"pmdaemon --no-daemon exited {process.returncode}:\n{log.read_text()}")
        try:
            return client.call("ping")["ready"]
        except CommandFailed:
            return False

    try:
        wait_until(ready, 30, message="the foreground daemon to apply its config")
    except BaseException:
        daemon.stop()
        raise
    return daemon


def control(pmdaemon, command: str, **args):
    """Ask the daemon directly, for polling: the same answer the CLI prints with --json, without a
    Python start-up per poll (the assertions that matter go through the CLI)."""
    from pmdaemon.control.protocol import ControlClient

    return ControlClient(pmdaemon.home, timeout=10).call(command, args or None)


def instance_series(pmdaemon) -> set[str]:
    return {s["labels"]["instance"] for s in control(pmdaemon, "lb_metrics", samples=True)
            if s["name"] == "pmdaemon_instance_memory_bytes"}


def wait_backends_up(pmdaemon, port: int, count: int = 2, timeout: float = 20) -> None:
    def up():
        rows = [row for row in control(pmdaemon, "lb_status") if row["port"] == port]
        return rows and rows[0]["backends_up"] == count
    wait_until(up, timeout, interval=0.1, message=f"{count} backends up on :{port}")
    assert [row["backends_up"] for row in pmdaemon.json("lb", "status") if row["port"] == port] == [count]


def send(port: int, path: str = "/", count: int = 1) -> list[int]:
    """`count` GETs, each on its own connection; the statuses."""
    statuses = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        finally:
            conn.close()
    return statuses


def scrape(metrics_port: int, path: str = "/metrics") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
        return response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, through prometheus_client's parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(parsed: dict, name: str, **labels: str) -> dict[tuple, float]:
    """The samples of `name` whose labels include `labels`."""
    return {key: value for key, value in parsed.items()
            if key[0] == name and set(labels.items()) <= set(key[1])}


def listener_stats(pmdaemon, port: int) -> dict:
    stats = pmdaemon.json("lb", "stats")
    return next(row for row in stats["listeners"] if row["port"] == port)


def wait_requests(pmdaemon, port: int, expected: int, timeout: float = 10) -> dict:
    """The listener's `lb stats` row once it counts `expected` requests (fails if it counts more)."""
    def counted():
        row = next(row for row in control(pmdaemon, "lb_stats")["listeners"] if row["port"] == port)
        assert row["requests"] <= expected, f"lb stats counts {row['requests']} requests, {expected} were sent"
        return row["requests"] == expected
    wait_until(counted, timeout, interval=0.05, message=f"lb stats to count {expected} requests")
    row = listener_stats(pmdaemon, port)
    assert row["requests"] == expected
    return row


@pytest.fixture
def webhooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def statsd():
    receiver = StatsdSocket()
    yield receiver
    receiver.close()


@pytest.fixture
def smtp():
    """An SMTP server (aiosmtpd) on 127.0.0.1 that wants a login with SMTP_PASSWORD. Yields (mailbox, port)."""
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), authenticator=mailbox.authenticate,
                            auth_require_tls=False)
    controller.start()
    yield mailbox, controller.port
    controller.stop()


# ---------------------------------------------------------------- one daemon for the read-only commands


@dataclass
class Stack:
    pmdaemon: PmdaemonRunner
    port: int  # the listener's
    base: int  # web-0's port; web-1 listens on base + 1
    metrics_port: int
    statsd: StatsdSocket


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One daemon with two instances, a listener with `connection_counts` switched off, a Prometheus
    endpoint, statsd export and alert rules that never fire."""
    directory = tmp_path_factory.mktemp("obs")
    home = directory / "home"
    assert len(str(home / "run" / "control.sock")) < 100
    app_script = REPO / "examples" / "apps" / "server.py"
    base, port, metrics_port = free_port_range(2), free_port(), free_port()
    alerts = {
        "enabled": True,
        "rules": [
            {"name": "never_webhook", "condition": "healthy_backends < 0", "duration": "1s", "action": "webhook",
             "url": "http://alerts:hook-password@127.0.0.1:9/alert"},
            {"name": "never_email", "condition": "error_rate > 100%", "duration": "5m", "action": "email",
             "recipients": ["ops@example.test"]},
        ],
        "smtp": {"host": "127.0.0.1", "port": 2525, "from": "lb@example.test", "username": "alerts",
                 "password_env": "PMDAEMON_TEST_SMTP_PASSWORD"},
    }
    statsd = StatsdSocket()
    data = stack_config(app_script, base, port, metrics_port=metrics_port, statsd_port=statsd.port, alerts=alerts)
    data["load_balancer"]["monitoring"]["metrics"] = {"connection_counts": False}
    config = write_config(directory, data)
    daemon = start_foreground(home, config, directory / "daemon.log",
                              env={"PMDAEMON_TEST_SMTP_PASSWORD": SMTP_PASSWORD})
    runner = PmdaemonRunner(home)
    try:
        wait_backends_up(runner, port)
        yield Stack(runner, port, base, metrics_port, statsd)
    finally:
        daemon.stop()
        runner.cleanup()
        statsd.close()


def run_ok(pmdaemon, *args: str) -> subprocess.CompletedProcess:
    result = pmdaemon(*args)
    assert result.returncode == 0, f"pmdaemon {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result


def test_lb_status_and_backends_have_the_cli_md_fields(stack):
    pmdaemon, port, base = stack.pmdaemon, stack.port, stack.base
    run_ok(pmdaemon, "lb", "status")
    [listener] = [row for row in pmdaemon.json("lb", "status") if row["port"] == port]
    assert (listener["type"], listener["strategy"]) == ("http", "round_robin")
    assert (listener["backends_up"], listener["backends_total"]) == (2, 2)

    run_ok(pmdaemon, "lb", "backends")
    backends = pmdaemon.json("lb", "backends")
    assert sorted((row["address"], row["instance"]) for row in backends) == [
        (f"127.0.0.1:{base}", "web-0"), (f"127.0.0.1:{base + 1}", "web-1")]
    for row in backends:
        assert row["state"] == "up" and row["weight"] == 1 and row["active"] == 0


def test_lb_health_and_health_check_test(stack):
    pmdaemon, base = stack.pmdaemon, stack.base
    run_ok(pmdaemon, "lb", "health")
    rows = pmdaemon.json("lb", "health")
    assert sorted(row["backend"] for row in rows) == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    for row in rows:
        assert row["state"] == "up" and row["consecutive_failures"] == 0 and row["last_check"] is not None

    text = run_ok(pmdaemon, "lb", "health-check", "--test")
    assert "pass" in text.stdout
    results = pmdaemon.json("lb", "health-check", "--test")
    assert len(results) == 2 and all(row["ok"] and row["error"] is None for row in results)


def test_lb_stats_and_traffic_count_what_was_sent(stack):
    pmdaemon, port, base = stack.pmdaemon, stack.port, stack.base
    before = listener_stats(pmdaemon, port)
    assert send(port, count=4) == [200] * 4
    wait_until(lambda: listener_stats(pmdaemon, port)["requests"] == before["requests"] + 4, 10,
               message="4 more requests in lb stats")
    stats = pmdaemon.json("lb", "stats")
    assert {"requests", "responses", "errors", "latency_ms"} <= set(stats)
    assert set(stats["responses"]) >= {"2xx", "3xx", "4xx", "5xx"}
    assert set(stats["latency_ms"]) >= {"p50", "p95", "p99"}
    assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p95"] <= stats["latency_ms"]["p99"]
    assert stats["errors"] == 0
    text = run_ok(pmdaemon, "lb", "stats").stdout
    assert re.search(rf"^requests\s+{stats['requests']}$", text, re.M), text

    run_ok(pmdaemon, "lb", "traffic")
    rows = [row for row in pmdaemon.json("lb", "traffic") if row["listener"] == port]
    assert sorted(row["address"] for row in rows) == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    assert sum(row["requests_total"] for row in rows) == listener_stats(pmdaemon, port)["requests"]
    assert round(sum(row["share_total"] for row in rows)) == 100


def test_keep_alive_requests_count_one_by_one_and_slow_ones_show_in_the_latency(stack):
    pmdaemon, port = stack.pmdaemon, stack.port
    before = listener_stats(pmdaemon, port)["requests"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(10):
            conn.request("GET", "/")
            assert conn.getresponse().read().startswith(b"instance")
        wait_requests(pmdaemon, port, before + 10)
        assert listener_stats(pmdaemon, port)["active_connections"] == 1
    finally:
        conn.close()
    wait_until(lambda: control(pmdaemon, "lb_stats")["active_connections"] == 0, 10,
               message="the closed connection to leave the gauge")

    assert send(port, "/slow?ms=150", count=5) == [200] * 5
    row = wait_requests(pmdaemon, port, before + 15)
    assert row["latency_ms"]["p99"] >= 150  # a lower bound the backend guarantees, not a speed claim
    parsed = samples(run_ok(pmdaemon, "lb", "metrics").stdout)
    buckets = series(parsed, "pmdaemon_response_time_seconds_bucket", listener=str(port))
    under_100ms = next(v for k, v in buckets.items() if dict(k[1])["le"] == "0.1")
    assert row["requests"] - under_100ms >= 5


def test_lb_monitor_count_2_prints_two_frames(stack):
    pmdaemon, port = stack.pmdaemon, stack.port
    text = run_ok(pmdaemon, "lb", "monitor", "--interval=0.2", "--count=2").stdout
    assert text.count("pmdaemon lb monitor") == 2
    assert str(port) in text and "\x1b" not in text
    frames = [json.loads(line) for line in run_ok(pmdaemon, "lb", "monitor", "--interval=0.2", "--count=2",
                                                  "--json").stdout.splitlines()]
    assert len(frames) == 2 and frames[1]["time"] > frames[0]["time"]
    for frame in frames:
        assert not frame["unavailable"]
        assert [row["port"] for row in frame["status"]] == [port]
        assert len(frame["backends"]) == 2 and "requests" in frame["stats"]


def test_lb_metrics_text_detailed_and_json_agree(stack):
    pmdaemon, port, base, metrics_port = stack.pmdaemon, stack.port, stack.base, stack.metrics_port
    before = listener_stats(pmdaemon, port)["requests"]
    send(port, count=2)
    wait_requests(pmdaemon, port, before + 2)  # one request per backend, counted before the views are read
    plain = samples(run_ok(pmdaemon, "lb", "metrics").stdout)
    listener = str(port)
    assert series(plain, "pmdaemon_requests_total", listener=listener)
    assert plain[("pmdaemon_backends_healthy", (("listener", listener),))] == 2
    assert not series(plain, "pmdaemon_backend_requests_total")

    detailed = samples(run_ok(pmdaemon, "lb", "metrics", "--detailed").stdout)
    per_backend = series(detailed, "pmdaemon_backend_requests_total", listener=listener, code_class="2xx")
    assert {dict(key[1])["backend"] for key in per_backend} == {f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"}
    assert series(detailed, "pmdaemon_responses_total", listener=listener, code="200")

    as_json = pmdaemon.json("lb", "metrics")
    assert as_json and all(set(sample) == {"name", "labels", "value"} for sample in as_json)
    names = {sample["name"] for sample in as_json}
    assert {"pmdaemon_requests_total", "pmdaemon_backend_up", "pmdaemon_response_time_seconds_bucket"} <= names
    detailed_json = pmdaemon.json("lb", "metrics", "--detailed")
    assert "pmdaemon_backend_requests_total" in {sample["name"] for sample in detailed_json}

    # --json and the endpoint carry the same series as the text (instance usage may arrive in between).
    def keys(parsed) -> set:
        return {key for key in parsed if not key[0].startswith("pmdaemon_instance_")}
    assert keys({(s["name"], tuple(sorted(s["labels"].items()))): s["value"] for s in as_json}) == keys(plain)
    assert keys(samples(scrape(metrics_port))) == keys(plain)
    # `connection_counts: false` switches its family off, everywhere.
    assert not series(plain, "pmdaemon_active_connections") and not series(detailed, "pmdaemon_backend_active_requests")


def test_promtool_accepts_the_exposition(stack):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (prometheus_client's parser checks the format in the other tests)")
    send(stack.port, count=3)
    for text in (scrape(stack.metrics_port), scrape(stack.metrics_port, "/metrics?detailed=1")):
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


def test_lb_drain_and_enable(stack):
    pmdaemon, port, base = stack.pmdaemon, stack.port, stack.base
    drained = pmdaemon.json("lb", "drain", "web-1")
    assert [(row["address"], row["state"]) for row in drained["backends"]] == [(f"127.0.0.1:{base + 1}", "draining")]
    try:
        states = {row["instance"]: row["state"] for row in pmdaemon.json("lb", "backends")}
        assert states == {"web-0": "up", "web-1": "draining"}
        bodies = set()
        for _ in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/")
            bodies.add(conn.getresponse().read().decode().strip())
            conn.close()
        assert bodies == {f"instance 0 port {base}"}
    finally:
        enabled = pmdaemon.json("lb", "enable", "web-1")
    assert [row["state"] for row in enabled["backends"]] == ["up"]
    assert run_ok(pmdaemon, "lb", "drain", f"127.0.0.1:{base + 1}").stdout.startswith("draining")
    assert run_ok(pmdaemon, "lb", "enable", f"127.0.0.1:{base + 1}").stdout.startswith("enabled")
    assert {row["state"] for row in pmdaemon.json("lb", "backends")} == {"up"}


def test_lb_export_nginx_and_haproxy(stack):
    pmdaemon, port, base = stack.pmdaemon, stack.port, stack.base
    nginx = run_ok(pmdaemon, "lb", "export", "nginx").stdout
    assert "upstream" in nginx and f"listen 127.0.0.1:{port};" in nginx
    assert f"server 127.0.0.1:{base}" in nginx and f"server 127.0.0.1:{base + 1}" in nginx
    haproxy = run_ok(pmdaemon, "lb", "export", "haproxy").stdout
    assert f"bind 127.0.0.1:{port}" in haproxy and f"127.0.0.1:{base + 1}" in haproxy
    exported = pmdaemon.json("lb", "export", "haproxy")
    assert exported["format"] == "haproxy"
    # The header names the time of generation; the rest is the same document.
    assert exported["config"].splitlines()[1:] == haproxy.splitlines()[1:]


def test_lb_config_shows_units_and_no_secrets(stack):
    pmdaemon, port, metrics_port = stack.pmdaemon, stack.port, stack.metrics_port
    text = run_ok(pmdaemon, "lb", "config").stdout
    as_json = run_ok(pmdaemon, "lb", "config", "--json").stdout
    for output in (text, as_json):
        assert SMTP_PASSWORD not in output and APP_SECRET not in output and "hook-password" not in output
    config = json.loads(as_json)
    [listener] = config["load_balancer"]
    assert listener["port"] == port
    assert listener["timeouts"] == {"connect": "5000ms", "read": "30000ms", "write": "30000ms", "idle": "60000ms"}
    assert listener["health_check"]["interval"] == "200ms" or listener["health_check"]["interval"].endswith("s")
    assert listener["alerts"]["smtp"]["password_env"] == "PMDAEMON_TEST_SMTP_PASSWORD"
    assert [rule["duration"] for rule in listener["alerts"]["rules"]] == ["1s", "300s"] or \
        all(rule["duration"].endswith(("s", "m")) for rule in listener["alerts"]["rules"])
    assert listener["monitoring"]["export"]["prometheus"] == {"host": "127.0.0.1", "port": metrics_port,
                                                               "path": "/metrics"}
    [app] = config["apps"]
    assert app["env"]["API_TOKEN"] == "***"
    assert app["kill_timeout"] == "1000ms" and app["max_memory_restart"]


def test_instance_cpu_and_memory_series_for_metrics_collection_apps(stack):
    pmdaemon, metrics_port = stack.pmdaemon, stack.metrics_port

    wait_until(lambda: instance_series(pmdaemon) == {"web-0", "web-1"}, 15, interval=0.2,
               message="instance cpu and memory series")
    parsed = samples(run_ok(pmdaemon, "lb", "metrics").stdout)
    memory = series(parsed, "pmdaemon_instance_memory_bytes")
    cpu = series(parsed, "pmdaemon_instance_cpu_percent")
    assert {dict(key[1])["instance"] for key in memory} == {"web-0", "web-1"}
    assert all(value > 1024 * 1024 for value in memory.values())  # a Python process is over 1 MiB resident
    assert all(value >= 0 for value in cpu.values())
    rows = {row["name"]: row for row in pmdaemon.json("list")}
    assert set(rows) == {"web-0", "web-1"}
    scraped = series(samples(scrape(metrics_port)), "pmdaemon_instance_memory_bytes")
    assert set(scraped) == set(memory)
    as_json = [s for s in pmdaemon.json("lb", "metrics") if s["name"] == "pmdaemon_instance_cpu_percent"]
    assert sorted(s["labels"]["instance"] for s in as_json) == ["web-0", "web-1"]

    def statsd_usage():  # statsd flushes every 10 s from the daemon's start
        stack.statsd.read(0.5)
        return all(any(re.fullmatch(rf"pmdaemon\.instance_memory_bytes\.{name}:\d+\|g", line)
                       for line in stack.statsd.lines)
                   for name in ("web-0", "web-1"))
    wait_until(statsd_usage, 15, interval=0, message="instance memory gauges over statsd")


# ---------------------------------------------------------------- tests with a daemon of their own




def prometheus_matches_stats(parsed: dict, row: dict) -> None:
    """The endpoint's counters for one listener equal its `lb stats` row."""
    listener = str(row["port"])
    by_class = {dict(key[1])["code_class"]: value
                for key, value in series(parsed, "pmdaemon_requests_total", listener=listener).items()}
    assert sum(by_class.values()) == row["requests"]
    assert {name: by_class.get(name, 0) for name in row["responses"]} == row["responses"]
    errors = {dict(key[1])["kind"]: value
              for key, value in series(parsed, "pmdaemon_errors_total", listener=listener).items()}
    assert errors == row["errors_by_kind"] and sum(errors.values()) == row["errors"]
    assert parsed[("pmdaemon_response_time_seconds_count", (("listener", listener),))] == row["requests"]
    assert parsed[("pmdaemon_bytes_in_total", (("listener", listener),))] == row["bytes_in"]
    assert parsed[("pmdaemon_bytes_out_total", (("listener", listener),))] == row["bytes_out"]


@pytest.mark.timeout(60)
def test_stats_prometheus_and_statsd_count_exactly_the_requests_sent(foreground_daemon, pmdaemon, tmp_path,
                                                                     app_script, statsd):
    base, port, metrics_port = free_port_range(2), free_port(), free_port()
    foreground_daemon(write_config(tmp_path, stack_config(app_script, base, port, metrics_port=metrics_port,
                                                          statsd_port=statsd.port, metrics_collection=False)))
    wait_backends_up(pmdaemon, port)

    assert send(port, count=37) == [200] * 37
    row = wait_requests(pmdaemon, port, 37)
    assert row["responses"] == {"1xx": 0, "2xx": 37, "3xx": 0, "4xx": 0, "5xx": 0} and row["errors"] == 0
    stats = pmdaemon.json("lb", "stats")
    assert (stats["requests"], stats["responses"]["2xx"], stats["errors"]) == (37, 37, 0)
    text = scrape(metrics_port)
    prometheus_matches_stats(samples(text), row)
    assert samples(text)[("pmdaemon_requests_total", (("code_class", "2xx"), ("listener", str(port))))] == 37

    assert send(port, "/status/404", count=3) == [404] * 3
    assert send(port, "/status/500", count=2) == [500] * 2
    row = wait_requests(pmdaemon, port, 42)
    assert row["responses"] == {"1xx": 0, "2xx": 37, "3xx": 0, "4xx": 3, "5xx": 2}
    text = scrape(metrics_port)
    prometheus_matches_stats(samples(text), row)
    detailed = samples(scrape(metrics_port, "/metrics?detailed=1"))
    codes = {dict(key[1])["code"]: value
             for key, value in series(detailed, "pmdaemon_responses_total", listener=str(port)).items()}
    assert codes == {"200": 37, "404": 3, "500": 2}
    per_backend = series(detailed, "pmdaemon_backend_requests_total", listener=str(port))
    assert sum(per_backend.values()) == 42

    # statsd flushes every 10 s; counters go out as increases, so their sum is the total.
    prefix = f"pmdaemon.{port}."

    def statsd_counted():
        statsd.read(0.5)
        return all(statsd.counter_total(prefix + name) == n
                   for name, n in (("requests.2xx", 37), ("requests.4xx", 3), ("requests.5xx", 2)))
    wait_until(statsd_counted, 25, interval=0, message="statsd counters for the 42 requests")
    assert any(line.startswith(prefix + "response_time:") and "|ms" in line for line in statsd.lines)
    assert f"{prefix}backends_healthy:2|g" in statsd.lines

    # metrics_collection is off for this app: by now (> one 5 s sampling tick) no instance series exist.
    assert not any(s["name"].startswith("pmdaemon_instance_") for s in pmdaemon.json("lb", "metrics"))
    assert not any(line.startswith("pmdaemon.instance_") for line in statsd.lines)

    # Responses the load balancer makes itself are counted too, as errors of their kind.
    assert sorted(pmdaemon.json("stop", "web")["stopped"]) == ["web-0", "web-1"]
    wait_until(lambda: [r["backends_up"] for r in control(pmdaemon, "lb_status")] == [0], 10,
               message="the pool to see its instances stop")
    assert send(port, count=3) == [503] * 3
    row = wait_requests(pmdaemon, port, 45)
    assert row["responses"]["5xx"] == 5 and row["errors_by_kind"]["no_backend"] == 3 and row["errors"] == 3
    prometheus_matches_stats(samples(scrape(metrics_port)), row)


def iso_seconds(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()




@pytest.mark.timeout(90)
def test_alerts_fire_when_instances_stop_and_resolve_after_restart(foreground_daemon, pmdaemon, tmp_path,
                                                                   app_script, webhooks, smtp):
    mailbox, smtp_port = smtp
    base, port = free_port_range(2), free_port()
    alerts = {
        "enabled": True,
        "rules": [
            {"name": "pool_degraded", "condition": "healthy_backends < 2", "duration": "1s", "action": "webhook",
             "url": webhooks.url("/alert")},
            {"name": "pool_degraded_mail", "condition": "healthy_backends < 2", "duration": "1s",
             "action": "email", "recipients": ["ops@example.test"]},
            {"name": "errors", "condition": "error_rate > 20%", "duration": "1s", "action": "webhook",
             "url": webhooks.url("/errors")},
        ],
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "lb@example.test", "username": "alerts",
                 "password_env": "PMDAEMON_TEST_SMTP_PASSWORD"},
    }
    foreground_daemon(write_config(tmp_path, stack_config(app_script, base, port, alerts=alerts)),
                      env={"PMDAEMON_TEST_SMTP_PASSWORD": SMTP_PASSWORD})
    wait_backends_up(pmdaemon, port)
    wait_until(lambda: instance_series(pmdaemon) == {"web-0", "web-1"}, 15, interval=0.5,
               message="instance series of the running instances")

    stopped_at = int(time.time())  # `since` is written in whole seconds
    assert sorted(pmdaemon.json("stop", "web")["stopped"]) == ["web-0", "web-1"]
    firing = webhooks.wait_for(lambda body: body["rule"] == "pool_degraded" and body["state"] == "firing"
                               and iso_seconds(body["since"]) >= stopped_at, 15)
    assert firing["condition"] == "healthy_backends < 2"
    assert (firing["value"], firing["threshold"], firing["listener"]) == (0, 2, port)

    def firing_mail():
        envelope = mailbox.messages.get(timeout=15)
        text = email.message_from_bytes(envelope.content, policy=email.policy.default).get_content()
        return envelope, json.loads(text[text.index("{"):text.rindex("}") + 1])
    while True:
        envelope, payload = firing_mail()
        if payload["state"] == "firing" and iso_seconds(payload["since"]) >= stopped_at:
            break
    assert envelope.mail_from == "lb@example.test" and envelope.rcpt_tos == ["ops@example.test"]
    assert payload["rule"] == "pool_degraded_mail" and payload["listener"] == port
    subject = email.message_from_bytes(envelope.content, policy=email.policy.default)["Subject"]
    assert subject.startswith(f"[pmdaemon] FIRING pool_degraded_mail on http:{port}: healthy_backends < 2")
    assert mailbox.logins and set(mailbox.logins) == {(b"alerts", SMTP_PASSWORD.encode())}
    assert pmdaemon("lb", "health-check", "--test").returncode == 1
    wait_until(lambda: not instance_series(pmdaemon), 15, interval=0.5,
               message="the stopped instances' cpu/memory series to go")

    restarted_at = int(time.time())
    assert sorted(pmdaemon.json("restart", "web")["restarted"]) == ["web-0", "web-1"]
    wait_backends_up(pmdaemon, port)
    resolved = webhooks.wait_for(lambda body: body["rule"] == "pool_degraded" and body["state"] == "resolved", 15)
    assert iso_seconds(resolved["since"]) >= restarted_at
    assert (resolved["value"], resolved["threshold"], resolved["listener"]) == (2, 2, port)
    assert resolved["condition"] == "healthy_backends < 2"

    # error_rate counts the service's failures over the last minute: 10 of 10, then 10 of 100.
    assert send(port, "/status/500", count=10) == [500] * 10
    firing = webhooks.wait_for(lambda body: body["rule"] == "errors" and body["state"] == "firing", 15)
    assert (firing["condition"], firing["value"], firing["threshold"]) == ("error_rate > 20%", 100, 20)
    assert send(port, count=90) == [200] * 90
    resolved = webhooks.wait_for(lambda body: body["rule"] == "errors" and body["state"] == "resolved", 15)
    assert 10 <= resolved["value"] <= 20  # evaluated every second: it resolves on the way down to 10 %

    logs = [path for path in [*tmp_path.glob("foreground-*.log"), *pmdaemon.home.rglob("*.log")] if path.is_file()]
    assert logs and not [path for path in logs if SMTP_PASSWORD in path.read_text(errors="replace")]


@pytest.mark.timeout(90)
def test_counters_never_go_down_across_reload_config(foreground_daemon, pmdaemon, tmp_path, app_script):
    base, port, metrics_port = free_port_range(2), free_port(), free_port()
    config = stack_config(app_script, base, port, metrics_port=metrics_port)
    foreground_daemon(write_config(tmp_path, config))
    wait_backends_up(pmdaemon, port)
    assert send(port, count=20) == [200] * 20
    wait_requests(pmdaemon, port, 20)

    scraped: list[float] = []
    stop = threading.Event()

    def scrape_all_along():
        while not stop.is_set():
            parsed = samples(scrape(metrics_port))
            scraped.append(sum(series(parsed, "pmdaemon_requests_total", listener=str(port)).values()))
            stop.wait(0.05)

    scraper = threading.Thread(target=scrape_all_along, daemon=True)
    scraper.start()
    try:
        config["load_balancer"]["strategy"] = "least_connections"
        config["load_balancer"]["health_check"]["interval"] = 0.3
        result = pmdaemon("reload", f"--config={write_config(tmp_path, config, 'changed.json')}", "--json")
        assert result.returncode == 0, result.stderr
        assert port in json.loads(result.stdout)["listeners"]["kept"]
        [listener] = pmdaemon.json("lb", "status")
        assert listener["strategy"] == "least_connections"
        assert listener_stats(pmdaemon, port)["requests"] == 20
        wait_backends_up(pmdaemon, port)
        assert send(port, count=5) == [200] * 5
        row = wait_requests(pmdaemon, port, 25)
    finally:
        stop.set()
        scraper.join(10)
    assert scraped and scraped == sorted(scraped) and scraped[0] == 20, scraped
    prometheus_matches_stats(samples(scrape(metrics_port)), row)

    # A reload that moves the endpoint: the new port serves the same counters, the old one is closed.
    moved_port = free_port()
    config["load_balancer"]["monitoring"]["export"]["prometheus"]["port"] = moved_port
    result = pmdaemon("reload", f"--config={write_config(tmp_path, config, 'moved.json')}")
    assert result.returncode == 0, result.stderr
    prometheus_matches_stats(samples(scrape(moved_port)), listener_stats(pmdaemon, port))
    with pytest.raises(ConnectionRefusedError):
        scrape(metrics_port)


def per_backend(pmdaemon, port: int) -> dict[str, float]:
    """Requests each backend served, by instance, from `lb metrics --detailed --json`."""
    counts: dict[str, float] = {}
    for sample in pmdaemon.json("lb", "metrics", "--detailed"):
        if sample["name"] == "pmdaemon_backend_requests_total" and sample["labels"]["listener"] == str(port):
            instance = sample["labels"]["instance"]
            counts[instance] = counts.get(instance, 0) + sample["value"]
    return counts


@pytest.mark.timeout(90)
def test_per_backend_counters_follow_their_backend_across_reload_and_scale(foreground_daemon, pmdaemon, tmp_path,
                                                                          app_script):
    base, port = free_port_range(3), free_port()
    config = stack_config(app_script, base, port)
    foreground_daemon(write_config(tmp_path, config))
    wait_backends_up(pmdaemon, port)
    assert send(port, count=20) == [200] * 20
    wait_requests(pmdaemon, port, 20)
    assert per_backend(pmdaemon, port) == {"web-0": 10, "web-1": 10}

    config["apps"][0]["instances"] = 3
    result = pmdaemon("reload", f"--config={write_config(tmp_path, config, 'three.json')}")
    assert result.returncode == 0, result.stderr
    wait_backends_up(pmdaemon, port, count=3)
    assert send(port, count=30) == [200] * 30
    wait_requests(pmdaemon, port, 50)
    assert per_backend(pmdaemon, port) == {"web-0": 20, "web-1": 20, "web-2": 10}
    traffic = {row["instance"]: row["requests_total"] for row in pmdaemon.json("lb", "traffic")}
    assert traffic == {"web-0": 20, "web-1": 20, "web-2": 10}

    result = pmdaemon("scale", "web", "2")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: [r["backends_total"] for r in pmdaemon.json("lb", "status")] == [2], 15,
               message="the pool to follow the scale down")
    assert send(port, count=20) == [200] * 20
    row = wait_requests(pmdaemon, port, 70)
    assert per_backend(pmdaemon, port) == {"web-0": 30, "web-1": 30}
    assert row["responses"]["2xx"] == 70


@pytest.mark.timeout(60)
def test_tcp_listener_counts_connections_and_bytes(foreground_daemon, pmdaemon, tmp_path, app_script):
    base, port, metrics_port = free_port_range(2), free_port(), free_port()
    config = stack_config(app_script, base, port, metrics_port=metrics_port, type="tcp")
    del config["load_balancer"]["health_check"]  # a backend is up once its port accepts connections
    foreground_daemon(write_config(tmp_path, config))
    wait_backends_up(pmdaemon, port)

    request = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    received = 0
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(request)
            while chunk := conn.recv(65536):
                received += len(chunk)
    row = wait_requests(pmdaemon, port, 6)
    assert (row["type"], row["bytes_in"], row["bytes_out"]) == ("tcp", 6 * len(request), received)
    parsed = samples(run_ok(pmdaemon, "lb", "metrics").stdout)
    assert series(parsed, "pmdaemon_requests_total", listener=str(port)) == {
        ("pmdaemon_requests_total", (("code_class", "none"), ("listener", str(port)))): 6}
    prometheus_matches_stats(samples(scrape(metrics_port)), row)
    [listener] = pmdaemon.json("lb", "status")
    assert (listener["type"], listener["backends_up"], listener["backends_total"]) == ("tcp", 2, 2)
