"""statsd lines and UDP payloads, sans-I/O: the actor only sends the bytes this module returns.

Naming: `<prefix><listener>.<metric>[.<label value>...]` for a listener's series and
`<prefix><metric>[.<label value>...]` for the others, where <metric> is the Prometheus family name
without `pmdaemon_` and `_total`, e.g. `pmdaemon.8080.requests.2xx`, `pmdaemon.8080.errors.connect`,
`pmdaemon.8080.backend_up.127_0_0_1_3000.web-0`, `pmdaemon.instance_cpu_percent.web-0`. Characters
statsd or Graphite give a meaning to (`.` `:` `|` `@` spaces, ...) inside a label value become `_`.

Counters go out as the increase since the previous flush (`|c`, zero increases left out), gauges as
their value (`|g`), response times as timings in milliseconds (`|ms`) from a bounded random sample
with its sample rate (`|@0.25`), so statsd scales the count back up and its percentiles stay fair
without one line per request. Histogram families are not sent: the timings replace them.

Payloads are lines joined by "\\n", each at most 1432 bytes (a 1500-byte Ethernet MTU minus IP and
UDP headers, with room for IP options), so no datagram is fragmented.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable

from pmdaemon.control.metrics import Family

MAX_PAYLOAD = 1432
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def normalize_prefix(prefix: str) -> str:
    """"pmdaemon" and "pmdaemon." both give "pmdaemon."; "" stays "" (no prefix)."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def name_part(text: str) -> str:
    return _UNSAFE.sub("_", text)


def counter_line(name: str, delta: int | float) -> str:
    return f"{name}:{_number(delta)}|c"


def gauge_lines(name: str, value: int | float) -> list[str]:
    """A gauge; a negative one is set to 0 first because a leading '-' means 'decrement by'."""
    if value < 0:
        return [f"{name}:0|g", f"{name}:{_number(value)}|g"]
    return [f"{name}:{_number(value)}|g"]


def timing_line(name: str, milliseconds: float, rate: float = 1.0) -> str:
    line = f"{name}:{_number(round(milliseconds, 3))}|ms"
    return line if rate >= 1.0 else f"{line}|@{rate:.6g}"


def pack(lines: Iterable[str], limit: int = MAX_PAYLOAD) -> list[bytes]:
    """Newline-joined payloads of at most `limit` bytes; a single line longer than that is dropped."""
    payloads: list[bytes] = []
    current = bytearray()
    for line in lines:
        data = line.encode()
        if len(data) > limit:
            continue
        if current and len(current) + 1 + len(data) > limit:
            payloads.append(bytes(current))
            current.clear()
        if current:
            current += b"\n"
        current += data
    if current:
        payloads.append(bytes(current))
    return payloads


def _number(value: int | float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class TimingSample:
    """A uniform random sample of at most `capacity` values since the last `take()` (Algorithm R)."""

    def __init__(self, capacity: int = 100, rng: random.Random | None = None) -> None:
        self.capacity = capacity
        self._rng = rng or random.Random()
        self._values: list[float] = []
        self._seen = 0

    def offer(self, value: float) -> None:
        self._seen += 1
        if len(self._values) < self.capacity:
            self._values.append(value)
            return
        slot = self._rng.randrange(self._seen)
        if slot < self.capacity:
            self._values[slot] = value

    def take(self) -> tuple[list[float], float]:
        """(sampled values, sample rate) and start over."""
        values, seen = self._values, self._seen
        self._values, self._seen = [], 0
        return values, (len(values) / seen if seen else 1.0)


class StatsdEncoder:
    """Encodes metric families for one statsd target; remembers counters to send increases."""

    def __init__(self, prefix: str) -> None:
        self.prefix = normalize_prefix(prefix)
        self._last_counters: dict[str, float] = {}

    def encode(self, families: Iterable[Family], timings: dict[str, tuple[list[float], float]]) -> list[bytes]:
        """Payloads for `families` plus response time samples (seconds) keyed by listener label."""
        lines: list[str] = []
        for family in families:
            if family.kind == "histogram":
                continue
            base = family.name.removeprefix("pmdaemon_")
            if family.kind == "counter":
                base = base.removesuffix("_total")
            for sample in family.samples:
                name = self._name(base, sample.labels)
                if family.kind == "counter":
                    delta = sample.value - self._last_counters.get(name, 0)
                    if delta < 0:  # the series started over (its listener was removed and re-added)
                        delta = sample.value
                    self._last_counters[name] = sample.value
                    if delta:
                        lines.append(counter_line(name, delta))
                else:
                    lines.extend(gauge_lines(name, sample.value))
        for listener, (values, rate) in timings.items():
            name = f"{self.prefix}{name_part(listener)}.response_time"
            lines.extend(timing_line(name, seconds * 1000.0, rate) for seconds in values)
        return pack(lines)

    def _name(self, base: str, labels: tuple[tuple[str, str], ...]) -> str:
        parts = [name_part(v) for k, v in labels if k != "listener" and v != ""]
        listener = next((v for k, v in labels if k == "listener"), None)
        head = f"{self.prefix}{name_part(listener)}.{base}" if listener is not None else f"{self.prefix}{base}"
        return ".".join([head, *parts])
