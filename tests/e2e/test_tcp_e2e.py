"""A TLS TCP listener through the daemon's runtime: apps supervised, listener from a parsed config."""
from __future__ import annotations

import pytest

from pmdaemon.config.loader import parse_config

from support.looprunner import TlsFiles, who
from support.paths import TCP_ECHO_APP
from support.ports import free_port, free_port_range
from support.proxyharness import connect
from support.wait import wait_until


@pytest.mark.timeout(60)
def test_tls_tcp_listener_through_the_runtime(tmp_path, runtime):
    """tcp_echo instances run by the supervisor behind a TLS `type: "tcp"` listener from a config file:
    least_connections spreads held connections, `lb backends` counts them as active."""
    files = TlsFiles(tmp_path)
    base, lb_port = free_port_range(3), free_port()
    data = {
        "apps": [{"name": "echo", "script": str(TCP_ECHO_APP), "instances": 3, "exec_mode": "cluster",
                  "increment_var": "PORT", "env": {"PORT": base}, "min_uptime": 200, "kill_timeout": 1000}],
        "load_balancer": {"type": "tcp", "host": "127.0.0.1", "port": lb_port, "strategy": "least_connections",
                          "apps": ["echo"], "health_check": {"interval": 0.2, "timeout": 1},
                          "ssl": {"enabled": True, "cert_file": str(files.cert_file), "key_file": str(files.key_file)}},
    }
    held = []
    try:
        runtime.apply(parse_config(data, str(tmp_path / "pmdaemon.json")))
        wait_until(lambda: [b["state"] for b in runtime.lb_backends()] == ["up"] * 3, timeout=20,
                   message="three echo backends up")
        context = files.client_context()
        for _ in range(3):
            held.append(context.wrap_socket(connect(lb_port), server_hostname="127.0.0.1"))
        assert sorted(who(sock) for sock in held) == [base, base + 1, base + 2]
        wait_until(lambda: [b["active"] for b in runtime.lb_backends()] == [1, 1, 1], timeout=5,
                   message="one active connection per backend")
    finally:
        for sock in held:
            sock.close()
