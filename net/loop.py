"""The data plane: one thread, one selector (epoll, `net.channel.Poller`), every client and backend socket.

Other threads talk to the loop only through `add_listener`, `replace_listener`, `remove_listener`,
`publish` and `stop`: each puts a call on a queue and writes one byte to a wake-up socketpair (trio's
`_wakeup_socketpair` trick), so the loop never takes a lock on its hot path and never waits on an
actor. The loop talks back only through `on_report(LoopReport)`, at most every 50 ms, with the
outcomes collected since the last report and the current gauges.

One loop turn: flush the writes the last turn queued (net/channel.py) -> select -> dispatch each
ready channel's `on_readable`/`on_writable` -> run calls deferred with `call_soon` -> fire due timers
from one heap -> maybe report. `now` is read once per turn; handlers use `loop.now`.
"""
from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import queue
import socket
import time
from collections.abc import Callable
from functools import partial
from selectors import EVENT_READ

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.breaker import TrialSlots, verdict
from pmdaemon.net.channel import Poller
from pmdaemon.net.listeners import Listener, ListenerTls, make_listener
from pmdaemon.net.proxy import HttpListener
from pmdaemon.net.snapshot import LoopReport, Outcome, PoolSnapshot
from pmdaemon.net.strategies import make_strategy

log = logging.getLogger("pmdaemon.loop")

REPORT_INTERVAL = 0.05
COMPACT_MIN = 1024  # dead timer entries before the heap is worth rebuilding
LISTEN_BACKLOG = 1024


class Timer:
    """A one-off `call_later` callback in the loop's heap."""

    __slots__ = ("fn", "args", "cancelled")

    def __init__(self, fn, args):
        self.fn, self.args, self.cancelled = fn, args, False

    def fire_timer(self, _seq: int, _now: float) -> None:
        if not self.cancelled:
            self.fn(*self.args)

    def timer_live(self, _seq: int) -> bool:
        return not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True


class _Waker:
    """Read end of the wake-up socketpair, registered like a channel."""

    closed = False

    def __init__(self, loop: IOLoop, sock: socket.socket):
        self.loop, self.sock = loop, sock

    def on_readable(self) -> None:
        try:
            while self.sock.recv(4096):
                pass
        except BlockingIOError:
            pass
        self.loop.run_calls()


