"""The control socket server: accepts the CLI's connections and answers each request with a handler.

The daemon (control/daemon.py) owns what the commands do; this module owns how they arrive. One
selectors thread accepts on the Unix socket; each connection is served on its own short-lived
thread (at most `MAX_CONNECTIONS` at once, more are answered "busy"), never on the data-plane I/O
loop. A connection from another uid (SO_PEERCRED) is refused. Requests are framed and decoded by
control/protocol.py; garbage, oversized or wrong-version messages get an error answer and never stop
the daemon, and neither does a handler that raises.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pmdaemon.control.protocol import (
    EXIT_RUNTIME,
    EXIT_USAGE,
    MAX_MESSAGE_SIZE,
    CommandFailed,
    LineBuffer,
    ProtocolError,
    decode_request,
    encode_error,
    encode_result,
)

log = logging.getLogger("pmdaemon.daemon")  # one logger name for every line the daemon writes

MAX_CONNECTIONS = 32  # concurrent control connections; more are answered "busy" and closed
IDLE_TIMEOUT = 30.0  # seconds a control connection may stay silent before it is closed
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL


class AlreadyRunning(Exception):
    """Another daemon holds this home's lock (or, without the lock, still answers on its socket)."""


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


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
            except (TimeoutError, ConnectionResetError):
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
