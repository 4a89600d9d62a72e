"""The websocket tunnel: after a 101 answer to a websocket upgrade, the client connection and its
backend connection carry raw bytes both ways until either side ends.

`WebsocketTunnel` becomes the backend connection's owner (its callbacks come here instead of to the
HTTP relay) and receives what the client sends while the client connection is in state TUNNEL.
Backpressure is the proxy's: a side is not read while the other holds more than `BUFFER_HIGH`
unsent bytes. Either side ending (end of stream, reset, `timeouts.idle` with no byte either way)
ends both; the whole tunnel is one Outcome with status 101 (`ClientConnection.end_tunnel`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pmdaemon.net.relay import BUFFER_HIGH
from pmdaemon.net.upstream import BackendConnection

if TYPE_CHECKING:
    from pmdaemon.net.proxy import ClientConnection


class WebsocketTunnel:
    __slots__ = ("client", "up")

    def __init__(self, client: ClientConnection, up: BackendConnection):
        self.client = client
        self.up = up
        up.owner = self

    def from_client(self, data: bytes) -> None:
        client = self.client
        client.bytes_in += len(data)
        client.set_deadline(client.loop.now + client.listener.idle_timeout)
        up = self.up
        up.write(data)
        if up.pending > BUFFER_HIGH:
            client.pause_reading()

    # ---- backend connection callbacks (net/upstream.py) ----------------------------------------
    def upstream_data(self, up: BackendConnection, data: bytes) -> None:
        client = self.client
        client.bytes_out += len(data)
        client.set_deadline(client.loop.now + client.listener.idle_timeout)
        client.write(data)
        if client.pending > BUFFER_HIGH:
            up.pause_reading()

    def upstream_drained(self, up: BackendConnection) -> None:
        self.client.resume_reading()

    def upstream_eof(self, up: BackendConnection) -> None:
        self.client.end_tunnel(flush=True)

    def upstream_error(self, up: BackendConnection, exc: OSError, connecting: bool) -> None:
        self.client.end_tunnel(flush=True)

    def upstream_timeout(self, up: BackendConnection, connecting: bool) -> None:
        self.client.upstream_timeout(up, connecting)  # a stalled write: as for any relayed response
