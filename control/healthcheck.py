"""How one backend is checked: the check target, one blocking check round, and the up/down counter.

Rules (decisions.md section 8, 'Health checks'):
- An app's `health_check` covers its instances, the listener's covers the rest; `BackendConfig`
  already carries the effective one (None = no active check).
- One round is a probe plus up to `retries` immediate re-probes; it fails when all of them fail.
  An HTTP probe passes on a 2xx or 3xx status; a `tcp` probe (and every probe of a TCP listener)
  passes when the port accepts a connection.
- `failure_threshold` failed rounds in a row take a healthy backend down; `success_threshold`
  passed rounds in a row bring a down one up. A backend starts down.
- A backend without any active check gets a *connect* probe: it is up while its port accepts
  connections, so that it comes up when its port first accepts and goes down when it closes.

`run_round` blocks (up to `(retries + 1) x timeout`); the HealthProbe actor runs it on a bounded
thread pool so that a slow backend never delays the checks of the others.
"""
from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from pmdaemon.config.model import BackendConfig, HealthCheckConfig, ListenerConfig

# Connect probes of backends that have no active check.
CONNECT_INTERVAL = 2.0  # while up: notice a closed port within a few seconds
CONNECT_TIMEOUT = 1.0
CONNECT_FAILURE_THRESHOLD = 2  # one refused connect under load is not enough to take it out
STARTING_INTERVAL = 0.5  # while a backend has not passed yet (its process is starting)

USER_AGENT = "pmdaemon-health-check"


@dataclass(frozen=True)
class CheckTarget:
    """Everything needed to check one backend, resolved once from the config."""

    kind: str  # "http", "https" or "connect"
    host: str  # where to connect
    port: int
    path: str  # request target for http(s)
    host_header: str
    interval: float
    timeout: float
    retries: int
    failure_threshold: int
    success_threshold: int
    restart_unhealthy: bool
    verify_tls: bool = True
    ca_file: str | None = None

    @property
    def description(self) -> str:
        if self.kind == "connect":
            return f"connect {self.host}:{self.port}"
        return f"GET {self.kind}://{self.host_header}{self.path}"

    @classmethod
    def for_backend(cls, backend: BackendConfig, listener: ListenerConfig) -> CheckTarget:
        check = backend.health_check
        if check is None or not check.enabled:
            return cls(
                kind="connect", host=backend.host, port=backend.port, path="", host_header=backend.address,
                interval=CONNECT_INTERVAL, timeout=CONNECT_TIMEOUT, retries=0,
                failure_threshold=CONNECT_FAILURE_THRESHOLD, success_threshold=1, restart_unhealthy=False,
            )
        common = dict(
            interval=check.interval, timeout=check.timeout, retries=check.retries,
            failure_threshold=check.failure_threshold, success_threshold=check.success_threshold,
            restart_unhealthy=check.restart_unhealthy,
        )
        if check.kind == "tcp" or listener.type == "tcp":
            return cls(kind="connect", host=backend.host, port=backend.port, path="",
                       host_header=backend.address, **common)
        if check.url:
            return cls._from_url(check, backend, **common)
        scheme = "https" if listener.backend_protocol == "https" else "http"
        return cls(
            kind=scheme, host=backend.host, port=backend.port, path=check.path or "/",
            host_header=backend.address, verify_tls=listener.backend_tls.verify,
            ca_file=listener.backend_tls.ca_file, **common,
        )

    @classmethod
    def _from_url(cls, check: HealthCheckConfig, backend: BackendConfig, **common) -> CheckTarget:
        """`http://localhost:{{PORT}}/health`: the placeholder (or a missing port) means the backend's port."""
        url = check.url.replace("{{PORT}}", str(backend.port)).replace("{PORT}", str(backend.port))
        parts = urlsplit(url)
        port = parts.port or backend.port
        hostname = parts.hostname or backend.host
        # "localhost" may resolve to ::1 first while apps listen on 127.0.0.1: connect where the pool does.
        host = backend.host if hostname == "localhost" else hostname
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(kind=parts.scheme or "http", host=host, port=port, path=path,
                   host_header=f"{hostname}:{port}", **common)


def run_round(target: CheckTarget) -> str | None:
    """One check round (a probe plus `retries` immediate re-probes): None if one passed, else the last error."""
    error = None
    for _ in range(target.retries + 1):
        error = probe(target)
        if error is None:
            return None
    return error


def probe(target: CheckTarget) -> str | None:
    """One probe: None when it passes, else a short reason ("connection refused", "status 503", ...)."""
    try:
        if target.kind == "connect":
            with socket.create_connection((target.host, target.port), timeout=target.timeout):
                return None
        if target.kind == "https":
            connection = http.client.HTTPSConnection(target.host, target.port, timeout=target.timeout,
                                                     context=_tls_context(target))
        else:
            connection = http.client.HTTPConnection(target.host, target.port, timeout=target.timeout)
        try:
            connection.request("GET", target.path, headers={
                "Host": target.host_header, "User-Agent": USER_AGENT, "Connection": "close"})
            status = connection.getresponse().status
        finally:
            connection.close()
    except ConnectionRefusedError:
        return "connection refused"
    except ConnectionResetError:
        return "connection reset"
    except TimeoutError:
        return f"timeout after {target.timeout:g}s"
    except ssl.SSLError as e:
        return f"TLS error: {e.reason or e}"
    except (OSError, http.client.HTTPException) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if 200 <= status < 400:
        return None
    return f"status {status}"


def _tls_context(target: CheckTarget) -> ssl.SSLContext:
    if not target.verify_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=target.ca_file)


class HealthCounter:
    """Consecutive-round bookkeeping for one backend; no I/O, no clock."""

    def __init__(self, failure_threshold: int, success_threshold: int):
        self.failure_threshold = max(1, failure_threshold)
        self.success_threshold = max(1, success_threshold)
        self.healthy = False
        self.consecutive_failures = 0
        self.consecutive_successes = 0

    def record(self, passed: bool) -> bool:
        """Count one round; True when it changed `healthy`."""
        if passed:
            self.consecutive_failures = 0
            self.consecutive_successes += 1
            if not self.healthy and self.consecutive_successes >= self.success_threshold:
                self.healthy = True
                return True
        else:
            self.consecutive_successes = 0
            self.consecutive_failures += 1
            if self.healthy and self.consecutive_failures >= self.failure_threshold:
                self.healthy = False
                return True
        return False

    def reset(self) -> None:
        """Down, with no rounds counted: a (re)starting process or an ejected backend."""
        self.healthy = False
        self.consecutive_failures = 0
        self.consecutive_successes = 0
