"""Fixtures shared by more than one kind of test (tests/unit, actors, net, e2e).

Helpers are not here: tests import them from the `support` package (tests/support/). Each folder's
conftest.py holds the fixtures of its own kind; tests/e2e/conftest.py also marks its tests `e2e`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from support.paths import SERVER_APP


@pytest.fixture
def app_script() -> Path:
    """examples/apps/server.py: listens on $PORT, answers "instance <i> port <port>", `GET /health` answers 200."""
    return SERVER_APP


@pytest.fixture
def tls_pair(tmp_path):
    """A certificate and its key: `server.crt` + `server.crt.key` (where HAProxy looks for the key)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "server.crt", tmp_path / "server.crt.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return cert, key
