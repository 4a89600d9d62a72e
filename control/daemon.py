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

Control connections are the control plane: each runs on its own short-lived thread (bounded in
number), never on the data-plane I/O loop. A connection from another uid (SO_PEERCRED) is refused.
Garbage, oversized or wrong-version messages get an error answer; they never stop the daemon.

Run detached with `python -m pmdaemon.control.daemon --home DIR` (what `pmdaemon start` does when no daemon
runs); `pmdaemon start <config> --no-daemon` runs the same `Daemon` in the CLI's own process.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pykka

from pmdaemon.control.protocol import (EXIT_RUNTIME, EXIT_USAGE, MAX_MESSAGE_SIZE, CommandFailed, LineBuffer, ProtocolError,
                         decode_request, encode_error, encode_result, socket_path)

log = logging.getLogger("pmdaemon.daemon")

MAX_CONNECTIONS = 32  # concurrent control connections; more are answered "busy" and closed
IDLE_TIMEOUT = 30.0  # seconds a control connection may stay silent before it is closed
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
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


class AlreadyRunning(Exception):
    """Another daemon holds this home's lock."""


def prepare_home(paths: HomePaths) -> None:
    """Create the home and its 0700 run directory; refuse a run directory owned by someone else."""
    paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.run_dir.mkdir(mode=0o700, exist_ok=True)
    status = paths.run_dir.stat()
    if status.st_uid != os.getuid():
        raise PermissionError(f"{paths.run_dir} belongs to uid {status.st_uid}, not to you (uid {os.getuid()}); "
                              f"use a PMDAEMON_HOME of your own")
    os.chmod(paths.run_dir, 0o700)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


# ---------------------------------------------------------------------------------------------
# Control socket server


Handler = Callable[[str, dict], tuple[object, Callable[[], None] | None]]


