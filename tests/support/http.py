"""HTTP clients of the tests: one request, one `Reply`."""
from __future__ import annotations

import http.client
import ssl
from typing import NamedTuple

from support.looprunner import TlsFiles


class Reply(NamedTuple):
    """A whole response. `headers` is the response's HTTPMessage: case-insensitive, `.get()` gives None
    for a missing header, `.get_all()` every value of a repeated one (Set-Cookie)."""
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def backend(self) -> int | None:
        """The X-Backend header of examples/apps/server.py and tests/apps/switchable.py: the answering port."""
        value = self.headers.get("X-Backend")
        return int(value) if value else None

    @property
    def set_cookie(self) -> str | None:
        return self.headers.get("Set-Cookie")

    def cookie(self, name: str = "PMDAEMON_SESSION") -> str:
        """The value the Set-Cookie header gives `name` (the test fails if it sets no such cookie)."""
        assert self.set_cookie, "the response sets no cookie"
        pair = self.set_cookie.split(";", 1)[0]
        assert pair.startswith(name + "="), self.set_cookie
        return pair[len(name) + 1:]


def get(target: int | http.client.HTTPConnection, path: str = "/", *, method: str = "GET",
        headers: dict | None = None, body: bytes | None = None, source: str | None = None,
        timeout: float = 10.0) -> Reply:
    """One request and its whole answer.

    `target` is a port on 127.0.0.1 (a new connection, closed afterwards, bound to the client address
    `source`, a 127.0.0.x, when given) or an open connection (kept open: keep-alive tests reuse it;
    `source` and `timeout` are the connection's own then).
    """
    if isinstance(target, http.client.HTTPConnection):
        return _exchange(target, method, path, headers, body)
    connection = http.client.HTTPConnection("127.0.0.1", target, timeout=timeout,
                                            source_address=(source, 0) if source else None)
    try:
        return _exchange(connection, method, path, headers, body)
    finally:
        connection.close()


def _exchange(connection: http.client.HTTPConnection, method: str, path: str, headers: dict | None,
              body: bytes | None) -> Reply:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return Reply(response.status, response.headers, response.read())


def https(port: int, trust: TlsFiles | ssl.SSLContext, timeout: float = 10.0) -> http.client.HTTPSConnection:
    """A client connection to 127.0.0.1:`port` trusting the CA of `trust` (or that client context)."""
    context = trust if isinstance(trust, ssl.SSLContext) else trust.client_context()
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
