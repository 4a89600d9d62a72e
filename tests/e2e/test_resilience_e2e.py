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
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pmdaemon.control.protocol import ControlClient

from support.configs import http_app_config, write_config
from support.http import Reply, get
from support.paths import REPO, TCP_ECHO_APP
from support.ports import free_port, free_port_range
from support.switchable import (
    SWITCHABLE,
    admin,
    app_config,
    backend_row,
    balanced,
    balancer_503,
    health_row,
    run_until_up,
    served,
    serving,
    stats,
    wait_state,
)
from support.wait import wait_until

CLIENT_A, CLIENT_B = "127.0.0.2", "127.0.0.3"  # two client addresses on the loopback network


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

    def __enter__(self) -> Traffic:
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
                self.replies.append((started, get(connection)))
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
    sick, well = base, base + 1
    client = run_until_up(foreground_daemon, pmdaemon, config, sick, well)

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


def instances(pmdaemon) -> dict[str, dict]:
    return {row["name"]: row for row in pmdaemon.json("list")}


@pytest.mark.timeout(60)
def test_kill_9_of_an_instance_under_load_fails_no_request_and_its_replacement_waits_for_its_check(
        tmp_path, foreground_daemon, pmdaemon):
    # Every process of the app fails /health during its first second while its port already serves.
    app, base = app_config("web", 3, health={"interval": 0.2, "failure_threshold": 2},
                           env={"HEALTHY_AFTER_MS": 1000})
    config, lb_port = balanced(tmp_path, [app])
    run_until_up(foreground_daemon, pmdaemon, config, *range(base, base + 3))
    victim = instances(pmdaemon)["web-1"]
    victim_port = base + 1

    with Traffic(lb_port) as traffic:
        wait_until(lambda: len(traffic.replies) >= 30, 10, message="traffic flowing")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        replacement = wait_until(lambda: (lambda row: row if row["pid"] not in (None, victim["pid"])
                                          and row["status"] == "online" else None)(instances(pmdaemon)["web-1"]),
                                 10, message="web-1 restarted")
        wait_until(lambda: serving(victim_port), 15, message="the replacement serves")
        time.sleep(max(0.0, killed_at + 3.0 - time.monotonic()))

    assert traffic.failures == []
    assert {reply.status for _, reply in traffic.replies} == {200}
    assert len(traffic.since(killed_at)) >= 30
    assert replacement["restarts"] == victim["restarts"] + 1
    fresh = stats(victim_port)
    assert fresh["pid"] == replacement["pid"]
    assert fresh["first_request_at"] >= fresh["first_health_pass_at"], \
        "the restarted instance got a request before its first passing health check"


@pytest.mark.timeout(60)
def test_a_starting_instance_gets_no_traffic_before_its_first_passing_check(tmp_path, foreground_daemon, pmdaemon):
    base = free_port_range(2)
    app = http_app_config(SWITCHABLE, "web", 1, base)
    app["env"]["HEALTHY_AFTER_MS"] = 1500
    app["health_check"] = {"url": "http://localhost:{{PORT}}/health", "timeout": 1, "interval": 0.2,
                           "failure_threshold": 2}
    config, lb_port = balanced(tmp_path, [app])
    run_until_up(foreground_daemon, pmdaemon, config, base)

    with Traffic(lb_port, pause=0.005) as traffic:
        result = pmdaemon("scale", "web", "2", timeout=60)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: serving(base + 1), 15, message="the new instance serves")

    assert traffic.failures == []
    assert {reply.status for _, reply in traffic.replies} == {200}
    started = stats(base + 1)
    assert started["first_health_pass_at"] is not None
    assert started["first_request_at"] >= started["first_health_pass_at"], \
        "the starting instance got a request before its first passing health check"


