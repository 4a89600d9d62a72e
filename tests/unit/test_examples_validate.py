"""Every example config of examples/ loads: the examples are what users copy first.

The examples run the apps in examples/apps/; where one is missing (it is written separately) an
empty stand-in is put in a temporary copy, since validation only checks that the script exists.
The ssl example needs a certificate, which is made fresh with trustme (a private key is never
committed).
"""
import os
import shutil

import pytest
import trustme

from pmdaemon.config.loader import effective_config, load_config

from support.paths import EXAMPLES

CONFIGS = sorted(EXAMPLES.glob("*.json")) + sorted(EXAMPLES.glob("*.toml"))
APP_SCRIPTS = ("server.py", "server.js", "tcp_echo.py")
PAGE_EXAMPLES = (
    "round-robin", "least-connections", "weighted-round-robin", "ip-hash", "geographic", "health-aware",
    "performance-based", "http-load-balancer", "sticky-sessions", "ssl-termination", "tcp-load-balancer",
    "connection-pooling", "timeouts-retries", "rate-limiting", "circuit-breaker", "monitoring", "alerting",
    "aws-alb",
)


@pytest.fixture(scope="module")
def examples_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(EXAMPLES, root, dirs_exist_ok=True)
    for name in APP_SCRIPTS:
        (root / "apps").mkdir(exist_ok=True)
        script = root / "apps" / name
        if not script.exists():
            script.write_text("")
    certs = root / "certs"
    certs.mkdir(exist_ok=True)
    leaf = trustme.CA().issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(certs / "server.crt"))
    leaf.private_key_pem.write_to_path(str(certs / "server.key"))
    os.chmod(certs / "server.key", 0o600)
    return root


def test_every_page_example_has_a_config():
    assert sorted(PAGE_EXAMPLES) == sorted(p.stem for p in EXAMPLES.glob("*.json"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_loads(examples_copy, config):
    cfg = load_config(examples_copy / config.name)
    assert cfg.apps, "every example runs at least one app"
    assert all(os.path.isfile(app.script) for app in cfg.apps)
    effective_config(cfg)


def test_toml_example_matches_its_json_twin(examples_copy):
    from_json = load_config(examples_copy / "http-load-balancer.json")
    from_toml = load_config(examples_copy / "http-load-balancer.toml")
    assert from_toml.apps == from_json.apps
    assert from_toml.listeners == from_json.listeners
