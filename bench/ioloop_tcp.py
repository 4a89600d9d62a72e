"""Run the TCP data plane alone (no actors) for benchmarks: IOLoop + one round-robin `type: "tcp"` listener.

    TCP_BACKENDS=127.0.0.1:5000,127.0.0.1:5001,127.0.0.1:5002 LB_TCP_PORT=5200 python3 bench/ioloop_tcp.py

Usable as LB_TCP_CMD for /work/shared/bench/anchors.sh, directly under redis-benchmark / py-spy, or by
bench/tcp_redis_ratio.py.
"""
from __future__ import annotations

import os

from ioloop_http import serve  # bench/ is on sys.path when this runs as a script


def main() -> None:
    serve("TCP_BACKENDS", "LB_TCP_PORT", "5200", type="tcp", strategy=os.environ.get("STRATEGY", "round_robin"))


if __name__ == "__main__":
    main()
