"""HTTP/1.x message framing without I/O: bytes in, heads and raw body slices out.

Theory of operation
-------------------
A `RequestReader` (client side) or `ResponseReader` (backend side) is fed whatever the socket
returned and hands back, one call to `next_event()` at a time:

* a head (`RequestHead` / `ResponseHead`) once the whole head has arrived and passed validation;
* `bytes`: a raw slice of the message body exactly as it was framed on the wire. A proxy forwards
  these slices untouched, so a chunked body stays chunked (size lines and trailers included) and
  is never buffered whole or re-chunked; the reader only walks the framing to find the message end;
* `END` when the message is complete, after which the reader is `PAUSED` until `start_next()`:
  a pipelined request stays in the buffer until the proxy has answered the current one;
* `NEED_DATA` when it needs more bytes.

Every message has exactly one framing, decided from its head: `chunked`, a `content_length`
(0 for no body), or, for responses only, read-until-close (`until_close`). Anything that could be
read two ways by two parsers (Content-Length with Transfer-Encoding, a duplicated or non-digit
Content-Length, obs-fold, whitespace before a colon, bare CR or LF, control bytes, a bad chunk
size) raises `HttpError`, the only exception this module raises. Its `status` is what a proxy
answers: 400, 413, 414 or 431 for requests; responses always say 502 (invalid response).

Hot-path notes: heads are checked with `bytes.translate`/`count` and their field names found with
one regex `findall` (C loops, not a Python loop per line). Header fields are kept in arrival order
as `(lowercase name, raw line)` pairs, so duplicates stay visible, forwarding a kept header is
joining its raw line, and values are sliced out (`field_value`) only for the few fields read.
"""
from __future__ import annotations

import re

NEED_DATA = "NEED_DATA"
END = "END"
PAUSED = "PAUSED"

MAX_REQUEST_LINE = 8 * 1024
MAX_FIELDS = 100
MAX_CHUNK_LINE = 4096

_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HEX = b"0123456789abcdefABCDEF"
# Every byte a head may contain: visible ASCII, SP, HTAB, obs-text, and CR/LF (checked in pairs).
_HEAD_BYTES = bytes([9, 10, 13]) + bytes(range(32, 127)) + bytes(range(128, 256))
_BODY_FREE_STATUSES = frozenset((204, 304))
_REQUEST_FRAMING_NAMES = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
                                    b"upgrade"))
_RESPONSE_FRAMING_NAMES = frozenset((b"content-length", b"transfer-encoding", b"connection"))

# Body framing states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class HttpError(Exception):
    """Malformed or over-limit message. `status` is the response a proxy should give."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _split_tokens(value: bytes) -> list[bytes]:
    if b"," not in value:
        return [value.lower()] if value else []
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]


# A field name at a line start (the head is lowered first, so names come out lowercase). Lines
# hold no bare CR/LF by then, so "\n" marks exactly the line starts, and a line whose name is not a
# token followed at once by ":" yields no match; the caller checks one match per line. One `findall`
# replaces a Python loop of find/slice/translate per line.
_NAME = re.compile(rb"\n([!#$%&'*+\-.^_`|~0-9a-z]+):")


def field_value(lname: bytes, line: bytes) -> bytes:
    """The value of a field line (name, colon, optional whitespace, value, optional whitespace)."""
    return line[len(lname) + 1:].strip(b" \t")


def _check_fields(lines: list[bytes], status: int) -> list[tuple[bytes, bytes]]:
    """Header lines -> [(lowercase name, raw line)] with strict RFC 9112 field syntax.

    The slow path: used for trailers, and to name the defect when `_split_head`'s regex did not
    match every line."""
    fields = []
    for line in lines:
        colon = line.find(b":")
        if colon <= 0:
            if line[:1] in (b" ", b"\t"):
                raise HttpError(status, "obsolete line folding is not allowed")
            raise HttpError(status, "header line without a name and colon")
        name = line[:colon]
        if name.translate(None, _TCHAR):
            if line[:1] in (b" ", b"\t"):
                raise HttpError(status, "obsolete line folding is not allowed")
            if name[-1:] in (b" ", b"\t"):
                raise HttpError(status, "whitespace before the colon of a header name")
            raise HttpError(status, "invalid character in a header name")
        fields.append((name.lower(), line))
    return fields


def _split_head(head: bytes, status: int, max_fields: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Head bytes (final CRLFCRLF excluded) -> (first line, [(lowercase name, raw line)]).

    Rejects control bytes and bare CR or LF. Field values are not extracted here: most fields are
    only forwarded, so `field_value` is applied to the few the caller needs."""
    if head.translate(None, _HEAD_BYTES):
        raise HttpError(status, "control character in the message head")
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise HttpError(status, "bare CR or LF in the message head")
    if not crlf:
        return head, []
    if crlf > max_fields:
        raise HttpError(431 if status == 400 else status, f"more than {max_fields} header fields")
    names = _NAME.findall(head.lower())
    lines = head.split(b"\r\n")
    first = lines[0]
    del lines[0]
    if len(names) != crlf:
        return first, _check_fields(lines, status)
    return first, list(zip(names, lines))


