"""The retry rules (net/retry.py): which failure is tried again, how often, after what delay."""
from __future__ import annotations

import pytest

from pmdaemon.config.model import Retries
from pmdaemon.net.retry import Failure, RetryPolicy

POLICY = RetryPolicy.from_config(Retries(max_attempts=3, retry_delay=0.5, backoff_factor=2.0))


@pytest.mark.parametrize("failure, idempotent, replayable, attempts, delay", [
    (Failure.CONNECT, False, True, 1, 0.5),  # connect failures move on for any method
    (Failure.CONNECT, True, True, 2, 1.0),  # backoff: attempt 3 waits 0.5 x 2
    (Failure.CONNECT, True, True, 3, None),  # max_attempts reached
    (Failure.CONNECT, True, False, 1, None),  # the request is no longer held
    (Failure.CLOSED, True, True, 1, 0.5),  # closed before a response byte: idempotent retried
    (Failure.CLOSED, False, True, 1, None),  # ... a POST is not
    (Failure.CUT_SHORT, True, True, 1, None),  # response bytes had arrived
    (Failure.TIMEOUT, True, True, 1, None),  # a read timeout is a 504, never retried
    (Failure.INVALID, True, True, 1, None),
])
def test_next_delay(failure: Failure, idempotent: bool, replayable: bool, attempts: int, delay: float | None) -> None:
    assert POLICY.next_delay(failure, attempts, idempotent, replayable) == delay


def test_from_config_allows_at_least_one_attempt_and_no_delay_by_default() -> None:
    policy = RetryPolicy.from_config(Retries(max_attempts=0))
    assert policy.max_attempts == 1 and policy.next_delay(Failure.CONNECT, 1) is None
    assert RetryPolicy.from_config(Retries()).next_delay(Failure.CONNECT, 1) == 0.0


def test_each_retry_waits_backoff_factor_times_longer_than_the_one_before() -> None:
    policy = RetryPolicy.from_config(Retries(max_attempts=5, retry_delay=0.1, backoff_factor=3.0))
    assert [policy.delay_before(n) for n in (2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9])


@pytest.mark.parametrize("failure, reused, idempotent, replayable, fresh", [
    (Failure.CLOSED, True, True, True, True),  # a stale keep-alive connection: same backend, new socket
    (Failure.CLOSED, False, True, True, False),  # a new connection closing is the backend's failure
    (Failure.CLOSED, True, False, True, False),
    (Failure.CLOSED, True, True, False, False),
    (Failure.CUT_SHORT, True, True, True, False),
])
def test_resend_fresh(failure: Failure, reused: bool, idempotent: bool, replayable: bool, fresh: bool) -> None:
    assert RetryPolicy.resend_fresh(failure, reused, idempotent, replayable) is fresh


def test_policy_is_immutable() -> None:
    with pytest.raises(AttributeError):
        POLICY.max_attempts = 9
