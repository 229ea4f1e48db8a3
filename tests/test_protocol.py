"""The msgpack-RPC codec (sandboxd.wire.codec) and the error mapping, with bytes alone.

No sockets, no event loop, no daemon: every test feeds bytes to a ``Decoder``
or encodes messages and checks what comes out.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from sandboxd.wire.codec import (
    MAX_MSGID,
    BadMessage,
    Decoder,
    Notification,
    Request,
    Response,
    encode,
    encode_notification,
    encode_request,
    encode_response,
)
from sandboxd.wire.errors import (
    ERRORS_BY_CODE,
    InvalidRequest,
    NotFound,
    SandboxdError,
    TooLarge,
    from_wire,
)

pytestmark = pytest.mark.pure  # no Docker Engine: no engine start, no leak check


def decode(decoder: Decoder, data: bytes) -> list[Any]:
    """Feed ``data`` and pull every message it completes."""
    decoder.feed(data)
    return list(decoder)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def feed_all(decoder: Decoder, *chunks: bytes) -> list[Any]:
    out: list[Any] = []
    for chunk in chunks:
        out.extend(decode(decoder, chunk))
    return out


STREAM_MESSAGES: list[Any] = [
    Request(7, "sandbox.exec", [{"id": "sb1", "cmd": ["cat"], "stdin": b"\x00\xff" * 40}]),
    Response(7, None, {"exit_code": 0, "stdout": b"\x00\xff" * 40, "stderr": b""}),
    Notification("exec.output", ["ex1", "stdout", b"hello\n"]),
    Response(8, ["not_found", "No sandbox named 'x'.", {"id": "x"}], None),
    Request(0, "daemon.ping", []),
]


def encode_message(msg: Any) -> bytes:
    if isinstance(msg, Request):
        return encode_request(msg.msgid, msg.method, msg.params)
    if isinstance(msg, Response):
        return encode_response(msg.msgid, msg.error, msg.result)
    return encode_notification(msg.method, msg.params)


STREAM = b"".join(encode_message(m) for m in STREAM_MESSAGES)


# -- framing -----------------------------------------------------------------


def test_split_at_every_byte_offset() -> None:
    for cut in range(len(STREAM) + 1):
        got = feed_all(Decoder(), STREAM[:cut], STREAM[cut:])
        assert got == STREAM_MESSAGES, f"split at {cut}"


def test_split_at_every_pair_of_offsets_in_one_message() -> None:
    frame = encode_message(STREAM_MESSAGES[2])
    for a in range(len(frame) + 1):
        for b in range(a, len(frame) + 1):
            got = feed_all(Decoder(), frame[:a], frame[a:b], frame[b:])
            assert got == [STREAM_MESSAGES[2]], f"split at {a}, {b}"


def test_one_byte_at_a_time() -> None:
    decoder = Decoder()
    got = feed_all(decoder, *(STREAM[i : i + 1] for i in range(len(STREAM))))
    assert got == STREAM_MESSAGES
    assert decoder.buffered == 0


def test_several_messages_in_one_read() -> None:
    decoder = Decoder()
    assert decode(decoder, STREAM) == STREAM_MESSAGES
    assert decode(decoder, STREAM + STREAM) == STREAM_MESSAGES * 2


def test_empty_feed_returns_nothing() -> None:
    assert decode(Decoder(), b"") == []


def test_many_small_frames_totalling_more_than_the_limit() -> None:
    frames = b"".join(encode_notification("n", [i]) for i in range(200))
    assert len(frames) > 256
    got = decode(Decoder(max_frame=64), frames)
    assert got == [Notification("n", [i]) for i in range(200)]


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("msg", STREAM_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_each_kind(msg: Any) -> None:
    assert decode(Decoder(), encode_message(msg)) == [msg]


def test_encoding_is_standard_msgpack_rpc() -> None:
    assert msgpack.unpackb(encode_request(3, "daemon.ping", []), raw=False) == [
        0, 3, "daemon.ping", []]
    assert msgpack.unpackb(encode_response(3, None, "pong"), raw=False) == [1, 3, None, "pong"]
    assert msgpack.unpackb(encode_notification("event", ["s", {}]), raw=False) == [
        2, "event", ["s", {}]]


def test_binary_payloads_stay_bytes_and_strings_stay_str() -> None:
    frame = encode_request(1, "files.write", [{"path": "/a", "data": b"\x00\x01\xfe\xff"}])
    raw = msgpack.unpackb(frame, raw=False)  # bin vs str survives a plain decoder too
    assert isinstance(raw[2], str)
    assert isinstance(raw[3][0]["data"], bytes)
    [req] = decode(Decoder(), frame)
    assert isinstance(req, Request)
    assert req.params[0]["data"] == b"\x00\x01\xfe\xff"
    assert isinstance(req.params[0]["path"], str)
    assert msgpack.unpackb(encode(b"x")) == b"x"
    assert msgpack.unpackb(encode("x")) == "x"


def test_method_name_as_bin_is_accepted() -> None:
    got = decode(Decoder(), pack([0, 4, b"daemon.ping", []]) + pack([2, b"event", ["s", {}]]))
    assert got == [Request(4, "daemon.ping", []), Notification("event", ["s", {}])]


def test_method_name_as_invalid_utf8_bin_is_invalid_request_with_msgid() -> None:
    [bad] = decode(Decoder(), pack([0, 4, b"\xff\xfe", []]))
    assert isinstance(bad, BadMessage)
    assert isinstance(bad.error, InvalidRequest)
    assert (bad.msgid, bad.fatal) == (4, False)


# -- msgid range ---------------------------------------------------------------


@pytest.mark.parametrize("msgid", [0, 1, MAX_MSGID])
def test_valid_msgids(msgid: int) -> None:
    assert MAX_MSGID == 2**32 - 1
    assert decode(Decoder(), pack([0, msgid, "m", []])) == [Request(msgid, "m", [])]
    assert decode(Decoder(), pack([1, msgid, None, 1])) == [Response(msgid, None, 1)]


@pytest.mark.parametrize("msgid", [-1, 2**32, 2**63, 1.0, "1", None, True])
def test_invalid_request_msgids_are_fatal(msgid: Any) -> None:
    decoder = Decoder()
    [bad] = decode(decoder, pack([0, msgid, "m", []]))
    assert isinstance(bad, BadMessage)
    assert isinstance(bad.error, InvalidRequest)
    assert bad.msgid is None
    assert bad.fatal
    assert decode(decoder, pack([0, 1, "m", []])) == []


@pytest.mark.parametrize("msgid", [-1, 2**32])
def test_invalid_response_msgids_are_fatal(msgid: int) -> None:
    [bad] = decode(Decoder(), pack([1, msgid, None, None]))
    assert isinstance(bad, BadMessage)
    assert bad.fatal and bad.msgid is None


# -- invalid shapes --------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        [0, 9, "m"],  # too short, msgid readable
        [0, 9, "m", [], "extra"],  # too long
        [0, 9, 123, []],  # method not a string
        [0, 9, None, []],
        [0, 9, "m", {"a": 1}],  # params not an array
        [0, 9, "m", None],
    ],
)
def test_invalid_request_with_readable_msgid_is_not_fatal(obj: list[Any]) -> None:
    decoder = Decoder()
    got = decode(decoder, pack(obj) + pack([0, 10, "next", []]))
    assert len(got) == 2
    bad, nxt = got
    assert isinstance(bad, BadMessage)
    assert isinstance(bad.error, InvalidRequest)
    assert bad.error.code == "invalid_request"
    assert bad.error.message
    assert (bad.msgid, bad.fatal) == (9, False)
    assert nxt == Request(10, "next", [])


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"a": 1},
        "just a string",
        42,
        None,
        [3, 1, "m", []],  # unknown kind
        [True, 1, "m", []],  # bool is not 0/1/2
        [1, 1, None],  # response too short
        [2, "m"],  # notification too short
        [2, 5, []],  # notification method not a string
        [2, "m", {}],  # notification params not an array
        [0, "x", "m", []],  # request without a readable msgid
    ],
)
def test_invalid_shape_without_msgid_is_fatal(obj: Any) -> None:
    decoder = Decoder()
    got = decode(decoder, pack(obj) + pack([0, 1, "m", []]))
    assert len(got) == 1
    [bad] = got
    assert isinstance(bad, BadMessage)
    assert isinstance(bad.error, InvalidRequest)
    assert bad.msgid is None
    assert bad.fatal
    assert decoder.broken


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # the one byte msgpack never uses
        b"\xa2\xff\xfe",  # str with invalid UTF-8
        pack({1: 2}),  # map with a non-str key
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["reserved-byte", "bad-utf8", "int-map-key", "http"],
)
def test_non_msgpack_bytes_are_fatal(data: bytes) -> None:
    decoder = Decoder()
    got = decode(decoder, data)
    assert got, "garbage must be reported, not swallowed"
    bad = got[-1]
    assert isinstance(bad, BadMessage)
    assert isinstance(bad.error, InvalidRequest)
    assert bad.fatal and bad.msgid is None


def test_messages_before_garbage_are_still_delivered() -> None:
    got = decode(Decoder(), pack([0, 5, "m", []]) + b"\xc1" + pack([0, 6, "m", []]))
    assert got[0] == Request(5, "m", [])
    assert len(got) == 2
    assert isinstance(got[1], BadMessage) and got[1].fatal


def test_decoder_returns_nothing_after_a_fatal_error() -> None:
    decoder = Decoder()
    [bad] = decode(decoder, b"\xc1")
    assert isinstance(bad, BadMessage) and bad.fatal
    assert decoder.broken
    assert decode(decoder, pack([0, 1, "m", []])) == []
    assert decode(decoder, STREAM) == []


# -- frame size limit ----------------------------------------------------------------


def _too_large(got: list[Any]) -> BadMessage:
    assert len(got) == 1, got
    [bad] = got
    assert isinstance(bad, BadMessage)
    assert isinstance(bad.error, TooLarge)
    assert bad.error.code == "too_large"
    assert bad.fatal
    return bad


def test_frame_over_limit_reports_too_large_with_msgid() -> None:
    big = encode_request(42, "files.write", [{"id": "a", "data": b"x" * 4096}])
    assert _too_large(decode(Decoder(max_frame=1024), big)).msgid == 42


@pytest.mark.parametrize("step", [1, 3, 7, 100, 1000])
def test_frame_over_limit_in_pieces_still_reads_msgid(step: int) -> None:
    big = encode_request(MAX_MSGID, "files.write", [{"data": b"x" * 4096}])
    decoder = Decoder(max_frame=1024)
    got = feed_all(decoder, *(big[i : i + step] for i in range(0, len(big), step)))
    assert _too_large(got).msgid == MAX_MSGID
    assert decoder.buffered <= 1024


def test_frame_over_limit_after_a_good_frame_in_the_same_read() -> None:
    small = encode_request(1, "daemon.ping", [])
    big = encode_request(2, "files.write", [{"data": b"x" * 4096}])
    decoder = Decoder(max_frame=1024)
    got = decode(decoder, small + big[:20]) + decode(decoder, big[20:])
    assert got[0] == Request(1, "daemon.ping", [])
    assert _too_large(got[1:]).msgid == 2


def test_frame_over_limit_without_msgid() -> None:
    big = encode_notification("exec.output", ["e", "stdout", b"y" * 5000])
    assert _too_large(decode(Decoder(max_frame=1024), big)).msgid is None
    big_response = encode_response(3, None, b"y" * 5000)
    assert _too_large(decode(Decoder(max_frame=1024), big_response)).msgid is None


def test_frame_exactly_at_limit_is_accepted() -> None:
    limit = 200
    base = len(encode_request(7, "m", [{"d": b"x" * 100}]))
    frame = encode_request(7, "m", [{"d": b"x" * (100 + limit - base)}])
    assert len(frame) == limit
    [req] = decode(Decoder(max_frame=limit), frame)
    assert isinstance(req, Request)
    frame = encode_request(7, "m", [{"d": b"x" * (101 + limit - base)}])
    assert _too_large(decode(Decoder(max_frame=limit), frame)).msgid == 7


def test_nothing_after_too_large() -> None:
    decoder = Decoder(max_frame=64)
    _too_large(decode(decoder, encode_request(1, "m", [{"d": b"x" * 100}])))
    assert decode(decoder, encode_request(2, "m", [])) == []


# -- error mapping ------------------------------------------------------------------


SPEC_CODES = [
    "invalid_request", "too_large", "method_not_found", "invalid_params", "not_found",
    "conflict", "permission_denied", "quota_exceeded", "timeout", "engine_unavailable",
    "engine_error", "shutting_down", "internal",
]


@pytest.mark.parametrize("code", SPEC_CODES)
def test_every_spec_code_round_trips_to_its_class(code: str) -> None:
    cls = ERRORS_BY_CODE[code]
    err = cls("Something went wrong.", {"k": 1})
    wire = msgpack.unpackb(encode_response(1, err.to_wire(), None), raw=False)[2]
    back = from_wire(wire)
    assert type(back) is cls
    assert (back.code, back.message, back.data) == (code, "Something went wrong.", {"k": 1})


def test_from_wire_tolerates_other_shapes() -> None:
    unknown = from_wire(["brand_new", "Newer daemon.", None])
    assert isinstance(unknown, SandboxdError)
    assert unknown.code == "brand_new"
    pair = from_wire(["not_found", "gone"])
    assert isinstance(pair, NotFound) and pair.data is None
    bare = from_wire("something broke")
    assert bare.code == "internal" and bare.message == "something broke"
    assert from_wire([b"not_found", "bin code", None]).code == "not_found"


def test_random_and_mutated_bytes_never_raise() -> None:
    """Whatever arrives, the decoder returns messages or BadMessage; it never raises."""
    rng = random.Random(1234)
    valid = encode_request(7, "sandbox.exec", [{"id": "abc", "cmd": ["echo", "hi"], "stdin": b"x"}])
    for _ in range(3000):
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        else:
            mutated = bytearray(valid * rng.randrange(1, 3))
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated)
        decoder = Decoder(max_frame=4096)
        cut = rng.randrange(len(data) + 1)
        events = decode(decoder, data[:cut]) + decode(decoder, data[cut:])
        for event in events:
            assert isinstance(event, (Request, Response, Notification, BadMessage))
        if decoder.broken:
            assert decode(decoder, valid) == []
