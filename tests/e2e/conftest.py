"""Fixtures of the end-to-end tests: pmdaemon run for real against a home of the test's own.

- `pmdaemon_home`: the home directory (a Path; not created until a daemon needs it).
- `pmdaemon`: a `support.daemon.PmdaemonRunner`: `pmdaemon("list", "--json")` runs the CLI as a
  subprocess with that home and a timeout and returns the CompletedProcess (text stdout/stderr);
  `pmdaemon.json(...)` runs it, asserts exit 0 and returns the parsed stdout. At teardown any
  daemon left in that home is stopped (`pmdaemon kill`, then SIGKILL of the daemon and its
  descendants, by PID).
- `foreground_daemon`: a factory, `foreground_daemon(config_path)` starts
  `pmdaemon start <config> --no-daemon` in the background, waits until it has applied the config,
  and returns a `ForegroundDaemon` (its Popen and home). Teardown: SIGTERM, then kill by PID.
- `runtime`: the daemon's Runtime in the test process (no control socket), home under tmp_path;
  `runtime.apply(config)` starts apps and listeners, teardown shuts everything down.

Every test collected here is marked `e2e`, so `-m "not e2e"` skips them all.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pmdaemon.control.runtime import Runtime

from support.daemon import CLI, DEFAULT_TIMEOUT, ForegroundDaemon, PmdaemonRunner, daemon_env
from support.paths import REPO
from support.wait import wait_until

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


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


@pytest.fixture
def foreground_daemon(pmdaemon_home, tmp_path):
    """Factory: start `pmdaemon start <config> --no-daemon` and wait until the config is applied."""
    from pmdaemon.control.protocol import CommandFailed, ControlClient

    started: list[ForegroundDaemon] = []

    def start(config: Path, timeout: float = DEFAULT_TIMEOUT, env: dict | None = None) -> ForegroundDaemon:
        log = open(tmp_path / f"foreground-{len(started)}.log", "w")
        process = subprocess.Popen(CLI + ["start", str(config), "--no-daemon"], env=daemon_env(pmdaemon_home, env),
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
def runtime(tmp_path):
    rt = Runtime(tmp_path / "home")
    yield rt
    rt.shutdown()
