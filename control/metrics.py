"""The load balancer's metric roll-ups and their exposition (Prometheus text 0.0.4, JSON samples).

Sans-I/O: `LoadBalancerMetrics` is fed `Outcome` batches, gauges and backend states, always with an
explicit `now` (seconds on a monotonic clock), and answers queries. It owns no thread, socket or
clock; `actors/metrics.py` is the actor around it. Memory is fixed per listener and backend: latency
goes into fixed-bucket histograms (quantiles are estimated from the buckets) and recent traffic into
a ring of one-second slots, never a list per request.

Series. `listener` is the listener's port ("8080"), `backend` "host:port", `instance` the managed
instance name ("" for an external port). Each listener's `monitoring.metrics` switches (absent =
on) choose which of its families are exported; `detailed` adds the per-backend and per-status ones.

  requests_per_second
    pmdaemon_requests_total{listener,code_class}       counter  requests (HTTP) or connections (TCP)
                                                                finished; code_class 1xx..5xx, or
                                                                "none" (TCP, or no response sent)
    pmdaemon_requests_per_second{listener}             gauge    over the last 10 s
    pmdaemon_bytes_in_total{listener}                  counter  bytes received from clients
    pmdaemon_bytes_out_total{listener}                 counter  bytes sent to clients
    detailed: pmdaemon_backend_requests_total{listener,backend,instance,code_class}   counter
              pmdaemon_responses_total{listener,code}  counter  by exact status code
  response_times
    pmdaemon_response_time_seconds{listener}           histogram  request head in -> response head
                                                                out (TCP: connection duration)
  error_rates
    pmdaemon_errors_total{listener,kind}               counter  kind: connect, timeout, reset,
                                                                invalid_response, lb_4xx, lb_5xx,
                                                                rate_limited, breaker_open, no_backend
  backend_health
    pmdaemon_backend_up{listener,backend,instance}     gauge    1 = healthy (up, half-open or draining)
    pmdaemon_backend_circuit_state{listener,backend,instance}  gauge  0 closed, 1 half-open, 2 open
    pmdaemon_backends_healthy{listener}                gauge
  connection_counts
    pmdaemon_active_connections{listener}              gauge    open client connections
    detailed: pmdaemon_backend_active_requests{listener,backend,instance}  gauge  in flight
  (whatever the switches, for the running instances of apps with `monitoring.metrics_collection`,
   sampled by the supervisor every 5 s: actors/supervisor.py InstanceUsage)
    pmdaemon_instance_cpu_percent{instance}            gauge
    pmdaemon_instance_memory_bytes{instance}           gauge    resident set size

Per-backend request counts are a family of their own instead of an optional `backend` label on
pmdaemon_requests_total, so that `sum(pmdaemon_requests_total)` never counts a request twice.

State is keyed by listener port and backend address, not by index, so a config reload that keeps a
listener keeps its counters (they never go down); a listener or backend that left the config
takes its series with it.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.snapshot import Outcome
from pmdaemon.states import BackendState, ErrorKind

# Upper bounds (seconds) of the latency buckets; a last, implicit bucket holds everything slower.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0,
)
# The error kinds counted per backend, in the order `lb stats` lists them; a client that went away or
# stalled (CLIENT_CLOSED, CLIENT_TIMEOUT) is no error of the service.
ERROR_KINDS = (
    ErrorKind.CONNECT, ErrorKind.TIMEOUT, ErrorKind.RESET, ErrorKind.INVALID_RESPONSE, ErrorKind.LB_4XX,
    ErrorKind.LB_5XX, ErrorKind.RATE_LIMITED, ErrorKind.BREAKER_OPEN, ErrorKind.NO_BACKEND,
)
# Refusals of a client's own request: they are counted as errors but are not the service failing,
# so they stay out of `error_rate`.
CLIENT_ERROR_KINDS = frozenset({ErrorKind.LB_4XX, ErrorKind.RATE_LIMITED})
CODE_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")  # index = status // 100, 0 = no status
RATE_WINDOW = 10  # seconds behind requests_per_second
RECENT_WINDOW = 60  # seconds behind traffic shares, error_rate and the response time quantiles
HEALTHY_STATES = frozenset({BackendState.UP, BackendState.HALF_OPEN, BackendState.DRAINING})
CIRCUIT_STATE = {BackendState.OPEN: 2, BackendState.HALF_OPEN: 1}  # anything else: closed (0)


class LatencyHistogram:
    """Counts per fixed bucket plus sum, count, min and max; quantiles are estimated from buckets.

    The estimate interpolates linearly inside the bucket holding the rank (as Prometheus'
    histogram_quantile does), then is clamped to the observed min and max, so a service answering
    in a steady 1.2 ms reports ~1.2 ms rather than the middle of the 1-2.5 ms bucket.
    """

    __slots__ = ("counts", "sum", "count", "min", "max")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.min = float("inf")
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """Estimated q-quantile (0 < q <= 1) in seconds; 0.0 when nothing was observed."""
        if not self.count:
            return 0.0
        rank = q * self.count
        below = 0
        for i, n in enumerate(self.counts):
            if n and below + n >= rank:
                lower = LATENCY_BUCKETS[i - 1] if i else 0.0
                upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else self.max
                estimate = lower + (upper - lower) * (rank - below) / n
                return min(max(estimate, self.min), self.max)
            below += n
        return self.max

    def cumulative(self) -> list[tuple[str, int]]:
        """(le label, cumulative count) per bucket, "+Inf" last, as the exposition format wants."""
        out, running = [], 0
        for bound, n in zip(LATENCY_BUCKETS + (float("inf"),), self.counts):
            running += n
            out.append((_format_number(bound), running))
        return out


# ---------------------------------------------------------------- exposition


class Sample(NamedTuple):
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass
class Family:
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    samples: list[Sample] = field(default_factory=list)

    def add(self, labels: tuple[tuple[str, str], ...], value: float, suffix: str = "") -> None:
        self.samples.append(Sample(self.name + suffix, labels, value))


def render_prometheus(families: Iterable[Family]) -> str:
    """Prometheus text exposition format 0.0.4; families without samples are left out."""
    lines = []
    for family in families:
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels)
                lines.append(f"{sample.name}{{{labels}}} {_format_number(sample.value)}")
            else:
                lines.append(f"{sample.name} {_format_number(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""


def json_samples(families: Iterable[Family]) -> list[dict]:
    """The same samples as `render_prometheus`, as `{"name", "labels", "value"}` objects."""
    return [
        {"name": s.name, "labels": dict(s.labels), "value": s.value}
        for family in families
        for s in family.samples
    ]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    if value != value:
        return "NaN"
    return repr(float(value))


# ---------------------------------------------------------------- roll-ups


class _Second:
    """One second of recent traffic of one listener."""

    __slots__ = ("second", "requests", "failures", "latency", "by_backend", "by_region")

    def __init__(self, second: int) -> None:
        self.second = second
        self.requests = 0
        self.failures = 0
        self.latency = LatencyHistogram()
        self.by_backend: dict[str, int] = {}
        self.by_region: dict[str | None, int] = {}  # client region (None = unknown) -> requests


class _BackendSeries:
    __slots__ = ("address", "instance", "by_class", "state", "active")

    def __init__(self, address: str, instance: str | None) -> None:
        self.address = address
        self.instance = instance
        self.by_class = [0] * len(CODE_CLASSES)
        self.state = BackendState.DOWN  # a backend starts down until someone says otherwise
        self.active = 0


class _ListenerSeries:
    def __init__(self, config: ListenerConfig, now: float) -> None:
        self.by_class = [0] * len(CODE_CLASSES)
        self.by_status: dict[int, int] = {}
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.bytes_in = 0
        self.bytes_out = 0
        self.latency = LatencyHistogram()
        self.client_connections = 0
        self.recent: deque[_Second] = deque(maxlen=RECENT_WINDOW)
        self.started = now
        self.backends: dict[str, _BackendSeries] = {}
        self.by_index: list[_BackendSeries] = []
        self.client_regions: dict[str | None, int] = {}  # geographic listeners: requests by client region
        self.configure(config)

    def configure(self, config: ListenerConfig) -> None:
        self.config = config
        self.label = str(config.port)
        kept = {}
        for backend in config.backends:
            series = self.backends.get(backend.address) or _BackendSeries(backend.address, backend.instance)
            series.instance = backend.instance
            kept[backend.address] = series
        self.backends = kept
        self.by_index = [kept[b.address] for b in config.backends]

    def enabled(self, switch: str) -> bool:
        return bool(self.config.monitoring.metrics.get(switch, True))

    @property
    def requests(self) -> int:
        return sum(self.by_class)

    def shown_classes(self, by_class: list[int]) -> list[int]:
        """Code classes to export: all five for HTTP (zeros included), "none" when it occurred."""
        if self.config.type == "tcp":
            return [0]
        return [i for i in range(len(CODE_CLASSES)) if i or by_class[0]]

    def second(self, now: float) -> _Second:
        second = int(now)
        if not self.recent or self.recent[-1].second != second:
            self.recent.append(_Second(second))
        return self.recent[-1]

    def seconds_since(self, now: float, window: int) -> list[_Second]:
        first = int(now) - window + 1
        return [s for s in self.recent if s.second >= first]

    def rate(self, now: float) -> float:
        """Requests per second over the last RATE_WINDOW seconds (less if the listener is younger)."""
        span = min(RATE_WINDOW - 1 + (now - int(now)), now - self.started)
        if span <= 0:
            return 0.0
        return sum(s.requests for s in self.seconds_since(now, RATE_WINDOW)) / span

    def recent_latency(self, now: float) -> LatencyHistogram:
        merged = LatencyHistogram()
        for s in self.seconds_since(now, RECENT_WINDOW):
            merged.merge(s.latency)
        return merged


class LoadBalancerMetrics:
    """Every listener's counters, gauges and histograms, plus the queries the CLI and alerts need."""

    def __init__(self) -> None:
        self._listeners: dict[int, _ListenerSeries] = {}  # by ListenerConfig.index
        self._instances: dict[str, tuple[float, int]] = {}  # name -> (cpu %, rss bytes)

    def reconfigure(self, listeners: Iterable[ListenerConfig], now: float) -> None:
        """Adopt a new set of listeners; series of a listener whose port stays are kept."""
        by_port = {series.config.port: series for series in self._listeners.values()}
        fresh = {}
        for config in listeners:
            series = by_port.get(config.port)
            if series is None:
                series = _ListenerSeries(config, now)
            else:
                series.configure(config)
            fresh[config.index] = series
        self._listeners = fresh

    # -- feeding

    def record(self, outcomes: Iterable[Outcome], now: float) -> None:
        """Count a batch of outcomes; called every ~50 ms under load, so it stays a tight loop."""
        listeners = self._listeners
        seconds: dict[int, _Second] = {}
        for o in outcomes:
            series = listeners.get(o.listener)
            if series is None:
                continue
            slot = seconds.get(o.listener)
            if slot is None:
                slot = seconds[o.listener] = series.second(now)
            status = o.status
            code_class = status // 100 if 100 <= status < 600 else 0
            series.by_class[code_class] += 1
            if status:
                series.by_status[status] = series.by_status.get(status, 0) + 1
            series.bytes_in += o.bytes_in
            series.bytes_out += o.bytes_out
            series.latency.observe(o.latency)
            slot.requests += 1
            slot.latency.observe(o.latency)
            error = o.error
            if error is not None:
                series.errors[error] = series.errors.get(error, 0) + 1
            if code_class == 5 or (error is not None and error not in CLIENT_ERROR_KINDS):
                slot.failures += 1
            if 0 <= o.backend < len(series.by_index):
                backend = series.by_index[o.backend]
                backend.by_class[code_class] += 1
                slot.by_backend[backend.address] = slot.by_backend.get(backend.address, 0) + 1

    def record_client_regions(self, regions: dict[int, dict[str | None, int]], now: float) -> None:
        """Requests by client region per listener index (a LoopReport's `client_regions`: the regions
        the geographic strategy resolved; None = unknown)."""
        for index, counts in regions.items():
            series = self._listeners.get(index)
            if series is None:
                continue
            slot = series.second(now)
            for region, n in counts.items():
                slot.by_region[region] = slot.by_region.get(region, 0) + n
                series.client_regions[region] = series.client_regions.get(region, 0) + n

    def set_connections(self, active: dict, client_connections: dict) -> None:
        """Gauges from a LoopReport; each report is the whole picture (absent = 0)."""
        for index, series in self._listeners.items():
            series.client_connections = client_connections.get(index, 0)
            for position, backend in enumerate(series.by_index):
                backend.active = active.get((index, position), 0)

    def set_backend_states(self, listener_index: int, states: dict[str, BackendState]) -> None:
        """States by address: up, down, draining, open, half_open. Unknown addresses are ignored."""
        series = self._listeners.get(listener_index)
        if series is None:
            return
        for address, state in states.items():
            backend = series.backends.get(address)
            if backend is not None:
                backend.state = state

    def set_instance_usage(self, name: str, cpu: float, rss: int) -> None:
        self._instances[name] = (cpu, rss)

    def forget_instance(self, name: str) -> None:
        self._instances.pop(name, None)

    # -- queries

    def stats(self, now: float) -> dict:
        """`lb stats --json`: totals over every listener plus the same per listener."""
        per_listener = [self._listener_stats(index, series, now) for index, series in self._sorted()]
        merged = LatencyHistogram()
        for _, series in self._sorted():
            merged.merge(series.latency)
        totals = {
            "requests": sum(s["requests"] for s in per_listener),
            "responses": {name: sum(s["responses"][name] for s in per_listener) for name in CODE_CLASSES[1:]},
            "errors": sum(s["errors"] for s in per_listener),
            "errors_by_kind": _sum_by_key(s["errors_by_kind"] for s in per_listener),
            "bytes_in": sum(s["bytes_in"] for s in per_listener),
            "bytes_out": sum(s["bytes_out"] for s in per_listener),
            "latency_ms": _latency_ms(merged),
            "requests_per_second": round(sum(s["requests_per_second"] for s in per_listener), 3),
            "active_connections": sum(s["active_connections"] for s in per_listener),
        }
        totals["listeners"] = per_listener
        return totals

    def _listener_stats(self, index: int, series: _ListenerSeries, now: float) -> dict:
        return {
            "listener": index,
            "port": series.config.port,
            "type": series.config.type,
            "requests": series.requests,
            "responses": {name: series.by_class[i] for i, name in enumerate(CODE_CLASSES) if i},
            "errors": sum(series.errors.values()),
            "errors_by_kind": dict(series.errors),
            "bytes_in": series.bytes_in,
            "bytes_out": series.bytes_out,
            "latency_ms": _latency_ms(series.latency),
            "requests_per_second": round(series.rate(now), 3),
            "active_connections": series.client_connections,
        }

    def traffic(self, now: float) -> list[dict]:
        """Share of each listener's backend-served requests per backend, in percent; then, for a
        listener that resolves client regions (geographic), one row per `client_region` (None =
        unknown) with the same counts and shares of its requests by where the clients are."""
        rows = []
        for _, series in self._sorted():
            recent: dict[str, int] = {}
            recent_regions: dict[str | None, int] = {}
            for s in series.seconds_since(now, RECENT_WINDOW):
                for address, n in s.by_backend.items():
                    recent[address] = recent.get(address, 0) + n
                for region, n in s.by_region.items():
                    recent_regions[region] = recent_regions.get(region, 0) + n
            totals = {address: sum(b.by_class) for address, b in series.backends.items()}
            recent_sum, total_sum = sum(recent.values()), sum(totals.values())
            for address, backend in series.backends.items():
                rows.append({
                    "listener": series.config.port,
                    "address": address,
                    "instance": backend.instance,
                    "requests_last_minute": recent.get(address, 0),
                    "share_last_minute": _percent(recent.get(address, 0), recent_sum),
                    "requests_total": totals[address],
                    "share_total": _percent(totals[address], total_sum),
                })
            regions = series.client_regions
            recent_sum, total_sum = sum(recent_regions.values()), sum(regions.values())
            for region in sorted(regions, key=lambda r: (r is None, r or "")):
                rows.append({
                    "listener": series.config.port,
                    "client_region": region,
                    "requests_last_minute": recent_regions.get(region, 0),
                    "share_last_minute": _percent(recent_regions.get(region, 0), recent_sum),
                    "requests_total": regions[region],
                    "share_total": _percent(regions[region], total_sum),
                })
        return rows

    def status_rates(self, now: float) -> dict[int, float]:
        return {index: round(series.rate(now), 3) for index, series in self._sorted()}

    def alert_values(self, listener_index: int, now: float) -> dict:
        """One listener's values for the metrics alert rules name (config/alertrule.py METRICS); {} if unknown.

        error_rate (percent of requests that failed: 5xx or a server-side error kind) and the
        response time quantiles (seconds) cover the last RECENT_WINDOW seconds, so they recover
        when the service does; requests_per_second covers the last RATE_WINDOW seconds.
        """
        series = self._listeners.get(listener_index)
        if series is None:
            return {}
        recent = series.seconds_since(now, RECENT_WINDOW)
        requests = sum(s.requests for s in recent)
        failures = sum(s.failures for s in recent)
        latency = series.recent_latency(now)
        states = [b.state for b in series.by_index]
        healthy = sum(1 for state in states if state in HEALTHY_STATES)
        return {
            "error_rate": 100.0 * failures / requests if requests else 0.0,
            "healthy_backends": healthy,
            "unhealthy_backends": len(states) - healthy,
            "requests_per_second": series.rate(now),
            "p50_response_time": latency.quantile(0.50),
            "p95_response_time": latency.quantile(0.95),
            "p99_response_time": latency.quantile(0.99),
            "active_connections": series.client_connections,
            "open_circuits": sum(1 for state in states if state == BackendState.OPEN),
        }

    def families(self, detailed: bool, now: float, ports: Iterable[int] | None = None) -> list[Family]:
        """The exported families (see the module docstring), optionally only for listeners on `ports`."""
        wanted = None if ports is None else set(ports)
        out: dict[str, Family] = {}

        def family(name: str, kind: str, help_text: str) -> Family:
            if name not in out:
                out[name] = Family(name, kind, help_text)
            return out[name]

        for _, series in self._sorted():
            if wanted is not None and series.config.port not in wanted:
                continue
            listener = (("listener", series.label),)
            if series.enabled("requests_per_second"):
                self._traffic_families(series, listener, detailed, now, family)
            if series.enabled("response_times"):
                histogram = family("pmdaemon_response_time_seconds", "histogram",
                                   "Time from request head received to response head sent "
                                   "(TCP: connection duration), in seconds.")
                for le, count in series.latency.cumulative():
                    histogram.add(listener + (("le", le),), count, "_bucket")
                histogram.add(listener, series.latency.sum, "_sum")
                histogram.add(listener, series.latency.count, "_count")
            if series.enabled("error_rates"):
                errors = family("pmdaemon_errors_total", "counter",
                                "Requests or connections that ended in an error, by kind.")
                for kind, count in series.errors.items():
                    errors.add(listener + (("kind", kind),), count)
            if series.enabled("backend_health"):
                self._health_families(series, listener, family)
            if series.enabled("connection_counts"):
                family("pmdaemon_active_connections", "gauge", "Open client connections.").add(
                    listener, series.client_connections)
                if detailed:
                    active = family("pmdaemon_backend_active_requests", "gauge",
                                    "Requests (HTTP) or connections (TCP) in flight per backend.")
                    for backend in series.by_index:
                        active.add(listener + _backend_labels(backend), backend.active)
        if self._instances:
            cpu = family("pmdaemon_instance_cpu_percent", "gauge",
                         "CPU use of an instance's process tree, percent of one CPU.")
            rss = family("pmdaemon_instance_memory_bytes", "gauge",
                         "Resident memory of an instance's process tree, bytes.")
            for name, (cpu_percent, rss_bytes) in sorted(self._instances.items()):
                cpu.add((("instance", name),), cpu_percent)
                rss.add((("instance", name),), rss_bytes)
        return list(out.values())

    def _traffic_families(self, series: _ListenerSeries, listener, detailed: bool, now: float, family) -> None:
        requests = family("pmdaemon_requests_total", "counter",
                          "Requests (HTTP) or connections (TCP) finished, by response class.")
        for i in series.shown_classes(series.by_class):
            requests.add(listener + (("code_class", CODE_CLASSES[i]),), series.by_class[i])
        family("pmdaemon_requests_per_second", "gauge",
               f"Requests per second over the last {RATE_WINDOW} s.").add(listener, round(series.rate(now), 3))
        family("pmdaemon_bytes_in_total", "counter", "Bytes received from clients.").add(listener, series.bytes_in)
        family("pmdaemon_bytes_out_total", "counter", "Bytes sent to clients.").add(listener, series.bytes_out)
        if not detailed:
            return
        per_backend = family("pmdaemon_backend_requests_total", "counter",
                             "Requests (HTTP) or connections (TCP) a backend served, by response class.")
        for backend in series.by_index:
            for i in series.shown_classes(backend.by_class):
                per_backend.add(listener + _backend_labels(backend) + (("code_class", CODE_CLASSES[i]),),
                                backend.by_class[i])
        per_status = family("pmdaemon_responses_total", "counter", "Responses sent to clients, by status code.")
        for status, count in sorted(series.by_status.items()):
            per_status.add(listener + (("code", str(status)),), count)

    def _health_families(self, series: _ListenerSeries, listener, family) -> None:
        up = family("pmdaemon_backend_up", "gauge",
                    "1 when the backend is healthy (up, half-open or draining), else 0.")
        circuit = family("pmdaemon_backend_circuit_state", "gauge", "Circuit breaker: 0 closed, 1 half-open, 2 open.")
        for backend in series.by_index:
            labels = listener + _backend_labels(backend)
            up.add(labels, int(backend.state in HEALTHY_STATES))
            circuit.add(labels, CIRCUIT_STATE.get(backend.state, 0))
        family("pmdaemon_backends_healthy", "gauge", "Healthy backends in the pool.").add(
            listener, sum(1 for b in series.by_index if b.state in HEALTHY_STATES))

    def _sorted(self) -> list[tuple[int, _ListenerSeries]]:
        return sorted(self._listeners.items())


def _backend_labels(backend: _BackendSeries) -> tuple[tuple[str, str], ...]:
    return (("backend", backend.address), ("instance", backend.instance or ""))


def _latency_ms(histogram: LatencyHistogram) -> dict:
    return {f"p{round(q * 100)}": round(histogram.quantile(q) * 1000.0, 3) for q in (0.50, 0.95, 0.99)}


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def _sum_by_key(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in counts:
        for key, n in d.items():
            total[key] = total.get(key, 0) + n
    return total
