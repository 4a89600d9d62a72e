"""Alert rules built for tests, with defaults where the test does not care."""
from __future__ import annotations

from pmdaemon.config.model import AlertRule


def rule(name="backend_down", condition="healthy_backends < 2", metric="healthy_backends", op="<",
         threshold=2.0, duration=1.0, action="webhook", url=None, recipients=()) -> AlertRule:
    return AlertRule(name, condition, metric, op, threshold, duration, action, url, recipients)
