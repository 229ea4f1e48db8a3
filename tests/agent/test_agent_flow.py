"""Output flow through a local agent: the send window, blocking and dropping modes, REWIND,
re-sending after a new HELLO, RELEASE, and the exec limit."""

from __future__ import annotations

import pytest
from agentproc import Agent, pid_alive

from sandboxd.agent import frames as fr

pytestmark = pytest.mark.pure

MIB = 1 << 20


def received(agent: Agent, exec_id: int) -> int:
    return sum(len(c.data) for c in agent.execs[exec_id].chunks)


def assemble(chunks: list[fr.Output], start: int, end: int) -> bytes:
    """The bytes [start, end) from chunks (duplicates allowed); every byte must be covered."""
    buf = bytearray(end - start)
    seen = bytearray(end - start)
    for c in chunks:
        lo, hi = max(c.offset, start), min(c.end, end)
        if lo < hi:
            buf[lo - start:hi - start] = c.data[lo - c.offset:hi - c.offset]
            seen[lo - start:hi - start] = b"\1" * (hi - lo)
    assert all(seen), "some offsets were never received"
    return bytes(buf)


def spans(chunks: list[fr.Output]) -> list[tuple[int, int]]:
    """The offsets chunks cover, as sorted disjoint [start, end) spans."""
    merged: list[tuple[int, int]] = []
    for c in sorted(chunks, key=lambda c: c.offset):
        if merged and c.offset <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], c.end))
        else:
            merged.append((c.offset, c.end))
    return merged


def record(state: fr.State, exec_id: int) -> fr.ExecRecord:
    (rec,) = [r for r in state.execs if r.exec_id == exec_id]
    return rec


def test_blocking_mode_stops_the_writer_until_acked(agent: Agent) -> None:
    agent.auto_ack = False
    total = 5 * MIB
    writer = agent.start(["head", "-c", str(total), "/dev/zero"])
    # Exactly one window arrives, then nothing until an ACK.
    agent.wait(lambda: received(agent, writer) >= fr.SEND_WINDOW, what="one window")
    # Meanwhile another exec is served normally.
    agent.auto_ack = True
    other = agent.run(["echo", "other"])
    assert other.stdout == b"other\n"
    agent.auto_ack = False
    assert received(agent, writer) == fr.SEND_WINDOW
    res = agent.execs[writer]
    assert res.exit is None and res.pid is not None and pid_alive(res.pid)
    # The agent holds one ring and stopped reading: the writer is blocked.
    state = agent.rehello()
    rec = record(state, writer)
    assert rec.end_offset == fr.RING and not rec.exited and rec.acked == 0
    # Acking lets it finish; every byte came (the window re-sent after HELLO, too).
    agent.auto_ack = True
    agent.send(fr.encode_ack(writer, fr.SEND_WINDOW))
    res = agent.wait_exit(writer, timeout=30)
    assert res.code == 0 and res.exit is not None and res.exit.end_offset == total
    at = 0
    for c in sorted(res.chunks, key=lambda c: c.offset):
        assert c.offset <= at and c.end <= total and not any(bytes(c.data))
        at = max(at, c.end)
    assert at == total


def test_detached_dropping_mode_keeps_the_last_ring_per_stream(agent: Agent) -> None:
    agent.auto_ack = False
    big = 3_000_000
    script = f"echo first >&2; head -c {big} /dev/zero | tr '\\0' a; echo tail >&2"
    exec_id = agent.start(["sh", "-c", script], detached=True)
    # Nobody acks, yet the process runs to its end (output never stops it).
    agent.wait(lambda: (st := agent.rehello()) and record(st, exec_id).exited,
               timeout=20, what="the detached exec to exit")
    rec = record(agent.rehello(), exec_id)
    end = big + len("first\n") + len("tail\n")
    assert rec.end_offset == end
    # Replay everything still held.
    agent.frames.clear()
    res = agent.execs[exec_id]
    res.chunks.clear()
    res.exit = None
    agent.auto_ack = True
    agent.send(fr.encode_rewind(exec_id, 0))
    assert agent.take(fr.Rewound, lambda r: r.exec_id == exec_id).offset == rec.start_offset
    agent.wait_exit(exec_id)
    # (Output re-sent after the last HELLO may arrive too: count offsets, not chunks.)
    out = spans([c for c in res.chunks if c.stream == fr.STDOUT])
    err = {o: c.data[o - c.offset] for c in res.chunks if c.stream == fr.STDERR
           for o in range(c.offset, c.end)}
    # Each stream keeps its own last RING bytes: all of stderr, the tail of stdout.
    assert bytes(err[o] for o in sorted(err)) == b"first\ntail\n"
    assert sum(hi - lo for lo, hi in out) == fr.RING
    assert all(not bytes(c.data).strip(b"a") for c in res.chunks if c.stream == fr.STDOUT)
    held = spans(res.chunks)
    assert rec.start_offset == held[0][0]
    # Asking for a dropped offset: REWOUND says where the replay really starts.
    dropped = out[0][0] - 1
    assert not any(lo <= dropped < hi for lo, hi in held)
    agent.send(fr.encode_rewind(exec_id, dropped))
    rewound = agent.take(fr.Rewound, lambda r: r.exec_id == exec_id)
    assert rewound.offset == min(lo for lo, _ in held if lo > dropped)


