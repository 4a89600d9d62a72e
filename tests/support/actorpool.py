"""A Listener actor and its HealthProbe run for real, with every snapshot the Listener publishes recorded
(where the IOLoop would receive them), for actor-level tests."""
from __future__ import annotations

import threading

from pmdaemon.actors.health import HealthProbe
from pmdaemon.actors.listener import Listener
from pmdaemon.actors.messages import HealthInfo
from pmdaemon.config.model import ListenerConfig
from pmdaemon.control.timers import Timers


class Pool:
    """A Listener actor and its HealthProbe, with every snapshot the Listener publishes recorded."""

    def __init__(self, listener: ListenerConfig):
        self.snapshots = []
        self._lock = threading.Lock()
        self.timers = Timers()
        self.listener = Listener.start(listener, self._record, self.timers)
        self.probe = HealthProbe.start(listener, self.listener, None, self.timers)
        self.listener.proxy().attach_probe(self.probe).get()

    def _record(self, snapshot):
        with self._lock:
            self.snapshots.append(snapshot)

    def states(self) -> list[str]:
        with self._lock:
            return [b.state for b in self.snapshots[-1].backends]

    def health(self) -> list[HealthInfo]:
        return self.probe.proxy().status().get()

    def close(self):
        self.probe.stop()
        self.listener.stop()
        self.timers.close()
