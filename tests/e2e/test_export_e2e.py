"""`pmdaemon lb export nginx|haproxy`: the output must be config the real servers accept.

Every rendered config goes through `nginx -t` (wrapped in a minimal nginx.conf: the http-context
part inside `http {}`, the `stream {}` block at main level) and `haproxy -c`. Neither binds the
ports it names, so the example ports are fine here. The last tests run the daemon for real.
What the output says, without the servers: tests/unit/test_export.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pmdaemon.config.loader import load_config
from pmdaemon.control.export import render

from support.configs import http_app_config, write_config
from support.exports import EXAMPLES, config_from, external, live_pools, server_lines, split_nginx
from support.paths import REPO
from support.ports import free_port, free_port_range
from support.wait import wait_until

NGINX = shutil.which("nginx")
HAPROXY = shutil.which("haproxy")
STREAM_MODULE = next((p for p in ("/usr/lib/nginx/modules/ngx_stream_module.so",
                                  "/usr/share/nginx/modules/ngx_stream_module.so") if os.path.exists(p)), None)

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def nginx_check(text: str, directory: Path) -> subprocess.CompletedProcess:
    http, stream = split_nginx(text)
    (directory / "pmdaemon-http.conf").write_text(http)
    (directory / "pmdaemon-stream.conf").write_text(stream)
    temp = directory / "temp"
    temp.mkdir(exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text("\n".join([
        f"load_module {STREAM_MODULE};" if stream and STREAM_MODULE else "",
        f"pid {directory}/nginx.pid;",
        "error_log stderr;",
        "events {}",
        "http {",
        f"    client_body_temp_path {temp}/body;",
        f"    proxy_temp_path {temp}/proxy;",
        "    access_log off;",
        f"    include {directory}/pmdaemon-http.conf;",
        "}",
        f"include {directory}/pmdaemon-stream.conf;",
        "",
    ]))
    return subprocess.run([NGINX, "-t", "-p", str(directory), "-c", str(conf)],
                          capture_output=True, text=True, timeout=20)


def haproxy_check(text: str, directory: Path) -> subprocess.CompletedProcess:
    path = directory / "haproxy.cfg"
    path.write_text(text)
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=20)


def assert_nginx_accepts(text: str, directory: Path) -> None:
    """nginx -t on the export; without nginx's stream module (apt install libnginx-mod-stream) only
    the http-context part can be checked."""
    if STREAM_MODULE is None:
        text = split_nginx(text)[0]
    result = nginx_check(text, directory)
    assert result.returncode == 0, f"nginx -t failed:\n{result.stderr}\n--- config:\n{text}"
    assert "[warn]" not in result.stderr, result.stderr


def assert_haproxy_accepts(text: str, directory: Path) -> None:
    result = haproxy_check(text, directory)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"haproxy -c failed:\n{output}\n--- config:\n{text}"
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


@needs_nginx
@pytest.mark.parametrize("example", EXAMPLES)
def test_nginx_accepts_the_export_of_each_example(example, tmp_path):
    config = load_config(str(REPO / "examples" / f"{example}.json"))
    assert_nginx_accepts(render("nginx", config.listeners, live_pools(config), config.source), tmp_path)


@needs_haproxy
@pytest.mark.parametrize("example", EXAMPLES)
def test_haproxy_accepts_the_export_of_each_example(example, tmp_path):
    config = load_config(str(REPO / "examples" / f"{example}.json"))
    assert_haproxy_accepts(render("haproxy", config.listeners, live_pools(config), config.source), tmp_path)


def _special_configs(tmp_path, tls_pair) -> dict[str, dict]:
    cert, key = tls_pair
    return {
        "tls": external([3000, 3001], ssl={"enabled": True, "cert_file": str(cert), "key_file": str(key)}),
        "tls-tcp": {"load_balancer": {"type": "tcp", "port": 4443, "backend_ports": [5000],
                                      "ssl": {"enabled": True, "cert_file": str(cert), "key_file": str(key),
                                              "protocols": ["TLSv1.3"]}}},
        "https-backends": external([3000, "127.0.0.1:3001"], backend_protocol="https",
                                   ca_file=str(cert.parent / "ca.pem")),
        "https-unverified": external([3000], backend_protocol="https", verify=False),
        "hash-header": external([3000, 3001], strategy="ip_hash", hash_key="header:X-Tenant-ID"),
        "hash-cookie": external([3000, 3001], strategy="ip_hash", hash_key="cookie:tenant"),
        "sticky-odd-cookie": external([3000, 3001], strategy="sticky_sessions",
                                      session={"cookie_name": "my-session", "header_name": "X-Sess"}),
        "one-attempt": external([3000], retries={"max_attempts": 1}, limits={"max_body_size": 1048576}),
        "mixed": {"load_balancer": [
            {"port": 8080, "backend_ports": [3000, 3001], "strategy": "least_connections",
             "health_check": {"path": "/ready?deep=1", "interval": "2s", "failure_threshold": 2}},
            {"port": 8081, "host": "127.0.0.1", "backend_ports": ["127.0.0.1:3002"]},
            {"type": "tcp", "port": 4000, "backend_ports": [5000, 5001], "strategy": "ip_hash"},
            {"type": "tcp", "port": 4001, "backend_ports": [5002], "connection_pool": {"keep_alive": False}},
        ]},
    }


@needs_nginx
@needs_haproxy
def test_both_servers_accept_tls_hashing_https_backends_and_several_listeners(tmp_path, tls_pair):
    for name, data in _special_configs(tmp_path, tls_pair).items():
        config = config_from(tmp_path, data)
        pools = live_pools(config)
        directory = tmp_path / name
        directory.mkdir()
        assert_nginx_accepts(render("nginx", config.listeners, pools, config.source), directory)
        assert_haproxy_accepts(render("haproxy", config.listeners, pools, config.source), directory)


# -- end to end: the daemon exports its live pool -------------------------------------------------


@pytest.fixture
def weighted_daemon(pmdaemon, tmp_path, app_script):
    """web (weight 3, 2 instances) and api (weight 1, 1 instance) behind one listener on a free port."""
    web, api, port = free_port_range(2), free_port_range(1), free_port()
    config = write_config(tmp_path, {
        "apps": [http_app_config(app_script, "web", 2, web, weight=3),
                 http_app_config(app_script, "api", 1, api, weight=1)],
        "load_balancer": {"host": "127.0.0.1", "port": port, "apps": ["web", "api"],
                          "health_check": {"path": "/health", "interval": 0.2}},
    })
    result = pmdaemon("start", config)
    assert result.returncode == 0, result.stderr

    def all_up():
        return all(row["state"] == "up" for row in pmdaemon.json("lb", "backends"))

    wait_until(all_up, 15, message="every backend up")
    return config, port, web, api


@needs_haproxy
@pytest.mark.timeout(90)
def test_lb_export_haproxy_of_a_running_config_has_the_live_ports_and_weights(pmdaemon, weighted_daemon, tmp_path):
    config, port, web, api = weighted_daemon
    result = pmdaemon("lb", "export", "haproxy")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"from {config}" in text.splitlines()[0]
    assert f"bind 127.0.0.1:{port}" in text and "option httpchk GET /health" in text
    servers = server_lines(text)
    assert [line.split("#")[0].split()[1:5] for line in servers] == [
        ["web-0", f"127.0.0.1:{web}", "weight", "3"],
        ["web-1", f"127.0.0.1:{web + 1}", "weight", "3"],
        ["api-0", f"127.0.0.1:{api}", "weight", "1"],
    ]
    assert_haproxy_accepts(text, tmp_path)

    assert pmdaemon("lb", "drain", "web-1").returncode == 0
    drained = server_lines(pmdaemon("lb", "export", "haproxy").stdout)
    assert drained[1].startswith(f"server web-1 127.0.0.1:{web + 1} weight 0 ") and "(pmdaemon: draining)" in drained[1]
    assert drained[0].startswith(f"server web-0 127.0.0.1:{web} weight 3 ")


@needs_nginx
@pytest.mark.timeout(90)
def test_lb_export_nginx_of_a_running_config_passes_nginx_t(pmdaemon, weighted_daemon, tmp_path):
    _, port, web, api = weighted_daemon
    assert pmdaemon("stop", "api").returncode == 0
    result = pmdaemon("lb", "export", "nginx")
    assert result.returncode == 0, result.stderr
    servers = server_lines(result.stdout)
    assert servers[0].startswith(f"server 127.0.0.1:{web} weight=3")
    # a stopped instance stays in (nginx's passive checks decide), its live state in the comment
    assert servers[2].startswith(f"server 127.0.0.1:{api} weight=1") and "(pmdaemon: down)" in servers[2]
    assert f"listen 127.0.0.1:{port};" in result.stdout
    assert_nginx_accepts(result.stdout, tmp_path)
    as_json = pmdaemon.json("lb", "export", "nginx")
    assert as_json["format"] == "nginx" and f"127.0.0.1:{web + 1}" in as_json["config"]
