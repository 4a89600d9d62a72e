"""Config files (JSON or TOML) -> the immutable `Config`, with errors that name the path and the fix.

Theory of operation
-------------------
Reading is strict and happens once, before anything starts: an invalid config starts nothing. Every
JSON object is read through `_Obj`, which rejects keys it does not know (suggesting the nearest one)
and converts each value to its internal type and unit (seconds, bytes), raising `ConfigError` with
the JSON path of the offending value (`apps[0].load_balancer.strategy`, `load_balancer[1].port`).

Then the cross-references are resolved (decisions.md section 3):
1. apps -> `InstanceSpec`s (name `<app>-<i>`, env, port from `increment_var`);
2. listeners: the top-level `load_balancer` object or list; with none, one HTTP listener on 8080
   over the apps that have their own `load_balancer` block;
3. each listener's pool: `backend_ports` (a port of a managed instance is tied to that instance),
   or the instances of the apps it names, or of the apps in cluster mode or with a `load_balancer`
   block; each backend gets its app's weight, region, per-app options and effective health check;
4. the strategy is one per pool: the listener's, else the one its apps name (two different ones
   are an error); other per-app options stay on each backend and reach the listener-level field
   when the apps agree and the listener does not set it.

`effective_config(cfg)` (written in `config/view.py`, re-exported here) is the reverse view: the
merged config with every default filled in and durations written with their units, for
`pmdaemon lb config`. `instance_spec(app, i)` (in `config/model.py`) builds instance i, also for
`scale` beyond the config.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import shlex
import shutil
import socket
import ssl
import sys
import tomllib
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import ujson

from pmdaemon.config import units
from pmdaemon.config.alertrule import parse_condition
from pmdaemon.config.model import (
    STRATEGIES,
    AlertRule,
    AlertsConfig,
    AppBalancing,
    AppConfig,
    BackendConfig,
    BackendTls,
    CircuitBreakerConfig,
    Config,
    ConnectionPool,
    Endpoint,
    HealthCheckConfig,
    InstanceSpec,
    Limits,
    ListenerConfig,
    MonitoringConfig,
    RateLimiting,
    Retries,
    SessionConfig,
    SmtpConfig,
    SslConfig,
    Timeouts,
    instance_spec,
)
from pmdaemon.config.view import effective_config  # noqa: F401  (re-exported: part of this module's API)

TOP_KEYS = ("apps", "load_balancer")
APP_KEYS = (
    "name", "script", "args", "cwd", "interpreter", "env", "instances", "exec_mode", "increment_var",
    "weight", "region", "health_check", "load_balancer", "monitoring", "autorestart", "max_restarts",
    "min_uptime", "restart_delay", "exp_backoff_restart_delay", "kill_timeout", "max_memory_restart",
    "aws",
)
HEALTH_KEYS = (
    "enabled", "url", "path", "interval", "timeout", "retries", "failure_threshold",
    "success_threshold", "restart_unhealthy",
)
APP_BALANCING_KEYS = (
    "strategy", "health_check", "connection_tracking", "hash_key", "session_affinity",
    "primary_region", "fallback_regions", "exclude_unhealthy", "quarantine_duration", "metrics",
    "update_interval",
)
PERFORMANCE_METRICS = ("response_time", "cpu_usage", "memory_usage", "error_rate")
DEFAULT_PERFORMANCE_WEIGHTS = {"response_time": 0.4, "cpu_usage": 0.3, "memory_usage": 0.2, "error_rate": 0.1}
LISTENER_KEYS = (
    "enabled", "port", "host", "type", "strategy", "apps", "backend_ports", "health_check", "ssl",
    "session", "timeouts", "retries", "rate_limiting", "circuit_breaker", "connection_pool", "limits",
    "monitoring", "alerts", "backend_protocol", "verify", "ca_file", "hash_key", "session_affinity",
    "geo", "geo_database", "region_header", "trusted_proxies", "metrics", "update_interval",
    "quarantine_duration", "exclude_unhealthy",
)
RATE_LIMITING_KEYS = ("enabled", "requests_per_second", "burst_size", "per_ip_limit")
BREAKER_KEYS = ("enabled", "failure_threshold", "recovery_timeout", "half_open_requests")
CONNECTION_POOL_KEYS = ("enabled", "max_connections", "idle_timeout", "keep_alive")
RULE_KEYS = ("name", "condition", "duration", "action", "url", "recipients")
MONITORING_SWITCHES = ("requests_per_second", "response_times", "error_rates", "backend_health", "connection_counts")
SUPPORTED_TLS = ("TLSv1.2", "TLSv1.3")
OBSOLETE_TLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.0", "TLSv1.1")
ALERT_ACTIONS = ("webhook", "email")

# Options both a listener and an app's `load_balancer` block may set: the pool shares one value.
# app key -> ListenerConfig field
POOL_WIDE_OPTIONS = {
    "strategy": "strategy",
    "hash_key": "hash_key",
    "session_affinity": "session_affinity",
    "metrics": "metrics_weights",
    "update_interval": "update_interval",
    "quarantine_duration": "quarantine_duration",
    "exclude_unhealthy": "exclude_unhealthy",
}
INTERPRETERS = {".js": "node", ".mjs": "node", ".cjs": "node", ".sh": "bash", ".rb": "ruby", ".php": "php"}
DEFAULT_LISTENER_PORT = 8080
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(Exception):
    """An invalid config: `path` is the JSON path of the culprit ("" for the file as a whole),
    `message` what is wrong and the fix."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def load_config(path: str | os.PathLike) -> Config:
    """Read a `.json` (ujson) or `.toml` (tomllib) config file; the format follows the extension."""
    path = os.path.abspath(os.fspath(path))
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".json", ".toml"):
        raise ConfigError("", f"unsupported config format {extension or '(no extension)'!r}; use a .json or .toml file")
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as err:
        raise ConfigError("", f"cannot read the config file {path}: {err.strerror}") from None
    if extension == ".toml":
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError("", f"invalid TOML: {err}") from None
    else:
        try:
            data = ujson.loads(raw)
        except ValueError as err:
            raise ConfigError("", f"invalid JSON: {_json_error_location(raw, err)}") from None
    return parse_config(data, path)


def _json_error_location(raw: bytes, err: ValueError) -> str:
    """ujson's message says what but not where; the stdlib parser says where."""
    try:
        json.loads(raw)
    except ValueError as located:
        return str(located)
    return str(err)


