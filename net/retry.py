"""When a failed attempt at a backend is tried again, and after what delay (decisions.md sections 5
and 8), as one immutable value built once per listener config: urllib3's `Retry` is the model, but
nothing is allocated per request: the attempts so far are a plain int the caller keeps.

The rules:
- Every attempt counts against `retries.max_attempts`.
- A connect failure (refused, unreachable, connect timeout) moves on for any method: the backend
  never saw the request.
- A backend that closed or reset the connection before sending a response byte is retried only
  for idempotent methods: it may have acted on the request.
- Nothing is retried after a read timeout (504), an invalid response, or a connection cut once
  response bytes arrived; once a response byte was forwarded to the client the caller does not
  ask at all (the exchange is aborted).
- A retry needs the whole request (head + body) still held (`replayable`).
- Attempt n+1 waits `retry_delay x backoff_factor^(n-1)`, on a loop timer when that is not 0.

A reused pooled connection found closed is no backend failure: `resend_fresh` says when the
request goes again on a fresh connection to the same backend, without using up an attempt.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pmdaemon.config.model import Retries


class Failure(Enum):
    """What went wrong with one attempt, as far as retrying is concerned."""

    CONNECT = "connect"  # refused, unreachable, or the connect (or backend TLS handshake) timed out
    CLOSED = "closed"  # closed or reset before the backend sent a response byte
    CUT_SHORT = "cut_short"  # closed or reset after some response bytes, none forwarded yet
    TIMEOUT = "timeout"  # connected, but no (complete) answer within timeouts.read, or it stopped reading
    INVALID = "invalid"  # the response broke HTTP/1.1's rules


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int  # attempts in all, the first included (at least 1)
    retry_delay: float  # seconds before the first retry
    backoff_factor: float  # each later retry waits this many times longer

    @classmethod
    def from_config(cls, retries: Retries) -> RetryPolicy:
        return cls(max(1, retries.max_attempts), retries.retry_delay, retries.backoff_factor)

    def delay_before(self, attempt: int) -> float:
        """Delay before attempt `attempt` (2 = the first retry)."""
        return self.retry_delay * self.backoff_factor ** (attempt - 2)

    def next_delay(self, failure: Failure, attempts: int, idempotent: bool = True,
                   replayable: bool = True) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and answer the failure.

        `attempts`: attempts made so far, the failed one included; `idempotent`: the request's
        method may be repeated (TCP connections: always); `replayable`: the whole request is still
        held, so it can be sent again."""
        if attempts >= self.max_attempts or not replayable:
            return None
        if failure is Failure.CONNECT or (failure is Failure.CLOSED and idempotent):
            return self.delay_before(attempts + 1)
        return None

    @staticmethod
    def resend_fresh(failure: Failure, reused: bool, idempotent: bool, replayable: bool) -> bool:
        """A pooled keep-alive connection that the backend had closed meanwhile: send the request
        again on a fresh connection to the same backend (no attempt used, no backend failure)."""
        return reused and failure is Failure.CLOSED and idempotent and replayable
