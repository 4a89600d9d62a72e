"""HealthProbe actor: active checks of one listener's backends, health changes told to its Listener actor.

Theory of operation:
- Each backend has a `CheckTarget` (control/healthcheck.py) and a `HealthCounter`. A backend is only
  checked while its process runs (the Listener tells `ProcessStatus`; a backend without a managed
  instance always runs). It starts down.
- Rounds run on a bounded thread pool, so a slow or hanging backend occupies one worker and never
  delays another backend's checks; the result comes back to this actor as a `_RoundDone` message.
  The next round of a backend is scheduled (shared `Timers`) when its result arrives.
- Cadence: during the first `interval` after its process starts, a backend is checked every
  `STARTING_INTERVAL` (0.5 s), so it comes up as soon as it answers, not one interval later; first
  checks are spread over that short window. Then every `interval`; connect probes of a backend that
  is down stay at the fast cadence. Failures in the starting window do not count towards
  `restart_unhealthy`.
- Every change of `healthy` is told to the Listener at once as a `HealthEvent`. With
  `restart_unhealthy`, `failure_threshold` failed rounds after the starting window make the
  supervisor restart that instance (once per process run).
- A generation number per backend drops results of rounds that started before a reset (process
  restart, ejection), so a stale "up" never undoes a newer "down".
- A pool replacement (`scale`, `reload --config`) starts a new probe `seeded` with what the Listener
  knows of each backend (process running, healthy), so a backend that was up stays up and is told
  down when its checks fail, without starting over.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pykka

from pmdaemon.actors.messages import HealthEvent, HealthInfo, MarkDown, ProcessStatus, Tick
from pmdaemon.config.model import ListenerConfig
from pmdaemon.control.healthcheck import STARTING_INTERVAL, CheckTarget, HealthCounter, run_round
from pmdaemon.control.timers import TimerHandle, Timers
from pmdaemon.states import BackendState

MAX_CHECK_THREADS = 16


@dataclass(frozen=True)
class _RoundDone:
    """Internal: a check round finished on the pool."""

    backend: int
    generation: int
    error: str | None
    finished_at: float  # time.time(), for `lb health`


class _BackendCheck:
    """Mutable per-backend state, touched only by the actor's thread."""

    def __init__(self, target: CheckTarget, running: bool, healthy: bool = False):
        self.target = target
        self.counter = HealthCounter(target.failure_threshold, target.success_threshold)
        self.counter.healthy = healthy
        self.running = running
        # A backend already up is past its starting window: normal cadence, failures count.
        self.running_since = time.monotonic() - (target.interval if healthy else 0.0)
        self.generation = 0
        self.timer: TimerHandle | None = None
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.restart_requested = False

    def starting(self, now: float) -> bool:
        return now - self.running_since < self.target.interval

    def next_delay(self, now: float) -> float:
        if self.starting(now) or (self.target.kind == "connect" and not self.counter.healthy):
            return min(self.target.interval, STARTING_INTERVAL)
        return self.target.interval


