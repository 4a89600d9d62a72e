"""Live processes of a test, for "nothing left behind" checks and last-resort teardown."""
from __future__ import annotations

import os
from pathlib import Path

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Live descendants of `pid` (zombies excluded: they have exited, only their parent must reap them)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def processes_of_home(home: Path) -> list[psutil.Process]:
    """Live processes started for this PMDAEMON_HOME (the CLI passes it on to the daemon and the daemon
    to every instance), whoever their parent is now: catches orphans a crashed daemon left."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE \
                    and process.environ().get("PMDAEMON_HOME") == str(home):
                found.append(process)
        except psutil.Error:
            pass
    return found


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants, by PID (last resort in teardown)."""
    victims = descendants(pid)
    if process_alive(pid):
        victims.insert(0, psutil.Process(pid))
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
