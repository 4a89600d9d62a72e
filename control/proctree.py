"""The process trees and groups of the supervisor's instances, and the port probe before a spawn.

An instance is a process group led by the process the supervisor spawned, but what it must account
for (memory against `max_memory_restart`, CPU for the scorer and the metrics) and clean up (a stop
leaves nothing behind) is every descendant, including those that left the group. These functions
hold no state of their own: the supervisor keeps each instance's last tree (pid -> `psutil.Process`)
and passes it back, because `cpu_percent` measures between two calls on the same object.

`children_by_parent()` is one pass over /proc; a caller looking at many trees in one go (a sampling
tick) makes it once and passes it to each call.
"""
from __future__ import annotations

import errno
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Iterable

import psutil

Tree = dict[int, psutil.Process]  # pid -> the process, leader first
Children = dict[int, list[psutil.Process]]  # pid -> its child processes


def children_by_parent() -> Children:
    """pid -> its child processes, for every process, from one pass over /proc."""
    children: Children = {}
    for process in psutil.process_iter(["ppid"]):
        children.setdefault(process.info["ppid"], []).append(process)
    return children


def sample_tree(leader: int, previous: Tree, children: Children) -> Tree:
    """The live tree under `leader` (leader first), reusing the psutil objects of `previous` where the
    process is the same one (so their `cpu_percent` keeps measuring); {} when the leader is gone."""
    tree: Tree = {}
    try:
        tree[leader] = previous.get(leader) or psutil.Process(leader)
    except psutil.Error:
        return {}
    pending = [leader]
    while pending:
        for child in children.get(pending.pop(), ()):
            seen = previous.get(child.pid)
            tree[child.pid] = seen if seen == child else child  # == also compares start times: pid reuse
            pending.append(child.pid)
    return tree


def tree_usage(tree: Iterable[psutil.Process]) -> tuple[float, int]:
    """CPU (% of one core, since the last sample of each process) and resident bytes of a tree."""
    cpu, memory = 0.0, 0
    for process in tree:
        try:
            with process.oneshot():
                cpu += process.cpu_percent(None)
                memory += process.memory_info().rss
        except psutil.Error:
            pass
    return cpu, memory


def tree_memory(tree: Iterable[psutil.Process]) -> int:
    """Resident bytes of a tree (no CPU sample taken: that would reset the scorer's measuring window)."""
    memory = 0
    for process in tree:
        try:
            memory += process.memory_info().rss
        except psutil.Error:
            pass
    return memory


def signal_group(pgid: int, signum: int) -> None:
    """Send `signum` to a whole process group; nothing when the group is already empty."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(process: subprocess.Popen, deadline: float) -> bool:
    """Wait for our child `process` to exit until `deadline` (time.monotonic()); whether it did."""
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


def terminate_strays(tree: Iterable[psutil.Process], pgid: int) -> None:
    """SIGTERM the members of a tree that left its process group (the group itself gets a killpg)."""
    for process in tree:
        try:
            if os.getpgid(process.pid) != pgid:
                process.terminate()
        except (OSError, psutil.Error):
            pass


def leftovers(leader: int, last_tree: Tree, children: Children) -> list[psutil.Process]:
    """What is left of an exited leader's instance: the tree last seen, every process still in its
    group, and every descendant of those. The caller kills and reaps them before the next spawn."""
    found = {pid: process for pid, process in last_tree.items() if pid != leader}
    for process in itertools.chain.from_iterable(children.values()):
        try:
            if process.pid != leader and os.getpgid(process.pid) == leader:
                found.setdefault(process.pid, process)
        except OSError:
            pass
    pending = list(found)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child.pid not in found:
                found[child.pid] = child
                pending.append(child.pid)
    return list(found.values())


def reap_adopted_zombies(leaders: set[int], children: Children) -> None:
    """Reap exited orphans of running instances that were re-parented to us (we are their subreaper).

    Only members of a running instance's process group (`leaders` are the group ids): a zombie child
    of any other origin may belong to a `subprocess.Popen` elsewhere in this process, which must reap
    it itself.
    """
    for child in children.get(os.getpid(), ()):
        try:
            if (child.pid not in leaders and child.status() == psutil.STATUS_ZOMBIE
                    and os.getpgid(child.pid) in leaders):
                os.waitpid(child.pid, os.WNOHANG)
        except (OSError, psutil.Error):
            pass


def port_in_use(port: int) -> bool:
    """Is something already accepting connections on 127.0.0.1:port? (a refused connect means free)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) != errno.ECONNREFUSED


def port_in_use_message(port: int, name: str) -> str:
    """Why instance `name` was not started, naming the process that listens on `port` when it can."""
    holder = ""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                holder = f" by pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                break
    except psutil.Error:
        pass
    return f"port {port} is already in use{holder}; {name} not started (free the port, then restart it)"
