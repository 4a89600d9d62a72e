"""The `aws.alb` block of an app (config/loader.py): what is refused and what reaches the app's config."""
from __future__ import annotations

import pytest

from pmdaemon.config.loader import ConfigError, load_config

from support.configs import alb_app, write_config


def test_config_checks_endpoint_url_and_target_id(tmp_path, app_script):
    arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067"
    for key, value in (("endpoint_url", "localhost:5000"), ("target_id", "my-host")):
        with pytest.raises(ConfigError) as caught:
            load_config(str(write_config(tmp_path, {"apps": [alb_app(app_script, 3000, arn, **{key: value})]})))
        assert caught.value.path == f"apps[0].aws.alb.{key}"
    config = load_config(str(write_config(tmp_path, {"apps": [alb_app(
        app_script, 3000, arn, target_id="i-0123456789abcdef0", endpoint_url="http://127.0.0.1:4566")]})))
    assert config.apps[0].aws_alb["target_id"] == "i-0123456789abcdef0"

