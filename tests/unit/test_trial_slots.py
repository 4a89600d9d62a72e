"""net.breaker.verdict and TrialSlots: what an outcome says about its backend, and the loop's count of
trial requests per half-open period (bytes-in/bytes-out style: snapshots and outcomes in, answers out)."""
from __future__ import annotations

from pmdaemon.net.breaker import TrialSlots, verdict
from pmdaemon.net.snapshot import BackendView, Outcome, PoolSnapshot
from pmdaemon.states import BackendState


def outcome(backend: int, status: int = 200, error: str | None = None, lb_made: bool = False) -> Outcome:
    return Outcome(0, backend, "127.0.0.1", error, status, 0.001, 10, 20, lb_made)


def snapshot(version: int, *states: str, slots: int = 2) -> PoolSnapshot:
    return PoolSnapshot(0, version, tuple(
        BackendView(index=i, host="127.0.0.1", port=3000 + i, instance=None, weight=1, state=state,
                    half_open_slots=slots if state == BackendState.HALF_OPEN else 0)
        for i, state in enumerate(states)))


def test_verdicts():
    assert verdict(outcome(0, 200)) is True
    assert verdict(outcome(0, 404)) is True
    assert verdict(outcome(0, 500)) is False
    assert verdict(outcome(0, 0, "connect")) is False  # a failed attempt followed by a retry
    assert verdict(outcome(0, 504, "timeout", lb_made=True)) is False  # answered by us, caused by it
    assert verdict(outcome(0, 502, "reset", lb_made=True)) is False
    assert verdict(outcome(0, 502, "invalid_response", lb_made=True)) is False
    assert verdict(outcome(0, 200, "client_closed")) is None
    assert verdict(outcome(0, 200, "client_timeout")) is None  # a client that stopped reading
    assert verdict(outcome(0, 503, "no_backend", lb_made=True)) is None
    assert verdict(outcome(-1, 429, "rate_limited", lb_made=True)) is None
    assert verdict(outcome(-1, 503, "lb_5xx", lb_made=True)) is None


def test_a_half_open_backend_takes_at_most_its_slots_per_period_in_flight_or_finished():
    trials = TrialSlots()
    trials.update(snapshot(1, BackendState.HALF_OPEN, BackendState.UP))
    assert trials.admits(0, in_flight=0) and trials.admits(0, in_flight=1)
    assert not trials.admits(0, in_flight=2)
    trials.record(outcome(0, 200))  # one trial over with a verdict, one still in flight
    assert not trials.admits(0, in_flight=1)
    assert not trials.admits(1, in_flight=0)  # not half-open: no trial slots at all


def test_a_trial_without_a_verdict_gives_its_slot_back():
    trials = TrialSlots()
    trials.update(snapshot(1, BackendState.HALF_OPEN, slots=1))
    trials.record(outcome(0, 200, "client_closed"))
    assert trials.admits(0, in_flight=0)
    trials.record(outcome(0, 500))
    assert not trials.admits(0, in_flight=0)


def test_a_period_lasts_while_snapshots_show_half_open_and_the_next_starts_afresh():
    trials = TrialSlots()
    trials.update(snapshot(1, BackendState.HALF_OPEN, BackendState.UP, slots=1))
    trials.record(outcome(0, 500))
    # another backend changed: same period
    trials.update(snapshot(2, BackendState.HALF_OPEN, BackendState.HALF_OPEN, slots=1))
    assert not trials.admits(0, in_flight=0)
    assert trials.admits(1, in_flight=0)
    trials.update(snapshot(3, BackendState.OPEN, BackendState.HALF_OPEN, slots=1))
    trials.update(snapshot(4, BackendState.HALF_OPEN, BackendState.HALF_OPEN, slots=1))
    assert trials.admits(0, in_flight=0)
