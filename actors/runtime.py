"""The Runtime assembles the daemon: the process supervisor, one set of actors per listener and the I/O loop.

Per listener it starts (actors/*.py):
  Listener       the pool table; publishes each new PoolSnapshot to the loop
  HealthProbe    active checks (or connect probes) -> HealthEvent to the Listener
  Backend        one per backend: traffic roll-up, passive ejection -> Eject to the Listener
  CircuitBreaker when `circuit_breaker.enabled`: outcomes -> BreakerEvent to the Listener
  RateLimiter    when `rate_limiting.enabled`: refusals seen by the loop
  Scorer         when the strategy is performance_based: EffectiveWeights to the Listener
  Alerter        when `alerts.enabled`: evaluates the rules over the MetricsActor's values
and one MetricsActor for all listeners (it also receives every published pool state), and
subscribes each Listener to the supervisor's InstanceEvents. The IOLoop runs on one thread; its
`on_report` callback (`_ReportFanOut`) splits each LoopReport per listener and backend and only
`tell`s. The daemon calls the public methods from its control-socket threads: they `ask` actors,
never the loop, and the ones that change state (apply, drain, shutdown) take `self._lock`.
"""
from __future__ import annotations

import errno
import threading
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pykka

from actors import alb
from actors.alerter import Alerter, values_from
from actors.backend import Backend
from actors.breaker import CircuitBreaker
from actors.health import HealthProbe
from actors.listener import Listener
from actors.messages import BackendOutcomes, LoopReport
from actors.metrics import MetricsActor
from actors.ratelimiter import RateLimiter
from actors.scorer import Scorer
from actors.supervisor import ProcessSupervisor
from actors.timers import Timers
from net.config import Config, ListenerConfig
from net.loop import IOLoop
from net.snapshot import HALF_OPEN, OPEN, UP, PoolSnapshot
from net.sticky import load_or_create_key
from net.strategies import make_strategy
from net.sticky import load_or_create_key
from net.strategies import make_strategy

ASK_TIMEOUT = 10.0  # seconds; an actor that does not answer this fast is stuck
LOOP_JOIN_TIMEOUT = 10.0


@dataclass(frozen=True)
class _ListenerUnit:
    """The actors serving one listener."""

    config: ListenerConfig
    listener: pykka.ActorRef
    probe: pykka.ActorRef
    backends: tuple[pykka.ActorRef, ...]
    breaker: pykka.ActorRef | None
    ratelimiter: pykka.ActorRef | None
    scorer: pykka.ActorRef | None
    alerter: pykka.ActorRef | None


class _ReportFanOut:
    """The IOLoop's `on_report`: runs on the loop thread, so it only splits the report and `tell`s.

    `units` is replaced whole (never mutated) by the Runtime, so the loop thread reads a consistent map.
    """

    def __init__(self) -> None:
        self.units: dict[int, _ListenerUnit] = {}
        self.metrics: pykka.ActorRef | None = None
        self._last_active: dict = {}

    def __call__(self, report: LoopReport) -> None:
        if self.metrics is not None:
            _tell(self.metrics, report)
        by_listener: dict[int, list] = defaultdict(list)
        for outcome in report.outcomes:
            by_listener[outcome.listener].append(outcome)
        for index, unit in self.units.items():
            outcomes = by_listener.get(index, ())
            by_backend: dict[int, list] = defaultdict(list)
            for outcome in outcomes:
                by_backend[outcome.backend].append(outcome)
            for backend, ref in enumerate(unit.backends):
                key = (index, backend)
                active = report.active.get(key, 0)
                if backend in by_backend or active != self._last_active.get(key, 0):
                    _tell(ref, BackendOutcomes(tuple(by_backend.get(backend, ())), active))
            if outcomes and unit.breaker is not None:
                _tell(unit.breaker, BackendOutcomes(tuple(outcomes)))
            if unit.ratelimiter is not None:
                refused = tuple(o for o in outcomes if o.error == "rate_limited")
                if refused:
                    _tell(unit.ratelimiter, BackendOutcomes(refused))
        self._last_active = report.active


def _tell(ref: pykka.ActorRef, message: object) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass  # shutting down