class _Head:
    """What both heads share: fields in order plus lookups for strategies (the RequestView protocol)."""

    __slots__ = ("fields", "version", "connection_tokens", "keep_alive", "chunked", "content_length")
    fields: list[tuple[bytes, bytes]]  # (lowercase name, raw line)
    version: int  # 10 or 11
    connection_tokens: list[bytes]
    keep_alive: bool
    chunked: bool
    content_length: int

    def header(self, name: bytes) -> bytes | None:
        """First value of header `name` (any case), or None."""
        name = name.lower()
        for lname, line in self.fields:
            if lname == name:
                return field_value(lname, line)
        return None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """(name as received, value) pairs in arrival order, duplicates included."""
        return [(line[:len(lname)], field_value(lname, line)) for lname, line in self.fields]


class RequestHead(_Head):
    __slots__ = ("method", "target", "host", "expect_continue", "websocket", "size")
    method: bytes
    target: bytes
    host: bytes | None  # None only in an HTTP/1.0 request without Host
    expect_continue: bool
    websocket: bool
    size: int  # bytes of the head, final CRLFCRLF included

    def cookie(self, name: str) -> str | None:
        """Value of cookie `name` from the Cookie header(s), or None."""
        wanted = name.encode("latin-1")
        for lname, line in self.fields:
            if lname != b"cookie":
                continue
            for pair in field_value(lname, line).split(b";"):
                key, eq, val = pair.strip(b" \t").partition(b"=")
                if eq and key == wanted:
                    return val.strip(b'"').decode("latin-1")
        return None

    @property
    def idempotent(self) -> bool:
        return self.method in (b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE")


class ResponseHead(_Head):
    __slots__ = ("status", "status_line", "until_close")
    status: int
    status_line: bytes
    until_close: bool  # the body runs until the backend closes the connection


def parse_request_head(head: bytes, max_fields: int = MAX_FIELDS) -> RequestHead:
    """Validate and parse one request head (request line + fields, final CRLFCRLF excluded)."""
    line, fields = _split_head(head, 400, max_fields)
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not method or method.translate(None, _TCHAR):
        raise HttpError(400, "invalid method")
    if not target:
        raise HttpError(400, "empty request target")
    if version == b"HTTP/1.1":
        ver = 11
    elif version == b"HTTP/1.0":
        ver = 10
    else:
        raise HttpError(400, "unsupported HTTP version")
    if method == b"CONNECT":
        raise HttpError(400, "CONNECT is not supported")

    req = RequestHead()
    req.method, req.target, req.version, req.fields, req.size = method, target, ver, fields, len(head) + 4
    content_length = None
    chunked = False
    host = None
    tokens: list[bytes] = []
    expect = upgrade_ws = False
    for lname, line in fields:
        if lname not in _REQUEST_FRAMING_NAMES:
            continue
        value = line[len(lname) + 1:].strip(b" \t")
        if lname == b"host":
            if host is not None:
                raise HttpError(400, "more than one Host header")
            host = value
        elif lname == b"content-length":
            if content_length is not None:
                raise HttpError(400, "duplicate Content-Length")
            if not value.isdigit() or len(value) > 18:
                raise HttpError(400, "Content-Length is not a number")
            content_length = int(value)
        elif lname == b"transfer-encoding":
            if chunked:
                raise HttpError(400, "duplicate Transfer-Encoding")
            if value.lower() != b"chunked":
                raise HttpError(400, "unsupported Transfer-Encoding (only chunked)")
            chunked = True
        elif lname == b"connection":
            tokens += _split_tokens(value)
        elif lname == b"expect":
            expect = value.lower() == b"100-continue"
        else:  # upgrade
            upgrade_ws = b"websocket" in _split_tokens(value)
    if chunked and content_length is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if chunked and ver == 10:
        raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
    if host is None and ver == 11:
        raise HttpError(400, "missing Host header")
    req.host = host
    req.chunked = chunked
    req.content_length = content_length or 0
    req.connection_tokens = tokens
    if ver == 11:
        req.keep_alive = b"close" not in tokens
    else:
        req.keep_alive = b"keep-alive" in tokens
    req.expect_continue = expect
    req.websocket = upgrade_ws and b"upgrade" in tokens
    return req


def parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    """Validate and parse one response head; every defect is a 502 (invalid response)."""
    line, fields = _split_head(head, 502, MAX_FIELDS)
    if line[:7] != b"HTTP/1." or line[8:9] != b" " or line[12:13] not in (b"", b" "):
        raise HttpError(502, "malformed status line")
    ver = line[7:8]
    code = line[9:12]
    if ver not in (b"0", b"1") or not code.isdigit() or code[0] == 48:
        raise HttpError(502, "malformed status line")

    resp = ResponseHead()
    resp.status = status = int(code)
    resp.status_line = line
    resp.version = 11 if ver == b"1" else 10
    resp.fields = fields
    content_length = None
    transfer_codings: list[bytes] = []
    tokens: list[bytes] = []
    for lname, line in fields:
        if lname not in _RESPONSE_FRAMING_NAMES:
            continue
        value = line[len(lname) + 1:].strip(b" \t")
        if lname == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise HttpError(502, "invalid Content-Length in the response")
            if content_length is not None and content_length != int(value):
                raise HttpError(502, "conflicting Content-Length in the response")
            content_length = int(value)
        elif lname == b"transfer-encoding":
            transfer_codings += _split_tokens(value)
        else:  # connection
            tokens += _split_tokens(value)
    if transfer_codings and content_length is not None:
        raise HttpError(502, "both Content-Length and Transfer-Encoding in the response")
    resp.connection_tokens = tokens
    resp.chunked = False
    resp.until_close = False
    resp.content_length = 0
    if status < 200 or status in _BODY_FREE_STATUSES or request_method == b"HEAD":
        pass  # no body whatever the head says
    elif transfer_codings:
        if transfer_codings[-1] == b"chunked":
            resp.chunked = True
        else:
            resp.until_close = True
    elif content_length is not None:
        resp.content_length = content_length
    else:
        resp.until_close = True
    if resp.until_close:
        resp.keep_alive = False
    elif resp.version == 11:
        resp.keep_alive = b"close" not in tokens
    else:
        resp.keep_alive = b"keep-alive" in tokens
    return resp


class _Reader:
    """Buffer + body framer shared by both directions. Subclasses parse the head."""

    __slots__ = ("_buf", "_state", "_left", "_scanned", "_status", "_max_body", "_body_seen",
                 "_trailer_size", "_max_trailer")

    def __init__(self, error_status: int, max_body: int | None, max_trailer: int):
        self._buf = b""
        self._state = _HEAD
        self._left = 0
        self._scanned = 0
        self._status = error_status
        self._max_body = max_body
        self._body_seen = 0
        self._trailer_size = 0
        self._max_trailer = max_trailer

    def feed(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
        else:
            self._buf = data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffer(self) -> bytes:
        """Everything still buffered (bytes after a 101 response or a finished head, for a tunnel)."""
        data, self._buf = self._buf, b""
        return data

    @property
    def in_body(self) -> bool:
        return self._state not in (_HEAD, _DONE)

    def _begin_body(self, chunked: bool, length: int, until_close: bool = False):
        self._body_seen = 0
        if chunked:
            self._state = _CHUNK_SIZE
        elif until_close:
            self._state = _UNTIL_CLOSE
        elif length:
            if self._max_body is not None and length > self._max_body:
                raise HttpError(413, "request body larger than the configured limit")
            self._state = _LENGTH
            self._left = length
        else:
            self._state = _DONE

    def _body_event(self):
        state = self._state
        buf = self._buf
        if state == _LENGTH:
            if not buf:
                return NEED_DATA
            left = self._left
            if len(buf) <= left:
                self._buf = b""
                self._left = left - len(buf)
                if not self._left:
                    self._state = _DONE
                return buf
            self._buf = buf[left:]
            self._state = _DONE
            return buf[:left]
        if state == _DONE:
            return END
        if state == _UNTIL_CLOSE:
            if not buf:
                return NEED_DATA
            self._buf = b""
            return buf
        pos = self._walk_chunks(buf)
        if not pos:
            return END if self._state == _DONE else NEED_DATA
        self._buf = buf[pos:]
        return buf[:pos]

    def _walk_chunks(self, buf: bytes) -> int:
        """Advance through as much chunked framing as `buf` holds; returns bytes consumed."""
        pos = 0
        end = len(buf)
        state = self._state
        status = self._status
        while pos < end:
            if state == _CHUNK_DATA:
                n = min(self._left, end - pos)
                pos += n
                self._left -= n
                if self._left:
                    break
                state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if end - pos < 2:
                    if buf[pos:pos + 1] != b"\r":
                        raise HttpError(status, "chunk data not followed by CRLF")
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HttpError(status, "chunk data not followed by CRLF")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if eol < 0:
                    if end - pos >= MAX_CHUNK_LINE:
                        raise HttpError(status, "chunk size line too long")
                    if buf.find(b"\n", pos) >= 0:
                        raise HttpError(status, "bare LF in a chunk size line")
                    break
                line = buf[pos:eol]
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not size or len(size) > 15 or size.translate(None, _HEX) or b"\r" in line or b"\n" in line:
                    raise HttpError(status, "invalid chunk size")
                pos = eol + 2
                n = int(size, 16)
                if n:
                    self._body_seen += n
                    if self._max_body is not None and self._body_seen > self._max_body:
                        raise HttpError(413, "request body larger than the configured limit")
                    self._left = n
                    state = _CHUNK_DATA
                else:
                    self._trailer_size = 0
                    state = _TRAILER
            elif state == _TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos + self._trailer_size > self._max_trailer:
                        raise HttpError(status, "trailer section too large")
                    break
                if eol == pos:
                    pos += 2
                    state = _DONE
                    break
                line = buf[pos:eol]
                self._trailer_size += len(line) + 2
                if self._trailer_size > self._max_trailer:
                    raise HttpError(status, "trailer section too large")
                _check_fields([line], status)
                if line.translate(None, _HEAD_BYTES) or b"\r" in line or b"\n" in line:
                    raise HttpError(status, "control character in a trailer")
                pos = eol + 2
            else:
                break
        self._state = state
        return pos


class RequestReader(_Reader):
    """Client side. `next_event()` -> RequestHead | bytes | END | NEED_DATA | PAUSED; raises HttpError."""

    __slots__ = ("max_header_size", "max_fields", "head_started")

    def __init__(self, max_header_size: int = 32 * 1024, max_body: int | None = None,
                 max_fields: int = MAX_FIELDS):
        super().__init__(400, max_body, max_header_size)
        self.max_header_size = max_header_size
        self.max_fields = max_fields

    def next_event(self):
        if self._state != _HEAD:
            if self._state == _DONE:
                return PAUSED if self._left < 0 else self._finish()
            return self._body_event()
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[:1] in (b"\r", b"\n"):  # RFC 9112 2.2: ignore empty lines before a request line
            stripped = buf.lstrip(b"\r\n")
            if len(buf) - len(stripped) > 4:
                raise HttpError(400, "malformed request line")
            self._buf = buf = stripped
            if not buf:
                return NEED_DATA
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(buf)
            eol = buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
            if eol < 0:
                if len(buf) > MAX_REQUEST_LINE:
                    raise HttpError(414, "request line longer than 8 KiB")
            elif len(buf) - eol > self.max_header_size:
                raise HttpError(431, "request header block too large")
            return NEED_DATA
        self._scanned = 0
        eol = buf.find(b"\r\n")
        if eol > MAX_REQUEST_LINE:
            raise HttpError(414, "request line longer than 8 KiB")
        if end - eol > self.max_header_size:
            raise HttpError(431, "request header block too large")
        head = parse_request_head(buf[:end], self.max_fields)
        self._buf = buf[end + 4:]
        self._begin_body(head.chunked, head.content_length)
        return head

    def _finish(self):
        self._left = -1  # marks "END already returned": PAUSED until start_next()
        return END

    @property
    def head_pending(self) -> bool:
        """Bytes of a not yet complete head are buffered (an idle connection has none)."""
        return self._state == _HEAD and bool(self._buf)

    def start_next(self) -> None:
        """The current exchange is over: parse the next (pipelined) request."""
        self._state = _HEAD
        self._left = 0
        self._scanned = 0


class ResponseReader(_Reader):
    """Backend side, one response per `start(method)`; 1xx heads are returned and parsing goes on."""

    __slots__ = ("_method", "head", "_parsed")

    def __init__(self, max_header_size: int = 64 * 1024):
        super().__init__(502, None, max_header_size)
        self._method = b"GET"
        self.head: ResponseHead | None = None
        self._parsed: ResponseHead | None = None  # a head `feed_whole` parsed; next_event returns it first
        self._state = _DONE
        self._left = -1

    def start(self, method: bytes) -> None:
        """Expect the response to a request with this method."""
        self._method = method
        self._state = _HEAD
        self._left = 0
        self._scanned = 0
        self.head = None
        self._parsed = None

    def feed_whole(self, data: bytes) -> tuple[ResponseHead, bytes] | None:
        """`feed(data)` with a fast path for the common case: `data` (nothing buffered before it) holds
        one whole final response framed by Content-Length (or bodyless) and nothing after it. Then
        `(head, body)` is returned and the reader is left exactly as after the events `next_event()`
        would have returned for it (head, body, END): idle. Otherwise returns None and the events come
        from `next_event()` as usual; a head parsed here is not parsed twice (`next_event()` returns it
        first). An invalid head raises HttpError here, as `next_event()` would."""
        if self._state != _HEAD or self._buf or self._parsed is not None:
            self.feed(data)
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self._buf = data
            return None
        head = parse_response_head(data[:end], self._method)
        self._scanned = 0
        self._buf = buf = data[end + 4:]
        if head.status >= 200:  # what next_event() does on a final head
            self.head = head
            self._begin_body(head.chunked, head.content_length, head.until_close)
            state = self._state
            if (state == _LENGTH and len(buf) == self._left) or (state == _DONE and not buf):
                self._buf = b""
                self._state = _DONE
                self._left = -1  # END returned
                return head, buf
        self._parsed = head
        return None

    def next_event(self):
        if self._parsed is not None:
            head, self._parsed = self._parsed, None
            return head
        state = self._state
        if state != _HEAD:
            if state == _DONE:
                if self._left < 0:
                    return PAUSED
                self._left = -1
                return END
            return self._body_event()
        buf = self._buf
        if not buf:
            return NEED_DATA
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(buf)
            if len(buf) > self._max_trailer:
                raise HttpError(502, "response head too large")
            return NEED_DATA
        self._scanned = 0
        head = parse_response_head(buf[:end], self._method)
        self._buf = buf[end + 4:]
        if head.status < 200:
            return head  # interim (1xx): the state stays _HEAD; 101 ends HTTP on this connection
        self.head = head
        self._begin_body(head.chunked, head.content_length, head.until_close)
        return head

    def feed_eof(self) -> str:
        """The backend closed. Returns END if that completes a read-until-close body, else raises."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self._left = -1
            return END
        if self._state == _HEAD and not self._buf:
            raise HttpError(502, "backend closed the connection without a response")
        raise HttpError(502, "backend closed the connection in the middle of the response")

    @property
    def idle(self) -> bool:
        """No response expected (PAUSED after END)."""
        return self._state == _DONE and self._left < 0