class ControlServer:
    """Accepts connections on the control socket (one selectors thread) and serves each on a thread.

    `handler(cmd, args)` returns (result, after_send): `after_send`, if any, runs once the answer
    has been written, which is how `kill` answers before the daemon starts tearing itself down.
    It raises ProtocolError / CommandFailed (their `exit` is passed on) or any other exception
    (answered as a runtime failure, exit 1, and logged with its traceback).
    """

    def __init__(self, path: Path, handler: Handler):
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()

    def bind(self) -> None:
        """Bind under umask 077 (the socket file is created 0600), replacing a stale socket file."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise OSError(errno.ENAMETOOLONG, f"the control socket path {self.path} is longer than the "
                          f"{MAX_SOCKET_PATH} bytes a Unix socket allows; use a shorter PMDAEMON_HOME")
        if self.path.exists() or self.path.is_symlink():
            self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            sock.bind(str(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock

    def _remove_stale_socket(self) -> None:
        """Only called while holding the home lock: no live daemon owns this file."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            log.info("replacing stale control socket %s (its daemon is gone)", self.path)
            self.path.unlink()
            return
        finally:
            probe.close()
        raise AlreadyRunning(f"something still answers on {self.path} although no daemon holds the home lock; "
                             f"stop it or remove the file")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and remove the socket file; connections in progress finish on their own."""
        self._stopping.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._sock:
                        self._accept()

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
            log.warning("control socket accept failed: %s", exc)
            time.sleep(0.05)
            return
        conn.setblocking(True)
        if not self._slots.acquire(blocking=False):
            self._send_quietly(conn, encode_error("the daemon is busy (too many control connections); retry"))
            conn.close()
            return
        threading.Thread(target=self._serve_connection, args=(conn,), name="control-conn", daemon=True).start()

    @staticmethod
    def _send_quietly(conn: socket.socket, data: bytes) -> bool:
        try:
            conn.sendall(data)
            return True
        except OSError:
            return False

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                uid = peer_uid(conn)
                if uid != os.getuid():
                    log.warning("refused a control connection from uid %d", uid)
                    self._send_quietly(conn, encode_error(
                        f"permission denied: this daemon belongs to uid {os.getuid()}, you are uid {uid}",
                        EXIT_RUNTIME))
                    return
                conn.settimeout(IDLE_TIMEOUT)
                self._serve_requests(conn)
        except Exception:  # a broken connection must never take the daemon down
            log.exception("control connection failed")
        finally:
            self._slots.release()

    def _serve_requests(self, conn: socket.socket) -> None:
        buffer = LineBuffer(MAX_MESSAGE_SIZE)
        while True:
            try:
                data = conn.recv(65536)
            except (socket.timeout, ConnectionResetError):
                return
            if not data:
                return
            try:
                lines = buffer.feed(data)
            except ProtocolError as exc:
                log.warning("refused an oversized control message: %s", exc)
                self._send_quietly(conn, encode_error(str(exc), exc.exit))
                return
            for line in lines:
                answer, after_send = self._answer(line)
                sent = self._send_quietly(conn, answer)
                if after_send is not None:
                    after_send()
                if not sent:
                    return

    def _answer(self, line: bytes) -> tuple[bytes, Callable[[], None] | None]:
        try:
            cmd, args = decode_request(line)
        except ProtocolError as exc:
            log.warning("refused a malformed control message: %s", exc)
            return encode_error(str(exc), exc.exit), None
        try:
            result, after_send = self.handler(cmd, args)
        except (ProtocolError, CommandFailed) as exc:
            return encode_error(str(exc), exc.exit), None
        except Exception as exc:
            if _is_config_error(exc):
                return encode_error(str(exc), EXIT_USAGE), None
            if isinstance(exc, (ValueError, LookupError, RuntimeError, OSError)):
                log.warning("command %r failed: %s", cmd, exc)  # an operator error: no traceback needed
            else:
                log.exception("command %r failed", cmd)
            return encode_error(str(exc) or type(exc).__name__, EXIT_RUNTIME), None
        return encode_result(result), after_send


def _is_config_error(exc: Exception) -> bool:
    from pmdaemon.config.loader import ConfigError
    return isinstance(exc, ConfigError)


# ---------------------------------------------------------------------------------------------
# The daemon


# Commands answered by the Runtime method of the same name, with no arguments.
_RUNTIME_PASSTHROUGH = frozenset({"lb_status", "lb_health", "lb_health_check_test", "lb_stats", "lb_backends",
                                  "lb_traffic", "lb_config"})


# Runtime method -> the CLI command that needs it, for "not available in this build" answers.
_COMMAND_OF_METHOD = {
    "reload_app": "reload <app|all>", "reload_config": "reload --config", "scale": "scale",
    "lb_health_check_test": "lb health-check --test", "lb_metrics_samples": "lb metrics --json",
    **{f"lb_{name}": f"lb {name}" for name in ("status", "health", "stats", "config", "backends", "traffic",
                                               "metrics", "drain", "enable", "export")},
}


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
            result = self._runtime_call("reload_config", self._load(source))
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
        """Dispatch one control request. Returns (result, after_send)."""
        if cmd == "kill":
            return self._kill(), self.request_stop
        method = getattr(self, f"_cmd_{cmd}", None)
        if method is not None:
            return method(args), None
        if cmd in _RUNTIME_PASSTHROUGH:
            return self._runtime_call(cmd), None
        raise ProtocolError(f"unknown command {cmd!r}; this daemon speaks protocol v1 "
                            f"(see `pmdaemon --help` for the commands)")

    def _runtime_call(self, method_name: str, *args):
        method = getattr(self.runtime, method_name, None)
        if method is None:
            command = _COMMAND_OF_METHOD.get(method_name, method_name)
            raise CommandFailed(f"`pmdaemon {command}` is not available in this build "
                                f"(the runtime has no {method_name} yet)")
        return method(*args)

    def _supervisor(self):
        return self.runtime.supervisor.proxy()

    def _cmd_ping(self, _args: dict) -> dict:
        config = getattr(self.runtime, "config", None)
        return {
            "pid": os.getpid(),
            "home": str(self.paths.home),
            "uptime": round(time.time() - self.started_at, 3),
            "ready": self.ready.is_set(),
            "config": getattr(config, "source", None),
        }

    def _cmd_start(self, args: dict) -> dict:
        return self._apply(self._load(_arg_str(args, "config")))

    def _apply(self, config) -> dict:
        """Apply a config on top of whatever runs: new apps and listeners on new ports start, apps and
        ports already running are left alone (and reported)."""
        rows = self._supervisor().list().get(timeout=ASK_TIMEOUT)
        running_apps = {row["app"] for row in rows}
        before = {row["name"] for row in rows}
        added, left_alone = self.runtime.apply(config)
        rows = self._supervisor().list().get(timeout=ASK_TIMEOUT)
        return {
            "config": config.source,
            "started": [row["name"] for row in rows if row["name"] not in before],
            "unchanged_apps": [app.name for app in config.apps if app.name in running_apps],
            "listeners": [f"{listener.host}:{listener.port}" for listener in added],
            "unchanged_listeners": [f"{listener.host}:{listener.port}" for listener in left_alone],
        }

    @staticmethod
    def _load(path: str):
        from pmdaemon.config.loader import load_config
        return load_config(path)

    def _cmd_list(self, _args: dict) -> list:
        return self._supervisor().list().get(timeout=ASK_TIMEOUT)

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
        return self._runtime_call("reload_app", _arg_str(args, "target"))

    def _cmd_reload_config(self, args: dict) -> object:
        return self._runtime_call("reload_config", self._load(_arg_str(args, "config")))

    def _cmd_scale(self, args: dict) -> object:
        return self._runtime_call("scale", _arg_str(args, "app"), _arg_int(args, "n", minimum=0))

    def _cmd_lb_metrics(self, args: dict) -> object:
        detailed = bool(args.get("detailed", False))
        if args.get("samples"):
            return self._runtime_call("lb_metrics_samples", detailed)
        return self._runtime_call("lb_metrics", detailed)

    def _cmd_lb_drain(self, args: dict) -> object:
        return self._runtime_call("lb_drain", _arg_str(args, "backend"))

    def _cmd_lb_enable(self, args: dict) -> object:
        return self._runtime_call("lb_enable", _arg_str(args, "backend"))

    def _cmd_lb_export(self, args: dict) -> object:
        kind = _arg_str(args, "kind")
        if kind not in ("nginx", "haproxy"):
            raise ProtocolError(f"unknown export format '{kind}'; use nginx or haproxy")
        return self._runtime_call("lb_export", kind)

    def _cmd_lb_monitor(self, _args: dict) -> dict:
        """One frame of `lb monitor`: listeners, totals, traffic shares and backends in one answer."""
        frame: dict = {"time": time.time(), "unavailable": {}}
        for key in ("status", "stats", "traffic", "backends"):
            method = getattr(self.runtime, f"lb_{key}", None)
            try:
                if method is None:
                    raise RuntimeError(f"not available in this build (no Runtime.lb_{key})")
                frame[key] = method()
            except RuntimeError as exc:  # e.g. no load balancer runs: the other parts still show
                frame[key] = None
                frame["unavailable"][key] = str(exc)
        return frame

    def _kill(self) -> dict:
        rows = self._supervisor().list().get(timeout=ASK_TIMEOUT) if self.runtime is not None else []
        return {"pid": os.getpid(), "instances": [row["name"] for row in rows]}


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
