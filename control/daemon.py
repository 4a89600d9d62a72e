"""The pmdaemon daemon: one per PMDAEMON_HOME, owning the Runtime and answering the control socket.

Layout of a home (default `~/.pmdaemon`, overridden by the PMDAEMON_HOME environment variable):

    daemon.pid          pid of the running daemon
    daemon.log          the daemon's own log (the detached daemon's stdout/stderr go there too)
    run/                mode 0700: only the owner may reach the socket
    run/control.sock    the control socket (control/protocol.py protocol), bound under umask 077
    run/daemon.lock     flock()ed for the daemon's whole life: the single-daemon guarantee

Why a lock file as well as the pid file: a pid file alone cannot tell a live daemon from a dead one
whose pid was reused, and two daemons starting at once would both see "no daemon". The kernel
drops a flock when its holder dies, however it dies, so whoever holds the lock *is* the daemon,
and a socket found without a lock holder is stale and is replaced.

The control socket itself (accepting, framing, refusing other uids) is control/server.py's; this
module decides what each command does, mostly by calling a Runtime method.

Run detached with `python -m pmdaemon.control.daemon --home DIR` (what `pmdaemon start` does when no daemon
runs); `pmdaemon start <config> --no-daemon` runs the same `Daemon` in the CLI's own process.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pykka

from pmdaemon.control.protocol import CommandFailed, ProtocolError, socket_path
from pmdaemon.control.server import AlreadyRunning, ControlServer

log = logging.getLogger("pmdaemon.daemon")

ASK_TIMEOUT = 120.0  # seconds to wait for a supervisor answer (a stop waits for kill_timeout)


def default_home(environ=os.environ) -> Path:
    """PMDAEMON_HOME, else ~/.pmdaemon."""
    return Path(environ.get("PMDAEMON_HOME") or Path.home() / ".pmdaemon").expanduser().absolute()


@dataclass(frozen=True)
class HomePaths:
    home: Path

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def socket(self) -> Path:
        return socket_path(self.home)

    @property
    def lock(self) -> Path:
        return self.run_dir / "daemon.lock"

    @property
    def pid_file(self) -> Path:
        return self.home / "daemon.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "daemon.log"

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def prepare_home(paths: HomePaths) -> None:
    """Create the home and its 0700 run directory; refuse a run directory owned by someone else."""
    paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.run_dir.mkdir(mode=0o700, exist_ok=True)
    status = paths.run_dir.stat()
    if status.st_uid != os.getuid():
        raise PermissionError(f"{paths.run_dir} belongs to uid {status.st_uid}, not to you (uid {os.getuid()}); "
                              f"use a PMDAEMON_HOME of your own")
    os.chmod(paths.run_dir, 0o700)


# ---------------------------------------------------------------------------------------------
# The daemon


# Commands answered by the Runtime method of the same name, with no arguments.
_RUNTIME_PASSTHROUGH = frozenset({"lb_status", "lb_health", "lb_health_check_test", "lb_stats", "lb_backends",
                                  "lb_traffic", "lb_config"})


class Daemon:
    """Holds the home lock, the Runtime and the control server for as long as it runs.

    Usage: `acquire()`, `start(initial_config)`, `wait()`, then always `shutdown()`.
    """

    def __init__(self, home: Path):
        self.paths = HomePaths(Path(home).absolute())
        self.runtime = None
        self.started_at = time.time()
        self.ready = threading.Event()  # set once the initial config (if any) has been applied
        self._stop_requested = threading.Event()
        self._lock_fd: int | None = None
        self._server: ControlServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def acquire(self) -> None:
        """Become this home's daemon, or raise AlreadyRunning naming the daemon that is."""
        prepare_home(self.paths)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            pid = self.paths.read_pid()
            raise AlreadyRunning(f"a pmdaemon daemon{f' (pid {pid})' if pid else ''} is already running for "
                                 f"PMDAEMON_HOME={self.paths.home}; send it commands (`pmdaemon start <config>` "
                                 f"adds a config to it), stop it with `pmdaemon kill`, or use another "
                                 f"PMDAEMON_HOME") from None
        self._lock_fd = fd
        try:
            server = ControlServer(self.paths.socket, self.handle)
            server.bind()
        except BaseException:
            os.close(fd)
            self._lock_fd = None
            raise
        self._server = server
        self.paths.pid_file.write_text(f"{os.getpid()}\n")

    def start(self, config=None) -> dict | None:
        """Start the Runtime and the control server; apply `config` if given (and return its report)."""
        from pmdaemon.control.runtime import Runtime

        self.runtime = Runtime(self.paths.home)
        self._server.start()
        log.info("daemon %d serving %s", os.getpid(), self.paths.socket)
        try:
            return self._apply(config) if config is not None else None
        finally:
            self.ready.set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def wait(self) -> None:
        """Block until SIGINT/SIGTERM (see install_signal_handlers) or a `kill` command."""
        while not self._stop_requested.wait(1.0):
            pass

    def install_signal_handlers(self) -> None:
        """Main thread only: SIGINT/SIGTERM ask the daemon to stop everything and exit; SIGHUP reloads
        the config file the running config came from (like `pmdaemon reload --config <it>`)."""
        def on_signal(signum, _frame):
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.request_stop()

        def on_hangup(_signum, _frame):
            threading.Thread(target=self.reload_from_file, name="sighup-reload", daemon=True).start()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)

    def reload_from_file(self) -> None:
        """SIGHUP: read the running config's file again and apply it in place; the outcome goes to the log
        (an invalid file is refused whole and the running config keeps serving)."""
        source = getattr(getattr(self.runtime, "config", None), "source", None)
        if source is None or not self.ready.is_set():
            log.warning("SIGHUP: no config is running yet; nothing to reload")
            return
        log.info("SIGHUP: reloading %s", source)
        try:
            result = self.runtime.reload_config(self._load(source))
        except Exception as exc:
            log.error("SIGHUP: reload of %s refused or failed: %s", source, exc)
            return
        log.info("SIGHUP: reloaded %s: %s", source, result)

    def shutdown(self) -> None:
        """Stop accepting commands, stop every instance, listener and actor, release the home."""
        try:
            if self._server is not None:
                self._server.stop()
            if self.runtime is not None:
                self.runtime.shutdown()
        finally:
            pykka.ActorRegistry.stop_all()
            if self._lock_fd is not None:
                if self.paths.read_pid() == os.getpid():
                    self.paths.pid_file.unlink(missing_ok=True)
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            log.info("daemon %d stopped", os.getpid())

    # -- commands --------------------------------------------------------------------------------

    def handle(self, cmd: str, args: dict) -> tuple[object, Callable[[], None] | None]:
        """Dispatch one control request. Returns (result, after_send). The server starts only once the
        Runtime exists (`start`), so every command may use it."""
        if cmd == "kill":
            return self._kill(), self.request_stop
        method = getattr(self, f"_cmd_{cmd}", None)
        if method is not None:
            return method(args), None
        if cmd in _RUNTIME_PASSTHROUGH:
            return getattr(self.runtime, cmd)(), None
        raise ProtocolError(f"unknown command {cmd!r}; this daemon speaks protocol v1 "
                            f"(see `pmdaemon --help` for the commands)")

    def _supervisor(self):
        return self.runtime.supervisor.proxy()

    def _cmd_ping(self, _args: dict) -> dict:
        config = self.runtime.config
        return {
            "pid": os.getpid(),
            "home": str(self.paths.home),
            "uptime": round(time.time() - self.started_at, 3),
            "ready": self.ready.is_set(),
            "config": config.source if config is not None else None,
        }

    def _cmd_start(self, args: dict) -> dict:
        return self._apply(self._load(_arg_str(args, "config")))

    def _apply(self, config) -> dict:
        """Apply a config on top of whatever runs: new apps and listeners on new ports start, apps and
        ports already running are left alone (and reported)."""
        infos = self._supervisor().instances().get(timeout=ASK_TIMEOUT)
        running_apps = {info.app for info in infos}
        before = {info.name for info in infos}
        added, left_alone = self.runtime.apply(config)
        infos = self._supervisor().instances().get(timeout=ASK_TIMEOUT)
        return {
            "config": config.source,
            "started": [info.name for info in infos if info.name not in before],
            "unchanged_apps": [app.name for app in config.apps if app.name in running_apps],
            "listeners": [f"{listener.host}:{listener.port}" for listener in added],
            "unchanged_listeners": [f"{listener.host}:{listener.port}" for listener in left_alone],
        }

    @staticmethod
    def _load(path: str):
        from pmdaemon.config.loader import load_config
        return load_config(path)

    def _cmd_list(self, _args: dict) -> list:
        return [asdict(info) for info in self._supervisor().instances().get(timeout=ASK_TIMEOUT)]

    def _target_command(self, verb: str, args: dict) -> list:
        """stop/restart/delete, answered once the instances have settled (PM2 waits the same way)."""
        from pmdaemon.actors.supervisor import UnknownTarget

        target = _arg_str(args, "target")
        supervisor = self._supervisor()
        self.runtime.leave_alb(target)  # an ALB stops sending to them first (actors/alb.py)
        try:
            names = getattr(supervisor, verb)(target).get(timeout=ASK_TIMEOUT)
        except UnknownTarget as exc:
            raise CommandFailed(f"{exc}; `pmdaemon list` shows the apps and instances") from None
        supervisor.settled(names).get(timeout=ASK_TIMEOUT).get(timeout=ASK_TIMEOUT)
        return names

    def _cmd_stop(self, args: dict) -> list:
        return self._target_command("stop", args)

    def _cmd_restart(self, args: dict) -> list:
        return self._target_command("restart", args)

    def _cmd_delete(self, args: dict) -> list:
        return self._target_command("delete", args)

    def _cmd_logs(self, args: dict) -> dict:
        from pmdaemon.actors.supervisor import UnknownTarget

        app = _arg_str(args, "app")
        lines = _arg_int(args, "lines", minimum=0)
        try:
            return self._supervisor().logs(app, lines).get(timeout=ASK_TIMEOUT)
        except UnknownTarget as exc:
            raise CommandFailed(f"{exc}; `pmdaemon list` shows the apps and instances") from None

    def _cmd_reload(self, args: dict) -> object:
        return self.runtime.reload_app(_arg_str(args, "target"))

    def _cmd_reload_config(self, args: dict) -> object:
        return self.runtime.reload_config(self._load(_arg_str(args, "config")))

    def _cmd_scale(self, args: dict) -> object:
        return self.runtime.scale(_arg_str(args, "app"), _arg_int(args, "n", minimum=0))

    def _cmd_lb_metrics(self, args: dict) -> object:
        detailed = bool(args.get("detailed", False))
        if args.get("samples"):
            return self.runtime.lb_metrics_samples(detailed)
        return self.runtime.lb_metrics(detailed)

    def _cmd_lb_drain(self, args: dict) -> object:
        return self.runtime.lb_drain(_arg_str(args, "backend"))

    def _cmd_lb_enable(self, args: dict) -> object:
        return self.runtime.lb_enable(_arg_str(args, "backend"))

    def _cmd_lb_export(self, args: dict) -> object:
        kind = _arg_str(args, "kind")
        if kind not in ("nginx", "haproxy"):
            raise ProtocolError(f"unknown export format '{kind}'; use nginx or haproxy")
        return self.runtime.lb_export(kind)

    def _cmd_lb_monitor(self, _args: dict) -> dict:
        """One frame of `lb monitor`: listeners, totals, traffic shares and backends in one answer."""
        frame: dict = {"time": time.time(), "unavailable": {}}
        parts = {"status": self.runtime.lb_status, "stats": self.runtime.lb_stats,
                 "traffic": self.runtime.lb_traffic, "backends": self.runtime.lb_backends}
        for key, part in parts.items():
            try:
                frame[key] = part()
            except RuntimeError as exc:  # e.g. no load balancer runs: the other parts still show
                frame[key] = None
                frame["unavailable"][key] = str(exc)
        return frame

    def _kill(self) -> dict:
        infos = self._supervisor().instances().get(timeout=ASK_TIMEOUT)
        return {"pid": os.getpid(), "instances": [info.name for info in infos]}


