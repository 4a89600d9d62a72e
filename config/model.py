"""The immutable, fully defaulted configuration object every other module consumes.

`config/loader.py` turns a JSON or TOML file into a `Config`; nothing else parses config files.
Internal units: every duration is a float in **seconds**, every size an int in **bytes**, whatever
unit the file used (decisions.md section 1 fixes the file units). Objects are frozen dataclasses
with tuples instead of lists, so a `Config` can be shared between threads and compared for reload.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

STRATEGIES = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "ip_hash",
    "sticky_sessions",
    "geographic",
    "health_aware_round_robin",
    "performance_based",
)


@dataclass(frozen=True)
class HealthCheckConfig:
    """Active health check of one backend (decisions.md section 8, 'Health checks')."""

    enabled: bool = True
    url: str | None = None  # app form: "http://localhost:{{PORT}}/health"; placeholders kept
    path: str = "/health"  # listener form; used when url is None
    interval: float = 10.0
    timeout: float = 5.0
    retries: int = 0
    failure_threshold: int = 3
    success_threshold: int = 1
    restart_unhealthy: bool = False
    kind: str = "http"  # "http" or "tcp" (a connect); tcp listeners check by connect


@dataclass(frozen=True)
class AppBalancing:
    """Per-app `load_balancer` options; they apply to that app's instances."""

    strategy: str | None = None
    health_check: bool = False
    connection_tracking: bool = True
    hash_key: str = "client_ip"
    session_affinity: bool = False
    primary_region: bool = False
    fallback_regions: tuple[str, ...] = ()
    exclude_unhealthy: bool = True
    quarantine_duration: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)  # performance_based weights
    update_interval: float = 60.0


@dataclass(frozen=True)
class InstanceSpec:
    """One process to run: instance i of an app, fully resolved."""

    name: str  # "<app>-<i>"
    app: str
    index: int
    argv: tuple[str, ...]  # interpreter (if any) + script + args
    cwd: str
    env: Mapping[str, str]  # only the variables the config adds (PORT, PM2_INSTANCE_ID, ...)
    port: int | None  # from increment_var, else None


@dataclass(frozen=True)
class AppConfig:
    name: str
    script: str  # absolute path
    args: tuple[str, ...] = ()
    cwd: str = "."
    interpreter: tuple[str, ...] = ()  # resolved argv prefix; () = execute the script directly
    env: Mapping[str, str] = field(default_factory=dict)
    instances: int = 1
    exec_mode: str = "fork"
    increment_var: str | None = None
    base_port: int | None = None  # env[increment_var] as an int
    weight: int = 1
    region: str | None = None
    health_check: HealthCheckConfig | None = None
    load_balancer: AppBalancing | None = None
    monitoring_enabled: bool = False
    metrics_collection: bool = False
    autorestart: bool = True
    max_restarts: int = 16
    min_uptime: float = 1.0
    restart_delay: float = 0.0
    exp_backoff_restart_delay: float = 0.0
    kill_timeout: float = 1.6
    max_memory_restart: int = 512 * 1024 * 1024
    aws_alb: Mapping[str, object] | None = None
    instance_specs: tuple[InstanceSpec, ...] = ()


@dataclass(frozen=True)
class BackendConfig:
    """One member of a listener's pool."""

    host: str
    port: int
    instance: str | None = None  # managed instance name, or None for an external port
    app: str | None = None
    weight: int = 1
    region: str | None = None
    health_check: HealthCheckConfig | None = None  # effective check, None = no active check
    balancing: AppBalancing | None = None  # the app's per-app options, if any

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    read: float = 30.0
    write: float = 30.0
    idle: float = 60.0


@dataclass(frozen=True)
class Retries:
    max_attempts: int = 3
    retry_delay: float = 0.0
    backoff_factor: float = 2.0  # the delays, attempt by attempt: net/retry.py RetryPolicy.delay_before


@dataclass(frozen=True)
class SslConfig:
    enabled: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")


@dataclass(frozen=True)
class SessionConfig:
    cookie_name: str = "PMDAEMON_SESSION"
    header_name: str = "X-Session-ID"
    timeout: float = 3600.0


@dataclass(frozen=True)
class RateLimiting:
    enabled: bool = False
    requests_per_second: float | None = None
    burst_size: int | None = None
    per_ip_limit: float | None = None


