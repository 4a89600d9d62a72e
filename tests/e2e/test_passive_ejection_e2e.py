"""health_aware_round_robin ejects a backend at its first live-traffic failure, not one outcome report
later: the loop takes it out locally at once (net/strategies.py HealthAwareRoundRobin) until the control
plane's snapshot (ejected and quarantined) takes over."""
from __future__ import annotations

import http.client
import time

import pytest

from support.switchable import admin, app_config, balanced, control, served, wait_state

FOLLOWING = 40  # requests after the first 500, sent one after another
SPREAD = 1.5  # seconds they span: past the local bridge (1 s), so the control plane must have taken over


@pytest.mark.timeout(60)
def test_after_its_first_500_a_backend_gets_no_more_requests(tmp_path, foreground_daemon, pmdaemon):
    app, base = app_config("web", 3, health={"interval": 0.2, "failure_threshold": 2},
                           balancing={"strategy": "health_aware_round_robin", "quarantine_duration": 30})
    config, lb_port = balanced(tmp_path, [app])
    foreground_daemon(config)
    client = control(pmdaemon)
    broken = base + 1
    for port in (base, base + 1, base + 2):
        wait_state(client, port, "up")
    admin(broken, "/_admin/fail?on=1")

    connection = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=10)
    try:
        def request() -> tuple[int, int, bool]:
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            return response.status, int(response.headers["X-Backend"]), response.will_close

        first = [request() for _ in range(3)]  # round robin over three: one of them is the broken backend
        assert [(status, port) for status, port, _ in first if status == 500] == [(500, broken)], first
        assert served(broken) == 1
        following = []
        for _ in range(FOLLOWING):
            following.append(request())
            time.sleep(SPREAD / FOLLOWING)
    finally:
        connection.close()

    assert all(not will_close for _, _, will_close in first + following), "the connection was not kept alive"
    assert {status for status, _, _ in following} == {200}
    assert {port for _, port, _ in following} == {base, base + 2}
    assert served(broken) == 1, "the ejected backend got requests after its first 500"
    wait_state(client, broken, "down", timeout=5)  # the control plane keeps it out (quarantine)
