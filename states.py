"""The words pmdaemon's states are spelled with, in one leaf module that imports nothing of ours.

Every status, state and error kind the CLI prints or the JSON carries is one of these members. They
are `StrEnum`s: a member *is* its string (`InstanceStatus.ONLINE == "online"`, `json.dumps` and
`ujson.dumps` write `"online"`), so the control socket's JSON and the CLI's tables stay exactly as
the spec words them, while the code names a state once and a typo is an `AttributeError`, not a
silently unmatched string. Both planes import this module: it is below `net/`, `actors/` and
`control/` alike.
"""
from __future__ import annotations

from enum import StrEnum


class InstanceStatus(StrEnum):
    """An app instance, as `pmdaemon list` shows it (PM2's words)."""

    LAUNCHING = "launching"
    ONLINE = "online"
    STOPPING = "stopping"
    STOPPED = "stopped"
    WAITING_RESTART = "waiting restart"
    ERRORED = "errored"
    # Only in a Listener's pool table (`lb backends` "process"): no event heard yet for the instance, or it
    # was deleted (scaled away) while its backend is still in the pool.
    UNKNOWN = "unknown"
    REMOVED = "removed"


class BackendState(StrEnum):
    """A backend in a listener's pool, as the data plane routes by it (`lb backends`, `lb health`)."""

    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    OPEN = "open"  # its circuit breaker is open
    HALF_OPEN = "half_open"  # its circuit breaker lets a few trial requests through


class BreakerState(StrEnum):
    """A circuit breaker's state (`lb status`, `lb health`)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ErrorKind(StrEnum):
    """How a request (HTTP) or connection (TCP) failed, in `Outcome.error`, metrics and `lb stats`.

    The backend failed: CONNECT, TIMEOUT, RESET, INVALID_RESPONSE. The client went away or stalled:
    CLIENT_CLOSED, CLIENT_TIMEOUT. The balancer refused or answered itself: LB_4XX, LB_5XX,
    RATE_LIMITED, BREAKER_OPEN, NO_BACKEND.
    """

    CONNECT = "connect"
    TIMEOUT = "timeout"
    RESET = "reset"
    INVALID_RESPONSE = "invalid_response"
    CLIENT_CLOSED = "client_closed"
    CLIENT_TIMEOUT = "client_timeout"
    LB_4XX = "lb_4xx"
    LB_5XX = "lb_5xx"
    RATE_LIMITED = "rate_limited"
    BREAKER_OPEN = "breaker_open"
    NO_BACKEND = "no_backend"


class AlertState(StrEnum):
    """An alert rule's state (`lb status` alerts; webhook and mail bodies)."""

    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"
