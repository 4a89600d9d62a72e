"""Delayed `tell`s for actors: one scheduler thread per Runtime instead of a thread per timer.

pykka actors have no timers. An actor that needs one (health check rounds, the breaker's recovery
timeout, quarantine expiry, performance score updates) asks the shared `Timers` to tell it a
message later; the message then arrives in its mailbox like any other, so the actor's state is
still touched by its own thread only.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time

import pykka


class TimerHandle:
    """Returned by `Timers.tell_later` and `ProcessWatcher.call_later`; `cancel()` keeps the message
    from being sent (the callback from running)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle, pykka.ActorRef, object]] = []
        self._order = itertools.count()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pmdaemon-timers", daemon=True)
        self._thread.start()

    def tell_later(self, delay: float, actor_ref: pykka.ActorRef, message: object) -> TimerHandle:
        """Tell `message` to `actor_ref` after `delay` seconds (dropped if the actor has stopped)."""
        handle = TimerHandle()
        with self._wakeup:
            due = time.monotonic() + max(0.0, delay)
            heapq.heappush(self._heap, (due, next(self._order), handle, actor_ref, message))
            self._wakeup.notify()
        return handle

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._heap.clear()
            self._wakeup.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._wakeup:
            while not self._closed:
                if not self._heap:
                    self._wakeup.wait()
                    continue
                due, _, handle, actor_ref, message = self._heap[0]
                now = time.monotonic()
                if due > now:
                    self._wakeup.wait(due - now)
                    continue
                heapq.heappop(self._heap)
                if not handle.cancelled:
                    try:
                        actor_ref.tell(message)
                    except pykka.ActorDeadError:
                        pass
