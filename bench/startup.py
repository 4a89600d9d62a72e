"""Benchmark: time from `pmdaemon start` to every instance online, and the idle daemon's CPU and RSS.

    python3 bench/startup.py [--counts 1,8,32] [--idle-seconds 10]

For each count N it writes a config with N instances of examples/apps/server.py (ports from
increment_var), runs `pmdaemon start` against a fresh PMDAEMON_HOME, and polls `pmdaemon list --json`
until all N are online. With the largest N it then leaves the daemon idle and samples the daemon
process itself (not its children) for CPU time and RSS. Everything it started is stopped with
`pmdaemon kill` and then, as a fallback, by PID. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "apps" / "server.py"


def pmdaemon(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PMDAEMON_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "pmdaemon", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_config(directory: Path, instances: int, base_port: int) -> Path:
    config = {"apps": [{"name": "bench", "script": str(SERVER), "instances": instances,
                        "exec_mode": "fork", "increment_var": "PORT", "env": {"PORT": base_port}}]}
    path = directory / f"bench-{instances}.json"
    path.write_text(json.dumps(config))
    return path


def daemon_process(home: Path) -> psutil.Process:
    return psutil.Process(int((home / "daemon.pid").read_text().strip()))


def time_to_online(instances: int, base_port: int, idle_seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        config = write_config(Path(tmp), instances, base_port)
        started = time.perf_counter()
        result = pmdaemon(home, "start", str(config))
        if result.returncode != 0:
            raise SystemExit(f"start failed: {result.stderr}")
        deadline = started + 60
        online = 0
        while time.perf_counter() < deadline:
            listed = json.loads(pmdaemon(home, "list", "--json").stdout)
            online = sum(1 for row in listed if row["status"] == "online")
            if online == instances:
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        row = {"instances": instances, "seconds_to_online": round(elapsed, 3), "online": online}
        if idle_seconds:
            daemon = daemon_process(home)
            time.sleep(1.0)  # let start-up work settle before measuring idleness
            before = daemon.cpu_times()
            time.sleep(idle_seconds)
            after = daemon.cpu_times()
            busy = (after.user - before.user) + (after.system - before.system)
            row["idle_cpu_percent"] = round(100 * busy / idle_seconds, 2)
            row["daemon_rss_mb"] = round(daemon.memory_info().rss / 2**20, 1)
        try:
            pid = daemon_process(home).pid
        except (FileNotFoundError, psutil.NoSuchProcess):
            pid = None
        pmdaemon(home, "kill")
        if pid and psutil.pid_exists(pid):
            psutil.Process(pid).kill()
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,8,32")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--base-port", type=int, default=23000)
    options = parser.parse_args()
    counts = [int(c) for c in options.counts.split(",")]
    rows = [time_to_online(n, options.base_port, options.idle_seconds if n == max(counts) else 0)
            for n in counts]
    print("| instances | start → all online (s) | daemon idle CPU (% of a core) | daemon RSS (MB) |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['instances']} | {row['seconds_to_online']} | {row.get('idle_cpu_percent', '')} "
              f"| {row.get('daemon_rss_mb', '')} |")


if __name__ == "__main__":
    main()
