"""The log files of the supervisor's instances: `<home>/logs/<instance>-out.log` and `-error.log`.

Each instance's stdout and stderr are appended to its two files across restarts (PM2's layout). The
supervisor also writes its own lines about an instance (why it was not started, killed or restarted)
into the error log, where the operator looks first. `pmdaemon logs` reads the last lines back; the
files grow without bound, so they are read backwards from the end.
"""
from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path


class InstanceLogs:
    """The log directory of one home."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def paths(self, name: str) -> tuple[Path, Path]:
        """(stdout log, stderr log) of instance `name`."""
        return self.directory / f"{name}-out.log", self.directory / f"{name}-error.log"

    def note(self, name: str, text: str) -> None:
        """Append a supervisor line to the instance's error log."""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with open(self.paths(name)[1], "a", encoding="utf-8") as err:
            err.write(f"[pmdaemon {stamp}] {name}: {text}\n")

    def last_lines(self, name: str, lines: int) -> dict:
        """{out, err, out_path, err_path}: the last `lines` lines of each of the instance's logs."""
        out_path, err_path = self.paths(name)
        return {"out": _tail(out_path, lines), "err": _tail(err_path, lines),
                "out_path": str(out_path), "err_path": str(err_path)}


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a file, read backwards in blocks."""
    if lines <= 0 or not path.exists():
        return ""
    with open(path, "rb") as log_file:
        position = log_file.seek(0, os.SEEK_END)
        data = b""
        while position > 0 and data.count(b"\n") <= lines:
            step = min(65536, position)
            position -= step
            log_file.seek(position)
            data = log_file.read(step) + data
    kept = data.decode("utf-8", errors="replace").splitlines(keepends=True)[-lines:]
    return "".join(kept)
