"""`pmdaemon lb export nginx|haproxy`: the listeners and their live pools as nginx or HAProxy config.

Pure: `render(kind, listeners, pools, source)` takes the ListenerConfigs and, per listener index, the
BackendViews of its latest PoolSnapshot (what the loop routes by: live ports, effective weights,
states) and returns text. The Runtime gathers the inputs from the actors.

Theory of operation: the output lets nginx or HAProxy take over from (or sit in front of) pmdaemon's
listener, balancing over the same instances. What is translated:

- One pool per listener, named `pmdaemon_<type>_<port>` (plus `_<index>` if two listeners share that).
  nginx: an `upstream` and a `server` for each HTTP listener (http context), an `upstream` and a
  `server` inside one `stream {}` block for the TCP listeners (main context). HAProxy: a `frontend`
  and a `backend` (`<pool>_servers`) per listener, `mode http` or `mode tcp`, each setting its own
  timeouts so they need nothing from a `defaults` section.
- Strategies. nginx: round_robin, weighted_round_robin, health_aware_round_robin,
  performance_based and geographic -> the default weighted round robin; least_connections ->
  `least_conn`; ip_hash -> `hash <key> consistent` (pmdaemon's ip_hash is a consistent hash, and its
  hash_key may be a header or a cookie; nginx's own `ip_hash` is neither); sticky_sessions ->
  `hash <session key> consistent`, the key being the session cookie, else the session header, else the
  client address (nginx open source cannot insert a cookie). HAProxy: `balance roundrobin`,
  `leastconn`, `source` / `hdr(NAME)` / `hash req.cook(NAME)` with `hash-type consistent`, and
  sticky_sessions -> `cookie <NAME> insert indirect nocache` with a `cookie` per server plus a stick
  table on the session header. Weights are the live effective ones (performance_based scores too).
- Live state. Only an operator's drain is exported: nginx `down`, HAProxy `weight 0` (HAProxy's own
  drain: no new sessions, requests carrying a persistence cookie still arrive, as in pmdaemon).
  Backends that are merely unhealthy, stopped or breaker-open stay in: the external balancer's own
  checks decide (a static file must not freeze a passing failure). Each server line carries the
  instance and the live state as a comment.
- Health checks. HAProxy: `option httpchk GET <path>` when the pool has HTTP checks, and per server
  `check inter/fall/rise` from the backend's check (a plain connect check without one). nginx open
  source only checks passively: `max_fails=<failure_threshold> fail_timeout=<interval>`.
- Timeouts, retries, TLS, body limit and keep-alive map onto the obvious directives. Features with
  no counterpart (circuit breaker, rate limiting, geographic routing) are named in a comment.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from pmdaemon.config.model import BackendConfig, HealthCheckConfig, ListenerConfig
from pmdaemon.net.snapshot import BackendView
from pmdaemon.states import BackendState

FORMATS = ("nginx", "haproxy")
HAPROXY_MAX_WEIGHT = 256
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian/Ubuntu; nginx has no built-in default
STICK_TABLE_SIZE = "100k"  # session ids HAProxy remembers for the session header
_NGINX_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # what may follow $cookie_ in an nginx variable
_HAPROXY_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


@dataclass(frozen=True)
class _Member:
    view: BackendView
    check: HealthCheckConfig | None  # the backend's effective active check (None = none)
    name: str  # unique within the pool, safe as a HAProxy server name and cookie value


@dataclass(frozen=True)
class _Pool:
    name: str
    listener: ListenerConfig
    members: tuple[_Member, ...]

    @property
    def http_check_path(self) -> str | None:
        """The path HAProxy's `option httpchk` asks for: the most common among the pool's HTTP checks."""
        paths = [_check_path(m.check) for m in self.members if _is_http_check(m.check, self.listener)]
        if not paths and _is_http_check(self.listener.health_check, self.listener):
            paths = [_check_path(self.listener.health_check)]
        return Counter(paths).most_common(1)[0][0] if paths else None

    @property
    def check_timeout(self) -> float | None:
        timeouts = [m.check.timeout for m in self.members if m.check is not None and m.check.enabled]
        return max(timeouts) if timeouts else None


def render(kind: str, listeners: Sequence[ListenerConfig], pools: Mapping[int, Sequence[BackendView]],
           source: str, generated_at: datetime | None = None) -> str:
    """`kind` is "nginx" or "haproxy"; `pools` maps ListenerConfig.index to its live BackendViews."""
    if kind not in FORMATS:
        raise ValueError(f"unknown export format {kind!r}; use nginx or haproxy")
    built = _pools(listeners, pools)
    when = f" at {generated_at.isoformat(timespec='seconds')}" if generated_at else ""
    header = [f"# Generated by pmdaemon from {source}{when}.",
              "# The pools as they were then (live ports and weights); drained backends are marked "
              + ("`down`." if kind == "nginx" else "`weight 0` (HAProxy's drain).")]
    body = _nginx(built) if kind == "nginx" else _haproxy(built)
    return "\n".join(header + [""] + body).rstrip("\n") + "\n"


# --- pools ---

def _pools(listeners: Sequence[ListenerConfig], pools: Mapping[int, Sequence[BackendView]]) -> list[_Pool]:
    bases = Counter(_pool_base(listener) for listener in listeners)
    built = []
    for listener in listeners:
        base = _pool_base(listener)
        name = base if bases[base] == 1 else f"{base}_{listener.index}"
        built.append(_Pool(name, listener, _members(listener, pools.get(listener.index, ()))))
    return built


def _pool_base(listener: ListenerConfig) -> str:
    return f"pmdaemon_{listener.type}_{listener.port}"


def _members(listener: ListenerConfig, views: Sequence[BackendView]) -> tuple[_Member, ...]:
    members, taken = [], set()
    for view in views:
        name = _HAPROXY_NAME_UNSAFE.sub("_", view.instance or f"{view.host}_{view.port}")
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}_{n}", n + 1
        taken.add(unique)
        members.append(_Member(view, _backend_check(listener, view), unique))
    return tuple(members)


def _backend_check(listener: ListenerConfig, view: BackendView) -> HealthCheckConfig | None:
    """The effective check of the view's BackendConfig (found by index, else by address); the
    listener's check for a member the config does not list (a pool that grew by scaling)."""
    backend: BackendConfig | None = None
    if view.index < len(listener.backends) and listener.backends[view.index].address == view.address:
        backend = listener.backends[view.index]
    else:
        backend = next((b for b in listener.backends if b.address == view.address), None)
    check = backend.health_check if backend is not None else listener.health_check
    return check if check is not None and check.enabled else None


