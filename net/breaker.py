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

Where the pieces run: the CircuitBreaker actor owns one `Breaker` per backend and turns each Outcome
into a success, a failure or nothing with `verdict()` (a 502/504 the balancer answered for a failed
backend is that backend's failure; a client that went away or stalled, a 429 or 503 the balancer
made, say nothing). The I/O loop holds the HALF_OPEN gate itself, as a local read: `TrialSlots`
counts each half-open backend's trials until the control plane's next snapshot.
"""
from __future__ import annotations

from pmdaemon.net.snapshot import Outcome
from pmdaemon.states import BackendState, BreakerState, ErrorKind

BACKEND_FAILURES = frozenset({ErrorKind.CONNECT, ErrorKind.TIMEOUT, ErrorKind.RESET, ErrorKind.INVALID_RESPONSE})
CLIENT_FAILURES = frozenset({ErrorKind.CLIENT_CLOSED, ErrorKind.CLIENT_TIMEOUT})  # the client went away or stalled


def verdict(outcome: Outcome) -> bool | None:
    """What one request's Outcome says about its backend: False = a failure (a connect error, timeout,
    reset or invalid response, also when the load balancer answered 502/504 for it, or a 5xx from the
    backend), True = a success, None = nothing: no backend, the client went away or stalled first, or a
    response the load balancer made for its own reasons (429, 503...). Breakers and trial slots count
    only verdicts."""
    if outcome.backend < 0 or outcome.error in CLIENT_FAILURES:
        return None
    if outcome.error in BACKEND_FAILURES:
        return False
    if outcome.lb_made:
        return None
    return outcome.status < 500


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
        self._state = BreakerState.CLOSED
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
        return self._opened_at + self.recovery_timeout if self._state == BreakerState.OPEN else None

    def state(self, now: float) -> BreakerState:
        if self._state == BreakerState.OPEN and now >= self._opened_at + self.recovery_timeout:
            self._state = BreakerState.HALF_OPEN
            self._trials_in_flight = 0
            self._trial_successes = 0
        return self._state

    def record(self, success: bool, now: float) -> BreakerState:
        """The outcome of one request to this backend; returns the state afterwards."""
        state = self.state(now)
        if state == BreakerState.CLOSED:
            if success:
                self._failures = 0
            else:
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._trip(now)
        elif state == BreakerState.HALF_OPEN:
            if success:
                self._trial_successes += 1
                if self._trial_successes >= self.half_open_requests:
                    self._state = BreakerState.CLOSED
                    self._failures = 0
            else:
                self._trip(now)
        return self._state

    def try_acquire_trial(self, now: float) -> bool:
        """May one more trial request go to the backend now? True = admitted, a slot is taken."""
        if self.state(now) != BreakerState.HALF_OPEN:
            return False
        if self._trials_in_flight + self._trial_successes >= self.half_open_requests:
            return False
        self._trials_in_flight += 1
        return True

    def release_trial(self, success: bool | None, now: float) -> BreakerState:
        """End a trial taken with `try_acquire_trial`: True/False = its verdict, None = no verdict."""
        if self._state == BreakerState.HALF_OPEN and self._trials_in_flight > 0:
            self._trials_in_flight -= 1
            if success is not None:
                return self.record(success, now)
        return self.state(now)

    def _trip(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._failures = 0
        self._trials_in_flight = 0
        self._trial_successes = 0


class TrialSlots:
    """The loop's share of HALF_OPEN for one listener: how many more trial requests each half-open
    backend may take, as a local read per request.

    The CircuitBreaker actor hears outcomes a report later (up to 50 ms and an actor hop), so the loop
    must not go on sending to a half-open backend while it waits: in one half-open period a backend
    takes at most `half_open_slots` trials, counting those in flight plus those that ended with a
    verdict (`verdict` is not None). A trial that ended without one (the client went away) frees its
    slot, as `Breaker.release_trial(None)` does. A period starts with the first snapshot that shows the
    backend HALF_OPEN and ends with one that shows it in any other state.
    """

    __slots__ = ("_periods",)

    def __init__(self) -> None:
        self._periods: dict[int, list[int]] = {}  # half-open backend id -> [slots, trials with a verdict]

    def update(self, snapshot) -> None:
        periods = self._periods
        self._periods = {view.index: [view.half_open_slots, periods[view.index][1] if view.index in periods else 0]
                         for view in snapshot.backends if view.state == BackendState.HALF_OPEN}

    def admits(self, backend: int, in_flight: int) -> bool:
        """May one more trial go to this half-open backend, with `in_flight` requests on it now?"""
        period = self._periods.get(backend)
        return period is not None and in_flight + period[1] < period[0]

    def record(self, outcome: Outcome) -> None:
        if self._periods:
            period = self._periods.get(outcome.backend)
            if period is not None and verdict(outcome) is not None:
                period[1] += 1
