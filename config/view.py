"""`pmdaemon lb config`: the effective config as a JSON-ready dict, the reverse of `config/loader.py`.

Every default is filled in and every duration is written with the unit its field takes in a config
file ("5000ms" for timeouts, "30s" for health checks), so the output reads like a config and its
values parse back to the same seconds. Nothing secret is shown: env variables whose names look
secret are masked, a URL's password is masked, and SMTP only ever holds the NAME of a variable.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from pmdaemon.config import units
from pmdaemon.config.model import AppBalancing, AppConfig, Config, Endpoint, HealthCheckConfig, ListenerConfig

_SECRET_ENV = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|AUTH|PRIVATE", re.IGNORECASE)


def effective_config(cfg: Config) -> dict:
    """The merged config, every default filled in, durations with units, no secrets: `pmdaemon lb config`."""
    return {
        "source": cfg.source,
        "apps": [_app_view(app) for app in cfg.apps],
        "load_balancer": [_listener_view(listener) for listener in cfg.listeners],
    }


def _ms(seconds: float) -> str:
    return units.format_duration(seconds, "ms")


def _s(seconds: float) -> str:
    return units.format_duration(seconds, "s")


def _size(size: int | None) -> str | None:
    return None if size is None else units.format_size(size)


def _health_view(check: HealthCheckConfig | None) -> dict | None:
    if check is None:
        return None
    return {
        "enabled": check.enabled, "kind": check.kind, "url": check.url, "path": check.path,
        "interval": _s(check.interval), "timeout": _s(check.timeout), "retries": check.retries,
        "failure_threshold": check.failure_threshold, "success_threshold": check.success_threshold,
        "restart_unhealthy": check.restart_unhealthy,
    }


def _balancing_view(balancing: AppBalancing | None) -> dict | None:
    if balancing is None:
        return None
    return {
        "strategy": balancing.strategy, "health_check": balancing.health_check,
        "connection_tracking": balancing.connection_tracking, "hash_key": balancing.hash_key,
        "session_affinity": balancing.session_affinity, "primary_region": balancing.primary_region,
        "fallback_regions": list(balancing.fallback_regions), "exclude_unhealthy": balancing.exclude_unhealthy,
        "quarantine_duration": _s(balancing.quarantine_duration), "metrics": dict(balancing.metrics),
        "update_interval": _s(balancing.update_interval),
    }


def _masked_env(env) -> dict:
    return {key: "***" if _SECRET_ENV.search(key) else value for key, value in env.items()}


def _app_view(app: AppConfig) -> dict:
    return {
        "name": app.name, "script": app.script, "args": list(app.args), "cwd": app.cwd,
        "interpreter": list(app.interpreter), "env": _masked_env(app.env), "instances": app.instances,
        "exec_mode": app.exec_mode, "increment_var": app.increment_var, "weight": app.weight, "region": app.region,
        "health_check": _health_view(app.health_check), "load_balancer": _balancing_view(app.load_balancer),
        "monitoring": {"enabled": app.monitoring_enabled, "metrics_collection": app.metrics_collection},
        "autorestart": app.autorestart, "max_restarts": app.max_restarts, "min_uptime": _ms(app.min_uptime),
        "restart_delay": _ms(app.restart_delay), "exp_backoff_restart_delay": _ms(app.exp_backoff_restart_delay),
        "kill_timeout": _ms(app.kill_timeout), "max_memory_restart": units.format_size(app.max_memory_restart),
        "aws": _aws_view(app.aws_alb),
        "processes": [{"name": spec.name, "port": spec.port} for spec in app.instance_specs],
    }


def _aws_view(alb) -> dict | None:
    if alb is None:
        return None
    return {"alb": {**alb, "deregistration_delay": _s(alb["deregistration_delay"])}}


def _masked_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _endpoint_view(endpoint: Endpoint | None, extra: str) -> dict | None:
    if endpoint is None:
        return None
    return {"host": endpoint.host, "port": endpoint.port, extra: endpoint.path_or_prefix}


def _listener_view(listener: ListenerConfig) -> dict:
    rate = listener.rate_limiting
    return {
        "index": listener.index, "enabled": True, "host": listener.host, "port": listener.port, "type": listener.type,
        "strategy": listener.strategy, "apps": list(listener.apps),
        "backends": [
            {"address": b.address, "instance": b.instance, "app": b.app, "weight": b.weight, "region": b.region,
             "health_check": _health_view(b.health_check)}
            for b in listener.backends
        ],
        "health_check": _health_view(listener.health_check),
        "ssl": {"enabled": listener.ssl.enabled, "cert_file": listener.ssl.cert_file,
                "key_file": listener.ssl.key_file, "protocols": list(listener.ssl.protocols)},
        "session": {"cookie_name": listener.session.cookie_name, "header_name": listener.session.header_name,
                    "timeout": _s(listener.session.timeout)},
        "timeouts": {key: _ms(getattr(listener.timeouts, key)) for key in ("connect", "read", "write", "idle")},
        "retries": {"max_attempts": listener.retries.max_attempts, "retry_delay": _ms(listener.retries.retry_delay),
                    "backoff_factor": listener.retries.backoff_factor},
        "rate_limiting": {"enabled": rate.enabled, "requests_per_second": rate.requests_per_second,
                          "burst_size": rate.burst_size, "per_ip_limit": rate.per_ip_limit},
        "circuit_breaker": {"enabled": listener.circuit_breaker.enabled,
                            "failure_threshold": listener.circuit_breaker.failure_threshold,
                            "recovery_timeout": _ms(listener.circuit_breaker.recovery_timeout),
                            "half_open_requests": listener.circuit_breaker.half_open_requests},
        "connection_pool": {"enabled": listener.connection_pool.enabled,
                            "max_connections": listener.connection_pool.max_connections,
                            "idle_timeout": _s(listener.connection_pool.idle_timeout),
                            "keep_alive": listener.connection_pool.keep_alive},
        "limits": {"max_body_size": _size(listener.limits.max_body_size),
                   "max_header_size": units.format_size(listener.limits.max_header_size),
                   "header_timeout": _s(listener.limits.header_timeout)},
        "monitoring": {"enabled": listener.monitoring.enabled, "metrics": dict(listener.monitoring.metrics),
                       "export": {"prometheus": _endpoint_view(listener.monitoring.prometheus, "path"),
                                  "statsd": _endpoint_view(listener.monitoring.statsd, "prefix")}},
        "alerts": {
            "enabled": listener.alerts.enabled,
            "rules": [{"name": r.name, "condition": r.condition, "duration": _s(r.duration), "action": r.action,
                       "url": _masked_url(r.url), "recipients": list(r.recipients)} for r in listener.alerts.rules],
            "smtp": {"host": listener.alerts.smtp.host, "port": listener.alerts.smtp.port,
                     "from": listener.alerts.smtp.sender, "username": listener.alerts.smtp.username,
                     "password_env": listener.alerts.smtp.password_env, "starttls": listener.alerts.smtp.starttls},
        },
        "backend_protocol": listener.backend_protocol,
        "verify": listener.backend_tls.verify, "ca_file": listener.backend_tls.ca_file,
        "hash_key": listener.hash_key, "session_affinity": listener.session_affinity, "geo": dict(listener.geo),
        "geo_database": listener.geo_database, "region_header": listener.region_header,
        "trusted_proxies": list(listener.trusted_proxies), "metrics": dict(listener.metrics_weights),
        "update_interval": _s(listener.update_interval), "quarantine_duration": _s(listener.quarantine_duration),
        "exclude_unhealthy": listener.exclude_unhealthy,
    }