class HealthProbe(pykka.ThreadingActor):
    def __init__(self, listener: ListenerConfig, listener_ref: pykka.ActorRef,
                 supervisor_ref: pykka.ActorRef | None, timers: Timers,
                 seeded: Sequence[tuple[bool, bool]] = ()):
        """`seeded`: (running, healthy) per backend, in `listener.backends` order, when this probe
        replaces one (pool replacement); otherwise each backend starts down."""
        super().__init__()
        self._listener_ref = listener_ref
        self._supervisor_ref = supervisor_ref
        self._timers = timers
        seeded = seeded or [(b.instance is None, False) for b in listener.backends]
        self._checks = [_BackendCheck(CheckTarget.for_backend(b, listener), running, healthy and running)
                        for b, (running, healthy) in zip(listener.backends, seeded)]
        self._backends = listener.backends
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(MAX_CHECK_THREADS, len(self._checks))),
                                        thread_name_prefix=f"health-{listener.port}")

    def on_start(self) -> None:
        self._spread_first_rounds([i for i, check in enumerate(self._checks) if check.running])

    def on_stop(self) -> None:
        for check in self._checks:
            if check.timer:
                check.timer.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def on_receive(self, message: object) -> None:
        match message:
            case Tick(key=("round", index, generation)):
                self._start_round(index, generation)
            case _RoundDone():
                self._round_done(message)
            case ProcessStatus(backend=index, running=running):
                self._process_status(index, running)
            case MarkDown(backend=index, reason=reason):
                self._mark_down(index, reason)

    # --- queries (asked by the Runtime) ---

    def status(self) -> list[HealthInfo]:
        """One record per backend, in ListenerConfig.backends order."""
        return [HealthInfo(
            backend=self._backends[i].address,
            instance=self._backends[i].instance,
            check=check.target.description,
            state=BackendState.UP if check.counter.healthy else BackendState.DOWN,
            checking=check.running,
            last_check=check.last_check,
            consecutive_failures=check.counter.consecutive_failures,
            consecutive_successes=check.counter.consecutive_successes,
            last_error=check.last_error,
        ) for i, check in enumerate(self._checks)]

    def check_now(self) -> list[tuple[HealthInfo, Future]]:
        """Run every backend's check once, now, on the pool; the caller waits on the futures (each
        backend's record says which check it is).

        Results do not feed the up/down counters: `lb health-check --test` observes, it does not steer.
        """
        return [(info, self._pool.submit(run_round, check.target))
                for info, check in zip(self.status(), self._checks)]

    # --- message handlers ---

    def _spread_first_rounds(self, indexes: list[int]) -> None:
        for n, index in enumerate(indexes):
            check = self._checks[index]
            window = min(check.target.interval, STARTING_INTERVAL)
            self._schedule(index, window * n / max(1, len(indexes)))

    def _schedule(self, index: int, delay: float) -> None:
        check = self._checks[index]
        if check.timer:
            check.timer.cancel()
        check.timer = self._timers.tell_later(delay, self.actor_ref, Tick(("round", index, check.generation)))

    def _start_round(self, index: int, generation: int) -> None:
        check = self._checks[index]
        if generation != check.generation or not check.running:
            return
        check.timer = None
        future = self._pool.submit(run_round, check.target)
        future.add_done_callback(lambda f: self._tell_self(_RoundDone(
            index, generation, _error_of(f), time.time())))

    def _tell_self(self, message: object) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass

    def _round_done(self, done: _RoundDone) -> None:
        check = self._checks[done.backend]
        if done.generation != check.generation or not check.running:
            return
        check.last_check = done.finished_at
        check.last_error = done.error
        if check.counter.record(done.error is None):
            self._listener_ref.tell(HealthEvent(done.backend, check.counter.healthy, done.error))
        now = time.monotonic()
        if done.error is not None:
            self._maybe_restart(done.backend, now)
        self._schedule(done.backend, check.next_delay(now))

    def _maybe_restart(self, index: int, now: float) -> None:
        check = self._checks[index]
        instance = self._backends[index].instance
        if (check.target.restart_unhealthy and instance and self._supervisor_ref is not None
                and not check.restart_requested and not check.starting(now)
                and check.counter.consecutive_failures >= check.target.failure_threshold):
            check.restart_requested = True
            self._supervisor_ref.proxy().restart_instance(instance)

    def _process_status(self, index: int, running: bool) -> None:
        check = self._checks[index]
        if running == check.running:
            return
        check.running = running
        check.generation += 1
        check.counter.reset()
        check.restart_requested = False
        if check.timer:
            check.timer.cancel()
            check.timer = None
        if running:
            check.running_since = time.monotonic()
            self._spread_first_rounds([index])

    def _mark_down(self, index: int, reason: str) -> None:
        check = self._checks[index]
        check.generation += 1
        check.counter.reset()
        check.last_error = reason
        if check.running:
            self._schedule(index, check.next_delay(time.monotonic()))


def _error_of(future: Future) -> str | None:
    if future.cancelled():
        return "cancelled"
    exception = future.exception()
    if exception is not None:
        return f"check crashed: {exception!r}"
    return future.result()
