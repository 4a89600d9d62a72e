"""Consistent hash ring: stability under membership change and evenness."""
from collections import Counter

from pmdaemon.net.hashring import HashRing

FIVE = {f"127.0.0.1:{3000 + i}": 1 for i in range(5)}
CLIENTS = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}".encode() for i in range(20000)]


def placement(ring: HashRing) -> dict[bytes, str]:
    return {client: ring.lookup(client) for client in CLIENTS}


def test_empty_ring_has_no_owner():
    ring = HashRing({})
    assert ring.lookup(b"10.0.0.1") is None
    assert list(ring.candidates(b"10.0.0.1")) == []


def test_lookup_is_deterministic_across_rebuilds():
    assert placement(HashRing(FIVE)) == placement(HashRing(dict(reversed(list(FIVE.items())))))


def test_distribution_is_roughly_even():
    counts = Counter(placement(HashRing(FIVE)).values())
    assert set(counts) == set(FIVE)
    for _member, count in counts.items():
        assert 0.75 * 4000 < count < 1.25 * 4000, counts


def test_removing_a_member_moves_only_its_clients():
    before = placement(HashRing(FIVE))
    removed = "127.0.0.1:3002"
    after = placement(HashRing({m: w for m, w in FIVE.items() if m != removed}))
    moved = {c for c in CLIENTS if before[c] != after[c]}
    assert moved == {c for c in CLIENTS if before[c] == removed}
    # Its clients spread over the others instead of landing on one neighbour.
    assert len(Counter(after[c] for c in moved)) == 4


def test_adding_a_member_takes_clients_only_onto_it():
    four = {m: w for m, w in FIVE.items() if m != "127.0.0.1:3004"}
    before = placement(HashRing(four))
    after = placement(HashRing(FIVE))
    for client in CLIENTS:
        assert after[client] in (before[client], "127.0.0.1:3004")


def test_weight_scales_the_share():
    counts = Counter(placement(HashRing({"a:1": 3, "b:1": 1})).values())
    assert 2.4 < counts["a:1"] / counts["b:1"] < 3.6, counts


def test_candidates_start_at_the_owner_and_list_each_member_once():
    ring = HashRing(FIVE)
    for client in CLIENTS[:200]:
        order = list(ring.candidates(client))
        assert order[0] == ring.lookup(client)
        assert sorted(order) == sorted(FIVE)


def test_candidates_agree_with_the_ring_without_the_owner():
    """The second candidate is where the key would go if its owner left the ring."""
    ring = HashRing(FIVE)
    for client in CLIENTS[:300]:
        first, second = list(ring.candidates(client))[:2]
        without = HashRing({m: w for m, w in FIVE.items() if m != first})
        assert without.lookup(client) == second
