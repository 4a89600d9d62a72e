"""CircuitBreaker actor: one `net.breaker.Breaker` per backend of a listener, fed with the loop's outcomes.

It hears outcomes after the fact (batched `BackendOutcomes`), records each one that says something
about its backend as a success or failure (`net.breaker.verdict`: a 502/504 the balancer answered
because the backend failed counts, a 429 or 503 it made for its own reasons does not), and tells
the Listener actor a `BreakerEvent` whenever a backend's breaker changes state. OPEN turns into
HALF_OPEN by the passage of time alone, so when a breaker trips the actor asks the shared `Timers`
for a `Tick` at `reopens_at` and publishes the change then. While a backend is HALF_OPEN the loop
admits at most `half_open_requests` trial requests per half-open period
(`BackendView.half_open_slots`, counted by the loop's `net.breaker.TrialSlots`); their outcomes
come back here and close or re-open the breaker.
"""
from __future__ import annotations

import time

import pykka

from pmdaemon.actors.messages import BackendOutcomes, BreakerEvent, Tick
from pmdaemon.config.model import ListenerConfig
from pmdaemon.control.timers import Timers
from pmdaemon.net.breaker import BACKEND_FAILURES, Breaker, verdict
from pmdaemon.net.snapshot import Outcome
from pmdaemon.states import BreakerState


def is_backend_failure(outcome: Outcome) -> bool:
    """decisions.md section 6: a connect error, timeout, reset or 5xx from the backend."""
    return outcome.error in BACKEND_FAILURES or outcome.status >= 500


class CircuitBreaker(pykka.ThreadingActor):
    def __init__(self, listener: ListenerConfig, listener_ref: pykka.ActorRef, timers: Timers):
        super().__init__()
        policy = listener.circuit_breaker
        self._breakers = [Breaker(policy.failure_threshold, policy.recovery_timeout, policy.half_open_requests)
                          for _ in listener.backends]
        self._published = [BreakerState.CLOSED] * len(self._breakers)
        self._wake_at: list[float | None] = [None] * len(self._breakers)  # scheduled recovery Tick
        self._listener_ref = listener_ref
        self._timers = timers

    def on_receive(self, message: object) -> None:
        match message:
            case BackendOutcomes(outcomes=outcomes):
                now = time.monotonic()
                touched = set()
                for outcome in outcomes:
                    success = verdict(outcome)  # a 502/504 the balancer made for this backend is a failure
                    if success is None or outcome.backend >= len(self._breakers):
                        continue
                    self._breakers[outcome.backend].record(success, now)
                    touched.add(outcome.backend)
                for index in sorted(touched):
                    self._publish_if_changed(index, now)
            case Tick(key=("recover", index)):
                self._wake_at[index] = None
                self._publish_if_changed(index, time.monotonic())

    def states(self) -> list[dict]:
        now = time.monotonic()
        return [{"state": b.state(now), "consecutive_failures": b.consecutive_failures, "reopens_in":
                 None if b.reopens_at is None else max(0.0, b.reopens_at - now)} for b in self._breakers]

    def _publish_if_changed(self, index: int, now: float) -> None:
        breaker = self._breakers[index]
        state = breaker.state(now)
        if state != self._published[index]:
            self._published[index] = state
            self._listener_ref.tell(BreakerEvent(index, state))
        # A trial failure re-opens with a new trip time, possibly without a visible change (OPEN ->
        # HALF_OPEN -> OPEN within one batch): make sure a Tick is due at the current reopens_at.
        if state == BreakerState.OPEN and self._wake_at[index] != breaker.reopens_at:
            self._wake_at[index] = breaker.reopens_at
            self._timers.tell_later(breaker.reopens_at - now, self.actor_ref, Tick(("recover", index)))
