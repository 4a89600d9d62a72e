"""Session pinning for `sticky_sessions` (decisions.md section 4): signed cookies and the session-id table.

The cookie value is opaque and signed: base64url of
    backend id (8 bytes) | issue time (8 bytes, big-endian whole seconds) | HMAC-SHA256 (first 16 bytes)
The backend id is a keyed hash of the backend's address, so a client learns nothing about the
network behind the balancer, and a value that does not verify (forged, truncated, signed with
another key, older than the session timeout) is simply not a pin: `verify` returns None, it never
raises. Issue times are wall-clock seconds, because cookies outlive restarts of the daemon; the key
lives in `$PMDAEMON_HOME/session.key` for the same reason.

The `header_name` header carries session ids the client chooses; `SessionTable` maps them to a
backend with idle expiry and a size bound, so clients inventing ids cannot grow memory without limit.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
from collections import OrderedDict
from pathlib import Path

KEY_BYTES = 32
_ID_BYTES = 8
_TIME_BYTES = 8
_MAC_BYTES = 16
_RAW_BYTES = _ID_BYTES + _TIME_BYTES + _MAC_BYTES
_VALUE_CHARS = math.ceil(_RAW_BYTES * 4 / 3)  # unpadded base64url

MAX_SESSIONS = 65536
# Longer client-chosen ids are stored by digest, so an entry costs the same whatever the client sends.
_MAX_STORED_ID = 64


class SessionSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("session signing key must be at least 16 bytes")
        self._key = key

    def backend_id(self, address: str) -> str:
        """The opaque id a cookie carries for the backend at `address` (stable for a given key)."""
        return self._backend_id_bytes(address).hex()

    def issue(self, backend_address: str, now: float) -> str:
        """A cookie value pinning to `backend_address`, issued at wall-clock time `now`."""
        body = self._backend_id_bytes(backend_address) + int(now).to_bytes(_TIME_BYTES, "big")
        raw = body + self._mac(body)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def verify(self, value: str, now: float, timeout: float) -> str | None:
        """The backend id (as `backend_id` gives it) of a genuine value issued at most `timeout`
        seconds before `now`; None for anything else."""
        if len(value) != _VALUE_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (ValueError, binascii.Error):  # non-ASCII text or broken padding
            return None
        if len(raw) != _RAW_BYTES:
            return None
        body, mac = raw[: _ID_BYTES + _TIME_BYTES], raw[_ID_BYTES + _TIME_BYTES :]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        issued = int.from_bytes(body[_ID_BYTES:], "big")
        if now - issued > timeout:
            return None
        return body[:_ID_BYTES].hex()

    def _backend_id_bytes(self, address: str) -> bytes:
        return hmac.digest(self._key, b"backend\0" + address.encode(), "sha256")[:_ID_BYTES]

    def _mac(self, body: bytes) -> bytes:
        return hmac.digest(self._key, b"session\0" + body, "sha256")[:_MAC_BYTES]


class SessionTable:
    """Session id -> backend address; an entry expires `timeout` seconds after it was last used.

    Entries are kept in order of last use, so expired ones are dropped from the front as new ones
    arrive and, past `max_entries`, the least recently used goes first.
    """

    def __init__(self, timeout: float, max_entries: int = MAX_SESSIONS) -> None:
        self.timeout = timeout
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str, now: float) -> str | None:
        """The backend address of a live session (its idle timer restarts), else None."""
        key = _stored_id(session_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        address, last_used = entry
        if now - last_used > self.timeout:
            del self._entries[key]
            return None
        self._entries[key] = (address, now)
        self._entries.move_to_end(key)
        return address

    def put(self, session_id: str, address: str, now: float) -> None:
        entries = self._entries
        key = _stored_id(session_id)
        entries[key] = (address, now)
        entries.move_to_end(key)
        while entries:
            oldest_key, (_, last_used) = next(iter(entries.items()))
            if now - last_used <= self.timeout and len(entries) <= self._max_entries:
                break
            del entries[oldest_key]


def _stored_id(session_id: str) -> str:
    if len(session_id) <= _MAX_STORED_ID:
        return session_id
    return "~" + hashlib.blake2b(session_id.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def set_cookie_header(name: str, value: str, max_age: float, secure: bool) -> bytes:
    """The value of the Set-Cookie header that pins a client (decisions.md section 4)."""
    cookie = f"{name}={value}; Max-Age={math.ceil(max_age)}; Path=/; HttpOnly; SameSite=Lax"
    if secure:
        cookie += "; Secure"
    return cookie.encode("ascii")


def load_or_create_key(home: Path) -> bytes:
    """The signing key in `home/session.key` (mode 0600), created on first use, so cookies stay
    valid across restarts. A file of the wrong size is replaced: that only ends existing sessions."""
    path = home / "session.key"
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) == KEY_BYTES:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return key
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f"session.key.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    if key:
        os.replace(tmp, path)
    else:
        # Two daemons starting at once on one home must end up with the same key: link() fails if the
        # other won, and then its key is the one to use.
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_bytes()