@pytest.mark.timeout(60)
def test_restart_unhealthy_restarts_a_stuck_instance(tmp_path, foreground_daemon, pmdaemon):
    # A fresh process has its first interval plus failure_threshold rounds to start listening: enough
    # for a Python app on a busy machine.
    app, base = app_config("web", 2, health={"interval": 0.5, "timeout": 0.5, "failure_threshold": 3,
                                             "restart_unhealthy": True})
    config, _lb_port = balanced(tmp_path, [app])
    client = run_until_up(foreground_daemon, pmdaemon, config, base, base + 1)
    before = instances(pmdaemon)

    admin(base + 1, "/_admin/health?mode=hang")  # stuck: its health check never answers
    after = wait_until(lambda: (lambda rows: rows if rows["web-1"]["restarts"] > before["web-1"]["restarts"]
                                else None)(instances(pmdaemon)), 15, message="web-1 restarted")
    assert after["web-0"]["restarts"] == before["web-0"]["restarts"]
    assert after["web-0"]["pid"] == before["web-0"]["pid"]
    wait_state(client, base + 1, "up", timeout=15)  # the fresh process answers its checks
    assert stats(base + 1)["pid"] != before["web-1"]["pid"]
    restarts = instances(pmdaemon)["web-1"]["restarts"]
    time.sleep(1.5)  # healthy now: no further restart
    assert instances(pmdaemon)["web-1"]["restarts"] == restarts


@pytest.mark.timeout(60)
def test_lb_health_and_health_check_test_report_a_failing_backend(tmp_path, foreground_daemon, pmdaemon):
    app, base = app_config("web", 2, health={"interval": 0.25, "failure_threshold": 2})
    config, _lb_port = balanced(tmp_path, [app])
    client = run_until_up(foreground_daemon, pmdaemon, config, base, base + 1)

    passing = pmdaemon("lb", "health-check", "--test")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    results = pmdaemon.json("lb", "health-check", "--test")
    assert sorted((row["backend"], row["ok"]) for row in results) == [
        (f"127.0.0.1:{base}", True), (f"127.0.0.1:{base + 1}", True)]

    admin(base + 1, "/_admin/health?mode=fail")
    failing = pmdaemon("lb", "health-check", "--test")  # checks now, whatever the state says
    assert failing.returncode == 1
    assert f"127.0.0.1:{base + 1}" in failing.stdout
    as_json = pmdaemon("lb", "health-check", "--test", "--json")
    assert as_json.returncode == 1
    verdicts = {row["backend"]: row for row in json.loads(as_json.stdout)}
    assert verdicts[f"127.0.0.1:{base}"]["ok"] is True
    assert verdicts[f"127.0.0.1:{base + 1}"]["ok"] is False
    assert "503" in verdicts[f"127.0.0.1:{base + 1}"]["error"]

    wait_state(client, base + 1, "down")
    rows = {row["backend"]: row for row in pmdaemon.json("lb", "health")}
    sick, well = rows[f"127.0.0.1:{base + 1}"], rows[f"127.0.0.1:{base}"]
    assert sick["state"] == "down" and well["state"] == "up"
    assert sick["consecutive_failures"] >= 2 and well["consecutive_failures"] == 0
    for row in (sick, well):
        assert abs(time.time() - row["last_check"]) < 5, "last_check is the time of a recent check"

    admin(base + 1, "/_admin/health?mode=ok")
    wait_state(client, base + 1, "up")
    assert pmdaemon("lb", "health-check", "--test").returncode == 0


@pytest.mark.timeout(60)
def test_all_backends_down_answers_503_at_once_with_a_plain_text_body(tmp_path, foreground_daemon, pmdaemon):
    app, base = app_config("web", 2, health={"interval": 0.2, "failure_threshold": 1})
    # A connect timeout far beyond the client's: an answer that waited on a backend would time out.
    config, lb_port = balanced(tmp_path, [app], timeouts={"connect": 30000, "read": 30000})
    client = run_until_up(foreground_daemon, pmdaemon, config, base, base + 1)

    for port in (base, base + 1):
        admin(port, "/_admin/health?mode=fail")
    for port in (base, base + 1):
        wait_state(client, port, "down")
    before = [served(base), served(base + 1)]
    assert b"no healthy backend" in balancer_503(lb_port).body
    assert [served(base), served(base + 1)] == before

    assert pmdaemon("stop", "web").returncode == 0
    balancer_503(lb_port)


