"""Shared fixtures for tests that run pmdaemon for real.

Every test gets its own PMDAEMON_HOME under tmp_path, so tests run in parallel with each other and
with other developers' runs on the same machine. The fixtures:

- `pmdaemon_home`: the home directory (a Path; not created until a daemon needs it).
- `pmdaemon`: a runner, `pmdaemon("list", "--json")` runs the CLI as a subprocess with that home
  and a timeout and returns the CompletedProcess (text stdout/stderr). `pmdaemon.json(...)` runs
  it, asserts exit 0 and returns the parsed stdout. At teardown any daemon left in that home is
  stopped (`pmdaemon kill`, then SIGKILL of the daemon and its descendants, by PID).
- `foreground_daemon`: a factory, `foreground_daemon(config_path)` starts
  `pmdaemon start <config> --no-daemon` in the background, waits until it has applied the config,
  and returns a `ForegroundDaemon` (its Popen and home). Teardown: SIGTERM, then kill by PID.
- `backends` / `lb`: factories of RecordingBackends and of an IOLoop with one HTTP listener over
  them, for data-plane tests (defined in proxyharness.py, loaded below as a plugin).
Plain helpers (import them: `from conftest import free_port, write_config`):
- `write_config(directory, data)`: writes a dict as a JSON config and returns its path;
  `http_app_config(script, name, instances, base_port)` builds one app entry.
- `free_port()` / `free_port_range(n)`: ports nobody listens on (n consecutive ones for
  `increment_var` apps).
- `wait_until(predicate, timeout)`: poll until truthy or fail the test.
- `app_script`: examples/apps/server.py, the example HTTP app: listens on $PORT, answers
  "instance <i> port <port>", `GET /health` answers 200.
- `processes_of_home(home)`: every live process started for that home, orphans included.
- `descendants(pid)` / `process_alive(pid)`: live (non-zombie) descendants of a process, for "nothing left behind" checks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from quietports import quiet_port, quiet_port_range

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pmdaemon"]
DEFAULT_TIMEOUT = 30.0

pytest_plugins = ("proxyharness",)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the ephemeral range (tests/quietports.py)."""
    return quiet_port()


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports (for apps with increment_var), below the ephemeral range."""
    return quiet_port_range(count)


def write_config(directory: Path, data: dict, name: str = "pmdaemon.json") -> Path:
    path = Path(directory) / name
    path.write_text(json.dumps(data, indent=2))
    return path


def descendants(pid: int) -> list[psutil.Process]:
    """Live descendants of `pid` (zombies excluded: they have exited, only their parent must reap them)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def processes_of_home(home: Path) -> list[psutil.Process]:
    """Live processes started for this PMDAEMON_HOME (the CLI passes it on to the daemon and the daemon
    to every instance), whoever their parent is now: catches orphans a crashed daemon left."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE \
                    and process.environ().get("PMDAEMON_HOME") == str(home):
                found.append(process)
        except psutil.Error:
            pass
    return found


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants, by PID (last resort in teardown)."""
    victims = descendants(pid)
    if process_alive(pid):
        victims.insert(0, psutil.Process(pid))
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def daemon_pid(home: Path) -> int | None:
    try:
        return int((Path(home) / "daemon.pid").read_text())
    except (OSError, ValueError):
        return None


def _env(home: Path, extra: dict | None = None) -> dict:
    """The test's environment with PMDAEMON_HOME and NO_COLOR set; `extra` values of None unset a variable."""
    env = dict(os.environ, PMDAEMON_HOME=str(home), NO_COLOR="1")
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class PmdaemonRunner:
    """Runs the CLI against one home. Calling it returns the CompletedProcess; never raises on exit status."""

    def __init__(self, home: Path):
        self.home = home

    def __call__(self, *args: str, timeout: float = DEFAULT_TIMEOUT, env: dict | None = None,
                 input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + [str(arg) for arg in args], env=_env(self.home, env), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, input=input)

    def env(self, extra: dict | None = None) -> dict:
        """The environment the runner gives the CLI (for tests that spawn it themselves)."""
        return _env(self.home, extra)

    def json(self, *args: str, timeout: float = DEFAULT_TIMEOUT):
        """Run with --json, assert exit 0 and return the parsed stdout."""
        result = self(*args, "--json", timeout=timeout)
        assert result.returncode == 0, f"pmdaemon {' '.join(args)} exited {result.returncode}: {result.stderr}"
        return json.loads(result.stdout)

    def cleanup(self) -> None:
        """Stop a daemon a test left running in this home, whatever state it is in."""
        pid = daemon_pid(self.home)
        if pid is None or not process_alive(pid):
            return
        try:
            self("kill", timeout=DEFAULT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        if process_alive(pid):
            kill_tree(pid)


@pytest.fixture
def pmdaemon_home(tmp_path) -> Path:
    home = tmp_path / "home"
    # AF_UNIX paths are limited to 107 bytes.
    assert len(str(home / "run" / "control.sock")) < 100, f"tmp_path too long for a Unix socket: {home}"
    return home


@pytest.fixture
def pmdaemon(pmdaemon_home):
    runner = PmdaemonRunner(pmdaemon_home)
    yield runner
    runner.cleanup()


@dataclass
class ForegroundDaemon:
    process: subprocess.Popen
    home: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL (with its descendants) if it does not exit in time. Returns the status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_tree(self.process.pid)
                self.process.wait(5)
        return self.process.returncode


@pytest.fixture
def foreground_daemon(pmdaemon_home, tmp_path):
    """Factory: start `pmdaemon start <config> --no-daemon` and wait until the config is applied."""
    from pmdaemon.control.protocol import CommandFailed, ControlClient

    started: list[ForegroundDaemon] = []

    def start(config: Path, timeout: float = DEFAULT_TIMEOUT, env: dict | None = None) -> ForegroundDaemon:
        log = open(tmp_path / f"foreground-{len(started)}.log", "w")
        process = subprocess.Popen(CLI + ["start", str(config), "--no-daemon"], env=_env(pmdaemon_home, env),
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        daemon = ForegroundDaemon(process, pmdaemon_home)
        started.append(daemon)
        client = ControlClient(pmdaemon_home, timeout=5)

        def ready():
            if process.poll() is not None:
                output = (tmp_path / f"foreground-{len(started) - 1}.log").read_text()
                pytest.fail(f"pmdaemon --no-daemon exited {process.returncode}:\n{output}")
            try:
                return client.call("ping")["ready"]
            except CommandFailed:
                return False

        wait_until(ready, timeout, message="the foreground daemon to apply its config")
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def app_script() -> Path:
    return REPO / "examples" / "apps" / "server.py"


def http_app_config(script: Path, name: str, instances: int, base_port: int, **extra) -> dict:
    """One app entry: `instances` copies of `script`, instance i on base_port + i (PORT)."""
    app = {"name": name, "script": str(script), "instances": instances, "increment_var": "PORT",
           "env": {"PORT": base_port}, "min_uptime": 200, "kill_timeout": 1000}
    app.update(extra)
    return app
