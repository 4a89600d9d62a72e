"""Resilience end to end: `pmdaemon start <config> --no-daemon` with real configs, real backend processes
started by pmdaemon and real clients; health checks, quarantine, restart_unhealthy, the circuit
breaker, rate limiting, a killed instance and an empty pool, seen the way a user sees them.

The instances run tests/apps/switchable.py: its /health, its answers (500 or not) and its speed are
switched on its own port (`/_admin/...`), and it counts the requests it served (`/_admin/stats`), so
"this backend got no request" is read from the backend itself, not from the balancer's bookkeeping.
Intervals are short (health checks every 0.2-0.3 s, recovery timeouts of about a second); every wait
is a deadline and every lower bound on time is asserted with a margin.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO, free_port, free_port_range, http_app_config, wait_until, write_config
from net.control import ControlClient

SWITCHABLE = Path(__file__).resolve().parent / "apps" / "switchable.py"
TCP_ECHO = REPO / "examples" / "apps" / "tcp_echo.py"
CLIENT_A, CLIENT_B = "127.0.0.2", "127.0.0.3"  # two client addresses on the loopback network


# --- configs --------------------------------------------------------------------------------------

def app_config(name: str, instances: int, *, health: dict | None = None, balancing: dict | None = None,
               env: dict | None = None) -> tuple[dict, int]:
    """A switchable app on free consecutive ports; `health` is its health_check block (GET /health)."""
    base = free_port_range(instances)
    app = http_app_config(SWITCHABLE, name, instances, base)
    app["env"].update(env or {})
    if health is not None:
        app["health_check"] = {"url": "http://localhost:{{PORT}}/health", "timeout": 1, **health}
    if balancing is not None:
        app["load_balancer"] = balancing
    return app, base


def balanced(tmp_path: Path, apps: list[dict], **listener) -> tuple[Path, int]:
    """A config with `apps` behind one HTTP listener on a free port."""
    lb_port = free_port()
    balancer = {"port": lb_port, "host": "127.0.0.1", "apps": [app["name"] for app in apps], **listener}
    return write_config(tmp_path, {"apps": apps, "load_balancer": balancer}), lb_port


# --- talking to backends and to the balancer ------------------------------------------------------

def admin(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body)
        return body
    finally:
        connection.close()


def served(port: int) -> int:
    """How many requests the instance on `port` has served (health checks and admin paths excluded)."""
    return stats(port)["requests"]


def stats(port: int) -> dict:
    return json.loads(admin(port, "/_admin/stats"))


class Reply:
    def __init__(self, response: http.client.HTTPResponse):
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    @property
    def backend(self) -> int | None:
        value = self.headers.get("X-Backend")
        return int(value) if value else None


def get(port: int, path: str = "/", source: str | None = None, timeout: float = 10) -> Reply:
    """One GET on a new connection, from `source` (a 127.0.0.x address) when given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request("GET", path)
        return Reply(connection.getresponse())
    finally:
        connection.close()


class Traffic:
    """One client thread sending GET / through the balancer back to back, alternating requests on a
    keep-alive connection with requests on new connections. Every request ends either in a Reply
    (recorded with its start time) or in a failure (an exception: the client saw a broken request)."""

    def __init__(self, lb_port: int, pause: float = 0.0):
        self.lb_port = lb_port
        self.pause = pause
        self.replies: list[tuple[float, Reply]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        kept = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10)
        turn = 0
        while not self._stop.is_set():
            turn += 1
            fresh = turn % 2 == 0
            connection = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10) if fresh else kept
            started = time.monotonic()
            try:
                connection.request("GET", "/")
                self.replies.append((started, Reply(connection.getresponse())))
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{'new' if fresh else 'keep-alive'} connection: {exc!r}")
                if not fresh:
                    kept.close()
                    kept = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10)
            finally:
                if fresh:
                    connection.close()
            if self.pause:
                time.sleep(self.pause)
        kept.close()

    def since(self, moment: float) -> list[Reply]:
        return [reply for started, reply in list(self.replies) if started >= moment]


def control(pmdaemon) -> ControlClient:
    """The daemon's control socket, for polling fast (the CLI starts a Python process per call)."""
    return ControlClient(pmdaemon.home, timeout=10)


def health_row(client: ControlClient, port: int) -> dict:
    return next(row for row in client.call("lb_health") if row["backend"] == f"127.0.0.1:{port}")


def backend_row(client: ControlClient, port: int) -> dict:
    return next(row for row in client.call("lb_backends") if row["address"] == f"127.0.0.1:{port}")


def wait_state(client: ControlClient, port: int, state: str, timeout: float = 10.0) -> float:
    """Wait until `lb backends` shows `state` for the backend on `port`; returns when it was seen."""
    wait_until(lambda: backend_row(client, port)["state"] == state, timeout, interval=0.02,
               message=f"backend {port} {state}")
    return time.monotonic()


# --- health checks --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_health_aware_failing_backend_is_out_after_threshold_rounds_and_back_after_quarantine(
        tmp_path, foreground_daemon, pmdaemon):
    quarantine = 2.0
    threshold = 3
    app, base = app_config("web", 2, health={"interval": 0.25, "failure_threshold": threshold},
                           balancing={"strategy": "health_aware_round_robin", "exclude_unhealthy": True,
                                      "quarantine_duration": quarantine})
    config, lb_port = balanced(tmp_path, [app])
    foreground_daemon(config)
    client = control(pmdaemon)
    sick, well = base, base + 1
    wait_state(client, sick, "up")
    wait_state(client, well, "up")

    with Traffic(lb_port, pause=0.01) as traffic:
        admin(sick, "/_admin/health?mode=fail")
        # One failed round is not enough: seen up with failures counted, then down at the threshold.
        wait_until(lambda: (lambda row: row["state"] == "up" and row["consecutive_failures"] >= 1)(
            health_row(client, sick)), 5, interval=0.02, message="a failed round counted while still up")
        down_seen = wait_state(client, sick, "down")
        row = health_row(client, sick)
        assert row["consecutive_failures"] >= threshold
        assert row["last_error"] == "status 503"

        time.sleep(0.2)  # requests already in flight when it went down are answered by it
        before = served(sick)
        admin(sick, "/_admin/health?mode=ok")
        time.sleep(0.8)  # healthy again at once, but quarantined
        assert served(sick) == before, "a down backend got requests"
        back_seen = wait_state(client, sick, "up", timeout=quarantine + 5)
        wait_until(lambda: served(sick) > before, 5, message="the recovered backend serves again")

    assert back_seen - down_seen >= quarantine - 0.3, "came back before quarantine_duration"
    first_back = min(started for started, reply in traffic.replies
                     if reply.backend == sick and started > down_seen + 0.2)
    assert first_back - down_seen >= quarantine - 0.3, "served a request before quarantine_duration"
    assert traffic.failures == []
    assert {reply.status for _, reply in traffic.replies} == {200}
