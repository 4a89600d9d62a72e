"""The daemon and its control socket: one daemon per home, uid check, robustness.

The protocol's framing, sans-I/O: tests/unit/test_protocol.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from pmdaemon.control.protocol import MAX_MESSAGE_SIZE, ControlClient, DaemonNotRunning, encode_request, socket_path

from support.configs import http_app_config, write_config
from support.daemon import daemon_pid
from support.paths import REPO
from support.ports import free_port_range
from support.processes import descendants, process_alive, processes_of_home
from support.wait import wait_until


@pytest.fixture
def bare_daemon(pmdaemon, pmdaemon_home):
    """A detached daemon with no config (what `pmdaemon start` spawns). Returns its pid."""
    process = subprocess.Popen([sys.executable, "-m", "pmdaemon.control.daemon", "--home", str(pmdaemon_home)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    client = ControlClient(pmdaemon_home, timeout=5)

    def answers():
        assert process.poll() is None, "the daemon exited at start"
        try:
            return client.call("ping")
        except DaemonNotRunning:
            return None

    wait_until(answers, 15, message="the daemon's control socket")
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def _raw_exchange(home, payload: bytes, read_timeout: float = 10.0) -> list[dict]:
    """Send raw bytes on the control socket, return every answer line until the daemon closes or pauses."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(read_timeout)
        sock.connect(str(socket_path(home)))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the daemon answers everything, sees EOF and closes
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading an oversized message: its answer is still there to read
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return [json.loads(line) for line in data.splitlines()]


def test_socket_is_private_and_pid_file_names_the_daemon(bare_daemon, pmdaemon_home):
    run_dir = pmdaemon_home / "run"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path(pmdaemon_home).stat().st_mode) & 0o077 == 0
    assert daemon_pid(pmdaemon_home) == bare_daemon.pid
    assert ControlClient(pmdaemon_home).call("ping")["pid"] == bare_daemon.pid


def test_garbage_and_wrong_versions_are_answered_and_the_daemon_keeps_serving(bare_daemon, pmdaemon_home):
    answers = _raw_exchange(pmdaemon_home, b"hello daemon\n" + b'{"v": 7, "cmd": "ping"}\n'
                            + b'{"v": 1, "cmd": "no-such-command"}\n' + encode_request("ping"))
    assert [answer["ok"] for answer in answers] == [False, False, False, True]
    assert answers[0]["exit"] == 2 and "malformed" in answers[0]["error"]
    assert "version 7" in answers[1]["error"]
    assert "unknown command 'no-such-command'" in answers[2]["error"]
    assert answers[3]["result"]["pid"] == bare_daemon.pid


def test_an_oversized_message_is_refused_and_the_daemon_keeps_serving(bare_daemon, pmdaemon_home):
    answers = _raw_exchange(pmdaemon_home, b"x" * (2 * MAX_MESSAGE_SIZE))
    assert len(answers) == 1 and answers[0]["ok"] is False
    assert "exceeds" in answers[0]["error"]
    assert ControlClient(pmdaemon_home).call("ping")["pid"] == bare_daemon.pid


def test_a_client_that_connects_and_says_nothing_does_not_block_others(bare_daemon, pmdaemon_home):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(socket_path(pmdaemon_home)))
        assert ControlClient(pmdaemon_home, timeout=5).call("ping")["pid"] == bare_daemon.pid


_OTHER_UID_CLIENT = textwrap.dedent("""
    import json, socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sys.argv[1])
    except PermissionError as exc:
        print(json.dumps({"connect": "EACCES"}))
        sys.exit(0)
    sock.sendall(b'{"v": 1, "cmd": "list", "args": {}}\\n')
    print(json.dumps({"connect": "ok", "answer": json.loads(sock.makefile("rb").readline())}))
""")


def _as_nobody(script_args: list[str], keep_dac_override: bool) -> dict:
    """Run the client as uid/gid 65534. With CAP_DAC_OVERRIDE kept, file permissions no longer stop
    it, so only the daemon's SO_PEERCRED check stands between it and the daemon."""
    caps = ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"] if keep_dac_override else []
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *caps,
                             sys.executable, "-c", _OTHER_UID_CLIENT, *script_args],
                            capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root")
def test_another_uid_is_refused(bare_daemon, pmdaemon_home):
    path = str(socket_path(pmdaemon_home))
    # The 0700 run directory stops another user before the socket...
    assert _as_nobody([path], keep_dac_override=False) == {"connect": "EACCES"}
    # ...and the peer credential check stops one that gets past the file permissions.
    outcome = _as_nobody([path], keep_dac_override=True)
    assert outcome["connect"] == "ok"
    assert outcome["answer"]["ok"] is False and "permission denied" in outcome["answer"]["error"]
    assert ControlClient(pmdaemon_home).call("ping")["pid"] == bare_daemon.pid


def test_a_second_daemon_on_the_same_home_is_refused(bare_daemon, pmdaemon_home, pmdaemon, tmp_path):
    second = subprocess.run([sys.executable, "-m", "pmdaemon.control.daemon", "--home", str(pmdaemon_home)],
                            cwd=REPO, capture_output=True, text=True, timeout=15)
    assert second.returncode == 1
    assert "already running" in second.stderr and str(bare_daemon.pid) in second.stderr
    config = write_config(tmp_path, {"load_balancer": {"port": free_port_range(1), "host": "127.0.0.1",
                                                       "backend_ports": [free_port_range(1)]}})
    foreground = pmdaemon("start", config, "--no-daemon")
    assert foreground.returncode == 1 and "already running" in foreground.stderr
    assert ControlClient(pmdaemon_home).call("ping")["pid"] == bare_daemon.pid
    assert daemon_pid(pmdaemon_home) == bare_daemon.pid


