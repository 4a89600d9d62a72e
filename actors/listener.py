"""Listener actor: owns one listener's pool table and publishes it to the I/O loop as a `PoolSnapshot`.

Theory of operation. For every backend of the listener the table merges what the other actors say:
- process: the supervisor's `InstanceEvent`s; only an `online` instance is routable; a backend
  without a managed instance is always "process ok";
- health: `HealthEvent`s from the HealthProbe (active checks, or connect probes for backends without
  checks). A backend starts down and comes up at its first passing check (decisions.md section 8);
  when its process leaves `online` it is down again and the probe starts over;
- breaker: `BreakerEvent`s from the CircuitBreaker actor;
- drain flag (`drain` / `enable`);
- quarantine (health_aware_round_robin only): a backend that turns unhealthy or is ejected by live
  traffic (`Eject` from its Backend actor) stays out at least `quarantine_duration`. The passive rule
  alone never ejects the last routable backend;
- effective weight (performance_based: `EffectiveWeights` from the Scorer actor).

Pool-wide options (`quarantine_duration`, `exclude_unhealthy`) come from the ListenerConfig, where
the config loader has already merged the apps' `load_balancer` blocks. With `exclude_unhealthy:
false` health only informs (`lb health`); it never takes a backend out of the pool.

The state the loop sees, first match wins: process not online, unhealthy or quarantined -> DOWN;
breaker open -> OPEN; draining -> DRAINING; breaker half-open -> HALF_OPEN (with the configured
number of trial slots, which the loop enforces locally); else UP. Every change of the table that
changes what the loop sees publishes a new immutable snapshot with the next version.

Replacing the pool (`replace_pool`, for `scale` and `reload --config`): the table is rebuilt for the
new ListenerConfig; a backend already in the pool (same address and instance) keeps what is known of
it (process, health, drain, quarantine) and its id, a new one starts down, taking its instance's
status from the last InstanceEvent heard (the actor remembers every instance's, pooled or not). The
other actors address backends by position in `config.backends`; the loop and the snapshot by id
(`BackendView.index`): ids start equal to positions and stay with their backend, and a new backend
gets an id never used before in this listener, so a request in flight across a replacement is still
counted against the right backend. `replace_pool` returns the rows, ids included, so the Runtime
can map ids back to positions.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pykka

from pmdaemon.actors.messages import (
    BackendInfo,
    BreakerEvent,
    EffectiveWeights,
    Eject,
    HealthEvent,
    InstanceEvent,
    MarkDown,
    ProcessStatus,
    Tick,
)
from pmdaemon.config.model import BackendConfig, ListenerConfig
from pmdaemon.control.timers import Timers
from pmdaemon.net.snapshot import BackendView, PoolSnapshot
from pmdaemon.states import BackendState, BreakerState, InstanceStatus


@dataclass
class _PoolRow:
    """What the Listener knows about one backend; mutated only by the actor's thread."""

    config: BackendConfig
    id: int  # BackendView.index: kept across pool replacements, never reused in this listener
    instance_status: InstanceStatus | None  # None: not a managed instance
    healthy: bool = False
    health_error: str | None = None
    breaker: BreakerState = BreakerState.CLOSED
    draining: bool = False
    quarantined_until: float = 0.0  # time.monotonic()
    weight: int = 1

    @property
    def process_ok(self) -> bool:
        return self.config.instance is None or self.instance_status == InstanceStatus.ONLINE


