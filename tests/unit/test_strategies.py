"""Strategies: which backend each request goes to, for every strategy of decisions.md section 4."""
from collections import Counter

import pytest

from pmdaemon.config.model import STRATEGIES, AppBalancing, BackendConfig, ListenerConfig, SessionConfig, SslConfig
from pmdaemon.control.perfscore import BackendMetrics, PerformanceScorer
from pmdaemon.net.snapshot import BackendView, PoolSnapshot
from pmdaemon.net.sticky import SessionSigner
from pmdaemon.net.strategies import (
    Geographic,
    HealthAwareRoundRobin,
    IpHash,
    LeastConnections,
    RoundRobin,
    SmoothWeighted,
    StickySessions,
    make_strategy,
)
from pmdaemon.states import BackendState

KEY = b"k" * 32
BASE_PORT = 3000


class Head:
    """A parsed request head as the loop presents it (RequestView)."""

    def __init__(self, headers: dict[str, str] | None = None, cookies: dict[str, str] | None = None):
        self._headers = {k.lower().encode(): v.encode("latin-1") for k, v in (headers or {}).items()}
        self._cookies = cookies or {}

    def header(self, name: bytes) -> bytes | None:
        return self._headers.get(name.lower())

    def cookie(self, name: str) -> str | None:
        return self._cookies.get(name)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def view(i: int, state: str = BackendState.UP, weight: int = 1, region: str | None = None, slots: int = 0,
         port=None) -> BackendView:
    return BackendView(i, "127.0.0.1", port or BASE_PORT + i, f"app-{i}", weight, state, region, slots)


def snapshot(*views: BackendView, version: int = 1) -> PoolSnapshot:
    return PoolSnapshot(0, version, tuple(views))


def pool(n: int, **states) -> PoolSnapshot:
    """n backends named a, b, c...; keyword arguments set a backend's state, e.g. b=BackendState.DOWN."""
    return snapshot(*(view(i, states.get(chr(ord("a") + i), BackendState.UP)) for i in range(n)))


def name(chosen: BackendView | None) -> str | None:
    return None if chosen is None else chr(ord("a") + chosen.port - BASE_PORT)


def sequence(strategy, n: int, client: str = "10.0.0.1", head=None, exclude=frozenset()) -> str:
    return "".join(name(strategy.choose(client, head, exclude)) or "-" for _ in range(n))


def listener(strategy: str, backends=(), **options) -> ListenerConfig:
    return ListenerConfig(index=0, strategy=strategy, backends=tuple(backends), **options)


def backend(i: int, region=None, weight=1, **balancing) -> BackendConfig:
    return BackendConfig(
        "127.0.0.1", BASE_PORT + i, weight=weight, region=region,
        balancing=AppBalancing(**balancing) if balancing else None,
    )


def made(strategy_name: str, clock=None):
    return make_strategy(listener(strategy_name), clock=clock or Clock(), session_key=KEY)


# --- common rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_nothing_to_choose_before_the_first_snapshot(strategy_name):
    assert made(strategy_name).choose("10.0.0.1", None) is None


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_only_routable_backends_take_unpinned_requests(strategy_name):
    strategy = made(strategy_name)
    strategy.update(pool(5, a=BackendState.DOWN, b=BackendState.OPEN, d=BackendState.DRAINING))
    chosen = Counter()
    for i in range(200):
        head = Head({"X-Forwarded-For": f"10.0.{i}.1"})
        chosen[name(strategy.choose(f"10.1.{i}.{i}", head))] += 1
    assert set(chosen) == {"c", "e"}


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_no_routable_backend_means_none(strategy_name):
    strategy = made(strategy_name)
    strategy.update(pool(3, a=BackendState.DOWN, b=BackendState.OPEN, c=BackendState.DRAINING))
    assert strategy.choose("10.0.0.1", None) is None
    assert strategy.choose("10.0.0.1", Head()) is None


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_retries_skip_backends_already_tried(strategy_name):
    strategy = made(strategy_name)
    strategy.update(pool(3))
    for i in range(30):
        client = f"10.0.0.{i}"
        first = strategy.choose(client, Head())
        second = strategy.choose(client, Head(), frozenset({first.index}))
        third = strategy.choose(client, Head(), frozenset({first.index, second.index}))
        assert len({first.index, second.index, third.index}) == 3
        assert strategy.choose(client, Head(), frozenset({0, 1, 2})) is None


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_half_open_backend_gets_only_its_trial_slots(strategy_name):
    strategy = made(strategy_name)
    strategy.update(snapshot(view(0, BackendState.HALF_OPEN, slots=2), view(1), view(2)))
    in_flight_to_a = 0
    for i in range(60):
        chosen = strategy.choose(f"10.0.0.{i}", Head())
        strategy.started(chosen.index)
        in_flight_to_a += chosen.index == 0
        assert in_flight_to_a <= 2
        if chosen.index != 0:
            strategy.finished(chosen.index)
    assert strategy.in_flight(0) == in_flight_to_a
    # A trial finishing frees its slot.
    if in_flight_to_a:
        strategy.finished(0)
        assert strategy.in_flight(0) == in_flight_to_a - 1


