"""Free TCP ports on 127.0.0.1, picked below the kernel's ephemeral range.

Asking the kernel for a free port (bind to port 0) answers from the ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range); a test that opens thousands of client and backend
connections while an instance restarts can have one of them take that instance's port in between,
and the instance then fails to bind. Ports below the range are never handed out to connections.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_range(count: int) -> int:
    """The first of `count` consecutive ports below the ephemeral range that nobody listens on now."""
    high = _ephemeral_low()
    low = max(1024, high - 20000)
    for _ in range(200):
        base = random.randrange(low, high - count)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found below {high}")


def free_port() -> int:
    """A port below the ephemeral range that nobody listens on now."""
    return free_port_range(1)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
