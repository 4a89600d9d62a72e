"""Benchmark: the daemon's memory with 10,000 idle keep-alive client connections (bar: ≤ 100 MB RSS).

    python3 bench/idle_conns.py [--connections 10000] [--batch 500] [--config bench/anchors-http.json]

Starts 4 nginx backends shaped like anchors.sh's (127.0.0.1:3000-3003, 200 "ok"), then
`pmdaemon start <config> --no-daemon` (fresh PMDAEMON_HOME; listener 127.0.0.1:8080). Opens the
connections in batches; each sends one GET, reads the whole response and then stays open, idle.
Reports the daemon's RSS (psutil) before and with all of them open, its peak (VmHWM), its open
file descriptors, and checks that the idle connections still work by sending a second request on a
sample of them. Must finish well within the listener's keep-alive idle timeout (60 s default).
RLIMIT_NOFILE's soft limit is raised to the hard one (inherited by the daemon). Everything it
started is stopped by PID.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BACKEND_PORTS = (3000, 3001, 3002, 3003)
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: idle-conns\r\n\r\n"
MB = 2**20


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode} before port {port} opened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def port_in_use(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def start_backends(tmp: Path) -> subprocess.Popen:
    servers = " ".join(f'server {{ listen 127.0.0.1:{p}; location / {{ add_header X-Backend {p}; return 200 "ok"; }} }}'
                       for p in BACKEND_PORTS)
    conf = tmp / "backend.conf"
    conf.write_text(f"worker_processes 1; daemon off; pid {tmp}/nginx.pid;\nevents {{ worker_connections 4096; }}\n"
                    f"http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 75s; {servers} }}\n")
    process = subprocess.Popen(["nginx", "-p", f"{tmp}/", "-e", f"{tmp}/nginx.err", "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
    wait_for_port(BACKEND_PORTS[0], process)
    return process


def response_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def exchange(sockets: list[socket.socket], deadline: float) -> tuple[list[socket.socket], dict[str, int]]:
    """Connect (if needed), send one request on each socket, read each response; returns the sockets
    that got a complete 200 and a count of failures by kind."""
    selector = selectors.DefaultSelector()
    state: dict[socket.socket, bytearray] = {}
    failures: dict[str, int] = {}

    def fail(sock: socket.socket, kind: str) -> None:
        failures[kind] = failures.get(kind, 0) + 1
        selector.unregister(sock)
        del state[sock]
        sock.close()

    for sock in sockets:
        state[sock] = bytearray()
        selector.register(sock, selectors.EVENT_WRITE)
    ok = []
    while state and time.monotonic() < deadline:
        for key, events in selector.select(timeout=0.5):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    fail(sock, os.strerror(error))
                    continue
                try:
                    sock.send(REQUEST)  # tiny: goes out whole on a fresh socket
                except OSError as err:
                    fail(sock, type(err).__name__)
                    continue
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                chunk = sock.recv(65536)
            except OSError as err:
                fail(sock, type(err).__name__)
                continue
            if not chunk:
                fail(sock, "closed by the balancer")
                continue
            state[sock] += chunk
            if response_complete(state[sock]):
                status = bytes(state[sock][9:12])
                selector.unregister(sock)
                del state[sock]
                if status == b"200":
                    ok.append(sock)
                else:
                    failures[f"status {status.decode()}"] = failures.get(f"status {status.decode()}", 0) + 1
                    sock.close()
    for sock in list(state):
        fail(sock, "timeout")
    selector.close()
    return ok, failures


def connect_batch(port: int, count: int) -> tuple[list[socket.socket], dict[str, int]]:
    sockets, failures = [], {}
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, 115):  # EINPROGRESS
            failures[os.strerror(err)] = failures.get(os.strerror(err), 0) + 1
            sock.close()
            continue
        sockets.append(sock)
    return sockets, failures


def merge(into: dict[str, int], more: dict[str, int]) -> None:
    for kind, n in more.items():
        into[kind] = into.get(kind, 0) + n


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--config", default=str(ROOT / "bench" / "anchors-http.json"))
    parser.add_argument("--sample", type=int, default=200, help="idle connections re-used at the end")
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = json.loads(Path(options.config).read_text())["load_balancer"]["port"]
    for p in (*BACKEND_PORTS, port):
        if port_in_use(p):
            raise SystemExit(f"port {p} is in use - stop that first")
    tmp = Path(tempfile.mkdtemp(prefix="pmdaemon-idle-"))
    backends = daemon = None
    open_sockets: list[socket.socket] = []
    try:
        backends = start_backends(tmp)
        env = dict(os.environ, PMDAEMON_HOME=str(tmp / "home"))
        daemon = subprocess.Popen([sys.executable, "-m", "pmdaemon", "start", options.config, "--no-daemon"], env=env,
                                  stdout=open(tmp / "daemon.log", "w"), stderr=subprocess.STDOUT, process_group=0)
        wait_for_port(port, daemon)
        process = psutil.Process(daemon.pid)
        warm, failures = exchange(connect_batch(port, 16)[0], time.monotonic() + 10)
        for sock in warm:
            sock.close()
        time.sleep(1.0)
        rss_before, fds_before = process.memory_info().rss, process.num_fds()
        failures = {}
        started = time.monotonic()
        while len(open_sockets) + sum(failures.values()) < options.connections:
            count = min(options.batch, options.connections - len(open_sockets) - sum(failures.values()))
            batch, connect_failures = connect_batch(port, count)
            merge(failures, connect_failures)
            ok, batch_failures = exchange(batch, time.monotonic() + 15)
            merge(failures, batch_failures)
            open_sockets += ok
        opened_in = time.monotonic() - started
        time.sleep(2.0)
        rss_after, fds_after = process.memory_info().rss, process.num_fds()
        peak = next((int(line.split()[1]) * 1024 for line in open(f"/proc/{daemon.pid}/status")
                     if line.startswith("VmHWM:")), 0)
        cpu = process.cpu_times()
        sample = open_sockets[:: max(1, len(open_sockets) // options.sample)][: options.sample]
        reused, reuse_failures = exchange(sample, time.monotonic() + 15)
        held = time.monotonic() - started
        for sock in open_sockets:
            sock.close()
        open_sockets = []
        time.sleep(2.0)
        rss_closed = process.memory_info().rss
        alive = daemon.poll() is None
    finally:
        for sock in open_sockets:
            sock.close()
        for proc in (daemon, backends):
            if proc is not None:
                stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    established = options.connections - sum(failures.values())
    per_conn = (rss_after - rss_before) / max(1, established)
    verdict = "pass" if rss_after <= 100 * MB and established == options.connections else "fail"
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {os.uname().release} nproc={os.cpu_count()} "
          f"RLIMIT_NOFILE {soft}->{hard} config={options.config}")
    print("| idle keep-alive clients | answered + held | failures | daemon fds before → after "
          "| RSS before (MB) | RSS with clients (MB) | per connection (KB) | peak VmHWM (MB) "
          "| RSS after closing (MB) | 2nd request on a sample | bar (≤ 100 MB) |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---|---|")
    print(f"| {options.connections} | {established} (in {opened_in:.1f} s) | {failures or 'none'} "
          f"| {fds_before} → {fds_after} | {rss_before / MB:.1f} | {rss_after / MB:.1f} | {per_conn / 1024:.1f} "
          f"| {peak / MB:.1f} | {rss_closed / MB:.1f} | {len(reused)}/{len(sample)} ok after {held:.0f} s"
          f"{' ' + str(reuse_failures) if reuse_failures else ''} | {verdict} |")
    print(f"daemon CPU during the test: user {cpu.user:.2f} s, system {cpu.system:.2f} s; "
          f"daemon {'still running' if alive else 'EXITED'} at the end")
    sys.exit(0 if verdict == "pass" else 1)


if __name__ == "__main__":
    main()
