"""The read-only `lb` queries of the Runtime: `lb status`, `backends`, `health`, `stats`, `traffic`,
`metrics`, `config` and `export`.

This is where internal records become the rows the control socket sends: each query asks the actors
of every listener (`BackendInfo` from the Listener, traffic from the Backend actors, scores from the
Scorer, values from the MetricsActor) and merges the answers into the JSON objects cli.md describes.
Nothing here changes state, so no query takes the Runtime's lock.

`LbQueries` is a part of `Runtime` (control/runtime.py), which provides `config`, `_metrics` (the
MetricsActor, None before the first listener) and `_units()` (the running `ListenerUnit`s).
"""
from __future__ import annotations

from dataclasses import asdict
from datetime import UTC

import pykka

from pmdaemon.control.fanout import ListenerUnit
from pmdaemon.control.rollout import ASK_TIMEOUT
from pmdaemon.states import BackendState


class LbQueries:
    """The Runtime's read-only `lb` commands."""

    def lb_status(self) -> list[dict]:
        rows = []
        rates = self._metrics.proxy().status_rates().get(timeout=ASK_TIMEOUT) if self._metrics else {}
        for unit in self._units():
            backends = self._backend_rows(unit)
            rows.append({
                "port": unit.config.port,
                "host": unit.config.host,
                "type": unit.config.type,
                "strategy": unit.config.strategy,
                "tls": unit.config.ssl.enabled,
                "backends_up": sum(1 for b in backends if b["state"] == BackendState.UP),
                "backends_total": len(backends),
                "active": sum(b["active"] for b in backends),
                "requests_per_second": rates.get(unit.config.index, 0.0),
            })
            if unit.ratelimiter is not None:
                rows[-1]["rate_limiting"] = unit.ratelimiter.proxy().status().get(timeout=ASK_TIMEOUT)
        return rows

    def lb_backends(self) -> list[dict]:
        return [row for unit in self._units() for row in self._backend_rows(unit)]

    def lb_health(self) -> list[dict]:
        rows = []
        for unit in self._units():
            for info in unit.probe.proxy().status().get(timeout=ASK_TIMEOUT):
                rows.append({"listener": unit.config.port, **asdict(info)})
        return rows

    def lb_health_check_test(self) -> list[dict]:
        """Every backend's check, run once now (concurrently); each row says `ok` and, if not, `error`."""
        pending = []
        for unit in self._units():
            for info, future in unit.probe.proxy().check_now().get(timeout=ASK_TIMEOUT):
                row = {"listener": unit.config.port, "backend": info.backend, "instance": info.instance,
                       "check": info.check}
                pending.append((row, future))
        results = []
        for row, future in pending:
            error = future.result()
            results.append({**row, "ok": error is None, "error": error})
        return results

    def lb_config(self) -> dict:
        from pmdaemon.config.loader import effective_config

        if self.config is None:
            raise RuntimeError("no config has been applied yet; start one with `pmdaemon start <config>`")
        return effective_config(self.config)

    def lb_stats(self) -> dict:
        return self._metrics_proxy().stats().get(timeout=ASK_TIMEOUT)

    def lb_traffic(self) -> list[dict]:
        return self._metrics_proxy().traffic().get(timeout=ASK_TIMEOUT)

    def lb_metrics(self, detailed: bool = False) -> str:
        """Prometheus text, the same the /metrics endpoint serves."""
        return self._metrics_proxy().render_prometheus(detailed).get(timeout=ASK_TIMEOUT)

    def lb_metrics_samples(self, detailed: bool = False) -> list[dict]:
        return self._metrics_proxy().samples(detailed).get(timeout=ASK_TIMEOUT)

    def lb_export(self, kind: str) -> str:
        """The listeners and their live pools (each Listener's latest snapshot) as nginx or HAProxy config."""
        from datetime import datetime

        from pmdaemon.control.export import render

        units = self._units()
        if not units or self.config is None:
            raise RuntimeError("no load balancer is running: there is no pool to export "
                               "(add a load_balancer block to the config)")
        pools = {unit.config.index: unit.listener.proxy().snapshot().get(timeout=ASK_TIMEOUT).backends
                 for unit in units}
        return render(kind, [unit.config for unit in units], pools, self.config.source,
                      datetime.now(UTC))

    def _metrics_proxy(self):
        if self._metrics is None:
            raise RuntimeError("no load balancer is running: metrics come from listeners "
                               "(add a load_balancer block to the config)")
        return self._metrics.proxy()

    def _backend_rows(self, unit: ListenerUnit) -> list[dict]:
        infos = unit.listener.proxy().backends().get(timeout=ASK_TIMEOUT)
        stats = pykka.get_all([ref.proxy().stats() for ref in unit.backends], timeout=ASK_TIMEOUT)
        scores = unit.scorer.proxy().scores().get(timeout=ASK_TIMEOUT) if unit.scorer else None
        merged = []
        for i, (info, traffic) in enumerate(zip(infos, stats)):
            merged.append({
                "address": info.address,
                "instance": info.instance,
                "app": info.app,
                # cli.md: a tripped breaker shows as `open`, half-open (trial requests only) included.
                "state": BackendState.OPEN if info.state == BackendState.HALF_OPEN else info.state,
                "weight": info.weight,
                "active": traffic.active,
                "breaker": info.breaker,
                "listener": unit.config.port,
                "process": info.process,
                "healthy": info.healthy,
                "region": info.region,
                "requests": traffic.requests,
                "errors": traffic.errors,
                "error_rate": traffic.error_rate,
                "latency_ewma_ms": (None if traffic.latency_ewma is None
                                    else round(traffic.latency_ewma * 1000, 3)),
                "requests_per_second": traffic.requests_per_second,
            })
            if scores is not None:
                # performance_based: the score the weight is moving to, and what it was computed from.
                merged[-1]["score"] = scores[i].score
                metrics = scores[i].metrics
                merged[-1]["performance"] = None if metrics is None else asdict(metrics)
        return merged