def test_half_open_backend_takes_trials_in_its_turn():
    strategy = made("round_robin")
    strategy.update(snapshot(view(0), view(1, BackendState.HALF_OPEN, slots=1), view(2)))
    seen = []
    for _ in range(6):
        chosen = strategy.choose("10.0.0.1", None)
        strategy.started(chosen.index)
        seen.append(name(chosen))
    assert "".join(seen) == "abcaca"


@pytest.mark.parametrize("strategy_name", ["round_robin", "least_connections", "weighted_round_robin"])
def test_custom_trial_gate(strategy_name):
    strategy = made(strategy_name)
    strategy.update(snapshot(view(0, BackendState.HALF_OPEN, slots=5), view(1)))
    allowed = {0: False}
    strategy.set_trial_gate(lambda index: allowed.get(index, False))
    assert {name(strategy.choose("10.0.0.1", None)) for _ in range(10)} == {"b"}
    allowed[0] = True
    assert "a" in {name(strategy.choose("10.0.0.1", None)) for _ in range(10)}


def test_half_open_with_no_slots_gets_nothing():
    strategy = made("round_robin")
    strategy.update(snapshot(view(0, BackendState.HALF_OPEN, slots=0), view(1)))
    assert sequence(strategy, 4) == "bbbb"


def test_in_flight_never_goes_negative_and_unknown_indices_are_ignored():
    strategy = made("least_connections")
    strategy.update(pool(2))
    strategy.finished(0)
    strategy.started(99)
    strategy.finished(99)
    assert strategy.in_flight(0) == 0
    assert strategy.in_flight(99) == 0


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_tcp_requests_have_no_head(strategy_name):
    strategy = made(strategy_name)
    strategy.update(pool(3))
    assert {name(strategy.choose(f"10.0.0.{i}", None)) for i in range(100)} <= {"a", "b", "c"}


# --- round robin -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy_name", ["round_robin", "health_aware_round_robin"])
def test_round_robin_is_strict_rotation_per_request(strategy_name):
    strategy = made(strategy_name)
    strategy.update(pool(3))
    assert isinstance(strategy, RoundRobin)
    assert sequence(strategy, 9) == "abcabcabc"


def test_round_robin_skips_a_down_backend_and_takes_it_back():
    strategy = made("round_robin")
    strategy.update(pool(3))
    assert sequence(strategy, 1) == "a"
    strategy.update(pool(3, b=BackendState.DOWN))
    assert sequence(strategy, 4) == "caca"
    strategy.update(pool(3))
    assert sequence(strategy, 3) == "bca"


def test_round_robin_keeps_its_position_across_updates():
    strategy = made("round_robin")
    strategy.update(pool(4))
    assert sequence(strategy, 2) == "ab"
    strategy.update(pool(4))
    assert sequence(strategy, 2) == "cd"
    # The last chosen backend (d) is removed: rotation continues with the next one.
    strategy.update(pool(3))
    assert sequence(strategy, 3) == "abc"
    strategy.update(pool(5))
    assert sequence(strategy, 2) == "de"


