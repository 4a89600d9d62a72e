"""The control protocol between the `pmdaemon` CLI and its daemon, plus a small blocking client.

Theory of operation. The CLI and the daemon talk over a Unix stream socket
(`$PMDAEMON_HOME/run/control.sock`) in JSON lines: every message is one UTF-8 JSON object on one
line, terminated by `\\n`, at most `MAX_MESSAGE_SIZE` bytes including the newline.

    request   {"v": 1, "cmd": "list", "args": {}}
    success   {"v": 1, "ok": true, "result": <any JSON>}
    failure   {"v": 1, "ok": false, "error": "<what is wrong and how to fix it>", "exit": 1 | 2}

`exit` is the status the CLI exits with (cli.md: 1 a runtime failure, 2 a usage or config error).
A request whose `v` is not `PROTOCOL_VERSION` is answered with a failure naming both versions, so a
CLI and a daemon from different builds fail loudly instead of misreading each other. A peer may
send several requests on one connection; each gets exactly one answer, in order.

The framing (`LineBuffer`) and the encoding/decoding functions are sans-I/O: bytes in, messages or
`ProtocolError` out. Only `ControlClient` touches a socket.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

PROTOCOL_VERSION = 1
MAX_MESSAGE_SIZE = 1024 * 1024  # bytes, newline included; larger messages are refused, not buffered

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class ProtocolError(Exception):
    """A malformed, oversized or wrong-version message. `exit` is the CLI exit status it maps to."""

    def __init__(self, message: str, exit: int = EXIT_USAGE):
        super().__init__(message)
        self.exit = exit


class CommandFailed(Exception):
    """The daemon answered a request with `ok: false` (or could not be reached)."""

    def __init__(self, message: str, exit: int = EXIT_RUNTIME):
        super().__init__(message)
        self.exit = exit


class DaemonNotRunning(CommandFailed):
    """No daemon listens on the control socket of this PMDAEMON_HOME."""


def _dumps(obj: object) -> bytes:
    # default=str: results may carry Paths or other plain values the runtime did not stringify.
    line = json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False).encode()
    if len(line) + 1 > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message of {len(line) + 1} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit",
                            EXIT_RUNTIME)
    return line + b"\n"


def encode_request(cmd: str, args: dict | None = None) -> bytes:
    return _dumps({"v": PROTOCOL_VERSION, "cmd": cmd, "args": args or {}})


def encode_result(result: object) -> bytes:
    try:
        return _dumps({"v": PROTOCOL_VERSION, "ok": True, "result": result})
    except ProtocolError as exc:
        return encode_error(f"the answer is too large to send: {exc}", EXIT_RUNTIME)


def encode_error(message: str, exit: int = EXIT_RUNTIME) -> bytes:
    return _dumps({"v": PROTOCOL_VERSION, "ok": False, "error": message, "exit": exit})


def _decode_object(line: bytes) -> dict:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed message (not a JSON object on one line): {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"malformed message: expected a JSON object, got {type(message).__name__}")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this build speaks "
                            f"v{PROTOCOL_VERSION}); use the pmdaemon that started the daemon, or "
                            f"`pmdaemon kill` and start it again")
    return message


def decode_request(line: bytes) -> tuple[str, dict]:
    """One request line -> (cmd, args). Raises ProtocolError."""
    message = _decode_object(line)
    cmd, args = message.get("cmd"), message.get("args", {})
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("malformed request: 'cmd' must be a non-empty string")
    if not isinstance(args, dict):
        raise ProtocolError("malformed request: 'args' must be a JSON object")
    return cmd, args


def decode_response(line: bytes) -> object:
    """One response line -> its result. Raises CommandFailed for `ok: false`, ProtocolError if malformed."""
    message = _decode_object(line)
    if message.get("ok") is True:
        return message.get("result")
    if message.get("ok") is False:
        exit_status = message.get("exit")
        raise CommandFailed(str(message.get("error", "unknown error")),
                            exit_status if exit_status in (EXIT_RUNTIME, EXIT_USAGE) else EXIT_RUNTIME)
    raise ProtocolError("malformed response: 'ok' must be true or false", EXIT_RUNTIME)


class LineBuffer:
    """Splits a byte stream into lines, refusing any line longer than `limit` bytes.

    `feed()` returns the complete lines received so far (without their newline). Once a line grows
    past the limit without a newline, `feed()` raises ProtocolError; the buffer is then unusable,
    since there is no way to find the start of the next message without reading the oversized one.
    """

    def __init__(self, limit: int = MAX_MESSAGE_SIZE):
        self.limit = limit
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        lines = []
        while (end := self._pending.find(b"\n")) >= 0:
            if end + 1 > self.limit:
                break
            lines.append(bytes(self._pending[:end]))
            del self._pending[:end + 1]
        if len(self._pending) >= self.limit:
            raise ProtocolError(f"message exceeds the {self.limit}-byte limit")
        return lines

    @property
    def pending(self) -> int:
        """Bytes received after the last complete line."""
        return len(self._pending)


def socket_path(home: Path) -> Path:
    return Path(home) / "run" / "control.sock"


class ControlClient:
    """Blocking client: one connection per call, one request, one answer."""

    def __init__(self, home: Path, timeout: float = 30.0):
        self.home = Path(home)
        self.path = socket_path(self.home)
        self.timeout = timeout

    def call(self, cmd: str, args: dict | None = None, timeout: float | None = None) -> object:
        """Send one request and return its result. Raises CommandFailed / DaemonNotRunning."""
        request = encode_request(cmd, args)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout if timeout is None else timeout)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonNotRunning(f"no pmdaemon daemon is running for PMDAEMON_HOME={self.home}; "
                                       f"start one with `pmdaemon start <config>`") from None
            except PermissionError as exc:
                raise CommandFailed(f"cannot reach the daemon at {self.path}: {exc.strerror}; "
                                    f"the daemon only accepts its own user") from None
            except OSError as exc:
                raise CommandFailed(f"cannot reach the daemon at {self.path}: {exc.strerror or exc}") from None
            try:
                sock.sendall(request)
                return decode_response(self._read_line(sock))
            except TimeoutError:
                raise CommandFailed(f"the daemon did not answer '{cmd}' within "
                                    f"{sock.gettimeout():g} s; see {self.home / 'daemon.log'}") from None
            except (ConnectionResetError, BrokenPipeError):
                raise CommandFailed(f"the daemon closed the connection during '{cmd}'; "
                                    f"see {self.home / 'daemon.log'}") from None

    def _read_line(self, sock: socket.socket) -> bytes:
        buffer = LineBuffer()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError
            try:
                lines = buffer.feed(data)
            except ProtocolError as exc:
                raise CommandFailed(f"the daemon's answer is unreadable: {exc}") from None
            if lines:
                return lines[0]
