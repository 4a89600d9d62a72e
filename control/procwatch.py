"""The supervisor's watcher thread: notices child exits the moment they happen, and runs its timers.

Why a thread of its own: the ProcessSupervisor actor must never block, yet it has to learn of an
exit at once (a crashed backend leaves the pool within milliseconds, not at the next poll) and it
needs timers (restart delays, the SIGKILL after `kill_timeout`, resource sampling). One thread runs
a `selectors` loop over:

- one `pidfd` per watched child (`os.pidfd_open`): it becomes readable when the child exits, so
  exits cost no polling and no SIGCHLD handler;
- a wake-up socketpair, written by other threads when they add a child or a timer;
- a heap of timers, whose nearest deadline is the select timeout.

Callbacks run on this thread and must be quick: the supervisor's only `tell` the actor a message,
so the actor's state is still touched by the actor's thread alone. The watcher reaps the child
itself (`Popen.wait()` once the pidfd is readable, which returns at once) before calling back.

Orphans: while a watcher runs, this process is a *child subreaper* (prctl PR_SET_CHILD_SUBREAPER).
A grandchild whose parent (the instance) dies is re-parented to us instead of to PID 1, which in
containers and micro-VMs often never reaps, leaving zombies that look like leftover processes.
`kill_and_reap()` then kills such leftovers and reaps the ones that became ours.
"""
from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import os
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable

import psutil

from pmdaemon.control.timers import TimerHandle

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
_subreaper_users = 0
_subreaper_lock = threading.Lock()


def _set_child_subreaper(enabled: bool) -> None:
    """Counted across watchers: the flag is per process, so it stays on while any watcher runs."""
    global _subreaper_users
    with _subreaper_lock:
        _subreaper_users += 1 if enabled else -1
        if _subreaper_users == (1 if enabled else 0):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))


def kill_and_reap(processes: Iterable[psutil.Process], timeout: float = 1.0) -> None:
    """SIGKILL `processes` and wait (at most `timeout`) until they are gone, reaping those that are ours.

    A killed process dies within microseconds, so this returns almost at once. A leftover whose
    parent is also being killed is re-parented to us (we are the subreaper) a moment later, hence
    the retry of `waitpid` on each round instead of a single wait.
    """
    pending = []
    for process in processes:
        try:
            process.kill()
            pending.append(process)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while pending:
        still_there = []
        for process in pending:
            try:
                pid, _status = os.waitpid(process.pid, os.WNOHANG)
                if pid == 0:
                    still_there.append(process)
            except ChildProcessError:  # not our child: gone, or a zombie whose parent is dying too
                if process.is_running():
                    still_there.append(process)
        pending = still_there
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.002)


class ProcessWatcher:
    """Watches child processes through pidfds and runs delayed callbacks, on one daemon thread."""

    def __init__(self, name: str = "pmdaemon-procwatch") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._new_children: list[tuple[int, subprocess.Popen, Callable[[int], None]]] = []
        self._timers: list[tuple[float, int, TimerHandle, Callable[[], None]]] = []
        self._order = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        _set_child_subreaper(True)
        self._thread.start()

    def watch(self, process: subprocess.Popen, on_exit: Callable[[int], None]) -> None:
        """Call `on_exit(returncode)` on the watcher thread once `process` has exited and been reaped.

        The pidfd is opened here, in the caller's thread, right after the spawn: the child cannot
        have been reaped yet, so its pid still names it even if it already died.
        """
        pidfd = os.pidfd_open(process.pid)
        with self._lock:
            if self._closed:
                os.close(pidfd)
                raise RuntimeError("process watcher is closed")
            self._new_children.append((pidfd, process, on_exit))
        self._wake()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback()` on the watcher thread after `delay` seconds, unless cancelled first."""
        handle = TimerHandle()
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay), next(self._order), handle, callback))
        self._wake()
        return handle

    def close(self) -> None:
        """Stop the thread. Children still watched are not waited for (the supervisor stops them first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if self._thread.ident is not None:  # started
            self._thread.join()
            _set_child_subreaper(False)
        for key in list(self._selector.get_map().values()):
            if key.fileobj is not self._wake_reader:
                os.close(key.fd)
        for pidfd, _process, _on_exit in self._new_children:
            os.close(pidfd)
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except BlockingIOError:
            pass  # the socket buffer is full of wake-ups already: the loop will wake anyway

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                for pidfd, process, on_exit in self._new_children:
                    self._selector.register(pidfd, selectors.EVENT_READ, (process, on_exit))
                self._new_children.clear()
                timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            for key, _events in self._selector.select(timeout):
                if key.fileobj is self._wake_reader:
                    self._drain_wakeups()
                else:
                    self._reap(key)
            self._run_due_timers()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self, key: selectors.SelectorKey) -> None:
        process, on_exit = key.data
        self._selector.unregister(key.fd)
        os.close(key.fd)
        returncode = process.wait()
        self._call(on_exit, returncode)

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers))
        for _deadline, _order, handle, callback in due:
            if not handle.cancelled:
                self._call(callback)

    @staticmethod
    def _call(callback: Callable, *args) -> None:
        try:
            callback(*args)
        except Exception:  # a failing callback must not stop exit detection for every other child
            log.exception("process watcher callback failed")
