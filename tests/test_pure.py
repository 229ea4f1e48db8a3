"""The daemon's pure logic, without the engine: demultiplexing, output capture,
argument validation, units, configuration, policy, the state machine and the
deadline scheduler.

Nothing here talks to Docker or starts a daemon; the scheduler tests use the
real event loop with deadlines tens of milliseconds ahead and wait on events
the callback sets, never on sleeps.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxd.backend.docker.demux import STDERR, STDIN, STDOUT, Demuxer, DemuxError
from sandboxd.config import Config, ConfigError, load_config
from sandboxd.core import status as lifecycle
from sandboxd.core.output import OutputCapture
from sandboxd.core.policy import CreateSpec, resolve_create
from sandboxd.rpc.params import (
    Field,
    binary,
    boolean,
    integer,
    number,
    one_of,
    size,
    string,
    string_list,
    string_map,
    validate,
)
from sandboxd.services.diskguard import ASSUMED_RATE, COST_SHARE, MIN_INTERVAL, next_look
from sandboxd.services.health import EngineInfo
from sandboxd.services.scheduler import DeadlineScheduler
from sandboxd.wire.errors import (
    Conflict,
    EngineUnavailable,
    InvalidParams,
    PermissionDenied,
    TooLarge,
)
from sandboxd.wire.units import format_time, parse_size, parse_time

pytestmark = pytest.mark.pure  # no Docker Engine: no engine start, no leak check


def resolve(args: dict[str, Any], config: Config) -> CreateSpec:
    return resolve_create(args, config.defaults, config.policy)

MIB = 1024 * 1024


# -- demux ------------------------------------------------------------------


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


FRAMES: list[tuple[int, bytes]] = [
    (STDOUT, b"hello\n"),
    (STDERR, b""),
    (STDERR, bytes(range(256))),
    (STDOUT, b""),
    (STDOUT, b"\x01\x00\x00\x00\x00\x00\x00\x05"),  # payload that looks like a header
    (STDERR, b"  trailing spaces and newlines \n\n"),
    (STDOUT, random.Random(7).randbytes(100_000)),
    (STDERR, b"x"),
    (STDOUT, b"\r\n"),
]
STREAM = b"".join(frame(s, p) for s, p in FRAMES)
EXPECTED = {
    STDOUT: b"".join(p for s, p in FRAMES if s == STDOUT),
    STDERR: b"".join(p for s, p in FRAMES if s == STDERR),
}


def demux_chunks(chunks: Iterator[bytes] | list[bytes]) -> tuple[dict[int, bytes], Demuxer]:
    demuxer = Demuxer()
    out: dict[int, bytearray] = {STDOUT: bytearray(), STDERR: bytearray()}
    for chunk in chunks:
        for stream, data in demuxer.feed(chunk):
            assert isinstance(data, bytes)
            out[stream] += data
    return {k: bytes(v) for k, v in out.items()}, demuxer


def test_demux_all_at_once() -> None:
    out, demuxer = demux_chunks([STREAM])
    assert out == EXPECTED
    assert not demuxer.mid_frame


def test_demux_split_in_two_at_every_offset() -> None:
    # The big frame's payload is skipped over in larger steps; every header and small
    # payload boundary is split at each byte.
    big_start = STREAM.index(FRAMES[6][1][:64])
    big_end = big_start + len(FRAMES[6][1])
    offsets = [*range(0, big_start + 64), *range(big_start + 64, big_end - 64, 997),
               *range(big_end - 64, len(STREAM) + 1)]
    for cut in offsets:
        out, demuxer = demux_chunks([STREAM[:cut], STREAM[cut:]])
        assert out == EXPECTED, f"split at {cut}"
        assert not demuxer.mid_frame


def test_demux_one_byte_at_a_time() -> None:
    out, demuxer = demux_chunks(STREAM[i : i + 1] for i in range(len(STREAM)))
    assert out == EXPECTED
    assert not demuxer.mid_frame


def test_demux_random_chunking() -> None:
    rng = random.Random(42)
    for _ in range(50):
        chunks, pos = [], 0
        while pos < len(STREAM):
            n = rng.choice([1, 2, 7, 8, 9, 100, 4096, 65536])
            chunks.append(STREAM[pos : pos + n])
            pos += n
        assert demux_chunks(chunks)[0] == EXPECTED


def test_demux_empty_feed_and_mid_frame() -> None:
    demuxer = Demuxer()
    assert demuxer.feed(b"") == []
    assert demuxer.feed(frame(STDOUT, b"abc")[:5]) == []
    assert demuxer.mid_frame  # inside a header
    assert demuxer.feed(frame(STDOUT, b"abc")[5:10]) == [(STDOUT, b"ab")]
    assert demuxer.mid_frame  # inside a payload
    assert demuxer.feed(frame(STDOUT, b"abc")[10:]) == [(STDOUT, b"c")]
    assert not demuxer.mid_frame


def test_demux_stdin_frames_count_as_stdout() -> None:
    out, _ = demux_chunks([frame(STDIN, b"tty-ish"), frame(STDERR, b"e")])
    assert out == {STDOUT: b"tty-ish", STDERR: b"e"}


@pytest.mark.parametrize("stream_id", [3, 4, 0x41, 255])
def test_demux_bad_stream_id_raises(stream_id: int) -> None:
    with pytest.raises(DemuxError, match=str(stream_id)):
        Demuxer().feed(frame(STDOUT, b"ok") + frame(stream_id, b"bad"))
    # Also when the bad header arrives a byte at a time.
    demuxer = Demuxer()
    bad = frame(stream_id, b"x")
    with pytest.raises(DemuxError):
        for i in range(len(bad)):
            demuxer.feed(bad[i : i + 1])


# -- output capture ---------------------------------------------------------


def capture(data: bytes, limit: int, piece: int | None = None) -> OutputCapture:
    cap = OutputCapture(limit)
    if piece is None:
        cap.append(data)
    else:
        for i in range(0, len(data), piece):
            cap.append(data[i : i + piece])
    return cap


def common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("n", [0, 1, 999, 1000])
def test_output_under_or_at_the_limit_is_whole(n: int) -> None:
    data = os.urandom(n)
    cap = capture(data, 1000)
    assert cap.result() == data
    assert cap.truncated is False
    assert cap.total == n


@pytest.mark.parametrize(("n", "limit"), [(1001, 1000), (5000, 1000), (1_000_000, 4096),
                                          (300_000, 100_000)])
def test_output_over_the_limit_keeps_head_and_tail(n: int, limit: int) -> None:
    # Non-ASCII bytes only: the marker (ASCII) then cannot be mistaken for kept data.
    data = bytes(b | 0x80 for b in os.urandom(n))
    cap = capture(data, limit)
    out = cap.result()
    assert cap.truncated is True
    assert cap.total == n
    assert len(out) <= limit
    head = common_prefix(out, data)
    tail = common_prefix(out[::-1], data[::-1])
    assert head >= limit // 4, "the head was not kept"
    assert tail >= limit // 4, "the tail was not kept"
    assert head + tail < len(out), "no marker between head and tail"
    marker = out[head : len(out) - tail]
    assert str(n - head - tail).encode() in marker  # says how much was left out


@pytest.mark.parametrize("piece", [1, 7, 100, 999, 1000, 1001, 65536])
def test_output_pieces_give_the_same_result(piece: int) -> None:
    data = random.Random(piece).randbytes(150_000)
    for limit in (1000, 4096, 200_000):
        whole = capture(data, limit)
        split = capture(data, limit, piece)
        assert split.result() == whole.result(), (piece, limit)
        assert (split.truncated, split.total) == (whole.truncated, whole.total)


@pytest.mark.parametrize("limit", [0, 1, 10, 50])
def test_output_tiny_limits_stay_within_the_limit(limit: int) -> None:
    cap = capture(b"z" * 500, limit)
    assert cap.truncated is True
    assert len(cap.result()) <= limit


def test_output_capture_never_refuses_bytes() -> None:
    cap = OutputCapture(4096)
    for _ in range(2000):
        cap.append(b"\0" * 10_000)
    assert cap.total == 20_000_000
    assert len(cap.result()) <= 4096


# -- params -------------------------------------------------------------------

SPEC = {
    "id": Field(string(16), required=True),
    "n": Field(integer(0, 10)),
    "x": Field(number(0.0, 5.0)),
    "flag": Field(boolean()),
    "memory": Field(size()),
    "cmd": Field(string_list(4, 100, min_items=1)),
    "env": Field(string_map(max_items=2)),
    "data": Field(binary(8)),
    "mode": Field(one_of("a", "b")),
}
OPTIONAL = {k: f for k, f in SPEC.items() if k != "id"}


def test_params_accepts_named_arguments() -> None:
    args = validate(SPEC, [{"id": "sb", "n": 3, "x": 1, "flag": False, "memory": "512m",
                            "cmd": ["echo", ""], "env": {"A": ""}, "data": b"\0\xff",
                            "mode": "b"}])
    assert args == {"id": "sb", "n": 3, "x": 1.0, "flag": False, "memory": 512 * MIB,
                    "cmd": ["echo", ""], "env": {"A": ""}, "data": b"\0\xff", "mode": "b"}
    assert isinstance(args["x"], float)


def test_params_bin_strings_are_accepted_as_str() -> None:
    assert validate(SPEC, [{"id": b"sb"}]) == {"id": "sb"}


@pytest.mark.parametrize("params", [[], [{}]])
def test_params_empty_shapes_are_ok(params: list[Any]) -> None:
    assert validate(OPTIONAL, params) == {}


def test_params_absent_and_nil_optionals_are_missing() -> None:
    assert validate(OPTIONAL, [{"n": None}]) == {}


@pytest.mark.parametrize("params", [[1], [{}, {}], ["id"], [[{}]], [None]])
def test_params_bad_shapes(params: list[Any]) -> None:
    with pytest.raises(InvalidParams, match="params"):
        validate(OPTIONAL, params)


def test_params_unknown_argument_is_named() -> None:
    with pytest.raises(InvalidParams, match="bogus") as info:
        validate(SPEC, [{"id": "sb", "bogus": 1}])
    assert info.value.data == {"unknown": ["bogus"]}
    assert "id" in info.value.message  # lists what the method takes


def test_params_missing_required() -> None:
    with pytest.raises(InvalidParams, match="'id'") as info:
        validate(SPEC, [{"n": 1}])
    assert info.value.data == {"argument": "id"}
    with pytest.raises(InvalidParams, match="'id'"):
        validate(SPEC, [])
    with pytest.raises(InvalidParams, match="'id'"):
        validate(SPEC, [{"id": None}])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", True),  # bool is not an int
        ("n", False),
        ("n", "3"),
        ("n", 3.0),
        ("n", -1),
        ("n", 11),
        ("x", True),
        ("x", "1"),
        ("x", float("nan")),
        ("x", float("inf")),
        ("x", 5.5),
        ("flag", 1),
        ("flag", "true"),
        ("id", ""),
        ("id", 5),
        ("id", "a" * 17),
        ("id", "nul\0"),
        ("id", b"\xff\xfe"),
        ("cmd", []),
        ("cmd", "echo hi"),
        ("cmd", ["a", 1]),
        ("cmd", ["a"] * 5),
        ("env", ["A=1"]),
        ("env", {"A": 1}),
        ("env", {"A": "1", "B": "2", "C": "3"}),
        ("data", 5),
        ("mode", "c"),
        ("memory", "12q"),
        ("memory", True),
        ("memory", -5),
    ],
)
def test_params_wrong_types_name_the_argument(name: str, value: Any) -> None:
    args = {"id": "sb", name: value}
    with pytest.raises(InvalidParams, match=name) as info:
        validate(SPEC, [args])
    assert info.value.code == "invalid_params"


def test_params_binary_over_limit_is_too_large() -> None:
    with pytest.raises(TooLarge, match="data"):
        validate(SPEC, [{"id": "sb", "data": b"123456789"}])


def test_params_size_forms() -> None:
    assert validate(OPTIONAL, [{"memory": "512m"}]) == {"memory": 512 * 1024**2}
    assert validate(OPTIONAL, [{"memory": 1234}]) == {"memory": 1234}
    assert validate(OPTIONAL, [{"memory": "1g"}]) == {"memory": 1024**3}


# -- units --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512m", 512 * MIB), ("512M", 512 * MIB), ("1g", 1024**3), ("10k", 10240), ("7b", 7),
     ("100", 100), ("1.5k", 1536), ("64mb", 64 * MIB), (0, 0), (12345, 12345)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12q", "", "m", "-1m", "1 2m", "1t", True, -1, 1.5, None, [1]])
def test_parse_size_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    assert format_time(1.5) == "1970-01-01T00:00:01.500Z"
    assert format_time(1_800_000_000.25) == "2027-01-15T08:00:00.250Z"
    now = format_time(time.time())
    assert now.endswith("Z") and len(now) == len("2026-11-26T15:04:05.123Z")
    assert now[19] == "." and now[20:23].isdigit()


def test_parse_time_round_trip() -> None:
    for ts in (0.0, 1.5, 1_800_000_000.25, 1_700_000_000.125):
        assert parse_time(format_time(ts)) == ts
    now = time.time()
    assert abs(parse_time(format_time(now)) - now) < 0.001
    assert parse_time("2026-01-01T01:00:00.000+01:00") == parse_time("2026-01-01T00:00:00.000Z")


# -- config -------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sandboxd.toml"
    path.write_text(text)
    return str(path)


def test_config_builtin_defaults() -> None:
    cfg = load_config(None, env={})
    assert cfg.defaults.memory == 512 * MIB
    assert (cfg.defaults.cpus, cfg.defaults.pids, cfg.defaults.ttl) == (1.0, 256, 300.0)
    assert (cfg.defaults.workdir, cfg.defaults.network) == ("/workspace", "none")
    assert cfg.defaults.max_output == MIB
    assert cfg.policy.networks == ["none"] and cfg.policy.cap_add == []
    assert cfg.events.retain == 10000


def test_config_file_values_are_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, """
socket = "/tmp/file.sock"
[defaults]
memory = "256m"
cpus = 2
ttl = 60
[policy]
images = ["sandboxd/*"]
max_memory = "1g"
networks = ["none", "bridge"]
[quota]
max_sandboxes = 5
""")
    cfg = load_config(path, env={})
    assert cfg.socket == "/tmp/file.sock"
    assert cfg.defaults.memory == 256 * MIB
    assert cfg.defaults.cpus == 2.0 and isinstance(cfg.defaults.cpus, float)
    assert cfg.defaults.ttl == 60.0
    assert cfg.policy.images == ["sandboxd/*"]
    assert cfg.policy.max_memory == 1024**3
    assert cfg.policy.networks == ["none", "bridge"]
    assert cfg.quota.max_sandboxes == 5


def test_config_pools_are_parsed_named_and_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "[[pool]]\nimage = 'sandboxd/base'\nsize = 2\nmemory = '128m'\n"
                 "[[pool]]\nname = 'big'\nsize = 1\n")
    cfg = load_config(path, env={})
    assert [(p.name, p.size, p.memory) for p in cfg.pools] == \
        [("pool-1", 2, 128 * MIB), ("big", 1, None)]
    assert cfg.pools[0].create_args() == {"image": "sandboxd/base", "memory": 128 * MIB}
    for text, message in (
        ("[[pool]]\nsize = 0\n", "size: must be at least 1"),
        ("[[pool]]\nsize = 1\nnetwork = 'host'\n", "Network 'host' is not allowed"),
        ("[[pool]]\nsize = 1\nmemory = '1k'\n", "memory must be at least 6m"),
        ("[[pool]]\nsize = 1\nname = 'a b'\n", "name: use 1-63 letters"),
        ("[pool]\nsize = 1\n", "[[pool]] must be an array of tables"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            load_config(write(tmp_path, text), env={})
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("sockett = '/x'", "sockett"),
        ("[defaults]\nmemroy = '1g'", "memroy"),
        ("[policy]\nnetwork = ['none']", "network"),
        ("[nosuchsection]\na = 1", "nosuchsection"),
    ],
)
def test_config_unknown_key_names_it(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        load_config(write(tmp_path, text), env={})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("socket = 5", "socket"),
        ("[defaults]\npids = 'many'", "pids"),
        ("[defaults]\npids = -1", "pids"),
        ("[defaults]\npids = true", "pids"),
        ("[defaults]\nmemory = '12q'", "memory"),
        ("[defaults]\ncpus = 'two'", "cpus"),
        ("[defaults]\nttl = '300'", "ttl"),
        ("[policy]\nnetworks = 'none'", "networks"),
        ("[policy]\nreadonly_rootfs = 1", "readonly_rootfs"),
        ("defaults = 5", "defaults"),
    ],
)
def test_config_ill_typed_value_names_it(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        load_config(write(tmp_path, text), env={})
    assert "\n" not in str(info.value)


def test_config_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOML"):
        load_config(write(tmp_path, "socket = "), env={})
    with pytest.raises(ConfigError, match="no such"):
        load_config(str(tmp_path / "absent.toml"), env={})


def test_config_precedence_flags_env_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'socket = "/from/file.sock"\nstate_dir = "/from/file"\n')
    assert load_config(path, env={}).socket == "/from/file.sock"
    env = {"SANDBOXD_SOCKET": "/from/env.sock"}
    cfg = load_config(path, env=env)
    assert cfg.socket == "/from/env.sock"
    assert cfg.state_dir == "/from/file"  # untouched keys keep the file's value
    cfg = load_config(path, env=env, overrides={"socket": "/from/flag.sock", "state_dir": None})
    assert cfg.socket == "/from/flag.sock"
    assert cfg.state_dir == "/from/file"  # a None override means "not given"


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[defaults]\npids = 64\n")
    assert load_config(None, env={"SANDBOXD_CONFIG": path}).defaults.pids == 64
    image_env = {"SANDBOXD_DEFAULT_IMAGE": "other/image"}
    assert load_config(None, env=image_env).defaults.image == "other/image"


# -- policy -------------------------------------------------------------------


def config(**policy: Any) -> Config:
    cfg = Config()
    for key, value in policy.items():
        setattr(cfg.policy, key, value)
    return cfg


def test_policy_defaults() -> None:
    spec = resolve({}, Config())
    assert spec.image == "sandboxd/base"
    assert (spec.memory, spec.cpus, spec.pids, spec.ttl) == (512 * MIB, 1.0, 256, 300.0)
    assert (spec.workdir, spec.network, spec.readonly_rootfs) == ("/workspace", "none", False)
    assert (spec.user, spec.name, spec.idle_timeout) == (None, None, None)
    assert (spec.env, spec.labels, spec.cap_add) == ({}, {}, [])


def test_policy_explicit_values_are_kept() -> None:
    spec = resolve(
        {"memory": 64 * MIB, "cpus": 0.5, "pids": 32, "ttl": 0, "name": "job-1",
         "labels": {"team": "a"}, "env": {"A": "1"}, "workdir": "/w", "idle_timeout": 0},
        Config(),
    )
    assert (spec.memory, spec.cpus, spec.pids, spec.ttl) == (64 * MIB, 0.5, 32, 0)
    assert (spec.name, spec.labels, spec.env, spec.workdir) == ("job-1", {"team": "a"},
                                                                {"A": "1"}, "/w")
    assert spec.idle_timeout is None  # 0 means no idle expiry


@pytest.mark.parametrize(
    ("args", "policy"),
    [
        ({"privileged": True}, "privileged"),
        ({"mounts": ["/:/host"]}, "mounts"),
        ({"devices": ["/dev/sda"]}, "devices"),
        ({"cap_add": ["SYS_ADMIN"]}, "cap_add"),
        ({"cap_add": ["sys_admin"]}, "cap_add"),
        ({"network": "host"}, "networks"),
        ({"network": "bridge"}, "networks"),
        ({"network": "container:x"}, "networks"),
    ],
)
def test_policy_permission_denied(args: dict[str, Any], policy: str) -> None:
    with pytest.raises(PermissionDenied) as info:
        resolve(args, Config())
    assert info.value.data == {"policy": policy}


def test_policy_allow_lists() -> None:
    cfg = config(cap_add=["CAP_NET_BIND_SERVICE"], networks=["none", "bridge", "host"],
                 images=["sandboxd/*", "python:3.1?"])
    spec = resolve({"cap_add": ["net_bind_service"], "network": "bridge"}, cfg)
    assert (spec.cap_add, spec.network) == (["NET_BIND_SERVICE"], "bridge")
    with pytest.raises(PermissionDenied):
        resolve({"network": "host"}, cfg)  # never, whatever the config says
    assert resolve({"image": "python:3.12"}, cfg).image == "python:3.12"
    with pytest.raises(PermissionDenied, match="evil/image"):
        resolve({"image": "evil/image"}, cfg)
    exact = config(images=["sandboxd/base:latest"])
    assert resolve({"image": "sandboxd/base"}, exact).image == "sandboxd/base"


def test_policy_maxima() -> None:
    cfg = config(max_memory=256 * MIB, max_cpus=1.0, max_pids=100)
    with pytest.raises(PermissionDenied, match="memory"):
        resolve({"memory": 257 * MIB}, cfg)
    with pytest.raises(PermissionDenied, match="cpus"):
        resolve({"memory": 64 * MIB, "cpus": 1.0}, config(max_cpus=0.5))
    with pytest.raises(PermissionDenied, match="pids"):
        resolve({"memory": 64 * MIB, "pids": 101}, cfg)
    spec = resolve({"memory": 256 * MIB, "pids": 100}, cfg)
    assert (spec.memory, spec.pids) == (256 * MIB, 100)


def test_policy_bad_values_are_invalid_params() -> None:
    with pytest.raises(InvalidParams, match="memory"):
        resolve({"memory": 1024}, Config())
    with pytest.raises(InvalidParams, match="cpus"):
        resolve({"cpus": (os.cpu_count() or 1) + 1}, Config())
    with pytest.raises(InvalidParams, match="pids"):
        resolve({"pids": 0}, Config())
    with pytest.raises(InvalidParams, match="workdir"):
        resolve({"workdir": "relative"}, Config())
    with pytest.raises(InvalidParams, match="name"):
        resolve({"name": "0123456789ab"}, Config())  # looks like an id
    with pytest.raises(InvalidParams, match="name"):
        resolve({"name": "-bad"}, Config())
    with pytest.raises(InvalidParams, match="Label"):
        resolve({"labels": {"bad key": "v"}}, Config())
    with pytest.raises(InvalidParams, match="Environment"):
        resolve({"env": {"A=B": "v"}}, Config())


def test_policy_ttl_with_max_ttl() -> None:
    cfg = config(max_ttl=600.0)
    assert resolve({"ttl": 600}, cfg).ttl == 600
    assert resolve({"ttl": 1}, cfg).ttl == 1
    assert resolve({}, cfg).ttl == 300.0  # the default is within the maximum
    with pytest.raises(PermissionDenied, match="expire") as info:
        resolve({"ttl": 0}, cfg)  # no expiry is not allowed under a maximum
    assert info.value.data == {"policy": "max_ttl"}
    with pytest.raises(PermissionDenied, match="600"):
        resolve({"ttl": 601}, cfg)
    assert resolve({"ttl": 0}, Config()).ttl == 0  # allowed without a maximum


def test_policy_readonly_and_user() -> None:
    cfg = config(readonly_rootfs=True, user="65534")
    spec = resolve({}, cfg)
    assert (spec.readonly_rootfs, spec.user) == (True, "65534")
    with pytest.raises(PermissionDenied, match="read-only"):
        resolve({"readonly_rootfs": False}, cfg)
    with pytest.raises(PermissionDenied, match="65534"):
        resolve({"user": "root"}, cfg)
    assert resolve({"user": "65534"}, cfg).user == "65534"
    assert resolve({"readonly_rootfs": True}, Config()).readonly_rootfs is True


# -- lifecycle ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "status"),
    [("pause", "running"), ("resume", "paused"), ("exec", "running"), ("files", "running"),
     ("stats", "running"), ("stats", "paused"), ("extend", "paused"), ("snapshot", "paused"),
     *(("remove", s) for s in lifecycle.STATUSES)],
)
def test_lifecycle_allowed(action: str, status: str) -> None:
    lifecycle.check(action, status, "sb")  # does not raise


@pytest.mark.parametrize(
    ("action", "status", "hint"),
    [("pause", "paused", "already paused"), ("resume", "running", "already running"),
     ("exec", "paused", "resume it first"), ("files", "paused", "resume it first"),
     ("exec", "creating", "wait"), ("exec", "stopped", "remove it"),
     ("pause", "stopped", "remove it"), ("exec", "error", "remove it"),
     ("stats", "stopped", "remove it"), ("snapshot", "error", "remove it")],
)
def test_lifecycle_conflicts(action: str, status: str, hint: str) -> None:
    with pytest.raises(Conflict, match=hint) as info:
        lifecycle.check(action, status, "my-box")
    assert info.value.code == "conflict"
    assert "my-box" in info.value.message
    assert info.value.data == {"status": status, "action": action}


# -- scheduler ----------------------------------------------------------------


class Recorder:
    """The scheduler's callback: records keys in firing order, signals awaited ones."""

    def __init__(self) -> None:
        self.fired: list[str] = []
        self._events: dict[str, asyncio.Event] = {}

    def event(self, key: str) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    async def __call__(self, key: str) -> None:
        self.fired.append(key)
        self.event(key).set()

    async def wait(self, *keys: str, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            for key in keys:
                await self.event(key).wait()


async def run_scheduler(recorder: Recorder) -> DeadlineScheduler:
    sched = DeadlineScheduler(recorder)
    sched.start()
    return sched


async def test_scheduler_fires_in_deadline_order() -> None:
    rec = Recorder()
    sched = await run_scheduler(rec)
    try:
        now = time.time()
        sched.set("c", now + 0.15)
        sched.set("a", now + 0.05)
        sched.set("b", now + 0.10)
        assert sched.due_at("a") == now + 0.05
        await rec.wait("a", "b", "c")
        assert rec.fired == ["a", "b", "c"]
        assert sched.due_at("a") is None  # fired keys are no longer armed
    finally:
        await sched.stop()


async def test_scheduler_past_deadline_fires_at_once() -> None:
    rec = Recorder()
    sched = await run_scheduler(rec)
    try:
        sched.set("late", time.time() - 100)
        await rec.wait("late", within=2)
        assert rec.fired == ["late"]
    finally:
        await sched.stop()


async def test_scheduler_rearm_moves_a_key() -> None:
    rec = Recorder()
    sched = await run_scheduler(rec)
    try:
        now = time.time()
        sched.set("a", now + 0.05)
        sched.set("b", now + 0.10)
        sched.set("a", now + 0.20)  # later: b now comes first
        await rec.wait("a", "b")
        assert rec.fired == ["b", "a"]  # and a fired once, not at its old time too
    finally:
        await sched.stop()


async def test_scheduler_rearm_earlier_wakes_a_sleeping_scheduler() -> None:
    rec = Recorder()
    sched = await run_scheduler(rec)
    try:
        sched.set("a", time.time() + 30)
        await asyncio.sleep(0)  # let the scheduler go to sleep on the 30 s deadline
        await asyncio.sleep(0.01)
        started = time.monotonic()
        sched.set("a", time.time() + 0.05)
        await rec.wait("a", within=5)  # not after 30 s
        assert time.monotonic() - started < 5
        assert rec.fired == ["a"]
    finally:
        await sched.stop()


async def test_scheduler_disarm() -> None:
    rec = Recorder()
    sched = await run_scheduler(rec)
    try:
        now = time.time()
        sched.set("gone", now + 0.05)
        sched.set("kept", now + 0.10)
        sched.set("gone", None)
        assert sched.due_at("gone") is None
        await rec.wait("kept")
        assert rec.fired == ["kept"]
        # Disarmed then re-armed at the very same time: fires exactly once.
        when = time.time() + 0.05
        sched.set("again", when)
        sched.set("again", None)
        sched.set("again", when)
        sched.set("after", when + 0.05)
        await rec.wait("again", "after")
        assert rec.fired == ["kept", "again", "after"]
    finally:
        await sched.stop()


async def test_scheduler_survives_a_failing_callback() -> None:
    rec = Recorder()

    async def on_due(key: str) -> None:
        await rec(key)
        if key == "boom":
            raise RuntimeError("callback failed")

    sched = DeadlineScheduler(on_due)
    sched.start()
    try:
        now = time.time()
        sched.set("boom", now + 0.03)
        sched.set("next", now + 0.08)
        await rec.wait("boom", "next")
        assert rec.fired == ["boom", "next"]
    finally:
        await sched.stop()


async def test_scheduler_key_set_before_start_fires_after_start() -> None:
    rec = Recorder()
    sched = DeadlineScheduler(rec)
    sched.set("early", time.time() + 0.03)
    sched.start()
    try:
        await rec.wait("early")
        assert rec.fired == ["early"]
    finally:
        await sched.stop()


async def test_scheduler_callback_may_rearm_its_own_key() -> None:
    rec = Recorder()
    rounds: list[str] = []
    done = asyncio.Event()

    async def on_due(key: str) -> None:
        rounds.append(key)
        if len(rounds) < 3:
            sched.set(key, time.time() + 0.02)  # like a running exec postponing idle expiry
        else:
            done.set()
        await rec(key)

    sched = DeadlineScheduler(on_due)
    sched.start()
    try:
        sched.set("idle", time.time() + 0.02)
        async with asyncio.timeout(5):
            await done.wait()
        assert rounds == ["idle", "idle", "idle"]
        assert sched.due_at("idle") is None
    finally:
        await sched.stop()


class _Versions:
    """Stands in for the backend's version call only (what EngineInfo's caching is about)."""

    def __init__(self) -> None:
        self.calls = 0
        self.up = True

    async def version(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(0.01)
        if not self.up:
            raise EngineUnavailable("down")
        return {"version": "x", "api_version": "1.41"}


async def test_engine_info_is_shared_kept_and_follows_the_event_stream() -> None:
    backend = _Versions()
    following = [True]
    info = EngineInfo(backend, lambda: following[0])  # type: ignore[arg-type]
    answers = await asyncio.gather(*(info() for _ in range(10)))
    assert backend.calls == 1 and all(a["reachable"] for a in answers)
    await info()
    assert backend.calls == 1  # kept
    backend.up, following[0] = False, False  # the event stream saw the engine go
    assert (await info())["reachable"] is False and backend.calls == 2
    await info()
    assert backend.calls == 2  # "unreachable" is kept too, while the stream agrees
    backend.up, following[0] = True, True  # and come back
    assert (await info())["reachable"] is True and backend.calls == 3


# -- when the disk guard looks at a sandbox again -------------------------------------------

MB = 1024 * 1024


def test_next_look_is_the_interval_far_from_the_limit_or_without_one() -> None:
    assert next_look(1.0, 0.0, 10 * MB, 0, 1.0, None) == 1.0
    assert next_look(1.0, 0.0, 10 * MB, 5 * MB, 1.0, 10_000 * MB) == 1.0
    assert next_look(1.0, 0.0, 100 * MB, 0, 1.0, 64 * MB) == 1.0  # over it: not racing


def test_next_look_comes_sooner_near_the_limit() -> None:
    # Idle, 32 MiB of headroom: half the time ASSUMED_RATE would take to fill it.
    idle = next_look(1.0, 0.0, 32 * MB, 0, 1.0, 64 * MB)
    assert idle == pytest.approx((33 * MB / ASSUMED_RATE) / 2)
    # Growing faster than ASSUMED_RATE: its own rate counts.
    fast = next_look(1.0, 0.0, 32 * MB, 256 * MB, 1.0, 64 * MB)
    assert fast == pytest.approx((33 * MB / (256 * MB)) / 2) and fast < idle
    # At the limit: the minimum, never zero.
    assert next_look(1.0, 0.0, 65 * MB, 256 * MB, 1.0, 64 * MB) == MIN_INTERVAL
    assert next_look(0.01, 0.0, 65 * MB, 256 * MB, 1.0, 64 * MB) == 0.01


def test_next_look_never_spends_more_than_its_share_measuring() -> None:
    assert next_look(1.0, 0.5, 65 * MB, 256 * MB, 1.0, 64 * MB) == COST_SHARE * 0.5
