"""Test app: an HTTP backend whose slowness and CPU load a test changes while it runs.

Environment: PORT (required), PM2_INSTANCE_ID, DELAY_MS (initial delay per request, default 0).

Routes (every response carries `X-Backend: <port>`, so a test sees which instance answered):
  GET /_admin/delay?ms=N    from now on every request waits N ms before it is answered
  GET /_admin/burn?on=1|0   start / stop a busy-looping child process (100 % of one CPU, inside this
                            instance's process tree, where the supervisor samples CPU)
  GET /_admin/fail?on=1|0   from now on answer every request with 500 (or stop doing so)
  GET /health               200 "ok"
  anything else             200 "instance <id> port <port>" (after the delay)
The admin paths are meant for the instance's own port, not through the load balancer.
The burner exits by itself when this process is gone (it watches its parent).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORT = int(os.environ["PORT"])
INSTANCE = os.environ.get("PM2_INSTANCE_ID", "0")
BURN_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


class Tuning:
    """What the admin paths change; read by every request thread."""

    def __init__(self) -> None:
        self.delay = float(os.environ.get("DELAY_MS", "0")) / 1000
        self.failing = False
        self.burner: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def burn(self, on: bool) -> None:
        with self.lock:
            if on and self.burner is None:
                self.burner = subprocess.Popen([sys.executable, "-c", BURN_LOOP])
            elif not on and self.burner is not None:
                self.burner.kill()
                self.burner.wait()
                self.burner = None


TUNING = Tuning()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/_admin/delay":
            TUNING.delay = int(query["ms"][0]) / 1000
            self._reply(f"delay {TUNING.delay * 1000:g} ms\n")
        elif url.path == "/_admin/burn":
            TUNING.burn(query.get("on", ["1"])[0] == "1")
            self._reply(f"burning {TUNING.burner is not None}\n")
        elif url.path == "/_admin/fail":
            TUNING.failing = query.get("on", ["1"])[0] == "1"
            self._reply(f"failing {TUNING.failing}\n")
        elif url.path == "/health":
            self._reply("ok\n")
        else:
            if TUNING.delay:
                time.sleep(TUNING.delay)
            if TUNING.failing:
                self._reply("failing on purpose\n", 500)
            else:
                self._reply(f"instance {INSTANCE} port {PORT}\n")

    def _reply(self, text: str, status: int = 200) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", str(PORT))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    print(f"instance {INSTANCE} listening on 127.0.0.1:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