# --- circuit breaker ------------------------------------------------------------------------------

def breaker_state(client: ControlClient, port: int) -> str:
    return backend_row(client, port)["breaker"]


def wait_breaker(client: ControlClient, port: int, state: str, timeout: float = 10.0) -> float:
    wait_until(lambda: breaker_state(client, port) == state, timeout, interval=0.02,
               message=f"breaker of {port} {state}")
    return time.monotonic()


def trip(lb_port: int, client: ControlClient, port: int) -> float:
    """Send requests until the breaker of the (500-answering) backend on `port` is open; returns when
    the client got the last 500 it saw, a lower bound of the moment the breaker tripped."""
    last_failure = None
    deadline = time.monotonic() + 10
    while breaker_state(client, port) != "open":
        assert time.monotonic() < deadline, "the breaker did not open"
        reply = get(lb_port)
        if reply.status == 500:
            last_failure = time.monotonic()
    return last_failure


@pytest.mark.timeout(60)
def test_breaker_opens_after_threshold_5xx_keeps_traffic_off_until_recovery_timeout_then_closes(
        tmp_path, foreground_daemon, pmdaemon):
    threshold, recovery = 3, 2.0
    app, base = app_config("web", 2)
    config, lb_port = balanced(tmp_path, [app], circuit_breaker={
        "enabled": True, "failure_threshold": threshold, "recovery_timeout": int(recovery * 1000),
        "half_open_requests": 1})
    broken, well = base, base + 1
    client = run_until_up(foreground_daemon, pmdaemon, config, broken, well)

    admin(broken, "/_admin/fail?on=1")
    failures, tripped = 0, None
    while failures < threshold:
        reply = get(lb_port)
        if reply.status == 500:
            assert reply.backend == broken
            failures += 1
            tripped = time.monotonic()
            if failures < threshold:
                time.sleep(0.3)  # the outcome has long reached the breaker: one short of the threshold
                assert breaker_state(client, broken) == "closed"
    wait_breaker(client, broken, "open", timeout=recovery / 2)
    assert served(broken) == threshold

    # Open: nothing reaches it until recovery_timeout has passed since the trip.
    replies = []
    while time.monotonic() < tripped + recovery - 0.25:
        replies.append(get(lb_port))
    assert replies and {(r.status, r.backend) for r in replies} == {(200, well)}
    assert served(broken) == threshold, "an open breaker let a request through"

    # Tripped (open, or half-open waiting for a trial request: both show as `open`).
    rows = {row["address"]: row for row in pmdaemon.json("lb", "backends")}
    assert rows[f"127.0.0.1:{broken}"]["state"] == "open"
    assert rows[f"127.0.0.1:{well}"]["state"] == "up"

    # Half-open after the timeout: a trial reaches it; it succeeds and the breaker closes.
    admin(broken, "/_admin/fail?on=0")
    trial = None
    while trial is None:
        started = time.monotonic()
        reply = get(lb_port)
        assert reply.status == 200
        if reply.backend == broken:
            trial = started
        assert time.monotonic() < tripped + recovery + 5, "no trial request after recovery_timeout"
    assert trial >= tripped + recovery - 0.1
    wait_breaker(client, broken, "closed")
    assert {get(lb_port).backend for _ in range(4)} == {broken, well}
    assert backend_row(client, broken)["state"] == "up"


