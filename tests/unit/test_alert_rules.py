"""Alert rules: the per-rule state machine, without servers (delivery: tests/actors/test_alerter.py)."""
import pytest

from pmdaemon.actors.alerter import RuleTracker
from pmdaemon.states import AlertState

from support.alerts import rule


def test_rule_fires_only_after_holding_for_its_duration():
    t = RuleTracker(rule(duration=5.0))
    assert t.observe(1, now=0.0, wall=1000.0) is None and t.state == "pending"
    assert t.observe(1, now=4.9, wall=1004.9) is None
    assert t.observe(1, now=5.0, wall=1005.0) == AlertState.FIRING
    assert t.since == 1000.0  # when the condition started to hold


def test_firing_and_resolved_are_reported_once_each():
    t = RuleTracker(rule(duration=0.0))
    events = [t.observe(v, now=float(i), wall=float(i)) for i, v in enumerate([1, 1, 1, 3, 3, 1])]
    assert events == [AlertState.FIRING, None, None, AlertState.RESOLVED, None, AlertState.FIRING]


def test_a_dip_restarts_the_duration():
    t = RuleTracker(rule(duration=2.0))
    t.observe(1, now=0.0, wall=0.0)
    t.observe(5, now=1.5, wall=1.5)  # recovered before firing: nothing sent
    assert t.state == "ok"
    assert t.observe(1, now=2.0, wall=2.0) is None
    assert t.observe(1, now=3.9, wall=3.9) is None
    assert t.observe(1, now=4.0, wall=4.0) == AlertState.FIRING


@pytest.mark.parametrize("op,value,fires", [(">", 5.1, True), (">", 5.0, False), (">=", 5.0, True),
                                             ("<=", 5.0, True), ("==", 5.0, True), ("!=", 5.0, False)])
def test_operators(op, value, fires):
    t = RuleTracker(rule(metric="error_rate", op=op, threshold=5.0, duration=0.0))
    assert (t.observe(value, now=0.0, wall=0.0) == AlertState.FIRING) is fires
