"""MetricsActor: rolls up the loop's outcome batches and exports them (Prometheus endpoint, statsd).

The counting itself is `control/metrics.py` (sans-I/O); this actor adds the clock, the exports and the
threads they need:

- Prometheus: one small `http.server` per distinct configured (host, port), default
  127.0.0.1:9615, serving the same text as `lb metrics` at the configured path(s) (`/metrics`);
  `?detailed=1` adds the per-backend and per-status series; any other path is 404. A listener
  exports when its `monitoring.enabled` is true and it has an endpoint. The server's request
  threads get the text by asking this actor (never the I/O loop).
- statsd: every `statsd_interval` seconds (default 10, statsd's own flush interval) the series of
  the listeners that name a target go to it over UDP, in datagrams of at most 1432 bytes.

Use (the Runtime wires it):
    ref = MetricsActor.start(listeners, timers=timers)
    ref.tell(loop_report)               # cheapest path for the loop's callback; or proxy().report(r)
    supervisor.subscribe_usage(ref)     # InstanceUsage every sampling tick: the instance CPU/memory series
    proxy = ref.proxy()
    proxy.set_backend_states(listener_index, {"127.0.0.1:3000": "up", ...})
    proxy.set_instance_usage("web-0", cpu_percent, rss_bytes); proxy.forget_instance("web-0")
    proxy.stats().get(); proxy.traffic().get(); proxy.status_rates().get()
    proxy.render_prometheus(detailed).get(); proxy.samples(detailed).get()
    proxy.alert_values(listener_index).get(); proxy.reconfigure(new_listeners)
    proxy.prometheus_urls().get()       # where the endpoints are bound (after on_start: any answered
                                        # ask means they are); a port that cannot be bound is logged
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pykka

from pmdaemon.actors.messages import InstanceUsage, Tick
from pmdaemon.config.model import ListenerConfig
from pmdaemon.control.metrics import LoadBalancerMetrics, json_samples, render_prometheus
from pmdaemon.control.statsd import StatsdEncoder, TimingSample
from pmdaemon.control.timers import Timers
from pmdaemon.net.snapshot import LoopReport
from pmdaemon.states import BackendState

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RENDER_TIMEOUT = 5.0  # seconds a scrape waits for the actor before answering 503
_STATSD_FLUSH = Tick("statsd flush")


class MetricsActor(pykka.ThreadingActor):
    def __init__(self, listeners: Iterable[ListenerConfig], timers: Timers | None = None,
                 statsd_interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._initial = tuple(listeners)
        self._listeners: tuple[ListenerConfig, ...] = ()
        self._timers = timers
        self._own_timers = timers is None
        self._statsd_interval = statsd_interval
        self._clock = clock
        self._metrics = LoadBalancerMetrics()
        self._servers: dict[tuple[str, int], _PrometheusServer] = {}
        self._statsd: dict[tuple[str, int, str], _StatsdTarget] = {}
        self._timings: dict[int, TimingSample] = {}  # listener index -> response time sample
        self._sampled: frozenset[str] = frozenset()  # instances of the last InstanceUsage
        self._flush_scheduled = False

    def on_start(self) -> None:
        if self._timers is None:
            self._timers = Timers()
        self.reconfigure(self._initial)

    def on_stop(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for target in self._statsd.values():
            target.close()
        self._statsd.clear()
        if self._own_timers:
            self._timers.close()

    def on_receive(self, message: object) -> None:
        if isinstance(message, LoopReport):
            self.report(message)
        elif isinstance(message, InstanceUsage):
            self.instance_usage(message)
        elif message == _STATSD_FLUSH:
            self._flush_scheduled = False
            self._flush_statsd()

    # -- feeding

    def report(self, report: LoopReport) -> None:
        self._metrics.record(report.outcomes, self._clock())
        if report.client_regions:
            self._metrics.record_client_regions(report.client_regions, self._clock())
        self._metrics.set_connections(report.active, report.client_connections)
        if self._timings:
            timings = self._timings
            for outcome in report.outcomes:
                sample = timings.get(outcome.listener)
                if sample is not None:
                    sample.offer(outcome.latency)

    def set_backend_states(self, listener_index: int, states: dict[str, BackendState]) -> None:
        self._metrics.set_backend_states(listener_index, states)

    def set_instance_usage(self, name: str, cpu: float, rss: int) -> None:
        self._metrics.set_instance_usage(name, cpu, rss)

    def forget_instance(self, name: str) -> None:
        self._metrics.forget_instance(name)

    def instance_usage(self, usage: InstanceUsage) -> None:
        """The supervisor's latest sample replaces the last one: an instance missing from it stopped
        (or its app no longer collects metrics), so its series go."""
        sampled = frozenset(name for name, _, _ in usage.samples)
        for name in self._sampled - sampled:
            self._metrics.forget_instance(name)
        for name, cpu, rss in usage.samples:
            self._metrics.set_instance_usage(name, cpu, rss)
        self._sampled = sampled

    def reconfigure(self, listeners: Iterable[ListenerConfig]) -> None:
        """Adopt new listeners; counters of listeners that keep their port carry on."""
        self._listeners = tuple(listeners)
        self._metrics.reconfigure(self._listeners, self._clock())
        self._reconcile_prometheus()
        self._reconcile_statsd()

    # -- queries

    def stats(self) -> dict:
        return self._metrics.stats(self._clock())

    def traffic(self) -> list[dict]:
        return self._metrics.traffic(self._clock())

    def status_rates(self) -> dict[int, float]:
        return self._metrics.status_rates(self._clock())

    def render_prometheus(self, detailed: bool = False) -> str:
        return render_prometheus(self._metrics.families(detailed, self._clock()))

    def samples(self, detailed: bool = False) -> list[dict]:
        return json_samples(self._metrics.families(detailed, self._clock()))

    def alert_values(self, listener_index: int) -> dict:
        return self._metrics.alert_values(listener_index, self._clock())

    def prometheus_urls(self) -> list[str]:
        return [url for server in self._servers.values() for url in server.urls()]

    # -- exports

    def _reconcile_prometheus(self) -> None:
        wanted: dict[tuple[str, int], set[str]] = {}
        for listener in self._listeners:
            endpoint = listener.monitoring.prometheus
            if listener.monitoring.enabled and endpoint is not None:
                wanted.setdefault((endpoint.host, endpoint.port), set()).add(endpoint.path_or_prefix or "/metrics")
        for key in [k for k in self._servers if k not in wanted]:
            self._servers.pop(key).close()
        for key, paths in wanted.items():
            if key in self._servers:
                self._servers[key].paths = frozenset(paths)
                continue
            proxy = self.actor_ref.proxy()
            try:
                self._servers[key] = _PrometheusServer(key[0], key[1], frozenset(paths), _renderer(proxy))
            except OSError as exc:
                log.error("cannot serve Prometheus metrics on %s:%d: %s", key[0], key[1], exc)

    def _reconcile_statsd(self) -> None:
        wanted: dict[tuple[str, int, str], set[int]] = {}
        for listener in self._listeners:
            endpoint = listener.monitoring.statsd
            if listener.monitoring.enabled and endpoint is not None:
                wanted.setdefault((endpoint.host, endpoint.port, endpoint.path_or_prefix), set()).add(listener.port)
        for key in [k for k in self._statsd if k not in wanted]:
            self._statsd.pop(key).close()
        for key, ports in wanted.items():
            if key not in self._statsd:
                try:
                    self._statsd[key] = _StatsdTarget(*key)
                except OSError as exc:
                    log.error("cannot send statsd metrics to %s:%d: %s", key[0], key[1], exc)
                    continue
            self._statsd[key].ports = frozenset(ports)
        exported = {port for target in self._statsd.values() for port in target.ports}
        self._timings = {
            listener.index: self._timings.get(listener.index) or TimingSample()
            for listener in self._listeners
            if listener.port in exported and listener.monitoring.metrics.get("response_times", True)
        }
        if self._statsd and not self._flush_scheduled:
            self._timers.tell_later(self._statsd_interval, self.actor_ref, _STATSD_FLUSH)
            self._flush_scheduled = True

    def _flush_statsd(self) -> None:
        if not self._statsd:
            return
        now = self._clock()
        port_of = {listener.index: listener.port for listener in self._listeners}
        timings = {port_of[index]: sample.take() for index, sample in self._timings.items() if index in port_of}
        for target in self._statsd.values():
            families = self._metrics.families(False, now, ports=target.ports)
            target.send(families, {str(p): t for p, t in timings.items() if p in target.ports})
        self._timers.tell_later(self._statsd_interval, self.actor_ref, _STATSD_FLUSH)
        self._flush_scheduled = True


class _StatsdTarget:
    """One statsd server: a UDP socket and the encoder that remembers what was sent."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        family, _, _, _, self.address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.encoder = StatsdEncoder(prefix)
        self.ports: frozenset[int] = frozenset()

    def send(self, families, timings) -> None:
        for payload in self.encoder.encode(families, timings):
            try:
                self.sock.sendto(payload, self.address)
            except OSError as exc:  # nobody listening, buffer full: statsd is best effort by design
                log.debug("statsd datagram to %s dropped: %s", self.address, exc)

    def close(self) -> None:
        self.sock.close()