@pytest.mark.timeout(60)
def test_half_open_admits_exactly_half_open_requests_concurrent_trials_and_a_failed_trial_reopens(
        tmp_path, foreground_daemon, pmdaemon):
    trials, recovery = 2, 1.0
    app, base = app_config("web", 2)
    config, lb_port = balanced(tmp_path, [app], circuit_breaker={
        "enabled": True, "failure_threshold": 2, "recovery_timeout": int(recovery * 1000),
        "half_open_requests": trials})
    broken, well = base, base + 1
    client = run_until_up(foreground_daemon, pmdaemon, config, broken, well)

    admin(broken, "/_admin/fail?on=1")
    trip(lb_port, client, broken)
    admin(broken, "/_admin/fail?on=0")
    admin(broken, "/_admin/delay?ms=1500")  # trials stay in flight while the others arrive
    wait_breaker(client, broken, "half_open")
    before = served(broken)
    concurrent = 4 * trials + 2
    with ThreadPoolExecutor(concurrent) as pool:
        replies = list(pool.map(lambda _: get(lb_port), range(concurrent)))
    assert [r.status for r in replies] == [200] * concurrent
    assert served(broken) - before == trials, "half-open admitted a different number of trials"
    assert sum(r.backend == broken for r in replies) == trials
    wait_breaker(client, broken, "closed")  # every trial succeeded

    # Open again, then a failing trial re-opens it with the timer restarted.
    admin(broken, "/_admin/delay?ms=0")
    admin(broken, "/_admin/fail?on=1")
    trip(lb_port, client, broken)
    wait_breaker(client, broken, "half_open")
    failed_trial, deadline = None, time.monotonic() + 5
    while failed_trial is None:
        if get(lb_port).status == 500:
            failed_trial = time.monotonic()
        assert time.monotonic() < deadline, "no trial request while half-open"
    wait_breaker(client, broken, "open", timeout=recovery / 2)
    count = served(broken)
    while time.monotonic() < failed_trial + recovery - 0.25:
        assert get(lb_port).backend == well
    assert served(broken) == count, "a re-opened breaker let a request through"
    wait_breaker(client, broken, "half_open", timeout=5)


@pytest.mark.timeout(60)
def test_breakers_all_open_answer_503_at_once(tmp_path, foreground_daemon, pmdaemon):
    app, base = app_config("web", 2)
    config, lb_port = balanced(tmp_path, [app], timeouts={"connect": 30000, "read": 30000},
                               circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 30000})
    client = run_until_up(foreground_daemon, pmdaemon, config, base, base + 1)
    for port in (base, base + 1):
        admin(port, "/_admin/fail?on=1")
    for port in (base, base + 1):
        trip(lb_port, client, port)
    before = [served(base), served(base + 1)]
    balancer_503(lb_port)
    assert [served(base), served(base + 1)] == before
    assert {row["state"] for row in pmdaemon.json("lb", "backends")} == {"open"}


@pytest.mark.timeout(60)
def test_responses_the_balancer_makes_429_and_503_never_open_a_breaker(tmp_path, foreground_daemon, pmdaemon):
    app, base = app_config("web", 1)
    config, lb_port = balanced(
        tmp_path, [app],
        circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 30000},
        rate_limiting={"enabled": True, "requests_per_second": 1000, "burst_size": 1000, "per_ip_limit": 2},
        connection_pool={"max_connections": 1})
    client = run_until_up(foreground_daemon, pmdaemon, config, base)

    statuses = [get(lb_port, source=CLIENT_A).status for _ in range(8)]
    assert statuses.count(429) >= 5

    admin(base, "/_admin/delay?ms=1000")  # one request holds the only backend connection
    sources = [f"127.0.0.{i}" for i in range(10, 15)]  # each under its own per-IP limit
    before = served(base)
    with ThreadPoolExecutor(len(sources)) as pool:
        first = pool.submit(get, lb_port, source=sources[0])
        wait_until(lambda: served(base) > before, 5, interval=0.02, message="the first request at the backend")
        rest = list(pool.map(lambda source: get(lb_port, source=source).status, sources[1:]))
        assert first.result().status == 200
    assert rest == [503] * len(rest)

    time.sleep(0.3)  # every outcome has been reported
    row = backend_row(client, base)
    assert (row["state"], row["breaker"]) == ("up", "closed")
    admin(base, "/_admin/delay?ms=0")
    assert get(lb_port, source=CLIENT_B).status == 200


