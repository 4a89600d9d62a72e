"""Small real backends for data-plane tests, each on its own threads in the test process.

`RecordingBackend` speaks HTTP/1.1 with its own minimal parser (independent of net/http1.py, so
the proxy's framing is checked against a second reading), keeps every request it received
(`requests`: method, target, headers as (name, value) pairs, body) and counts accepted
connections (`accepts`), which proves keep-alive reuse and that rejected requests never arrived.
Paths choose behaviours:

  /big/<n>        n bytes of a fixed pattern with Content-Length (streamed in 64 KiB pieces)
  /chunked/<n>    n bytes of the pattern, chunked
  /sha            200 with the sha256 hex digest of the request body
  /status/<code>  that status, no body (204/304) or a short one
  /hang           read the request, never answer (until the backend stops)
  /drop           read the request, close without answering (a dying backend)
  /close          answer with Connection: close and close
  /until-close    HTTP/1.0-style body delimited by closing the connection
  /ws             websocket handshake, then echo every frame (text/binary) back
  /sleep/<ms>     answer after that many milliseconds
  /garbage        answer bytes that are not HTTP
  /then-drop      answer (keep-alive), then drop the connection when its next request arrives
                  (a server closing an idle keep-alive connection just as the proxy reuses it)
anything else: 200, body "<name> <method> <target>".
An `Expect: 100-continue` request gets "100 Continue" before the body is read.
"""
from __future__ import annotations

import base64
import hashlib
import socket
import threading

PATTERN = bytes(range(256)) * 256  # 64 KiB
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def pattern_bytes(n: int) -> bytes:
    reps, rest = divmod(n, len(PATTERN))
    return PATTERN * reps + PATTERN[:rest]


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def read_until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        head, _, self.buf = self.buf.partition(marker)
        return head

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class RecordingBackend:
    def __init__(self, name: str = "b"):
        self.name = name
        self.requests: list[dict] = []
        self.accepts = 0
        self.dropped = 0  # requests dropped unanswered by /then-drop connections
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [r["target"] for r in self.requests]

    def stop(self) -> None:
        """Close the listening socket and every connection (the backend 'dies')."""
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); then connects are refused
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepts += 1
                self._conns.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        try:
            while not self._stop.is_set():
                if not self._one_request(conn):
                    break
        except OSError:
            pass
        finally:
            sock.close()

    def _one_request(self, conn: _Conn) -> bool:
        head = conn.read_until(b"\r\n\r\n")
        if head is None:
            return False
        if getattr(conn, "drop_next", False):
            self.dropped += 1
            conn.sock.close()
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        lower = {}
        for name, value in headers:
            lower.setdefault(name.lower(), value)
        if lower.get("expect", "").lower() == "100-continue":
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if target == "/drop":
            self.requests.append({"method": method, "target": target, "headers": headers, "body": b"",
                                  "version": version})
            if "content-length" in lower:
                conn.read_exact(int(lower["content-length"]))
            conn.sock.close()
            return False
        body = self._read_body(conn, lower)
        if body is None:
            return False
        req = {"method": method, "target": target, "headers": headers, "body": body, "version": version}
        self.requests.append(req)
        keep = lower.get("connection", "").lower() != "close" if version == "HTTP/1.1" \
            else lower.get("connection", "").lower() == "keep-alive"
        return self._respond(conn, req, lower, keep)

    @staticmethod
    def _read_body(conn: _Conn, lower: dict) -> bytes | None:
        if lower.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                line = conn.read_until(b"\r\n")
                if line is None:
                    return None
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while True:  # trailers
                        line = conn.read_until(b"\r\n")
                        if not line:
                            return b"".join(parts)
                data = conn.read_exact(size + 2)
                if data is None:
                    return None
                parts.append(data[:-2])
        n = int(lower.get("content-length", "0"))
        return conn.read_exact(n) if n else b""

    def _respond(self, conn: _Conn, req: dict, lower: dict, keep: bool) -> bool:
        sock = conn.sock
        target = req["target"]
        method = req["method"]
        extra = f"X-Backend: {self.name}\r\n"
        conn_hdr = "" if keep else "Connection: close\r\n"
        if target == "/hang":
            self._stop.wait(30)
            return False
        if target == "/ws" and lower.get("upgrade", "").lower() == "websocket":
            accept = base64.b64encode(hashlib.sha1(lower["sec-websocket-key"].encode() + WS_GUID).digest())
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self._ws_echo(conn)
            return False
        if target.startswith("/big/"):
            n = int(target[5:])
            sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n{extra}{conn_hdr}\r\n".encode())
            if method != "HEAD":
                data = pattern_bytes(n)
                for i in range(0, n, 65536):
                    sock.sendall(data[i:i + 65536])
            return keep
        if target.startswith("/chunked/"):
            n = int(target[9:])
            sock.sendall(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{extra}{conn_hdr}\r\n".encode())
            data = pattern_bytes(n)
            for i in range(0, n, 50000):
                piece = data[i:i + 50000]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
            return keep
        if target.startswith("/status/"):
            code = int(target[8:])
            if code in (204, 304):
                sock.sendall(f"HTTP/1.1 {code} X\r\n{extra}{conn_hdr}\r\n".encode())
            else:
                body = f"status {code}".encode()
                sock.sendall(f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\n{extra}{conn_hdr}\r\n".encode()
                             + (body if method != "HEAD" else b""))
            return keep
        if target.startswith("/sleep/"):
            self._stop.wait(int(target[7:]) / 1000)
        if target == "/garbage":
            sock.sendall(b"HELLO THERE\r\n\r\n")
            return False
        if target == "/then-drop":
            conn.drop_next = True
        if target == "/until-close":
            sock.sendall(f"HTTP/1.1 200 OK\r\n{extra}\r\n".encode() + b"until close body")
            return False
        if target == "/sha":
            body = hashlib.sha256(req["body"]).hexdigest().encode()
        else:
            body = f"{self.name} {method} {target}".encode()
        if target == "/close":
            conn_hdr, keep = "Connection: close\r\n", False
        sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n"
                     f"{extra}{conn_hdr}\r\n".encode() + (body if method != "HEAD" else b""))
        return keep

    @staticmethod
    def _ws_echo(conn: _Conn) -> None:
        while True:
            head = conn.read_exact(2)
            if head is None:
                return
            opcode = head[0] & 0x0F
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(conn.read_exact(2), "big")
            elif length == 127:
                length = int.from_bytes(conn.read_exact(8), "big")
            mask = conn.read_exact(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(conn.read_exact(length)))
            conn.sock.sendall(ws_frame(payload, opcode, masked=False))
            if opcode == 8:
                return


def ws_frame(payload: bytes, opcode: int = 1, masked: bool = True) -> bytes:
    """One final websocket frame (clients must mask, servers must not)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    mbit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mbit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
