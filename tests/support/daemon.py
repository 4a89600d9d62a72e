"""Running pmdaemon for real: the CLI as a subprocess against a home of the test's own.

Every test gets its own PMDAEMON_HOME under tmp_path, so tests run in parallel with each other and
with other developers' runs on the same machine. The fixtures in tests/e2e/conftest.py build on
these: `pmdaemon` is a `PmdaemonRunner`, `foreground_daemon` starts `ForegroundDaemon`s.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support.paths import REPO
from support.processes import kill_tree, process_alive

CLI = [sys.executable, "-m", "pmdaemon"]
DEFAULT_TIMEOUT = 30.0


def daemon_pid(home: Path) -> int | None:
    try:
        return int((Path(home) / "daemon.pid").read_text())
    except (OSError, ValueError):
        return None


def daemon_env(home: Path, extra: dict | None = None) -> dict:
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
        return subprocess.run(CLI + [str(arg) for arg in args], env=daemon_env(self.home, env), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, input=input)

    def env(self, extra: dict | None = None) -> dict:
        """The environment the runner gives the CLI (for tests that spawn it themselves)."""
        return daemon_env(self.home, extra)

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


@dataclass
class ForegroundDaemon:
    """A `pmdaemon start <config> --no-daemon` the test started itself."""
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
