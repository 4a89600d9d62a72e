"""Config loading: units, the alert grammar, error paths and fixes, apps/instances, pool resolution.

Configs are written to a temporary directory next to an (empty) app script, as a user would, and
read back through `load_config`.
"""
import json
import os
import shutil
import sys

import pytest
import trustme

from pmdaemon.config import units
from pmdaemon.config.alertrule import parse_condition
from pmdaemon.config.loader import ConfigError, effective_config, load_config
from pmdaemon.config.model import Endpoint, HealthCheckConfig

CPUS = len(os.sched_getaffinity(0))


@pytest.fixture
def cfgdir(tmp_path):
    (tmp_path / "server.py").write_text("")
    (tmp_path / "server.js").write_text("")
    return tmp_path


def write(directory, data, name="pm.json"):
    path = directory / name
    path.write_text(json.dumps(data))
    return path


def load(directory, data):
    return load_config(write(directory, data))


def error(directory, data) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(directory, data)
    return caught.value


def app(name="web", port=3000, instances=2, **extra):
    return {"name": name, "script": "server.py", "instances": instances, "exec_mode": "cluster",
            "increment_var": "PORT", "env": {"PORT": port}, **extra}


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("value, unit, seconds", [
    ("250ms", "s", 0.25), ("30s", "ms", 30.0), ("5m", "ms", 300.0), ("1h", "s", 3600.0), ("1.5s", "ms", 1.5),
    (5000, "ms", 5.0), (30, "s", 30.0), (0, "ms", 0.0), (2.5, "s", 2.5),
])
def test_durations(value, unit, seconds):
    assert units.parse_duration(value, unit) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5", "5 parsecs", "-1s", -1, True, None, [], "ms"])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        units.parse_duration(value, "ms")


def test_duration_without_unit_says_how_to_write_it():
    with pytest.raises(ValueError, match="has no unit.*'5ms'"):
        units.parse_duration("5", "ms")


@pytest.mark.parametrize("seconds, unit, text", [(5.0, "ms", "5000ms"), (30.0, "s", "30s"), (0.25, "s", "0.25s"),
                                                 (1.6, "ms", "1600ms"), (0.0, "s", "0s")])
def test_format_duration(seconds, unit, text):
    assert units.format_duration(seconds, unit) == text


@pytest.mark.parametrize("value, size", [("512M", 512 * 1024**2), ("1G", 1024**3), ("200K", 200 * 1024), (4096, 4096),
                                         ("1.5K", 1536), ("64MB", 64 * 1024**2), ("2g", 2 * 1024**3), ("100", 100)])
def test_sizes(value, size):
    assert units.parse_size(value) == size


@pytest.mark.parametrize("value", ["12X", "M", -5, True, "1 GiGa"])
def test_bad_sizes(value):
    with pytest.raises(ValueError):
        units.parse_size(value)


def test_format_size_picks_the_largest_exact_suffix():
    assert [units.format_size(n) for n in (512 * 1024**2, 32 * 1024, 1000, 1536)] == ["512M", "32K", "1000", "1536"]


# --------------------------------------------------------------------------- alert conditions


@pytest.mark.parametrize("text, parsed", [
    ("error_rate > 5%", ("error_rate", ">", 5.0)),
    ("error_rate >= 2.5", ("error_rate", ">=", 2.5)),
    ("healthy_backends < 2", ("healthy_backends", "<", 2.0)),
    ("p95_response_time > 200ms", ("p95_response_time", ">", 0.2)),
    ("p99_response_time<=1.5s", ("p99_response_time", "<=", 1.5)),
    ("open_circuits != 0", ("open_circuits", "!=", 0.0)),
    ("requests_per_second == 100", ("requests_per_second", "==", 100.0)),
])
def test_conditions(text, parsed):
    metric, op, threshold = parse_condition(text)
    assert (metric, op) == parsed[:2] and threshold == pytest.approx(parsed[2])


