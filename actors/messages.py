"""Messages the actors `tell` each other. Frozen dataclasses: a message is never mutated after send."""
from __future__ import annotations

from dataclasses import dataclass, field

from net.snapshot import Outcome


@dataclass(frozen=True)
class InstanceEvent:
    """ProcessSupervisor -> subscribers: an instance changed status (or its current state on subscribe)."""

    name: str
    app: str
    status: str  # launching, online, stopping, stopped, waiting restart, errored
    pid: int | None
    port: int | None
    removed: bool = False  # the instance was deleted (or scaled away) and will not come back


@dataclass(frozen=True)
class LoopReport:
    """IOLoop -> control plane, at most every 50 ms: what happened since the last report."""

    outcomes: tuple[Outcome, ...]
    active: dict = field(default_factory=dict)  # (listener, backend) -> requests/connections in flight
    client_connections: dict = field(default_factory=dict)  # listener -> open client connections