def parse_config(data: dict, source: str) -> Config:
    """Validate and resolve an already decoded config; relative paths are relative to `source`'s directory."""
    source = os.path.abspath(source)
    base_dir = os.path.dirname(source)
    top = _Obj(data, "", TOP_KEYS)
    raw_apps = top.list("apps")
    if not raw_apps and not top.has("load_balancer"):
        raise ConfigError("apps", 'the config runs nothing; list apps (e.g. [{"name": "web", "script": "server.py"}]) '
                                  "or a load_balancer")
    apps = [_parse_app(item, f"apps[{i}]", base_dir) for i, item in enumerate(raw_apps)]
    _check_apps_together(apps)
    listeners = _parse_listeners(top, apps, base_dir)
    return Config(source=source, apps=tuple(a.config for a in apps), listeners=listeners)


# --------------------------------------------------------------------------- reading typed values


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    if value is None:
        return "null"
    return f"{names.get(type(value), type(value).__name__)} ({_show(value)})"


def _show(value: object) -> str:
    text = ujson.dumps(value) if isinstance(value, (dict, list, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "expected one of: " + ", ".join(choices)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Obj:
    """One JSON object being read: typed getters raising ConfigError at the value's path."""

    def __init__(self, data: object, path: str, keys: tuple[str, ...]):
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected an object, got {_describe(data)}")
        for key in data:
            if key not in keys:
                close = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
                fix = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(keys)
                raise ConfigError(_join(path, str(key)), f"unknown key '{key}'; {fix}")
        self.data = data
        self.path = path

    def has(self, key: str) -> bool:
        return key in self.data

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.at(key), message)

    def _expect(self, key: str, what: str) -> ConfigError:
        return self.error(key, f"expected {what}, got {_describe(self.data[key])}")

    def string(self, key: str, default: str | None = None, *, required: str | None = None,
               choices: tuple[str, ...] | None = None) -> str | None:
        if key not in self.data:
            if required:
                raise self.error(key, f"missing; {required}")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise self._expect(key, "a string")
        if choices is not None and value not in choices:
            raise self.error(key, f"unknown value '{value}'; {_hint(value, choices)}")
        if not value and required:
            raise self.error(key, f"must not be empty; {required}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self._expect(key, "true or false")
        return value

    def integer(self, key: str, default: int | None, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._expect(key, "a whole number")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of {minimum} or more"
            raise self.error(key, f"expected a whole number {bounds}, got {value}")
        return value

    def number(self, key: str, default: float | None, *, minimum: float = 0.0,
               above_minimum: bool = False) -> float | None:
        if key not in self.data:
            return default
        value = self.data[key]
        if not _is_number(value) or not math.isfinite(value):
            raise self._expect(key, "a number")
        if value < minimum or above_minimum and value == minimum:
            bound = "above" if above_minimum else "of at least"
            raise self.error(key, f"expected a number {bound} {minimum:g}, got {value}")
        return float(value)

    def duration(self, key: str, default: float, bare_unit: str, *, positive: bool = False) -> float:
        if key not in self.data:
            return default
        try:
            seconds = units.parse_duration(self.data[key], bare_unit)
        except ValueError as err:
            raise self.error(key, str(err)) from None
        if positive and seconds <= 0:
            raise self.error(key, f"must be more than 0, got {_show(self.data[key])}")
        return seconds

    def size(self, key: str, default: int | None) -> int | None:
        if key not in self.data or self.data[key] is None and default is None:
            return default
        try:
            return units.parse_size(self.data[key])
        except ValueError as err:
            raise self.error(key, str(err)) from None

    def list(self, key: str) -> list:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self._expect(key, "a list")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        items = self.list(key)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ConfigError(f"{self.at(key)}[{i}]", f"expected a string, got {_describe(item)}")
        return tuple(items)

    def obj(self, key: str, keys: tuple[str, ...]) -> _Obj | None:
        if key not in self.data:
            return None
        return _Obj(self.data[key], self.at(key), keys)

    def enabled(self) -> bool:
        """A block's `enabled` defaults to true: writing the block is asking for the feature."""
        return self.boolean("enabled", True)


def _file(obj: _Obj, key: str, base_dir: str, what: str) -> str | None:
    """An existing, readable file named by `key`, resolved against the config's directory."""
    name = obj.string(key)
    if name is None:
        return None
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(name)))
    if not os.path.isfile(path):
        raise obj.error(key, f"{what} not found: {path} (relative paths are relative to the config file)")
    if not os.access(path, os.R_OK):
        raise obj.error(key, f"{what} is not readable by this user: {path}")
    return path


def _ip_host(obj: _Obj, key: str, default: str) -> str:
    host = obj.string(key, default)
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise obj.error(key, f"expected an IP address such as 127.0.0.1 or 0.0.0.0, got {host!r}") from None


# --------------------------------------------------------------------------- apps


@dataclass
class _App:
    config: AppConfig
    path: str  # "apps[0]"
    balancing_given: dict = field(default_factory=dict)  # keys written in its load_balancer block -> parsed values


def _parse_app(data: object, path: str, base_dir: str) -> _App:
    obj = _Obj(data, path, APP_KEYS)
    name = obj.string("name", required='give the app a name, e.g. "name": "web"')
    if not _NAME.match(name):
        raise obj.error("name", f"{name!r} may only hold letters, digits, '.', '_' and '-' "
                                "(and start with a letter or digit)")
    if name == "all":
        raise obj.error("name", "'all' is reserved (pmdaemon stop all); choose another name")
    script = _resolve_script(obj, base_dir)
    cwd = os.path.normpath(os.path.join(base_dir, obj.string("cwd", "."))) if obj.has("cwd") else base_dir
    if not os.path.isdir(cwd):
        raise obj.error("cwd", f"directory not found: {cwd}")
    interpreter = _resolve_interpreter(obj, script, base_dir)
    env = _parse_env(obj)
    if interpreter and interpreter[0] == sys.executable:
        env.setdefault("PYTHONUNBUFFERED", "1")
    instances = _parse_instances(obj)
    increment_var = obj.string("increment_var")
    base_port = _base_port(obj, env, increment_var, instances)
    health = _health_block(obj, kind="http")
    balancing, given = _parse_app_balancing(obj.obj("load_balancer", APP_BALANCING_KEYS))
    monitoring = obj.obj("monitoring", ("enabled", "metrics_collection"))
    config = AppConfig(
        name=name,
        script=script,
        args=_parse_args(obj),
        cwd=cwd,
        interpreter=interpreter,
        env=env,
        instances=instances,
        exec_mode=obj.string("exec_mode", "fork", choices=("fork", "cluster")),
        increment_var=increment_var,
        base_port=base_port,
        weight=obj.integer("weight", 1, minimum=1),
        region=obj.string("region"),
        health_check=health,
        load_balancer=balancing,
        monitoring_enabled=monitoring.enabled() if monitoring else False,
        metrics_collection=monitoring.boolean("metrics_collection", False) if monitoring else False,
        autorestart=obj.boolean("autorestart", True),
        max_restarts=obj.integer("max_restarts", 16, minimum=0),
        min_uptime=obj.duration("min_uptime", 1.0, "ms"),
        restart_delay=obj.duration("restart_delay", 0.0, "ms"),
        exp_backoff_restart_delay=obj.duration("exp_backoff_restart_delay", 0.0, "ms"),
        kill_timeout=obj.duration("kill_timeout", 1.6, "ms"),
        max_memory_restart=obj.size("max_memory_restart", 512 * 1024 * 1024),
        aws_alb=_parse_aws(obj),
    )
    config = replace(config, instance_specs=tuple(instance_spec(config, i) for i in range(instances)))
    return _App(config=config, path=path, balancing_given=given)


def _resolve_script(obj: _Obj, base_dir: str) -> str:
    script = obj.string("script", required='name the program to run, e.g. "script": "server.py"')
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(script)))
    if os.path.isfile(path):
        return path
    if os.sep not in script:
        found = shutil.which(script)
        if found:
            return found
    raise obj.error("script", f"file not found: {path} (relative paths are relative to the config file)")