@pytest.mark.parametrize("text, complaint", [
    ("eror_rate > 5%", "did you mean 'error_rate'"),
    ("p95_response_time > 200", "needs a unit"),
    ("healthy_backends < 2%", "plain number"),
    ("error_rate > 5ms", "percentage"),
    ("error_rate => 5", "unknown operator"),
    ("error_rate is high", "cannot read condition"),
])
def test_bad_conditions(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_condition(text)


# --------------------------------------------------------------------------- errors: paths and fixes


def test_unknown_strategy_exact_message(cfgdir):
    err = error(cfgdir, {"apps": [app(load_balancer={"strategy": "round_robbin"})]})
    assert str(err) == "apps[0].load_balancer.strategy: unknown value 'round_robbin'; did you mean 'round_robin'?"
    assert err.path == "apps[0].load_balancer.strategy"
    assert err.message == "unknown value 'round_robbin'; did you mean 'round_robin'?"


def test_unknown_key_exact_message(cfgdir):
    err = error(cfgdir, {"apps": [app()], "load_balancer": {"rate_limiting": {"enabled": True, "requests_per_second": 5,
                                                                               "burst": 3}}})
    assert str(err) == "load_balancer.rate_limiting.burst: unknown key 'burst'; did you mean 'burst_size'?"


def test_wrong_type_exact_message(cfgdir):
    err = error(cfgdir, {"apps": [app()], "load_balancer": {"rate_limiting": {"requests_per_second": 5,
                                                                               "burst_size": "lots"}}})
    assert str(err) == "load_balancer.rate_limiting.burst_size: expected a whole number, got a string ('lots')"


def test_two_listeners_on_one_port_exact_message(cfgdir):
    err = error(cfgdir, {"apps": [app()], "load_balancer": [{"port": 8080}, {"port": 8080}]})
    assert str(err) == ("load_balancer[1].port: port 8080 is already used by load_balancer[0]; "
                        "give each listener its own port")


def test_unknown_top_level_key(cfgdir):
    err = error(cfgdir, {"apps": [app()], "load_balancers": {}})
    assert err.path == "load_balancers" and "did you mean 'load_balancer'?" in err.message


@pytest.mark.parametrize("block, bad, suggestion", [
    ({"load_balancer": {"prot": 8080}}, "load_balancer.prot", "port"),
    ({"load_balancer": {"health_check": {"intervall": 5}}}, "load_balancer.health_check.intervall", "interval"),
    ({"load_balancer": {"ssl": {"cert": "x"}}}, "load_balancer.ssl.cert", "cert_file"),
    ({"load_balancer": {"session": {"cookie": "x"}}}, "load_balancer.session.cookie", "cookie_name"),
    ({"load_balancer": {"timeouts": {"conect": 5}}}, "load_balancer.timeouts.conect", "connect"),
    ({"load_balancer": {"retries": {"max_attempt": 5}}}, "load_balancer.retries.max_attempt", "max_attempts"),
    ({"load_balancer": {"circuit_breaker": {"failure_treshold": 5}}},
     "load_balancer.circuit_breaker.failure_treshold", "failure_threshold"),
    ({"load_balancer": {"connection_pool": {"max_conections": 5}}},
     "load_balancer.connection_pool.max_conections", "max_connections"),
    ({"load_balancer": {"monitoring": {"exports": {}}}}, "load_balancer.monitoring.exports", "export"),
    ({"load_balancer": {"alerts": {"rule": []}}}, "load_balancer.alerts.rule", "rules"),
    ({"load_balancer": [{"port": 8080}, {"stratgy": "ip_hash", "port": 8081}]}, "load_balancer[1].stratgy", "strategy"),
])
def test_unknown_keys_in_blocks(cfgdir, block, bad, suggestion):
    err = error(cfgdir, {"apps": [app()], **block})
    assert err.path == bad
    assert err.message.endswith(f"did you mean '{suggestion}'?")


@pytest.mark.parametrize("extra, path", [
    ({"health_check": {"timout": 5}}, "apps[0].health_check.timout"),
    ({"load_balancer": {"hash": "client_ip"}}, "apps[0].load_balancer.hash"),
    ({"monitoring": {"enable": True}}, "apps[0].monitoring.enable"),
    ({"instance": 2}, "apps[0].instance"),
])
def test_unknown_keys_in_app_blocks(cfgdir, extra, path):
    assert error(cfgdir, {"apps": [app(**extra)]}).path == path


def test_unknown_key_without_a_close_match_lists_the_valid_ones(cfgdir):
    err = error(cfgdir, {"apps": [app()], "load_balancer": {"timeouts": {"zzz": 1}}})
    assert err.message == "unknown key 'zzz'; valid keys: connect, read, write, idle"


@pytest.mark.parametrize("lb, path", [
    ({"port": "8080"}, "load_balancer.port"),
    ({"port": 70000}, "load_balancer.port"),
    ({"enabled": "yes"}, "load_balancer.enabled"),
    ({"retries": {"max_attempts": 0}}, "load_balancer.retries.max_attempts"),
    ({"retries": {"backoff_factor": "x"}}, "load_balancer.retries.backoff_factor"),
    ({"timeouts": {"read": "soon"}}, "load_balancer.timeouts.read"),
    ({"type": "udp"}, "load_balancer.type"),
    ({"host": "example.com"}, "load_balancer.host"),
    ({"hash_key": "body"}, "load_balancer.hash_key"),
    ({"geo": {"10.0.0.0/33": "eu"}}, "load_balancer.geo.10.0.0.0/33"),
    ({"trusted_proxies": ["nope"]}, "load_balancer.trusted_proxies[0]"),
    ({"region_header": "X-Region"}, "load_balancer.region_header"),
    ({"rate_limiting": {"enabled": True}}, "load_balancer.rate_limiting"),
    ({"rate_limiting": {"burst_size": 5, "per_ip_limit": 1}}, "load_balancer.rate_limiting.burst_size"),
    ({"ca_file": "ca.pem"}, "load_balancer.ca_file"),
    ({"limits": {"max_body_size": "big"}}, "load_balancer.limits.max_body_size"),
    ({"backend_ports": []}, "load_balancer.backend_ports"),
    ({"backend_ports": ["nohost"]}, "load_balancer.backend_ports[0]"),
    ({"backend_ports": [3000, 3000]}, "load_balancer.backend_ports[1]"),
])
def test_invalid_listener_values_name_their_path(cfgdir, lb, path):
    assert error(cfgdir, {"apps": [app()], "load_balancer": lb}).path == path


@pytest.mark.parametrize("extra, path", [
    ({"instances": "many"}, "apps[0].instances"),
    ({"exec_mode": "cluster_mode"}, "apps[0].exec_mode"),
    ({"weight": 0}, "apps[0].weight"),
    ({"max_memory_restart": "lots"}, "apps[0].max_memory_restart"),
    ({"env": {"PORT": 3000, "NESTED": {"a": 1}}}, "apps[0].env.NESTED"),
    ({"kill_timeout": "forever"}, "apps[0].kill_timeout"),
    ({"health_check": {"url": "localhost/health"}}, "apps[0].health_check.url"),
    ({"health_check": {"failure_threshold": 0}}, "apps[0].health_check.failure_threshold"),
    ({"load_balancer": {"metrics": {"latency": 1}}}, "apps[0].load_balancer.metrics.latency"),
    ({"cwd": "no-such-dir"}, "apps[0].cwd"),
])
def test_invalid_app_values_name_their_path(cfgdir, extra, path):
    assert error(cfgdir, {"apps": [app(**extra)]}).path == path


def test_exec_mode_typo_is_suggested(cfgdir):
    assert error(cfgdir, {"apps": [app(exec_mode="clustr")]}).message.endswith("did you mean 'cluster'?")


def test_duplicate_app_names(cfgdir):
    err = error(cfgdir, {"apps": [app(), app(port=4000)]})
    assert err.path == "apps[1].name" and "apps[0]" in err.message


def test_overlapping_instance_ports(cfgdir):
    err = error(cfgdir, {"apps": [app(instances=3), app(name="api", port=3002)]})
    assert err.path == "apps[1].increment_var" and "web-2" in err.message


# --------------------------------------------------------------------------- files and formats


def test_invalid_json_says_where(cfgdir):
    path = cfgdir / "broken.json"
    path.write_text('{"apps": [\n  {"name": "web",}\n]}')
    with pytest.raises(ConfigError, match="invalid JSON.*line 2"):
        load_config(path)


def test_unsupported_extension(cfgdir):
    path = cfgdir / "pm.yaml"
    path.write_text("apps: []")
    with pytest.raises(ConfigError, match="use a .json or .toml file"):
        load_config(path)


def test_missing_config_file(cfgdir):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(cfgdir / "absent.json")


def test_top_level_must_be_an_object(cfgdir):
    path = cfgdir / "list.json"
    path.write_text("[]")
    with pytest.raises(ConfigError, match="expected an object"):
        load_config(path)


def test_toml_gives_the_same_config_as_json(cfgdir):
    data = {"apps": [app(instances=3, health_check={"interval": "5s", "path": "/health"})],
            "load_balancer": [{"port": 8080, "strategy": "least_connections", "timeouts": {"connect": "250ms"}},
                              {"port": 8081, "type": "tcp", "backend_ports": [3000, "127.0.0.1:9000"]}]}
    toml = """
[[apps]]
name = "web"
script = "server.py"
instances = 3
exec_mode = "cluster"
increment_var = "PORT"
env = { PORT = 3000 }
health_check = { interval = "5s", path = "/health" }

[[load_balancer]]
port = 8080
strategy = "least_connections"
timeouts = { connect = "250ms" }

[[load_balancer]]
port = 8081
type = "tcp"
backend_ports = [3000, "127.0.0.1:9000"]
"""
    (cfgdir / "pm.toml").write_text(toml)
    from_toml = load_config(cfgdir / "pm.toml")
    from_json = load_config(write(cfgdir, data))
    assert from_toml.apps == from_json.apps
    assert from_toml.listeners == from_json.listeners
    assert from_toml.listeners[0].timeouts.connect == 0.25


def test_invalid_toml(cfgdir):
    (cfgdir / "bad.toml").write_text("[apps\nname=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(cfgdir / "bad.toml")


# --------------------------------------------------------------------------- apps and instances


def test_app_defaults(cfgdir):
    cfg = load(cfgdir, {"apps": [{"name": "solo", "script": "server.py"}]})
    solo = cfg.apps[0]
    assert solo.script == str(cfgdir / "server.py")
    assert solo.cwd == str(cfgdir)
    assert solo.interpreter == (sys.executable,)
    assert solo.env["PYTHONUNBUFFERED"] == "1"
    assert (solo.instances, solo.exec_mode, solo.autorestart, solo.max_restarts) == (1, "fork", True, 16)
    assert (solo.min_uptime, solo.kill_timeout, solo.restart_delay) == (1.0, 1.6, 0.0)
    assert solo.max_memory_restart == 512 * 1024 * 1024
    assert cfg.listeners == ()
    assert [s.name for s in solo.instance_specs] == ["solo-0"]
    assert solo.instance_specs[0].argv == (sys.executable, str(cfgdir / "server.py"))


def test_paths_are_relative_to_the_config_file_not_the_working_directory(cfgdir, tmp_path_factory, monkeypatch):
    (cfgdir / "sub").mkdir()
    path = write(cfgdir, {"apps": [{"name": "a", "script": "server.py", "cwd": "sub"}]})
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    loaded = load_config(path).apps[0]
    assert (loaded.script, loaded.cwd) == (str(cfgdir / "server.py"), str(cfgdir / "sub"))


def test_process_timings_take_milliseconds_or_units(cfgdir):
    cfg = load(cfgdir, {"apps": [{"name": "a", "script": "server.py", "min_uptime": 500, "kill_timeout": "3s",
                                  "restart_delay": 250, "exp_backoff_restart_delay": "100ms",
                                  "max_memory_restart": "200K"}]})
    a = cfg.apps[0]
    assert (a.min_uptime, a.kill_timeout, a.restart_delay, a.exp_backoff_restart_delay) == (0.5, 3.0, 0.25, 0.1)
    assert a.max_memory_restart == 200 * 1024


def test_instances_env_and_increment_var(cfgdir):
    cfg = load(cfgdir, {"apps": [app(instances=3, env={"PORT": "4000", "RATIO": 1.5, "DEBUG": True, "N": 7})]})
    specs = cfg.apps[0].instance_specs
    assert [(s.name, s.index, s.port) for s in specs] == [("web-0", 0, 4000), ("web-1", 1, 4001), ("web-2", 2, 4002)]
    assert specs[2].env["PORT"] == "4002"
    assert specs[2].env["PM2_INSTANCE_ID"] == specs[2].env["NODE_APP_INSTANCE"] == "2"
    assert (specs[0].env["RATIO"], specs[0].env["DEBUG"], specs[0].env["N"]) == ("1.5", "true", "7")
    assert cfg.apps[0].base_port == 4000


@pytest.mark.parametrize("env", [{}, {"PORT": "abc"}, {"PORT": None}])
def test_increment_var_needs_a_numeric_base(cfgdir, env):
    err = error(cfgdir, {"apps": [app(env=env)]})
    assert err.path in ("apps[0].increment_var", "apps[0].env.PORT")


def test_increment_var_error_says_how(cfgdir):
    err = error(cfgdir, {"apps": [app(env={"HOST": "x"})]})
    assert err.path == "apps[0].increment_var" and '"PORT": 3000' in err.message


@pytest.mark.parametrize("instances, expected", [
    ("max", CPUS), (0, CPUS), (-1, max(1, CPUS - 1)), (-1000, 1), (3, 3),
])
def test_instances(cfgdir, instances, expected):
    cfg = load(cfgdir, {"apps": [{"name": "a", "script": "server.py", "instances": instances}]})
    assert cfg.apps[0].instances == expected
    assert len(cfg.apps[0].instance_specs) == expected


def test_single_instance_port_comes_from_env_port(cfgdir):
    cfg = load(cfgdir, {"apps": [{"name": "a", "script": "server.py", "env": {"PORT": 3500}}]})
    assert cfg.apps[0].instance_specs[0].port == 3500


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_interpreter_by_extension_js(cfgdir):
    cfg = load(cfgdir, {"apps": [{"name": "a", "script": "server.js"}]})
    assert cfg.apps[0].interpreter == (shutil.which("node"),)
    assert "PYTHONUNBUFFERED" not in cfg.apps[0].env


def test_interpreter_by_extension_sh(cfgdir):
    (cfgdir / "run.sh").write_text("")
    cfg = load(cfgdir, {"apps": [{"name": "a", "script": "run.sh"}]})
    assert cfg.apps[0].interpreter == (shutil.which("bash"),)


def test_missing_interpreter_names_the_app(cfgdir, monkeypatch):
    (cfgdir / "app.rb").write_text("")
    monkeypatch.setenv("PATH", str(cfgdir))  # no ruby here, whatever the machine has installed
    err = error(cfgdir, {"apps": [{"name": "a", "script": "server.py"}, {"name": "rails", "script": "app.rb"}]})
    assert err.path == "apps[1].interpreter"
    assert "'rails'" in err.message and "'ruby'" in err.message


def test_explicit_interpreter_is_resolved_on_path(cfgdir):
    cfg = load(cfgdir, {"apps": [{"name": "a", "script": "server.py", "interpreter": "bash -e"}]})
    assert cfg.apps[0].interpreter == (shutil.which("bash"), "-e")
    assert error(cfgdir, {"apps": [{"name": "a", "script": "server.py",
                                    "interpreter": "no-such-interpreter-42"}]}).path == "apps[0].interpreter"


def test_scripts_without_known_extension_run_directly_if_executable(cfgdir):
    tool = cfgdir / "tool"
    tool.write_text("#!/bin/sh\n")
    assert error(cfgdir, {"apps": [{"name": "a", "script": "tool"}]}).path == "apps[0].script"
    tool.chmod(0o755)
    cfg = load(cfgdir, {"apps": [{"name": "a", "script": "tool", "args": ["--port", 3000]}]})
    assert cfg.apps[0].interpreter == ()
    assert cfg.apps[0].instance_specs[0].argv == (str(tool), "--port", "3000")


def test_missing_script(cfgdir):
    err = error(cfgdir, {"apps": [{"name": "a", "script": "nothere.py"}]})
    assert err.path == "apps[0].script" and str(cfgdir / "nothere.py") in err.message


def test_reserved_and_invalid_app_names(cfgdir):
    assert error(cfgdir, {"apps": [{"name": "all", "script": "server.py"}]}).path == "apps[0].name"
    assert error(cfgdir, {"apps": [{"name": "a b", "script": "server.py"}]}).path == "apps[0].name"
    assert error(cfgdir, {"apps": [{"script": "server.py"}]}).path == "apps[0].name"


def test_aws_alb(cfgdir):
    arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/my-targets/73e2d6bc24d8a067"
    cfg = load(cfgdir, {"apps": [app(aws={"alb": {"target_group_arn": arn, "deregistration_delay": 30}})]})
    assert cfg.apps[0].aws_alb == {"target_group_arn": arn, "health_check_path": "/health",
                                   "deregistration_delay": 30.0}
    err = error(cfgdir, {"apps": [app(aws={"alb": {"target_group_arn": "nope"}})]})
    assert err.path == "apps[0].aws.alb.target_group_arn"


# --------------------------------------------------------------------------- listeners and pools


def test_per_app_blocks_make_one_listener_on_8080(cfgdir):
    cfg = load(cfgdir, {"apps": [app(load_balancer={"strategy": "ip_hash", "hash_key": "header:X-User"}),
                                 app(name="other", port=4000, exec_mode="fork"),
                                 {"name": "worker", "script": "server.py"}]})
    (listener,) = cfg.listeners
    assert (listener.port, listener.type, listener.host, listener.strategy) == (8080, "http", "0.0.0.0", "ip_hash")
    assert listener.hash_key == "header:X-User"
    assert listener.apps == ("web",)
    assert [b.address for b in listener.backends] == ["127.0.0.1:3000", "127.0.0.1:3001"]
    assert listener.backends[0].balancing.hash_key == "header:X-User"


def test_listener_without_ports_or_apps_takes_cluster_apps_and_balanced_apps(cfgdir):
    cfg = load(cfgdir, {"apps": [app(),
                                 app(name="balanced", port=4000, exec_mode="fork", load_balancer={}),
                                 app(name="forked", port=5000, exec_mode="fork")],
                        "load_balancer": {"port": 9000}})
    assert [b.instance for b in cfg.listeners[0].backends] == ["web-0", "web-1", "balanced-0", "balanced-1"]


def test_listener_named_apps(cfgdir):
    cfg = load(cfgdir, {"apps": [app(), app(name="api", port=4000, weight=3, region="eu-west-1")],
                        "load_balancer": {"apps": ["api"]}})
    backends = cfg.listeners[0].backends
    assert [(b.instance, b.app, b.weight, b.region) for b in backends] == [
        ("api-0", "api", 3, "eu-west-1"), ("api-1", "api", 3, "eu-west-1")]
    err = error(cfgdir, {"apps": [app()], "load_balancer": {"apps": ["wbe"]}})
    assert str(err) == "load_balancer.apps[0]: no app named 'wbe'; did you mean 'web'?"


def test_backend_ports_tie_to_instances_and_keep_external_ones(cfgdir):
    cfg = load(cfgdir, {"apps": [app(weight=2, region="us-east-1", health_check={"path": "/ready"})],
                        "load_balancer": {"backend_ports": [3001, 3000, 4000, "127.0.0.1:4001", "[::1]:4002"],
                                          "health_check": {"path": "/ping", "interval": 2}}})
    backends = cfg.listeners[0].backends
    assert [(b.address, b.instance, b.app, b.weight, b.region) for b in backends] == [
        ("127.0.0.1:3001", "web-1", "web", 2, "us-east-1"),
        ("127.0.0.1:3000", "web-0", "web", 2, "us-east-1"),
        ("127.0.0.1:4000", None, None, 1, None),
        ("127.0.0.1:4001", None, None, 1, None),
        ("::1:4002", None, None, 1, None),
    ]
    assert backends[0].health_check.path == "/ready"  # the app's check covers its instances
    assert backends[2].health_check.path == "/ping" and backends[2].health_check.interval == 2.0
    assert cfg.listeners[0].apps == ("web",)


def test_apps_may_be_omitted_with_backend_ports(cfgdir):
    cfg = load(cfgdir, {"load_balancer": {"backend_ports": [3000, "localhost:3001"]}})
    assert cfg.apps == ()
    assert [b.address for b in cfg.listeners[0].backends] == ["127.0.0.1:3000", "127.0.0.1:3001"]


def test_backend_port_of_an_app_outside_the_named_apps(cfgdir):
    err = error(cfgdir, {"apps": [app(), app(name="api", port=4000)],
                         "load_balancer": {"apps": ["api"], "backend_ports": [3000]}})
    assert err.path == "load_balancer.backend_ports[0]" and "web-0" in err.message


def test_listener_without_any_backend(cfgdir):
    err = error(cfgdir, {"apps": [{"name": "a", "script": "server.py"}], "load_balancer": {"port": 8080}})
    assert err.path == "load_balancer" and "backend_ports" in err.message


def test_balanced_app_without_ports(cfgdir):
    err = error(cfgdir, {"apps": [{"name": "a", "script": "server.py", "instances": 2, "load_balancer": {}}]})
    assert err.path == "apps[0].increment_var" and "increment_var" in err.message


def test_apps_of_one_pool_naming_different_strategies(cfgdir):
    err = error(cfgdir, {"apps": [app(load_balancer={"strategy": "ip_hash"}),
                                  app(name="b", port=4000, load_balancer={"strategy": "least_connections"})]})
    assert err.path == "apps[1].load_balancer.strategy"
    assert "'least_connections'" in err.message and "'ip_hash'" in err.message


def test_app_strategy_against_the_listener_strategy(cfgdir):
    err = error(cfgdir, {"apps": [app(load_balancer={"strategy": "ip_hash"})],
                         "load_balancer": {"strategy": "round_robin"}})
    assert err.path == "apps[0].load_balancer.strategy"
    assert "'ip_hash'" in err.message and "'round_robin'" in err.message


def test_app_strategy_applies_to_a_top_level_listener_that_names_none(cfgdir):
    cfg = load(cfgdir, {"apps": [app(load_balancer={"strategy": "weighted_round_robin"})], "load_balancer": {}})
    assert cfg.listeners[0].strategy == "weighted_round_robin"


def test_same_strategy_in_several_apps_is_fine(cfgdir):
    cfg = load(cfgdir, {"apps": [app(weight=3, load_balancer={"strategy": "weighted_round_robin"}),
                                 app(name="b", port=4000, load_balancer={"strategy": "weighted_round_robin"})]})
    assert cfg.listeners[0].strategy == "weighted_round_robin"
    assert [b.weight for b in cfg.listeners[0].backends] == [3, 3, 1, 1]


def test_connection_tracking_off_with_least_connections(cfgdir):
    err = error(cfgdir, {"apps": [app(load_balancer={"strategy": "least_connections", "connection_tracking": False})]})
    assert err.path == "apps[0].load_balancer.connection_tracking"
    load(cfgdir, {"apps": [app(load_balancer={"strategy": "round_robin", "connection_tracking": False})]})


def test_disabled_listener(cfgdir):
    cfg = load(cfgdir, {"apps": [app(load_balancer={})], "load_balancer": {"enabled": False}})
    assert cfg.listeners == ()
    cfg = load(cfgdir, {"apps": [app()], "load_balancer": [{"enabled": False, "port": 8080}, {"port": 8081}]})
    assert [(listener.index, listener.port) for listener in cfg.listeners] == [(1, 8081)]


def test_listener_list_defaults(cfgdir):
    cfg = load(cfgdir, {"apps": [app()], "load_balancer": [{"port": 8080}, {"port": 8081, "host": "127.0.0.1"}]})
    first, second = cfg.listeners
    assert (first.index, second.index, second.host) == (0, 1, "127.0.0.1")
    assert first.timeouts.connect == 5.0 and first.timeouts.idle == 60.0
    assert (first.retries.max_attempts, first.retries.retry_delay, first.retries.backoff_factor) == (3, 0.0, 2.0)
    assert first.ssl.protocols == ("TLSv1.2", "TLSv1.3")
    assert first.limits.max_header_size == 32 * 1024 and first.limits.header_timeout == 10.0
    assert first.backend_protocol == "http"


def test_listener_port_clashing_with_an_instance(cfgdir):
    err = error(cfgdir, {"apps": [app()], "load_balancer": {"port": 3001}})
    assert err.path == "load_balancer.port" and "web-1" in err.message


def test_time_fields_use_the_decided_units(cfgdir):
    cfg = load(cfgdir, {"apps": [app(health_check={"interval": 30, "timeout": "500ms"},
                                     load_balancer={"strategy": "health_aware_round_robin",
                                                    "quarantine_duration": 300, "update_interval": "2m"})],
                        "load_balancer": {
                            "timeouts": {"connect": 5000, "read": "30s", "write": 1500, "idle": "1m"},
                            "retries": {"retry_delay": 1000},
                            "circuit_breaker": {"recovery_timeout": 30000},
                            "session": {"timeout": 3600},
                            "connection_pool": {"idle_timeout": 300}}})
    listener = cfg.listeners[0]
    assert (listener.timeouts.connect, listener.timeouts.read, listener.timeouts.write, listener.timeouts.idle) == \
        (5.0, 30.0, 1.5, 60.0)
    assert listener.retries.retry_delay == 1.0
    assert listener.circuit_breaker.recovery_timeout == 30.0
    assert listener.session.timeout == 3600.0
    assert listener.connection_pool.idle_timeout == 300.0
    assert listener.quarantine_duration == 300.0 and listener.update_interval == 120.0
    check = listener.backends[0].health_check
    assert (check.interval, check.timeout) == (30.0, 0.5)


def test_policy_blocks(cfgdir):
    cfg = load(cfgdir, {"apps": [app()], "load_balancer": {
        "rate_limiting": {"enabled": True, "requests_per_second": 100, "burst_size": 20, "per_ip_limit": 10},
        "circuit_breaker": {"enabled": True, "failure_threshold": 5, "half_open_requests": 2},
        "connection_pool": {"max_connections": 10, "keep_alive": False},
        "limits": {"max_body_size": "1M"}}})
    listener = cfg.listeners[0]
    assert (listener.rate_limiting.enabled, listener.rate_limiting.requests_per_second,
            listener.rate_limiting.burst_size, listener.rate_limiting.per_ip_limit) == (True, 100.0, 20, 10.0)
    assert (listener.circuit_breaker.enabled, listener.circuit_breaker.half_open_requests) == (True, 2)
    assert (listener.connection_pool.max_connections, listener.connection_pool.keep_alive) == (10, False)
    assert listener.limits.max_body_size == 1024 * 1024


def test_rate_limiting_burst_defaults_to_one_second_of_rate(cfgdir):
    cfg = load(cfgdir, {"apps": [app()], "load_balancer": {"rate_limiting": {"requests_per_second": 7.5}}})
    assert cfg.listeners[0].rate_limiting.enabled and cfg.listeners[0].rate_limiting.burst_size == 8


def test_performance_based_gets_default_weights(cfgdir):
    cfg = load(cfgdir, {"apps": [app(load_balancer={"strategy": "performance_based"})]})
    assert cfg.listeners[0].metrics_weights == {"response_time": 0.4, "cpu_usage": 0.3, "memory_usage": 0.2,
                                                "error_rate": 0.1}
    cfg = load(cfgdir, {"apps": [app(load_balancer={"strategy": "performance_based",
                                                    "metrics": {"response_time": 1}})]})
    assert cfg.listeners[0].metrics_weights == {"response_time": 1.0}


def test_geographic(cfgdir):
    cfg = load(cfgdir, {"apps": [
        app(region="us-east-1", load_balancer={"strategy": "geographic", "primary_region": True,
                                               "fallback_regions": ["us-west-1"]}),
        app(name="west", port=4000, region="us-west-1", load_balancer={"strategy": "geographic"})],
        "load_balancer": {"geo": {"10.1.0.0/16": "us-east-1"}, "trusted_proxies": ["127.0.0.1"],
                          "region_header": "X-Region"}})
    listener = cfg.listeners[0]
    assert listener.strategy == "geographic" and listener.geo == {"10.1.0.0/16": "us-east-1"}
    assert listener.trusted_proxies == ("127.0.0.1/32",) and listener.region_header == "X-Region"
    assert listener.backends[0].balancing.primary_region
    assert listener.backends[0].balancing.fallback_regions == ("us-west-1",)
    err = error(cfgdir, {"apps": [app(load_balancer={"strategy": "geographic"})]})
    assert "region" in err.message
    err = error(cfgdir, {"apps": [app(region="a", load_balancer={"strategy": "geographic", "primary_region": True}),
                                  app(name="b", port=4000, region="b",
                                      load_balancer={"strategy": "geographic", "primary_region": True})]})
    assert err.path == "apps[1].load_balancer.primary_region"


def test_tcp_listener_rejects_http_only_features(cfgdir):
    assert error(cfgdir, {"apps": [app()], "load_balancer": {"type": "tcp", "strategy": "sticky_sessions"}}).path \
        == "load_balancer.strategy"
    assert error(cfgdir, {"apps": [app()], "load_balancer": {"type": "tcp", "hash_key": "header:X"}}).path \
        == "load_balancer.hash_key"
    assert error(cfgdir, {"apps": [app()], "load_balancer": {"type": "tcp", "health_check": {"path": "/x"}}}).path \
        == "load_balancer.health_check.path"


# --------------------------------------------------------------------------- health checks


def test_effective_health_checks(cfgdir):
    cfg = load(cfgdir, {"apps": [
        app(name="own", health_check={"url": "http://localhost:{{PORT}}/health", "interval": 1}),
        app(name="flagged", port=4000, load_balancer={"health_check": True}),
        app(name="plain", port=5000),
        app(name="off", port=6000, health_check={"enabled": False}),
        app(name="optout", port=7000, health_check={"path": "/x"}, load_balancer={"health_check": False})],
        "load_balancer": {"health_check": {"path": "/lb", "interval": 3}}})
    checks = {b.instance: b.health_check for b in cfg.listeners[0].backends}
    assert checks["own-0"].url == "http://localhost:{{PORT}}/health" and checks["own-0"].interval == 1.0
    assert checks["flagged-0"] == HealthCheckConfig()
    assert checks["plain-0"].path == "/lb" and checks["plain-0"].interval == 3.0
    assert checks["off-0"] is None
    assert checks["optout-0"] is None
    assert cfg.listeners[0].health_check.path == "/lb"


def test_without_any_check_backends_have_none(cfgdir):
    cfg = load(cfgdir, {"apps": [app()], "load_balancer": {}})
    assert all(b.health_check is None for b in cfg.listeners[0].backends)
    assert cfg.listeners[0].health_check is None


def test_health_check_options(cfgdir):
    cfg = load(cfgdir, {"apps": [app(health_check={"retries": 2, "failure_threshold": 4, "success_threshold": 2,
                                                   "restart_unhealthy": True})]})
    check = cfg.apps[0].health_check
    assert (check.retries, check.failure_threshold, check.success_threshold, check.restart_unhealthy) == (2, 4, 2, True)


def test_tcp_listeners_check_by_connecting(cfgdir):
    cfg = load(cfgdir, {"apps": [app(name="own", health_check={"interval": 2}),
                                 app(name="flagged", port=4000, load_balancer={"health_check": True})],
                        "load_balancer": {"type": "tcp", "backend_ports": [3000, 4000, 9000], "health_check": {}}})
    kinds = [(b.address, b.health_check.kind) for b in cfg.listeners[0].backends]
    assert kinds == [("127.0.0.1:3000", "tcp"), ("127.0.0.1:4000", "tcp"), ("127.0.0.1:9000", "tcp")]
    assert cfg.listeners[0].backends[0].health_check.interval == 2.0


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def certs(cfgdir):
    leaf = trustme.CA().issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(cfgdir / "server.crt"))
    leaf.private_key_pem.write_to_path(str(cfgdir / "server.key"))
    os.chmod(cfgdir / "server.key", 0o600)
    return cfgdir


def tls_listener(**ssl):
    return {"port": 8443, "backend_ports": [3000],
            "ssl": {"enabled": True, "cert_file": "server.crt", "key_file": "server.key", **ssl}}


def test_tls_listener(certs):
    listener = load(certs, {"load_balancer": tls_listener(protocols=["TLSv1.3"])}).listeners[0]
    assert listener.ssl.enabled and listener.ssl.protocols == ("TLSv1.3",)
    assert listener.ssl.cert_file == str(certs / "server.crt") and listener.ssl.key_file == str(certs / "server.key")


@pytest.mark.parametrize("old", ["TLSv1", "TLSv1.1", "SSLv3"])
def test_old_tls_versions_are_refused_with_the_reason(certs, old):
    err = error(certs, {"load_balancer": tls_listener(protocols=["TLSv1.2", old])})
    assert err.path == "load_balancer.ssl.protocols[1]" and "insecure" in err.message


def test_unknown_tls_version(certs):
    err = error(certs, {"load_balancer": tls_listener(protocols=["TLSv1.4"])})
    assert "did you mean" in err.message


def test_missing_certificate(certs):
    err = error(certs, {"load_balancer": tls_listener(cert_file="absent.crt")})
    assert err.path == "load_balancer.ssl.cert_file" and "absent.crt" in err.message
    data = tls_listener()
    del data["ssl"]["key_file"]
    assert error(certs, {"load_balancer": data}).path == "load_balancer.ssl.key_file"


def test_key_readable_by_others_is_refused(certs):
    os.chmod(certs / "server.key", 0o644)
    err = error(certs, {"load_balancer": tls_listener()})
    assert err.path == "load_balancer.ssl.key_file" and "chmod 600" in err.message


def test_certificate_and_key_must_belong_together(certs):
    other = trustme.CA().issue_cert("localhost")
    other.private_key_pem.write_to_path(str(certs / "other.key"))
    os.chmod(certs / "other.key", 0o600)
    assert error(certs, {"load_balancer": tls_listener(key_file="other.key")}).path == "load_balancer.ssl.cert_file"


def test_disabled_ssl_does_not_need_files(cfgdir):
    listener = load(cfgdir, {"load_balancer": {"backend_ports": [3000],
                                               "ssl": {"enabled": False, "cert_file": "absent.crt"}}}).listeners[0]
    assert not listener.ssl.enabled


def test_backend_https_options(certs):
    listener = load(certs, {"load_balancer": {"backend_ports": [3000], "backend_protocol": "https",
                                              "verify": True, "ca_file": "server.crt"}}).listeners[0]
    assert listener.backend_protocol == "https" and listener.backend_tls.ca_file == str(certs / "server.crt")
    assert error(certs, {"load_balancer": {"backend_ports": [3000], "verify": False}}).path == "load_balancer.verify"


# --------------------------------------------------------------------------- monitoring and alerts


def test_monitoring_export_defaults_and_overrides(cfgdir):
    cfg = load(cfgdir, {"apps": [app(monitoring={"enabled": True, "metrics_collection": True})], "load_balancer": [
        {"port": 8080, "monitoring": {"enabled": True, "metrics": {"response_times": False},
                                      "export": {"prometheus": True, "statsd": True}}},
        {"port": 8081, "monitoring": {"export": {"prometheus": {"port": 9700, "path": "/m"},
                                                 "statsd": {"host": "127.0.0.2", "prefix": "lb."}}}}]})
    first, second = (listener.monitoring for listener in cfg.listeners)
    assert first.prometheus == Endpoint("127.0.0.1", 9615, "/metrics")
    assert first.statsd == Endpoint("127.0.0.1", 8125, "pmdaemon.")
    assert first.metrics["response_times"] is False and first.metrics["requests_per_second"] is True
    assert second.prometheus == Endpoint("127.0.0.1", 9700, "/m")
    assert second.statsd == Endpoint("127.0.0.2", 8125, "lb.")
    assert cfg.apps[0].monitoring_enabled and cfg.apps[0].metrics_collection


def test_unknown_monitoring_switch(cfgdir):
    err = error(cfgdir, {"apps": [app()], "load_balancer": {"monitoring": {"metrics": {"response_time": True}}}})
    assert err.path == "load_balancer.monitoring.metrics.response_time"
    assert err.message.endswith("did you mean 'response_times'?")


def alerts(*rules, **extra):
    return {"apps": [app()], "load_balancer": {"alerts": {"enabled": True, "rules": list(rules), **extra}}}


WEBHOOK = {"name": "high_error_rate", "condition": "error_rate > 5%", "duration": "5m", "action": "webhook",
           "url": "http://127.0.0.1:9999/alert"}
EMAIL = {"name": "backend_down", "condition": "healthy_backends < 2", "duration": "1m", "action": "email",
         "recipients": ["admin@example.com"]}


def test_alert_rules(cfgdir):
    cfg = load(cfgdir, alerts(WEBHOOK, EMAIL, smtp={"host": "127.0.0.1", "port": 2525, "from": "lb@localhost",
                                                    "username": "lb", "password_env": "SMTP_PASSWORD"}))
    config = cfg.listeners[0].alerts
    webhook, email = config.rules
    assert (webhook.metric, webhook.op, webhook.threshold, webhook.duration) == ("error_rate", ">", 5.0, 300.0)
    assert webhook.url == "http://127.0.0.1:9999/alert"
    assert (email.metric, email.threshold, email.duration, email.recipients) == \
        ("healthy_backends", 2.0, 60.0, ("admin@example.com",))
    assert (config.smtp.host, config.smtp.port, config.smtp.sender, config.smtp.password_env) == \
        ("127.0.0.1", 2525, "lb@localhost", "SMTP_PASSWORD")


def test_bad_condition_path(cfgdir):
    err = error(cfgdir, alerts({**WEBHOOK, "condition": "p95_response_time > 200"}))
    assert err.path == "load_balancer.alerts.rules[0].condition" and "200ms" in err.message


@pytest.mark.parametrize("rule, path", [
    ({**WEBHOOK, "url": None}, "load_balancer.alerts.rules[0].url"),
    ({k: v for k, v in WEBHOOK.items() if k != "url"}, "load_balancer.alerts.rules[0].url"),
    ({k: v for k, v in EMAIL.items() if k != "recipients"}, "load_balancer.alerts.rules[0].recipients"),
    ({**EMAIL, "action": "sms"}, "load_balancer.alerts.rules[0].action"),
    ({**EMAIL, "duration": "soon"}, "load_balancer.alerts.rules[0].duration"),
    ({**EMAIL, "recipients": ["nobody"]}, "load_balancer.alerts.rules[0].recipients[0]"),
])
def test_bad_alert_rules(cfgdir, rule, path):
    assert error(cfgdir, alerts(rule)).path == path


def test_smtp_password_is_refused(cfgdir):
    err = error(cfgdir, alerts(EMAIL, smtp={"host": "localhost", "password": "hunter2"}))
    assert err.path == "load_balancer.alerts.smtp.password" and "password_env" in err.message
    assert error(cfgdir, alerts(EMAIL, smtp={"password_env": "not a name"})).path == \
        "load_balancer.alerts.smtp.password_env"


# --------------------------------------------------------------------------- effective config


def test_effective_config_fills_defaults_with_units(cfgdir):
    cfg = load(cfgdir, {"apps": [app(env={"PORT": 3000, "API_TOKEN": "s3cret"})],
                        "load_balancer": {"alerts": {"rules": [EMAIL], "smtp": {"password_env": "SMTP_PASSWORD"}}}})
    view = effective_config(cfg)
    text = json.dumps(view)
    assert "s3cret" not in text
    listener = view["load_balancer"][0]
    assert listener["timeouts"] == {"connect": "5000ms", "read": "30000ms", "write": "30000ms", "idle": "60000ms"}
    assert listener["retries"] == {"max_attempts": 3, "retry_delay": "0ms", "backoff_factor": 2.0}
    assert listener["session"] == {"cookie_name": "PMDAEMON_SESSION", "header_name": "X-Session-ID", "timeout": "3600s"}
    assert listener["circuit_breaker"]["recovery_timeout"] == "30000ms"
    assert listener["connection_pool"] == {"enabled": True, "max_connections": 1000, "idle_timeout": "300s",
                                           "keep_alive": True}
    assert listener["limits"] == {"max_body_size": None, "max_header_size": "32K", "header_timeout": "10s"}
    assert listener["ssl"]["protocols"] == ["TLSv1.2", "TLSv1.3"]
    assert (listener["port"], listener["strategy"], listener["backend_protocol"]) == (8080, "round_robin", "http")
    assert listener["backends"][0] == {"address": "127.0.0.1:3000", "instance": "web-0", "app": "web", "weight": 1,
                                       "region": None, "health_check": None}
    assert listener["alerts"]["rules"][0]["duration"] == "60s"
    assert listener["alerts"]["smtp"]["password_env"] == "SMTP_PASSWORD"
    web = view["apps"][0]
    assert (web["min_uptime"], web["kill_timeout"], web["max_memory_restart"]) == ("1000ms", "1600ms", "512M")
    assert web["env"]["API_TOKEN"] == "***" and web["env"]["PORT"] == "3000"
    assert web["processes"] == [{"name": "web-0", "port": 3000}, {"name": "web-1", "port": 3001}]


def test_effective_config_durations_reparse_to_the_same_values(cfgdir):
    cfg = load(cfgdir, {"apps": [app()], "load_balancer": {"timeouts": {"connect": "250ms"},
                                                           "session": {"timeout": "90m"}}})
    listener = effective_config(cfg)["load_balancer"][0]
    assert units.parse_duration(listener["timeouts"]["connect"], "ms") == 0.25
    assert units.parse_duration(listener["session"]["timeout"], "s") == 5400.0


def test_health_check_may_be_a_boolean(cfgdir):
    cfg = load(cfgdir, {"apps": [app(health_check=True), app(name="b", port=4000, health_check=False)],
                        "load_balancer": {"health_check": True}})
    checks = {b.instance: b.health_check for b in cfg.listeners[0].backends}
    assert checks["web-0"] == HealthCheckConfig() and checks["b-0"] is None
    assert cfg.listeners[0].health_check == HealthCheckConfig()


def test_an_empty_config_is_an_error(cfgdir):
    assert error(cfgdir, {}).path == "apps"


def test_per_app_options_stay_per_app_and_agreeing_ones_reach_the_listener(cfgdir):
    cfg = load(cfgdir, {"apps": [
        app(load_balancer={"strategy": "health_aware_round_robin", "quarantine_duration": 30, "update_interval": 5}),
        app(name="b", port=4000, load_balancer={"quarantine_duration": 60, "update_interval": 5})]})
    listener = cfg.listeners[0]
    assert listener.strategy == "health_aware_round_robin"
    assert listener.update_interval == 5.0  # every app that says, says 5 s
    assert listener.quarantine_duration == 0.0  # they differ: each app keeps its own
    assert [b.balancing.quarantine_duration for b in listener.backends] == [30.0, 30.0, 60.0, 60.0]
