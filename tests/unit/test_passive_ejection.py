"""health_aware_round_robin's loop-local passive ejection (net/strategies.py HealthAwareRoundRobin):
a live failure takes the backend out of the very next choice; the control plane's snapshot takes over
(or the short bridge ends) and a snapshot showing it BackendState.UP after that wins."""
import pytest

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.snapshot import BackendView, PoolSnapshot
from pmdaemon.net.strategies import LOCAL_EJECTION_BRIDGE, make_strategy
from pmdaemon.states import BackendState

BASE_PORT = 3000
STRATEGIES = ["round_robin", "weighted_round_robin", "least_connections", "ip_hash", "sticky_sessions",
              "geographic", "performance_based"]


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def pool(version: int = 1, **states) -> PoolSnapshot:
    """Backends a, b, c; keyword arguments set a backend's state, e.g. b=BackendState.DOWN."""
    return PoolSnapshot(0, version, tuple(
        BackendView(i, "127.0.0.1", BASE_PORT + i, None, 1, states.get(letter, BackendState.UP),
                    half_open_slots=1 if states.get(letter) == BackendState.HALF_OPEN else 0)
        for i, letter in enumerate("abc")))


def health_aware(clock: Clock, quarantine: float = 30.0, exclude_unhealthy: bool = True, snapshot=None):
    cfg = ListenerConfig(index=0, strategy="health_aware_round_robin", quarantine_duration=quarantine,
                         exclude_unhealthy=exclude_unhealthy)
    strategy = make_strategy(cfg, clock=Clock(1.7e9), monotonic=clock)
    strategy.update(snapshot or pool())
    return strategy


def sequence(strategy, n: int) -> str:
    out = []
    for _ in range(n):
        chosen = strategy.choose("10.0.0.1", None)
        out.append("-" if chosen is None else "abc"[chosen.port - BASE_PORT])
    return "".join(out)


B = 1  # backend id of b


def test_a_live_failure_takes_the_backend_out_of_the_very_next_choice():
    strategy = health_aware(Clock())
    assert sequence(strategy, 2) == "ab"
    strategy.live_failure(B)
    assert sequence(strategy, 6) == "cacaca"


def test_the_local_ejection_ends_after_the_bridge_when_the_control_plane_never_takes_over():
    clock = Clock()
    strategy = health_aware(clock)
    strategy.live_failure(B)
    clock.now += LOCAL_EJECTION_BRIDGE - 0.01
    assert "b" not in sequence(strategy, 4)
    clock.now += 0.02
    assert sequence(strategy, 3).count("b") == 1


def test_a_short_quarantine_shortens_the_bridge():
    clock = Clock()
    strategy = health_aware(clock, quarantine=0.2)
    strategy.live_failure(B)
    clock.now += 0.19
    assert "b" not in sequence(strategy, 4)
    clock.now += 0.02
    assert "b" in sequence(strategy, 3)


def test_snapshots_still_showing_it_up_do_not_end_the_ejection():
    """They may have been made before the control plane heard of the failure."""
    clock = Clock()
    strategy = health_aware(clock)
    strategy.live_failure(B)
    strategy.update(pool(version=2))
    strategy.update(pool(version=3))
    assert "b" not in sequence(strategy, 6)


def test_the_control_plane_takes_over_and_its_snapshot_showing_it_up_again_wins_at_once():
    clock = Clock()
    strategy = health_aware(clock)
    strategy.live_failure(B)
    strategy.update(pool(version=2, b=BackendState.DOWN))  # ejected and quarantined by the Listener actor
    assert "b" not in sequence(strategy, 4)
    clock.now += 0.1  # well inside the bridge: the quarantine ended, a check passed
    strategy.update(pool(version=3))
    assert sequence(strategy, 3).count("b") == 1


def test_failures_of_requests_in_flight_do_not_extend_the_ejection():
    clock = Clock()
    strategy = health_aware(clock)
    strategy.live_failure(B)
    clock.now += LOCAL_EJECTION_BRIDGE / 2
    strategy.live_failure(B)
    clock.now += LOCAL_EJECTION_BRIDGE / 2 + 0.01
    assert sequence(strategy, 3).count("b") == 1


def test_a_failure_after_the_backend_came_back_ejects_it_again():
    clock = Clock()
    strategy = health_aware(clock)
    strategy.live_failure(B)
    clock.now += LOCAL_EJECTION_BRIDGE + 0.01
    strategy.live_failure(B)
    assert "b" not in sequence(strategy, 4)


def test_the_last_routable_backend_is_never_ejected_by_the_passive_rule():
    strategy = health_aware(Clock(), snapshot=pool(a=BackendState.DOWN, c=BackendState.DOWN))
    strategy.live_failure(B)
    assert sequence(strategy, 2) == "bb"


def test_of_two_failing_backends_the_second_stays_in_as_the_last_one():
    strategy = health_aware(Clock(), snapshot=pool(c=BackendState.DOWN))
    strategy.live_failure(0)
    strategy.live_failure(B)
    assert sequence(strategy, 3) == "bbb"


def test_a_half_open_backend_counts_as_routable_for_the_last_backend_rule():
    strategy = health_aware(Clock(), snapshot=pool(a=BackendState.DOWN, c=BackendState.HALF_OPEN))
    strategy.live_failure(B)
    assert sequence(strategy, 3) == "ccc"  # as the Listener actor counts: c may take b's traffic


@pytest.mark.parametrize("state", [BackendState.HALF_OPEN, BackendState.OPEN, BackendState.DOWN])
def test_only_an_up_backend_is_ejected(state):
    """A half-open backend's failures are the breaker's business; a down one is out already."""
    strategy = health_aware(Clock(), snapshot=pool(b=state))
    strategy.live_failure(B)
    strategy.update(pool(version=2))
    assert sequence(strategy, 3) == "abc"


def test_nothing_is_ejected_when_unhealthy_backends_are_not_excluded():
    strategy = health_aware(Clock(), exclude_unhealthy=False)
    strategy.live_failure(B)
    assert sequence(strategy, 3) == "abc"


def test_a_backend_that_left_the_pool_forgets_its_ejection():
    clock = Clock()
    strategy = health_aware(clock)
    strategy.live_failure(B)
    strategy.update(PoolSnapshot(0, 2, tuple(v for v in pool().backends if v.index != B)))
    strategy.update(pool(version=3))
    assert sequence(strategy, 3).count("b") == 1


def test_unknown_backends_are_ignored():
    strategy = health_aware(Clock())
    strategy.live_failure(-1)
    strategy.live_failure(7)
    assert sequence(strategy, 3) == "abc"


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_other_strategies_leave_ejection_to_the_control_plane(strategy_name):
    cfg = ListenerConfig(index=0, strategy=strategy_name, quarantine_duration=30.0)
    strategy = make_strategy(cfg, clock=Clock(1.7e9), monotonic=Clock(), session_key=b"k" * 32)
    strategy.update(pool())
    strategy.live_failure(B)
    chosen = {strategy.choose(f"10.0.0.{i}", None).index for i in range(60)}
    assert B in chosen