def test_a_stale_socket_from_a_dead_daemon_is_replaced(bare_daemon, pmdaemon_home, pmdaemon):
    bare_daemon.kill()  # SIGKILL: no cleanup, the socket file and pid file stay behind
    bare_daemon.wait(10)
    assert socket_path(pmdaemon_home).exists()
    with pytest.raises(DaemonNotRunning):
        ControlClient(pmdaemon_home).call("ping")
    replacement = subprocess.Popen([sys.executable, "-m", "pmdaemon.control.daemon", "--home", str(pmdaemon_home)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        def answers():
            try:
                return ControlClient(pmdaemon_home).call("ping")
            except DaemonNotRunning:
                return None
        assert wait_until(answers, 15, message="the replacement daemon")["pid"] == replacement.pid
        assert daemon_pid(pmdaemon_home) == replacement.pid
    finally:
        replacement.send_signal(signal.SIGTERM)
        replacement.wait(30)
    assert not socket_path(pmdaemon_home).exists(), "a clean exit removes the socket"


def test_kill_stops_the_daemon_and_waits_for_it(bare_daemon, pmdaemon, pmdaemon_home):
    result = pmdaemon("kill", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == bare_daemon.pid
    assert not process_alive(bare_daemon.pid) or bare_daemon.poll() is not None
    assert not socket_path(pmdaemon_home).exists()
    assert daemon_pid(pmdaemon_home) is None
    again = pmdaemon("kill")
    assert again.returncode == 0 and "no daemon running" in again.stdout


# -- processes left behind ----------------------------------------------------------------------


_SPAWNS_A_GRANDCHILD = textwrap.dedent("""
    import os, subprocess, sys
    subprocess.Popen(["sleep", "300"])  # a grandchild of the daemon, in the instance's process group
    os.execv(sys.executable, [sys.executable, sys.argv[1]])
""")


@pytest.fixture
def family_config(tmp_path, app_script):
    """Two instances of an app whose processes each have a child of their own."""
    wrapper = tmp_path / "with_grandchild.py"
    wrapper.write_text(_SPAWNS_A_GRANDCHILD)
    base = free_port_range(2)
    app = http_app_config(wrapper, "family", 2, base, args=[str(app_script)])
    return write_config(tmp_path, {"apps": [app]}), base


def _online(pmdaemon, count: int):
    def check():
        rows = pmdaemon.json("list")
        return rows if len(rows) == count and all(row["status"] == "online" for row in rows) else None
    return wait_until(check, 20, interval=0.1, message=f"{count} instances online")


def _wait_for_grandchildren(pid: int, count: int) -> list:
    return wait_until(lambda: (lambda procs: procs if len(procs) >= count else None)(descendants(pid)),
                      10, message=f"{count} descendants of the daemon")


@pytest.mark.timeout(90)
def test_foreground_daemon_stops_everything_on_sigterm(foreground_daemon, family_config, pmdaemon):
    config, _ = family_config
    daemon = foreground_daemon(config)
    _online(pmdaemon, 2)
    family = _wait_for_grandchildren(daemon.pid, 4)  # 2 instances + their 2 `sleep` children
    assert daemon.stop() == 0
    wait_until(lambda: not any(process_alive(process.pid) for process in family),
               10, message="every instance and grandchild to exit")
    assert processes_of_home(daemon.home) == []
    assert not socket_path(daemon.home).exists()


@pytest.mark.timeout(90)
def test_kill_of_a_detached_daemon_leaves_no_process_behind(pmdaemon, pmdaemon_home, family_config):
    config, _ = family_config
    started = pmdaemon("start", config)
    assert started.returncode == 0, started.stderr
    _online(pmdaemon, 2)
    pid = daemon_pid(pmdaemon_home)
    family = _wait_for_grandchildren(pid, 4)
    killed = pmdaemon("kill")
    assert killed.returncode == 0, killed.stderr
    assert not process_alive(pid)
    wait_until(lambda: not any(process_alive(process.pid) for process in family), 10,
               message="every instance and grandchild to exit")
    assert processes_of_home(pmdaemon_home) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("verb", ["stop", "delete"])
def test_stop_and_delete_leave_no_child_process(pmdaemon, pmdaemon_home, family_config, verb):
    config, _ = family_config
    assert pmdaemon("start", config).returncode == 0
    _online(pmdaemon, 2)
    pid = daemon_pid(pmdaemon_home)
    family = _wait_for_grandchildren(pid, 4)
    result = pmdaemon.json(verb, "family")
    assert sorted(result[f"{verb}ped" if verb == "stop" else "deleted"]) == ["family-0", "family-1"]
    assert descendants(pid) == []
    assert not any(process_alive(process.pid) for process in family)
    rows = pmdaemon.json("list")
    if verb == "stop":
        assert {row["status"] for row in rows} == {"stopped"}
    else:
        assert rows == []
    assert process_alive(pid), "the daemon itself keeps running"
