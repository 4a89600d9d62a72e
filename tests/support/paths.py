"""Where things are in the repository, for tests that run its scripts and read its examples."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EXAMPLE_APPS = EXAMPLES / "apps"
SERVER_APP = EXAMPLE_APPS / "server.py"  # HTTP on $PORT: "instance <i> port <port>", GET /health -> 200
TCP_ECHO_APP = EXAMPLE_APPS / "tcp_echo.py"
TEST_APPS = REPO / "tests" / "apps"  # misbehaving apps for tests: crasher.py, switchable.py, ...
