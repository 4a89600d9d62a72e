"""Example TCP backend: echoes every byte back; the line "WHO" is answered with the server's port.

Environment: PORT (default 4000), HOST (default 127.0.0.1).
- Bytes are echoed as they arrive, except a line that is exactly "WHO\\n", which is answered with
  "<port>\\n" (so a test can tell which backend a TCP balancer picked).
- Half-close: when the client shuts down its sending side, the server sends what it still owes,
  then closes the connection.
One thread, one selectors loop, non-blocking sockets; stdlib only.
"""
from __future__ import annotations

import os
import selectors
import socket

PORT = int(os.environ.get("PORT", "4000"))
HOST = os.environ.get("HOST", "127.0.0.1")
WHO = b"WHO\n"
MAX_PENDING = 1 << 20  # stop reading from a client that does not read its echo


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.held = b""  # a possible start of "WHO\n" at a line start, not echoed yet
        self.at_line_start = True
        self.outgoing = bytearray()
        self.client_done = False  # the client shut down its sending side

    def received(self, data: bytes) -> None:
        data = self.held + data
        self.held = b""
        while data:
            if self.at_line_start:
                if data.startswith(WHO):
                    self.outgoing += f"{PORT}\n".encode()
                    data = data[len(WHO):]
                    continue
                if WHO.startswith(data) and not self.client_done:
                    self.held = data  # wait for the rest of the line
                    return
            newline = data.find(b"\n")
            end = len(data) if newline < 0 else newline + 1
            self.outgoing += data[:end]
            self.at_line_start = newline >= 0
            data = data[end:]

    def events(self) -> int:
        wanted = selectors.EVENT_WRITE if self.outgoing else 0
        if not self.client_done and len(self.outgoing) < MAX_PENDING:
            wanted |= selectors.EVENT_READ
        return wanted


def serve() -> None:
    listener = socket.create_server((HOST, PORT), backlog=512)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    print(f"tcp echo listening on {HOST}:{PORT}", flush=True)
    while True:
        for key, mask in selector.select():
            if key.fileobj is listener:
                try:
                    sock, _address = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, Connection(sock))
                continue
            connection: Connection = key.data
            try:
                if mask & selectors.EVENT_READ:
                    data = connection.sock.recv(65536)
                    if not data:
                        connection.client_done = True
                    connection.received(data)
                if mask & selectors.EVENT_WRITE and connection.outgoing:
                    sent = connection.sock.send(connection.outgoing)
                    del connection.outgoing[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # reset by the client
                selector.unregister(connection.sock)
                connection.sock.close()
                continue
            if connection.client_done and not connection.outgoing:
                selector.unregister(connection.sock)
                connection.sock.close()
            else:
                selector.modify(connection.sock, connection.events(), connection)


if __name__ == "__main__":
    serve()
