"""What changes between the running configuration and a new one (`start`, `reload --config`, `scale`); pure.

The Runtime applies these plans (control/runtime.py, control/rollout.py); nothing here touches a
socket, a process or an actor.

Listeners are matched by port. A listener whose port stays keeps its `index` (and so its socket,
its series in the metrics and its place in the loop); a new port gets an index never used before in
this daemon, so an index always names one listener. A port whose host or type changes cannot keep
its socket: it is closed and bound again (`rebound`).

Backends are matched by address and instance name (the Listener actor carries their state across).

Apps are matched by name. An app whose processes would be started differently (`SPAWN_FIELDS`) is
restarted instance by instance; any other change (weights, restart rules, health checks...) is
adopted without a restart; a different instance count is a scale.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from pmdaemon.config.model import AppConfig, BackendConfig, Config, ListenerConfig

SPAWN_FIELDS = ("script", "args", "cwd", "interpreter", "env", "increment_var", "base_port")


@dataclass(frozen=True)
class ListenerPlan:
    kept: tuple[tuple[ListenerConfig, ListenerConfig], ...]  # (running, new with the running index)
    rebound: tuple[tuple[ListenerConfig, ListenerConfig], ...]  # same port, other host or type: fresh index
    added: tuple[ListenerConfig, ...]  # new ports, with fresh indexes
    removed: tuple[ListenerConfig, ...]
    listeners: tuple[ListenerConfig, ...]  # the new config's listeners with those indexes, in file order


@dataclass(frozen=True)
class AppPlan:
    added: tuple[AppConfig, ...]
    removed: tuple[str, ...]
    restarted: tuple[AppConfig, ...]  # spawn-relevant change: rolling restart
    updated: tuple[AppConfig, ...]  # other changes (count included): adopted without a restart
    unchanged: tuple[str, ...]


def plan_listeners(running: Sequence[ListenerConfig], new: Sequence[ListenerConfig], next_index: int) -> ListenerPlan:
    """Match `new` against the `running` listeners by port; `next_index` is the first index never used."""
    by_port = {listener.port: listener for listener in running}
    kept, rebound, added, listeners = [], [], [], []
    for listener in new:
        old = by_port.pop(listener.port, None)
        if old is None:
            listener = replace(listener, index=next_index)
            next_index += 1
            added.append(listener)
        elif old.host == listener.host and old.type == listener.type:
            listener = replace(listener, index=old.index)
            kept.append((old, listener))
        else:  # a listener of its own: a fresh index, so the old one can finish under its index
            listener = replace(listener, index=next_index)
            next_index += 1
            rebound.append((old, listener))
        listeners.append(listener)
    return ListenerPlan(tuple(kept), tuple(rebound), tuple(added), tuple(by_port.values()), tuple(listeners))


def plan_apps(running: Sequence[AppConfig], new: Sequence[AppConfig]) -> AppPlan:
    by_name = {app.name: app for app in running}
    added, restarted, updated, unchanged = [], [], [], []
    for app in new:
        old = by_name.pop(app.name, None)
        if old is None:
            added.append(app)
        elif _differs(old, app, SPAWN_FIELDS):
            restarted.append(app)
        elif old != app:
            updated.append(app)
        else:
            unchanged.append(app.name)
    return AppPlan(tuple(added), tuple(by_name), tuple(restarted), tuple(updated), tuple(unchanged))


def _differs(old: AppConfig, new: AppConfig, names: Iterable[str]) -> bool:
    return any(getattr(old, name) != getattr(new, name) for name in names)


def backend_key(backend: BackendConfig) -> tuple[str, str | None]:
    """What identifies a backend across pools (the Listener actor matches rows the same way)."""
    return backend.address, backend.instance


def dropped_backends(old: ListenerConfig, new: ListenerConfig | None) -> list[int]:
    """Positions in `old.backends` of the backends `new` no longer has (all of them if `new` is None)."""
    keep = {backend_key(b) for b in new.backends} if new is not None else set()
    return [i for i, b in enumerate(old.backends) if backend_key(b) not in keep]


def follows_app(listener: ListenerConfig, app: str, instances: Iterable[str]) -> bool:
    """Does the listener's pool hold every one of the app's running `instances`? Such a pool follows
    the app's scale; a `backend_ports` list naming only some of them is left as written."""
    names = set(instances)
    pooled = {b.instance for b in listener.backends if b.app == app}
    return bool(names) and names <= pooled


def scaled_pool(listener: ListenerConfig, app: str, instances: Sequence[tuple[str, int | None]],
                template: BackendConfig) -> ListenerConfig:
    """The listener with `app`'s backends replaced by one per (instance name, port) with a port, in
    that order, where the app's first backend was (or at the end); `template` gives what every
    backend of the app shares."""
    others = [b for b in listener.backends if b.app != app]
    first = next((i for i, b in enumerate(listener.backends) if b.app == app), len(listener.backends))
    before = sum(1 for b in listener.backends[:first] if b.app != app)
    mine = [replace(template, port=port, instance=name) for name, port in instances if port is not None]
    return replace(listener, backends=tuple(others[:before] + mine + others[before:]))


def with_app(config: Config, app: AppConfig) -> Config:
    """`config` with its app of that name replaced (the Runtime's record after a scale)."""
    return replace(config, apps=tuple(app if a.name == app.name else a for a in config.apps))


def with_listeners(config: Config, listeners: Iterable[ListenerConfig]) -> Config:
    """`config` with the listeners of the same index replaced."""
    by_index = {listener.index: listener for listener in listeners}
    return replace(config, listeners=tuple(by_index.get(old.index, old) for old in config.listeners))


def with_started(running: Config | None, started: Config, added: Sequence[ListenerConfig],
                 apps: Mapping[str, AppConfig]) -> Config:
    """What runs after `pmdaemon start <started>` on top of `running` (None: nothing ran yet), for
    `lb config` and the next `reload --config`: the running listeners then the `added` ones, the running
    apps then `started`'s other apps, each as it runs now (`apps`, by name). The source stays the first
    config's."""
    base = running if running is not None else replace(started, apps=(), listeners=())
    names = dict.fromkeys([*(app.name for app in base.apps), *(app.name for app in started.apps)])
    return replace(base, listeners=base.listeners + tuple(added), apps=tuple(apps[name] for name in names))
