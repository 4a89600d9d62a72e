"""A tiny real HTTP backend for control-plane tests, run on a thread in the test process.

`GET /health` answers `health_status` (changeable while it runs); any other path answers 200 with
the backend's name, so a test can tell which backend served a request. `hang_health` makes /health
accept the request and never answer (a slow backend).
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class TinyBackend:
    def __init__(self, name: str = "backend", port: int = 0):
        self.name = name
        self.health_status = 200
        self.hang_health = False
        self.health_requests = 0
        self.requests = 0
        self._release = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path.startswith("/health"):
                    backend.health_requests += 1
                    if backend.hang_health:
                        backend._release.wait(30)
                        return
                    self._answer(backend.health_status, b"health\n")
                else:
                    backend.requests += 1
                    self._answer(200, backend.name.encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"tiny-{name}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> TinyBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
