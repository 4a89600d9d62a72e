"""Human-readable tables for the CLI: aligned columns, states in colour on a terminal.

Colour is used for state words only (online, up, errored, down, ...), and only when the output is
a terminal and `NO_COLOR` is not set (https://no-color.org). Widths are computed on the plain text,
so escape codes never break the alignment.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

from pmdaemon.states import AlertState, BackendState, BreakerState, InstanceStatus

_RESET = "\x1b[0m"
# Besides the states: the check results "pass", "fail" and "failed", and half_open spelt "half-open".
_STATE_COLOURS = {
    "\x1b[32m": (InstanceStatus.ONLINE, BackendState.UP, AlertState.OK, BreakerState.CLOSED, "pass"),  # green
    "\x1b[33m": (InstanceStatus.LAUNCHING, InstanceStatus.STOPPING, InstanceStatus.WAITING_RESTART,
                 BackendState.DRAINING, BackendState.HALF_OPEN, "half-open"),  # yellow
    "\x1b[31m": (InstanceStatus.ERRORED, BackendState.DOWN, BackendState.OPEN, "fail", "failed"),  # red
    "\x1b[2m": (InstanceStatus.STOPPED,),  # dim
}
STATE_COLOUR = {state: code for code, states in _STATE_COLOURS.items() for state in states}


def use_colour(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Colour only on a terminal and only while NO_COLOR is unset."""
    return "NO_COLOR" not in environ and stream.isatty()


def colour_state(text: str, colour: bool) -> str:
    code = STATE_COLOUR.get(text.lower()) if colour else None
    return f"{code}{text}{_RESET}" if code else text


@dataclass(frozen=True)
class Column:
    title: str
    key: str
    align: str = "left"  # "left" or "right"
    state: bool = False  # the values are state words: coloured on a terminal
    format: Callable[[object], str] | None = None  # value -> text; None values print as "-"


def _cell(column: Column, row: Mapping) -> str:
    value = row.get(column.key)
    if value is None:
        return "-"
    if column.format is not None:
        return column.format(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render_table(columns: Iterable[Column], rows: Iterable[Mapping], colour: bool = False,
                 empty: str = "(none)") -> str:
    """Rows of dicts -> an aligned text table with a header line; `empty` when there are no rows."""
    columns = list(columns)
    cells = [[_cell(column, row) for column in columns] for row in rows]
    if not cells:
        return empty
    widths = [max([len(column.title)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]

    def line(texts: list[str], colourise: bool) -> str:
        parts = []
        for column, width, text in zip(columns, widths, texts):
            padding = " " * (width - len(text))
            shown = colour_state(text, colour) if colourise and column.state else text
            parts.append(padding + shown if column.align == "right" else shown + padding)
        return "  ".join(parts).rstrip()

    header = line([column.title for column in columns], colourise=False)
    return "\n".join([header] + [line(texts, colourise=True) for texts in cells])


def render_pairs(pairs: Iterable[tuple[str, object]]) -> str:
    """`key  value` lines with the values aligned, for single objects such as totals."""
    pairs = [(key, "-" if value is None else str(value)) for key, value in pairs]
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in pairs)


def format_duration(seconds: object) -> str:
    """3725 -> '1h 2m'; 42 -> '42s'. The two largest units are enough to read an uptime."""
    total = int(float(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in units if n][:2]
    return " ".join(shown) or "0s"


def format_bytes(count: object) -> str:
    value = float(count)
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def format_percent(value: object) -> str:
    return f"{float(value):.1f}%"


def format_ago(timestamp: object) -> str:
    """A wall-clock timestamp (time.time()) as '3s ago'."""
    return f"{format_duration(max(0.0, time.time() - float(timestamp)))} ago"


def format_ms(value: object) -> str:
    return f"{float(value):.1f} ms"


class MonitorView:
    """Renders the frames of `pmdaemon lb monitor`: rates, latency, each backend's share and state.

    A frame is the daemon's `lb_monitor` answer ({"time", "status", "stats", "traffic",
    "backends", "unavailable"}; a part the runtime cannot give is null and "unavailable" says why).
    Requests per second are the change in the request total between two frames, so the view keeps
    the previous frame; the first frame shows the daemon's own recent rate.
    """

    def __init__(self, interval: float):
        self.interval = interval
        self._previous: dict | None = None

    def render(self, frame: dict, colour: bool) -> str:
        stats = frame.get("stats") or {}
        listeners = frame.get("status")
        backends = frame.get("backends")
        lines = [f"pmdaemon lb monitor  {time.strftime('%H:%M:%S', time.localtime(frame.get('time')))}  "
                 f"(every {self.interval:g} s, Ctrl-C to quit)", ""]
        latency = stats.get("latency_ms") or {}
        lines.append(render_pairs([
            ("requests/s", f"{self._requests_per_second(frame):.1f}"),
            ("requests", stats.get("requests")),
            ("errors", stats.get("errors")),
            ("latency", "  ".join(f"{q} {format_ms(latency[q])}" for q in ("p50", "p95", "p99") if q in latency)
             or None),
        ]))
        lines.append("")
        unavailable = frame.get("unavailable") or {}
        if listeners is None:
            lines.append(f"listeners: {unavailable.get('status', 'not available')}")
        else:
            lines.append(render_table(_MONITOR_LISTENER_COLUMNS, listeners, colour, empty="no listeners"))
        lines.append("")
        if backends is None:
            lines.append(f"backends: {unavailable.get('backends', 'not available')}")
        else:
            shares = {row.get("address"): row for row in frame.get("traffic") or []}
            rows = [dict(backend, **_share_columns(shares.get(backend.get("address"), {}))) for backend in backends]
            lines.append(render_table(_MONITOR_BACKEND_COLUMNS, rows, colour, empty="no backends"))
        self._previous = frame
        return "\n".join(lines)

    def _requests_per_second(self, frame: dict) -> float:
        previous = self._previous
        now_total = (frame.get("stats") or {}).get("requests")
        if previous is not None and now_total is not None:
            before_total = (previous.get("stats") or {}).get("requests")
            elapsed = frame.get("time", 0) - previous.get("time", 0)
            if before_total is not None and elapsed > 0:
                return max(0.0, (now_total - before_total) / elapsed)
        recent = (frame.get("stats") or {}).get("requests_per_second")
        if recent is not None:
            return float(recent)
        return float(sum(row.get("requests_per_second") or 0 for row in frame.get("status") or []))


def _share_columns(traffic_row: Mapping) -> dict:
    """The two traffic shares (percentages) a backend row shows."""
    return {"share_minute": traffic_row.get("share_last_minute"), "share_total": traffic_row.get("share_total")}


_MONITOR_LISTENER_COLUMNS = [
    Column("port", "port", align="right"),
    Column("type", "type"),
    Column("strategy", "strategy"),
    Column("up", "backends_up", align="right"),
    Column("total", "backends_total", align="right"),
    Column("req/s", "requests_per_second", align="right"),
]
_MONITOR_BACKEND_COLUMNS = [
    Column("backend", "address"),
    Column("instance", "instance"),
    Column("state", "state", state=True),
    Column("active", "active", align="right"),
    Column("share 1m", "share_minute", align="right", format=format_percent),
    Column("share all", "share_total", align="right", format=format_percent),
]
