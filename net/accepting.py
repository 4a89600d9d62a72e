"""Taking waiting connections off a listening socket, shared by every listener type.

A listener's `on_readable` calls `accept_waiting(sock, on_accept)`: at most `ACCEPT_BATCH` accepts
per readiness event, so one busy listener cannot starve the rest of the loop (the socket stays
readable and the loop comes back to it). Nothing is allocated per accept beyond what `accept()`
itself returns; `on_accept` is a bound method the caller builds once per event.
"""
from __future__ import annotations

import socket
from collections.abc import Callable

ACCEPT_BATCH = 64


def accept_waiting(listen_sock: socket.socket, on_accept: Callable[[socket.socket, str], bool | None]) -> None:
    """Accept until the backlog is empty, `ACCEPT_BATCH` connections were taken, or `on_accept(sock,
    client_ip)` returns True (the listener wants no more for now, e.g. at its connection cap).

    Any accept error ends the batch: EAGAIN/EINTR mean nothing is waiting; EMFILE and friends leave
    the client in the kernel's backlog until we can take it."""
    accept = listen_sock.accept
    for _ in range(ACCEPT_BATCH):
        try:
            sock, addr = accept()
        except OSError:  # BlockingIOError and InterruptedError included
            return
        if on_accept(sock, addr[0]):
            return
