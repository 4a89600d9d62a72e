"""The alert condition grammar: `<metric> <op> <number>[%|ms|s]`, e.g. "error_rate > 5%".

Thresholds are stored in the unit the metrics are computed in:
- `error_rate` is a percentage: "5%" and "5" both mean five percent (5.0).
- `*_response_time` are seconds, and the threshold must carry its unit so "200" cannot be misread:
  "200ms" -> 0.2, "1.5s" -> 1.5.
- every other metric is a plain count or rate and takes a bare number.
"""
from __future__ import annotations

import difflib
import re

PERCENT_METRICS = ("error_rate",)
TIME_METRICS = ("p50_response_time", "p95_response_time", "p99_response_time")
COUNT_METRICS = (
    "healthy_backends",
    "unhealthy_backends",
    "requests_per_second",
    "active_connections",
    "open_circuits",
)
METRICS = PERCENT_METRICS + TIME_METRICS + COUNT_METRICS
OPERATORS = ("<=", ">=", "==", "!=", "<", ">")

_CONDITION = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>[<>=!]{1,2})\s*"
    r"(?P<number>-?(?:\d+(?:\.\d+)?|\.\d+))\s*(?P<unit>%|ms|s)?\s*$"
)


def parse_condition(text: str) -> tuple[str, str, float]:
    """(metric, op, threshold) from a condition; ValueError saying what is wrong and how to write it."""
    if not isinstance(text, str):
        raise ValueError(f"expected a condition string such as 'error_rate > 5%', got {text!r}")
    match = _CONDITION.match(text)
    if not match:
        raise ValueError(
            f"cannot read condition {text!r}; write '<metric> <op> <number>[%|ms|s]', "
            "e.g. 'error_rate > 5%' or 'p95_response_time > 200ms'"
        )
    metric, op, unit = match["metric"], match["op"], match["unit"]
    number = float(match["number"])
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "known metrics: " + ", ".join(METRICS)
        raise ValueError(f"unknown metric '{metric}' in {text!r}; {hint}")
    if op not in OPERATORS:
        raise ValueError(f"unknown operator '{op}' in {text!r}; use one of " + " ".join(OPERATORS))
    if metric in PERCENT_METRICS:
        if unit not in (None, "%"):
            raise ValueError(f"{metric} is a percentage; write e.g. '{metric} {op} 5%', not {unit!r}")
        return metric, op, number
    if metric in TIME_METRICS:
        if unit == "ms":
            return metric, op, number / 1000.0
        if unit == "s":
            return metric, op, number
        raise ValueError(
            f"{metric} needs a unit: write '{metric} {op} {match['number']}ms' or "
            f"'{metric} {op} {match['number']}s'"
        )
    if unit is not None:
        raise ValueError(f"{metric} is a plain number; drop the {unit!r} (e.g. '{metric} {op} {match['number']}')")
    return metric, op, number