def test_round_robin_matches_backends_by_address_when_indices_change():
    strategy = made("round_robin")
    strategy.update(snapshot(view(0, port=3000), view(1, port=3001), view(2, port=3002)))
    assert sequence(strategy, 2) == "ab"
    # 3000 left; 3001 and 3002 are renumbered 0 and 1: the rotation goes on with 3002.
    strategy.update(snapshot(view(0, port=3001), view(1, port=3002)))
    assert sequence(strategy, 3) == "cbc"


def test_round_robin_unordered_snapshot_is_rotated_in_index_order():
    strategy = made("round_robin")
    strategy.update(snapshot(view(2), view(0), view(1)))
    assert sequence(strategy, 3) == "abc"


# --- smooth weighted ---------------------------------------------------------------------------


def test_weighted_round_robin_is_nginx_smooth():
    strategy = made("weighted_round_robin")
    assert isinstance(strategy, SmoothWeighted)
    strategy.update(snapshot(view(0, weight=5), view(1, weight=1), view(2, weight=1)))
    assert sequence(strategy, 14) == "aabacaa" * 2


def test_weighted_round_robin_shares_follow_weights():
    strategy = made("weighted_round_robin")
    strategy.update(snapshot(view(0, weight=3), view(1, weight=1)))
    assert Counter(sequence(strategy, 400)) == {"a": 300, "b": 100}


def test_weighted_round_robin_cycle_survives_an_unchanged_update():
    strategy = made("weighted_round_robin")
    weighted = snapshot(view(0, weight=5), view(1, weight=1), view(2, weight=1))
    strategy.update(weighted)
    first = sequence(strategy, 3)
    strategy.update(snapshot(*weighted.backends, version=2))
    assert first + sequence(strategy, 4) == "aabacaa"


def test_weighted_round_robin_without_a_down_backend():
    strategy = made("weighted_round_robin")
    strategy.update(snapshot(view(0, weight=5), view(1, BackendState.DOWN, weight=1), view(2, weight=1)))
    assert Counter(sequence(strategy, 60)) == {"a": 50, "c": 10}


def test_zero_weight_counts_as_one():
    strategy = made("weighted_round_robin")
    strategy.update(snapshot(view(0, weight=0), view(1, weight=1)))
    assert Counter(sequence(strategy, 10)) == {"a": 5, "b": 5}


def test_performance_based_follows_scores_gradually():
    """A backend 50 ms slower ends up with less than half the share of the others; when it is fast
    again its share comes back."""
    strategy = made("performance_based")
    scorer = PerformanceScorer({"response_time": 0.4, "cpu_usage": 0.3, "memory_usage": 0.2, "error_rate": 0.1})
    fast = BackendMetrics(response_time=0.001, error_rate=0.0, cpu_usage=10.0, memory_usage=50e6)
    slow = BackendMetrics(response_time=0.051, error_rate=0.0, cpu_usage=10.0, memory_usage=50e6)

    def round_of_traffic(metrics, version):
        weights = scorer.update(metrics)
        strategy.update(snapshot(*(view(i, weight=weights[n]) for i, n in enumerate("abc")), version=version))
        return Counter(sequence(strategy, 3000))

    shares = [round_of_traffic({"a": fast, "b": slow, "c": fast}, v) for v in (1, 2)]
    assert shares[0]["b"] > shares[1]["b"]  # gradual, not all at once
    assert shares[1]["b"] < shares[1]["a"] / 2 and shares[1]["b"] < shares[1]["c"] / 2
    for v in range(3, 10):
        recovered = round_of_traffic({"a": fast, "b": fast, "c": fast}, v)
    assert recovered["b"] > 0.9 * recovered["a"]


# --- least connections -------------------------------------------------------------------------


def test_least_connections_picks_fewest_in_flight():
    strategy = made("least_connections")
    assert isinstance(strategy, LeastConnections)
    strategy.update(pool(3))
    for _ in range(3):
        strategy.started(0)
    strategy.started(1)
    assert name(strategy.choose("10.0.0.1", None)) == "c"
    strategy.started(2)
    strategy.started(2)
    assert name(strategy.choose("10.0.0.1", None)) == "b"


def test_least_connections_ties_go_in_rotation():
    strategy = made("least_connections")
    strategy.update(pool(3))
    assert sequence(strategy, 6) == "abcabc"
    for i in range(3):
        strategy.started(i)
    assert sequence(strategy, 3) == "abc"