def _listener_path(config: Config, listener: ListenerConfig) -> str:
    return "load_balancer" if len(config.listeners) == 1 else f"load_balancer[{listener.index}]"


class Runtime:
    """Starts and stops everything one config describes, and answers the `lb` commands."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.supervisor: pykka.ActorRef = ProcessSupervisor.start(self.home)
        self.config: Config | None = None
        self._lock = threading.RLock()
        self._timers = Timers()
        self._fanout = _ReportFanOut()
        self._loop = None
        self._loop_thread: threading.Thread | None = None
        self._metrics: pykka.ActorRef | None = None
        self._metrics_states = None  # the MetricsActor's proxy, kept for the Listeners' publish calls
        self._alb: pykka.ActorRef | None = None  # AlbRegistrar (actors/alb.py), once a config has aws.alb apps
        self._closed = False

    # --- lifecycle ---

    def apply(self, config: Config) -> None:
        """Bind the config's listeners, start their actors, then start its apps (running apps are left alone).

        Listeners are bound first: a port already in use raises RuntimeError naming the config path
        and nothing is started. A config whose listeners differ from those already running is
        refused (changing them is `reload --config`); the same listeners again are left alone.
        """
        with self._lock:
            self._alb = alb.attach(self._alb, config, self.supervisor, self._timers)  # raises if boto3 is missing
            if self._fanout.units:
                running = tuple(unit.config for unit in self._fanout.units.values())
                if config.listeners and config.listeners != running:
                    raise RuntimeError("listeners are already running from another config; apply listener "
                                       "changes with `pmdaemon reload --config <config>`")
            elif config.listeners:
                self._start_listeners(config)
            supervisor = self.supervisor.proxy()
            for app in config.apps:
                supervisor.start_app(app).get(timeout=ASK_TIMEOUT)
            if self.config is None or config.listeners:
                self.config = config

    def _start_listeners(self, config: Config) -> None:
        from net.loop import IOLoop

        if self._loop is None:
            # Sticky cookies are signed with the home's key, so they stay valid across daemon restarts.
            session_key = load_or_create_key(self.home)
            self._loop = IOLoop(self._fanout, lambda listener: make_strategy(listener, session_key=session_key))
        bound = []
        try:
            for listener in config.listeners:
                try:
                    self._loop.add_listener(listener)
                except OSError as e:
                    where = f"{_listener_path(config, listener)}.port"
                    if e.errno == errno.EADDRINUSE:
                        raise RuntimeError(f"{where}: port {listener.port} is already in use") from None
                    raise RuntimeError(f"{where}: cannot listen on {listener.host}:{listener.port}: "
                                       f"{e.strerror or e}") from None
                except ValueError as e:
                    raise RuntimeError(f"{_listener_path(config, listener)}: {e}") from None
                bound.append(listener.index)
        except RuntimeError:
            for index in bound:
                self._loop.remove_listener(index)
            raise
        if self._loop_thread is None:
            self._loop_thread = threading.Thread(target=self._loop.run, name="pmdaemon-ioloop", daemon=True)
            self._loop_thread.start()
        self._metrics = MetricsActor.start(config.listeners, timers=self._timers)
        self._metrics_states = self._metrics.proxy()
        self._fanout.metrics = self._metrics
        units = {listener.index: self._start_unit(listener) for listener in config.listeners}
        self._fanout.units = units

    def _start_unit(self, config: ListenerConfig) -> _ListenerUnit:
        listener = Listener.start(config, self._publish, self._timers)
        probe = HealthProbe.start(config, listener, self.supervisor, self._timers)
        listener.proxy().attach_probe(probe).get(timeout=ASK_TIMEOUT)
        self.supervisor.proxy().subscribe(listener).get(timeout=ASK_TIMEOUT)
        backends = tuple(Backend.start(config, i, listener) for i in range(len(config.backends)))
        return _ListenerUnit(
            config=config, listener=listener, probe=probe, backends=backends,
            breaker=CircuitBreaker.start(config, listener, self._timers) if config.circuit_breaker.enabled else None,
            ratelimiter=RateLimiter.start(config.rate_limiting) if config.rate_limiting.enabled else None,
            scorer=(Scorer.start(config, listener, backends, self.supervisor, self._timers)
                    if config.strategy == "performance_based" else None),
            alerter=(Alerter.start(config, values_from(self._metrics), timers=self._timers)
                     if config.alerts.enabled and config.alerts.rules else None),
        )

    def _publish(self, snapshot: PoolSnapshot) -> None:
        """What a Listener actor does with a new snapshot (on its own thread): the loop routes by it,
        the metrics show its states."""
        self._loop.publish(snapshot)
        if self._metrics_states is not None:
            self._metrics_states.set_backend_states(snapshot.listener, {b.address: b.state for b in snapshot.backends})

    def shutdown(self) -> None:
        """Stop the listeners and the loop, every process (waiting for them), then every actor and thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._loop is not None:
                    self._loop.stop()
                    if self._loop_thread is not None:
                        self._loop_thread.join(LOOP_JOIN_TIMEOUT)
                if self.supervisor.is_alive():
                    self.supervisor.proxy().stop_all().get()
            finally:
                self._fanout.units = {}
                pykka.ActorRegistry.stop_all()
                self._timers.close()

    # --- lb commands ---

    def listening_address(self, index: int) -> tuple:
        """Where listener `index` is bound (its port when the config said 0)."""
        return self._loop.listening_address(index)

    def lb_status(self) -> list[dict]:
        rows = []
        rates = self._metrics.proxy().status_rates().get(timeout=ASK_TIMEOUT) if self._metrics else {}
        for unit in self._units():
            backends = self._backend_rows(unit)
            rows.append({
                "port": unit.config.port,
                "host": unit.config.host,
                "type": unit.config.type,
                "strategy": unit.config.strategy,
                "tls": unit.config.ssl.enabled,
                "backends_up": sum(1 for b in backends if b["state"] == UP),
                "backends_total": len(backends),
                "active": sum(b["active"] for b in backends),
                "requests_per_second": rates.get(unit.config.index, 0.0),
            })
            if unit.ratelimiter is not None:
                rows[-1]["rate_limiting"] = unit.ratelimiter.proxy().status().get(timeout=ASK_TIMEOUT)
        return rows

    def lb_backends(self) -> list[dict]:
        return [row for unit in self._units() for row in self._backend_rows(unit)]

    def lb_health(self) -> list[dict]:
        rows = []
        for unit in self._units():
            for row in unit.probe.proxy().status().get(timeout=ASK_TIMEOUT):
                rows.append({"listener": unit.config.port, **row})
        return rows

    def lb_health_check_test(self) -> list[dict]:
        """Every backend's check, run once now (concurrently); each row says `ok` and, if not, `error`."""
        pending = []
        for unit in self._units():
            for row, future in unit.probe.proxy().check_now().get(timeout=ASK_TIMEOUT):
                pending.append(({"listener": unit.config.port, **row}, future))
        results = []
        for row, future in pending:
            error = future.result()
            results.append({**row, "ok": error is None, "error": error})
        return results

    def lb_config(self) -> dict:
        from net.configfile import effective_config

        if self.config is None:
            raise RuntimeError("no config has been applied yet; start one with `pmdaemon start <config>`")
        return effective_config(self.config)

    def lb_drain(self, backend: str) -> dict:
        """Drain `backend` (host:port or instance name) in every listener whose pool holds it."""
        return self._set_draining(backend, drain=True)

    def lb_enable(self, backend: str) -> dict:
        return self._set_draining(backend, drain=False)

    def lb_stats(self) -> dict:
        return self._metrics_proxy().stats().get(timeout=ASK_TIMEOUT)

    def lb_traffic(self) -> list[dict]:
        return self._metrics_proxy().traffic().get(timeout=ASK_TIMEOUT)

    def lb_metrics(self, detailed: bool = False) -> str:
        """Prometheus text, the same the /metrics endpoint serves."""
        return self._metrics_proxy().render_prometheus(detailed).get(timeout=ASK_TIMEOUT)

    def lb_metrics_samples(self, detailed: bool = False) -> list[dict]:
        return self._metrics_proxy().samples(detailed).get(timeout=ASK_TIMEOUT)

    def lb_export(self, kind: str) -> str:
        """The listeners and their live pools (each Listener's latest snapshot) as nginx or HAProxy config."""
        from datetime import datetime, timezone

        from net.export import render

        units = self._units()
        if not units or self.config is None:
            raise RuntimeError("no load balancer is running: there is no pool to export "
                               "(add a load_balancer block to the config)")
        pools = {unit.config.index: unit.listener.proxy().snapshot().get(timeout=ASK_TIMEOUT).backends
                 for unit in units}
        return render(kind, [unit.config for unit in units], pools, self.config.source,
                      datetime.now(timezone.utc))

    def _metrics_proxy(self):
        if self._metrics is None:
            raise RuntimeError("no load balancer is running: metrics come from listeners "
                               "(add a load_balancer block to the config)")
        return self._metrics.proxy()

    # --- helpers ---

    def _units(self) -> list[_ListenerUnit]:
        return list(self._fanout.units.values())

    def _backend_rows(self, unit: _ListenerUnit) -> list[dict]:
        rows = unit.listener.proxy().backends().get(timeout=ASK_TIMEOUT)
        stats = pykka.get_all([ref.proxy().stats() for ref in unit.backends], timeout=ASK_TIMEOUT)
        scores = unit.scorer.proxy().scores().get(timeout=ASK_TIMEOUT) if unit.scorer else None
        merged = []
        for i, (row, traffic) in enumerate(zip(rows, stats)):
            state = row["state"]
            merged.append({
                "address": row["address"],
                "instance": row["instance"],
                "app": row["app"],
                # cli.md: a tripped breaker shows as `open`, half-open (trial requests only) included.
                "state": OPEN if state == HALF_OPEN else state,
                "weight": row["weight"],
                "active": traffic["active"],
                "breaker": row["breaker"],
                "listener": unit.config.port,
                "process": row["process"],
                "healthy": row["healthy"],
                "region": row["region"],
                "requests": traffic["requests"],
                "errors": traffic["errors"],
                "error_rate": traffic["error_rate"],
                "latency_ewma_ms": None if traffic["latency_ewma"] is None else round(traffic["latency_ewma"] * 1000, 3),
                "requests_per_second": traffic["requests_per_second"],
            })
            if scores is not None:
                # performance_based: the score the weight is moving to, and what it was computed from.
                merged[-1]["score"] = scores[i]["score"]
                merged[-1]["performance"] = scores[i]["metrics"]
        return merged

    def _set_draining(self, backend: str, drain: bool) -> dict:
        with self._lock:
            alb_targets = alb.set_draining(self._alb, backend, drain)  # ALB drain = deregistration
            try:
                targets = self._resolve_backend(backend)
            except ValueError:
                if not alb_targets:
                    raise
                targets = []
            rows = []
            for unit, indexes in targets:
                proxy = unit.listener.proxy()
                changed = (proxy.drain(indexes) if drain else proxy.enable(indexes)).get(timeout=ASK_TIMEOUT)
                rows.extend({"listener": unit.config.port, "address": r["address"], "instance": r["instance"],
                             "state": r["state"]} for r in changed)
            result = {"backend": backend, "draining": drain, "backends": rows}
            if alb_targets:
                result["alb_targets"] = alb_targets
            return result

    def _resolve_backend(self, backend: str) -> list[tuple[_ListenerUnit, list[int]]]:
        wanted = backend.strip()
        if wanted.startswith("localhost:"):
            wanted = "127.0.0.1:" + wanted.split(":", 1)[1]
        targets = []
        known = []
        for unit in self._units():
            indexes = [i for i, b in enumerate(unit.config.backends) if wanted in (b.address, b.instance)]
            if indexes:
                targets.append((unit, indexes))
            known.extend(b.instance or b.address for b in unit.config.backends)
        if not targets:
            if not known:
                raise ValueError(f"unknown backend '{backend}': no load balancer is running")
            raise ValueError(f"unknown backend '{backend}': give host:port or an instance name; "
                             f"the pools hold {', '.join(dict.fromkeys(known))}")
        return targets