def resolve_host(host: str) -> str:
    """An IP literal for `host`; names are resolved here, in the calling thread, never in the loop."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
        assert isinstance(address, str), "an AF_INET or AF_INET6 sockaddr starts with the host string"
        return address


class IOLoop:
    def __init__(self, on_report: Callable[[LoopReport], None], strategy_factory: Callable | None = None):
        """`strategy_factory(listener_cfg) -> Strategy`; defaults to net.strategies.make_strategy."""
        self.on_report = on_report
        self._strategy_factory = strategy_factory or make_strategy
        self.selector = Poller()
        self.now = time.monotonic()
        self.listeners: dict[int, Listener] = {}
        self.outcomes: list[Outcome] = []
        self.active: dict[tuple[int, int], int] = {}
        self.client_connections: dict[int, int] = {}
        self.gauges_changed = False
        self._timers: list = []
        self._dead_timers = 0  # heap entries that can no longer fire (closed or re-armed channels)
        self._seq = itertools.count()
        self._soon: list = []
        self.unflushed: list = []  # channels with writes of this turn (net/channel.py: Channel.write)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._running = False
        self._stopping = False
        self._last_report = 0.0
        self._bound: dict[int, tuple] = {}
        self._trials: dict[int, TrialSlots] = {}  # per listener: half-open backends' trial slots
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._waker = _Waker(self, self._wake_r)
        self.selector.register(self._wake_r, EVENT_READ, self._waker)

    # ---- thread-safe API -------------------------------------------------------------------
    def add_listener(self, cfg: ListenerConfig) -> None:
        """Bind now (in the caller's thread; OSError if the port is taken); the loop then accepts. TLS
        certificate and CA files are read here too, afresh on every call (ValueError if they fail)."""
        tls = ListenerTls.build(cfg)
        strategy = self._new_strategy(cfg)  # before binding: it may refuse the config (geo_database)
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((cfg.host, cfg.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._bound[cfg.index] = sock.getsockname()
        self._call(self._install_listener, cfg, sock, strategy, tls)

    def listening_address(self, index: int) -> tuple:
        """The bound address of a listener (useful with port 0). Thread-safe after add_listener returned."""
        return self._bound[index]

    def remove_listener(self, index: int) -> None:
        """Stop accepting; requests in flight finish, then their connections close."""
        self._call(self._remove_listener, index)

    def replace_listener(self, cfg: ListenerConfig) -> None:
        """Config reload of a bound listener (same index, host, port and type): the listening socket
        stays open, open client connections stay open, and from the next request on everything follows
        `cfg` (strategy, policies, TLS); requests in flight finish on the connections they have. The
        strategy and TLS files are built here, in the caller's thread, like `add_listener` (ValueError
        if a file fails); the strategy gets the last published snapshot until the next `publish`."""
        tls = ListenerTls.build(cfg)
        strategy = self._new_strategy(cfg)
        self._call(self._swap_listener, cfg, strategy, tls)

    def publish(self, snapshot: PoolSnapshot) -> None:
        """Hand a new backend pool to the listener's strategy (takes effect for the next request)."""
        addresses = {b.index: (resolve_host(b.host), b.port) for b in snapshot.backends}
        self._call(self._apply_snapshot, snapshot, addresses)

    def stop(self) -> None:
        self._call(self._request_stop)

    def _new_strategy(self, cfg: ListenerConfig):
        """The listener's strategy, admitting trials to half-open backends by the loop's TrialSlots."""
        strategy = self._strategy_factory(cfg)
        strategy.set_trial_gate(partial(self._trial_admits, cfg.index, strategy))
        return strategy

    def _trial_admits(self, listener: int, strategy, backend: int) -> bool:
        trials = self._trials.get(listener)
        return trials is not None and trials.admits(backend, strategy.in_flight(backend))

    def _call(self, fn, *args) -> None:
        self._calls.put((fn, args))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up byte is already pending (or the loop is gone)

    # ---- loop-thread internals -------------------------------------------------------------
    def run_calls(self) -> None:
        while True:
            try:
                fn, args = self._calls.get_nowait()
            except queue.Empty:
                return
            fn(*args)

    def _install_listener(self, cfg: ListenerConfig, sock: socket.socket, strategy, tls: ListenerTls) -> None:
        old = self.listeners.get(cfg.index)
        if old is not None:
            old.stop_accepting()
        listener = make_listener(self, cfg, sock, strategy, tls)
        self.listeners[cfg.index] = listener
        self._trials[cfg.index] = TrialSlots()
        self.client_connections.setdefault(cfg.index, 0)
        self.selector.register(sock, EVENT_READ, listener)

    def _swap_listener(self, cfg: ListenerConfig, strategy, tls: ListenerTls) -> None:
        old = self.listeners.get(cfg.index)
        if old is None or old.closed:
            return
        listener = make_listener(self, cfg, old.sock, strategy, tls)
        if isinstance(listener, HttpListener):
            assert isinstance(old, HttpListener), "replace_listener keeps a listener's type"
            listener.take_over(old)
        else:
            assert not isinstance(old, HttpListener), "replace_listener keeps a listener's type"
            listener.take_over(old)
        self.listeners[cfg.index] = listener
        try:
            self.selector.modify(old.sock, EVENT_READ, listener)
        except KeyError:
            pass  # a TCP listener at its connection cap is not registered; it re-registers itself

    def _remove_listener(self, index: int) -> None:
        listener = self.listeners.pop(index, None)
        if listener is not None:
            listener.stop_accepting()
        self._bound.pop(index, None)
        self._trials.pop(index, None)

    def _apply_snapshot(self, snapshot: PoolSnapshot, addresses: dict) -> None:
        listener = self.listeners.get(snapshot.listener)
        if listener is not None:
            self._trials[snapshot.listener].update(snapshot)
            listener.publish(snapshot, addresses)

    def _request_stop(self) -> None:
        self._stopping = True

    def schedule(self, when: float, target) -> int:
        """Heap entry for `target.fire_timer(seq, now)` at `when`; returns seq."""
        seq = next(self._seq)
        heapq.heappush(self._timers, (when, seq, target))
        return seq

    def timer_dropped(self) -> None:
        """A heap entry will never fire (its channel closed or re-armed earlier). Such entries would
        keep closed connections in memory until their deadline (a 10 s header timeout holds every
        connection of the last 10 s), so once they are half the heap it is rebuilt without them:
        O(1) amortised per dropped entry."""
        self._dead_timers += 1
        timers = self._timers
        if self._dead_timers >= COMPACT_MIN and self._dead_timers * 2 >= len(timers):
            timers[:] = [entry for entry in timers if entry[2].timer_live(entry[1])]
            heapq.heapify(timers)
            self._dead_timers = 0

    def call_later(self, delay: float, fn, *args) -> Timer:
        timer = Timer(fn, args)
        self.schedule(self.now + delay, timer)
        return timer

    def call_soon(self, fn, *args) -> None:
        """Run after the current event handler (used to avoid re-entering a handler on send errors)."""
        self._soon.append((fn, args))

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        trials = self._trials.get(outcome.listener)
        if trials is not None:
            trials.record(outcome)
        if (outcome.error is not None or outcome.status >= 500) and verdict(outcome) is False:
            listener = self.listeners.get(outcome.listener)
            if listener is not None:
                listener.strategy.live_failure(outcome.backend)  # health_aware_round_robin ejects at once

    def gauge_active(self, listener: int, backend: int, delta: int) -> None:
        key = (listener, backend)
        self.active[key] = self.active.get(key, 0) + delta
        self.gauges_changed = True

    def gauge_clients(self, listener: int, delta: int) -> None:
        self.client_connections[listener] = self.client_connections.get(listener, 0) + delta
        self.gauges_changed = True

    def run(self) -> None:
        """Serve until stop(). Call from the thread that owns the loop."""
        self._running = True
        poll = self.selector.poll
        timers = self._timers
        soon = self._soon
        monotonic = time.monotonic
        try:
            self.run_calls()
            while not self._stopping:
                if self.unflushed:
                    self._flush_writes()
                now = self.now
                timeout = None
                if timers:
                    timeout = max(0.0, timers[0][0] - now)
                if self.outcomes or self.gauges_changed:
                    wait = max(0.0, self._last_report + REPORT_INTERVAL - now)
                    timeout = wait if timeout is None else min(timeout, wait)
                ready = poll(timeout)
                self.now = now = monotonic()
                for (target, readable_on, writable_on, _sock), events in ready:
                    try:  # _guarded, inlined: this is the per-event path
                        if events & readable_on and not target.closed:
                            target.on_readable()
                        if events & writable_on and not target.closed:
                            target.on_writable()
                        while soon:
                            fn, args = soon.pop(0)
                            fn(*args)
                    except Exception:
                        self._contain(target)
                while timers and timers[0][0] <= now:
                    _when, seq, target = heapq.heappop(timers)
                    self._guarded(target, target.fire_timer, seq, now)
                if (self.outcomes or self.gauges_changed) and now - self._last_report >= REPORT_INTERVAL:
                    try:
                        self._report(now)
                    except Exception:
                        log.exception("I/O loop: on_report failed; that batch of outcomes is lost")
        finally:
            self._shutdown()

    def _flush_writes(self) -> None:
        """Send what this turn's handlers wrote. A flush that drains a channel calls its
        `on_drained()`, which may write more: those channels are flushed in the same pass."""
        while self.unflushed:
            channels, self.unflushed = self.unflushed, []
            for channel in channels:
                self._guarded(channel, channel.flush)

    def _guarded(self, target, step, *args) -> None:
        """Run one handler step of `target`, then the calls it deferred (`call_soon`); if that raises
        (a bug), `target` is closed and the loop serves on."""
        try:
            step(*args)
            soon = self._soon
            while soon:
                fn, deferred_args = soon.pop(0)
                fn(*deferred_args)
        except Exception:
            self._contain(target)

    def _contain(self, target) -> None:
        """A handler raised (a bug): log it and close what it was serving; the loop serves on."""
        log.exception("I/O loop: %s failed; closing it", type(target).__name__)
        self._soon.clear()
        for victim in (getattr(target, "owner", None), target):
            close = getattr(victim, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("I/O loop: closing %s failed too", type(victim).__name__)

    def _report(self, now: float) -> None:
        self._last_report = now
        outcomes, self.outcomes = tuple(self.outcomes), []
        self.gauges_changed = False
        active = {k: v for k, v in self.active.items() if v}
        regions = {}
        for index, listener in self.listeners.items():
            counts = listener.strategy.take_client_regions()
            if counts:
                regions[index] = counts
        self.on_report(LoopReport(outcomes, active, dict(self.client_connections), regions))

    def _shutdown(self) -> None:
        for listener in list(self.listeners.values()):
            listener.stop_accepting()
            listener.close_all()
        self.listeners.clear()
        if self.outcomes or self.gauges_changed:
            self._report(time.monotonic())
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
