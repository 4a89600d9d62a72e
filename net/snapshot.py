"""The two message shapes that cross between the control plane (actors) and the data plane (the loop).

Actors -> loop: a `PoolSnapshot` per listener, replaced whole (never mutated). The loop reads it for
every routing decision, so a decision is a local read. Snapshots are plain tuples of strings and
numbers: `to_wire()` makes them JSON-serialisable, so the same message can later cross a process
boundary over the socketpair instead of a queue.

Loop -> actors: `Outcome` tuples, one per finished request (HTTP) or connection (TCP), sent in
batches (`LoopReport`) with `tell` (never `ask`) every few milliseconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from pmdaemon.states import BackendState, ErrorKind


@dataclass(frozen=True)
class BackendView:
    """What the loop needs to know about one backend to route to it."""

    index: int  # backend id: its position in ListenerConfig.backends until a pool replacement (scale,
    #             reload --config); then it stays with the backend and a new backend gets an unused one
    host: str
    port: int
    instance: str | None
    weight: int  # effective weight (performance_based changes it)
    state: BackendState
    region: str | None = None
    half_open_slots: int = 0  # concurrent trial requests admitted while HALF_OPEN

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def routable(self) -> bool:
        """May take new unpinned requests."""
        return self.state in (BackendState.UP, BackendState.HALF_OPEN)


@dataclass(frozen=True)
class PoolSnapshot:
    listener: int  # ListenerConfig.index
    version: int
    backends: tuple[BackendView, ...]

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict) -> PoolSnapshot:
        backends = tuple(BackendView(**{**b, "state": BackendState(b["state"])}) for b in data["backends"])
        return cls(data["listener"], data["version"], backends)


class Outcome(NamedTuple):
    """One finished request (HTTP) or connection (TCP), as the loop saw it.

    The class is the one place an Outcome is filled in (net/proxy.py, net/relay.py, net/tunnel.py,
    net/tcpproxy.py call it by keyword): the defaults describe what moved no bytes and sent no status,
    a failed attempt or a refused connection. No wrapper function: this is built once per request."""

    listener: int
    backend: int  # BackendView.index, or -1 when no backend was involved (LB-made response)
    client_ip: str
    error: ErrorKind | None  # None, or how it failed (states.ErrorKind says which kinds mean what)
    status: int = 0  # HTTP status sent to the client; 0 for TCP connections
    latency: float = 0.0  # seconds from request head received to response head sent (TCP: duration)
    bytes_in: int = 0  # from the client
    bytes_out: int = 0  # to the client
    # The load balancer produced the response itself; a backend failure only when it answered 502/504
    # for one (then `backend` and `error` say which and why), see net/breaker.py `verdict`.
    lb_made: bool = False


@dataclass(frozen=True)
class LoopReport:
    """IOLoop -> control plane, at most every 50 ms: what happened since the last report."""

    outcomes: tuple[Outcome, ...]
    active: dict = field(default_factory=dict)  # (listener, backend) -> requests/connections in flight
    client_connections: dict = field(default_factory=dict)  # listener -> open client connections
    # listener -> {client region (None = unknown): requests}, from strategies that resolve regions
    client_regions: dict = field(default_factory=dict)