def test_least_connections_divides_by_weight():
    strategy = made("least_connections")
    strategy.update(snapshot(view(0, weight=3), view(1, weight=1)))
    picks = []
    for _ in range(8):
        chosen = strategy.choose("10.0.0.1", None)
        strategy.started(chosen.index)  # none finish: load builds up 3:1
        picks.append(name(chosen))
    assert Counter(picks) == {"a": 6, "b": 2}


def test_least_connections_keeps_in_flight_counts_across_updates_by_address():
    strategy = made("least_connections")
    strategy.update(snapshot(view(0, port=3000), view(1, port=3001), view(2, port=3002)))
    for _ in range(5):
        strategy.started(1)  # 3001
    strategy.update(snapshot(view(0, port=3001), view(1, port=3002), view(2, port=3003)))
    assert strategy.in_flight(0) == 5
    assert {name(strategy.choose("10.0.0.1", None)) for _ in range(4)} == {"c", "d"}
    for _ in range(5):
        strategy.finished(0)
    assert strategy.in_flight(0) == 0


def test_least_connections_counts_draining_backends_in_flight_but_never_chooses_them():
    strategy = made("least_connections")
    strategy.update(pool(2))
    strategy.started(0)
    strategy.update(pool(2, a=BackendState.DRAINING))
    assert strategy.in_flight(0) == 1
    assert sequence(strategy, 3) == "bbb"
    strategy.finished(0)
    assert strategy.in_flight(0) == 0


# --- ip hash -----------------------------------------------------------------------------------

CLIENTS = [f"10.{i // 256}.{i % 256}.7" for i in range(3000)]


def placement(strategy, head_for=lambda client: None):
    return {client: name(strategy.choose(client, head_for(client))) for client in CLIENTS}


def test_ip_hash_same_client_same_backend_and_spread():
    strategy = made("ip_hash")
    assert isinstance(strategy, IpHash)
    strategy.update(pool(5))
    first = placement(strategy)
    assert placement(strategy) == first
    counts = Counter(first.values())
    assert set(counts) == set("abcde") and min(counts.values()) > 400


def test_ip_hash_down_backend_moves_only_its_clients_and_they_return():
    strategy = made("ip_hash")
    strategy.update(pool(5))
    before = placement(strategy)
    strategy.update(pool(5, c=BackendState.DOWN))
    during = placement(strategy)
    moved = {client for client in CLIENTS if before[client] != during[client]}
    assert moved == {client for client in CLIENTS if before[client] == "c"}
    strategy.update(pool(5))
    assert placement(strategy) == before


def test_ip_hash_draining_backend_leaves_the_ring():
    strategy = made("ip_hash")
    strategy.update(pool(3))
    strategy.update(pool(3, a=BackendState.DRAINING))
    assert "a" not in set(placement(strategy).values())


def test_ip_hash_retry_goes_to_a_stable_second_choice():
    strategy = made("ip_hash")
    strategy.update(pool(5))
    for client in CLIENTS[:100]:
        first = strategy.choose(client, None)
        second = strategy.choose(client, None, frozenset({first.index}))
        assert strategy.choose(client, None, frozenset({first.index})) == second
        assert second.index != first.index


def test_ip_hash_uses_the_client_behind_trusted_proxies():
    strategy = make_strategy(listener("ip_hash", trusted_proxies=("127.0.0.0/8",)), clock=Clock())
    strategy.update(pool(5))
    direct = placement(strategy)
    via_proxy = {c: name(strategy.choose("127.0.0.1", Head({"X-Forwarded-For": c}))) for c in CLIENTS}
    assert via_proxy == direct
    # An untrusted peer's X-Forwarded-For is not believed.
    spoofed = {name(strategy.choose("192.0.2.1", Head({"X-Forwarded-For": c}))) for c in CLIENTS[:50]}
    assert len(spoofed) == 1


