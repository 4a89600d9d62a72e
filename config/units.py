"""Durations and sizes as config files write them, to and from the internal units (seconds, bytes).

A duration is a bare number in the field's own unit (decisions.md section 1: milliseconds for
timeouts and retry delays, seconds for health checks and sessions) or a string with a unit:
"250ms", "30s", "5m", "1h". A size is a number of bytes or a string with a binary suffix, PM2's
`max_memory_restart` style: "200K", "512M", "1G" (1K = 1024 bytes).

Parsers raise ValueError with a message fit to follow a config path ("expected ..."); the caller
adds the path.
"""
from __future__ import annotations

import math
import re

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_UNIT_NAMES = {"ms": "milliseconds", "s": "seconds"}
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value: object, bare_unit: str) -> float:
    """Seconds from a number in `bare_unit` ("ms" or "s") or a string such as "250ms" or "5m"."""
    if _is_number(value):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a duration of 0 or more, got {value!r}")
        return float(value) * DURATION_UNITS[bare_unit]
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * DURATION_UNITS[match.group(2)]
        if re.match(r"^\s*\d+(\.\d+)?\s*$", value):
            raise ValueError(
                f"the duration {value!r} has no unit; write a number ({value.strip()} means "
                f"{value.strip()}{bare_unit}) or a string with a unit such as '{value.strip()}{bare_unit}'"
            )
    raise ValueError(
        f"expected a duration (a number of {_UNIT_NAMES[bare_unit]} or a string such as "
        f"'250ms', '30s', '5m', '1h'), got {value!r}"
    )


def format_duration(seconds: float, unit: str) -> str:
    """'5000ms' or '30s': `seconds` written in `unit`, without a trailing '.0'."""
    amount = seconds / DURATION_UNITS[unit]
    rounded = round(amount, 6)
    if rounded == int(rounded):
        return f"{int(rounded)}{unit}"
    return f"{rounded:g}{unit}"


def parse_size(value: object) -> int:
    """Bytes from a number of bytes or a string such as '200K', '512M', '1G' (binary multiples)."""
    if _is_number(value):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a size of 0 or more bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    raise ValueError(f"expected a size (a number of bytes or a string such as '200K', '512M', '1G'), got {value!r}")


def format_size(size: int) -> str:
    """The shortest exact form: 536870912 -> '512M', 1000 -> '1000'."""
    for suffix in ("T", "G", "M", "K"):
        multiple = SIZE_UNITS[suffix]
        if size and size % multiple == 0:
            return f"{size // multiple}{suffix}"
    return str(size)
