"""`pmdaemon lb export nginx|haproxy` (control/export.py): the output must be config the real servers accept.

Every rendered config goes through `nginx -t` (wrapped in a minimal nginx.conf: the http-context
part inside `http {}`, the `stream {}` block at main level) and `haproxy -c`. Neither binds the
ports it names, so the example ports are fine here. The last tests run the daemon for real.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, free_port, free_port_range, http_app_config, wait_until, write_config
from pmdaemon.config.loader import load_config, parse_config
from pmdaemon.control.export import render
from pmdaemon.net.snapshot import DOWN, DRAINING, OPEN, UP, BackendView

NGINX = shutil.which("nginx")
HAPROXY = shutil.which("haproxy")
STREAM_MODULE = next((p for p in ("/usr/lib/nginx/modules/ngx_stream_module.so",
                                  "/usr/share/nginx/modules/ngx_stream_module.so") if os.path.exists(p)), None)
STREAM_SECTION = "# --- main context"

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


# -- helpers --------------------------------------------------------------------------------------


def live_pools(config, states=(UP, DRAINING, DOWN, OPEN), weights=None):
    """BackendViews as a Listener would publish them: states cycle through `states`."""
    pools = {}
    for listener in config.listeners:
        pools[listener.index] = tuple(
            BackendView(i, b.host, b.port, b.instance, (weights or {}).get(b.address, b.weight),
                        states[i % len(states)], b.region)
            for i, b in enumerate(listener.backends))
    return pools


def split_nginx(text: str) -> tuple[str, str]:
    """(http-context part, main-context part holding `stream {}`), split at the section comment."""
    http, _, stream = text.partition(STREAM_SECTION)
    return http, (STREAM_SECTION + stream) if stream else ""


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


def server_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("server ")
            and not line.strip().startswith("server {")]


@pytest.fixture
def tls_pair(tmp_path):
    """A certificate and its key: `server.crt` + `server.crt.key` (where HAProxy looks for the key)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "server.crt", tmp_path / "server.crt.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return cert, key


def config_from(tmp_path, data: dict):
    return parse_config(data, str(tmp_path / "pmdaemon.json"))


def external(ports, **listener) -> dict:
    """A listener over external backend ports (no apps needed)."""
    return {"load_balancer": {"port": 8080, "backend_ports": list(ports), **listener}}


EXAMPLES = ["round-robin", "weighted-round-robin", "least-connections", "ip-hash", "sticky-sessions",
            "health-aware", "performance-based", "geographic", "http-load-balancer", "tcp-load-balancer",
            "connection-pooling", "timeouts-retries", "rate-limiting", "circuit-breaker", "monitoring"]


# -- the real servers accept every export ---------------------------------------------------------


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


# -- what the output says ---------------------------------------------------------------------------


def test_header_names_pmdaemon_and_the_config():
    config = load_config(str(REPO / "examples" / "round-robin.json"))
    for kind in ("nginx", "haproxy"):
        first = render(kind, config.listeners, live_pools(config), config.source).splitlines()[0]
        assert first.startswith("# Generated by pmdaemon from ") and config.source in first


def test_unknown_format_is_refused():
    config = load_config(str(REPO / "examples" / "round-robin.json"))
    with pytest.raises(ValueError, match="use nginx or haproxy"):
        render("traefik", config.listeners, live_pools(config), config.source)


def test_nginx_upstream_lists_live_ports_weights_and_marks_drained_down():
    config = load_config(str(REPO / "examples" / "weighted-round-robin.json"))
    pools = live_pools(config, states=(UP, DRAINING, DOWN))
    text = render("nginx", config.listeners, pools, config.source)
    assert "upstream pmdaemon_http_8080 {" in text and "proxy_pass http://pmdaemon_http_8080;" in text
    servers = server_lines(text)
    views = pools[0]
    assert len(servers) == len(views)
    for line, view in zip(servers, views):
        assert line.startswith(f"server {view.address} weight={view.weight}")
        directives = line.split("#")[0]
        assert directives.rstrip().endswith("down;") == (view.state == DRAINING), line
        assert f"# {view.instance} (pmdaemon: {view.state})" in line
    for header in ("Host $host", "X-Real-IP $remote_addr", "X-Forwarded-For $proxy_add_x_forwarded_for"):
        assert f"proxy_set_header {header};" in text


def test_haproxy_backend_lists_live_ports_weights_and_drains_with_weight_0():
    config = load_config(str(REPO / "examples" / "weighted-round-robin.json"))
    pools = live_pools(config, states=(UP, DRAINING))
    text = render("haproxy", config.listeners, pools, config.source)
    assert "frontend pmdaemon_http_8080" in text and "default_backend pmdaemon_http_8080_servers" in text
    assert "backend pmdaemon_http_8080_servers" in text and "balance roundrobin" in text
    for line, view in zip(server_lines(text), pools[0]):
        weight = 0 if view.state == DRAINING else view.weight
        assert line.startswith(f"server {view.instance} {view.address} weight {weight} check"), line


