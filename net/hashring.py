"""Consistent hash ring for `ip_hash` (decisions.md section 4).

Each member is placed at `VNODES_PER_WEIGHT x weight` points whose positions depend only on the
member's own name (`"address#i"`), so adding or removing a member moves only the keys that land on
its points: every other key keeps its member. A key goes to the first point clockwise from its hash.
The hash is blake2b (stable across processes and Python versions, unlike `hash()`).
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Mapping
from hashlib import blake2b

# 160 points per unit of weight spreads keys within a few percent of even (ketama uses the same).
VNODES_PER_WEIGHT = 160


def ring_hash(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Immutable ring over members (address -> weight); build it when the membership changes."""

    __slots__ = ("_points", "_owners", "_members")

    def __init__(self, members: Mapping[str, int], vnodes_per_weight: int = VNODES_PER_WEIGHT) -> None:
        placed = sorted(
            (ring_hash(f"{member}#{i}".encode()), member)
            for member, weight in members.items()
            for i in range(vnodes_per_weight * max(weight, 1))
        )
        self._points = [point for point, _ in placed]
        self._owners = [member for _, member in placed]
        self._members = len(members)

    def __len__(self) -> int:
        return self._members

    def lookup(self, key: bytes) -> str | None:
        """The member that owns `key`; None on an empty ring."""
        if not self._points:
            return None
        i = bisect_right(self._points, ring_hash(key))
        return self._owners[i if i < len(self._owners) else 0]

    def candidates(self, key: bytes) -> Iterator[str]:
        """Every member once, in ring order from `key`'s owner: where a key goes when its owner can't
        take it (a retry, a full half-open backend), the same for every request with that key."""
        owners = self._owners
        if not owners:
            return
        start = bisect_right(self._points, ring_hash(key))
        seen: set[str] = set()
        count = len(owners)
        for k in range(count):
            owner = owners[(start + k) % count]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self._members:
                    return
