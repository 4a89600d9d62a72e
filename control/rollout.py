"""Rolling operations on running instances: drain, stop, start, wait until healthy, put back.

`pmdaemon reload`, `scale` and `reload --config` (control/runtime.py) are built from these steps. They
run on the thread of the command that asked for them (a control connection, or the SIGHUP thread),
never on an actor's thread or the I/O loop: they `ask` actors short questions and poll.

Where an instance serves is a list of `Seat`s: one per listener whose pool holds it. The steps:

- drain: every seat of the instance is marked draining (no new sessions or unpinned requests), then
  the step waits until the loop reports no request in flight on any of them (`in_flight`, fed by the
  LoopReport gauges the Runtime fans out) or the app's `kill_timeout` has passed. The wait begins
  `DRAIN_SETTLE` after the drain is published: the loop applies a snapshot within one turn and
  reports its gauges every 50 ms, so a request that started just before the drain took effect is
  counted by then.
- leave the ALB: an instance of an app with `aws.alb` has its target deregistered and the step waits
  for ALB's draining (actors/alb.py, `deregister_and_wait`; cut short when the daemon shuts down).
- restart: the supervisor restarts the instance (SIGTERM, SIGKILL after kill_timeout, spawn on the
  same port); the step returns once the supervisor has settled it, so every InstanceEvent of the
  restart is already queued to the Listeners before readiness is asked.
- ready: each seat's backend is `online` and healthy (its health check passed, or without a check its
  port accepted a connection); an instance in no pool is ready when its port accepts, or when online
  if it has no port. An instance that turns `errored` or `stopped` fails at once; otherwise it has
  `ready_timeout` (at least READY_TIMEOUT, more when a check's interval and timeouts need it).
- put back: the seats are enabled, except those an operator had drained before.

A failed step raises `RolloutAborted`; the instances not yet handled were never touched and keep
serving.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pykka

from pmdaemon.actors.alb import deregister_and_wait
from pmdaemon.actors.messages import BackendInfo
from pmdaemon.config.model import HealthCheckConfig
from pmdaemon.states import InstanceStatus

ASK_TIMEOUT = 10.0  # seconds; an actor that does not answer this fast is stuck
DRAIN_SETTLE = 0.15  # seconds: 3 loop report intervals, see the module docstring
POLL_INTERVAL = 0.05  # seconds between two looks at the gauges or the pool table
READY_TIMEOUT = 10.0  # seconds a restarted instance has, at least, to pass its check or accept connections
SETTLE_MARGIN = 10.0  # seconds past kill_timeout for the supervisor to report a restart done


class RolloutAborted(RuntimeError):
    """A step did not complete; the message says which instance and why."""


@dataclass(frozen=True)
class Seat:
    """One backend of one listener: a place where an instance serves."""

    listener_index: int  # ListenerConfig.index
    listener: pykka.ActorRef  # its Listener actor
    position: int  # in ListenerConfig.backends: what the Listener's commands take
    backend_id: int  # BackendView.index: what the loop's gauges count by
    check: HealthCheckConfig | None  # the backend's effective active check
    instance: str | None = None  # the managed instance serving there (None: an external backend)
    probe: pykka.ActorRef | None = None  # the listener's HealthProbe (why a check fails)

    def info(self) -> BackendInfo:
        """What the Listener knows of this backend now (process, healthy, draining, health_error...)."""
        return self.listener.proxy().backends().get(timeout=ASK_TIMEOUT)[self.position]


@dataclass(frozen=True)
class Instance:
    """What a rollout needs of one instance (from the supervisor's `instances()` and the app's config)."""

    name: str
    app: str
    port: int | None
    kill_timeout: float


class Rollout:
    """The steps, bound to one Runtime's supervisor, pools and gauges.

    `seats(name)` lists where an instance serves now, `in_flight(listener_index, backend_id)` is the
    last reported gauge, `cancelled` is set when the daemon shuts down (a waiting step then aborts),
    `alb` is the AlbRegistrar (None when no app has `aws.alb`).
    """

    def __init__(self, supervisor: pykka.ActorRef, seats: Callable[[str], list[Seat]],
                 in_flight: Callable[[int, int], int], cancelled: threading.Event,
                 alb: pykka.ActorRef | None = None):
        self._supervisor = supervisor.proxy()
        self._seats = seats
        self._in_flight = in_flight
        self._cancelled = cancelled
        self._alb = alb

    # --- whole operations ---

    def restart_each(self, instances: Sequence[Instance]) -> list[str]:
        """Drain, restart, wait ready and put back each instance in turn; the names done."""
        done: list[str] = []
        for instance in instances:
            try:
                self.restart_one(instance)
            except RolloutAborted as exc:
                left = [i.name for i in instances[len(done) + 1:]]
                raise RolloutAborted(f"{exc}; reloaded: {', '.join(done) or 'none'}; not reloaded (still "
                                     f"serving): {', '.join(left) or 'none'}") from None
            done.append(instance.name)
        return done

    def restart_one(self, instance: Instance) -> None:
        seats = self._seats(instance.name)
        operator_drained = self.drain(seats, instance.kill_timeout)
        try:
            self.leave_alb([instance.name])
            self.restart(instance)
            self.wait_ready({instance.name: (instance, seats)})
        finally:
            # Put back even after a failure: the pool then follows the instance's health again.
            self.enable([seat for seat, drained in zip(seats, operator_drained) if not drained])

    def drain_out(self, instances: Sequence[Instance]) -> None:
        """Drain every seat of these instances at once (scale down, removal); returns when none has a
        request in flight or the longest kill_timeout has passed, and ALB has drained their targets."""
        seats = [seat for instance in instances for seat in self._seats(instance.name)]
        self.drain(seats, max((i.kill_timeout for i in instances), default=0.0))
        self.leave_alb([instance.name for instance in instances])

    # --- steps ---

    def drain(self, seats: Sequence[Seat], timeout: float) -> list[bool]:
        """Mark the seats draining and wait for their requests in flight (at most `timeout` seconds);
        returns, per seat, whether it was draining already (an operator's `lb drain`)."""
        already = []
        for seat in seats:
            already.append(seat.info().draining)
            seat.listener.proxy().drain([seat.position]).get(timeout=ASK_TIMEOUT)
        if not seats:
            return already
        self._sleep(DRAIN_SETTLE)
        deadline = time.monotonic() + timeout
        while any(self._in_flight(seat.listener_index, seat.backend_id) for seat in seats):
            if time.monotonic() >= deadline:
                break  # kill_timeout bounds a drain, like it bounds a stop
            self._sleep(POLL_INTERVAL)
        return already

    def leave_alb(self, names: Sequence[str]) -> None:
        """Deregister these instances' ALB targets and wait for ALB's draining (nothing without ALB targets)."""
        deregister_and_wait(self._alb, names, wait=self._sleep)

    def enable(self, seats: Sequence[Seat]) -> None:
        for seat in seats:
            try:
                seat.listener.proxy().enable([seat.position]).get(timeout=ASK_TIMEOUT)
            except pykka.ActorDeadError:
                pass  # shutting down

    def restart(self, instance: Instance) -> None:
        if not self._supervisor.restart_instance(instance.name).get(timeout=ASK_TIMEOUT):
            raise RolloutAborted(f"{instance.name} is gone (deleted or scaled away)")
        self.settled([instance.name], instance.kill_timeout)

    def settled(self, names: Sequence[str], kill_timeout: float) -> None:
        """Wait until the supervisor has finished starting or stopping these instances."""
        future = self._supervisor.settled(names).get(timeout=ASK_TIMEOUT)
        try:
            future.get(timeout=kill_timeout + SETTLE_MARGIN)
        except pykka.Timeout:
            raise RolloutAborted(f"{', '.join(names)} did not finish stopping and starting within "
                                 f"{kill_timeout + SETTLE_MARGIN:g} s") from None

    def wait_ready(self, waiting: dict[str, tuple[Instance, list[Seat]]]) -> None:
        """Until every instance is ready (see the module docstring); RolloutAborted naming the first
        one that failed or was not ready in time. `waiting`: name -> (instance, its seats)."""
        failures = self._poll_ready(waiting, stop_at_failure=True)
        if failures:
            raise RolloutAborted(failures[0])

    def wait_joined(self, waiting: dict[str, tuple[Instance, list[Seat]]]) -> dict[str, str]:
        """Like `wait_ready` for instances just added (scale up): nothing to abort, so it waits for all
        of them and returns why each one that is not serving is not ({} when all are)."""
        failures = self._poll_ready(waiting, stop_at_failure=False)
        return {text.split(" ", 1)[0]: text for text in failures}

    def _poll_ready(self, waiting: dict[str, tuple[Instance, list[Seat]]], stop_at_failure: bool) -> list[str]:
        """Poll until every instance is ready or has failed (or the first failure, if asked); the failures."""
        waiting = dict(waiting)
        timeout = ready_timeout([seat for _, seats in waiting.values() for seat in seats])
        deadline = time.monotonic() + timeout
        failures = []
        while True:
            infos = {info.name: info for info in self._supervisor.instances().get(timeout=ASK_TIMEOUT)}
            for name, (instance, seats) in list(waiting.items()):
                info = infos.get(name)
                failure = None
                if info is None:
                    failure = f"{name} is gone (deleted or scaled away)"
                elif info.status in (InstanceStatus.ERRORED, InstanceStatus.STOPPED):
                    failure = f"{name} is {info.status}" + (f": {info.error}" if info.error else "")
                elif info.status == InstanceStatus.ONLINE and _ready(instance, seats):
                    del waiting[name]
                if failure is not None:
                    del waiting[name]
                    failures.append(failure)
                    if stop_at_failure:
                        return failures
            if not waiting:
                return failures
            if time.monotonic() >= deadline:
                return failures + [f"{name} did not become healthy within {timeout:g} s{_last_error(seats)}"
                                   for name, (_, seats) in waiting.items()]
            self._sleep(POLL_INTERVAL * 2)

    def _sleep(self, seconds: float) -> None:
        if self._cancelled.wait(seconds):
            raise RolloutAborted("the daemon is shutting down")


def ready_timeout(seats: Sequence[Seat]) -> float:
    """READY_TIMEOUT, or longer when a check needs it: its interval plus every probe timing out."""
    needed = [seat.check.interval + (seat.check.retries + 1) * seat.check.timeout
              for seat in seats if seat.check is not None]
    return max([READY_TIMEOUT, *needed])


def _ready(instance: Instance, seats: Sequence[Seat]) -> bool:
    if seats:
        return all(info.process == InstanceStatus.ONLINE and info.healthy for info in (seat.info() for seat in seats))
    return instance.port is None or port_accepts(instance.port)


def _last_error(seats: Sequence[Seat]) -> str:
    for seat in seats:
        if seat.probe is not None:
            error = seat.probe.proxy().status().get(timeout=ASK_TIMEOUT)[seat.position].last_error
            if error:
                return f" (last check: {error})"
    return ""


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0