@pytest.mark.parametrize(
    "hash_key, head_for",
    [
        ("header:X-User", lambda user: Head({"x-user": user})),
        ("cookie:uid", lambda user: Head(cookies={"uid": user})),
    ],
)
def test_ip_hash_hash_key_from_header_or_cookie(hash_key, head_for):
    strategy = make_strategy(listener("ip_hash", hash_key=hash_key), clock=Clock())
    strategy.update(pool(5))
    users = [f"user-{i}" for i in range(500)]
    by_user = {user: name(strategy.choose("10.0.0.1", head_for(user))) for user in users}
    # The same user from many addresses lands on one backend; users spread out.
    for user in users[:20]:
        assert {name(strategy.choose(f"10.9.{i}.1", head_for(user))) for i in range(10)} == {by_user[user]}
    assert len(set(by_user.values())) == 5
    # Missing key: the client address decides.
    from_ip = {name(strategy.choose(c, Head())) for c in CLIENTS[:100]}
    assert len(from_ip) == 5
    assert all(name(strategy.choose(c, Head())) == name(strategy.choose(c, Head())) for c in CLIENTS[:50])


def test_ip_hash_per_app_hash_key_applies_to_the_pool():
    backends = [backend(i, strategy="ip_hash", hash_key="header:X-User") for i in range(3)]
    strategy = make_strategy(listener("ip_hash", backends), clock=Clock())
    strategy.update(pool(3))
    assert len({name(strategy.choose(f"10.0.{i}.1", Head({"X-User": "alice"}))) for i in range(50)}) == 1


def test_ip_hash_session_affinity_keeps_a_moved_client_until_idle_timeout():
    clock = Clock()
    strategy = make_strategy(
        listener("ip_hash", session_affinity=True, session=SessionConfig(timeout=60)), clock=clock
    )
    strategy.update(pool(3))
    home = {c: name(strategy.choose(c, None)) for c in CLIENTS[:300]}
    on_a = [c for c in home if home[c] == "a"]
    strategy.update(pool(3, a=BackendState.DOWN))
    moved = {c: name(strategy.choose(c, None)) for c in on_a}
    assert "a" not in moved.values()
    strategy.update(pool(3))
    clock.now += 30
    # Back up, but moved clients stay where they were moved to; the others never moved.
    assert {c: name(strategy.choose(c, None)) for c in on_a} == moved
    assert all(name(strategy.choose(c, None)) == home[c] for c in home if c not in on_a)
    # Idle longer than session.timeout: the hash decides again.
    clock.now += 61
    assert {c: name(strategy.choose(c, None)) for c in on_a} == {c: "a" for c in on_a}


def test_ip_hash_without_affinity_returns_clients_at_once():
    strategy = made("ip_hash")
    strategy.update(pool(3))
    before = placement(strategy)
    strategy.update(pool(3, a=BackendState.DOWN))
    placement(strategy)
    strategy.update(pool(3))
    assert placement(strategy) == before


def test_invalid_hash_key():
    with pytest.raises(ValueError, match="hash_key"):
        make_strategy(listener("ip_hash", hash_key="header:"))
    with pytest.raises(ValueError, match="hash_key"):
        make_strategy(listener("ip_hash", hash_key="query:x"))


# --- sticky sessions ---------------------------------------------------------------------------

COOKIE = "PMDAEMON_SESSION"


def sticky(clock=None, **options):
    strategy = make_strategy(listener("sticky_sessions", **options), clock=clock or Clock(), session_key=KEY)
    assert isinstance(strategy, StickySessions)
    return strategy


def issued_cookie(strategy, head, chosen) -> str | None:
    headers = strategy.response_headers(head, chosen)
    if not headers:
        return None
    (field, value), = headers
    assert field == b"Set-Cookie"
    cookie = value.decode()
    assert cookie.startswith(f"{COOKIE}=")
    return cookie.split(";", 1)[0].split("=", 1)[1]


def test_sticky_first_request_is_balanced_and_sets_the_cookie():
    strategy = sticky()
    strategy.update(pool(3))
    head = Head()
    chosen = strategy.choose("10.0.0.1", head)
    ((field, value),) = strategy.response_headers(head, chosen)
    assert field == b"Set-Cookie"
    assert value.startswith(f"{COOKIE}=".encode())
    assert value.endswith(b"; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax")
    assert sequence(strategy, 3, head=Head()) == "bca"


