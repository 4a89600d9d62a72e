"""Geographic balancing end to end: clients bound to different loopback addresses stand for clients
in different regions (the listener's `geo` table maps them), real instances per region, the CLI.

Regions: us-east-1 (2 instances, the primary region, falls back to us-west-1 then eu-west-1),
us-west-1 and eu-west-1 (1 instance each). 127.0.0.2 is in us-east-1, 127.0.0.3 in eu-west-1;
127.0.0.1 is in no region. 127.0.0.4 is a trusted proxy that may name the region in a header.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from support.configs import http_app_config, write_config
from support.http import get
from support.paths import REPO
from support.ports import free_port, free_port_range
from support.wait import wait_until

EAST, WEST, EU = "us-east-1", "us-west-1", "eu-west-1"
EAST_CLIENT, EU_CLIENT, UNKNOWN_CLIENT = "127.0.0.2", "127.0.0.3", "127.0.0.1"
PROXY, UNTRUSTED = "127.0.0.4", "127.0.0.5"


def region_app(app_script: Path, name: str, region: str, instances: int, **balancing) -> dict:
    app = http_app_config(app_script, name, instances, free_port_range(instances), region=region)
    app["health_check"] = {"url": "http://localhost:{{PORT}}/health", "interval": 0.2, "timeout": 1,
                           "failure_threshold": 1}
    app["load_balancer"] = {"strategy": "geographic", **balancing}
    return app


@pytest.fixture
def geo_pool(tmp_path, app_script, foreground_daemon, pmdaemon):
    """The daemon running the three regions; returns (listener port, {region: {backend ports}})."""
    lb_port = free_port()
    apps = [region_app(app_script, "east", EAST, 2, primary_region=True, fallback_regions=[WEST, EU]),
            region_app(app_script, "west", WEST, 1, fallback_regions=[EU]),
            region_app(app_script, "eu", EU, 1)]
    balancer = {"port": lb_port, "host": "127.0.0.1", "apps": ["east", "west", "eu"],
                "geo": {f"{EAST_CLIENT}/32": EAST, "127.0.0.3/32": EU},
                "trusted_proxies": [f"{PROXY}/32"], "region_header": "X-Client-Region"}
    foreground_daemon(write_config(tmp_path, {"apps": apps, "load_balancer": balancer}))
    rows = wait_states(pmdaemon, {"up"})
    ports = {}
    for row in rows:
        ports.setdefault(row["region"], set()).add(row["address"].rsplit(":", 1)[1])
    assert {region: len(p) for region, p in ports.items()} == {EAST: 2, WEST: 1, EU: 1}
    return lb_port, ports


def served(port: int, source: str, count: int = 6, headers: dict | None = None) -> set[str]:
    """GET / `count` times from `source`: the ports (X-Backend) of the instances that answered."""
    replies = [get(port, source=source, headers=headers) for _ in range(count)]
    assert {reply.status for reply in replies} == {200}
    return {reply.headers["X-Backend"] for reply in replies}


def wait_states(pmdaemon, states: set[str], instances: set[str] | None = None) -> list[dict]:
    """Wait until the backends (of `instances`, default all) are all in one of `states`."""
    def check():
        rows = pmdaemon.json("lb", "backends")
        chosen = [row for row in rows if instances is None or row["instance"] in instances]
        return rows if chosen and all(row["state"] in states for row in chosen) else None
    return wait_until(check, 15, interval=0.1, message=f"backends {instances or 'all'} {states}")


def test_clients_reach_their_region_and_unknown_clients_the_primary(geo_pool, pmdaemon):
    lb_port, ports = geo_pool
    assert served(lb_port, EAST_CLIENT) == ports[EAST]  # both east instances, round robin
    assert served(lb_port, EU_CLIENT, 3) == ports[EU]
    assert served(lb_port, UNKNOWN_CLIENT) == ports[EAST]

    def by_region():
        rows = [row for row in pmdaemon.json("lb", "traffic") if "client_region" in row]
        return {row["client_region"]: row for row in rows}
    rows = wait_until(lambda: (rows := by_region()) and sum(r["requests_total"] for r in rows.values()) == 15 and rows,
                      10, interval=0.1, message="15 requests counted by client region")
    assert {region: row["requests_total"] for region, row in rows.items()} == {EAST: 6, EU: 3, None: 6}
    assert {region: row["requests_last_minute"] for region, row in rows.items()} == {EAST: 6, EU: 3, None: 6}
    assert rows[EU]["share_total"] == pytest.approx(20.0)
    assert all(row["listener"] == lb_port for row in rows.values())
    backends = {row["address"].rsplit(":", 1)[1]: row["requests_total"]
                for row in pmdaemon.json("lb", "traffic") if "address" in row}
    assert sum(backends[p] for p in ports[EAST]) == 12 and sum(backends[p] for p in ports[WEST]) == 0

    text = pmdaemon("lb", "traffic")
    assert text.returncode == 0
    assert "client region" in text.stdout and "unknown" in text.stdout and EU in text.stdout


def test_a_stopped_region_falls_back_in_the_configured_order(geo_pool, pmdaemon):
    lb_port, ports = geo_pool
    assert pmdaemon("stop", "east").returncode == 0
    wait_states(pmdaemon, {"down"}, {"east-0", "east-1"})
    assert served(lb_port, EAST_CLIENT, 3) == ports[WEST]  # first fallback, not eu-west-1
    assert served(lb_port, UNKNOWN_CLIENT, 3) == ports[WEST]  # the primary's fallbacks too
    assert served(lb_port, EU_CLIENT, 3) == ports[EU]

    assert pmdaemon("stop", "west").returncode == 0
    wait_states(pmdaemon, {"down"}, {"west-0"})
    assert served(lb_port, EAST_CLIENT, 3) == ports[EU]  # second fallback
    assert served(lb_port, UNKNOWN_CLIENT, 3) == ports[EU]

    assert pmdaemon("stop", "eu").returncode == 0
    wait_states(pmdaemon, {"down"})
    assert pmdaemon("restart", "west").returncode == 0
    wait_states(pmdaemon, {"up"}, {"west-0"})
    assert served(lb_port, EU_CLIENT, 3) == ports[WEST]  # no fallbacks left: any healthy backend

    assert pmdaemon("restart", "east").returncode == 0
    wait_states(pmdaemon, {"up"}, {"east-0", "east-1"})
    assert served(lb_port, EAST_CLIENT) == ports[EAST]  # home again
    assert served(lb_port, UNKNOWN_CLIENT) == ports[EAST]


def test_the_region_header_is_believed_only_from_trusted_proxies(geo_pool, pmdaemon):
    lb_port, ports = geo_pool
    header = {"X-Client-Region": EU}
    assert served(lb_port, PROXY, 3, header) == ports[EU]
    assert served(lb_port, UNTRUSTED, 4, header) == ports[EAST]  # ignored: an unknown client -> primary
    assert served(lb_port, PROXY, 3, {"X-Client-Region": WEST}) == ports[WEST]
    # Behind the trusted proxy, the client's own address is looked up first.
    assert served(lb_port, PROXY, 3, {"X-Forwarded-For": EU_CLIENT, "X-Client-Region": WEST}) == ports[EU]
    assert served(lb_port, UNTRUSTED, 4, {"X-Forwarded-For": EU_CLIENT}) == ports[EAST]


def test_a_geo_database_without_maxminddb_is_a_clear_error(tmp_path, app_script, pmdaemon):
    # Where maxminddb is installed, a module on PYTHONPATH that fails to import stands for its absence.
    hidden = tmp_path / "hidden"
    (hidden / "maxminddb").mkdir(parents=True)
    (hidden / "maxminddb" / "__init__.py").write_text('raise ImportError("maxminddb hidden by the test")\n')
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))}
    database = tmp_path / "GeoLite2-Country.mmdb"
    database.write_bytes(b"\0" * 64)
    apps = [region_app(app_script, "east", EAST, 1, primary_region=True)]
    balancer = {"port": free_port(), "host": "127.0.0.1", "geo_database": str(database)}
    result = pmdaemon("start", write_config(tmp_path, {"apps": apps, "load_balancer": balancer}), env=env)
    assert result.returncode != 0
    assert "geo_database" in result.stderr and "needs the 'maxminddb' package" in result.stderr
    listed = pmdaemon("list", "--json")
    assert listed.returncode != 0 or json.loads(listed.stdout) == []  # nothing was started


def test_a_geo_database_places_clients_the_geo_table_does_not_know(tmp_path, app_script, foreground_daemon,
                                                                     pmdaemon):
    """With the optional maxminddb package (and mmdb_writer to make a small database), clients the
    `geo` table does not map are looked up in `geo_database`: a custom `region` or a country code."""
    pytest.importorskip("maxminddb")
    mmdb_writer = pytest.importorskip("mmdb_writer")
    from netaddr import IPSet

    writer = mmdb_writer.MMDBWriter(ip_version=6, ipv4_compatible=True)
    writer.insert_network(IPSet(["127.0.0.6/32"]), {"region": EU})
    writer.insert_network(IPSet(["127.0.0.7/32"]), {"country": {"iso_code": "US"}})
    writer.insert_network(IPSet(["127.0.0.2/32"]), {"region": EU})  # the geo table wins for this one
    database = tmp_path / "regions.mmdb"
    writer.to_db_file(str(database))
    lb_port = free_port()
    apps = [region_app(app_script, "east", EAST, 1, primary_region=True),
            region_app(app_script, "us", "US", 1), region_app(app_script, "eu", EU, 1)]
    balancer = {"port": lb_port, "host": "127.0.0.1", "geo": {f"{EAST_CLIENT}/32": EAST},
                "geo_database": str(database)}
    foreground_daemon(write_config(tmp_path, {"apps": apps, "load_balancer": balancer}))
    rows = wait_states(pmdaemon, {"up"})
    port_of = {row["region"]: row["address"].rsplit(":", 1)[1] for row in rows}
    assert served(lb_port, "127.0.0.6", 3) == {port_of[EU]}
    assert served(lb_port, "127.0.0.7", 3) == {port_of["US"]}
    assert served(lb_port, EAST_CLIENT, 3) == {port_of[EAST]}
    assert served(lb_port, "127.0.0.8", 3) == {port_of[EAST]}  # in neither: the primary region


def test_the_geographic_example_runs(tmp_path, pmdaemon):
    """examples/geographic.json, moved to free ports: its geo table puts 127.0.0.0/8 in us-west-1."""
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "apps", examples / "apps")
    data = json.loads((REPO / "examples" / "geographic.json").read_text())
    for app in data["apps"]:
        app["env"]["PORT"] = free_port_range(app["instances"])
    lb_port = free_port()
    data["load_balancer"].update(port=lb_port, host="127.0.0.1")
    result = pmdaemon("start", write_config(examples, data, "geographic.json"))
    assert result.returncode == 0, result.stderr
    rows = wait_states(pmdaemon, {"up"})
    west = {row["address"].rsplit(":", 1)[1] for row in rows if row["region"] == WEST}
    assert len(rows) == 5 and len(west) == 2
    assert [(row["port"], row["strategy"]) for row in pmdaemon.json("lb", "status")] == [(lb_port, "geographic")]
    assert served(lb_port, "127.0.0.9", 4) == west
