"""Sticky sessions end to end: `pmdaemon start <config> --no-daemon`, real instances, real clients.

What a user notices: which instance answered (the example app's `X-Backend` header), the
`Set-Cookie` the balancer adds, and that pins hold across drain and daemon restarts but not across a
stopped instance. Also `ip_hash` with `session_affinity` (decisions.md section 8).
"""
from __future__ import annotations

import json
import os
import shutil
import ssl
from contextlib import closing
from pathlib import Path

import trustme

from support.configs import http_app_config, write_config
from support.http import Reply, get, https
from support.paths import REPO
from support.ports import free_port, free_port_range
from support.wait import wait_until

SESSION_TIMEOUT = 60


def sticky_config(tmp_path: Path, app_script: Path, instances: int = 3, **listener) -> tuple[Path, int]:
    lb_port = free_port()
    app = http_app_config(app_script, "web", instances, free_port_range(instances))
    app["health_check"] = {"url": "http://localhost:{{PORT}}/health", "interval": 0.2, "timeout": 1,
                           "failure_threshold": 1}
    balancer = {"port": lb_port, "host": "127.0.0.1", "strategy": "sticky_sessions", "apps": ["web"],
                "session": {"timeout": SESSION_TIMEOUT}}
    balancer.update(listener)
    return write_config(tmp_path, {"apps": [app], "load_balancer": balancer}), lb_port


def with_cookie(value: str, name: str = "PMDAEMON_SESSION") -> dict:
    return {"Cookie": f"{name}={value}"}


def backends(pmdaemon) -> list[dict]:
    return pmdaemon.json("lb", "backends")


def wait_states(pmdaemon, expected: list[str], timeout: float = 15.0) -> list[dict]:
    def check():
        rows = backends(pmdaemon)
        return rows if [row["state"] for row in rows] == expected else None
    return wait_until(check, timeout, interval=0.1, message=f"backend states {expected}")


def port_of(row: dict) -> int:
    """The port of a `lb backends` row, as `Reply.backend` gives the port that answered."""
    return int(row["address"].rsplit(":", 1)[1])


def test_a_cookie_pins_a_client_and_others_are_balanced_round_robin(tmp_path, app_script, foreground_daemon, pmdaemon):
    config, lb_port = sticky_config(tmp_path, app_script)
    foreground_daemon(config)
    rows = wait_states(pmdaemon, ["up", "up", "up"])
    first = get(lb_port)
    assert first.status == 200
    assert first.set_cookie is not None
    attributes = [part.strip() for part in first.set_cookie.split(";")]
    assert attributes[0].startswith("PMDAEMON_SESSION=")
    assert set(attributes[1:]) == {f"Max-Age={SESSION_TIMEOUT}", "Path=/", "HttpOnly", "SameSite=Lax"}
    value = first.cookie()
    assert all(str(port_of(row)) not in value and "127.0.0.1" not in value for row in rows)  # opaque

    pinned = [get(lb_port, headers=with_cookie(value)) for _ in range(8)]
    assert {reply.backend for reply in pinned} == {first.backend}
    assert all(reply.set_cookie is None for reply in pinned)  # a valid pin is not re-issued

    fresh = [get(lb_port) for _ in range(6)]
    assert {reply.backend for reply in fresh} == {port_of(row) for row in rows}
    assert all(reply.set_cookie for reply in fresh)


def test_the_session_header_pins_by_id_and_names_are_configurable(tmp_path, app_script, foreground_daemon, pmdaemon):
    config, lb_port = sticky_config(tmp_path, app_script,
                                    session={"cookie_name": "APPSID", "header_name": "X-Client-Session",
                                             "timeout": SESSION_TIMEOUT})
    foreground_daemon(config)
    wait_states(pmdaemon, ["up", "up", "up"])
    placed = {}
    for session in ("alice", "bob", "carol", "dave"):
        replies = [get(lb_port, headers={"X-Client-Session": session}) for _ in range(4)]
        assert len({reply.backend for reply in replies}) == 1, f"session {session} moved between backends"
        placed[session] = replies[0].backend
    assert len(set(placed.values())) == 3  # new ids are balanced round robin, not all on one backend
    # The cookie carries the configured name, and its value also works as a session id.
    reply = get(lb_port)
    value = reply.cookie("APPSID")
    assert {get(lb_port, headers={"X-Client-Session": value}).backend for _ in range(4)} == {reply.backend}
    assert {get(lb_port, headers=with_cookie(value, "APPSID")).backend for _ in range(4)} == {reply.backend}