def _is_http_check(check: HealthCheckConfig | None, listener: ListenerConfig) -> bool:
    return check is not None and check.enabled and check.kind == "http" and listener.type == "http"


def _check_path(check: HealthCheckConfig) -> str:
    if check.url is None:
        return check.path or "/"
    parts = urlsplit(check.url.replace("{{PORT}}", "0").replace("{PORT}", "0"))
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _not_exported(listener: ListenerConfig) -> list[str]:
    missing = []
    if listener.strategy == "geographic":
        missing.append("geographic routing (balanced by weight instead)")
    if listener.circuit_breaker.enabled:
        missing.append("circuit_breaker")
    if listener.rate_limiting.enabled:
        missing.append("rate_limiting")
    return missing


def _summary(pool: _Pool) -> list[str]:
    listener = pool.listener
    states = Counter(m.view.state for m in pool.members)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
    tls = " (TLS)" if listener.ssl.enabled else ""
    lines = [f"# listener {listener.index}: {listener.type}{tls} on {listener.host}:{listener.port}, "
             f"strategy {listener.strategy}, backends: {counts}"]
    missing = _not_exported(listener)
    if missing:
        lines.append(f"# not exported (pmdaemon only): {', '.join(missing)}")
    return lines


def _duration(seconds: float) -> str:
    """nginx and HAProxy both read `30s` and `250ms`."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _whole_seconds(seconds: float) -> str:
    """nginx's server `fail_timeout` takes whole seconds only."""
    return f"{max(1, math.ceil(seconds))}s"


def _state_comment(member: _Member) -> str:
    return f"  # {member.view.instance or 'external'} (pmdaemon: {member.view.state})"


# --- nginx ---

