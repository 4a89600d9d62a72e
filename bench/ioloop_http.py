"""Run the HTTP data plane alone (no actors) for benchmarks: IOLoop + one round-robin listener.

    HTTP_BACKENDS=127.0.0.1:3000,127.0.0.1:3001 LB_PORT=8080 python3 bench/ioloop_http.py

Used as LB_CMD by /work/shared/bench/anchors.sh, or directly under wrk / py-spy.
"""
from __future__ import annotations

import os
import signal
import threading

from pmdaemon.config.model import BackendConfig, ListenerConfig
from pmdaemon.net.loop import IOLoop
from pmdaemon.net.snapshot import BackendView, PoolSnapshot
from pmdaemon.states import BackendState


def serve(backends_variable: str, port_variable: str, default_port: str, **listener_options) -> None:
    """Run one listener on 127.0.0.1:$port_variable over the host:port list in $backends_variable, all
    UP, until SIGTERM or SIGINT. bench/ioloop_tcp.py runs its TCP listener through this too."""
    addresses = [a.rsplit(":", 1) for a in os.environ[backends_variable].split(",")]
    backends = tuple(BackendConfig(host, int(port)) for host, port in addresses)
    loop = IOLoop(lambda report: None)
    loop.add_listener(ListenerConfig(index=0, host="127.0.0.1", port=int(os.environ.get(port_variable, default_port)),
                                     backends=backends, **listener_options))
    loop.publish(PoolSnapshot(0, 1, tuple(BackendView(i, b.host, b.port, None, 1, BackendState.UP)
                                          for i, b in enumerate(backends))))
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    thread = threading.Thread(target=loop.run)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)


def main() -> None:
    serve("HTTP_BACKENDS", "LB_PORT", "8080")


if __name__ == "__main__":
    main()
