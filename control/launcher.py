"""The daemon's life seen from the CLI: spawn it detached, run it in the foreground, kill it.

`pmdaemon start` needs a daemon for its home: `ensure_daemon` spawns `python -m
pmdaemon.control.daemon` detached (its own session, stdout and stderr into daemon.log) unless one
already answers, and waits for its control socket. `--no-daemon` runs the same `Daemon` in the
CLI's own process instead (`run_foreground`). `kill_daemon` asks the daemon to stop everything and
waits, on a pidfd, until its process is gone, so the next command finds no half-dead daemon.

The daemon module is imported inside the functions: it pulls in pykka, which `pmdaemon --help`
and a usage error have no use for.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pmdaemon.control.protocol import CommandFailed, ControlClient, DaemonNotRunning

DAEMON_START_TIMEOUT = 15.0  # seconds to wait for a freshly spawned daemon's socket
KILL_TIMEOUT = 60.0  # seconds to wait for the daemon's pid to disappear after `kill`


def ensure_daemon(client: ControlClient) -> bool:
    """Make sure a daemon runs for this home. True if this call started it."""
    from pmdaemon.control.daemon import HomePaths, prepare_home

    try:
        client.call("ping", timeout=5)
        return False
    except DaemonNotRunning:
        pass
    paths = HomePaths(client.home)
    prepare_home(paths)
    with open(paths.log_file, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "pmdaemon.control.daemon", "--home", str(paths.home)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=paths.home, start_new_session=True)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while True:
        try:
            client.call("ping", timeout=5)
            return True
        except DaemonNotRunning:
            pass
        returncode = process.poll()
        if returncode is not None:
            try:  # it lost a race against another `pmdaemon start`: use the winner
                client.call("ping", timeout=5)
                return False
            except DaemonNotRunning:
                raise CommandFailed(f"the daemon exited at start (status {returncode}):\n"
                                    f"{_tail(paths.log_file)}") from None
        if time.monotonic() > deadline:
            raise CommandFailed(f"the daemon (pid {process.pid}) did not open {client.path} within "
                                f"{DAEMON_START_TIMEOUT:g} s; see {paths.log_file}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def kill_daemon(client: ControlClient) -> dict | None:
    """Ask the daemon to stop everything and exit, then wait until its pid is gone.

    Returns its answer ({"pid": ..., "instances": [...]}), or None when no daemon was running.
    """
    try:
        result = client.call("kill", timeout=KILL_TIMEOUT)
    except DaemonNotRunning:
        return None
    if not _wait_pid_gone(result["pid"], KILL_TIMEOUT):
        raise CommandFailed(f"the daemon (pid {result['pid']}) is still running {KILL_TIMEOUT:g} s after "
                            f"`kill`; see {client.home / 'daemon.log'}")
    return result


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait for a process (not our child) to exit. A pidfd becomes readable at exit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def run_foreground(home: Path, config, on_started: Callable[[dict], None]) -> None:
    """Be the daemon of `home` in this process until SIGINT/SIGTERM, then stop everything it started.

    `on_started(report)` runs once `config` is applied. Another daemon on the home, or a config that
    cannot start, raises CommandFailed (exit 1); a home that cannot be prepared raises its OSError.
    """
    from pmdaemon.control.daemon import Daemon, configure_logging, prepare_home
    from pmdaemon.control.server import AlreadyRunning

    daemon = Daemon(home)
    try:
        prepare_home(daemon.paths)
        configure_logging(daemon.paths, foreground=True)
        daemon.acquire()
    except AlreadyRunning as exc:
        raise CommandFailed(str(exc)) from None
    daemon.install_signal_handlers()
    try:
        try:
            report = daemon.start(config)
        except (OSError, RuntimeError) as exc:
            raise CommandFailed(f"could not start {config.source}: {exc}") from None
        on_started(report)
        daemon.wait()
    finally:
        daemon.shutdown()