def _nginx(pools: list[_Pool]) -> list[str]:
    http = [p for p in pools if p.listener.type == "http"]
    tcp = [p for p in pools if p.listener.type == "tcp"]
    lines = []
    if http:
        lines += ["# --- http context: inside http {}, e.g. /etc/nginx/conf.d/pmdaemon.conf ---", ""]
        for pool in http:
            lines += _summary(pool) + _nginx_http(pool) + [""]
    if tcp:
        lines += ["# --- main context: outside http {}, e.g. in /etc/nginx/nginx.conf (needs the stream module) ---",
                  "", "stream {"]
        for pool in tcp:
            lines += _indent(_summary(pool) + _nginx_stream(pool)) + [""]
        if lines[-1] == "":
            lines.pop()
        lines += ["}", ""]
    return lines


def _nginx_http(pool: _Pool) -> list[str]:
    listener = pool.listener
    if not pool.members:
        return ["# this listener has no backends: nothing to export"]
    upstream = _nginx_upstream(pool)
    scheme = "https" if listener.backend_protocol == "https" else "http"
    location = [
        f"proxy_pass {scheme}://{pool.name};",
        "proxy_http_version 1.1;",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        f"proxy_connect_timeout {_duration(listener.timeouts.connect)};",
        f"proxy_read_timeout {_duration(listener.timeouts.read)};",
        f"proxy_send_timeout {_duration(listener.timeouts.write)};",
    ] + _nginx_retries(listener, "error timeout") + _nginx_backend_tls(pool)
    server = [_nginx_listen(listener)] + _nginx_tls(listener) + [
        f"client_header_timeout {_duration(listener.limits.header_timeout)};",
        f"keepalive_timeout {_duration(listener.timeouts.idle)};",
        f"client_max_body_size {listener.limits.max_body_size or 0};",
        "",
        "location / {",
    ] + _indent(location) + ["}"]
    return upstream + ["server {"] + _indent(server) + ["}"]


def _nginx_upstream(pool: _Pool) -> list[str]:
    """The `upstream` block, preceded by the blocks its balancing needs; the same in http {} and stream {}."""
    lines, balance = _nginx_balance(pool)
    return lines + [f"upstream {pool.name} {{"] + _indent(balance + _nginx_servers(pool)) + ["}", ""]


def _nginx_stream(pool: _Pool) -> list[str]:
    listener = pool.listener
    if not pool.members:
        return ["# this listener has no backends: nothing to export"]
    upstream = _nginx_upstream(pool)
    keep_alive = listener.connection_pool.keep_alive
    listen = _nginx_listen(listener)
    if keep_alive:
        listen = listen[:-1] + " so_keepalive=on;"
    server = [listen] + _nginx_tls(listener) + [
        f"proxy_pass {pool.name};",
        f"proxy_connect_timeout {_duration(listener.timeouts.connect)};",
        f"proxy_timeout {_duration(listener.connection_pool.idle_timeout)};",
    ] + _nginx_retries(listener, "on") + (["proxy_socket_keepalive on;"] if keep_alive else [])
    return upstream + ["server {"] + _indent(server) + ["}"]


def _nginx_balance(pool: _Pool) -> tuple[list[str], list[str]]:
    """(blocks before the upstream, directives inside it) for the pool's strategy."""
    listener = pool.listener
    strategy = listener.strategy
    if strategy == "least_connections":
        return [], ["least_conn;"]
    if strategy == "ip_hash":
        key, note = _nginx_hash_key(listener.hash_key)
        return [], note + [f"hash {key} consistent;"]
    if strategy == "sticky_sessions":
        return _nginx_session_maps(pool)
    if strategy == "performance_based":
        return [], ["# weights: pmdaemon's performance scores at export time"]
    return [], []


def _nginx_hash_key(hash_key: str) -> tuple[str, list[str]]:
    kind, _, name = hash_key.partition(":")
    if kind == "header":
        return "$http_" + name.lower().replace("-", "_"), []
    if kind == "cookie":
        if _NGINX_NAME.match(name):
            return "$cookie_" + name, []
        return "$remote_addr", [f"# nginx cannot read the cookie {name!r} (only letters, digits and _): "
                                "hashing the client address instead"]
    return "$remote_addr", []


