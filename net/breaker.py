"""The circuit breaker state machine for one backend (decisions.md section 6). Pure: time is passed in.

Theory of operation
-------------------
A breaker is in one of three states:

* CLOSED: traffic flows. Every request outcome is `record()`ed. A success resets the count of
  consecutive failures; a failure (connect error, timeout, reset, 5xx from the backend; never a
  response the load balancer made itself) increments it. When the count reaches
  `failure_threshold` the breaker trips: OPEN, with the trip time remembered.

* OPEN: the backend gets no traffic. Outcomes of requests that were already in flight when it
  tripped are ignored: they say nothing new and must not extend the penalty. Once
  `recovery_timeout` seconds have passed since the trip, the breaker is HALF_OPEN. That change
  happens by the passage of time alone, so every query takes `now` and `state(now)` reports it
  (`reopens_at` says when, for whoever schedules a wake-up).

* HALF_OPEN: the backend is probed with real traffic. At most `half_open_requests` trial requests
  are admitted (`try_acquire_trial`), so at most that many are in flight at once and at most that
  many are needed for a verdict. Each trial ends with `release_trial(success)`:
    - any failure: OPEN again, the recovery timer restarted from this failure;
    - `half_open_requests` successes: CLOSED, failure count zero.
  A trial that ended without a verdict (the client went away first) gives its slot back
  (`release_trial(None)`), so a breaker can never stay half-open for want of free slots.
  Outcomes `record()`ed while HALF_OPEN by a caller that does not gate trials itself (the control
  plane, which hears outcomes after the fact) count as trial verdicts in the same way.

`record()` and `release_trial()` return the state after the event, so the owner can publish a change
without comparing snapshots.
"""
from __future__ import annotations

from net.snapshot import HALF_OPEN, OPEN

CLOSED = "closed"


class Breaker:
    __slots__ = (
        "failure_threshold",
        "recovery_timeout",
        "half_open_requests",
        "_state",
        "_failures",
        "_opened_at",
        "_trials_in_flight",
        "_trial_successes",
    )

    def __init__(self, failure_threshold: int, recovery_timeout: float, half_open_requests: int) -> None:
        if failure_threshold < 1 or half_open_requests < 1:
            raise ValueError("failure_threshold and half_open_requests must be at least 1")
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_requests = half_open_requests
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials_in_flight = 0
        self._trial_successes = 0

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def reopens_at(self) -> float | None:
        """When an OPEN breaker turns HALF_OPEN; None in the other states."""
        return self._opened_at + self.recovery_timeout if self._state == OPEN else None

    def state(self, now: float) -> str:
        if self._state == OPEN and now >= self._opened_at + self.recovery_timeout:
            self._state = HALF_OPEN
            self._trials_in_flight = 0
            self._trial_successes = 0
        return self._state

    def record(self, success: bool, now: float) -> str:
        """The outcome of one request to this backend; returns the state afterwards."""
        state = self.state(now)
        if state == CLOSED:
            if success:
                self._failures = 0
            else:
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._trip(now)
        elif state == HALF_OPEN:
            if success:
                self._trial_successes += 1
                if self._trial_successes >= self.half_open_requests:
                    self._state = CLOSED
                    self._failures = 0
            else:
                self._trip(now)
        return self._state

    def try_acquire_trial(self, now: float) -> bool:
        """May one more trial request go to the backend now? True = admitted, a slot is taken."""
        if self.state(now) != HALF_OPEN:
            return False
        if self._trials_in_flight + self._trial_successes >= self.half_open_requests:
            return False
        self._trials_in_flight += 1
        return True

    def release_trial(self, success: bool | None, now: float) -> str:
        """End a trial taken with `try_acquire_trial`: True/False = its verdict, None = no verdict."""
        if self._state == HALF_OPEN and self._trials_in_flight > 0:
            self._trials_in_flight -= 1
            if success is not None:
                return self.record(success, now)
        return self.state(now)

    def _trip(self, now: float) -> None:
        self._state = OPEN
        self._opened_at = now
        self._failures = 0
        self._trials_in_flight = 0
        self._trial_successes = 0
