"""Run the TCP data plane alone (no actors) for benchmarks: IOLoop + one round-robin `type: "tcp"` listener.

    TCP_BACKENDS=127.0.0.1:5000,127.0.0.1:5001,127.0.0.1:5002 LB_TCP_PORT=5200 python3 bench/ioloop_tcp.py

Usable as LB_TCP_CMD for /work/shared/bench/anchors.sh, directly under redis-benchmark / py-spy, or by
bench/tcp_redis_ratio.py.
"""
from __future__ import annotations

import os
import signal
import threading

from net.config import BackendConfig, ListenerConfig
from net.loop import IOLoop
from net.snapshot import UP, BackendView, PoolSnapshot


def main() -> None:
    addresses = [a.rsplit(":", 1) for a in os.environ["TCP_BACKENDS"].split(",")]
    backends = tuple(BackendConfig(host, int(port)) for host, port in addresses)
    loop = IOLoop(lambda report: None)
    loop.add_listener(ListenerConfig(index=0, host="127.0.0.1", port=int(os.environ.get("LB_TCP_PORT", "5200")),
                                     type="tcp", strategy=os.environ.get("STRATEGY", "round_robin"),
                                     backends=backends))
    loop.publish(PoolSnapshot(0, 1, tuple(BackendView(i, b.host, b.port, None, 1, UP)
                                          for i, b in enumerate(backends))))
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    thread = threading.Thread(target=loop.run)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)


if __name__ == "__main__":
    main()
