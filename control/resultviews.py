"""How the CLI shows the daemon's answers as text: the columns of each table, and plain views of the rest.

`--json` prints an answer as it came; without it, lists of rows become tables (control/tables.py
renders them) with the columns below, chosen among the fields the rows have, and nested results
become `key.subkey  value` lines. The daemon may add fields without breaking a table: a column is
shown only when its field is present, and a result with none of the known fields still prints, one
column per key.
"""
from __future__ import annotations

import json

from pmdaemon.control.tables import (
    Column,
    format_ago,
    format_bytes,
    format_duration,
    format_ms,
    format_percent,
    render_pairs,
    render_table,
)


def scalar(value: object) -> str:
    """A cell or value as text: nested data as compact JSON, floats with two decimals."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def flatten(obj: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{"apps": {"started": ["web"]}} -> [("apps.started", "web")] for key/value output."""
    pairs = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            pairs.extend(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, dict)) and not value:
            pairs.append((name, "-"))
        elif isinstance(value, (list, tuple)) and not any(isinstance(item, (dict, list)) for item in value):
            pairs.append((name, ", ".join(scalar(item) for item in value)))
        else:
            pairs.append((name, scalar(value)))
    return pairs


def result_table(rows: list[dict], preferred: list[Column], colour: bool) -> str:
    """The preferred columns the rows have (--json shows every field); without any, every key."""
    present = {key for row in rows for key in row}
    columns = [column for column in preferred if column.key in present]
    if not columns:
        columns = [Column(key, key, format=scalar) for key in dict.fromkeys(k for row in rows for k in row)]
    return render_table(columns or preferred, rows, colour)


INSTANCE_COLUMNS = [
    Column("name", "name"),
    Column("app", "app"),
    Column("status", "status", state=True),
    Column("pid", "pid", align="right"),
    Column("port", "port", align="right"),
    Column("uptime", "uptime", align="right", format=format_duration),
    Column("restarts", "restarts", align="right"),
    Column("cpu", "cpu", align="right", format=format_percent),
    Column("memory", "memory", align="right", format=format_bytes),
]
LISTENER_COLUMNS = [
    Column("host", "host"),
    Column("port", "port", align="right"),
    Column("type", "type"),
    Column("strategy", "strategy"),
    Column("tls", "tls"),
    Column("up", "backends_up", align="right"),
    Column("total", "backends_total", align="right"),
    Column("active", "active", align="right"),
    Column("req/s", "requests_per_second", align="right"),
]
BACKEND_COLUMNS = [
    Column("address", "address"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("state", "state", state=True),
    Column("weight", "weight", align="right"),
    Column("score", "score", align="right"),  # performance_based listeners only
    Column("active", "active", align="right"),
    Column("breaker", "breaker", state=True),
    Column("requests", "requests", align="right"),
    Column("req/s", "requests_per_second", align="right"),
]
HEALTH_COLUMNS = [
    Column("backend", "backend"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("state", "state", state=True),
    Column("last check", "last_check", align="right", format=format_ago),
    Column("failures", "consecutive_failures", align="right"),
    Column("check", "check"),
    Column("last error", "last_error"),
]
HEALTH_TEST_COLUMNS = [
    Column("backend", "backend"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("result", "result", state=True),
    Column("check", "check"),
    Column("error", "error"),
]
TRAFFIC_COLUMNS = [
    Column("address", "address"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("requests 1m", "requests_last_minute", align="right"),
    Column("share 1m", "share_last_minute", align="right", format=format_percent),
    Column("requests", "requests_total", align="right"),
    Column("share", "share_total", align="right", format=format_percent),
]
REGION_TRAFFIC_COLUMNS = [
    Column("client region", "client_region"),
    Column("listener", "listener", align="right"),
    Column("requests 1m", "requests_last_minute", align="right"),
    Column("share 1m", "share_last_minute", align="right", format=format_percent),
    Column("requests", "requests_total", align="right"),
    Column("share", "share_total", align="right", format=format_percent),
]
STATS_LISTENER_COLUMNS = [
    Column("port", "port", align="right"),
    Column("type", "type"),
    Column("requests", "requests", align="right"),
    Column("errors", "errors", align="right"),
    Column("p50", "p50", align="right", format=format_ms),
    Column("p95", "p95", align="right", format=format_ms),
    Column("p99", "p99", align="right", format=format_ms),
    Column("req/s", "requests_per_second", align="right"),
]
DRAIN_COLUMNS = [
    Column("address", "address"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("state", "state", state=True),
]


def render_stats(stats: dict, colour: bool) -> str:
    """Totals as key/value lines, then one row per listener."""
    responses = stats.get("responses") or {}
    latency = stats.get("latency_ms") or {}
    errors_by_kind = {kind: n for kind, n in (stats.get("errors_by_kind") or {}).items() if n}
    errors = stats.get("errors")
    if errors_by_kind:
        errors = f"{errors} ({', '.join(f'{kind} {n}' for kind, n in errors_by_kind.items())})"
    pairs = [
        ("requests", stats.get("requests")),
        ("responses", "  ".join(f"{cls} {n}" for cls, n in responses.items()) or None),
        ("errors", errors),
        ("bytes in/out", f"{format_bytes(stats.get('bytes_in') or 0)} / {format_bytes(stats.get('bytes_out') or 0)}"),
        ("latency", "  ".join(f"{q} {format_ms(latency[q])}" for q in ("p50", "p95", "p99")
                              if latency.get(q) is not None) or None),
        ("requests/s", None if stats.get("requests_per_second") is None else f"{stats['requests_per_second']:.2f}"),
        ("active connections", stats.get("active_connections")),
    ]
    listeners = [dict(row, **(row.get("latency_ms") or {})) for row in stats.get("listeners") or []]
    text = render_pairs(pairs)
    if listeners:
        text += "\n\n" + render_table(STATS_LISTENER_COLUMNS, listeners, colour)
    return text
