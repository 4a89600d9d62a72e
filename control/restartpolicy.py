"""What to do when an instance's process exits on its own: PM2's restart rules, with no processes or clocks.

Theory of operation (decisions.md section 2):

- Every exit the supervisor did not ask for is a crash, whatever the exit code.
- `autorestart: false`: a crashed instance stays `stopped`.
- A crash after less than `min_uptime` of running is *unstable*. Unstable crashes in a row are
  counted; a run that lasts `min_uptime` or longer ends the streak (the count goes back to 0).
  After `max_restarts` unstable restarts, the next unstable crash leaves the instance `errored`
  instead of restarting it, so at `errored` the instance has been restarted `max_restarts` times
  in the streak (decisions.md section 8). Stable crashes are always restarted.
- Delay before the restart: `restart_delay`, unless `exp_backoff_restart_delay` is set, which wins:
  the first crash waits that delay, each further crash 1.5 times the previous one, growing no
  further than 15 s (a base above 15 s is used as is); a run of 30 s or more starts the growth over.

`RestartHistory` is an immutable value: `after_crash()` returns the verdict and the next history,
like urllib3's `Retry.increment()`. The supervisor keeps one per instance and starts a fresh one
when an operator starts a stopped or errored instance.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from pmdaemon.config.model import AppConfig

BACKOFF_FACTOR = 1.5
BACKOFF_CAP = 15.0  # seconds
BACKOFF_RESET_UPTIME = 30.0  # seconds up after which the exponential backoff starts over


class CrashAction(Enum):
    """What a crash leads to: a restart (now or after a delay), or the instance left `errored` or
    `stopped` (the statuses of the same names)."""

    RESTART = auto()
    ERRORED = auto()
    STOPPED = auto()


@dataclass(frozen=True)
class RestartRules:
    """An app's restart settings, in seconds."""

    autorestart: bool = True
    max_restarts: int = 16
    min_uptime: float = 1.0
    restart_delay: float = 0.0
    exp_backoff_restart_delay: float = 0.0

    @classmethod
    def of(cls, app: AppConfig) -> RestartRules:
        return cls(app.autorestart, app.max_restarts, app.min_uptime, app.restart_delay, app.exp_backoff_restart_delay)


@dataclass(frozen=True)
class CrashVerdict:
    action: CrashAction
    delay: float = 0.0  # seconds to wait before the restart ("waiting restart" meanwhile)
    unstable: bool = False  # the process ran less than min_uptime
    reason: str = ""  # for the error log and `list()`, when the action is ERRORED


@dataclass(frozen=True)
class RestartHistory:
    unstable_restarts: int = 0  # unstable restarts in the current streak
    backoff_delay: float = 0.0  # the last exponential backoff delay used; 0 = none yet

    def after_crash(self, rules: RestartRules, uptime: float) -> tuple[CrashVerdict, RestartHistory]:
        """The verdict for a crash after `uptime` seconds of running, and the history to keep."""
        unstable = uptime < rules.min_uptime
        streak = self.unstable_restarts if unstable else 0
        if not rules.autorestart:
            return CrashVerdict(CrashAction.STOPPED, unstable=unstable), RestartHistory(streak, self.backoff_delay)
        if unstable and streak >= rules.max_restarts:
            reason = (f"crashed {streak + 1} times in a row within min_uptime ({rules.min_uptime:g} s); "
                      f"not restarted after max_restarts ({rules.max_restarts})")
            return CrashVerdict(CrashAction.ERRORED, unstable=True, reason=reason), RestartHistory(0, 0.0)
        if unstable:
            streak += 1
        backoff = 0.0
        if rules.exp_backoff_restart_delay > 0:
            previous = 0.0 if uptime >= BACKOFF_RESET_UPTIME else self.backoff_delay
            base = rules.exp_backoff_restart_delay
            backoff = base if previous == 0 else min(previous * BACKOFF_FACTOR, max(BACKOFF_CAP, base))
            delay = backoff
        else:
            delay = rules.restart_delay
        return CrashVerdict(CrashAction.RESTART, delay=delay, unstable=unstable), RestartHistory(streak, backoff)