def test_sticky_cookie_is_secure_under_tls():
    strategy = sticky(ssl=SslConfig(enabled=True), session=SessionConfig(cookie_name="S", timeout=90))
    strategy.update(pool(2))
    chosen = strategy.choose("10.0.0.1", Head())
    ((_, value),) = strategy.response_headers(Head(), chosen)
    assert value.startswith(b"S=") and value.endswith(b"; Max-Age=90; Path=/; HttpOnly; SameSite=Lax; Secure")


def test_sticky_cookie_pins_and_is_not_reissued():
    strategy = sticky()
    strategy.update(pool(3))
    chosen = strategy.choose("10.0.0.1", Head())
    value = issued_cookie(strategy, Head(), chosen)
    pinned = Head(cookies={COOKIE: value})
    for i in range(10):
        again = strategy.choose(f"10.0.0.{i}", pinned)
        assert again == chosen
        assert strategy.response_headers(pinned, again) == ()


def test_sticky_pinned_backend_down_rebalances_and_reissues():
    strategy = sticky()
    strategy.update(pool(3))
    first = strategy.choose("10.0.0.1", Head())
    pinned = Head(cookies={COOKIE: issued_cookie(strategy, Head(), first)})
    states = {name(first): BackendState.DOWN}
    strategy.update(pool(3, **states))
    moved = strategy.choose("10.0.0.1", pinned)
    assert moved is not None and moved.index != first.index
    new_value = issued_cookie(strategy, pinned, moved)
    assert new_value is not None
    repinned = Head(cookies={COOKIE: new_value})
    assert all(strategy.choose("10.0.0.1", repinned) == moved for _ in range(5))


def test_sticky_pinned_requests_reach_a_draining_backend_but_new_sessions_do_not():
    strategy = sticky()
    strategy.update(pool(3))
    first = strategy.choose("10.0.0.1", Head())
    pinned = Head(cookies={COOKIE: issued_cookie(strategy, Head(), first)})
    strategy.update(pool(3, **{name(first): BackendState.DRAINING}))
    draining = strategy.choose("10.0.0.1", pinned)
    assert draining.state == BackendState.DRAINING and draining.index == first.index
    assert all(strategy.choose("10.0.0.1", pinned) == draining for _ in range(5))
    assert strategy.response_headers(pinned, draining) == ()
    assert name(first) not in sequence(strategy, 10, head=Head())
    # Once it stops (down), the pinned client moves.
    strategy.update(pool(3, **{name(first): BackendState.DOWN}))
    assert strategy.choose("10.0.0.1", pinned).index != first.index


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        SessionSigner(b"other key, other signer........").issue("127.0.0.1:3001", 1_700_000_000.0),
    ],
)
def test_sticky_forged_cookie_is_ignored_and_replaced(value):
    strategy = sticky()
    strategy.update(pool(3))
    head = Head(cookies={COOKIE: value})
    chosen = strategy.choose("10.0.0.1", head)
    assert name(chosen) == "a"
    assert issued_cookie(strategy, head, chosen) is not None


def test_sticky_stale_cookie_is_ignored():
    clock = Clock()
    strategy = sticky(clock=clock, session=SessionConfig(timeout=10))
    strategy.update(pool(3))
    assert sequence(strategy, 1, head=Head()) == "a"
    value = SessionSigner(KEY).issue("127.0.0.1:3002", clock.now)
    head = Head(cookies={COOKIE: value})
    assert name(strategy.choose("10.0.0.1", head)) == "c"
    clock.now += 11
    chosen = strategy.choose("10.0.0.1", head)
    assert name(chosen) == "b"  # balanced: the rotation's next
    assert issued_cookie(strategy, head, chosen) is not None


def test_sticky_cookie_survives_a_restart_with_the_same_key():
    clock = Clock()
    before = sticky(clock=clock)
    before.update(pool(3))
    before.choose("10.0.0.1", Head())
    chosen = before.choose("10.0.0.1", Head())
    value = issued_cookie(before, Head(), chosen)
    after = sticky(clock=clock)
    after.update(pool(3))
    assert after.choose("10.0.0.1", Head(cookies={COOKIE: value})) == chosen


