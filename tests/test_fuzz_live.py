"""Random and mutated messages against a live daemon (hypothesis).

Each example sends a batch of frames on a fresh connection: random msgpack
values, well-formed requests with random methods and arguments, and valid
requests with bits flipped, bytes cut or spliced. After every batch the
daemon must still be running and must answer another client's ``daemon.ping``
at once. The daemon's policy allows no image, so no example can make a
sandbox by chance.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from conftest import Daemon, raw_call, started_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SpawnDaemon = Callable[..., Daemon]

METHODS = [
    "daemon.ping", "daemon.info", "sandbox.create", "sandbox.get", "sandbox.list",
    "sandbox.pause", "sandbox.resume", "sandbox.extend", "sandbox.remove", "sandbox.stats",
    "sandbox.exec", "events.subscribe", "events.unsubscribe", "exec.start", "files.read",
    "no.such.method", "",
]

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=64)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=12) | st.integers() | st.binary(max_size=8), inner,
                      max_size=6),
    max_leaves=30,
)
named_args = st.dictionaries(
    st.sampled_from(["id", "cmd", "ttl", "memory", "image", "name", "labels", "since",
                     "types", "subscription", "stdin", "timeout", "x"]),
    values, max_size=5,
)
requests = st.builds(
    lambda msgid, method, params: [0, msgid, method, params],
    st.integers(min_value=-5, max_value=2**32 + 5) | st.none() | st.text(max_size=3),
    st.sampled_from(METHODS) | st.text(max_size=20) | st.binary(max_size=10),
    st.just([]) | st.lists(named_args, max_size=2) | values,
)
messages = requests | values | st.lists(values, max_size=5)


def pack(obj: Any) -> bytes:
    try:
        return bytes(msgpack.packb(obj, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return b"\xc1"  # a value msgpack cannot carry: send a byte msgpack never uses


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif choice < 0.6 and data:
            del data[rng.randrange(len(data)) :]
        elif choice < 0.8:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        else:
            i = rng.randrange(len(data) + 1)
            data[i:i] = bytes([rng.choice([0xC6, 0xDB, 0xDD, 0xDF, 0xC9])]) + b"\xff\xff\xff"
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_daemon(engine: None) -> Iterator[Daemon]:
    with started_daemon('[policy]\nimages = []\n[limits]\nframe_timeout = 1\n',
                        prefix="sbd-fz-") as d:
        yield d


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(messages, min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1),
       mutated=st.booleans())
def test_random_and_mutated_messages_never_disturb_the_daemon(
    fuzz_daemon: Daemon, batch: list[Any], seed: int, mutated: bool
) -> None:
    d = fuzz_daemon
    rng = random.Random(seed)
    data = b"".join(pack(m) for m in batch)
    if mutated:
        data = mutate(data, rng)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(d.socket)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # read replies until the daemon is done with us
                pass
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass  # the daemon may cut a connection that sent garbage; it must not fall over
    assert d.proc is not None and d.proc.poll() is None, d.log()[-2000:]
    assert raw_call(d.socket, "daemon.ping", timeout=5) == [1, 1, None, "pong"]
