"""The plan of a config reload (config/diff.py, pure): what is kept, restarted, added and dropped."""
from __future__ import annotations

from dataclasses import replace

from pmdaemon.config.diff import dropped_backends, follows_app, plan_apps, plan_listeners, scaled_pool
from pmdaemon.config.model import AppConfig, BackendConfig, ListenerConfig


def test_listeners_are_matched_by_port_and_indexes_are_never_reused():
    running = (ListenerConfig(index=0, port=8080), ListenerConfig(index=1, port=8081, type="tcp"),
               ListenerConfig(index=2, port=8082))
    new = (ListenerConfig(index=0, port=8081, type="tcp", strategy="ip_hash"), ListenerConfig(index=1, port=9000),
           ListenerConfig(index=2, port=8082, type="tcp"))
    plan = plan_listeners(running, new, next_index=3)
    assert [(old.index, n.index, n.strategy) for old, n in plan.kept] == [(1, 1, "ip_hash")]
    assert [(old.index, n.index) for old, n in plan.rebound] == [(2, 4)]  # http -> tcp: a socket of its own
    assert [(listener.port, listener.index) for listener in plan.added] == [(9000, 3)]
    assert [listener.port for listener in plan.removed] == [8080]
    assert [(listener.port, listener.index) for listener in plan.listeners] == [(8081, 1), (9000, 3), (8082, 4)]


def test_apps_restart_only_when_their_processes_would_start_differently():
    web = AppConfig(name="web", script="/srv/web.py", env={"PORT": "3000"}, instances=2)
    api = AppConfig(name="api", script="/srv/api.py")
    old = (web, api, AppConfig(name="gone", script="/srv/gone.py"))
    new = (replace(web, env={"PORT": "3000", "MODE": "blue"}), replace(api, instances=3, weight=2),
           AppConfig(name="fresh", script="/srv/fresh.py"))
    plan = plan_apps(old, new)
    assert [a.name for a in plan.restarted] == ["web"]
    assert [a.name for a in plan.updated] == ["api"]  # a count or a weight: no restart
    assert [a.name for a in plan.added] == ["fresh"] and plan.removed == ("gone",)
    assert plan_apps(old, old).unchanged == ("web", "api", "gone")


def test_pool_helpers():
    def backend(app: str, i: int, port: int) -> BackendConfig:
        return BackendConfig("127.0.0.1", port, instance=f"{app}-{i}", app=app, weight=3)

    listener = ListenerConfig(index=0, backends=(backend("api", 0, 4000), backend("web", 0, 3000),
                                                 backend("web", 1, 3001), backend("db", 0, 5000)))
    assert follows_app(listener, "web", ["web-0", "web-1"]) and not follows_app(listener, "web", ["web-0", "web-2"])
    grown = scaled_pool(listener, "web", [("web-0", 3000), ("web-1", 3001), ("web-2", 3002)], listener.backends[1])
    assert [b.instance for b in grown.backends] == ["api-0", "web-0", "web-1", "web-2", "db-0"]
    assert grown.backends[3].weight == 3 and grown.backends[3].port == 3002
    shrunk = scaled_pool(listener, "web", [("web-0", 3000)], listener.backends[1])
    assert [b.instance for b in shrunk.backends] == ["api-0", "web-0", "db-0"]
    assert dropped_backends(listener, shrunk) == [2] and dropped_backends(listener, None) == [0, 1, 2, 3]