@pytest.mark.timeout(60)
def test_half_open_sends_no_more_than_half_open_requests_trials_to_a_failing_backend(
        tmp_path, foreground_daemon, pmdaemon):
    """Back-to-back requests while half-open: the trial fails at once, and no request after it may
    reach the backend (the control plane hears of the failure only with the next report)."""
    app, base = app_config("web", 2)
    config, lb_port = balanced(tmp_path, [app], circuit_breaker={
        "enabled": True, "failure_threshold": 2, "recovery_timeout": 600, "half_open_requests": 1})
    broken, well = base, base + 1
    client = run_until_up(foreground_daemon, pmdaemon, config, broken, well)
    admin(broken, "/_admin/fail?on=1")
    trip(lb_port, client, broken)
    connection = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=10)
    try:
        for _ in range(3):
            wait_breaker(client, broken, "half_open")
            before = served(broken)
            statuses = []
            while not statuses or breaker_state(client, broken) != "open":
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
            assert statuses.count(500) == 1, statuses
            assert served(broken) - before == 1
    finally:
        connection.close()


@pytest.mark.timeout(60)
def test_breaker_opens_on_backend_timeouts(tmp_path, foreground_daemon, pmdaemon):
    """A 504 the balancer answers because the backend did not answer in time is the backend's failure."""
    app, base = app_config("web", 2)
    config, lb_port = balanced(tmp_path, [app], timeouts={"read": 300},
                               circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 30000})
    slow, well = base, base + 1
    client = run_until_up(foreground_daemon, pmdaemon, config, slow, well)
    admin(slow, "/_admin/delay?ms=2000")
    timeouts = 0
    deadline = time.monotonic() + 15
    while breaker_state(client, slow) != "open":
        assert time.monotonic() < deadline, f"the breaker did not open after {timeouts} timeouts"
        reply = get(lb_port)
        timeouts += reply.status == 504
    assert timeouts >= 2
    replies = [get(lb_port) for _ in range(6)]
    assert {(r.status, r.backend) for r in replies} == {(200, well)}


# --- rate limiting --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_burst_from_one_client_address_gets_429_with_retry_after_while_another_is_served(
        tmp_path, foreground_daemon, pmdaemon):
    per_ip = 3
    app, base = app_config("web", 2)
    config, lb_port = balanced(tmp_path, [app], rate_limiting={
        "enabled": True, "requests_per_second": 1000, "burst_size": 1000, "per_ip_limit": per_ip})
    run_until_up(foreground_daemon, pmdaemon, config, base, base + 1)
    before = served(base) + served(base + 1)

    burst = [get(lb_port, source=CLIENT_A) for _ in range(4 * per_ip)]
    refused = [reply for reply in burst if reply.status == 429]
    assert [reply.status for reply in burst if reply.status != 429] == [200] * per_ip
    assert len(refused) >= 3 * per_ip - 1  # a token may refill during the burst
    for reply in refused:
        assert int(reply.headers["Retry-After"]) >= 1
        assert reply.headers.get_content_type() == "text/plain"
        assert reply.backend is None  # made by the balancer: no backend saw it
    assert served(base) + served(base + 1) - before == len(burst) - len(refused)

    other = [get(lb_port, source=CLIENT_B) for _ in range(per_ip)]
    assert [reply.status for reply in other] == [200] * per_ip

    time.sleep(int(refused[-1].headers["Retry-After"]))
    assert get(lb_port, source=CLIENT_A).status == 200  # its bucket refilled
    wait_until(lambda: pmdaemon.json("lb", "status")[0]["rate_limiting"]["top_refused_clients"].get(CLIENT_A)
               == len(refused), 5, message="the refusals counted for that client")


