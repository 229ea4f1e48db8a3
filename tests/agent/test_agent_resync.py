"""The agent's side of resynchronisation: garbage, a corrupted CRC, a partial frame followed
by silence; malformed payloads. After each the channel works."""

from __future__ import annotations

import os
import struct
import time
import zlib

import pytest
from agentproc import Agent

from sandboxd.agent import frames as fr

pytestmark = pytest.mark.pure


def ping_ok(agent: Agent, ident: int) -> None:
    agent.send(fr.encode_ping(ident, b"p%d" % ident))
    assert agent.take(fr.Pong, lambda p: p.ident == ident).data == b"p%d" % ident


def bad_frame_errors(agent: Agent) -> list[fr.Error]:
    return [f for f in agent.frames
            if isinstance(f, fr.Error) and f.code == fr.ErrorCode.BAD_FRAME]


def test_garbage_before_the_first_hello(agent_bin: object) -> None:
    from pathlib import Path
    a = Agent(Path(str(agent_bin)))
    try:
        a.send(os.urandom(5000) + b"SB" + os.urandom(100))
        state = a.handshake()
        assert state.execs == ()
        ping_ok(a, 1)
    finally:
        a.close()


def test_garbage_then_frames(agent: Agent) -> None:
    agent.send(os.urandom(3000).replace(b"S", b"s") + b"SBSB" + b"S")
    ping_ok(agent, 2)
    errors = bad_frame_errors(agent)
    assert len(errors) == 1  # one ERROR per recovery


def test_corrupted_payload_crc_is_never_acted_on(agent: Agent) -> None:
    frame = bytearray(fr.encode_start(5, ["sh", "-c", "echo ran"]))
    frame[-1] ^= 0x01
    agent.send(bytes(frame))
    ping_ok(agent, 3)
    assert len(bad_frame_errors(agent)) == 1
    assert not any(isinstance(f, (fr.Started, fr.StartFailed)) for f in agent.frames)
    assert agent.rehello().execs == ()


def test_corrupted_header_crc(agent: Agent) -> None:
    frame = bytearray(fr.encode_ping(4, b"x"))
    frame[21] ^= 0xFF
    agent.send(bytes(frame))
    ping_ok(agent, 5)
    assert len(bad_frame_errors(agent)) == 1
    assert not any(isinstance(f, fr.Pong) and f.ident == 4 for f in agent.frames)


def test_oversized_length_is_a_bad_header(agent: Agent) -> None:
    head = struct.pack("<2sBBIQI", b"SB", fr.FrameType.STDIN, 0, fr.MAX_PAYLOAD + 1, 1, 0)
    agent.send(head + struct.pack("<I", zlib.crc32(head)))
    ping_ok(agent, 6)
    assert len(bad_frame_errors(agent)) == 1


def test_partial_frame_followed_by_silence(agent: Agent) -> None:
    frame = fr.encode_start(9, ["true"])
    agent.send(frame[: len(frame) // 2])
    t0 = time.monotonic()
    err = agent.take(fr.Error, lambda e: e.code == fr.ErrorCode.BAD_FRAME)
    waited = time.monotonic() - t0
    assert fr.PARTIAL_FRAME_MS / 1000 * 0.9 <= waited < 3
    assert "stale" in err.message
    ping_ok(agent, 7)
    assert agent.rehello().execs == ()


def test_partial_frame_then_a_new_daemons_hello(agent: Agent) -> None:
    # A daemon died mid-frame; the next one's HELLO lands inside the claimed payload.
    frame = fr.encode_stdin(3, b"z" * 5000)
    agent.send(frame[:100])
    state = agent.rehello()
    assert state.execs == ()
    ping_ok(agent, 8)


def test_partial_header_then_silence(agent: Agent) -> None:
    agent.send(fr.encode_ping(1, b"")[:10])
    agent.take(fr.Error, lambda e: e.code == fr.ErrorCode.BAD_FRAME)
    ping_ok(agent, 9)


@pytest.mark.parametrize(("ftype", "ident", "payload"), [
    (fr.FrameType.HELLO, 0, b"short"),
    (fr.FrameType.START, 1, b"\0" * 10),
    (fr.FrameType.START, 1, struct.pack("<IIHHIII", 0, 0, 0, 0, 0, 0, 0)),  # argc 0
    (fr.FrameType.START, 1, struct.pack("<IIHHIII", 0, 0, 0, 0, 1, 0, 0) + b"\5\0\0\0ab"),
    (fr.FrameType.START, 1, struct.pack("<IIHHIII", 0, 0, 0, 0, 1, 1, 0)
     + b"\1\0\0\0a" + b"\3\0\0\0abc"),  # env entry without '='
    (fr.FrameType.START, 1, struct.pack("<IIHHIII", 0, 0, 0, 0, 0xFFFFFFFF, 0, 0)),
    (fr.FrameType.START, 0, struct.pack("<IIHHIII", 0, 0, 0, 0, 1, 0, 0) + b"\1\0\0\0a"),
    (fr.FrameType.SIGNAL, 1, b"\0"),
    (fr.FrameType.SIGNAL, 1, struct.pack("<I", 999)),
    (fr.FrameType.ACK, 1, b"\0" * 7),
    (fr.FrameType.RELEASE, 1, b"x"),
    (fr.FrameType.PING, 1, b"x" * 65),
    (fr.FrameType.FREAD, 1, b"\0" * 11),
    (fr.FrameType.FWRITE, 1, struct.pack("<QIII", 0, 0, 0, 100) + b"/x"),
])
def test_malformed_payloads_get_bad_payload(agent: Agent, ftype: int, ident: int,
                                            payload: bytes) -> None:
    if ftype == fr.FrameType.SIGNAL and len(payload) == 4:
        agent.start(["sleep", "30"], exec_id=ident)
    agent.send(fr.encode_frame(ftype, ident, payload))
    err = agent.take(fr.Error)
    assert err.code == fr.ErrorCode.BAD_PAYLOAD and err.ident == ident
    ping_ok(agent, 10)


def test_unknown_exec_ids(agent: Agent) -> None:
    for frame in (fr.encode_stdin(77, b"x"), fr.encode_close_stdin(77), fr.encode_ack(77, 1),
                  fr.encode_resize(77, 1, 1), fr.encode_rewind(77, 0), fr.encode_release(77)):
        agent.send(frame)
        assert agent.take(fr.Error).code == fr.ErrorCode.UNKNOWN_EXEC
