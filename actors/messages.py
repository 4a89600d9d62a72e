"""Messages the actors `tell` each other, and the records they answer `ask`s with. Frozen dataclasses:
a message is never mutated after send. They become dicts only where the control socket answers.
"""
from __future__ import annotations

from dataclasses import dataclass

from pmdaemon.control.perfscore import BackendMetrics
from pmdaemon.net.snapshot import Outcome
from pmdaemon.states import BackendState, BreakerState, InstanceStatus


@dataclass(frozen=True)
class InstanceEvent:
    """ProcessSupervisor -> subscribers: an instance changed status (or its current state on subscribe)."""

    name: str
    app: str
    status: InstanceStatus
    pid: int | None
    port: int | None
    removed: bool = False  # the instance was deleted (or scaled away) and will not come back


@dataclass(frozen=True)
class InstanceInfo:
    """ProcessSupervisor -> whoever asks (`instances()`, `settled()`): one instance. `pmdaemon list`
    prints these fields as they are (the control socket sends `asdict()` of each)."""

    name: str
    app: str
    index: int
    status: InstanceStatus
    pid: int | None
    port: int | None
    uptime: float  # seconds since the spawn; 0.0 when not running
    restarts: int
    cpu: float  # % of one core, of the process tree since the last sample
    memory: int  # resident bytes of the process tree
    error: str | None  # why it is errored (or was not started)


@dataclass(frozen=True)
class ScaleResult:
    """ProcessSupervisor -> Runtime (`scale()`): what a scale changed. The Runtime waits for `added` to
    join their pools and for `removed` to be gone; `pmdaemon scale` prints these fields."""

    app: str
    instances: int
    added: tuple[str, ...]  # started, lowest index first
    removed: tuple[str, ...]  # asked to stop and be forgotten, highest index first


@dataclass(frozen=True)
class BackendInfo:
    """Listener -> whoever asks (`backends()`, `drain()`, `enable()`, `replace_pool()`): one backend of
    its pool table, the parts of `lb backends` the Listener knows."""

    id: int  # BackendView.index
    address: str
    instance: str | None
    app: str | None
    process: InstanceStatus | None  # the instance's last status; None for a backend with no managed instance
    state: BackendState  # as the loop routes by it
    healthy: bool
    health_error: str | None
    breaker: BreakerState
    draining: bool
    weight: int
    region: str | None


@dataclass(frozen=True)
class HealthInfo:
    """HealthProbe -> whoever asks (`status()`, `check_now()`): one backend's active checks. The rollout
    reads `last_error` to say why an instance did not come up; `lb health` prints these fields."""

    backend: str  # the backend's address
    instance: str | None
    check: str  # what a round does, e.g. "GET http://127.0.0.1:3000/health"
    state: BackendState  # UP or DOWN, as the checks decided
    checking: bool  # its process runs, so rounds are scheduled
    last_check: float | None  # time.time() of the last finished round
    consecutive_failures: int
    consecutive_successes: int
    last_error: str | None  # why the last round failed (or the backend was ejected)


@dataclass(frozen=True)
class BackendTraffic:
    """Backend -> whoever asks (`stats()`): the roll-up of one backend's live traffic. The Scorer reads
    the EWMAs, `lb backends` the counts and rates."""

    address: str
    active: int  # requests (HTTP) or connections (TCP) in flight at the last report
    requests: int
    errors: int
    bytes_in: int
    bytes_out: int
    latency_ewma: float | None  # seconds; None before the first success
    error_rate: float | None  # over the last minute; None without requests in it
    error_rate_ewma: float | None  # 0..1; None before the first request
    requests_per_second: float


@dataclass(frozen=True)
class BackendScore:
    """Scorer -> whoever asks (`scores()`): a performance_based backend's score at the last update (the
    weight it is moving to, 1..100, 100 = the best backend) and the metrics the score came from (None
    before the first update)."""

    score: int
    metrics: BackendMetrics | None


@dataclass(frozen=True)
class InstanceUsage:
    """ProcessSupervisor -> usage subscribers, every sampling tick: the whole picture of the running
    instances whose app has `monitoring.metrics_collection`; an instance left out is not running (or
    no longer collected)."""

    # (instance name, CPU % of one core, resident bytes) of the process tree
    samples: tuple[tuple[str, float, int], ...]


@dataclass(frozen=True)
class HealthEvent:
    """HealthProbe -> Listener: a backend's health state changed (or was reset to down)."""

    backend: int  # BackendConfig index in the listener
    healthy: bool
    error: str | None = None  # why the last check failed, if it did


@dataclass(frozen=True)
class BreakerEvent:
    """CircuitBreaker -> Listener: a backend's breaker changed state."""

    backend: int
    state: BreakerState


@dataclass(frozen=True)
class BackendOutcomes:
    """Runtime's report fan-out -> Backend / CircuitBreaker / RateLimiter actors: one listener's share of a
    LoopReport."""

    outcomes: tuple[Outcome, ...]
    active: int = 0  # requests (HTTP) or connections (TCP) in flight on this backend at report time


@dataclass(frozen=True)
class Eject:
    """Backend -> Listener: live traffic failed on this backend (health_aware_round_robin passive ejection)."""

    backend: int
    reason: str


@dataclass(frozen=True)
class ProcessStatus:
    """Listener -> HealthProbe: the backend's process became routable (online) or stopped being so.

    The probe only checks backends whose process runs, and a backend whose process (re)starts is
    down again until its first passing check.
    """

    backend: int
    running: bool


@dataclass(frozen=True)
class MarkDown:
    """Listener -> HealthProbe: treat this backend as failed (it was ejected); it needs passing rounds again."""

    backend: int
    reason: str


@dataclass(frozen=True)
class Tick:
    """A timer firing inside one actor (sent by `control/timers.py`); `key` says which timer."""

    key: object


@dataclass(frozen=True)
class EffectiveWeights:
    """Scorer -> Listener (performance_based): the weight of each backend, in ListenerConfig.backends order."""

    weights: tuple[int, ...]
