"""The Runtime assembles the daemon: the process supervisor, one set of actors per listener and the I/O loop.

The daemon owns one Runtime. Its methods are called from the daemon's control-socket threads, so
every public method takes `self._lock`; they only `ask` actors (never the loop, which is fed by
`tell`s and `publish`).
"""
from __future__ import annotations

import threading
from pathlib import Path

import pykka

from actors.supervisor import ProcessSupervisor
from net.config import Config


class Runtime:
    """Starts and stops everything one config describes."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.supervisor: pykka.ActorRef = ProcessSupervisor.start(self.home)
        self.config: Config | None = None
        self._lock = threading.RLock()

    def apply(self, config: Config) -> None:
        """Start the config's apps (running ones are left alone)."""
        with self._lock:
            supervisor = self.supervisor.proxy()
            for app in config.apps:
                supervisor.start_app(app).get()
            self.config = config

    def shutdown(self) -> None:
        """Stop every process this runtime supervises, then every actor."""
        with self._lock:
            try:
                if self.supervisor.is_alive():
                    self.supervisor.proxy().stop_all().get()
            finally:
                pykka.ActorRegistry.stop_all()
