"""Circuit breaker state machine: every transition, with explicit time."""
import pytest

from pmdaemon.net.breaker import Breaker
from pmdaemon.states import BreakerState


def tripped(now=100.0, threshold=3, recovery=30.0, trials=2) -> Breaker:
    breaker = Breaker(threshold, recovery, trials)
    for _ in range(threshold):
        breaker.record(False, now)
    assert breaker.state(now) == BreakerState.OPEN
    return breaker


def test_starts_closed_and_successes_keep_it_closed():
    breaker = Breaker(3, 30.0, 1)
    assert breaker.state(0.0) == BreakerState.CLOSED
    for t in range(100):
        assert breaker.record(True, float(t)) == BreakerState.CLOSED


def test_consecutive_failures_reaching_threshold_open_it():
    breaker = Breaker(3, 30.0, 1)
    assert breaker.record(False, 1.0) == BreakerState.CLOSED
    assert breaker.record(False, 2.0) == BreakerState.CLOSED
    assert breaker.consecutive_failures == 2
    assert breaker.record(False, 3.0) == BreakerState.OPEN
    assert breaker.reopens_at == 33.0


def test_a_success_resets_the_failure_count():
    breaker = Breaker(3, 30.0, 1)
    for _ in range(10):
        breaker.record(False, 0.0)
        breaker.record(False, 0.0)
        assert breaker.record(True, 0.0) == BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_open_turns_half_open_after_recovery_timeout():
    breaker = tripped(now=100.0, recovery=30.0)
    assert breaker.state(129.999) == BreakerState.OPEN
    assert breaker.state(130.0) == BreakerState.HALF_OPEN
    assert breaker.reopens_at is None


def test_open_admits_no_trials_and_ignores_stragglers():
    breaker = tripped(now=100.0, recovery=30.0)
    assert not breaker.try_acquire_trial(110.0)
    # Requests in flight when it tripped finish later: they neither close it nor extend the timer.
    assert breaker.record(True, 110.0) == BreakerState.OPEN
    assert breaker.record(False, 120.0) == BreakerState.OPEN
    assert breaker.reopens_at == 130.0
    assert breaker.state(130.0) == BreakerState.HALF_OPEN


def test_half_open_admits_only_the_configured_concurrent_trials():
    breaker = tripped(trials=2)
    now = 200.0
    assert breaker.try_acquire_trial(now)
    assert breaker.try_acquire_trial(now)
    assert not breaker.try_acquire_trial(now)
    assert breaker.state(now) == BreakerState.HALF_OPEN


def test_all_trials_succeeding_close_it():
    breaker = tripped(trials=2)
    now = 200.0
    assert breaker.try_acquire_trial(now) and breaker.try_acquire_trial(now)
    assert breaker.release_trial(True, now) == BreakerState.HALF_OPEN
    # One verdict is in, one trial still running: no third trial.
    assert not breaker.try_acquire_trial(now)
    assert breaker.release_trial(True, now) == BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert not breaker.try_acquire_trial(now)  # closed: no trials needed


def test_any_trial_failing_reopens_with_timer_restarted():
    breaker = tripped(now=100.0, recovery=30.0, trials=3)
    assert breaker.try_acquire_trial(130.0) and breaker.try_acquire_trial(130.0)
    assert breaker.release_trial(True, 131.0) == BreakerState.HALF_OPEN
    assert breaker.release_trial(False, 135.0) == BreakerState.OPEN
    assert breaker.reopens_at == 165.0
    assert breaker.state(164.0) == BreakerState.OPEN
    assert breaker.state(165.0) == BreakerState.HALF_OPEN
    # A fresh half-open period: all slots free again.
    assert [breaker.try_acquire_trial(165.0) for _ in range(4)] == [True, True, True, False]


def test_trial_ending_without_verdict_frees_its_slot():
    breaker = tripped(trials=1)
    now = 200.0
    assert breaker.try_acquire_trial(now)
    assert not breaker.try_acquire_trial(now)
    assert breaker.release_trial(None, now) == BreakerState.HALF_OPEN
    assert breaker.try_acquire_trial(now)
    assert breaker.release_trial(True, now) == BreakerState.CLOSED


def test_trial_released_after_another_failed_is_ignored():
    breaker = tripped(now=100.0, recovery=30.0, trials=2)
    assert breaker.try_acquire_trial(130.0) and breaker.try_acquire_trial(130.0)
    assert breaker.release_trial(False, 131.0) == BreakerState.OPEN
    assert breaker.release_trial(True, 132.0) == BreakerState.OPEN
    assert breaker.reopens_at == 161.0


def test_recorded_outcomes_in_half_open_count_as_trial_verdicts():
    """The control plane hears outcomes after the fact and does not gate trials itself."""
    breaker = tripped(now=100.0, recovery=30.0, trials=2)
    assert breaker.record(True, 130.0) == BreakerState.HALF_OPEN
    assert breaker.record(True, 130.5) == BreakerState.CLOSED
    breaker = tripped(now=100.0, recovery=30.0, trials=2)
    assert breaker.record(False, 131.0) == BreakerState.OPEN
    assert breaker.reopens_at == 161.0


def test_full_cycle_closed_open_half_open_closed_and_trips_again():
    breaker = Breaker(2, 1.0, 1)
    assert breaker.record(False, 0.0) == BreakerState.CLOSED
    assert breaker.record(False, 0.1) == BreakerState.OPEN
    assert breaker.state(1.1) == BreakerState.HALF_OPEN
    assert breaker.try_acquire_trial(1.1)
    assert breaker.release_trial(True, 1.2) == BreakerState.CLOSED
    # The count started from zero after closing.
    assert breaker.record(False, 1.3) == BreakerState.CLOSED
    assert breaker.record(False, 1.4) == BreakerState.OPEN


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError):
        Breaker(0, 1.0, 1)
    with pytest.raises(ValueError):
        Breaker(1, 1.0, 0)