@dataclass(frozen=True)
class CircuitBreakerConfig:
    enabled: bool = False
    failure_threshold: int = 5
    recovery_timeout: float = 30.0
    half_open_requests: int = 3


@dataclass(frozen=True)
class ConnectionPool:
    enabled: bool = True
    max_connections: int = 1000
    idle_timeout: float = 300.0
    keep_alive: bool = True


@dataclass(frozen=True)
class Limits:
    max_body_size: int | None = None
    max_header_size: int = 32 * 1024
    header_timeout: float = 10.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path_or_prefix: str  # "/metrics" for prometheus, "pmdaemon." for statsd


@dataclass(frozen=True)
class MonitoringConfig:
    enabled: bool = False
    metrics: Mapping[str, bool] = field(default_factory=dict)
    prometheus: Endpoint | None = None
    statsd: Endpoint | None = None


@dataclass(frozen=True)
class AlertRule:
    name: str
    condition: str  # as written, e.g. "error_rate > 5%"
    metric: str
    op: str  # one of < <= > >= == !=
    threshold: float  # percentages as a fraction of 100 kept as written number; ms/s -> seconds
    duration: float
    action: str  # "webhook" | "email"
    url: str | None = None
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "localhost"
    port: int = 25
    sender: str = "pmdaemon@localhost"  # the `from` key
    username: str | None = None
    password_env: str | None = None
    starttls: bool = False


@dataclass(frozen=True)
class AlertsConfig:
    enabled: bool = False
    rules: tuple[AlertRule, ...] = ()
    smtp: SmtpConfig = SmtpConfig()


@dataclass(frozen=True)
class BackendTls:
    """`backend_protocol: "https"`: re-encrypt to backends."""

    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True)
class ListenerConfig:
    index: int  # position in the config's list of listeners (0 for a single object)
    port: int = 8080
    host: str = "0.0.0.0"
    type: str = "http"  # "http" | "tcp"
    strategy: str = "round_robin"
    apps: tuple[str, ...] = ()
    backends: tuple[BackendConfig, ...] = ()
    health_check: HealthCheckConfig | None = None
    ssl: SslConfig = SslConfig()
    session: SessionConfig = SessionConfig()
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    rate_limiting: RateLimiting = RateLimiting()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    connection_pool: ConnectionPool = ConnectionPool()
    limits: Limits = Limits()
    monitoring: MonitoringConfig = MonitoringConfig()
    alerts: AlertsConfig = AlertsConfig()
    backend_protocol: str = "http"
    backend_tls: BackendTls = BackendTls()
    # strategy options (listener level; per-app ones live in BackendConfig.balancing)
    hash_key: str = "client_ip"
    session_affinity: bool = False
    geo: Mapping[str, str] = field(default_factory=dict)  # CIDR -> region
    geo_database: str | None = None
    region_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    metrics_weights: Mapping[str, float] = field(default_factory=dict)
    update_interval: float = 60.0
    quarantine_duration: float = 0.0
    exclude_unhealthy: bool = True

    @property
    def name(self) -> str:
        return f"{self.type}:{self.port}"


@dataclass(frozen=True)
class Config:
    source: str  # absolute path of the file it came from
    apps: tuple[AppConfig, ...] = ()
    listeners: tuple[ListenerConfig, ...] = ()

    def app(self, name: str) -> AppConfig | None:
        return next((a for a in self.apps if a.name == name), None)


def instance_spec(app: AppConfig, index: int) -> InstanceSpec:
    """Instance `index` of `app` (also for instances added later by `scale`)."""
    env = dict(app.env)
    env["PM2_INSTANCE_ID"] = str(index)
    env["NODE_APP_INSTANCE"] = str(index)
    port = None
    if app.base_port is not None and app.increment_var:
        port = app.base_port + index
    elif app.base_port is not None and index == 0:
        port = app.base_port  # a lone instance's env PORT; copies made by scale would share it, so get none
    if app.increment_var:
        env[app.increment_var] = str(port)
    return InstanceSpec(
        name=f"{app.name}-{index}",
        app=app.name,
        index=index,
        argv=(*app.interpreter, app.script, *app.args),
        cwd=app.cwd,
        env=env,
        port=port,
    )