def test_rewind_from_zero_replays_everything_still_held(agent: Agent) -> None:
    res = agent.run(["sh", "-c", "echo one; echo two >&2"], release=False)
    agent.execs[res.exec_id].chunks.clear()
    res.exit = None
    agent.send(fr.encode_rewind(res.exec_id, 0))
    assert agent.take(fr.Rewound, lambda r: r.exec_id == res.exec_id).offset == 0
    res = agent.wait_exit(res.exec_id)  # EXIT is sent again after the replay
    assert res.stdout == b"one\n" and res.stderr == b"two\n"


def test_new_hello_resends_unacked_output_and_exits(agent: Agent) -> None:
    agent.auto_ack = False
    exec_id = agent.start(["sh", "-c", "echo hello; echo oops >&2; exit 3"])
    first = agent.wait_exit(exec_id)
    assert first.stdout == b"hello\n" and first.code == 3
    first.chunks.clear()
    first.exit = None
    state = agent.rehello()
    rec = record(state, exec_id)
    assert (rec.exited, rec.exit_code, rec.acked, rec.end_offset) == (True, 3, 0, 11)
    again = agent.wait_exit(exec_id)
    assert again.stdout == b"hello\n" and again.stderr == b"oops\n" and again.code == 3
    # Once acknowledged, only the EXIT comes back.
    agent.send(fr.encode_ack(exec_id, 11))
    again.chunks.clear()
    again.exit = None
    rec = record(agent.rehello(), exec_id)
    assert rec.acked == 11
    assert agent.wait_exit(exec_id).chunks == []


def test_ack_beyond_what_was_sent_is_clamped(agent: Agent) -> None:
    agent.auto_ack = False
    exec_id = agent.start(["echo", "abc"])
    agent.wait_exit(exec_id)
    agent.send(fr.encode_ack(exec_id, 1 << 40))
    assert record(agent.rehello(), exec_id).acked == 4


def test_release_forgets_the_exec(agent: Agent) -> None:
    exec_id = agent.run(["true"], release=False).exec_id
    assert [r.exec_id for r in agent.rehello().execs] == [exec_id]
    agent.send(fr.encode_release(exec_id))
    assert agent.rehello().execs == ()
    agent.send(fr.encode_signal(exec_id, 15))
    err = agent.take(fr.Error, lambda e: e.ident == exec_id)
    assert err.code == fr.ErrorCode.UNKNOWN_EXEC


def test_release_of_a_running_exec_leaves_its_tree(agent: Agent) -> None:
    exec_id = agent.start(["sleep", "30"])
    agent.wait(lambda: agent.execs[exec_id].pid, what="STARTED")
    pid = agent.execs[exec_id].pid
    assert pid is not None
    agent.send(fr.encode_release(exec_id))
    assert agent.rehello().execs == ()
    assert pid_alive(pid)  # the agent's end kills it (checked by the fixture)


def test_many_execs_up_to_max_execs_then_eagain(agent: Agent) -> None:
    ids = [agent.start(["sleep", "30"]) for _ in range(fr.MAX_EXECS)]
    agent.wait(lambda: all(agent.execs[i].pid for i in ids), timeout=30,
               what="every exec to start")
    extra = agent.start(["true"])
    agent.wait(lambda: agent.execs[extra].start_failed, what="START_FAILED")
    failed = agent.execs[extra].start_failed
    assert failed is not None and failed.errno == 11  # EAGAIN
    dup = ids[0]
    agent.send(fr.encode_start(dup, ["true"]))
    failed = agent.take(fr.StartFailed, lambda f: f.exec_id == dup)
    assert failed.errno == 17  # EEXIST
    state = agent.rehello()
    assert len(state.execs) == fr.MAX_EXECS
    assert all(r.tree_alive and not r.exited for r in state.execs)
    agent.send(fr.encode_signal(ids[0], 9))
    agent.wait_exit(ids[0])
    agent.send(fr.encode_release(ids[0]))
    assert agent.run(["echo", "room"]).stdout == b"room\n"


def test_ping_is_echoed(agent: Agent) -> None:
    agent.send(fr.encode_ping(77, b"payload"))
    assert agent.take(fr.Pong).data == b"payload"
