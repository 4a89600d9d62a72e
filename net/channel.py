"""One non-blocking socket in the I/O loop: buffered writes, read/write interest, deadlines.

Writes are optimistic: `write()` calls `send()` at once and only what the kernel did not take is
buffered, with write interest registered until it drains (then `on_drained()`). The selector is
touched only when the interest set really changes.

Deadlines are lazy so that moving them costs an attribute write, not a heap operation: a channel
has a protocol `deadline` (connect, read, idle, header...) and a `write_deadline` (pending output
made no progress). The loop's heap holds at most one live entry per channel, for the earliest
known time; when it fires early the channel re-arms itself for the current deadline. A stale entry
(superseded by an earlier one) is recognised by its sequence number and ignored.
"""
from __future__ import annotations

import math
import select
import socket
from selectors import EVENT_READ, EVENT_WRITE

INF = float("inf")
_EPOLL_INTEREST = {EVENT_READ: select.EPOLLIN, EVENT_WRITE: select.EPOLLOUT,
                   EVENT_READ | EVENT_WRITE: select.EPOLLIN | select.EPOLLOUT}


class Poller:
    """The loop's epoll set, with the part of the `selectors` API that the loop and its channels use
    (`register`/`modify`/`unregister(sock)` with `EVENT_READ`/`EVENT_WRITE` and a data object, the
    same KeyError rules), and a `poll` that skips `selectors`' per-event `SelectorKey` lookup and
    mask arithmetic: the loop dispatches straight from `targets`.

    `targets[fd] = (data, readable_on, writable_on, sock)`: an epoll event `ev` means "readable" when
    `ev & readable_on` and "writable" when `ev & writable_on`. These masks are chosen at registration
    so that the result is exactly what `selectors.EpollSelector.select` reports: any event but EPOLLOUT
    alone is readable, any event but EPOLLIN alone is writable, each only if that interest is
    registered (so EPOLLHUP/EPOLLERR wake both registered directions)."""

    def __init__(self):
        self._epoll = select.epoll()
        self.targets: dict[int, tuple] = {}

    @staticmethod
    def _entry(sock, events: int, data) -> tuple:
        return (data, ~select.EPOLLOUT if events & EVENT_READ else 0,
                ~select.EPOLLIN if events & EVENT_WRITE else 0, sock)

    def _fd(self, sock) -> int:
        fd = sock.fileno()
        if fd < 0:  # closed already: find it by object, as selectors does
            for known, entry in self.targets.items():
                if entry[3] is sock:
                    return known
            raise KeyError(f"{sock!r} is not registered")
        return fd

    def register(self, sock, events: int, data) -> None:
        fd = self._fd(sock)
        if fd in self.targets:
            raise KeyError(f"{sock!r} (fd {fd}) is already registered")
        self._epoll.register(fd, _EPOLL_INTEREST[events])
        self.targets[fd] = self._entry(sock, events, data)

    def modify(self, sock, events: int, data) -> None:
        fd = self._fd(sock)
        if fd not in self.targets:
            raise KeyError(f"{sock!r} is not registered")
        self._epoll.modify(fd, _EPOLL_INTEREST[events])
        self.targets[fd] = self._entry(sock, events, data)

    def unregister(self, sock) -> None:
        fd = self._fd(sock)
        del self.targets[fd]  # KeyError if not registered
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed under us: epoll already forgot it

    def poll(self, timeout: float | None) -> list[tuple]:
        """Ready `(targets entry, epoll events)` pairs. Entries are resolved here, before any handler
        runs: a handler may close a socket whose fd a new socket reuses within the same batch, and
        the old entry (its `closed` target) must get that batch's stale event, not the new one.
        `timeout` is rounded up to whole milliseconds (epoll's unit), as `selectors` does."""
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            timeout = math.ceil(timeout * 1e3) * 1e-3
        targets = self.targets
        ready = self._epoll.poll(timeout, max(len(targets), 1))
        return [(targets[fd], ev) for fd, ev in ready if fd in targets]

    def close(self) -> None:
        self._epoll.close()
        self.targets.clear()


class Channel:
    __slots__ = ("loop", "sock", "out", "events", "closed", "reading", "deadline", "write_deadline",
                 "timer_at", "timer_seq", "write_timeout", "__weakref__")

    def __init__(self, loop, sock: socket.socket, write_timeout: float):
        self.loop = loop
        self.sock = sock
        self.out = bytearray()
        self.events = 0
        self.closed = False
        self.reading = True
        self.deadline: float | None = None
        self.write_deadline: float | None = None
        self.timer_at = INF
        self.timer_seq = -1
        self.write_timeout = write_timeout

    # ---- interest set ----------------------------------------------------------------------
    def _update_events(self) -> None:
        events = (EVENT_READ if self.reading else 0) | (EVENT_WRITE if self.out or self._wants_write() else 0)
        if events == self.events or self.closed:
            return
        selector = self.loop.selector
        if not self.events:
            selector.register(self.sock, events, self)
        elif not events:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, events, self)
        self.events = events

    def _wants_write(self) -> bool:
        """Write interest without pending output (a non-blocking connect in progress)."""
        return False

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._update_events()

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self._update_events()

    # ---- writing ---------------------------------------------------------------------------
    def write(self, data) -> None:
        """Send now what the kernel takes, buffer the rest. Errors surface via on_error, deferred."""
        if self.closed:
            return
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.loop.call_soon(self._failed, exc)
            return
        if sent < len(data):
            self.out += memoryview(data)[sent:]
            self.write_deadline = self.loop.now + self.write_timeout
            self._arm(self.write_deadline)
            self._update_events()

    def on_writable(self) -> None:
        if not self.out:
            self._update_events()
            return
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed(exc)
            return
        del self.out[:sent]
        if self.out:
            self.write_deadline = self.loop.now + self.write_timeout
            self._arm(self.write_deadline)
            return
        self.write_deadline = None
        self._update_events()
        self.on_drained()

    @property
    def pending(self) -> int:
        return len(self.out)

    def _failed(self, exc: OSError) -> None:
        if not self.closed:
            self.out.clear()
            self.on_error(exc)

    # ---- deadlines -------------------------------------------------------------------------
    def set_deadline(self, when: float | None) -> None:
        self.deadline = when
        if when is not None and when < self.timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if when < self.timer_at:
            self.timer_at = when
            self.timer_seq = self.loop.schedule(when, self)

    def fire_timer(self, seq: int, now: float) -> None:
        if seq != self.timer_seq or self.closed:
            return
        self.timer_at = INF
        if self.write_deadline is not None:
            if self.write_deadline <= now:
                self.write_deadline = None
                self.on_write_timeout()
                return
            self._arm(self.write_deadline)
        if self.deadline is not None:
            if self.deadline <= now:
                self.deadline = None
                self.on_timeout(now)
            else:
                self._arm(self.deadline)

    # ---- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        if self.events:
            self.loop.selector.unregister(self.sock)
            self.events = 0
        self.closed = True
        self.sock.close()

    # ---- subclass hooks --------------------------------------------------------------------
    def on_readable(self) -> None:
        raise NotImplementedError

    def on_drained(self) -> None:
        """All buffered output was sent."""

    def on_timeout(self, now: float) -> None:
        self.close()

    def on_write_timeout(self) -> None:
        self.close()

    def on_error(self, exc: OSError) -> None:
        self.close()
