"""Load-balancing strategies (decisions.md section 4): which backend takes the next request.

Sans-I/O and single-threaded: the I/O loop owns one strategy per listener and calls

    update(snapshot)            a new PoolSnapshot arrived (tables are rebuilt here, not per request)
    choose(client_ip, head, exclude) -> BackendView | None      per request (HTTP) / connection (TCP)
    started(index), finished(index)                              in-flight accounting
    response_headers(head, chosen) -> ((name, value), ...)       extra response headers (Set-Cookie)
    take_client_regions() -> {region: count}                     per report: requests by client region
    live_failure(index)                                          a live request to it failed (the loop)

`client_ip` is the TCP peer's address. Where the client's own address matters (`ip_hash`,
`geographic`) a strategy looks behind trusted proxies itself through X-Forwarded-For, because only it
knows whether the peer or the client is wanted. `head` is None for TCP, else a `RequestView`.
`exclude` holds the BackendView indices already tried for this request (retries).

Only routable backends (UP or HALF_OPEN) take unpinned requests; sticky pins also reach DRAINING
ones. A HALF_OPEN backend is returned only while its trial gate allows: by default while fewer than
`half_open_slots` requests are in flight to it (counted by started/finished); the loop may install
its own gate with `set_trial_gate`. The gate must be a pure question (a strategy may ask it about
several backends for one choice); the trial is taken when the loop calls `started`.

State that must survive a new snapshot (rotation position, in-flight counts, smooth-weighted
current weights) lives in one `_Peer` per backend, carried over by address. `started`/`finished`
name backends by `BackendView.index`, a backend id that stays with its backend across pool
replacements (net/snapshot.py), so a request in flight during a reload is counted against its own
backend.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol

from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.geo import GeoResolver, TrustedProxies
from pmdaemon.net.hashring import HashRing
from pmdaemon.net.snapshot import BackendView, PoolSnapshot
from pmdaemon.net.sticky import SessionSigner, SessionTable, set_cookie_header
from pmdaemon.states import BackendState

NOTHING_TRIED: frozenset[int] = frozenset()
# Longest a backend stays out on the loop's own word after a live failure (health_aware_round_robin):
# long enough for the control plane's snapshot to take over (one 50 ms report and a few actor hops),
# short enough that a control plane that declined the ejection is not overruled for long.
LOCAL_EJECTION_BRIDGE = 1.0  # seconds
_XFF = b"x-forwarded-for"
# A sticky pin still reaches a draining backend (its sessions finish there); a down or open one, never.
_PINNABLE = frozenset({BackendState.UP, BackendState.HALF_OPEN, BackendState.DRAINING})

TrialGate = Callable[[int], bool]
Clock = Callable[[], float]


class RequestView(Protocol):
    """What a strategy may read from a parsed request head (the loop implements it)."""

    def header(self, name: bytes) -> bytes | None:
        """The value of header `name` (case-insensitive; strategies pass it lower-case), or None."""

    def cookie(self, name: str) -> str | None:
        """The value of cookie `name` from the Cookie header(s), or None."""


class _Peer:
    """A backend as one strategy sees it, kept across snapshots while its address stays."""

    __slots__ = ("view", "index", "address", "weight", "half_open", "inflight", "current")

    def __init__(self, view: BackendView) -> None:
        self.inflight = 0
        self.current = 0  # smooth weighted rotation
        self.set_view(view)

    def set_view(self, view: BackendView) -> None:
        self.view = view
        self.index = view.index
        self.address = view.address
        # A weight below 1 cannot mean "no traffic" here (drain does that); it counts as 1.
        self.weight = max(view.weight, 1)
        self.half_open = view.state == BackendState.HALF_OPEN


class _Rotation:
    """A fixed cycle over peers with a cursor; rebuilt from the previous one, it resumes after the
    backend it chose last (by that backend's position in index order), so a new snapshot does not
    send the next request back to the first backend."""

    __slots__ = ("peers", "cursor", "last")

    def __init__(self, peers: tuple[_Peer, ...], previous: _Rotation | None = None) -> None:
        self.peers = peers
        self.cursor = 0
        self.last: _Peer | None = previous.last if previous is not None else None
        if self.last is not None:
            anchor = self.last.index
            for position, peer in enumerate(peers):
                if peer.index > anchor:
                    self.cursor = position
                    break

    def next(self, exclude: frozenset[int], admit: TrialGate) -> _Peer | None:
        peers = self.peers
        count = len(peers)
        i = self.cursor
        for _ in range(count):
            if i >= count:
                i = 0
            peer = peers[i]
            i += 1
            if (exclude and peer.index in exclude) or (peer.half_open and not admit(peer.index)):
                continue
            self.cursor = i
            self.last = peer
            return peer
        return None


class Strategy:
    """Shared bookkeeping; subclasses implement `_rebuild` (per snapshot) and `choose` (per request)."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._peers: tuple[_Peer, ...] = ()
        self._by_index: dict[int, _Peer] = {}
        self._trial_gate: TrialGate = self._half_open_slot_free

    def update(self, snapshot: PoolSnapshot) -> None:
        old = {peer.address: peer for peer in self._peers}
        peers = []
        for view in sorted(snapshot.backends, key=lambda v: v.index):
            peer = old.pop(view.address, None)
            if peer is None:
                peer = _Peer(view)
            else:
                peer.set_view(view)
            peers.append(peer)
        self._peers = tuple(peers)
        self._by_index = {peer.index: peer for peer in peers}
        self._rebuild(tuple(peer for peer in peers if peer.view.routable))

    def choose(
        self, client_ip: str, head: RequestView | None, exclude: frozenset[int] = NOTHING_TRIED
    ) -> BackendView | None:
        raise NotImplementedError

    def started(self, index: int) -> None:
        peer = self._by_index.get(index)
        if peer is not None:
            peer.inflight += 1

    def finished(self, index: int) -> None:
        peer = self._by_index.get(index)
        if peer is not None and peer.inflight > 0:
            peer.inflight -= 1

    def in_flight(self, index: int) -> int:
        peer = self._by_index.get(index)
        return peer.inflight if peer is not None else 0

    def set_trial_gate(self, gate: TrialGate) -> None:
        """Replace the default HALF_OPEN admission (`in flight < half_open_slots`); see module doc."""
        self._trial_gate = gate

    def response_headers(self, head: RequestView | None, chosen: BackendView) -> tuple[tuple[bytes, bytes], ...]:
        """Headers to add to the backend's response to this request; only sticky sessions add any."""
        return ()

    def take_client_regions(self) -> dict[str | None, int]:
        """Requests (HTTP) or connections (TCP) per client region (None = unknown) since the last call,
        for `lb traffic`; only `geographic` resolves regions, the others count nothing."""
        return {}

    def live_failure(self, index: int) -> None:
        """A request or connection to backend `index` just failed by `net.breaker.verdict`'s rule (the
        loop calls this as it happens). Only `health_aware_round_robin` acts on it."""

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        raise NotImplementedError

    def _half_open_slot_free(self, index: int) -> bool:
        peer = self._by_index.get(index)
        return peer is not None and peer.inflight < peer.view.half_open_slots

    def _admits(self, peer: _Peer, exclude: frozenset[int]) -> bool:
        return peer.index not in exclude and (not peer.half_open or self._trial_gate(peer.index))


class RoundRobin(Strategy):
    """Strict rotation over routable backends, per request."""

    def __init__(self, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._rotation = _Rotation(())

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        self._rotation = _Rotation(routable, self._rotation)

    def choose(self, client_ip, head, exclude=NOTHING_TRIED):
        peer = self._rotation.next(exclude, self._trial_gate)
        return peer.view if peer is not None else None


class HealthAwareRoundRobin(RoundRobin):
    """Round robin that takes a backend out at its first live-traffic failure, before the control
    plane hears of it (decisions.md section 4: "ejects a backend at once").

    The control plane owns ejection and quarantine: the Backend actor sees the failure in the next
    outcome report and the Listener actor publishes the backend DOWN for `quarantine_duration`. That
    takes one report (up to 50 ms) and a few actor hops, during which the loop would keep sending
    requests to the failing backend. So the loop ejects it locally at once, and the local ejection
    only bridges that gap. It ends at the first of:
    - a snapshot that shows the backend anything but UP (the control plane has taken over; from then
      on the snapshots alone decide, so one showing it UP again after the quarantine wins at once);
    - `min(quarantine_duration, LOCAL_EJECTION_BRIDGE)` seconds (the full bridge without a quarantine,
      where the control plane still keeps an ejected backend out until its next passing check), in case
      the control plane declined (e.g. it saw no other routable backend).
    Snapshots that still show the backend UP do not end it: they may predate the failure. Failures
    heard while a backend is out (requests already in flight) do not extend it, so the local
    ejection lasts at most one bridge per failure seen while the backend was in: no flapping, no
    permanent ejection.

    As in the Listener actor: only an UP backend is ejected (a half-open one is the breaker's), never
    the last routable one by this rule alone, and nothing is ejected with `exclude_unhealthy: false`
    (the control plane would not take it out either).
    """

    def __init__(self, listener: ListenerConfig, clock: Clock = time.time, monotonic: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._monotonic = monotonic
        self._ejects = listener.exclude_unhealthy
        quarantine = listener.quarantine_duration
        self._bridge = min(quarantine, LOCAL_EJECTION_BRIDGE) if quarantine > 0 else LOCAL_EJECTION_BRIDGE
        self._routable: tuple[_Peer, ...] = ()
        self._ejected: dict[int, float] = {}  # backend id -> monotonic time its local ejection ends
        self._next_return = 0.0  # the earliest of those

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        self._routable = routable
        if self._ejected:
            still_up = {peer.index for peer in routable if peer.view.state == BackendState.UP}
            self._ejected = {index: until for index, until in self._ejected.items() if index in still_up}
        self._rotate()

    def _rotate(self) -> None:
        """The rotation over the routable backends not ejected locally, resuming where it was."""
        ejected = self._ejected
        peers = tuple(peer for peer in self._routable if peer.index not in ejected) if ejected else self._routable
        self._rotation = _Rotation(peers, self._rotation)
        self._next_return = min(ejected.values(), default=0.0)

    def choose(self, client_ip, head, exclude=NOTHING_TRIED):
        if self._ejected:
            self._end_bridges(self._monotonic())
        return super().choose(client_ip, head, exclude)

    def live_failure(self, index: int) -> None:
        if not self._ejects:
            return
        now = self._monotonic()
        self._end_bridges(now)
        peer = self._by_index.get(index)
        if peer is None or peer.view.state != BackendState.UP or index in self._ejected:
            return
        if not any(other.index != index and other.index not in self._ejected for other in self._routable):
            return  # the last routable backend stays in
        self._ejected[index] = now + self._bridge
        self._rotate()

    def _end_bridges(self, now: float) -> None:
        if self._ejected and now >= self._next_return:
            self._ejected = {index: until for index, until in self._ejected.items() if until > now}
            self._rotate()


class SmoothWeighted(Strategy):
    """nginx's smooth weighted round robin (weights 5:1:1 give a a b a c a a). Also
    `performance_based`, whose BackendView weights the control plane sets from scores."""

    def __init__(self, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._routable: tuple[_Peer, ...] = ()

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        # Current weights stay with their peers (nginx keeps them too): the cycle goes on.
        self._routable = routable

    def choose(self, client_ip, head, exclude=NOTHING_TRIED):
        best = None
        total = 0
        gate = self._trial_gate
        for peer in self._routable:
            if (exclude and peer.index in exclude) or (peer.half_open and not gate(peer.index)):
                continue
            peer.current += peer.weight
            total += peer.weight
            if best is None or peer.current > best.current:
                best = peer
        if best is None:
            return None
        best.current -= total
        return best.view


class LeastConnections(Strategy):
    """Fewest requests (HTTP) or connections (TCP) in flight divided by weight; ties go to the next
    backend in rotation order."""

    def __init__(self, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._rotation = _Rotation(())

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        self._rotation = _Rotation(routable, self._rotation)

    def choose(self, client_ip, head, exclude=NOTHING_TRIED):
        rotation = self._rotation
        peers = rotation.peers
        count = len(peers)
        gate = self._trial_gate
        best = None
        best_position = 0
        i = rotation.cursor
        for _ in range(count):
            if i >= count:
                i = 0
            peer = peers[i]
            if not ((exclude and peer.index in exclude) or (peer.half_open and not gate(peer.index))):
                # a/wa < b/wb without division
                if best is None or peer.inflight * best.weight < best.inflight * peer.weight:
                    best, best_position = peer, i
                    if peer.inflight == 0:
                        break  # nothing beats an idle backend; the first one in rotation wins
            i += 1
        if best is None:
            return None
        rotation.cursor = best_position + 1
        rotation.last = best
        return best.view


class IpHash(Strategy):
    """Consistent hashing of the client address (or `hash_key`: `header:NAME`, `cookie:NAME`, which
    fall back to the client address when the request lacks them). The ring holds the routable
    backends, so a down or draining backend's clients move and nobody else's do. With
    `session_affinity` a client stays on the backend it was last sent to while it keeps coming back
    within `session.timeout`, even when the ring would now place it elsewhere."""

    def __init__(self, listener: ListenerConfig, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._key_header, self._key_cookie = _parse_hash_key(_pool_option(listener, "hash_key", "client_ip"))
        self._trusted = TrustedProxies(listener.trusted_proxies)
        self._affinity = (
            SessionTable(listener.session.timeout) if _pool_option(listener, "session_affinity", False) else None
        )
        self._ring = HashRing({})
        self._ring_members: dict[str, int] = {}
        self._routable_by_address: dict[str, _Peer] = {}

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        self._routable_by_address = {peer.address: peer for peer in routable}
        members = {peer.address: peer.weight for peer in routable}
        if members != self._ring_members:
            self._ring = HashRing(members)
            self._ring_members = members

    def choose(self, client_ip, head, exclude=NOTHING_TRIED):
        key = self._key(client_ip, head)
        affinity = self._affinity
        if affinity is not None:
            now = self._clock()
            session = key.decode("latin-1")
            address = affinity.get(session, now)
            if address is not None:
                peer = self._routable_by_address.get(address)
                if peer is not None and self._admits(peer, exclude):
                    return peer.view
        peer = self._on_ring(key, exclude)
        if peer is None:
            return None
        if affinity is not None:
            affinity.put(session, peer.address, now)
        return peer.view

    def _on_ring(self, key: bytes, exclude: frozenset[int]) -> _Peer | None:
        owner = self._ring.lookup(key)
        if owner is None:
            return None
        peer = self._routable_by_address[owner]
        if self._admits(peer, exclude):
            return peer
        for owner in self._ring.candidates(key):
            peer = self._routable_by_address[owner]
            if self._admits(peer, exclude):
                return peer
        return None

    def _key(self, client_ip: str, head: RequestView | None) -> bytes:
        if head is not None:
            if self._key_header is not None:
                value = head.header(self._key_header)
                if value:
                    return value
            elif self._key_cookie is not None:
                cookie = head.cookie(self._key_cookie)
                if cookie:
                    return cookie.encode("utf-8", "surrogateescape")
            if self._trusted:
                client_ip = self._trusted.effective_client_ip(client_ip, head.header(_XFF))
        return client_ip.encode()


class StickySessions(RoundRobin):
    """Requests pinned by a valid signed cookie (`session.cookie_name`) or a session id header
    (`session.header_name`; a valid cookie value counts there too) go to their backend while it is
    up, half-open or draining; everything else is balanced round robin, and the response sets the
    cookie (also re-issued when the pinned backend was down or the pin did not verify)."""

    def __init__(self, listener: ListenerConfig, clock: Clock = time.time, session_key: bytes | None = None) -> None:
        super().__init__(clock)
        session = listener.session
        # Without the daemon's persistent key (net.sticky.load_or_create_key) cookies die with the process.
        self._signer = SessionSigner(session_key if session_key is not None else os.urandom(32))
        self._timeout = session.timeout
        self._cookie_name = session.cookie_name
        self._header_name = session.header_name.lower().encode("latin-1")
        self._secure = listener.ssl.enabled
        self._table = SessionTable(session.timeout)
        # Looked up with what SessionSigner.verify() returns: None (a forged or expired value) finds nothing,
        # so the per-request lookup needs no check of its own.
        self._pinnable_by_id: dict[str | None, _Peer] = {}
        self._pinnable_by_address: dict[str, _Peer] = {}

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        super()._rebuild(routable)
        pinnable = [peer for peer in self._peers if peer.view.state in _PINNABLE]
        self._pinnable_by_id = {self._signer.backend_id(peer.address): peer for peer in pinnable}
        self._pinnable_by_address = {peer.address: peer for peer in pinnable}

    def choose(self, client_ip, head, exclude=NOTHING_TRIED):
        if head is None:
            return super().choose(client_ip, head, exclude)
        now = self._clock()
        session_id = head.header(self._header_name)
        pinned = self._pinned(head, session_id, now)
        if pinned is not None and self._admits(pinned, exclude):
            return pinned.view
        peer = self._rotation.next(exclude, self._trial_gate)
        if peer is None:
            return None
        if session_id:
            self._table.put(session_id.decode("latin-1"), peer.address, now)
        return peer.view

    def response_headers(self, head, chosen):
        now = self._clock()
        if head is not None:
            pinned = self._pinned(head, head.header(self._header_name), now)
            if pinned is not None and pinned.address == chosen.address:
                return ()
        value = self._signer.issue(chosen.address, now)
        return ((b"Set-Cookie", set_cookie_header(self._cookie_name, value, self._timeout, self._secure)),)

    def _pinned(self, head: RequestView, session_id: bytes | None, now: float) -> _Peer | None:
        """The live backend this request is pinned to, if any."""
        cookie = head.cookie(self._cookie_name)
        if cookie:
            peer = self._pinnable_by_id.get(self._signer.verify(cookie, now, self._timeout))
            if peer is not None:
                return peer
        if session_id:
            session = session_id.decode("latin-1")
            peer = self._pinnable_by_id.get(self._signer.verify(session, now, self._timeout))
            if peer is not None:
                return peer
            address = self._table.get(session, now)
            if address is not None:
                return self._pinnable_by_address.get(address)
        return None


class Geographic(Strategy):
    """Backends of the client's region, then that region's `fallback_regions` in order, then any;
    a client whose region is unknown (or has no backends) is treated as being in the
    `primary_region` app's region. Round robin within each tier."""

    def __init__(self, listener: ListenerConfig, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._resolver = GeoResolver(
            listener.geo, listener.trusted_proxies, listener.region_header, listener.geo_database
        )
        self._fallbacks: dict[str, tuple[str, ...]] = {}
        self._primary: str | None = None
        for backend in listener.backends:
            balancing = backend.balancing
            if backend.region is None or balancing is None:
                continue
            if balancing.fallback_regions:
                self._fallbacks.setdefault(backend.region, tuple(balancing.fallback_regions))
            if balancing.primary_region and self._primary is None:
                self._primary = backend.region
        self._rotations: dict[str | None, _Rotation] = {}  # region -> rotation; None = any region
        self._tiers: dict[str, tuple[_Rotation, ...]] = {}
        self._unknown_tiers: tuple[_Rotation, ...] = ()
        self._client_regions: dict[str | None, int] = {}

    def _rebuild(self, routable: tuple[_Peer, ...]) -> None:
        by_region: dict[str, list[_Peer]] = {peer.view.region: [] for peer in self._peers if peer.view.region}
        for peer in routable:
            if peer.view.region:
                by_region[peer.view.region].append(peer)
        old = self._rotations
        rotations: dict[str | None, _Rotation] = {
            region: _Rotation(tuple(peers), old.get(region)) for region, peers in by_region.items()
        }
        rotations[None] = _Rotation(routable, old.get(None))
        self._rotations = rotations
        self._tiers = {region: self._tiers_for(region) for region in by_region}
        self._unknown_tiers = self._tiers_for(self._primary) if self._primary else (rotations[None],)

    def _tiers_for(self, region: str) -> tuple[_Rotation, ...]:
        tiers = []
        for name in (region, *self._fallbacks.get(region, ())):
            rotation = self._rotations.get(name)
            if rotation is not None and rotation.peers and rotation not in tiers:
                tiers.append(rotation)
        tiers.append(self._rotations[None])
        return tuple(tiers)

    def choose(self, client_ip, head, exclude=NOTHING_TRIED):
        resolver = self._resolver
        client = client_ip
        header_value = None
        if head is not None:
            if resolver.trusted:
                client = resolver.trusted.effective_client_ip(client_ip, head.header(_XFF))
            if resolver.region_header:
                header_value = head.header(resolver.region_header)
        region = resolver.region_for(client_ip, header_value, client)
        if not exclude:  # a retry is the same request again
            self._client_regions[region] = self._client_regions.get(region, 0) + 1
        tiers = self._tiers.get(region, self._unknown_tiers) if region is not None else self._unknown_tiers
        gate = self._trial_gate
        for rotation in tiers:
            peer = rotation.next(exclude, gate)
            if peer is not None:
                return peer.view
        return None

    def take_client_regions(self) -> dict[str | None, int]:
        counts, self._client_regions = self._client_regions, {}
        return counts


def make_strategy(listener: ListenerConfig, *, clock: Clock = time.time, session_key: bytes | None = None,
                  monotonic: Clock = time.monotonic) -> Strategy:
    """The strategy for `listener`. `clock` gives wall-clock seconds (sticky cookies outlive the
    process), `monotonic` the seconds that time local ejections; `session_key` signs sticky cookies
    (pass `load_or_create_key(home)`)."""
    name = listener.strategy
    if name == "round_robin":
        return RoundRobin(clock)
    if name == "health_aware_round_robin":
        return HealthAwareRoundRobin(listener, clock, monotonic)
    if name in ("weighted_round_robin", "performance_based"):
        return SmoothWeighted(clock)
    if name == "least_connections":
        return LeastConnections(clock)
    if name == "ip_hash":
        return IpHash(listener, clock)
    if name == "sticky_sessions":
        return StickySessions(listener, clock, session_key)
    if name == "geographic":
        return Geographic(listener, clock)
    raise ValueError(f"unknown strategy {name!r}")


def _pool_option(listener: ListenerConfig, name: str, default):
    """A strategy option of the pool: the listener's when set, else the first app's that sets it
    (per-app `load_balancer` blocks configure the pool they share; decisions.md section 3)."""
    value = getattr(listener, name)
    if value != default:
        return value
    for backend in listener.backends:
        if backend.balancing is not None and getattr(backend.balancing, name) != default:
            return getattr(backend.balancing, name)
    return default


def _parse_hash_key(hash_key: str) -> tuple[bytes | None, str | None]:
    """(header name as RequestView.header() takes it, cookie name): at most one is set, neither for client_ip.

    Two typed names rather than a source tag, so the per-request lookup needs no string compare."""
    if hash_key == "client_ip":
        return None, None
    source, _, name = hash_key.partition(":")
    if source == "header" and name:
        return name.lower().encode("latin-1"), None
    if source == "cookie" and name:
        return None, name
    raise ValueError(f"hash_key: {hash_key!r} is not client_ip, header:NAME or cookie:NAME")
