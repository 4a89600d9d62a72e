"""Building blocks of the `lb export` tests: live pools to render and ways to read the output."""
from __future__ import annotations

from pmdaemon.config.loader import parse_config
from pmdaemon.net.snapshot import BackendView
from pmdaemon.states import BackendState

STREAM_SECTION = "# --- main context"


def live_pools(config, states=(BackendState.UP, BackendState.DRAINING, BackendState.DOWN, BackendState.OPEN),
               weights=None):
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


def server_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("server ")
            and not line.strip().startswith("server {")]


def config_from(tmp_path, data: dict):
    return parse_config(data, str(tmp_path / "pmdaemon.json"))


def external(ports, **listener) -> dict:
    """A listener over external backend ports (no apps needed)."""
    return {"load_balancer": {"port": 8080, "backend_ports": list(ports), **listener}}


EXAMPLES = ["round-robin", "weighted-round-robin", "least-connections", "ip-hash", "sticky-sessions",
            "health-aware", "performance-based", "geographic", "http-load-balancer", "tcp-load-balancer",
            "connection-pooling", "timeouts-retries", "rate-limiting", "circuit-breaker", "monitoring"]