def _nginx_session_maps(pool: _Pool) -> tuple[list[str], list[str]]:
    """Sticky key: the session cookie if sent, else the session header, else the client address."""
    session = pool.listener.session
    header_var = "$http_" + session.header_name.lower().replace("-", "_")
    by_header = f"${pool.name}_session_header"
    key = f"${pool.name}_session"
    maps = [f"map {header_var} {by_header} {{", '    ""      $remote_addr;', f"    default {header_var};", "}", ""]
    if _NGINX_NAME.match(session.cookie_name):
        cookie_var = "$cookie_" + session.cookie_name
        maps += [f"map {cookie_var} {key} {{", f'    ""      {by_header};', f"    default {cookie_var};", "}", ""]
        note = []
    else:
        key = by_header
        note = [f"# nginx cannot read the cookie {session.cookie_name!r} (only letters, digits and _)"]
    return (["# sticky_sessions: the session cookie (set by the app: nginx open source cannot insert one),",
             "# else the session header, else the client address"] + maps,
            note + [f"hash {key} consistent;"])


def _nginx_servers(pool: _Pool) -> list[str]:
    lines = []
    for member in pool.members:
        view = member.view
        params = [f"weight={max(1, view.weight)}"]
        passive = _nginx_passive_check(pool.listener, member.check)
        if passive:
            params.append(passive)
        if view.state == BackendState.DRAINING:
            params.append("down")
        lines.append(f"server {view.address} {' '.join(params)};{_state_comment(member)}")
    return lines


def _nginx_passive_check(listener: ListenerConfig, check: HealthCheckConfig | None) -> str | None:
    if listener.strategy == "health_aware_round_robin":
        window = listener.quarantine_duration or (check.interval if check else 10.0)
        return f"max_fails=1 fail_timeout={_whole_seconds(window)}"
    if check is None:
        return None
    return f"max_fails={check.failure_threshold} fail_timeout={_whole_seconds(check.interval)}"


def _nginx_listen(listener: ListenerConfig) -> str:
    where = str(listener.port) if listener.host in ("0.0.0.0", "") else _host_port(listener.host, listener.port)
    return f"listen {where}{' ssl' if listener.ssl.enabled else ''};"


def _nginx_tls(listener: ListenerConfig) -> list[str]:
    if not listener.ssl.enabled:
        return []
    return [f"ssl_certificate {listener.ssl.cert_file};",
            f"ssl_certificate_key {listener.ssl.key_file};",
            f"ssl_protocols {' '.join(listener.ssl.protocols)};"]


def _nginx_backend_tls(pool: _Pool) -> list[str]:
    listener = pool.listener
    if listener.backend_protocol != "https":
        return []
    if not listener.backend_tls.verify:
        return ["proxy_ssl_verify off;"]
    lines = ["proxy_ssl_verify on;",
             f"proxy_ssl_trusted_certificate {listener.backend_tls.ca_file or SYSTEM_CA_BUNDLE};"]
    hosts = {m.view.host for m in pool.members}
    if len(hosts) == 1:
        lines.append(f"proxy_ssl_name {hosts.pop()};")  # pmdaemon verifies the backend's host
    return lines


def _nginx_retries(listener: ListenerConfig, on: str) -> list[str]:
    attempts = listener.retries.max_attempts
    if attempts <= 1:
        return ["proxy_next_upstream off;"]
    return [f"proxy_next_upstream {on};", f"proxy_next_upstream_tries {attempts};"]


# --- HAProxy ---

def _haproxy(pools: list[_Pool]) -> list[str]:
    lines = []
    for pool in pools:
        lines += _summary(pool) + _haproxy_frontend(pool) + [""] + _haproxy_backend(pool) + [""]
    return lines


def _haproxy_frontend(pool: _Pool) -> list[str]:
    listener = pool.listener
    tcp = listener.type == "tcp"
    body = [f"mode {listener.type}", _haproxy_bind(listener)]
    if tcp:
        body += [f"timeout client {_duration(listener.connection_pool.idle_timeout)}",
                 f"maxconn {listener.connection_pool.max_connections}"]
        if listener.connection_pool.keep_alive:
            body.append("option clitcpka")
    else:
        body += [f"timeout client {_duration(listener.timeouts.idle)}",
                 f"timeout http-request {_duration(listener.limits.header_timeout)}",
                 f"timeout http-keep-alive {_duration(listener.timeouts.idle)}",
                 "option forwardfor",
                 "http-request set-header X-Real-IP %[src]",
                 "http-request set-header X-Forwarded-Proto https if { ssl_fc }",
                 "http-request set-header X-Forwarded-Proto http if !{ ssl_fc }"]
    body.append(f"default_backend {pool.name}_servers")
    return _haproxy_key_note(listener) + [f"frontend {pool.name}"] + _indent(body)


