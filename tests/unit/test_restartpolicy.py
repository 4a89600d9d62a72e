"""PM2's restart rules (decisions.md section 2), as pure functions of uptime: no processes, no clock."""
from __future__ import annotations

import pytest

from pmdaemon.control.restartpolicy import CrashAction, RestartHistory, RestartRules


def crash_loop(rules: RestartRules, uptimes: list[float]):
    """Feed crashes after the given uptimes; return the verdicts."""
    history, verdicts = RestartHistory(), []
    for uptime in uptimes:
        verdict, history = history.after_crash(rules, uptime)
        verdicts.append(verdict)
    return verdicts


def test_unstable_crashes_restart_max_restarts_times_then_errored():
    rules = RestartRules(max_restarts=3, min_uptime=1.0)
    verdicts = crash_loop(rules, [0.1] * 4)
    assert [v.action for v in verdicts] == [CrashAction.RESTART, CrashAction.RESTART, CrashAction.RESTART,
                                            CrashAction.ERRORED]
    assert all(v.unstable for v in verdicts)
    assert "max_restarts (3)" in verdicts[-1].reason


def test_max_restarts_zero_means_the_first_unstable_crash_is_final():
    assert crash_loop(RestartRules(max_restarts=0), [0.0])[0].action == CrashAction.ERRORED


def test_a_run_past_min_uptime_ends_the_unstable_streak():
    rules = RestartRules(max_restarts=2, min_uptime=1.0)
    verdicts = crash_loop(rules, [0.1, 0.1, 5.0, 0.1, 0.1, 0.1])
    assert [v.action for v in verdicts] == [CrashAction.RESTART, CrashAction.RESTART, CrashAction.RESTART,
                                            CrashAction.RESTART, CrashAction.RESTART, CrashAction.ERRORED]
    assert not verdicts[2].unstable


def test_stable_crashes_are_always_restarted():
    verdicts = crash_loop(RestartRules(max_restarts=1, min_uptime=1.0), [2.0] * 10)
    assert {v.action for v in verdicts} == {CrashAction.RESTART}


def test_autorestart_false_leaves_the_instance_stopped():
    verdict = crash_loop(RestartRules(autorestart=False), [10.0])[0]
    assert verdict.action == CrashAction.STOPPED


def test_restart_delay_applies_to_every_restart():
    verdicts = crash_loop(RestartRules(restart_delay=0.25, min_uptime=0.0), [1.0] * 3)
    assert [v.delay for v in verdicts] == [0.25, 0.25, 0.25]


def test_exponential_backoff_grows_by_half_up_to_15_seconds_and_wins_over_restart_delay():
    rules = RestartRules(exp_backoff_restart_delay=0.1, restart_delay=5.0, max_restarts=100, min_uptime=0.0)
    delays = [v.delay for v in crash_loop(rules, [1.0] * 20)]
    assert delays[:4] == pytest.approx([0.1, 0.15, 0.225, 0.3375])
    assert max(delays) == 15.0 and delays[-1] == 15.0


def test_exponential_backoff_starts_over_after_30_seconds_up():
    rules = RestartRules(exp_backoff_restart_delay=1.0, min_uptime=0.0)
    delays = [v.delay for v in crash_loop(rules, [1.0, 1.0, 1.0, 30.0, 1.0])]
    assert delays == pytest.approx([1.0, 1.5, 2.25, 1.0, 1.5])


def test_a_backoff_base_above_the_cap_is_used_as_is():
    rules = RestartRules(exp_backoff_restart_delay=20.0, min_uptime=0.0)
    assert [v.delay for v in crash_loop(rules, [1.0] * 3)] == [20.0, 20.0, 20.0]
