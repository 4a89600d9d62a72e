"""performance_based end to end: real instances made slow or CPU-bound while traffic flows.

The instances run tests/apps/switchable.py, whose delay and CPU burner are switched on its own port
(`/_admin/delay?ms=N`, `/_admin/burn?on=1`). Clients send requests through the balancer on a few
keep-alive connections and record which instance answered each one; shares are measured over a
sliding window of recent requests, with margins, and every wait is a deadline, not a sleep.
"""
from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from support.configs import http_app_config, write_config
from support.paths import REPO, TEST_APPS
from support.ports import free_port, free_port_range
from support.wait import wait_until

SWITCHABLE = TEST_APPS / "switchable.py"
INSTANCES = 3
FAIR = 1 / INSTANCES


def performance_config(tmp_path: Path, **balancing) -> tuple[Path, int, int]:
    lb_port = free_port()
    base = free_port_range(INSTANCES)
    app = http_app_config(SWITCHABLE, "adaptive", INSTANCES, base)
    app["health_check"] = {"url": "http://localhost:{{PORT}}/health", "interval": 0.2, "timeout": 1,
                           "failure_threshold": 1}
    app["load_balancer"] = {"strategy": "performance_based", "update_interval": 1, **balancing}
    balancer = {"port": lb_port, "host": "127.0.0.1", "apps": ["adaptive"]}
    return write_config(tmp_path, {"apps": [app], "load_balancer": balancer}), lb_port, base