class Listener(pykka.ThreadingActor):
    def __init__(self, config: ListenerConfig, publish: Callable[[PoolSnapshot], None], timers: Timers):
        super().__init__()
        self.config = config
        self._publish_to_loop = publish
        self._timers = timers
        self._instance_statuses: dict[str, InstanceStatus] = {}  # every instance's last status, pooled or not
        self._rows = [self._new_row(b, i) for i, b in enumerate(config.backends)]
        self._next_id = len(self._rows)
        self._probe: pykka.ActorRef | None = None
        self._version = 0
        self._published: tuple[BackendView, ...] | None = None
        self._quarantine_aware = config.strategy == "health_aware_round_robin"

    def on_start(self) -> None:
        self._publish()

    # --- wiring and commands (asked by the Runtime) ---

    def attach_probe(self, probe_ref: pykka.ActorRef | None) -> None:
        """The HealthProbe is created after this actor (it needs our ref); it is told of process changes,
        at once of every backend's (a probe replaced with the pool may have missed some)."""
        self._probe = probe_ref
        if probe_ref is not None:
            for i, row in enumerate(self._rows):
                probe_ref.tell(ProcessStatus(i, row.process_ok))

    def replace_pool(self, config: ListenerConfig) -> list[BackendInfo]:
        """Adopt `config` (same listener, new pool or policies) and publish. The probe is detached:
        the Runtime stops the old one first and attaches one for the new pool, seeded from the rows
        returned (each backend's `BackendInfo`, in `config.backends` order). Breakers start closed:
        the Runtime starts a new CircuitBreaker too."""
        kept = {(row.config.address, row.config.instance): row for row in self._rows}
        rows = []
        for backend in config.backends:
            row = kept.get((backend.address, backend.instance))
            if row is None:
                row = self._new_row(backend, self._next_id)
                self._next_id += 1
            else:
                row.config = backend
                row.weight = backend.weight
                row.breaker = BreakerState.CLOSED
            rows.append(row)
        self.config = config
        self._rows = rows
        self._probe = None
        self._quarantine_aware = config.strategy == "health_aware_round_robin"
        self._publish()
        return self.backends()

    def drain(self, indexes: list[int]) -> list[BackendInfo]:
        for i in indexes:
            self._rows[i].draining = True
        self._publish()
        return [self._info(i) for i in indexes]

    def enable(self, indexes: list[int]) -> list[BackendInfo]:
        for i in indexes:
            self._rows[i].draining = False
        self._publish()
        return [self._info(i) for i in indexes]

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(self.config.index, self._version, self._published or ())

    def backends(self) -> list[BackendInfo]:
        return [self._info(i) for i in range(len(self._rows))]

    # --- messages from other actors ---

    def on_receive(self, message: object) -> None:
        match message:
            case InstanceEvent():
                self._instance_event(message)
            case HealthEvent():
                self._health_event(message)
            case BreakerEvent(backend=i, state=state):
                self._rows[i].breaker = state
                self._publish()
            case Eject():
                self._eject(message)
            case EffectiveWeights(weights=weights):
                for i, weight in enumerate(weights):
                    self._rows[i].weight = weight
                self._publish()
            case Tick(key="quarantine"):
                self._publish()

    def _new_row(self, backend: BackendConfig, backend_id: int) -> _PoolRow:
        status = (None if backend.instance is None
                  else self._instance_statuses.get(backend.instance, InstanceStatus.UNKNOWN))
        return _PoolRow(backend, id=backend_id, instance_status=status, weight=backend.weight)

    def _instance_event(self, event: InstanceEvent) -> None:
        status = InstanceStatus.REMOVED if event.removed else event.status
        if event.removed:
            self._instance_statuses.pop(event.name, None)
        else:
            self._instance_statuses[event.name] = status
        for i, row in enumerate(self._rows):
            if row.config.instance != event.name:
                continue
            was_ok = row.process_ok
            row.instance_status = status
            if was_ok != row.process_ok:
                if not row.process_ok:
                    row.healthy = False
                if self._probe is not None:
                    self._probe.tell(ProcessStatus(i, row.process_ok))
        self._publish()

    def _health_event(self, event: HealthEvent) -> None:
        row = self._rows[event.backend]
        if row.healthy and not event.healthy:
            self._quarantine(event.backend)
        row.healthy = event.healthy
        row.health_error = event.error
        self._publish()

    def _eject(self, event: Eject) -> None:
        """Passive ejection (health_aware_round_robin): out now, back after quarantine and a passing check."""
        if not self._quarantine_aware:
            return
        now = time.monotonic()
        if self._view_state(event.backend, now) != BackendState.UP:
            return
        others_routable = sum(1 for i in range(len(self._rows)) if i != event.backend
                              and self._view_state(i, now) in (BackendState.UP, BackendState.HALF_OPEN))
        if others_routable == 0:
            return
        row = self._rows[event.backend]
        row.healthy = False
        row.health_error = f"ejected: {event.reason}"
        self._quarantine(event.backend)
        if self._probe is not None:
            self._probe.tell(MarkDown(event.backend, row.health_error))
        self._publish()

    def _quarantine(self, index: int) -> None:
        if not self._quarantine_aware:
            return
        duration = self.config.quarantine_duration
        if duration > 0:
            self._rows[index].quarantined_until = time.monotonic() + duration
            self._timers.tell_later(duration, self.actor_ref, Tick("quarantine"))

    # --- the merge ---

    def _view_state(self, index: int, now: float) -> BackendState:
        row = self._rows[index]
        if not row.process_ok:
            return BackendState.DOWN
        if self.config.exclude_unhealthy and (not row.healthy or now < row.quarantined_until):
            return BackendState.DOWN
        if row.breaker == BreakerState.OPEN:
            return BackendState.OPEN
        if row.draining:
            return BackendState.DRAINING
        if row.breaker == BreakerState.HALF_OPEN:
            return BackendState.HALF_OPEN
        return BackendState.UP

    def _views(self) -> tuple[BackendView, ...]:
        now = time.monotonic()
        views = []
        for i, row in enumerate(self._rows):
            state = self._view_state(i, now)
            views.append(BackendView(
                index=row.id, host=row.config.host, port=row.config.port, instance=row.config.instance,
                weight=row.weight, state=state, region=row.config.region,
                half_open_slots=(self.config.circuit_breaker.half_open_requests
                                 if state == BackendState.HALF_OPEN else 0),
            ))
        return tuple(views)

    def _publish(self) -> None:
        views = self._views()
        if views == self._published:
            return
        self._published = views
        self._version += 1
        self._publish_to_loop(PoolSnapshot(self.config.index, self._version, views))

    def _info(self, index: int) -> BackendInfo:
        row = self._rows[index]
        view = self._published[index] if self._published else None
        return BackendInfo(
            id=row.id, address=row.config.address, instance=row.config.instance, app=row.config.app,
            process=row.instance_status, state=view.state if view else BackendState.DOWN, healthy=row.healthy,
            health_error=row.health_error, breaker=row.breaker, draining=row.draining, weight=row.weight,
            region=row.config.region,
        )