def _haproxy_key_note(listener: ListenerConfig) -> list[str]:
    ssl = listener.ssl
    if not ssl.enabled or ssl.key_file in (ssl.cert_file, f"{ssl.cert_file}.key"):
        return []
    return [f"# HAProxy reads the private key from the certificate file or from {ssl.cert_file}.key:",
            f"# link it there (ln -s {ssl.key_file} {ssl.cert_file}.key) or append it to the certificate"]


def _haproxy_bind(listener: ListenerConfig) -> str:
    bind = f"bind {_host_port(listener.host, listener.port)}"
    ssl = listener.ssl
    if ssl.enabled:
        versions = sorted(ssl.protocols)
        bind += f" ssl crt {ssl.cert_file} ssl-min-ver {versions[0]} ssl-max-ver {versions[-1]}"
    return bind


def _haproxy_backend(pool: _Pool) -> list[str]:
    listener = pool.listener
    tcp = listener.type == "tcp"
    body = [f"mode {listener.type}"] + _haproxy_balance(pool)
    path = pool.http_check_path
    if path is not None:
        body.append(f"option httpchk GET {path}")
    body += [f"timeout connect {_duration(listener.timeouts.connect)}",
             f"timeout server {_duration(listener.connection_pool.idle_timeout if tcp else listener.timeouts.read)}"]
    if pool.check_timeout is not None:
        body.append(f"timeout check {_duration(pool.check_timeout)}")
    body += [f"retries {max(0, listener.retries.max_attempts - 1)}", "option redispatch"]
    if tcp and listener.connection_pool.keep_alive:
        body.append("option srvtcpka")
    if not tcp:
        body.append(f"default-server maxconn {listener.connection_pool.max_connections}")
    body += [_haproxy_server(pool, member) for member in pool.members]
    return [f"backend {pool.name}_servers"] + _indent(body)


def _haproxy_balance(pool: _Pool) -> list[str]:
    listener = pool.listener
    strategy = listener.strategy
    if strategy == "least_connections":
        return ["balance leastconn"]
    if strategy == "ip_hash":
        kind, _, name = listener.hash_key.partition(":")
        if kind == "header":
            balance = f"balance hdr({name})"
        elif kind == "cookie":
            balance = f"balance hash req.cook({name})"
        else:
            balance = "balance source"
        return [balance, "hash-type consistent"]
    if strategy == "sticky_sessions":
        session = listener.session
        secure = " secure" if listener.ssl.enabled else ""
        return [
            "balance roundrobin",
            f"cookie {session.cookie_name} insert indirect nocache httponly{secure} "
            f'attr "SameSite=Lax" attr "Max-Age={round(session.timeout)}"',
            f"stick-table type string len 128 size {STICK_TABLE_SIZE} expire {_duration(session.timeout)}",
            f"stick on req.hdr({session.header_name})",
        ]
    if strategy == "performance_based":
        return ["balance roundrobin  # weights: pmdaemon's performance scores at export time"]
    return ["balance roundrobin"]


def _haproxy_server(pool: _Pool, member: _Member) -> str:
    listener = pool.listener
    view = member.view
    weight = 0 if view.state == BackendState.DRAINING else min(HAPROXY_MAX_WEIGHT, max(1, view.weight))
    params = [f"weight {weight}", "check"]
    if member.check is not None:
        params += [f"inter {_duration(member.check.interval)}", f"fall {member.check.failure_threshold}",
                   f"rise {member.check.success_threshold}"]
    if listener.strategy == "sticky_sessions":
        params.append(f"cookie {member.name}")
    if listener.strategy == "health_aware_round_robin":
        layer = "layer4" if listener.type == "tcp" else "layer7"
        params.append(f"observe {layer} error-limit 1 on-error mark-down")
    if listener.backend_protocol == "https" and listener.type == "http":
        tls = listener.backend_tls
        if tls.verify:
            params += ["ssl", "verify required", f"ca-file {tls.ca_file or '@system-ca'}", f"verifyhost {view.host}"]
        else:
            params += ["ssl", "verify none"]
    return f"server {member.name} {view.address} {' '.join(params)}{_state_comment(member)}"


# --- shared ---

def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _indent(lines: list[str]) -> list[str]:
    return [f"    {line}" if line else "" for line in lines]