def _resolve_interpreter(obj: _Obj, script: str, base_dir: str) -> tuple[str, ...]:
    """The argv prefix that runs `script`: the `interpreter` key, else by extension (decisions.md section 2)."""
    if obj.has("interpreter"):
        value = obj.data["interpreter"]
        if isinstance(value, str):
            words = shlex.split(value)
        elif isinstance(value, list) and value and all(isinstance(w, str) for w in value):
            words = list(value)
        else:
            raise obj.error("interpreter", f'expected a program such as "python3" or "node", got {_describe(value)}')
        if words == ["none"]:
            words = []
        reason = "set by interpreter"
    else:
        extension = os.path.splitext(script)[1].lower()
        if extension == ".py":
            return (sys.executable,)
        words = [INTERPRETERS[extension]] if extension in INTERPRETERS else []
        reason = f"needed to run {extension} scripts"
    if not words:
        if not os.access(script, os.X_OK):
            raise obj.error("script", f"{script} is not executable and has no known extension; "
                                      "chmod +x it or set \"interpreter\"")
        return ()
    program = words[0]
    if os.sep in program:
        program = os.path.normpath(os.path.join(base_dir, os.path.expanduser(program)))
        found = program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    else:
        found = shutil.which(program)
    if not found:
        raise obj.error("interpreter", f"app '{obj.data['name']}': interpreter {words[0]!r} ({reason}) is not "
                                       "installed or not on PATH; install it or set \"interpreter\" to its full path")
    return (found, *words[1:])


