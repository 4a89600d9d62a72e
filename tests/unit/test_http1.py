"""net/http1.py: bytes in, events out; no sockets."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmdaemon.net.http1 import (
    END,
    NEED_DATA,
    PAUSED,
    HttpError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
)


def events(reader, data: bytes, chunk: int | None = None):
    """Feed `data` (whole, or `chunk` bytes at a time) and collect events up to PAUSED."""
    out = []
    pieces = [data] if chunk is None or not data else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        reader.feed(piece)
        while True:
            ev = reader.next_event()
            if ev in (NEED_DATA, PAUSED):
                break
            out.append(ev)
    return out


def body_of(evs) -> bytes:
    return b"".join(e for e in evs if isinstance(e, bytes))


def error_of(data: bytes, **kw) -> HttpError:
    with pytest.raises(HttpError) as info:
        events(RequestReader(**kw), data)
    return info.value


def test_simple_get():
    evs = events(RequestReader(), b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    head, end = evs
    assert isinstance(head, RequestHead) and end == END
    assert (head.method, head.target, head.version, head.host) == (b"GET", b"/a?b=1", 11, b"x")
    assert head.headers() == [(b"Host", b"x"), (b"X-A", b"1"), (b"x-a", b"2")]
    assert head.header(b"X-a") == b"1" and head.keep_alive and not head.chunked


def test_byte_at_a_time_and_pipelining_pauses():
    reader = RequestReader()
    data = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
    evs = events(reader, data, chunk=1)
    assert [e.target for e in evs if isinstance(e, RequestHead)] == [b"/1"]
    assert reader.next_event() == PAUSED
    reader.start_next()
    head = reader.next_event()
    assert head.target == b"/2" and reader.next_event() == END


def test_content_length_body_split_from_next_request():
    reader = RequestReader()
    evs = events(reader, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET")
    assert body_of(evs) == b"hello" and evs[-1] == END
    assert reader.buffered == 3


def test_chunked_body_is_forwarded_raw():
    raw = b"5;ext=1\r\nhello\r\n0006\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    for chunk in (None, 1, 3):
        reader = RequestReader()
        evs = events(reader, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + raw + b"NEXT",
                     chunk=chunk)
        assert evs[0].chunked and body_of(evs) == raw and evs[-1] == END
        assert reader.buffered == 4


def test_http10_keep_alive_rules():
    head = events(RequestReader(), b"GET / HTTP/1.0\r\n\r\n")[0]
    assert head.version == 10 and not head.keep_alive
    head = events(RequestReader(), b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")[0]
    assert head.keep_alive
    head = events(RequestReader(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0]
    assert not head.keep_alive


def test_websocket_expect_cookie():
    head = events(RequestReader(), b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n"
                                   b"Upgrade: websocket\r\nCookie: a=1; SID=\"abc\"\r\n\r\n")[0]
    assert head.websocket and head.cookie("SID") == "abc" and head.cookie("zz") is None
    head = events(RequestReader(), b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")[0]
    assert head.expect_continue and head.idempotent


@pytest.mark.parametrize("data,status", [
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"GET /  HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n: empty\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhelloo\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /" + b"a" * 9000, 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 33000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 33000, 431),
])
def test_rejections(data, status):
    assert error_of(data).status == status


def test_body_limits():
    assert error_of(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n", max_body=10).status == 413
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello!\r\n6\r\nhello!\r\n"
    assert error_of(chunked, max_body=10).status == 413
    events(RequestReader(max_body=10), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")


def test_smaller_header_limit_is_honoured():
    assert error_of(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200 + b"\r\n\r\n", max_header_size=100).status == 431


def response_events(method, data, chunk=None):
    reader = ResponseReader()
    reader.start(method)
    return reader, events(reader, data, chunk)


def test_response_framings():
    _, evs = response_events(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
    assert evs[0].status == 200 and evs[0].keep_alive and body_of(evs) == b"ok" and evs[-1] == END
    _, evs = response_events(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
    assert body_of(evs) == b"" and evs[-1] == END
    for status in (204, 304):
        _, evs = response_events(b"GET", b"HTTP/1.1 %d X\r\nContent-Length: 20\r\n\r\n" % status)
        assert evs[-1] == END
    raw = b"2\r\nok\r\n0\r\n\r\n"
    _, evs = response_events(b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + raw, chunk=2)
    assert body_of(evs) == raw and evs[-1] == END


def test_response_until_close_and_interim():
    reader, evs = response_events(b"GET", b"HTTP/1.0 200 OK\r\n\r\nabc")
    assert evs[0].until_close and not evs[0].keep_alive and body_of(evs) == b"abc"
    assert reader.feed_eof() == END
    reader, evs = response_events(
        b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert [e.status for e in evs if isinstance(e, ResponseHead)] == [100, 201] and evs[-1] == END
    reader, evs = response_events(b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nraw")
    assert evs[0].status == 101 and reader.take_buffer() == b"raw"


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTX/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
])
def test_invalid_responses(data):
    with pytest.raises(HttpError) as info:
        response_events(b"GET", data)
    assert info.value.status == 502


def test_eof_mid_response_is_an_error():
    reader, _ = response_events(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(HttpError):
        reader.feed_eof()


# ---- property tests ---------------------------------------------------------------------------

_PARTS = [b"GET", b"POST", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r", b":", b"Host: x",
          b"Content-Length: ", b"Transfer-Encoding: chunked", b"Transfer-Encoding: ", b"0", b"5", b"ff",
          b"hello", b"\t", b";", b"Connection: close", b"\r\n\r\n", b"\x00", b"\xff", b"-", b",", b"chunked"]
_VALID = (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
          b"GET / HTTP/1.1\r\nHost: y\r\nContent-Length: 3\r\n\r\nabc")


def _check_stream(data: bytes, chunk: int) -> None:
    reader = RequestReader(max_body=1 << 20)
    for _ in range(50):
        try:
            evs = events(reader, data, chunk)
        except HttpError as exc:
            assert exc.status in (400, 413, 414, 431)
            return
        heads = [e for e in evs if isinstance(e, RequestHead)]
        for head in heads:
            # exactly one framing per message
            assert not (head.chunked and head.content_length)
        if not evs or evs[-1] != END:
            return
        reader.start_next()
        data = b""


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PARTS), max_size=40), st.integers(1, 64))
def test_token_soup_never_raises_anything_else(parts, chunk):
    _check_stream(b"".join(parts), chunk)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.binary(max_size=3)), max_size=4),
       st.integers(1, 64))
def test_mutated_requests_never_raise_anything_else(mutations, chunk):
    data = bytearray(_VALID)
    for pos, replacement in mutations:
        data[pos:pos + 1] = replacement
    _check_stream(bytes(data), chunk)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_random_responses_never_raise_anything_else(data, chunk):
    reader = ResponseReader()
    reader.start(b"GET")
    try:
        evs = events(reader, b"HTTP/1.1 200 OK\r\n" + data, chunk)
        for ev in evs:
            if isinstance(ev, ResponseHead):
                assert sum((ev.chunked, ev.until_close, ev.content_length > 0)) <= 1
    except HttpError as exc:
        assert exc.status == 502


_FIELD_PARTS = [b"Host", b"X-A", b"x-b", b":", b" ", b"\t", b"v", b"\r\n", b"a b", b"(", b"\x80", b"\xff", b",", b";"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_FIELD_PARTS), max_size=30))
def test_fast_field_split_agrees_with_the_strict_line_parser(parts):
    """The regex fast path of _split_head accepts and splits exactly like the per-line checker."""
    from pmdaemon.net.http1 import _check_fields, _split_head
    head = b"GET / HTTP/1.1\r\n" + b"".join(parts)
    try:
        first, fields = _split_head(head, 400, 1000)
    except HttpError:
        fast = "error"
    else:
        fast = fields
    try:
        lines = head.split(b"\r\n")
        if head.translate(None, bytes([9, 10, 13]) + bytes(range(32, 127)) + bytes(range(128, 256))) \
                or head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
            raise HttpError(400, "bad bytes")
        slow = _check_fields(lines[1:], 400)
    except HttpError:
        slow = "error"
    assert fast == slow


def _events_via_next_event(data: bytes, method: bytes = b"GET"):
    reader = ResponseReader()
    reader.start(method)
    reader.feed(data)
    return _drain(reader), reader


def _drain(reader: ResponseReader) -> list:
    events = []
    while True:
        ev = reader.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return events
        events.append(ev if isinstance(ev, (bytes, str)) else (ev.status, ev.content_length, ev.chunked))


@pytest.mark.parametrize("data, whole", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", False),  # body still coming
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1", False),  # bytes after the response
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nContent-Le", False),  # head not complete
])
def test_feed_whole_fast_path_equals_the_event_path(data, whole):
    expected, ref = _events_via_next_event(data)
    reader = ResponseReader()
    reader.start(b"GET")
    got = reader.feed_whole(data)
    if whole:
        head, body = got
        events = [(head.status, head.content_length, head.chunked)] + ([body] if body else []) + [END]
        assert events == expected and reader.idle and not reader.buffered
    else:
        assert got is None
        assert _drain(reader) == expected
    assert (reader.idle, reader.buffered) == (ref.idle, ref.buffered)


def test_feed_whole_raises_what_next_event_raises():
    reader = ResponseReader()
    reader.start(b"GET")
    with pytest.raises(HttpError) as exc:
        reader.feed_whole(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    assert exc.value.status == 502