@pytest.mark.parametrize("example, nginx_line, haproxy_lines", [
    ("round-robin", None, ["balance roundrobin"]),
    ("least-connections", "least_conn;", ["balance leastconn"]),
    ("ip-hash", "hash $remote_addr consistent;", ["balance source", "hash-type consistent"]),
    ("sticky-sessions", "hash $pmdaemon_http_8080_session consistent;",
     ["balance roundrobin", "cookie PMDAEMON_SESSION insert indirect nocache", "stick on req.hdr(X-Session-ID)"]),
    ("tcp-load-balancer", "least_conn;", ["mode tcp", "balance leastconn"]),
])
def test_strategies_map_to_the_native_algorithms(example, nginx_line, haproxy_lines):
    config = load_config(str(REPO / "examples" / f"{example}.json"))
    nginx = render("nginx", config.listeners, live_pools(config), config.source)
    haproxy = render("haproxy", config.listeners, live_pools(config), config.source)
    upstream = nginx[nginx.index("upstream "):]
    upstream = upstream[:upstream.index("}")]
    balance = [line.strip() for line in upstream.splitlines()[1:]
               if line.strip() and not line.strip().startswith(("server", "#"))]
    assert balance == ([nginx_line] if nginx_line else [])
    for line in haproxy_lines:
        assert line in haproxy


def test_sticky_sessions_give_each_haproxy_server_its_cookie_and_nginx_a_session_key():
    config = load_config(str(REPO / "examples" / "sticky-sessions.json"))
    haproxy = render("haproxy", config.listeners, live_pools(config), config.source)
    for line in server_lines(haproxy):
        name = line.split()[1]
        assert f"cookie {name}" in line
    nginx = render("nginx", config.listeners, live_pools(config), config.source)
    assert "map $cookie_PMDAEMON_SESSION $pmdaemon_http_8080_session {" in nginx
    assert "map $http_x_session_id $pmdaemon_http_8080_session_header {" in nginx


def test_tcp_listeners_go_into_a_stream_block_and_haproxy_tcp_mode():
    config = load_config(str(REPO / "examples" / "tcp-load-balancer.json"))
    nginx = render("nginx", config.listeners, live_pools(config), config.source)
    http, stream = split_nginx(nginx)
    assert "upstream" not in http
    assert re.search(r"^stream \{$", stream, re.M) and "proxy_pass pmdaemon_tcp_4000;" in stream
    assert "listen 4000 so_keepalive=on;" in stream
    haproxy = render("haproxy", config.listeners, live_pools(config), config.source)
    assert "option httpchk" not in haproxy
    assert haproxy.count("mode tcp") == 2 and "bind 0.0.0.0:4000" in haproxy


def test_health_check_path_and_thresholds_reach_haproxy_and_nginx(tmp_path):
    config = config_from(tmp_path, external([3000, 3001], health_check={
        "path": "/ready", "interval": "2s", "timeout": "500ms", "failure_threshold": 4, "success_threshold": 2}))
    haproxy = render("haproxy", config.listeners, live_pools(config), config.source)
    assert "option httpchk GET /ready" in haproxy and "timeout check 500ms" in haproxy
    assert all("check inter 2s fall 4 rise 2" in line for line in server_lines(haproxy))
    nginx = render("nginx", config.listeners, live_pools(config), config.source)
    assert all("max_fails=4 fail_timeout=2s" in line for line in server_lines(nginx))


def test_app_health_check_url_gives_the_path():
    config = load_config(str(REPO / "examples" / "health-aware.json"))
    haproxy = render("haproxy", config.listeners, live_pools(config), config.source)
    assert "option httpchk GET /health" in haproxy
    assert "observe layer7 error-limit 1 on-error mark-down" in haproxy


def test_features_without_a_counterpart_are_named(tmp_path):
    config = load_config(str(REPO / "examples" / "circuit-breaker.json"))
    for kind in ("nginx", "haproxy"):
        assert "# not exported (pmdaemon only): circuit_breaker" in render(kind, config.listeners,
                                                                          live_pools(config), config.source)


def test_tls_key_haproxy_cannot_find_is_explained(tmp_path, tls_pair):
    cert, key = tls_pair
    elsewhere = tmp_path / "private.key"
    shutil.copy(key, elsewhere)
    elsewhere.chmod(0o600)
    config = config_from(tmp_path, external([3000], ssl={"enabled": True, "cert_file": str(cert),
                                                         "key_file": str(elsewhere)}))
    haproxy = render("haproxy", config.listeners, live_pools(config), config.source)
    assert f"ln -s {elsewhere} {cert}.key" in haproxy
    assert f"bind 0.0.0.0:8080 ssl crt {cert} ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.3" in haproxy


def test_an_empty_pool_is_said_not_invented():
    config = load_config(str(REPO / "examples" / "round-robin.json"))
    nginx = render("nginx", config.listeners, {0: ()}, config.source)
    assert "upstream" not in nginx and "no backends" in nginx
    assert "server " not in "\n".join(server_lines(render("haproxy", config.listeners, {0: ()}, config.source)))


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
