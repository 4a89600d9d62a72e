"""A yardstick, not a proxy: the least Python an HTTP keep-alive relay can run per request.

Each read from a client is sent as it is to a pooled connection to the next of the four
anchors.sh backends (round robin), and each read from a backend back to its client. No parsing, no
validation, no deadlines, no retries: it is only correct for clients and backends that send one
whole message per read, as wrk and nginx do here. It measures what the CPython I/O loop itself
costs (epoll, recv, send, a dict lookup) so that the rest of pmdaemon's CPU per request can be put
down to its HTTP work (bench/README.md, "Where the time goes").

    PORT=8095 WORK=0 DEFER=1 taskset -c 0 python3 bench/yardstick_proxy.py

WORK=n adds a dummy loop of n iterations per message (n=600 costs about as much Python as
pmdaemon's request path); DEFER=1 sends a turn's messages after the turn's reads (as net/loop.py
does), DEFER=0 sends each at once. Stops on SIGINT/SIGTERM.
"""
from __future__ import annotations

import itertools
import os
import select
import signal
import socket

BACKENDS = [("127.0.0.1", port) for port in (3000, 3001, 3002, 3003)]


def dummy_work(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


def serve(port: int, work: int, defer: bool) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    sockets: dict[int, socket.socket] = {}
    waiting_client: dict[int, tuple[socket.socket, int]] = {}  # backend fd -> (client, backend index)
    idle: list[list[socket.socket]] = [[] for _ in BACKENDS]
    rotation = itertools.cycle(range(len(BACKENDS)))
    queued: list[tuple[socket.socket, bytes]] = []
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))

    def send(sock: socket.socket, data: bytes) -> None:
        if defer:
            queued.append((sock, data))
            return
        try:
            sock.send(data)
        except OSError:
            pass

    def close(fd: int) -> None:
        sock = sockets.pop(fd)
        epoll.unregister(fd)
        sock.close()

    while not stopping:
        for sock, data in queued:
            try:
                sock.send(data)
            except OSError:
                pass
        queued.clear()
        try:
            events = epoll.poll(0.5)
        except InterruptedError:
            continue
        for fd, _event in events:
            if fd == listener.fileno():
                while True:
                    try:
                        client, _address = listener.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sockets[client.fileno()] = client
                    epoll.register(client.fileno(), select.EPOLLIN)
                continue
            sock = sockets.get(fd)
            if sock is None:
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if fd in waiting_client:  # a backend's response
                client, index = waiting_client.pop(fd)
                if not data:
                    close(fd)
                    continue
                idle[index].append(sock)
                dummy_work(work)
                send(client, data)
            elif not data:
                close(fd)
            else:  # a client's request
                index = next(rotation)
                if idle[index]:
                    backend = idle[index].pop()
                else:
                    backend = socket.create_connection(BACKENDS[index])
                    backend.setblocking(False)
                    backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sockets[backend.fileno()] = backend
                    epoll.register(backend.fileno(), select.EPOLLIN)
                waiting_client[backend.fileno()] = (sock, index)
                dummy_work(work)
                send(backend, data)
    for fd in list(sockets):
        close(fd)
    listener.close()


if __name__ == "__main__":
    serve(int(os.environ.get("PORT", "8095")), int(os.environ.get("WORK", "0")), os.environ.get("DEFER", "1") == "1")