def test_sticky_session_header_pins_with_idle_expiry():
    clock = Clock()
    strategy = sticky(clock=clock, session=SessionConfig(timeout=30))
    strategy.update(pool(3))
    alice = Head({"X-Session-ID": "alice"})
    bob = Head({"x-session-id": "bob"})
    first_alice = strategy.choose("10.0.0.1", alice)
    first_bob = strategy.choose("10.0.0.2", bob)
    assert first_alice != first_bob
    for _ in range(5):
        clock.now += 20  # used within the timeout: stays
        assert strategy.choose("10.0.0.9", alice) == first_alice
        assert strategy.response_headers(alice, first_alice) == ()
    clock.now += 31
    # Idle past the timeout: balanced again, so the rotation's next backend.
    assert (name(first_alice), name(first_bob)) == ("a", "b")
    assert name(strategy.choose("10.0.0.9", alice)) == "c"


def test_sticky_session_header_may_carry_a_cookie_value():
    strategy = sticky()
    strategy.update(pool(3))
    value = SessionSigner(KEY).issue("127.0.0.1:3002", 1_700_000_000.0)
    head = Head({"X-Session-ID": value})
    assert {name(strategy.choose("10.0.0.1", head)) for _ in range(5)} == {"c"}


def test_sticky_session_header_moves_when_its_backend_is_down():
    strategy = sticky()
    strategy.update(pool(3))
    head = Head({"X-Session-ID": "s1"})
    first = strategy.choose("10.0.0.1", head)
    strategy.update(pool(3, **{name(first): BackendState.DOWN}))
    moved = strategy.choose("10.0.0.1", head)
    assert moved != first
    strategy.update(pool(3))
    # The session was re-pinned to where it moved.
    assert strategy.choose("10.0.0.1", head) == moved


def test_sticky_retry_of_a_pinned_request_goes_elsewhere_and_reissues():
    strategy = sticky()
    strategy.update(pool(3))
    first = strategy.choose("10.0.0.1", Head())
    pinned = Head(cookies={COOKIE: issued_cookie(strategy, Head(), first)})
    retry = strategy.choose("10.0.0.1", pinned, frozenset({first.index}))
    assert retry.index != first.index
    assert issued_cookie(strategy, pinned, retry) is not None


def test_sticky_pin_to_half_open_backend_respects_trial_slots():
    strategy = sticky()
    strategy.update(pool(2))
    first = strategy.choose("10.0.0.1", Head())
    pinned = Head(cookies={COOKIE: issued_cookie(strategy, Head(), first)})
    strategy.update(snapshot(*(view(i, BackendState.HALF_OPEN if i == first.index else BackendState.UP, slots=1)
                               for i in range(2))))
    assert strategy.choose("10.0.0.1", pinned).index == strategy.choose("10.0.0.1", pinned).index == first.index
    strategy.started(first.index)
    assert strategy.choose("10.0.0.1", pinned).index != first.index


# --- geographic --------------------------------------------------------------------------------

GEO_MAP = {"10.1.0.0/16": "us-east-1", "10.2.0.0/16": "us-west-1", "10.3.0.0/16": "eu-west-1",
           "10.4.0.0/16": "ap-south-1"}
REGIONS = {0: "us-east-1", 1: "us-east-1", 2: "us-west-1", 3: "eu-west-1", 4: "sa-east-1"}


def geographic(**options) -> Geographic:
    backends = [
        backend(0, "us-east-1", strategy="geographic", primary_region=True,
                fallback_regions=("us-west-1", "eu-west-1")),
        backend(1, "us-east-1", strategy="geographic", primary_region=True,
                fallback_regions=("us-west-1", "eu-west-1")),
        backend(2, "us-west-1", strategy="geographic"),
        backend(3, "eu-west-1", strategy="geographic", fallback_regions=("us-east-1",)),
        backend(4, "sa-east-1"),
    ]
    strategy = make_strategy(listener("geographic", backends, geo=GEO_MAP, **options), clock=Clock())
    assert isinstance(strategy, Geographic)
    return strategy


def geo_pool(**states) -> PoolSnapshot:
    return snapshot(*(view(i, states.get(chr(ord("a") + i), BackendState.UP), region=REGIONS[i]) for i in range(5)))


