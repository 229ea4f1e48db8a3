"""The pure frame codec (sandboxd.agent.frames): encoders, sync, decoding, violations."""

from __future__ import annotations

import struct
import zlib

import pytest

from sandboxd.agent import frames as fr

pytestmark = pytest.mark.pure

NONCE = bytes(range(16))


def agent_frame(ftype: int, ident: int, payload: bytes, flags: int = 0) -> bytes:
    """A frame as the agent writes it (payload CRC 0)."""
    head = struct.pack("<2sBBIQI", b"SB", ftype, flags, len(payload), ident, 0)
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def state(nonce: bytes = NONCE, records: bytes = b"", count: int = 0) -> bytes:
    return agent_frame(fr.FrameType.STATE, 0,
                       nonce + struct.pack("<III", 1, 256, count) + records)


def output(exec_id: int, offset: int, data: bytes, stream: int = fr.STDOUT) -> bytes:
    return agent_frame(fr.FrameType.OUTPUT, exec_id, struct.pack("<Q", offset) + data, stream)


def oversized() -> bytes:
    """An OUTPUT header claiming one byte more than MAX_PAYLOAD (valid header CRC)."""
    head = struct.pack("<2sBBIQI", b"SB", fr.FrameType.OUTPUT, 1, fr.MAX_PAYLOAD + 1, 1, 0)
    return head + struct.pack("<I", zlib.crc32(head))


def decode_all(data: bytes, nonce: bytes = NONCE) -> list[fr.AgentFrame]:
    dec = fr.Decoder(nonce)
    dec.feed(data)
    return list(dec)


def test_encoded_header_and_crcs() -> None:
    raw = fr.encode_ping(7, b"abc")
    magic, ftype, flags, length, ident, pcrc, hcrc = struct.unpack_from("<2sBBIQII", raw)
    assert (magic, ftype, flags, length, ident) == (b"SB", 0x09, 0, 3, 7)
    assert pcrc == zlib.crc32(b"abc")
    assert hcrc == zlib.crc32(raw[:20])
    assert raw[24:] == b"abc"


def test_start_payload_layout() -> None:
    raw = fr.encode_start(5, ["ls", b"-l"], env={"A": "1"}, cwd="/tmp", tty=True, stdin=True,
                          detached=True, timeout_ms=1500, rows=30, cols=100)
    payload = raw[24:]
    flags, timeout, rows, cols, argc, envc, cwd_len = struct.unpack_from("<IIHHIII", payload)
    assert (flags, timeout, rows, cols, argc, envc, cwd_len) == (7, 1500, 30, 100, 2, 1, 4)
    rest = payload[24:]
    assert rest == b"/tmp" + b"\2\0\0\0ls" + b"\2\0\0\0-l" + b"\3\0\0\0A=1"