def _renderer(proxy: pykka.ActorProxy) -> Callable[[bool], str]:
    """A _PrometheusServer's `render`: asks the MetricsActor behind `proxy` (from the server's threads)."""
    return lambda detailed: proxy.render_prometheus(detailed).get(timeout=RENDER_TIMEOUT)


class _PrometheusServer:
    """A tiny HTTP server on its own thread; each scrape asks the MetricsActor for the text."""

    def __init__(self, host: str, port: int, paths: frozenset[str], render: Callable[[bool], str]) -> None:
        self.paths = paths
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that stalls mid-request releases its thread after this

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path not in owner.paths:
                    self._reply(404, b"not found; metrics are at " + ", ".join(sorted(owner.paths)).encode() + b"\n",
                                "text/plain; charset=utf-8")
                    return
                detailed = parse_qs(url.query).get("detailed", ["0"])[-1].lower() in ("1", "true", "yes")
                try:
                    body = render(detailed).encode()
                except Exception as exc:  # the actor is stopping or overloaded
                    self._reply(503, f"metrics unavailable: {exc.__class__.__name__}\n".encode(),
                                "text/plain; charset=utf-8")
                    return
                self._reply(200, body, PROMETHEUS_CONTENT_TYPE)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                log.debug("prometheus endpoint: " + format, *args)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._httpd = Server((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"pmdaemon-prometheus-{port}", daemon=True)
        self._thread.start()

    def urls(self) -> list[str]:
        host, port = self._httpd.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return [f"http://{host}:{port}{path}" for path in sorted(self.paths)]

    def close(self) -> None:
        # serve_forever only accepts; request threads never hold it, so this returns within a poll.
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