def _arg_str(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"argument '{name}' must be a non-empty string")
    return value


def _arg_int(args: dict, name: str, minimum: int) -> int:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProtocolError(f"argument '{name}' must be an integer >= {minimum}")
    return value


def configure_logging(paths: HomePaths, foreground: bool) -> None:
    """The daemon's log goes to $PMDAEMON_HOME/daemon.log.

    A detached daemon's stderr already is daemon.log (the CLI opened it, so tracebacks of a crash
    land there too); a foreground daemon writes the file and also shows the log on its stderr.
    """
    formatter = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if foreground:
        handlers.append(logging.FileHandler(paths.log_file))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the detached daemon (`python -m pmdaemon.control.daemon --home DIR`).

    It starts with no config and waits for `start` commands.
    """
    parser = argparse.ArgumentParser(prog="python -m pmdaemon.control.daemon")
    parser.add_argument("--home", type=Path, default=default_home())
    options = parser.parse_args(argv)
    daemon = Daemon(options.home)
    try:
        configure_logging(daemon.paths, foreground=False)
        daemon.acquire()
    except (AlreadyRunning, OSError) as exc:
        print(f"pmdaemon daemon: {exc}", file=sys.stderr)
        return 1
    daemon.install_signal_handlers()
    try:
        daemon.start()
        daemon.wait()
    finally:
        daemon.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
