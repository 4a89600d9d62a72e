"""Quick TCP-mode comparison: redis-benchmark through our TCP listener vs HAProxy `mode tcp`.

    python3 bench/tcp_redis_ratio.py            N=100000 CONNS=50 RUNS=2 PIPELINE=1

Starts three redis-servers, HAProxy (nbthread 1, roundrobin) and bench/ioloop_tcp.py, all on free
loopback ports, then runs `redis-benchmark -t set,get` against redis directly, HAProxy and ours,
interleaved RUNS times, and prints the best requests/s of each and ours/HAProxy. Not pinned and not
waiting for a quiet machine (bench/run.sh over anchors.sh does that): a quick ratio, not an anchor.
Everything started here is killed by PID at the end.
"""
from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("N", "100000"))
CONNS = int(os.environ.get("CONNS", "50"))
RUNS = int(os.environ.get("RUNS", "2"))
PIPELINE = int(os.environ.get("PIPELINE", "1"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after 10 s") from None
            time.sleep(0.05)


def benchmark(port: int) -> dict[str, float]:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set,get", "-n", str(N), "-c", str(CONNS),
                          "-P", str(PIPELINE), "--csv"], capture_output=True, text=True, timeout=600).stdout
    return {row[0]: float(row[1]) for row in csv.reader(io.StringIO(out)) if row and row[0] in ("SET", "GET")}


def main() -> None:
    processes = []
    work = Path(tempfile.mkdtemp(prefix="pmdaemon-tcpbench-"))
    try:
        redis = [free_port() for _ in range(3)]
        for port in redis:
            processes.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                               "--save", "", "--appendonly", "no", "--dir", str(work)],
                                              stdout=subprocess.DEVNULL, process_group=0))
        haproxy_port, ours_port = free_port(), free_port()
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(redis))
        (work / "haproxy.cfg").write_text(
            f"global\n    nbthread 1\n    maxconn 4000\ndefaults\n    mode tcp\n    timeout connect 5s\n"
            f"    timeout client 60s\n    timeout server 60s\nlisten redis\n    bind 127.0.0.1:{haproxy_port}\n"
            f"    balance roundrobin\n{servers}\n")
        processes.append(subprocess.Popen(["haproxy", "-db", "-f", str(work / "haproxy.cfg")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0))
        env = dict(os.environ, TCP_BACKENDS=",".join(f"127.0.0.1:{p}" for p in redis), LB_TCP_PORT=str(ours_port),
                   PYTHONPATH=str(ROOT))
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "ioloop_tcp.py")], env=env,
                                          process_group=0))
        for port in (*redis, haproxy_port, ours_port):
            wait_port(port)
        print(f"redis {redis}, haproxy :{haproxy_port}, ours :{ours_port}", flush=True)
        targets = {"redis-direct": redis[0], "haproxy": haproxy_port, "ours": ours_port}
        best: dict[str, dict[str, float]] = {name: {} for name in targets}
        for _ in range(RUNS):
            for name, port in targets.items():
                for command, rate in benchmark(port).items():
                    best[name][command] = max(best[name].get(command, 0.0), rate)
        print(f"redis-benchmark -n {N} -c {CONNS} -P {PIPELINE}, best of {RUNS} (requests/s)")
        for command in ("SET", "GET"):
            direct, hap, ours = (best[name].get(command, 0.0) for name in targets)
            ratio = ours / hap if hap else float("nan")
            print(f"{command}: direct {direct:,.0f}  haproxy {hap:,.0f}  ours {ours:,.0f}  ours/haproxy {ratio:.2f}")
    finally:
        for process in processes:
            process.kill()
            process.wait(5)


if __name__ == "__main__":
    main()
