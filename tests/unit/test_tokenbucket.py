"""Token bucket and rate-limiting policy: pure, with explicit time."""
import pytest

from pmdaemon.config.model import RateLimiting
from pmdaemon.net.tokenbucket import RateLimiter, TokenBucket


def test_bucket_starts_full_and_admits_a_burst_of_capacity():
    bucket = TokenBucket(rate=1, capacity=3, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take(0.0) == pytest.approx(1.0)


def test_wait_time_is_time_until_the_next_token():
    bucket = TokenBucket(rate=4, capacity=1, now=10.0)
    assert bucket.try_take(10.0) == 0.0
    assert bucket.try_take(10.1) == pytest.approx(0.15)
    assert bucket.try_take(10.25) == 0.0


def test_refused_request_uses_no_token():
    bucket = TokenBucket(rate=1, capacity=1, now=0.0)
    assert bucket.try_take(0.0) == 0.0
    for t in (0.1, 0.2, 0.5, 0.9):
        assert bucket.try_take(t) > 0
    # Had any refusal consumed a token, this would still be refused.
    assert bucket.try_take(1.0) == 0.0


def test_refill_is_capped_at_capacity():
    bucket = TokenBucket(rate=100, capacity=2, now=0.0)
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == 0.0
    results = [bucket.try_take(1000.0) for _ in range(3)]
    assert results[:2] == [0.0, 0.0] and results[2] > 0


def test_clock_going_backwards_does_not_mint_tokens():
    bucket = TokenBucket(rate=1, capacity=1, now=5.0)
    assert bucket.try_take(5.0) == 0.0
    assert bucket.try_take(4.0) > 0
    assert bucket.try_take(5.5) == pytest.approx(0.5)


def test_fractional_capacity_still_admits_one():
    bucket = TokenBucket(rate=0.5, capacity=0.5, now=0.0)
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == pytest.approx(2.0)


def test_rate_must_be_positive():
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, capacity=1, now=0.0)


def test_limiter_without_limits_admits_everything():
    limiter = RateLimiter(now=0.0)
    assert all(limiter.check("10.0.0.1", 0.0) == 0.0 for _ in range(10000))
    assert limiter.tracked_clients == 0


def test_disabled_config_admits_everything():
    cfg = RateLimiting(enabled=False, requests_per_second=1, burst_size=1, per_ip_limit=1)
    limiter = RateLimiter.from_config(cfg, now=0.0)
    assert all(limiter.check("10.0.0.1", 0.0) == 0.0 for _ in range(100))


def test_global_bucket_rate_and_burst():
    limiter = RateLimiter.from_config(RateLimiting(enabled=True, requests_per_second=10, burst_size=20), now=0.0)
    admitted = sum(limiter.check(f"10.0.0.{i}", 0.0) == 0.0 for i in range(50))
    assert admitted == 20
    retry = limiter.check("10.0.0.99", 0.0)
    assert retry == pytest.approx(0.1)
    # One second later: 10 more.
    assert sum(limiter.check("10.0.1.1", 1.0) == 0.0 for _ in range(50)) == 10


def test_global_burst_defaults_to_rate():
    limiter = RateLimiter(requests_per_second=5, now=0.0)
    assert sum(limiter.check("a", 0.0) == 0.0 for _ in range(10)) == 5


def test_per_ip_limit_is_rate_and_capacity():
    limiter = RateLimiter(per_ip_limit=3, now=0.0)
    assert [limiter.check("10.0.0.1", 0.0) == 0.0 for _ in range(4)] == [True, True, True, False]
    # Another client is unaffected.
    assert limiter.check("10.0.0.2", 0.0) == 0.0
    assert limiter.check("10.0.0.1", 0.0) == pytest.approx(1 / 3)
    assert limiter.check("10.0.0.1", 1 / 3) == 0.0


def test_client_over_its_limit_does_not_drain_the_global_bucket():
    limiter = RateLimiter(requests_per_second=1, burst_size=5, per_ip_limit=2, now=0.0)
    greedy = [limiter.check("10.0.0.1", 0.0) for _ in range(100)]
    assert sum(w == 0.0 for w in greedy) == 2
    # 5 - 2 global tokens remain for everyone else.
    others = [limiter.check(f"10.0.0.{i}", 0.0) for i in range(2, 10)]
    assert sum(w == 0.0 for w in others) == 3


def test_global_refusal_takes_no_per_ip_token():
    limiter = RateLimiter(requests_per_second=1, burst_size=1, per_ip_limit=1, now=0.0)
    assert limiter.check("10.0.0.1", 0.0) == 0.0  # uses the only global token
    assert limiter.check("10.0.0.2", 0.0) == pytest.approx(1.0)  # refused by the global bucket
    # 10.0.0.2's own bucket is still full: as soon as the global one refills it is admitted.
    assert limiter.check("10.0.0.2", 1.0) == 0.0


def test_retry_after_reports_the_binding_bucket():
    limiter = RateLimiter(requests_per_second=100, burst_size=100, per_ip_limit=0.5, now=0.0)
    assert limiter.check("10.0.0.1", 0.0) == 0.0
    assert limiter.check("10.0.0.1", 0.0) == pytest.approx(2.0)


def test_per_ip_buckets_are_bounded_lru():
    limiter = RateLimiter(per_ip_limit=1, now=0.0, max_clients=100)
    assert limiter.check("victim", 0.0) == 0.0
    assert limiter.check("victim", 0.0) > 0
    for i in range(1000):
        limiter.check(f"flood-{i}", 0.0)
        if i % 50 == 0:
            # Recently seen clients keep their (empty) bucket while the flood goes on.
            assert limiter.check("victim", 0.0) > 0
    assert limiter.tracked_clients == 100
    # Flooding addresses evicts least recently seen buckets; memory stays bounded.
    for i in range(200):
        limiter.check(f"flood2-{i}", 0.0)
    assert limiter.tracked_clients == 100
    # The evicted victim starts over with a full bucket, as if new.
    assert limiter.check("victim", 0.0) == 0.0
