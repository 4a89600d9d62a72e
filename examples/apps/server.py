"""Example backend: a small HTTP/1.1 keep-alive server that says which instance answered.

Environment:
  PORT              port to listen on (default 3000)         HOST  address (default 127.0.0.1)
  PM2_INSTANCE_ID   instance number, reported in X-Instance (INSTANCE is accepted too)
  DELAY_MS          delay added to every request, in milliseconds
  FAIL_HEALTH_FILE  while this file exists, GET /health answers 503

Routes (every response carries `X-Backend: <port>` and `X-Instance: <id>`):
  GET  /health      200 "ok" (503 "failing" while FAIL_HEALTH_FILE exists)
  POST|PUT /echo    200 JSON {"method", "length", "sha256"} of the request body (Content-Length
                    or chunked; read as it arrives, never whole)
  GET  /slow?ms=N   waits N ms, then answers like any other path
  GET  /status/N    answers with status N (200..599; 204 and 304 without a body)
  GET  /bytes/N     N bytes of body ("x" repeated)
  anything else     200 "instance <id> port <port>"
Stdlib only, one thread per connection (http.server.ThreadingHTTPServer).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORT = int(os.environ.get("PORT", "3000"))
HOST = os.environ.get("HOST", "127.0.0.1")
INSTANCE = os.environ.get("PM2_INSTANCE_ID", os.environ.get("INSTANCE", "0"))
DELAY = float(os.environ.get("DELAY_MS", "0")) / 1000
FAIL_HEALTH_FILE = os.environ.get("FAIL_HEALTH_FILE")
CHUNK = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pmdaemon-example"
    # The head and the body go out in two writes; without TCP_NODELAY the body waits for the
    # peer's delayed ACK (~40 ms), which caps a keep-alive connection at ~24 requests/s.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._drain_body()
        if DELAY:
            time.sleep(DELAY)
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if url.path == "/health":
            failing = FAIL_HEALTH_FILE is not None and os.path.exists(FAIL_HEALTH_FILE)
            self._reply(503 if failing else 200, b"failing\n" if failing else b"ok\n")
        elif len(parts) == 2 and parts[0] == "status" and parts[1].isdigit() and 200 <= int(parts[1]) <= 599:
            status = int(parts[1])
            self._reply(status, b"" if status in (204, 304) else f"status {status}\n".encode())
        elif len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
            self._reply_bytes(int(parts[1]))
        else:
            if url.path == "/slow":
                time.sleep(int(parse_qs(url.query).get("ms", ["0"])[0]) / 1000)
            self._reply(200, f"instance {INSTANCE} port {PORT}\n".encode())

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/echo":
            self.do_GET()
            return
        if DELAY:
            time.sleep(DELAY)
        digest, length = hashlib.sha256(), 0
        for piece in self._body():
            digest.update(piece)
            length += len(piece)
        body = json.dumps({"method": self.command, "length": length, "sha256": digest.hexdigest(),
                           "instance": INSTANCE, "port": PORT}).encode()
        self._reply(200, body, "application/json")

    do_PUT = do_POST
    do_DELETE = do_GET

    def do_HEAD(self) -> None:
        self._reply(200, b"", head_length=len(f"instance {INSTANCE} port {PORT}\n"))

    def _body(self):
        """The request body in pieces, following its framing (Content-Length or chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    piece = self.rfile.read(min(CHUNK, remaining))
                    if not piece:
                        return
                    remaining -= len(piece)
                    yield piece
                self.rfile.readline()  # CRLF after the chunk
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            piece = self.rfile.read(min(CHUNK, remaining))
            if not piece:
                return
            remaining -= len(piece)
            yield piece

    def _drain_body(self) -> None:
        for _piece in self._body():
            pass

    def _headers(self, status: int, length: int, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if status not in (204, 304):  # RFC 9110: these carry no body and no Content-Length
            self.send_header("Content-Length", str(length))
        self.send_header("X-Backend", str(PORT))
        self.send_header("X-Instance", INSTANCE)
        self.end_headers()

    def _reply(
        self, status: int, body: bytes, content_type: str = "text/plain", head_length: int | None = None
    ) -> None:
        self._headers(status, len(body) if head_length is None else head_length, content_type)
        self.wfile.write(body)

    def _reply_bytes(self, size: int) -> None:
        self._headers(200, size, "application/octet-stream")
        block = b"x" * CHUNK
        while size:
            self.wfile.write(block[:min(size, CHUNK)])
            size -= min(size, CHUNK)

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request would flood the instance's log


def main() -> None:
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    server.daemon_threads = True
    print(f"instance {INSTANCE} listening on {HOST}:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
