"""pmdaemon configs written by tests: JSON files built from dicts."""
from __future__ import annotations

import json
from pathlib import Path


def write_config(directory: Path, data: dict, name: str = "pmdaemon.json") -> Path:
    """Write `data` as a JSON config in `directory` and return its path."""
    path = Path(directory) / name
    path.write_text(json.dumps(data, indent=2))
    return path


def http_app_config(script: Path, name: str, instances: int, base_port: int, **extra) -> dict:
    """One app entry: `instances` copies of `script`, instance i on base_port + i (PORT)."""
    app = {"name": name, "script": str(script), "instances": instances, "increment_var": "PORT",
           "env": {"PORT": base_port}, "min_uptime": 200, "kill_timeout": 1000}
    app.update(extra)
    return app


def alb_app(script, base_port: int, arn: str, instances: int = 1, **alb) -> dict:
    """An HTTP app registered with the AWS target group `arn` (target_id 127.0.0.1 unless given)."""
    return http_app_config(script, "web", instances, base_port, aws={"alb": {
        "target_group_arn": arn, "health_check_path": "/health", "deregistration_delay": 5,
        "target_id": "127.0.0.1", **alb}})

