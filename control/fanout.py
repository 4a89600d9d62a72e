"""The actors serving each listener, and the fan-out of the I/O loop's reports to them.

`ListenerUnit` is one listener's set of actors as the Runtime started them (control/runtime.py).
`ReportFanOut` is the IOLoop's `on_report` callback: it runs on the loop thread, so it only splits
each LoopReport per listener and backend and `tell`s (never `ask`s). The loop counts requests by
backend id (`BackendView.index`), which a backend keeps across pool replacements; each unit records
its ids, and the fan-out turns them back into positions in the unit's config for the actors and the
metrics, which address backends by position.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pykka

from pmdaemon.actors.messages import BackendOutcomes
from pmdaemon.config.model import ListenerConfig
from pmdaemon.net.snapshot import LoopReport
from pmdaemon.states import ErrorKind


@dataclass(frozen=True)
class ListenerUnit:
    """The actors serving one listener."""

    config: ListenerConfig
    listener: pykka.ActorRef
    probe: pykka.ActorRef
    backends: tuple[pykka.ActorRef, ...]
    breaker: pykka.ActorRef | None
    ratelimiter: pykka.ActorRef | None
    scorer: pykka.ActorRef | None
    alerter: pykka.ActorRef | None
    ids: tuple[int, ...] = ()  # each backend's BackendView.index, in config.backends order
    positions: dict[int, int] | None = None  # backend id -> position, None while they are equal

    @classmethod
    def numbered(cls, ids: tuple[int, ...], **parts) -> ListenerUnit:
        positions = None if ids == tuple(range(len(ids))) else {backend_id: i for i, backend_id in enumerate(ids)}
        return cls(ids=ids, positions=positions, **parts)


class ReportFanOut:
    """The IOLoop's `on_report`: runs on the loop thread, so it only splits the report and `tell`s.

    `units` is replaced whole (never mutated) by the Runtime, so the loop thread reads a consistent map.
    `active` is the last report's gauges ((listener, backend id) -> requests in flight), read by drains.
    """

    def __init__(self) -> None:
        self.units: dict[int, ListenerUnit] = {}
        self.metrics: pykka.ActorRef | None = None
        self.active: dict = {}
        self._told: dict = {}  # Backend actor ref -> the in-flight gauge last told to it

    def __call__(self, report: LoopReport) -> None:
        units = self.units
        self.active = report.active
        told = {}
        if self.metrics is not None:
            _tell(self.metrics, _by_position(report, units))
        by_listener: dict[int, list] = defaultdict(list)
        for outcome in report.outcomes:
            by_listener[outcome.listener].append(outcome)
        for index, unit in units.items():
            outcomes = by_listener.get(index, ())
            if outcomes and unit.positions is not None:
                outcomes = [_at_position(outcome, unit.positions) for outcome in outcomes]
            by_backend: dict[int, list] = defaultdict(list)
            for outcome in outcomes:
                by_backend[outcome.backend].append(outcome)
            for backend, ref in enumerate(unit.backends):
                active = told[ref] = report.active.get((index, unit.ids[backend]), 0)
                if backend in by_backend or active != self._told.get(ref, 0):
                    _tell(ref, BackendOutcomes(tuple(by_backend.get(backend, ())), active))
            if outcomes and unit.breaker is not None:
                _tell(unit.breaker, BackendOutcomes(tuple(outcomes)))
            if unit.ratelimiter is not None:
                refused = tuple(o for o in outcomes if o.error == ErrorKind.RATE_LIMITED)
                if refused:
                    _tell(unit.ratelimiter, BackendOutcomes(refused))
        self._told = told


def _at_position(outcome, positions: dict[int, int]):
    """The outcome with its backend id turned into the position in the unit's config (-1: left the pool)."""
    if outcome.backend < 0:
        return outcome
    return outcome._replace(backend=positions.get(outcome.backend, -1))


def _by_position(report: LoopReport, units: dict[int, ListenerUnit]) -> LoopReport:
    """The report as the MetricsActor reads it: backends by position in each listener's config."""
    renumbered = {index: unit.positions for index, unit in units.items() if unit.positions is not None}
    if not renumbered:
        return report
    outcomes = tuple(_at_position(o, renumbered[o.listener]) if o.listener in renumbered else o
                     for o in report.outcomes)
    active = {}
    for (listener, backend), count in report.active.items():
        positions = renumbered.get(listener)
        if positions is None:
            active[(listener, backend)] = count
        elif backend in positions:
            active[(listener, positions[backend])] = count
    return LoopReport(outcomes, active, report.client_connections, report.client_regions)


def _tell(ref: pykka.ActorRef, message: object) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass  # shutting down
