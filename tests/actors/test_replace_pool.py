"""The Listener actor replacing its pool on a config reload: what it knew of each backend is kept."""
from __future__ import annotations

from pmdaemon.actors.health import HealthProbe
from pmdaemon.actors.messages import InstanceEvent
from pmdaemon.config.model import BackendConfig, HealthCheckConfig, ListenerConfig
from pmdaemon.states import BackendState

from support.actorpool import Pool
from support.ports import free_port
from support.tinybackend import TinyBackend
from support.wait import wait_until

CHECK = HealthCheckConfig(interval=0.2, timeout=1.0, failure_threshold=2)


def test_a_replaced_pool_keeps_what_it_knew_of_each_backend_and_its_id():
    servers = [TinyBackend(f"web-{i}") for i in range(3)]
    backends = [BackendConfig("127.0.0.1", s.port, instance=f"web-{i}", app="web", health_check=CHECK)
                for i, s in enumerate(servers)]
    pool = Pool(ListenerConfig(index=0, port=free_port(), backends=tuple(backends[:2])))
    try:
        for name in ("web-0", "web-1", "web-2"):  # web-2 runs, but is in no pool yet
            pool.listener.tell(InstanceEvent(name, "web", "online", None, None))
        wait_until(lambda: pool.states() == [BackendState.UP, BackendState.UP], message="both up")
        pool.listener.proxy().drain([1]).get()

        pool.probe.stop()
        config = ListenerConfig(index=0, port=free_port(), backends=(backends[1], backends[2]))
        rows = pool.listener.proxy().replace_pool(config).get()
        # web-1 keeps id 1; web-2 a new id
        assert [(b.index, b.port, b.state) for b in pool.snapshots[-1].backends] == \
            [(1, servers[1].port, BackendState.DRAINING), (2, servers[2].port, BackendState.DOWN)]
        seeded = [(row.process == "online", row.healthy) for row in rows]
        assert seeded == [(True, True), (True, False)]
        pool.probe = HealthProbe.start(config, pool.listener, None, pool.timers, seeded=seeded)
        pool.listener.proxy().attach_probe(pool.probe).get()
        wait_until(lambda: pool.states() == [BackendState.DRAINING, BackendState.UP],
                   message="web-2 up after its first check")
        servers[1].health_status = 503  # the seeded probe knows web-1 was up: failing checks take it down
        wait_until(lambda: pool.states() == [BackendState.DOWN, BackendState.UP], message="web-1 down")
    finally:
        pool.close()
        for server in servers:
            server.close()
