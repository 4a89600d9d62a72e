"""Helpers for end-to-end tests over tests/apps/switchable.py instances behind a real daemon: configs,
the app's admin switches and request counts, and the daemon's view of each backend (`lb backends`,
`lb health`) through its control socket."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pmdaemon.control.protocol import ControlClient

from support.configs import http_app_config, write_config
from support.http import Reply, get
from support.paths import TEST_APPS
from support.ports import free_port, free_port_range
from support.wait import wait_until

SWITCHABLE = TEST_APPS / "switchable.py"


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
    """GET one of the app's `/_admin/...` switches or counters; it must answer 200."""
    reply = get(port, path)
    assert reply.status == 200, (path, reply.status, reply.body)
    return reply.body


def served(port: int) -> int:
    """How many requests the instance on `port` has served (health checks and admin paths excluded)."""
    return stats(port)["requests"]


def stats(port: int) -> dict:
    return json.loads(admin(port, "/_admin/stats"))


def serving(port: int) -> bool:
    """Has the instance now on `port` served a request? False while nothing listens there (yet)."""
    try:
        return stats(port)["requests"] > 0
    except ConnectionRefusedError:
        return False


def balancer_503(lb_port: int) -> Reply:
    """A GET the balancer must answer itself, at once (3 s client timeout): 503 with a plain-text body."""
    reply = get(lb_port, timeout=3)
    assert reply.status == 503
    assert reply.headers.get_content_type() == "text/plain"
    assert reply.body.strip()
    return reply


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


def run_until_up(foreground_daemon, pmdaemon, config: Path, *ports: int) -> ControlClient:
    """Run `config` in a foreground daemon and wait until the backends on `ports` are up; returns the
    daemon's control client."""
    foreground_daemon(config)
    client = control(pmdaemon)
    for port in ports:
        wait_state(client, port, "up")
    return client