def test_geographic_clients_go_to_their_region():
    strategy = geographic()
    strategy.update(geo_pool())
    assert sequence(strategy, 4, client="10.1.0.5") == "abab"
    assert sequence(strategy, 2, client="10.2.0.5") == "cc"
    assert sequence(strategy, 2, client="10.3.0.5") == "dd"


def test_geographic_fallback_regions_in_order_then_any():
    strategy = geographic()
    strategy.update(geo_pool(a=BackendState.DOWN, b=BackendState.OPEN))
    assert sequence(strategy, 3, client="10.1.0.5") == "ccc"
    strategy.update(geo_pool(a=BackendState.DOWN, b=BackendState.OPEN, c=BackendState.DRAINING))
    assert sequence(strategy, 3, client="10.1.0.5") == "ddd"
    strategy.update(geo_pool(a=BackendState.DOWN, b=BackendState.OPEN, c=BackendState.DOWN, d=BackendState.DOWN))
    assert sequence(strategy, 3, client="10.1.0.5") == "eee"


def test_geographic_region_without_fallbacks_goes_to_any_healthy_backend():
    strategy = geographic()
    strategy.update(geo_pool(c=BackendState.DOWN))
    assert set(sequence(strategy, 20, client="10.2.0.5")) == {"a", "b", "d", "e"}


def test_geographic_unknown_client_goes_to_the_primary_region():
    strategy = geographic()
    strategy.update(geo_pool())
    assert sequence(strategy, 4, client="192.0.2.1") == "abab"
    # A known region that no backend serves counts as unknown.
    assert set(sequence(strategy, 4, client="10.4.0.1")) == {"a", "b"}
    # The primary region down: its fallbacks.
    strategy.update(geo_pool(a=BackendState.DOWN, b=BackendState.DOWN))
    assert sequence(strategy, 2, client="192.0.2.1") == "cc"


def test_geographic_without_primary_region_sends_unknown_clients_anywhere():
    strategy = make_strategy(
        listener("geographic", [backend(0, "us-east-1"), backend(1, "us-west-1")], geo=GEO_MAP), clock=Clock()
    )
    strategy.update(snapshot(view(0, region="us-east-1"), view(1, region="us-west-1")))
    assert sequence(strategy, 4, client="192.0.2.1") == "abab"


def test_geographic_region_header_from_trusted_proxy():
    strategy = geographic(region_header="X-Client-Region", trusted_proxies=("127.0.0.0/8",))
    strategy.update(geo_pool())
    assert sequence(strategy, 2, client="127.0.0.1", head=Head({"X-Client-Region": "eu-west-1"})) == "dd"
    # Not from an untrusted peer: unknown region, primary.
    assert set(sequence(strategy, 2, client="192.0.2.1", head=Head({"X-Client-Region": "eu-west-1"}))) <= {"a", "b"}


def test_geographic_client_behind_trusted_proxy_is_mapped():
    strategy = geographic(trusted_proxies=("127.0.0.0/8",))
    strategy.update(geo_pool())
    assert sequence(strategy, 2, client="127.0.0.1", head=Head({"X-Forwarded-For": "10.2.3.4"})) == "cc"


def test_geographic_retry_stays_in_preference_order():
    strategy = geographic()
    strategy.update(geo_pool())
    tried = frozenset({0, 1})
    assert name(strategy.choose("10.1.0.5", None, tried)) == "c"
    assert name(strategy.choose("10.1.0.5", None, tried | {2})) == "d"


# --- construction ------------------------------------------------------------------------------


def test_make_strategy_for_every_documented_name():
    expected = {
        "round_robin": RoundRobin,
        "health_aware_round_robin": HealthAwareRoundRobin,
        "weighted_round_robin": SmoothWeighted,
        "performance_based": SmoothWeighted,
        "least_connections": LeastConnections,
        "ip_hash": IpHash,
        "sticky_sessions": StickySessions,
        "geographic": Geographic,
    }
    assert sorted(expected) == sorted(STRATEGIES)
    for strategy_name, cls in expected.items():
        assert type(made(strategy_name)) is cls


def test_make_strategy_rejects_unknown_names():
    with pytest.raises(ValueError, match="round_robbin"):
        make_strategy(listener("round_robbin"))