def test_forged_or_foreign_cookies_are_balanced_normally_and_replaced(tmp_path, app_script, foreground_daemon,
                                                                      pmdaemon):
    config, lb_port = sticky_config(tmp_path, app_script)
    foreground_daemon(config)
    rows = wait_states(pmdaemon, ["up", "up", "up"])
    value = get(lb_port).cookie()
    flipped = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    forgeries = [flipped, value[:-1], "not-a-session", "", value + "x", "\u00e9t\u00e9"]
    replies = [get(lb_port, headers={"Cookie": "PMDAEMON_SESSION=" + forged.encode("utf-8").decode("latin-1")})
               for forged in forgeries]
    assert all(reply.status == 200 for reply in replies)
    assert {reply.backend for reply in replies} == {port_of(row) for row in rows}  # round robin
    for reply in replies:  # each gets a genuine cookie that pins it from now on
        assert {get(lb_port, headers=with_cookie(reply.cookie())).backend for _ in range(2)} == {reply.backend}


def test_a_cookie_older_than_the_session_timeout_no_longer_pins(tmp_path, app_script, foreground_daemon, pmdaemon):
    config, lb_port = sticky_config(tmp_path, app_script, session={"timeout": 1})
    foreground_daemon(config)
    rows = wait_states(pmdaemon, ["up", "up", "up"])
    first = get(lb_port)
    assert "Max-Age=1" in first.set_cookie
    assert get(lb_port, headers=with_cookie(first.cookie())).backend == first.backend
    wait_until(lambda: get(lb_port, headers=with_cookie(first.cookie())).set_cookie, 5, interval=0.2,
               message="the cookie to go stale (re-issued)")
    replies = [get(lb_port, headers=with_cookie(first.cookie())) for _ in range(6)]
    assert {reply.backend for reply in replies} == {port_of(row) for row in rows}  # balanced, not pinned
    assert all(reply.set_cookie for reply in replies)


def test_a_stopped_pinned_backend_is_rebalanced_and_the_cookie_reissued(tmp_path, app_script, foreground_daemon,
                                                                          pmdaemon):
    config, lb_port = sticky_config(tmp_path, app_script)
    foreground_daemon(config)
    rows = wait_states(pmdaemon, ["up", "up", "up"])
    instance_of = {port_of(row): row["instance"] for row in rows}
    first = get(lb_port)
    old_cookie = first.cookie()
    victim = instance_of[first.backend]
    assert pmdaemon("stop", victim).returncode == 0
    wait_until(lambda: {r["instance"]: r["state"] for r in backends(pmdaemon)}[victim] == "down",
               message=f"{victim} down")
    moved = get(lb_port, headers=with_cookie(old_cookie))
    assert moved.status == 200 and moved.backend != first.backend
    new_cookie = moved.cookie()  # re-issued for the new backend
    assert new_cookie != old_cookie
    assert {get(lb_port, headers=with_cookie(new_cookie)).backend for _ in range(4)} == {moved.backend}
    # The instance comes back: the re-issued cookie keeps its new backend, the old one returns home.
    assert pmdaemon("restart", victim).returncode == 0
    wait_states(pmdaemon, ["up", "up", "up"])
    assert {get(lb_port, headers=with_cookie(new_cookie)).backend for _ in range(4)} == {moved.backend}
    assert get(lb_port, headers=with_cookie(old_cookie)).backend == first.backend


def test_drain_keeps_pinned_clients_and_sends_new_ones_elsewhere(tmp_path, app_script, foreground_daemon, pmdaemon):
    config, lb_port = sticky_config(tmp_path, app_script)
    foreground_daemon(config)
    rows = wait_states(pmdaemon, ["up", "up", "up"])
    first = get(lb_port)
    cookie = first.cookie()
    drained = next(row for row in rows if port_of(row) == first.backend)
    # A session id placed on the same backend (new ids go round robin, so one of three lands there).
    header_session = next(session for session in (f"s{i}" for i in range(6))
                          if get(lb_port, headers={"X-Session-ID": session}).backend == first.backend)

    drain = pmdaemon.json("lb", "drain", drained["instance"])
    assert [(row["instance"], row["state"]) for row in drain["backends"]] == [(drained["instance"], "draining")]
    assert [row["state"] for row in backends(pmdaemon)].count("draining") == 1

    kept = [get(lb_port, headers=with_cookie(cookie)) for _ in range(5)]
    assert {reply.backend for reply in kept} == {first.backend}  # existing sessions stay until they end
    assert all(reply.set_cookie is None for reply in kept)
    assert {get(lb_port, headers={"X-Session-ID": header_session}).backend for _ in range(3)} == {first.backend}
    newcomers = [get(lb_port) for _ in range(8)] + [get(lb_port, headers={"X-Session-ID": f"new{i}"}) for i in range(4)]
    assert first.backend not in {reply.backend for reply in newcomers}
    assert len({reply.backend for reply in newcomers}) == 2

    pmdaemon.json("lb", "enable", drained["instance"])
    assert first.backend in {get(lb_port).backend for _ in range(6)}