@pytest.mark.parametrize("bad", [
    lambda: fr.encode_start(0, ["x"]),
    lambda: fr.encode_start(1, []),
    lambda: fr.encode_start(1, ["a\0b"]),
    lambda: fr.encode_start(1, ["x"], env={"A=B": "1"}),
    lambda: fr.encode_start(1, ["x"], env={"": "1"}),
    lambda: fr.encode_fread(1, "/a\0b"),
    lambda: fr.encode_stdin(1, b"x" * (fr.MAX_PAYLOAD + 1)),
    lambda: fr.encode_ping(1, b"x" * 65),
    lambda: fr.encode_hello(b"short"),
])
def test_encoders_refuse_what_the_agent_would_reject(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


def test_sync_discards_everything_before_the_matching_state() -> None:
    other = state(nonce=b"\x01" * 16)
    junk = b"garbage SB\x81 more" + other + output(3, 0, b"old")
    frames = decode_all(junk + state() + output(3, 0, b"new"))
    assert isinstance(frames[0], fr.State)
    assert frames[0].nonce == NONCE
    assert isinstance(frames[1], fr.Output)
    assert bytes(frames[1].data) == b"new"
    assert len(frames) == 2


def test_sync_survives_byte_by_byte_feeding_and_counts_discards() -> None:
    data = b"xx" + state() + output(9, 0, b"hi")
    dec = fr.Decoder(NONCE)
    got: list[fr.AgentFrame] = []
    for i in range(len(data)):
        dec.feed(data[i:i + 1])
        got.extend(dec)
    assert [type(f) for f in got] == [fr.State, fr.Output]
    assert dec.discarded == 2


def test_expect_switches_the_awaited_nonce() -> None:
    new = b"\x02" * 16
    dec = fr.Decoder(NONCE)
    dec.expect(new)
    dec.feed(state() + state(nonce=new))
    frames = list(dec)
    assert len(frames) == 1 and isinstance(frames[0], fr.State) and frames[0].nonce == new
    with pytest.raises(RuntimeError):
        dec.expect(NONCE)


def test_state_records_parse() -> None:
    rec = struct.pack("<QBBBBiQQQQ", 42, fr.REC_DETACHED | fr.REC_EXITED | fr.REC_TREE_ALIVE,
                      1, 1, 0, 137, 10, 100, 50, 7)
    st = fr.parse_state(NONCE + struct.pack("<III", 1, 256, 1) + rec)
    (r,) = st.execs
    assert (r.exec_id, r.detached, r.tty, r.stdin_open, r.exited, r.tree_alive) == (
        42, True, False, False, True, True)
    assert (r.timed_out, r.signaled, r.exit_code) == (True, True, 137)
    assert (r.start_offset, r.end_offset, r.acked, r.stdin_consumed) == (10, 100, 50, 7)


def test_every_agent_frame_decodes() -> None:
    body = struct.pack("<QIqH", 5, 0o100644, 123, 1) + b"f"
    stream = state() + b"".join([
        agent_frame(fr.FrameType.STARTED, 1, struct.pack("<i", 99)),
        agent_frame(fr.FrameType.START_FAILED, 2, struct.pack("<iI", 11, 3) + b"why"),
        output(1, 0, b"out", fr.STDERR),
        agent_frame(fr.FrameType.EXIT, 1, struct.pack("<iBBHQ", 3, 0, 1, 0, 3)),
        agent_frame(fr.FrameType.STDIN_ACK, 1, struct.pack("<Q", 8)),
        agent_frame(fr.FrameType.ERROR, 0, struct.pack("<iI", 1, 2) + b"no"),
        agent_frame(fr.FrameType.PONG, 4, b"ping"),
        agent_frame(fr.FrameType.REWOUND, 1, struct.pack("<Q", 2)),
        agent_frame(fr.FrameType.FRESULT, 6, struct.pack("<i", 0) + body),
        agent_frame(fr.FrameType.FRESULT, 7, struct.pack("<i", 2)),
    ])
    frames = decode_all(stream)
    assert frames[1:] == [
        fr.Started(1, 99), fr.StartFailed(2, 11, "why"), frames[3],
        fr.Exit(1, 3, False, True, 3), fr.StdinAck(1, 8), fr.Error(0, 1, "no"),
        fr.Pong(4, b"ping"), fr.Rewound(1, 2), fr.FResult(6, 0, body), fr.FResult(7, 2, b""),
    ]
    out = frames[3]
    assert isinstance(out, fr.Output)
    assert (out.stream, out.offset, bytes(out.data), out.end) == (fr.STDERR, 0, b"out", 3)
    entry = fr.parse_entry(body)
    assert (entry.name, entry.size, entry.mode, entry.mtime_ns, entry.is_dir) == (
        b"f", 5, 0o100644, 123, False)
    assert fr.parse_entries(struct.pack("<I", 2) + body + body) == [entry, entry]
    assert fr.parse_fread_body(struct.pack("<Q", 9) + b"abc") == (9, b"abc")


def test_output_payload_is_a_view_unless_it_straddles_feeds() -> None:
    data = state() + output(1, 0, b"a" * 1000) + output(1, 1000, b"b" * 1000)
    dec = fr.Decoder(NONCE)
    split = len(data) - 500
    dec.feed(data[:split])
    frames = list(dec)
    assert len(frames) == 2
    dec.feed(data[split:])
    (second,) = list(dec)
    assert isinstance(second, fr.Output) and bytes(second.data) == b"b" * 1000
    first = frames[1]
    assert isinstance(first, fr.Output)
    assert first.data.obj is not None and len(first.data.obj) == split  # type: ignore[arg-type]


@pytest.mark.parametrize(("after_sync", "message"), [
    (b"XB" + b"\0" * 22, "bad magic"),
    (agent_frame(fr.FrameType.PONG, 1, b"")[:20] + b"\0\0\0\0", "header CRC"),
    (agent_frame(0x42, 1, b""), "unknown frame type"),
    (agent_frame(fr.FrameType.HELLO, 1, b""), "unknown frame type"),
    (oversized(), "exceeds MAX_PAYLOAD"),
    (output(1, 0, b"x", stream=3), "stream flags"),
    (output(1, 0, b""), "without data"),
    (output(0, 0, b"x"), "exec id 0"),
    (agent_frame(fr.FrameType.EXIT, 1, b"\0" * 15), "EXIT payload"),
    (agent_frame(fr.FrameType.EXIT, 1, struct.pack("<iBBHQ", 0, 2, 0, 0, 0)), "EXIT with"),
    (agent_frame(fr.FrameType.STARTED, 1, struct.pack("<i", -1)), "pid"),
    (agent_frame(fr.FrameType.ERROR, 1, struct.pack("<iI", 1, 9) + b"x"), "does not match"),
    (agent_frame(fr.FrameType.PONG, 1, b"x" * 65), "PONG"),
    (agent_frame(fr.FrameType.FRESULT, 1, b"\0\0"), "FRESULT"),
    (agent_frame(fr.FrameType.FRESULT, 1, struct.pack("<i", 2) + b"x"), "failed FRESULT"),
    (agent_frame(fr.FrameType.STDIN_ACK, 1, b"\0" * 8, flags=1), "flags"),
    (state(count=1), "record count"),
])
def test_violations_after_sync(after_sync: bytes, message: str) -> None:
    dec = fr.Decoder(NONCE)
    dec.feed(state())
    assert isinstance(dec.next(), fr.State)
    dec.feed(after_sync)
    with pytest.raises(fr.ChannelViolation, match=message):
        dec.next()
    with pytest.raises(fr.ChannelViolation):  # it stays broken
        dec.next()


def test_bad_file_bodies_are_violations() -> None:
    with pytest.raises(fr.ChannelViolation):
        fr.parse_entry(b"\0" * 10)
    with pytest.raises(fr.ChannelViolation):
        fr.parse_entry(struct.pack("<QIqH", 1, 1, 1, 5) + b"ab")
    with pytest.raises(fr.ChannelViolation):
        fr.parse_entries(struct.pack("<I", 3))
    with pytest.raises(fr.ChannelViolation):
        fr.parse_fread_body(b"\0")


def test_incomplete_frame_waits_for_more() -> None:
    data = state() + output(1, 0, b"abcdef")
    dec = fr.Decoder(NONCE)
    dec.feed(data[:-3])
    assert isinstance(dec.next(), fr.State)
    assert dec.next() is None
    dec.feed(data[-3:])
    out = dec.next()
    assert isinstance(out, fr.Output) and bytes(out.data) == b"abcdef"
    assert dec.next() is None


def test_feed_keeps_slices_of_bytes_and_copies_mutable_buffers() -> None:
    dec = fr.Decoder(NONCE)
    dec.feed(state())
    assert isinstance(dec.next(), fr.State)
    wire = b"\x01\x00\x00\x00" + output(1, 0, b"xyz")
    dec.feed(memoryview(wire)[4:])  # e.g. an engine stream frame's payload
    (out,) = list(dec)
    assert isinstance(out, fr.Output) and out.data.obj is wire
    mutable = bytearray(output(1, 3, b"abc"))
    dec.feed(mutable)
    mutable[-1:] = b"!"
    (second,) = list(dec)
    assert isinstance(second, fr.Output) and bytes(second.data) == b"abc"
