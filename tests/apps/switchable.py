"""Test app: an HTTP backend whose health, answers, speed and CPU load a test switches while it runs,
and which counts what it was sent, so a test can prove that a backend got no request at all.

Environment: PORT (required), PM2_INSTANCE_ID, HEALTHY_AFTER_MS (GET /health answers 503 during the
first N ms after start: a slow-starting instance whose port serves at once; default 0).

Routes (every response carries `X-Backend: <port>`):
  GET /_admin/health?mode=ok|fail|hang  /health answers 200, answers 503, or never answers (hangs)
  GET /_admin/fail?on=1|0               every served request answers 500 (or stops doing so)
  GET /_admin/delay?ms=N                every served request waits N ms before its answer
  GET /_admin/burn?on=1|0               start / stop a busy-looping child process (100 % of one CPU,
                                        inside this instance's process tree, where the supervisor
                                        samples CPU; it exits by itself when this process is gone)
  GET /_admin/stats                     JSON: requests served (counted on arrival, before the
                                        delay), the time.time() of the first one and of the first
                                        passing /health, and the pid
  GET /health                           200 "ok" (see HEALTHY_AFTER_MS and /_admin/health)
  GET /bytes/N                          a served request answered with N bytes of body
  anything else                         a served request: 200 "instance <id> port <port>"
The admin paths are meant for the instance's own port, not through the load balancer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORT = int(os.environ["PORT"])
INSTANCE = os.environ.get("PM2_INSTANCE_ID", "0")
STARTED = time.monotonic()
HEALTHY_AFTER = float(os.environ.get("HEALTHY_AFTER_MS", "0")) / 1000
HANG_SECONDS = 60.0
BURN_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


class State:
    """What the admin paths switch and what served requests count; shared by the request threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.health_mode = "ok"
        self.failing = False
        self.delay = 0.0
        self.requests = 0
        self.first_request_at: float | None = None
        self.first_health_pass_at: float | None = None
        self.burner: subprocess.Popen | None = None

    def served(self) -> None:
        with self.lock:
            self.requests += 1
            if self.first_request_at is None:
                self.first_request_at = time.time()

    def health_passed(self) -> None:
        with self.lock:
            if self.first_health_pass_at is None:
                self.first_health_pass_at = time.time()

    def burn(self, on: bool) -> None:
        with self.lock:
            if on and self.burner is None:
                self.burner = subprocess.Popen([sys.executable, "-c", BURN_LOOP])
            elif not on and self.burner is not None:
                self.burner.kill()
                self.burner.wait()
                self.burner = None

    def stats(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "first_request_at": self.first_request_at,
                    "first_health_pass_at": self.first_health_pass_at, "pid": os.getpid(), "port": PORT}


STATE = State()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no delayed-ACK stall on keep-alive
    wbufsize = 64 * 1024  # head and body leave in one write (flushed after each request), no Nagle stall

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/_admin/health":
            STATE.health_mode = query["mode"][0]
            self._reply(f"health {STATE.health_mode}\n")
        elif url.path == "/_admin/fail":
            STATE.failing = query.get("on", ["1"])[0] == "1"
            self._reply(f"failing {STATE.failing}\n")
        elif url.path == "/_admin/delay":
            STATE.delay = int(query["ms"][0]) / 1000
            self._reply(f"delay {STATE.delay * 1000:g} ms\n")
        elif url.path == "/_admin/burn":
            STATE.burn(query.get("on", ["1"])[0] == "1")
            self._reply(f"burning {STATE.burner is not None}\n")
        elif url.path == "/_admin/stats":
            self._reply(json.dumps(STATE.stats()), content_type="application/json")
        elif url.path == "/health":
            self._health()
        else:
            STATE.served()
            if STATE.delay:
                time.sleep(STATE.delay)
            if STATE.failing:
                self._reply("failing on purpose\n", 500)
            elif url.path.startswith("/bytes/"):
                self._reply_bytes(int(url.path.rsplit("/", 1)[1]))
            else:
                self._reply(f"instance {INSTANCE} port {PORT}\n")

    def _health(self) -> None:
        mode = STATE.health_mode
        if mode == "hang":
            time.sleep(HANG_SECONDS)
            return
        if mode == "fail" or time.monotonic() - STARTED < HEALTHY_AFTER:
            self._reply("unhealthy\n", 503)
            return
        STATE.health_passed()
        self._reply("ok\n")

    def _reply(self, text: str, status: int = 200, content_type: str = "text/plain") -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", str(PORT))
        self.end_headers()
        self.wfile.write(body)

    def _reply_bytes(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("X-Backend", str(PORT))
        self.end_headers()
        block = b"x" * 65536
        try:
            while size:
                self.wfile.write(block[:min(size, len(block))])
                size -= min(size, len(block))
        except OSError:
            pass  # the client (the balancer) went away

    def log_message(self, format: str, *args) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    print(f"instance {INSTANCE} listening on 127.0.0.1:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
