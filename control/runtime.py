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
`on_report` callback (`ReportFanOut`, control/fanout.py) splits each LoopReport per listener and
backend and only `tell`s. The daemon calls the public methods from its control-socket threads: they
`ask` actors, never the loop, and the ones that change state (apply, drain, shutdown) take
`self._lock`; the read-only `lb` queries are in control/lbqueries.py.

Zero-downtime operations (`reload_app`, `scale`, `reload_config`) run one at a time on the calling
thread, built from the steps of control/rollout.py (drain, restart, wait healthy, put back) and from
pool replacement: a listener whose pool or policies change keeps its socket, its connections and
its Listener actor (`IOLoop.replace_listener`, `Listener.replace_pool`); the actors that address
backends by position (HealthProbe, Backend, CircuitBreaker, Scorer) are replaced, the probe seeded
with what the Listener knows. The loop counts requests by backend id (`BackendView.index`), which
a backend keeps across replacements; each unit records its ids, and the fan-out turns them back into
positions for the actors and the metrics.
"""
from __future__ import annotations

import errno
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import pykka

from pmdaemon.actors import alb
from pmdaemon.actors.alerter import Alerter, values_from
from pmdaemon.actors.backend import Backend
from pmdaemon.actors.breaker import CircuitBreaker
from pmdaemon.actors.health import HealthProbe
from pmdaemon.actors.listener import Listener
from pmdaemon.actors.metrics import MetricsActor
from pmdaemon.actors.ratelimiter import RateLimiter
from pmdaemon.actors.scorer import Scorer
from pmdaemon.actors.supervisor import ProcessSupervisor, UnknownTarget
from pmdaemon.config.diff import (
    backend_key,
    dropped_backends,
    follows_app,
    plan_apps,
    plan_listeners,
    scaled_pool,
    with_app,
    with_listeners,
    with_started,
)
from pmdaemon.config.loader import ConfigError
from pmdaemon.config.model import AppConfig, BackendConfig, Config, ListenerConfig, instance_spec
from pmdaemon.control.fanout import ListenerUnit, ReportFanOut
from pmdaemon.control.lbqueries import LbQueries
from pmdaemon.control.rollout import ASK_TIMEOUT, Instance, Rollout, RolloutAborted, Seat
from pmdaemon.control.timers import Timers
from pmdaemon.net.listeners import ListenerTls
from pmdaemon.net.loop import IOLoop
from pmdaemon.net.snapshot import PoolSnapshot
from pmdaemon.net.sticky import load_or_create_key
from pmdaemon.net.strategies import make_strategy
from pmdaemon.states import InstanceStatus

LOOP_JOIN_TIMEOUT = 10.0


def _listener_path(config: Config, listener: ListenerConfig) -> str:
    return "load_balancer" if len(config.listeners) == 1 else f"load_balancer[{listener.index}]"


class Runtime(LbQueries):
    """Starts and stops everything one config describes, and answers the `lb` commands."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.supervisor: pykka.ActorRef = ProcessSupervisor.start(self.home)
        self.config: Config | None = None
        self._lock = threading.RLock()
        self._timers = Timers()
        self._fanout = ReportFanOut()
        self._loop = None
        self._loop_thread: threading.Thread | None = None
        self._strategy_factory = None  # the loop's, kept to check a reloaded config before applying it
        self._metrics: pykka.ActorRef | None = None
        self._metrics_states = None  # the MetricsActor's proxy, kept for the Listeners' publish calls
        self._alb: pykka.ActorRef | None = None  # AlbRegistrar (actors/alb.py), once a config has aws.alb apps
        self._closed = False
        self._operations = threading.Lock()  # one reload / scale / reload --config at a time
        self._cancelled = threading.Event()  # set by shutdown: a waiting rollout gives up
        self._next_listener_index = 0  # listener indexes are never reused (see config/diff.py)
        self._apps: dict[str, AppConfig] = {}  # every app applied, by name, as it runs now (scale included)
        # (listener index, app) -> what each backend of that app shares, for pools that follow its scale
        self._templates: dict[tuple[int, str], BackendConfig] = {}

    # --- lifecycle ---

    def apply(self, config: Config) -> tuple[list[ListenerConfig], list[ListenerConfig]]:
        """`pmdaemon start`: add a config to what runs, PM2-style. Its listeners on ports no running listener
        serves are bound and started, its apps not yet running are started; a listener on a port already
        served and an app already running are left alone. Nothing running changes or stops.

        The new ports are bound first: one already in use raises RuntimeError naming it and nothing is
        started. Returns (listeners added, running listeners left alone on the config's other ports).
        """
        with self._lock:
            self._alb = alb.attach(self._alb, config, self.supervisor, self._timers)  # raises if boto3 is missing
            plan = plan_listeners(tuple(unit.config for unit in self._units()), config.listeners,
                                  self._next_listener_index)
            if plan.added:
                paths = {renumbered.index: _listener_path(config, written)
                         for renumbered, written in zip(plan.listeners, config.listeners)}
                self._start_listeners(plan.added, paths)
            supervisor = self.supervisor.proxy()
            for app in config.apps:
                started = supervisor.start_app(app).get(timeout=ASK_TIMEOUT)
                if app.name not in self._apps or len(started) == app.instances:  # (re)started whole: this config
                    self._apps[app.name] = app
            self.config = with_started(self.config, config, plan.added, self._apps)
            self._remember_templates(plan.added, config.apps)
            return list(plan.added), [old for old, _ in (*plan.kept, *plan.rebound)]

    def _start_listeners(self, listeners: tuple[ListenerConfig, ...], paths: dict[int, str]) -> None:
        """Bind `listeners` (all or none, RuntimeError naming `paths[index]`), then start their actors
        next to the running ones."""
        self._bind(listeners, paths)
        fresh = dict(self._fanout.units)
        self._start_metrics([*(unit.config for unit in fresh.values()), *listeners])
        for listener in listeners:
            fresh[listener.index] = self._start_unit(listener)
        self._fanout.units = fresh

    def _ensure_loop(self) -> None:
        if self._loop is None:
            # Sticky cookies are signed with the home's key, so they stay valid across daemon restarts.
            session_key = load_or_create_key(self.home)
            self._strategy_factory = lambda listener: make_strategy(listener, session_key=session_key)
            self._loop = IOLoop(self._fanout, self._strategy_factory)

    def _bind(self, listeners, paths: dict[int, str], retry_for: float = 0.0) -> None:
        """Bind every listener (and start the loop thread) or none: RuntimeError naming `paths[index]`.
        `retry_for`: seconds to keep retrying a taken port (a port being closed by the loop thread)."""
        self._ensure_loop()
        bound = []
        try:
            for listener in listeners:
                where = paths[listener.index]
                deadline = time.monotonic() + retry_for
                while True:
                    try:
                        self._loop.add_listener(listener)
                        break
                    except OSError as e:
                        if e.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                            time.sleep(0.05)
                            continue
                        if e.errno == errno.EADDRINUSE:
                            raise RuntimeError(f"{where}.port: port {listener.port} is already in use") from None
                        raise RuntimeError(f"{where}.port: cannot listen on {listener.host}:{listener.port}: "
                                           f"{e.strerror or e}") from None
                    except ValueError as e:
                        raise RuntimeError(f"{where}: {e}") from None
                bound.append(listener.index)
        except RuntimeError:
            for index in bound:
                self._loop.remove_listener(index)
            raise
        self._next_listener_index = max([self._next_listener_index, *(listener.index + 1 for listener in listeners)])
        if self._loop_thread is None:
            self._loop_thread = threading.Thread(target=self._loop.run, name="pmdaemon-ioloop", daemon=True)
            self._loop_thread.start()

    def _start_metrics(self, listeners) -> None:
        if self._metrics is None:
            self._metrics = MetricsActor.start(listeners, timers=self._timers)
            self._metrics_states = self._metrics.proxy()
            self._fanout.metrics = self._metrics
            self.supervisor.proxy().subscribe_usage(self._metrics).get(timeout=ASK_TIMEOUT)
        else:
            self._metrics.proxy().reconfigure(listeners).get(timeout=ASK_TIMEOUT)

    def _start_unit(self, config: ListenerConfig) -> ListenerUnit:
        listener = Listener.start(config, self._publish, self._timers)
        probe = HealthProbe.start(config, listener, self.supervisor, self._timers)
        listener.proxy().attach_probe(probe).get(timeout=ASK_TIMEOUT)
        self.supervisor.proxy().subscribe(listener).get(timeout=ASK_TIMEOUT)
        backends = tuple(Backend.start(config, i, listener) for i in range(len(config.backends)))
        return ListenerUnit.numbered(
            tuple(range(len(config.backends))),
            config=config, listener=listener, probe=probe, backends=backends,
            breaker=CircuitBreaker.start(config, listener, self._timers) if config.circuit_breaker.enabled else None,
            ratelimiter=RateLimiter.start(config.rate_limiting) if config.rate_limiting.enabled else None,
            scorer=(Scorer.start(config, listener, backends, self.supervisor, self._timers)
                    if config.strategy == "performance_based" else None),
            alerter=self._start_alerter(config),
        )

    def _start_alerter(self, config: ListenerConfig) -> pykka.ActorRef | None:
        if config.alerts.enabled and config.alerts.rules:
            return Alerter.start(config, values_from(self._metrics), timers=self._timers)
        return None

    def _publish(self, snapshot: PoolSnapshot) -> None:
        """What a Listener actor does with a new snapshot (on its own thread): the loop routes by it,
        the metrics show its states."""
        self._loop.publish(snapshot)
        if self._metrics_states is not None:
            self._metrics_states.set_backend_states(snapshot.listener, {b.address: b.state for b in snapshot.backends})

    def shutdown(self) -> None:
        """Take every ALB target out (waiting for ALB's draining, at most alb.SHUTDOWN_WAIT_MAX), stop the
        listeners and the loop, every process (waiting for them), then every actor and thread."""
        self._cancelled.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._alb is not None and self.supervisor.is_alive():
                    names = [info.name for info in self.supervisor.proxy().instances().get(timeout=ASK_TIMEOUT)]
                    try:
                        alb.deregister_and_wait(self._alb, names, limit=alb.SHUTDOWN_WAIT_MAX)
                    except (pykka.ActorDeadError, pykka.Timeout):
                        pass  # the registrar is gone or stuck on AWS: the instances stop all the same
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

    def leave_alb(self, target: str) -> float:
        """Before `pmdaemon stop/restart/delete <target>`: deregister the ALB targets of the instances it
        names and wait for ALB's draining (actors/alb.py); the seconds waited."""
        try:
            names = [instance.name for instance in self._instances(target)]
        except UnknownTarget:
            return 0.0  # the stop itself answers that
        return alb.deregister_and_wait(self._alb, names, wait=self._cancelled.wait)

    # --- zero-downtime operations: reload, scale, reload --config ---

    def reload_app(self, target: str) -> dict:
        """`pmdaemon reload <app|instance|all>`: restart the instances one at a time, each drained first
        and put back once healthy (control/rollout.py). Raises RolloutAborted (a RuntimeError) naming the
        instance that did not come back; the ones not yet reloaded were not touched and keep serving."""
        with self._operation():
            instances = self._instances(target)
            return {"target": target, "reloaded": self._rollout().restart_each(instances)}

    def scale(self, app: str, n: int) -> dict:
        """`pmdaemon scale <app> <n>`: up, the new instances take the next increment_var ports and join
        the pools that hold all of the app's instances once healthy (this waits for them, at most the
        rollout's ready timeout, and reports any still `pending`); down, the highest-numbered instances
        are drained (requests in flight finish, at most kill_timeout), taken out of the pools, then stopped."""
        with self._operation():
            if app not in self.supervisor.proxy().app_names().get(timeout=ASK_TIMEOUT):
                raise UnknownTarget(f"no app named {app!r}; `pmdaemon list` shows the apps")
            if n < 0:
                raise ValueError(f"cannot scale {app!r} to {n} instances")
            running = self._instances(app)
            rollout = self._rollout()
            pending: dict[str, str] = {}
            if n < len(running):
                leaving = running[n:]
                rollout.drain_out(leaving)
                self._set_app_pools(app, [(i.name, i.port) for i in running[:n]],
                                    gone={i.name for i in leaving})
                result = self.supervisor.proxy().scale(app, n).get(timeout=ASK_TIMEOUT)
                rollout.settled(result.removed, max(i.kill_timeout for i in leaving))
            else:
                result = self.supervisor.proxy().scale(app, n).get(timeout=ASK_TIMEOUT)
                now = self._instances(app)
                self._set_app_pools(app, [(i.name, i.port) for i in now], gone=set())
                pending = rollout.wait_joined({i.name: (i, self._seats(i.name)) for i in now
                                               if i.name in result.added})
            if app in self._apps:
                self._record_app(replace(self._apps[app], instances=n))
            return {**asdict(result), "pending": pending}

    def reload_config(self, config: Config) -> dict:
        """`pmdaemon reload --config` and SIGHUP: apply a changed config in place.

        Refused whole, before anything changes, when a listener's TLS files or strategy cannot be
        built (ConfigError) or a new port cannot be bound (RuntimeError). Then: backends leaving a
        pool are drained; listeners whose port stays keep their socket and connections and swap pool
        and policies at once (requests in flight finish where they are), removed ones stop accepting,
        new ones start; removed apps are stopped, new apps started, apps whose processes would start
        differently are restarted one instance at a time, and an instance count change is a scale.
        """
        with self._operation():
            if self.config is None:
                self.apply(config)
                return {"config": config.source,
                        "listeners": {"added": [listener.port for listener in config.listeners]},
                        "apps": {"started": [a.name for a in config.apps]}}
            return self._reload_config(config)

    def _reload_config(self, config: Config) -> dict:
        units = {unit.config.port: unit for unit in self._units()}
        plan = plan_listeners([unit.config for unit in units.values()], config.listeners, self._next_listener_index)
        paths = {renumbered.index: _listener_path(config, written)
                 for renumbered, written in zip(plan.listeners, config.listeners)}
        apps = plan_apps([self._apps.get(a.name, a) for a in self.config.apps], config.apps)
        # 1. Refuse an invalid config whole: build what each swapped listener needs, bind the new ports.
        for _, listener in plan.kept:
            self._check_listener(listener, paths[listener.index])
        self._alb = alb.attach(self._alb, config, self.supervisor, self._timers)
        with self._lock:
            self._bind(plan.added, paths)
        # 2. Backends leaving a pool may be about to stop: drain them while their pool still routes.
        rollout = self._rollout()
        leaving = [(units[old.port], dropped_backends(old, new)) for old, new in plan.kept]
        leaving += [(units[old.port], list(range(len(old.backends)))) for old in plan.removed]
        leaving += [(units[old.port], list(range(len(old.backends)))) for old, _ in plan.rebound]
        seats = [self._seat(unit, i) for unit, positions in leaving for i in positions]
        rollout.drain(seats, max((self._kill_timeout(seat.instance) for seat in seats), default=0.0))
        # 3. Listeners: swap in place, remove, add.
        with self._lock:
            fresh = dict(self._fanout.units)
            for old in [*plan.removed, *(old for old, _ in plan.rebound)]:
                self._stop_unit(fresh.pop(old.index))
            self._bind([new for _, new in plan.rebound], paths, retry_for=2.0)
            self._start_metrics(plan.listeners)
            for old, new in plan.kept:
                if new == old:
                    self._loop.replace_listener(new)  # nothing changed but its certificates may have
                else:
                    fresh[new.index] = self._swap_unit(fresh[old.index], new)
            for new in [*plan.added, *(new for _, new in plan.rebound)]:
                fresh[new.index] = self._start_unit(new)
            self._fanout.units = fresh
            self.config = replace(config, listeners=plan.listeners)
            self._templates = {}
            self._remember_templates(plan.listeners, config.apps)
        # 4. Processes: removed apps stop (their backends were drained), new ones start, changed ones roll.
        supervisor = self.supervisor.proxy()
        known = set(supervisor.app_names().get(timeout=ASK_TIMEOUT))  # `pmdaemon delete` may have dropped some
        rollout.leave_alb([i.name for app in apps.removed if app in known for i in self._instances(app)]
                          + [i.name for app in (*apps.restarted, *apps.updated) if app.name in known
                             for i in self._instances(app.name)[app.instances:]])
        stopped = [name for app in apps.removed if app in known
                   for name in supervisor.delete(app).get(timeout=ASK_TIMEOUT)]
        rollout.settled(stopped, max((self._kill_timeout(name) for name in stopped), default=0.0))
        for app in apps.removed:
            self._apps.pop(app, None)
        rolling = []
        for app in (*apps.restarted, *apps.updated):
            if app.name not in known:
                continue  # started below, like a new app
            before = {i.name for i in self._instances(app.name)}
            supervisor.update_app(app).get(timeout=ASK_TIMEOUT)
            result = supervisor.scale(app.name, app.instances).get(timeout=ASK_TIMEOUT)
            rollout.settled(result.removed, self._kill_timeout(app.name))
            self._apps[app.name] = app
            if app in apps.restarted:
                rolling += [i for i in self._instances(app.name) if i.name in before]
        for app in (*apps.added, *(a for a in (*apps.restarted, *apps.updated) if a.name not in known)):
            supervisor.start_app(app).get(timeout=ASK_TIMEOUT)
            self._apps[app.name] = app
        report = {
            "config": config.source,
            "listeners": {"kept": [new.port for _, new in plan.kept],
                          "added": [listener.port for listener in plan.added],
                          "removed": [listener.port for listener in plan.removed],
                          "rebound": [new.port for _, new in plan.rebound]},
            "apps": {"started": [a.name for a in apps.added], "stopped": list(apps.removed),
                     "restarted": [a.name for a in apps.restarted], "updated": [a.name for a in apps.updated],
                     "unchanged": list(apps.unchanged)},
        }
        try:
            report["reloaded"] = rollout.restart_each(rolling)
        except RolloutAborted as exc:
            raise RolloutAborted(f"the new config is applied, but its rolling restart stopped: {exc}") from None
        return report

    def _check_listener(self, listener: ListenerConfig, where: str) -> None:
        """What `IOLoop.replace_listener` will build, built once now: a failure refuses the config."""
        try:
            ListenerTls.build(listener)
            self._strategy_factory(listener)
        except (ValueError, OSError, RuntimeError) as exc:  # unreadable TLS files, geo_database...
            raise ConfigError(where, str(exc)) from None

    def _swap_unit(self, unit: ListenerUnit, config: ListenerConfig) -> ListenerUnit:
        """Give listener `unit` a new config on the same socket (caller holds `self._lock`).

        Order matters: the loop swaps first (it may still refuse), then the actors that speak of
        backends by position stop (what they told the Listener is already in its mailbox), then the
        Listener adopts the new pool, then their replacements start, the probe seeded from the
        Listener's rows."""
        self._loop.replace_listener(config)
        old_positions = {backend_key(b): i for i, b in enumerate(unit.config.backends)}
        same_rules = (unit.config.strategy, unit.config.update_interval) == (config.strategy, config.update_interval)
        kept = {i: unit.backends[i] for i, b in enumerate(config.backends)
                if same_rules and old_positions.get(backend_key(b)) == i}
        retired = [unit.probe, unit.breaker, unit.scorer,
                   *(ref for i, ref in enumerate(unit.backends) if kept.get(i) is not ref)]
        same_limits = unit.config.rate_limiting == config.rate_limiting
        same_alerts = unit.config.alerts == config.alerts
        retired += [None if same_limits else unit.ratelimiter, None if same_alerts else unit.alerter]
        listener = unit.listener
        listener.proxy().attach_probe(None).get(timeout=ASK_TIMEOUT)  # no ProcessStatus to a stopped probe
        for ref in retired:
            if ref is not None:
                ref.stop()
        infos = listener.proxy().replace_pool(config).get(timeout=ASK_TIMEOUT)
        seeded = [(info.instance is None or info.process == InstanceStatus.ONLINE, info.healthy) for info in infos]
        probe = HealthProbe.start(config, listener, self.supervisor, self._timers, seeded=seeded)
        listener.proxy().attach_probe(probe).get(timeout=ASK_TIMEOUT)
        backends = tuple(kept.get(i) or Backend.start(config, i, listener) for i in range(len(config.backends)))
        ratelimiter = unit.ratelimiter if same_limits else (
            RateLimiter.start(config.rate_limiting) if config.rate_limiting.enabled else None)
        return ListenerUnit.numbered(
            tuple(info.id for info in infos),
            config=config, listener=listener, probe=probe, backends=backends,
            breaker=CircuitBreaker.start(config, listener, self._timers) if config.circuit_breaker.enabled else None,
            ratelimiter=ratelimiter,
            scorer=(Scorer.start(config, listener, backends, self.supervisor, self._timers)
                    if config.strategy == "performance_based" else None),
            alerter=unit.alerter if same_alerts else self._start_alerter(config),
        )

    def _stop_unit(self, unit: ListenerUnit) -> None:
        """A listener left the config: it stops accepting (requests in flight finish), its actors stop."""
        self._loop.remove_listener(unit.config.index)
        actors = (unit.probe, unit.breaker, unit.scorer, unit.ratelimiter, unit.alerter, *unit.backends, unit.listener)
        for ref in actors:
            if ref is not None:
                ref.stop()

    def _set_app_pools(self, app: str, instances: list[tuple[str, int | None]], gone: set[str]) -> None:
        """After a scale: pools that follow `app` hold exactly `instances`; `gone` leave every pool."""
        with self._lock:
            fresh = dict(self._fanout.units)
            changed = []
            for index, unit in fresh.items():
                config = unit.config
                template = self._templates.get((index, app))
                if template is not None:
                    config = scaled_pool(config, app, instances, template)
                config = replace(config, backends=tuple(b for b in config.backends if b.instance not in gone))
                if config != unit.config:
                    fresh[index] = self._swap_unit(unit, config)
                    changed.append(config)
            self._fanout.units = fresh
            if changed:
                self._start_metrics([unit.config for unit in fresh.values()])
                self.config = with_listeners(self.config, changed)

    def _record_app(self, app: AppConfig) -> None:
        """The app as it runs now (after a scale), for `lb config` and the next reload's comparison."""
        app = replace(app, instance_specs=tuple(instance_spec(app, i) for i in range(app.instances)))
        self._apps[app.name] = app
        if self.config is not None and self.config.app(app.name) is not None:
            self.config = with_app(self.config, app)

    def _remember_templates(self, listeners, apps) -> None:
        """Which pools follow which app's scale: those that hold every instance the config gives it."""
        for listener in listeners:
            for app in apps:
                if follows_app(listener, app.name, (spec.name for spec in app.instance_specs)):
                    template = next(b for b in listener.backends if b.app == app.name)
                    self._templates[(listener.index, app.name)] = template

    def _instances(self, target: str) -> list[Instance]:
        """The instances `target` names (an app, an instance or "all"), in the supervisor's order."""
        infos = self.supervisor.proxy().instances().get(timeout=ASK_TIMEOUT)
        if target != "all":
            infos = [i for i in infos if i.app == target] or [i for i in infos if i.name == target]
            if not infos:
                raise UnknownTarget(f"no app or instance named {target!r}; `pmdaemon list` shows them")
        return [Instance(i.name, i.app, i.port, self._kill_timeout(i.name)) for i in infos]

    def _kill_timeout(self, name: str | None) -> float:
        """kill_timeout of an app, or of the app of an instance (`<app>-<i>`); the default for others."""
        app = self._apps.get(name) or self._apps.get((name or "").rsplit("-", 1)[0])
        return app.kill_timeout if app is not None else AppConfig.kill_timeout

    def _seats(self, name: str) -> list[Seat]:
        return [self._seat(unit, i) for unit in self._units()
                for i, backend in enumerate(unit.config.backends) if backend.instance == name]

    @staticmethod
    def _seat(unit: ListenerUnit, position: int) -> Seat:
        backend = unit.config.backends[position]
        return Seat(unit.config.index, unit.listener, position, unit.ids[position], backend.health_check,
                    backend.instance, unit.probe)

    def _rollout(self) -> Rollout:
        return Rollout(self.supervisor, self._seats, self._in_flight, self._cancelled, self._alb)

    def _in_flight(self, listener: int, backend_id: int) -> int:
        """Requests (or TCP connections) in flight on a backend, as the loop last reported."""
        return self._fanout.active.get((listener, backend_id), 0)

    @contextmanager
    def _operation(self):
        with self._operations:
            if self._cancelled.is_set():
                raise RuntimeError("the daemon is shutting down")
            yield

    # --- lb commands that change state (the queries: control/lbqueries.py) ---

    def listening_address(self, index: int) -> tuple:
        """Where listener `index` is bound (its port when the config said 0)."""
        return self._loop.listening_address(index)

    def lb_drain(self, backend: str) -> dict:
        """Drain `backend` (host:port or instance name) in every listener whose pool holds it."""
        return self._set_draining(backend, drain=True)

    def lb_enable(self, backend: str) -> dict:
        return self._set_draining(backend, drain=False)

    # --- helpers ---

    def _units(self) -> list[ListenerUnit]:
        return list(self._fanout.units.values())

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
                rows.extend({"listener": unit.config.port, "address": info.address, "instance": info.instance,
                             "state": info.state} for info in changed)
            result = {"backend": backend, "draining": drain, "backends": rows}
            if alb_targets:
                result["alb_targets"] = alb_targets
            return result

    def _resolve_backend(self, backend: str) -> list[tuple[ListenerUnit, list[int]]]:
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