def test_under_tls_the_cookie_is_secure(tmp_path, app_script, foreground_daemon, pmdaemon):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    os.chmod(tmp_path / "server.key", 0o600)
    config, lb_port = sticky_config(tmp_path, app_script, ssl={
        "enabled": True, "cert_file": str(tmp_path / "server.crt"), "key_file": str(tmp_path / "server.key")})
    foreground_daemon(config)
    wait_states(pmdaemon, ["up", "up", "up"])
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def get_tls(headers: dict | None = None) -> Reply:
        with closing(https(lb_port, context)) as connection:
            return get(connection, headers=headers)

    first = get_tls()
    assert "Secure" in [part.strip() for part in first.set_cookie.split(";")]
    assert {get_tls(headers=with_cookie(first.cookie())).backend for _ in range(4)} == {first.backend}


def test_cookies_survive_a_daemon_restart(tmp_path, app_script, foreground_daemon, pmdaemon, pmdaemon_home):
    config, lb_port = sticky_config(tmp_path, app_script)
    daemon = foreground_daemon(config)
    wait_states(pmdaemon, ["up", "up", "up"])
    cookies = {}
    while len(cookies) < 3:
        reply = get(lb_port)
        cookies.setdefault(reply.backend, reply.cookie())
    key = pmdaemon_home / "session.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert daemon.stop() == 0

    foreground_daemon(config)
    wait_states(pmdaemon, ["up", "up", "up"])
    for backend, cookie in cookies.items():
        replies = [get(lb_port, headers=with_cookie(cookie)) for _ in range(3)]
        assert {reply.backend for reply in replies} == {backend}
        assert all(reply.set_cookie is None for reply in replies)


def test_ip_hash_session_affinity_keeps_a_moved_client_on_its_new_backend(tmp_path, app_script, foreground_daemon,
                                                                             pmdaemon):
    config, lb_port = sticky_config(tmp_path, app_script, strategy="ip_hash", session_affinity=True)
    foreground_daemon(config)
    rows = wait_states(pmdaemon, ["up", "up", "up"])
    instance_of = {port_of(row): row["instance"] for row in rows}
    sources = [f"127.0.0.{i}" for i in range(2, 12)]
    home = {source: get(lb_port, source=source).backend for source in sources}
    assert all(get(lb_port, source=source).backend == backend for source, backend in home.items())
    assert get(lb_port).set_cookie is None  # ip_hash pins by address, it sets no cookie
    victim_port = max(set(home.values()), key=list(home.values()).count)
    victim = instance_of[victim_port]
    assert pmdaemon("stop", victim).returncode == 0
    wait_until(lambda: {r["instance"]: r["state"] for r in backends(pmdaemon)}[victim] == "down",
               message=f"{victim} down")
    moved = {source: get(lb_port, source=source).backend for source, backend in home.items() if backend == victim_port}
    assert victim_port not in moved.values()
    unmoved = {source: backend for source, backend in home.items() if backend != victim_port}
    assert all(get(lb_port, source=source).backend == backend for source, backend in unmoved.items())

    assert pmdaemon("restart", victim).returncode == 0
    wait_states(pmdaemon, ["up", "up", "up"])
    assert all(get(lb_port, source=source).backend == backend for source, backend in moved.items())


def test_the_sticky_sessions_example_runs(tmp_path, pmdaemon):
    """examples/sticky-sessions.json, moved to free ports, starts its apps and pins clients."""
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "apps", examples / "apps")
    data = json.loads((REPO / "examples" / "sticky-sessions.json").read_text())
    instances = data["apps"][0]["instances"]
    base = free_port_range(instances)
    lb_port = free_port()
    data["apps"][0]["env"]["PORT"] = base
    data["load_balancer"].update(port=lb_port, host="127.0.0.1",
                                 backend_ports=[base + i for i in range(instances)])
    config = write_config(examples, data, "sticky-sessions.json")
    result = pmdaemon("start", config)
    assert result.returncode == 0, result.stderr
    wait_states(pmdaemon, ["up"] * instances)
    status = pmdaemon.json("lb", "status")
    assert [(row["port"], row["strategy"]) for row in status] == [(lb_port, "sticky_sessions")]
    reply = get(lb_port)
    assert {get(lb_port, headers=with_cookie(reply.cookie())).backend for _ in range(4)} == {reply.backend}
    session = {"X-Session-ID": "abc"}
    assert {get(lb_port, headers=session).backend for _ in range(4)} == {get(lb_port, headers=session).backend}
