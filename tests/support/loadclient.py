"""Continuous real HTTP traffic for the zero-downtime tests: "no failed request while X happens".

`LoadClient(port)` is a context manager. While it runs, some threads send GETs back to back over
one keep-alive connection each (reconnecting only when the server asked to close), others open a
fresh connection for every request; all use http.client with short timeouts. Any answer other
than 200 and any exception (refused, reset, timeout, RemoteDisconnected...) is recorded in
`failures`. `backends` counts the answers by their X-Backend header (the instance's port).
"""
from __future__ import annotations

import http.client
import threading
import time
from collections import Counter

import pytest

TIMEOUT = 5.0  # seconds: connect and each read


class LoadClient:
    def __init__(self, port: int, keep_alive: int = 2, fresh: int = 2, path: str = "/", host: str = "127.0.0.1"):
        self.port, self.path, self.host = port, path, host
        self.ok = 0
        self.failures: list[str] = []
        self.backends: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._keep_alive, daemon=True) for _ in range(keep_alive)]
        self._threads += [threading.Thread(target=self._fresh, daemon=True) for _ in range(fresh)]

    def __enter__(self) -> LoadClient:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT + 1)

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        """Wait until `more` further requests have succeeded (proof that traffic flows now)."""
        target = self.ok + more
        deadline = time.monotonic() + timeout
        while self.ok < target:
            if time.monotonic() > deadline:
                pytest.fail(f"traffic stalled: {self.ok} of {target} requests answered; failures {self.failures[:5]}")
            time.sleep(0.02)

    def seen_since(self, before: Counter) -> set[str]:
        """X-Backend values answered since the `backends` snapshot `before`."""
        with self._lock:
            return {port for port, count in self.backends.items() if count > before.get(port, 0)}

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self.backends)

    def _record(self, response: http.client.HTTPResponse) -> None:
        body = response.read()
        with self._lock:
            if response.status == 200:
                self.ok += 1
                self.backends[response.getheader("X-Backend")] += 1
            else:
                self.failures.append(f"status {response.status}: {body[:200]!r}")

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            self.failures.append(repr(exc))

    def _keep_alive(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            while not self._stop.is_set():
                try:
                    conn.request("GET", self.path)
                    self._record(conn.getresponse())
                except (OSError, http.client.HTTPException) as exc:
                    self._fail(exc)
                    conn.close()  # the next request connects again
        finally:
            conn.close()

    def _fresh(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            try:
                conn.request("GET", self.path, headers={"Connection": "close"})
                self._record(conn.getresponse())
            except (OSError, http.client.HTTPException) as exc:
                self._fail(exc)
            finally:
                conn.close()