def admin(port: int, path: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    finally:
        connection.close()


class Traffic:
    """Client threads sending GET / through the balancer back to back; each request's start time and
    answering instance (X-Backend) are recorded."""

    def __init__(self, lb_port: int, clients: int = 4, pause: float = 0.0):
        self.lb_port = lb_port
        self.pause = pause
        self.log: list[tuple[float, str]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                self.log.append((started, response.getheader("X-Backend")))
            except (OSError, http.client.HTTPException):
                self.failures += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10)
            if self.pause:
                time.sleep(self.pause)
        connection.close()

    def shares(self, window: float) -> tuple[dict[str, float], int]:
        """Each instance's share of the requests started in the last `window` seconds, and their count."""
        since = time.monotonic() - window
        recent = [backend for started, backend in list(self.log) if started >= since]
        if not recent:
            return {}, 0
        return {backend: recent.count(backend) / len(recent) for backend in set(recent)}, len(recent)


def share_of(traffic: Traffic, port: int, window: float = 1.0, minimum: int = 30) -> float | None:
    shares, count = traffic.shares(window)
    return shares.get(str(port), 0.0) if count >= minimum else None


def wait_share(traffic: Traffic, port: int, test, timeout: float, what: str, window: float = 1.0) -> float:
    """Poll the port's recent share until `test(share)` holds; fail after `timeout` seconds."""
    seen = []

    def check():
        share = share_of(traffic, port, window)
        if share is None:
            return False
        seen.append(round(share, 3))
        return test(share)

    try:
        wait_until(check, timeout, interval=0.1, message=what)
    finally:
        print(f"{what}: shares seen {seen[-40:]}")
    return seen[-1]


def backends_by_port(pmdaemon) -> dict[int, dict]:
    return {int(row["address"].rsplit(":", 1)[1]): row for row in pmdaemon.json("lb", "backends")}


def all_up(pmdaemon) -> dict[int, dict]:
    return wait_until(lambda: (rows := backends_by_port(pmdaemon)) and
                      all(row["state"] == "up" for row in rows.values()) and rows,
                      15, interval=0.1, message="every backend up")


@pytest.mark.timeout(90)
def test_a_slowed_instance_loses_traffic_within_3s_and_wins_it_back_within_5s(tmp_path, foreground_daemon,
                                                                              pmdaemon):
    config, lb_port, base = performance_config(tmp_path)
    foreground_daemon(config)
    all_up(pmdaemon)
    slow = base + 1
    with Traffic(lb_port) as traffic:
        wait_share(traffic, slow, lambda s: s > 0.8 * FAIR, 10, "an even rotation at first")
        admin(slow, "/_admin/delay?ms=50")
        slowed_at = time.monotonic()
        share = wait_share(traffic, slow, lambda s: s < FAIR / 2, 3, "the slow instance under half its fair share",
                           window=0.75)
        assert share > 0  # less, never nothing
        print(f"slow after {time.monotonic() - slowed_at:.2f} s")
        rows = backends_by_port(pmdaemon)
        assert rows[slow]["weight"] < rows[base]["weight"] / 2
        assert rows[slow]["score"] < rows[base]["score"]
        admin(slow, "/_admin/delay?ms=0")
        fast_at = time.monotonic()
        wait_share(traffic, slow, lambda s: s > 0.8 * FAIR, 5, "the instance back to its fair share")
        print(f"recovered after {time.monotonic() - fast_at:.2f} s")
        assert traffic.failures == 0


@pytest.mark.timeout(90)
def test_an_instance_busy_at_full_cpu_gets_less_traffic_than_idle_ones(tmp_path, foreground_daemon, pmdaemon):
    config, lb_port, base = performance_config(tmp_path)
    foreground_daemon(config)
    all_up(pmdaemon)
    busy = base + 2
    with Traffic(lb_port, clients=2, pause=0.005) as traffic:
        wait_share(traffic, busy, lambda s: s > 0.8 * FAIR, 10, "an even rotation at first")
        admin(busy, "/_admin/burn?on=1")
        try:
            # The busy instance's own requests stay fast: only its CPU (a child process in its tree) tells.
            wait_share(traffic, busy, lambda s: s < 0.75 * FAIR, 10, "the busy instance under its fair share",
                       window=2.0)
            rows = backends_by_port(pmdaemon)
            # Its process tree's CPU, as sampled (less than 100 % on a machine busy with other work).
            assert all(rows[port]["performance"]["cpu_usage"] + 10 < rows[busy]["performance"]["cpu_usage"]
                       for port in (base, base + 1))
            assert rows[busy]["score"] < min(rows[base]["score"], rows[base + 1]["score"])
            shares, _ = traffic.shares(2.0)
            assert shares[str(busy)] < min(shares[str(base)], shares[str(base + 1)])
            assert shares[str(busy)] > 0  # less traffic, never none
        finally:
            admin(busy, "/_admin/burn?on=0")


@pytest.mark.timeout(90)
def test_an_instance_answering_errors_gets_less_traffic_until_it_recovers(tmp_path, foreground_daemon, pmdaemon):
    config, lb_port, base = performance_config(tmp_path)
    foreground_daemon(config)
    all_up(pmdaemon)
    failing = base
    with Traffic(lb_port) as traffic:
        wait_share(traffic, failing, lambda s: s > 0.8 * FAIR, 10, "an even rotation at first")
        admin(failing, "/_admin/fail?on=1")
        wait_share(traffic, failing, lambda s: s < FAIR / 2, 5, "the failing instance under half its fair share")
        assert backends_by_port(pmdaemon)[failing]["performance"]["error_rate"] > 0.5
        admin(failing, "/_admin/fail?on=0")
        wait_share(traffic, failing, lambda s: s > 0.8 * FAIR, 8, "the instance back to its fair share")


def test_lb_backends_shows_scores_and_weights_and_lb_traffic_the_shares(tmp_path, foreground_daemon, pmdaemon):
    config, lb_port, base = performance_config(tmp_path)
    foreground_daemon(config)
    all_up(pmdaemon)
    with Traffic(lb_port, clients=1) as traffic:
        wait_until(lambda: all((row.get("performance") or {}).get("response_time")
                               for row in pmdaemon.json("lb", "backends")),
                   10, interval=0.1, message="every backend scored from its traffic")
    rows = pmdaemon.json("lb", "backends")
    for row in rows:
        assert 1 <= row["score"] <= 100 and 1 <= row["weight"] <= 100
        performance = row["performance"]
        assert performance["memory_usage"] > 1024 * 1024  # the instance's RSS, in bytes
        assert performance["cpu_usage"] >= 0 and performance["error_rate"] == 0
    table = pmdaemon("lb", "backends")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:6] == ["address", "instance", "listener", "state", "weight", "score"]

    answered = {}
    for _, backend in traffic.log:
        answered[backend] = answered.get(backend, 0) + 1

    def counted():
        rows = {row["address"].rsplit(":", 1)[1]: row for row in pmdaemon.json("lb", "traffic")}
        return rows if {port: row["requests_total"] for port, row in rows.items()} == answered else None
    rows = wait_until(counted, 10, interval=0.1, message=f"lb traffic to count {answered}")
    total = sum(answered.values())
    for port, row in rows.items():
        assert row["share_total"] == pytest.approx(100 * answered[port] / total, abs=0.1)
        assert row["requests_last_minute"] == answered[port]
        assert row["share_last_minute"] == pytest.approx(row["share_total"], abs=0.1)


def test_the_performance_based_example_runs(tmp_path, pmdaemon):
    """examples/performance-based.json, moved to free ports (its pool is the app's instances)."""
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "apps", examples / "apps")
    data = json.loads((REPO / "examples" / "performance-based.json").read_text())
    app = data["apps"][0]
    app["env"]["PORT"] = free_port_range(app["instances"])
    lb_port = free_port()
    data["load_balancer"] = {"port": lb_port, "host": "127.0.0.1"}
    result = pmdaemon("start", write_config(examples, data, "performance-based.json"))
    assert result.returncode == 0, result.stderr
    rows = all_up(pmdaemon)
    assert len(rows) == app["instances"]
    assert all(row["weight"] == 100 and row["score"] == 100 for row in rows.values())  # no update yet (60 s)
    assert [(row["port"], row["strategy"]) for row in pmdaemon.json("lb", "status")] == \
        [(lb_port, "performance_based")]
    connection = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=10)
    served = set()
    for _ in range(2 * app["instances"]):
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        served.add(response.getheader("X-Backend"))
    connection.close()
    assert served == {str(port) for port in rows}