def _parse_args(obj: _Obj) -> tuple[str, ...]:
    value = obj.data.get("args", [])
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if not isinstance(value, list):
        raise obj.error("args", f"expected a list of arguments or a string, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) and not _is_number(item):
            raise ConfigError(f"{obj.at('args')}[{i}]", f"expected a string or number, got {_describe(item)}")
    return tuple(_env_text(item) for item in value)


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _parse_env(obj: _Obj) -> dict[str, str]:
    value = obj.data.get("env", {})
    if not isinstance(value, dict):
        raise obj.error("env", f"expected an object of variables, got {_describe(value)}")
    env = {}
    for key, item in value.items():
        if not _ENV_NAME.match(key):
            raise ConfigError(f"{obj.at('env')}.{key}", "not a valid environment variable name")
        if not isinstance(item, (str, int, float, bool)):
            raise ConfigError(f"{obj.at('env')}.{key}", f"expected a string, number or boolean, got {_describe(item)}")
        env[key] = _env_text(item)
    return env


def _parse_instances(obj: _Obj) -> int:
    value = obj.data.get("instances", 1)
    cpus = len(os.sched_getaffinity(0))
    if value == "max":
        return cpus
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise obj.error("instances", f'expected a number or "max", got {_describe(value)}')
    if value == 0:
        return cpus
    if value < 0:
        return max(1, cpus + value)
    return value


def _base_port(obj: _Obj, env: dict[str, str], increment_var: str | None, instances: int) -> int | None:
    """The first instance's port: env[increment_var]; without increment_var, a lone instance's PORT."""
    if increment_var is None:
        text = env.get("PORT")
        if instances == 1 and text is not None and text.isdigit() and 1 <= int(text) <= 65535:
            return int(text)
        return None
    if not _ENV_NAME.match(increment_var):
        raise obj.error("increment_var", f"{increment_var!r} is not a valid environment variable name")
    text = env.get(increment_var)
    if text is None or not text.strip().isdigit():
        shown = "missing" if text is None else repr(text)
        raise obj.error("increment_var", f"needs a numeric base in env.{increment_var} (it is {shown}); "
                                         f'e.g. "env": {{"{increment_var}": 3000}}')
    base = int(text)
    if not 1 <= base or base + instances - 1 > 65535:
        raise obj.error("increment_var", f"ports {base}..{base + instances - 1} are outside 1..65535")
    return base


def _health_block(parent: _Obj, kind: str) -> HealthCheckConfig | None:
    """`health_check` as a block, or `true` (the default check) / `false` (no check)."""
    value = parent.data.get("health_check")
    if isinstance(value, bool):
        return HealthCheckConfig(enabled=value, kind=kind)
    return _parse_health(parent.obj("health_check", HEALTH_KEYS), kind)


def _parse_health(obj: _Obj | None, kind: str) -> HealthCheckConfig | None:
    if obj is None:
        return None
    url = obj.string("url")
    if url is not None:
        parts = urlsplit(url.replace("{{PORT}}", "1"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise obj.error("url", f"expected an http:// or https:// URL such as "
                                   f"'http://localhost:{{{{PORT}}}}/health', got {url!r}")
    path = obj.string("path", "/health")
    if not path.startswith("/"):
        raise obj.error("path", f"expected a path starting with '/', got {path!r}")
    if kind == "tcp" and (url is not None or obj.has("path")):
        key = "url" if url is not None else "path"
        raise obj.error(key, "a tcp listener checks its backends by connecting; remove url/path")
    return HealthCheckConfig(
        enabled=obj.enabled(),
        url=url,
        path=path,
        interval=obj.duration("interval", 10.0, "s", positive=True),
        timeout=obj.duration("timeout", 5.0, "s", positive=True),
        retries=obj.integer("retries", 0, minimum=0),
        failure_threshold=obj.integer("failure_threshold", 3, minimum=1),
        success_threshold=obj.integer("success_threshold", 1, minimum=1),
        restart_unhealthy=obj.boolean("restart_unhealthy", False),
        kind=kind,
    )


def _hash_key(obj: _Obj) -> str | None:
    value = obj.string("hash_key")
    if value is None or value == "client_ip":
        return value
    kind, _, name = value.partition(":")
    if kind in ("header", "cookie") and _TOKEN.match(name):
        return value
    raise obj.error("hash_key", f"expected 'client_ip', 'header:NAME' or 'cookie:NAME', got {value!r}")


def _performance_weights(obj: _Obj) -> dict[str, float] | None:
    weights = obj.obj("metrics", PERFORMANCE_METRICS)
    if weights is None:
        return None
    parsed = {key: weights.number(key, 0.0) for key in weights.data}
    if not any(parsed.values()):
        raise obj.error("metrics", "give at least one metric a weight above 0, e.g. "
                                   '{"response_time": 0.4, "cpu_usage": 0.3, "memory_usage": 0.2, "error_rate": 0.1}')
    return parsed


def _parse_app_balancing(obj: _Obj | None) -> tuple[AppBalancing | None, dict]:
    """The app's `load_balancer` block, and the subset of keys actually written (for pool-wide merging)."""
    if obj is None:
        return None, {}
    values = {
        "strategy": obj.string("strategy", choices=STRATEGIES),
        "health_check": obj.boolean("health_check", False),
        "connection_tracking": obj.boolean("connection_tracking", True),
        "hash_key": _hash_key(obj),
        "session_affinity": obj.boolean("session_affinity", False),
        "primary_region": obj.boolean("primary_region", False),
        "fallback_regions": obj.strings("fallback_regions"),
        "exclude_unhealthy": obj.boolean("exclude_unhealthy", True),
        "quarantine_duration": obj.duration("quarantine_duration", 0.0, "s"),
        "metrics": _performance_weights(obj),
        "update_interval": obj.duration("update_interval", 60.0, "s", positive=True),
    }
    given = {key: values[key] for key in obj.data}
    defaults = AppBalancing()
    balancing = AppBalancing(**{key: getattr(defaults, key) if value is None else value
                                for key, value in values.items()})
    return balancing, given


def _parse_aws(obj: _Obj) -> dict | None:
    aws = obj.obj("aws", ("alb",))
    alb = aws.obj("alb", ("target_group_arn", "health_check_path", "deregistration_delay", "endpoint_url",
                          "target_id")) if aws else None
    if alb is None:
        return None
    arn = alb.string("target_group_arn", required="the ARN of the ALB target group to register instances in")
    if not re.match(r"^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:\d{12}:targetgroup/", arn):
        raise alb.error("target_group_arn", "expected a target group ARN ('arn:aws:elasticloadbalancing:"
                                            f"<region>:<account>:targetgroup/...'), got {arn!r}")
    check_path = alb.string("health_check_path", "/health")
    if not check_path.startswith("/"):
        raise alb.error("health_check_path", f"expected a path starting with '/', got {check_path!r}")
    optional = {"endpoint_url": _alb_endpoint(alb), "target_id": _alb_target_id(alb)}
    return {
        "target_group_arn": arn,
        "health_check_path": check_path,
        "deregistration_delay": alb.duration("deregistration_delay", 300.0, "s"),
        **{key: value for key, value in optional.items() if value is not None},
    }


def _alb_endpoint(alb: _Obj) -> str | None:
    """A non-AWS elbv2 endpoint (LocalStack, moto); env PMDAEMON_AWS_ENDPOINT_URL overrides it (actors/alb.py)."""
    url = alb.string("endpoint_url")
    if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
        raise alb.error("endpoint_url", f"expected an http:// or https:// URL, got {url!r}")
    return url


def _alb_target_id(alb: _Obj) -> str | None:
    """The target Id: an IP address (ip target group) or an EC2 instance id; None = this host's primary IPv4."""
    target = alb.string("target_id")
    if target is None or re.match(r"^i-[0-9a-f]{8,17}$", target):
        return target
    try:
        return str(ipaddress.ip_address(target))
    except ValueError:
        raise alb.error("target_id", "expected an IP address (ip target group) or an EC2 instance id "
                                     f"('i-0123456789abcdef0'), got {target!r}") from None


def _check_apps_together(apps: list[_App]) -> None:
    names: dict[str, str] = {}
    ports: dict[int, str] = {}
    for app in apps:
        name = app.config.name
        if name in names:
            raise ConfigError(f"{app.path}.name", f"app name '{name}' is already used by {names[name]}")
        names[name] = app.path
        for spec in app.config.instance_specs:
            if spec.port is None:
                continue
            if spec.port in ports:
                key = "increment_var" if app.config.increment_var else "env.PORT"
                raise ConfigError(f"{app.path}.{key}", f"instance {spec.name} would use port {spec.port}, already "
                                                       f"the port of {ports[spec.port]}; give the apps distinct ports")
            ports[spec.port] = spec.name


# --------------------------------------------------------------------------- listeners


def _parse_listeners(top: _Obj, apps: list[_App], base_dir: str) -> tuple[ListenerConfig, ...]:
    if not top.has("load_balancer"):
        balanced = [app for app in apps if app.config.load_balancer is not None]
        if not balanced:
            return ()
        listener = _parse_listener({}, "load_balancer", 0, apps, base_dir, pool_apps=balanced)
        return (listener,)
    raw = top.data["load_balancer"]
    entries = [(i, f"load_balancer[{i}]", item) for i, item in enumerate(raw)] if isinstance(raw, list) \
        else [(0, "load_balancer", raw)]
    listeners: list[ListenerConfig] = []
    paths: dict[int, str] = {}
    for index, path, item in entries:
        if not _Obj(item, path, LISTENER_KEYS).enabled():
            continue  # a disabled listener is only checked for unknown keys
        listener = _parse_listener(item, path, index, apps, base_dir)
        for other in listeners:
            if other.port == listener.port:
                raise ConfigError(_join(path, "port"), f"port {listener.port} is already used by "
                                                       f"{paths[other.index]}; give each listener its own port")
        listeners.append(listener)
        paths[index] = path
    return tuple(listeners)


def _parse_listener(data: dict, path: str, index: int, apps: list[_App], base_dir: str,
                    pool_apps: list[_App] | None = None) -> ListenerConfig:
    obj = _Obj(data, path, LISTENER_KEYS)
    kind = obj.string("type", "http", choices=("http", "tcp"))
    port = obj.integer("port", DEFAULT_LISTENER_PORT, minimum=1, maximum=65535)
    listener_check = _health_block(obj, kind=kind)
    if listener_check is not None and not listener_check.enabled:
        listener_check = None
    backend_protocol = obj.string("backend_protocol", "http", choices=("http", "https"))
    for key in ("verify", "ca_file"):
        if obj.has(key) and backend_protocol != "https":
            raise obj.error(key, 'applies to TLS towards the backends; set "backend_protocol": "https" '
                                 f"or remove {key}")
    listener = ListenerConfig(
        index=index,
        port=port,
        host=_ip_host(obj, "host", "0.0.0.0"),
        type=kind,
        strategy=obj.string("strategy", "round_robin", choices=STRATEGIES),
        ssl=_parse_ssl(obj.obj("ssl", ("enabled", "cert_file", "key_file", "protocols")), base_dir),
        session=_parse_session(obj.obj("session", ("cookie_name", "header_name", "timeout"))),
        timeouts=_parse_timeouts(obj.obj("timeouts", ("connect", "read", "write", "idle"))),
        retries=_parse_retries(obj.obj("retries", ("max_attempts", "retry_delay", "backoff_factor"))),
        rate_limiting=_parse_rate_limiting(obj.obj("rate_limiting", RATE_LIMITING_KEYS)),
        circuit_breaker=_parse_breaker(obj.obj("circuit_breaker", BREAKER_KEYS)),
        connection_pool=_parse_pool(obj.obj("connection_pool", CONNECTION_POOL_KEYS)),
        limits=_parse_limits(obj.obj("limits", ("max_body_size", "max_header_size", "header_timeout"))),
        monitoring=_parse_monitoring(obj.obj("monitoring", ("enabled", "metrics", "export"))),
        alerts=_parse_alerts(obj.obj("alerts", ("enabled", "rules", "smtp"))),
        backend_protocol=backend_protocol,
        backend_tls=BackendTls(verify=obj.boolean("verify", True), ca_file=_file(obj, "ca_file", base_dir, "CA file")),
        hash_key=_hash_key(obj) or "client_ip",
        session_affinity=obj.boolean("session_affinity", False),
        geo=_parse_geo(obj),
        geo_database=_file(obj, "geo_database", base_dir, "geo database"),
        region_header=_region_header(obj),
        trusted_proxies=_networks(obj, "trusted_proxies"),
        metrics_weights=_performance_weights(obj) or {},
        update_interval=obj.duration("update_interval", 60.0, "s", positive=True),
        quarantine_duration=obj.duration("quarantine_duration", 0.0, "s"),
        exclude_unhealthy=obj.boolean("exclude_unhealthy", True),
    )
    if listener.type == "tcp" and obj.has("session"):
        raise obj.error("session", "sessions need HTTP cookies or headers; a tcp listener cannot use them")
    backends, members = _resolve_pool(obj, listener, listener_check, apps, pool_apps)
    listener = replace(listener, backends=backends, apps=tuple(m.config.name for m in members),
                       health_check=listener_check)
    listener = _merge_pool_wide_options(obj, listener, members)
    _check_strategy_fits(obj, listener, members)
    _check_ports_distinct(obj, listener, apps)
    return listener


def _parse_ssl(obj: _Obj | None, base_dir: str) -> SslConfig:
    if obj is None:
        return SslConfig()
    protocols = SslConfig().protocols
    if obj.has("protocols"):
        protocols = obj.strings("protocols")
        if not protocols:
            raise obj.error("protocols", "list at least one of TLSv1.2, TLSv1.3")
        for i, name in enumerate(protocols):
            where = f"{obj.at('protocols')}[{i}]"
            if name in OBSOLETE_TLS:
                raise ConfigError(where, f"{name} is obsolete and insecure (RFC 8996) and is not supported; "
                                         "use TLSv1.2 and/or TLSv1.3")
            if name not in SUPPORTED_TLS:
                raise ConfigError(where, f"unknown value '{name}'; {_hint(name, SUPPORTED_TLS)}")
        protocols = tuple(p for p in SUPPORTED_TLS if p in protocols)
    if not obj.enabled():
        cert, key = (os.path.join(base_dir, obj.string(k)) if obj.has(k) else None for k in ("cert_file", "key_file"))
        return SslConfig(enabled=False, cert_file=cert, key_file=key, protocols=protocols)
    for key in ("cert_file", "key_file"):
        if not obj.has(key):
            raise obj.error(key, "missing; TLS termination needs a certificate and its private key "
                                 "(see examples/certs/README.md to make a test pair)")
    cert = _file(obj, "cert_file", base_dir, "certificate file")
    key = _file(obj, "key_file", base_dir, "private key file")
    mode = os.stat(key).st_mode & 0o777
    if mode & 0o044:
        raise obj.error("key_file", f"{key} is readable by group or others (mode {mode:o}); "
                                    f"run: chmod 600 {shlex.quote(key)}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise obj.error("cert_file", f"cannot load the certificate with its key ({err}); check that "
                                     "cert_file and key_file are PEM files that belong together") from None
    return SslConfig(enabled=True, cert_file=cert, key_file=key, protocols=protocols)


def _parse_session(obj: _Obj | None) -> SessionConfig:
    if obj is None:
        return SessionConfig()
    cookie = obj.string("cookie_name", SessionConfig.cookie_name)
    header = obj.string("header_name", SessionConfig.header_name)
    for key, value in (("cookie_name", cookie), ("header_name", header)):
        if not _TOKEN.match(value):
            raise obj.error(key, f"{value!r} is not a valid HTTP token (letters, digits, '-', '_', ...)")
    return SessionConfig(cookie_name=cookie, header_name=header,
                         timeout=obj.duration("timeout", SessionConfig.timeout, "s", positive=True))


def _parse_timeouts(obj: _Obj | None) -> Timeouts:
    if obj is None:
        return Timeouts()
    defaults = Timeouts()
    return Timeouts(**{key: obj.duration(key, getattr(defaults, key), "ms", positive=True)
                       for key in ("connect", "read", "write", "idle")})


def _parse_retries(obj: _Obj | None) -> Retries:
    if obj is None:
        return Retries()
    return Retries(
        max_attempts=obj.integer("max_attempts", Retries.max_attempts, minimum=1),
        retry_delay=obj.duration("retry_delay", Retries.retry_delay, "ms"),
        backoff_factor=obj.number("backoff_factor", Retries.backoff_factor, minimum=1.0),
    )


def _parse_rate_limiting(obj: _Obj | None) -> RateLimiting:
    if obj is None:
        return RateLimiting()
    rate = obj.number("requests_per_second", None, above_minimum=True)
    burst = obj.integer("burst_size", None, minimum=1)
    per_ip = obj.number("per_ip_limit", None, above_minimum=True)
    enabled = obj.enabled()
    if burst is not None and rate is None:
        raise obj.error("burst_size", "is the capacity of the requests_per_second bucket; set requests_per_second too")
    if enabled and rate is None and per_ip is None:
        raise ConfigError(obj.path, "set requests_per_second and/or per_ip_limit (or \"enabled\": false)")
    if rate is not None and burst is None:
        burst = max(1, math.ceil(rate))  # one second's worth, the usual token-bucket default
    return RateLimiting(enabled=enabled, requests_per_second=rate, burst_size=burst, per_ip_limit=per_ip)


def _parse_breaker(obj: _Obj | None) -> CircuitBreakerConfig:
    if obj is None:
        return CircuitBreakerConfig()
    return CircuitBreakerConfig(
        enabled=obj.enabled(),
        failure_threshold=obj.integer("failure_threshold", CircuitBreakerConfig.failure_threshold, minimum=1),
        recovery_timeout=obj.duration("recovery_timeout", CircuitBreakerConfig.recovery_timeout, "ms", positive=True),
        half_open_requests=obj.integer("half_open_requests", CircuitBreakerConfig.half_open_requests, minimum=1),
    )


def _parse_pool(obj: _Obj | None) -> ConnectionPool:
    if obj is None:
        return ConnectionPool()
    return ConnectionPool(
        enabled=obj.enabled(),
        max_connections=obj.integer("max_connections", ConnectionPool.max_connections, minimum=1),
        idle_timeout=obj.duration("idle_timeout", ConnectionPool.idle_timeout, "s", positive=True),
        keep_alive=obj.boolean("keep_alive", ConnectionPool.keep_alive),
    )


def _parse_limits(obj: _Obj | None) -> Limits:
    if obj is None:
        return Limits()
    header_size = obj.size("max_header_size", Limits.max_header_size)
    if header_size < 1024:
        raise obj.error("max_header_size", f"{header_size} bytes is too small for real requests; use at least 1K")
    return Limits(
        max_body_size=obj.size("max_body_size", None),
        max_header_size=header_size,
        header_timeout=obj.duration("header_timeout", Limits.header_timeout, "s", positive=True),
    )


def _parse_monitoring(obj: _Obj | None) -> MonitoringConfig:
    if obj is None:
        return MonitoringConfig(metrics=dict.fromkeys(MONITORING_SWITCHES, True))
    enabled = obj.enabled()
    switches = obj.obj("metrics", MONITORING_SWITCHES)
    metrics = {name: switches.boolean(name, True) if switches else True for name in MONITORING_SWITCHES}
    export = obj.obj("export", ("prometheus", "statsd"))
    prometheus = _endpoint(export, "prometheus", "127.0.0.1", 9615, "path", "/metrics")
    statsd = _endpoint(export, "statsd", "127.0.0.1", 8125, "prefix", "pmdaemon.")
    if prometheus and statsd and prometheus.port == statsd.port and prometheus.host == statsd.host:
        raise export.error("statsd", f"port {statsd.port} is also the prometheus port")
    if not enabled:
        prometheus = statsd = None
    return MonitoringConfig(enabled=enabled, metrics=metrics, prometheus=prometheus, statsd=statsd)


def _endpoint(export: _Obj | None, key: str, host: str, port: int, extra: str, extra_default: str) -> Endpoint | None:
    if export is None or not export.has(key):
        return None
    value = export.data[key]
    if isinstance(value, bool):
        return Endpoint(host, port, extra_default) if value else None
    target = export.obj(key, ("host", "port", extra))
    text = target.string(extra, extra_default)
    if extra == "path" and not text.startswith("/"):
        raise target.error("path", f"expected a path starting with '/', got {text!r}")
    return Endpoint(_ip_host(target, "host", host), target.integer("port", port, minimum=1, maximum=65535), text)


def _parse_alerts(obj: _Obj | None) -> AlertsConfig:
    if obj is None:
        return AlertsConfig()
    rules: list[AlertRule] = []
    for i, item in enumerate(obj.list("rules")):
        rule = _parse_rule(_Obj(item, f"{obj.at('rules')}[{i}]", RULE_KEYS))
        if any(r.name == rule.name for r in rules):
            raise ConfigError(f"{obj.at('rules')}[{i}].name", f"rule name '{rule.name}' is used twice; "
                                                               "names must be unique")
        rules.append(rule)
    return AlertsConfig(enabled=obj.enabled(), rules=tuple(rules), smtp=_parse_smtp(obj))


def _parse_rule(obj: _Obj) -> AlertRule:
    name = obj.string("name", required='name the rule, e.g. "name": "high_error_rate"')
    condition = obj.string("condition", required='e.g. "condition": "error_rate > 5%"')
    try:
        metric, op, threshold = parse_condition(condition)
    except ValueError as err:
        raise obj.error("condition", str(err)) from None
    action = obj.string("action", required='"webhook" (with "url") or "email" (with "recipients")',
                        choices=ALERT_ACTIONS)
    url = obj.string("url")
    recipients = obj.strings("recipients")
    if action == "webhook":
        if url is None:
            raise obj.error("url", "missing; a webhook action POSTs to this URL, "
                                   'e.g. "url": "http://127.0.0.1:9999/alert"')
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise obj.error("url", f"expected an http:// or https:// URL, got {url!r}")
        if recipients:
            raise obj.error("recipients", 'applies to "action": "email"; a webhook rule uses url')
    else:
        if not recipients:
            raise obj.error("recipients", 'missing; an email action needs a list such as ["admin@example.com"]')
        for j, address in enumerate(recipients):
            if "@" not in address:
                raise ConfigError(f"{obj.at('recipients')}[{j}]", f"expected an email address, got {address!r}")
        if url is not None:
            raise obj.error("url", 'applies to "action": "webhook"; an email rule uses recipients')
    return AlertRule(name=name, condition=condition, metric=metric, op=op, threshold=threshold,
                     duration=obj.duration("duration", 0.0, "s"), action=action, url=url, recipients=recipients)


def _parse_smtp(alerts: _Obj) -> SmtpConfig:
    raw = alerts.data.get("smtp")
    if isinstance(raw, dict) and "password" in raw:
        raise ConfigError(alerts.at("smtp.password"), "passwords do not belong in config files; put it in an "
                                                      'environment variable and name that variable in "password_env"')
    obj = alerts.obj("smtp", ("host", "port", "from", "username", "password_env", "starttls"))
    if obj is None:
        return SmtpConfig()
    password_env = obj.string("password_env")
    if password_env is not None and not _ENV_NAME.match(password_env):
        raise obj.error("password_env", "expected the NAME of an environment variable (such as SMTP_PASSWORD), "
                                        f"got {password_env!r}")
    sender = obj.string("from", SmtpConfig.sender)
    if "@" not in sender:
        raise obj.error("from", f"expected an email address, got {sender!r}")
    return SmtpConfig(
        host=obj.string("host", SmtpConfig.host),
        port=obj.integer("port", SmtpConfig.port, minimum=1, maximum=65535),
        sender=sender,
        username=obj.string("username"),
        password_env=password_env,
        starttls=obj.boolean("starttls", SmtpConfig.starttls),
    )


def _parse_geo(obj: _Obj) -> dict[str, str]:
    value = obj.data.get("geo", {})
    if not isinstance(value, dict):
        raise obj.error("geo", 'expected an object mapping CIDR to region, e.g. {"10.1.0.0/16": "us-east-1"}, '
                               f"got {_describe(value)}")
    geo = {}
    for cidr, region in value.items():
        where = f"{obj.at('geo')}.{cidr}"
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(where, f"{cidr!r} is not a CIDR such as 10.1.0.0/16") from None
        if not isinstance(region, str) or not region:
            raise ConfigError(where, f"expected a region name, got {_describe(region)}")
        geo[str(network)] = region
    return geo


def _networks(obj: _Obj, key: str) -> tuple[str, ...]:
    networks = []
    for i, text in enumerate(obj.strings(key)):
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(f"{obj.at(key)}[{i}]",
                              f"{text!r} is not an IP address or CIDR such as 10.0.0.0/8") from None
    return tuple(networks)


def _region_header(obj: _Obj) -> str | None:
    header = obj.string("region_header")
    if header is None:
        return None
    if not _TOKEN.match(header):
        raise obj.error("region_header", f"{header!r} is not a valid header name")
    if not obj.data.get("trusted_proxies"):
        raise obj.error("region_header", "is honoured only from trusted_proxies; list the proxies that set it, "
                                         'e.g. "trusted_proxies": ["10.0.0.0/8"]')
    return header


# --------------------------------------------------------------------------- pools


def _resolve_pool(obj: _Obj, listener: ListenerConfig, listener_check: HealthCheckConfig | None,
                  apps: list[_App], pool_apps: list[_App] | None) -> tuple[tuple[BackendConfig, ...], list[_App]]:
    """The listener's backends and the apps they belong to (decisions.md section 3)."""
    by_name = {app.config.name: app for app in apps}
    named = []
    for i, name in enumerate(obj.strings("apps")):
        if name not in by_name:
            known = list(by_name) or ["(no apps defined)"]
            raise ConfigError(f"{obj.at('apps')}[{i}]", f"no app named '{name}'; {_hint(name, known)}")
        named.append(by_name[name])
    backends: list[BackendConfig] = []
    members: list[_App] = []
    if obj.has("backend_ports"):
        owners = {spec.port: (app, spec) for app in apps for spec in app.config.instance_specs if spec.port is not None}
        entries = obj.list("backend_ports")
        if not entries:
            raise obj.error("backend_ports", "is empty; list at least one port")
        for j, entry in enumerate(entries):
            where = f"{obj.at('backend_ports')}[{j}]"
            host, port = _backend_address(entry, where)
            owner = owners.get(port) if ipaddress.ip_address(host).is_loopback else None
            if owner is None:
                backend = BackendConfig(host=host, port=port, health_check=listener_check)
            else:
                app, spec = owner
                if named and app not in named:
                    raise ConfigError(where, f"port {port} belongs to instance {spec.name} of app '{app.config.name}', "
                                             f"which is not in {obj.at('apps')}; add it there or remove the port")
                backend = _instance_backend(app, spec, host, listener, listener_check)
                if app not in members:
                    members.append(app)
            if any(b.address == backend.address for b in backends):
                raise ConfigError(where, f"{backend.address} is listed twice")
            backends.append(backend)
    else:
        if pool_apps is None:
            pool_apps = named or [a for a in apps if a.config.exec_mode == "cluster" or a.config.load_balancer]
        if not pool_apps:
            raise ConfigError(obj.path, 'has no backends; list "backend_ports", or name "apps" (or give apps '
                                        '"exec_mode": "cluster" or their own "load_balancer" block) '
                                        "with an increment_var port")
        for app in pool_apps:
            if app.config.base_port is None:
                raise ConfigError(f"{app.path}.increment_var",
                                  f"app '{app.config.name}' is balanced by {obj.path} but its instances have no "
                                  'port; set e.g. "increment_var": "PORT" with "env": {"PORT": 3000}')
            for spec in app.config.instance_specs:
                backends.append(_instance_backend(app, spec, "127.0.0.1", listener, listener_check))
            members.append(app)
    return tuple(backends), members


def _backend_address(entry: object, where: str) -> tuple[str, int]:
    """127.0.0.1 for a bare port; a "host:port" string's host resolved once, now (like nginx)."""
    if isinstance(entry, str) and entry.isdigit():
        entry = int(entry)
    if isinstance(entry, int) and not isinstance(entry, bool):
        if not 1 <= entry <= 65535:
            raise ConfigError(where, f"expected a port from 1 to 65535, got {entry}")
        return "127.0.0.1", entry
    if not isinstance(entry, str):
        raise ConfigError(where, f'expected a port number or a "host:port" string, got {_describe(entry)}')
    match = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", entry) or re.match(r"^([^:\[\]]+):(\d+)$", entry)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(where, f'expected "host:port" (e.g. "127.0.0.1:3000" or "[::1]:3000"), got {entry!r}')
    host, port = match.group(1), int(match.group(2))
    if host == "localhost":
        return "127.0.0.1", port
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(where, f"cannot resolve {host!r}: {err.strerror}; use an IP address") from None
    return infos[0][4][0], port


def _instance_backend(app: _App, spec: InstanceSpec, host: str, listener: ListenerConfig,
                      listener_check: HealthCheckConfig | None) -> BackendConfig:
    return BackendConfig(
        host=host,
        port=spec.port,
        instance=spec.name,
        app=app.config.name,
        weight=app.config.weight,
        region=app.config.region,
        health_check=_effective_check(app, listener, listener_check),
        balancing=app.config.load_balancer,
    )


def _effective_check(app: _App, listener: ListenerConfig,
                     listener_check: HealthCheckConfig | None) -> HealthCheckConfig | None:
    """decisions.md section 8: the app's check covers its instances, else `health_check: true` in its
    load_balancer block asks for the default check, else the listener's check applies. An explicit
    `false` (or a disabled app check) means no active check for those instances."""
    wanted = app.balancing_given.get("health_check")
    own = app.config.health_check
    if wanted is False:
        return None
    if own is not None:
        if not own.enabled:
            return None
        return replace(own, kind="tcp") if listener.type == "tcp" and own.url is None else own
    if wanted is True:
        return HealthCheckConfig(kind="tcp" if listener.type == "tcp" else "http")
    return listener_check


def _merge_pool_wide_options(obj: _Obj, listener: ListenerConfig, members: list[_App]) -> ListenerConfig:
    """The listener-level value of each option an app's `load_balancer` block may also set.

    Strategy is one per pool: the listener's if written, else the one its apps name; two different
    ones are an error naming both. The other options apply per app (BackendConfig.balancing always
    carries them); the listener-level field takes the value the apps agree on when the listener
    does not write it, so a pool-wide reader (hash_key, update_interval...) finds it there.
    """
    changes = {}
    strategy_source = obj.at("strategy") if obj.has("strategy") else None
    for app in members:
        mine = app.balancing_given.get("strategy")
        if mine is None:
            continue
        here = f"{app.path}.load_balancer.strategy"
        if strategy_source is None:
            strategy_source, changes["strategy"] = f"app '{app.config.name}' ({here})", mine
        elif mine != changes.get("strategy", listener.strategy):
            raise ConfigError(here, f"app '{app.config.name}' asks for '{mine}' but {strategy_source} asks for "
                                    f"'{changes.get('strategy', listener.strategy)}'; apps balanced by one "
                                    "listener share one strategy")
    for key, field_name in POOL_WIDE_OPTIONS.items():
        if key == "strategy" or obj.has(key):
            continue
        values = [app.balancing_given[key] for app in members if app.balancing_given.get(key) is not None]
        if values and all(value == values[0] for value in values):
            changes[field_name] = values[0]
    listener = replace(listener, **changes)
    if listener.strategy == "performance_based" and not listener.metrics_weights:
        listener = replace(listener, metrics_weights=dict(DEFAULT_PERFORMANCE_WEIGHTS))
    return listener


def _check_strategy_fits(obj: _Obj, listener: ListenerConfig, members: list[_App]) -> None:
    strategy_path = obj.at("strategy") if obj.has("strategy") else next(
        (f"{a.path}.load_balancer.strategy" for a in members if "strategy" in a.balancing_given), obj.at("strategy"))
    if listener.strategy == "least_connections":
        for app in members:
            if app.config.load_balancer and not app.config.load_balancer.connection_tracking:
                raise ConfigError(f"{app.path}.load_balancer.connection_tracking",
                                  "least_connections counts connections with connection_tracking; "
                                  "set it to true or choose another strategy")
    if listener.type == "tcp":
        if listener.strategy == "sticky_sessions":
            raise ConfigError(strategy_path, "sticky_sessions needs HTTP cookies or headers; a tcp listener can use "
                                             "ip_hash for client affinity")
        if listener.hash_key != "client_ip":
            raise ConfigError(obj.at("hash_key"), "a tcp listener can only hash on client_ip")
        if listener.region_header:
            raise obj.error("region_header", "a tcp listener has no headers; use geo or geo_database")
    if listener.strategy == "geographic":
        if not any(b.region for b in listener.backends):
            raise ConfigError(strategy_path, 'geographic balancing needs regions: set "region" on the apps it balances')
        primaries = [a for a in members if a.config.load_balancer and a.config.load_balancer.primary_region]
        if len(primaries) > 1:
            raise ConfigError(f"{primaries[1].path}.load_balancer.primary_region",
                              f"app '{primaries[0].config.name}' is already the primary region; only one app may be")


def _check_ports_distinct(obj: _Obj, listener: ListenerConfig, apps: list[_App]) -> None:
    for app in apps:
        for spec in app.config.instance_specs:
            if spec.port == listener.port:
                raise obj.error("port", f"port {listener.port} is also the port of instance {spec.name}; "
                                        "give the load balancer its own port")
    for backend in listener.backends:
        if backend.port == listener.port and ipaddress.ip_address(backend.host).is_loopback:
            raise obj.error("port", f"port {listener.port} is also the backend {backend.address}; "
                                    "the load balancer would send traffic to itself")
    prometheus = listener.monitoring.prometheus
    if prometheus is not None and prometheus.port == listener.port:
        raise ConfigError(obj.at("monitoring.export.prometheus"),
                          f"port {prometheus.port} is the listener's own port; use another (default 9615)")