def tcp_exchange(port: int, source: str) -> bytes:
    """Connect from `source`, ask which backend answers; b"" when the balancer closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
        try:
            sock.sendall(b"WHO\n")
            answer = b""
            while not answer.endswith(b"\n"):
                data = sock.recv(100)
                if not data:
                    break
                answer += data
            return answer
        except ConnectionResetError:
            return b""


@pytest.mark.timeout(60)
def test_a_tcp_listener_refuses_new_connections_over_the_rate_limit(tmp_path, foreground_daemon, pmdaemon):
    per_ip = 2
    base = free_port_range(2)
    app = {"name": "echo", "script": str(TCP_ECHO_APP), "instances": 2, "increment_var": "PORT",
           "env": {"PORT": base}, "min_uptime": 200, "kill_timeout": 1000}
    config, lb_port = balanced(tmp_path, [app], type="tcp", rate_limiting={
        "enabled": True, "requests_per_second": 1000, "burst_size": 1000, "per_ip_limit": per_ip})
    run_until_up(foreground_daemon, pmdaemon, config, base, base + 1)

    answers = [tcp_exchange(lb_port, CLIENT_A) for _ in range(4 * per_ip)]
    accepted = [answer for answer in answers if answer]
    assert accepted[:per_ip] == answers[:per_ip] and len(accepted) <= per_ip + 1
    assert {int(answer) for answer in accepted} <= {base, base + 1}
    assert all(tcp_exchange(lb_port, CLIENT_B) for _ in range(per_ip))


# --- the examples ---------------------------------------------------------------------------------

def example_on_free_ports(tmp_path: Path, name: str) -> tuple[Path, dict, int, int]:
    """examples/<name> with its app moved to free ports and its listener to a free port on 127.0.0.1."""
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "apps", examples / "apps", dirs_exist_ok=True)
    data = json.loads((REPO / "examples" / name).read_text())
    app = data["apps"][0]
    old_base = app["env"]["PORT"]
    base = app["env"]["PORT"] = free_port_range(app["instances"])
    lb_port = free_port()
    balancer = data.setdefault("load_balancer", {})
    balancer.update(port=lb_port, host="127.0.0.1")
    if "backend_ports" in balancer:
        balancer["backend_ports"] = [port - old_base + base for port in balancer["backend_ports"]]
    return write_config(examples, data, name), app, base, lb_port


def all_up(pmdaemon, count: int) -> None:
    wait_until(lambda: (lambda rows: len(rows) == count and all(r["state"] == "up" for r in rows))(
        pmdaemon.json("lb", "backends")), 20, interval=0.2, message=f"{count} backends up")


def served_by(lb_port: int, count: int, source: str | None = None) -> list[tuple[int, int | None]]:
    return [(reply.status, reply.backend) for reply in (get(lb_port, source=source) for _ in range(count))]


@pytest.mark.timeout(60)
def test_the_health_aware_example_runs(tmp_path, pmdaemon):
    config, app, base, lb_port = example_on_free_ports(tmp_path, "health-aware.json")
    result = pmdaemon("start", config)
    assert result.returncode == 0, result.stderr
    all_up(pmdaemon, app["instances"])
    status = pmdaemon.json("lb", "status")[0]
    assert (status["strategy"], status["backends_up"]) == ("health_aware_round_robin", app["instances"])
    assert {backend for _, backend in served_by(lb_port, 2 * app["instances"])} == \
        set(range(base, base + app["instances"]))
    rows = pmdaemon.json("lb", "health")
    assert len(rows) == app["instances"] and {row["state"] for row in rows} == {"up"}
    assert all(row["check"].endswith("/health") for row in rows)


@pytest.mark.timeout(60)
def test_the_circuit_breaker_example_runs(tmp_path, pmdaemon):
    config, app, base, lb_port = example_on_free_ports(tmp_path, "circuit-breaker.json")
    result = pmdaemon("start", config)
    assert result.returncode == 0, result.stderr
    all_up(pmdaemon, app["instances"])
    rows = pmdaemon.json("lb", "backends")
    assert [row["instance"] for row in rows] == [f"web-{i}" for i in range(app["instances"])]
    assert {row["breaker"] for row in rows} == {"closed"}
    replies = served_by(lb_port, 2 * app["instances"])
    assert {status for status, _ in replies} == {200}
    assert {backend for _, backend in replies} == set(range(base, base + app["instances"]))


@pytest.mark.timeout(60)
def test_the_rate_limiting_example_runs(tmp_path, pmdaemon):
    config, app, base, lb_port = example_on_free_ports(tmp_path, "rate-limiting.json")
    per_ip = json.loads(config.read_text())["load_balancer"]["rate_limiting"]["per_ip_limit"]
    result = pmdaemon("start", config)
    assert result.returncode == 0, result.stderr
    all_up(pmdaemon, app["instances"])
    statuses = [status for status, _ in served_by(lb_port, per_ip + 5, source=CLIENT_A)]
    assert statuses[:per_ip] == [200] * per_ip and 429 in statuses[per_ip:]
    assert {status for status, _ in served_by(lb_port, 3, source=CLIENT_B)} == {200}


def bursts(moments: list[float], gap: float) -> list[list[float]]:
    """`moments` (sorted) grouped where consecutive ones are less than `gap` apart."""
    groups: list[list[float]] = []
    for moment in moments:
        if groups and moment - groups[-1][-1] < gap:
            groups[-1].append(moment)
        else:
            groups.append([moment])
    return groups


@pytest.mark.timeout(60)
def test_health_aware_ejects_a_backend_on_live_5xx_for_the_quarantine_each_time(tmp_path, foreground_daemon, pmdaemon):
    """Its /health keeps passing: only live traffic shows the failure. Each time it is let back after
    the quarantine, its first 500 ejects it again (the loop reports outcomes in batches, so a request or
    two more may reach it meanwhile)."""
    quarantine = 1.0
    app, base = app_config("web", 2, health={"interval": 0.2, "failure_threshold": 2},
                           balancing={"strategy": "health_aware_round_robin", "quarantine_duration": quarantine})
    config, lb_port = balanced(tmp_path, [app])
    broken, well = base, base + 1
    run_until_up(foreground_daemon, pmdaemon, config, broken, well)

    admin(broken, "/_admin/fail?on=1")
    with Traffic(lb_port, pause=0.01) as traffic:
        wait_until(lambda: len(bursts(sorted(t for t, r in list(traffic.replies) if r.status == 500), 0.5)) >= 3,
                   4 * quarantine + 10, message="three ejections")
    assert traffic.failures == []
    failed = sorted(started for started, reply in traffic.replies if reply.status == 500)
    assert {reply.status for _, reply in traffic.replies} == {200, 500}
    assert served(broken) == len(failed), "the ejected backend got requests nobody saw fail"
    groups = bursts(failed, 0.5)
    for before, after in zip(groups, groups[1:]):
        assert after[0] - before[-1] >= quarantine - 0.2, f"back before the quarantine: {groups}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeouts", [{"write": 300}, {"read": 300}], ids=["write_timeout", "read_timeout"])
def test_a_client_that_stops_reading_does_not_count_against_the_backend(tmp_path, foreground_daemon, pmdaemon,
                                                                        timeouts):
    """A client that does not read its response is the client's failure, not the backend's: neither the
    balancer giving up on it (timeouts.write) nor the backend being held back meanwhile (not read while
    the client has a full buffer, longer than timeouts.read) may eject the backend or trip its breaker."""
    app, base = app_config("web", 2, health={"interval": 0.2, "failure_threshold": 2},
                           balancing={"strategy": "health_aware_round_robin", "quarantine_duration": 30})
    config, lb_port = balanced(tmp_path, [app], timeouts=timeouts,
                               circuit_breaker={"enabled": True, "failure_threshold": 1, "recovery_timeout": 30000})
    client = run_until_up(foreground_daemon, pmdaemon, config, base, base + 1)

    stalled = []
    for _ in range(2):  # one stalled download on each backend (round robin)
        sock = socket.create_connection(("127.0.0.1", lb_port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /bytes/50000000 HTTP/1.1\r\nHost: lb\r\n\r\n")
        stalled.append(sock)
    try:
        wait_until(lambda: stats(base)["requests"] + stats(base + 1)["requests"] == 2, 5,
                   message="both downloads started")
        time.sleep(1.5)  # well past the timeout
        rows = {row["address"]: row for row in client.call("lb_backends")}
        assert {(row["state"], row["breaker"]) for row in rows.values()} == {("up", "closed")}, rows
    finally:
        for sock in stalled:
            sock.close()
    assert {get(lb_port).status for _ in range(4)} == {200}
