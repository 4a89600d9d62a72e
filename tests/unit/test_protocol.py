"""The control protocol (control/protocol.py), sans-I/O: framing, encoding, validation."""
from __future__ import annotations

import json

import pytest

from pmdaemon.control.protocol import (
    MAX_MESSAGE_SIZE,
    CommandFailed,
    LineBuffer,
    ProtocolError,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
)


def test_request_round_trip():
    line = encode_request("scale", {"app": "web", "n": 3})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line[:-1]) == ("scale", {"app": "web", "n": 3})


def test_answers_decode_to_result_or_failure_with_exit_status():
    assert decode_response(encode_result([{"name": "web-0"}])[:-1]) == [{"name": "web-0"}]
    with pytest.raises(CommandFailed) as failure:
        decode_response(encode_error("apps[0].script: file not found", 2)[:-1])
    assert failure.value.exit == 2 and "apps[0].script" in str(failure.value)


@pytest.mark.parametrize("line, complaint", [
    (b"garbage", "malformed"),
    (b"[1, 2]", "JSON object"),
    (b'{"v": 1, "cmd": 7}', "'cmd'"),
    (b'{"v": 1, "cmd": "list", "args": []}', "'args'"),
    (b'{"v": 99, "cmd": "list"}', "version 99"),
    (b'{"cmd": "list"}', "version None"),
    (b"\xff\xfe", "malformed"),
])
def test_bad_requests_are_protocol_errors(line, complaint):
    with pytest.raises(ProtocolError) as error:
        decode_request(line)
    assert complaint in str(error.value)
    assert error.value.exit == 2


def test_line_buffer_splits_lines_across_reads():
    buffer = LineBuffer(limit=64)
    assert buffer.feed(b'{"a"') == []
    assert buffer.feed(b':1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert buffer.pending == 4


def test_line_buffer_refuses_an_oversized_line_without_buffering_it_all():
    buffer = LineBuffer(limit=16)
    with pytest.raises(ProtocolError):
        buffer.feed(b"x" * 16)
    assert LineBuffer(limit=16).feed(b"x" * 15 + b"\n") == [b"x" * 15]
    with pytest.raises(ProtocolError):
        LineBuffer(limit=16).feed(b"x" * 16 + b"\n")


def test_an_answer_too_large_to_send_becomes_an_error():
    answer = json.loads(encode_result("x" * MAX_MESSAGE_SIZE))
    assert answer["ok"] is False and "too large" in answer["error"]


# -- a detached daemon started directly ---------------------------------------------------------
