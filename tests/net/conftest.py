"""Fixtures of the data-plane tests: real RecordingBackends and IOLoops on threads, stopped at teardown."""
from __future__ import annotations

import pytest

from support.backends import RecordingBackend
from support.proxyharness import LB


@pytest.fixture
def backends():
    """Factory: `backends(n)` starts n more RecordingBackends, named "a", "b", ... in order."""
    made = []

    def make(n: int = 1) -> list[RecordingBackend]:
        new = [RecordingBackend(name) for name in "abcdefgh"[len(made):len(made) + n]]
        made.extend(new)
        return new

    yield make
    for backend in made:
        backend.stop()


@pytest.fixture
def lb():
    """Factory: `lb(backends, **listener_options)` starts an LB over them."""
    made = []

    def make(backends, **options) -> LB:
        instance = LB(backends, **options)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.close()
