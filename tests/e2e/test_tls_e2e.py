"""An HTTPS listener through the daemon's runtime: app instances supervised, listener from a parsed config."""
from __future__ import annotations

import pytest

from pmdaemon.config.loader import parse_config

from support.configs import http_app_config
from support.http import get, https
from support.looprunner import TlsFiles
from support.ports import free_port, free_port_range
from support.wait import wait_until


@pytest.mark.timeout(60)
def test_https_listener_through_the_runtime(tmp_path, app_script, runtime):
    """The ssl-termination shape: app instances supervised, HTTPS listener from a parsed config."""
    files = TlsFiles(tmp_path)
    lb_port = free_port()
    data = {"apps": [http_app_config(app_script, "web", 2, free_port_range(2))],
            "load_balancer": {"host": "127.0.0.1", "port": lb_port, "apps": ["web"],
                              "ssl": {"enabled": True, "cert_file": str(files.cert_file),
                                      "key_file": str(files.key_file), "protocols": ["TLSv1.2", "TLSv1.3"]}}}
    runtime.apply(parse_config(data, str(tmp_path / "pmdaemon.json")))
    wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up", "up"], timeout=20,
               message="both backends up")
    conn = https(lb_port, files)
    bodies = {get(conn, "/").body for _ in range(4)}
    assert len(bodies) == 2  # round robin over both instances, per request on one TLS connection
    conn.close()
