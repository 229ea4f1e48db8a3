"""The client's image and snapshot calls against the real daemon and engine.

``images``, ``ensure_image`` (with live progress, pulled from a real registry
on 127.0.0.1, see ``registry``), ``remove_image``, ``snapshot`` on the client
and on the sandbox handle, on both the asyncio and the blocking client, plus
the models' liberal reading (pure). Every test removes what it made: its
sandboxes (``make_sandbox``), its snapshots and pulled images (``images_named``
deletes every local image whose reference holds the test's token, even when
the test failed midway).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    BASE_IMAGE,
    Daemon,
    MakeSandbox,
    docker,
    local_refs,
    reachable,
    remove_images,
    run_as,
)
from registry import Registry, local_registry, make_unique_image, push_image
from sandboxd_client import (
    Client,
    DaemonInfo,
    EngineError,
    EnsureResult,
    ImageInfo,
    InvalidParams,
    NotFound,
    PermissionDenied,
    PoolInfo,
    PullProgress,
    SandboxClient,
    Snapshot,
    parse_time,
)

OTHER = 65534
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LAYER_BYTES = 32 << 20  # big enough that extracting it is seen in progress events


# -- fixtures -------------------------------------------------------------------------






@pytest.fixture
def token() -> str:
    """A name part unique to this test; images naming it are removed afterwards."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def images_named(token: str) -> Iterator[Callable[[], list[str]]]:
    """Every local image whose reference holds ``token`` is removed after the test.

    Yields a function that lists them now. Ask for it before ``make_sandbox``,
    so that it is torn down after the sandboxes.
    """
    yield lambda: local_refs(token)
    remove_images(local_refs(token))


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with local_registry() as reg:
        yield reg


@pytest.fixture
def pushed(registry: Registry, token: str,
           images_named: Callable[[], list[str]]) -> Iterator[Callable[[str], str]]:
    """``pushed(name)``: a fresh image in the registry, absent locally; the ref to pull."""
    made: list[str] = []

    def push(name: str) -> str:
        source = f"sbd-src-{token}-{name}:src"
        image_id = make_unique_image(source, LAYER_BYTES)
        made.append(image_id)
        ref = push_image(registry, source, f"{token}-{name}", "v1")
        docker("rmi", source)  # no local tag is left: the engine has to pull it
        assert docker("image", "inspect", image_id, check=False).strip() in ("", "[]")
        return ref

    yield push
    remove_images(made)


# -- pure: the models ---------------------------------------------------------------


@pytest.mark.pure
def test_image_models_read_liberally() -> None:
    info = ImageInfo.from_wire({"ref": b"a/b:1", "id": "sha256:ab", "size": 7,
                                "created_at": "2026-11-26T15:04:05.123Z", "new": 1})
    assert (info.ref, info.id, info.size) == ("a/b:1", "sha256:ab", 7)
    assert info.extra == {"new": 1} and info.to_dict()["new"] == 1
    assert parse_time(info.created_at) is not None
    assert EnsureResult.from_wire({"ref": "x", "id": "i", "pulled": True}).pulled is True
    assert EnsureResult.from_wire({}).pulled is False
    snap = Snapshot.from_wire({"ref": "sandboxd-snapshot/u1/n:t", "id": "sha256:cd"})
    assert snap.to_dict() == {"ref": "sandboxd-snapshot/u1/n:t", "id": "sha256:cd"}
    p = PullProgress.from_wire({"ref": "r", "id": None, "status": "Digest: x",
                                "current": None, "total": None})
    assert (p.id, p.current, p.total) == (None, None, None)
    p = PullProgress.from_wire({"ref": "r", "id": "abc", "status": "Downloading",
                                "current": 5, "total": 9})
    assert (p.id, p.current, p.total) == ("abc", 5, 9)


@pytest.mark.pure
def test_daemon_info_keeps_the_pools_typed() -> None:
    wire = {"version": "1", "api_version": 1, "engine": {}, "sandboxes": 0, "uptime": 1.0,
            "caller": {}, "pool": {"small": {"image": "sandboxd/base:latest", "size": 4,
                                             "ready": 3, "claims": 10, "misses": 2,
                                             "starting": 1, "later": "kept"}}}
    info = DaemonInfo.from_wire(wire)
    pool = info.pool["small"]
    assert isinstance(pool, PoolInfo)
    assert (pool.image, pool.size, pool.ready, pool.claims, pool.misses, pool.starting) == (
        "sandboxd/base:latest", 4, 3, 10, 2, 1)
    assert info.to_dict()["pool"] == wire["pool"]  # extra keys too, as plain dicts
    assert DaemonInfo.from_wire({**wire, "pool": {}}).pool == {}
    assert DaemonInfo.from_wire({k: v for k, v in wire.items() if k != "pool"}).pool == {}


# -- listing, snapshots, removal --------------------------------------------------------


async def test_images_lists_references_with_id_size_and_time(client: SandboxClient) -> None:
    images = await client.images()
    assert all(isinstance(i, ImageInfo) for i in images)
    base = {i.ref: i for i in images}[BASE_IMAGE]
    assert base.id == docker("image", "inspect", "-f", "{{.Id}}", BASE_IMAGE).strip()
    assert base.size > 0
    assert RFC3339_MS.match(base.created_at) and parse_time(base.created_at) is not None
    assert (await client.info()).pool == {}  # no [[pool]] in the test daemon's config


async def test_snapshot_round_trip(
    images_named: Callable[[], list[str]], token: str, client: SandboxClient,
    make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox()
    written = await sb.exec(["sh", "-c", "echo forked > /workspace/marker"])
    assert written.ok, written.stderr
    snap = await sb.snapshot(f"rt-{token}")
    assert isinstance(snap, Snapshot)
    assert re.match(rf"^sandboxd-snapshot/u{os.getuid()}/rt-{token}:[A-Za-z0-9_.-]+$", snap.ref)
    assert snap.id.startswith("sha256:")
    assert docker("image", "inspect", "-f", "{{.Id}}", snap.ref).strip() == snap.id
    listed = {i.ref: i for i in await client.images()}
    assert listed[snap.ref].id == snap.id

    fork = await make_sandbox(image=snap.ref)
    assert fork.image == snap.ref and fork.id != sb.id
    assert await fork.read_file("/workspace/marker") == b"forked\n"
    # A fork is a copy: what it writes stays its own.
    assert (await fork.exec(["sh", "-c", "echo fork-only > /workspace/new"])).ok
    with pytest.raises(NotFound):
        await sb.read_file("/workspace/new")

    await fork.remove()
    await sb.remove()
    # Once the sandboxes are removed (their replies came), their snapshot can be removed.
    await client.remove_image(snap.ref)
    assert snap.ref not in {i.ref for i in await client.images()}
    assert images_named() == []
    with pytest.raises(NotFound):
        await client.remove_image(snap.ref)


async def test_a_fork_can_change_the_files_it_inherited(
    images_named: Callable[[], list[str]], token: str, make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox()
    made = await sb.exec(["sh", "-c", "echo one > /workspace/f; mkdir /workspace/d; "
                                      "echo one > /tmp/t"])
    assert made.ok, made.stderr
    snap = await sb.snapshot(f"rw-{token}")
    fork = await make_sandbox(image=snap.ref)  # while the original runs on
    changed = await fork.exec(["sh", "-c", "echo two >> /workspace/f && touch /workspace/d/x "
                                           "&& echo two > /tmp/t"])
    assert changed.ok, changed.stderr  # a fork owns its copy of the files
    assert await fork.read_file("/workspace/f") == b"one\ntwo\n"
    assert await sb.read_file("/workspace/f") == b"one\n"


async def test_snapshot_names_and_tags(
    images_named: Callable[[], list[str]], token: str, client: SandboxClient,
    make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox(name=f"web-{token}")
    uid = os.getuid()
    by_name = await client.snapshot(f"web-{token}", f"named-{token}:v1.2")  # id or name
    assert by_name.ref == f"sandboxd-snapshot/u{uid}/named-{token}:v1.2"
    default = await sb.snapshot()  # the sandbox's name and a timestamp tag
    assert default.ref.startswith(f"sandboxd-snapshot/u{uid}/web-{token}:")
    assert default.ref != by_name.ref
    for bad in ("Upper", "has space", "a:b:c", "-lead", ""):
        with pytest.raises(InvalidParams):
            await sb.snapshot(bad)
    with pytest.raises(NotFound):
        await client.snapshot(f"no-such-sandbox-{token}")
    for ref in (by_name.ref, default.ref):
        await client.remove_image(ref)
    assert images_named() == []


async def test_remove_image_removes_only_snapshots(client: SandboxClient, token: str) -> None:
    assert (await client.info()).caller.admin  # the suite runs as root
    with pytest.raises(NotFound):
        await client.remove_image(f"sandboxd-snapshot/u0/{token}:none")
    with pytest.raises(NotFound):
        await client.remove_image(f"no-such-image-{token}:1")
    with pytest.raises(PermissionDenied):  # an admin, on an image that is no snapshot
        await client.remove_image(BASE_IMAGE)
    assert BASE_IMAGE in {i.ref for i in await client.images()}


def _other_user(socket_path: str, snapshot_ref: str, sandbox_id: str) -> dict[str, Any]:
    """As another uid, with the blocking client: what it sees of root's snapshot."""
    with Client(socket_path) as c:
        out: dict[str, Any] = {"listed": [i.ref for i in c.images()]}
        for name, call in (
            ("remove_snapshot", lambda: c.remove_image(snapshot_ref)),
            ("remove_base", lambda: c.remove_image(BASE_IMAGE)),
            ("snapshot_root_sandbox", lambda: c.snapshot(sandbox_id)),
            ("create_from_it", lambda: c.create(image=snapshot_ref, ttl=30)),
        ):
            try:
                call()
                out[name] = "ok"
            except Exception as exc:
                out[name] = getattr(exc, "code", repr(exc))
        return out


async def test_snapshots_of_others_are_not_found(
    images_named: Callable[[], list[str]], token: str, spawn_daemon: Callable[..., Daemon],
) -> None:
    d = reachable(spawn_daemon())
    async with SandboxClient(d.socket) as root:
        sb = await root.create(ttl=120)
        try:
            snap = await sb.snapshot(f"mine-{token}")
            seen = run_as(OTHER, _other_user, d.socket, snap.ref, sb.id)
            assert snap.ref not in seen["listed"]
            assert seen["remove_snapshot"] == "not_found"
            assert seen["remove_base"] == "not_found"  # no snapshot: not theirs to remove
            assert seen["snapshot_root_sandbox"] == "not_found"
            assert seen["create_from_it"] == "not_found"
            assert snap.ref in {i.ref for i in await root.images()}  # still there
        finally:
            await root.remove(sb.id)


# -- ensure and pull ---------------------------------------------------------------------


async def test_ensure_present_image_is_not_pulled(client: SandboxClient) -> None:
    got: list[PullProgress] = []
    result = await client.ensure_image(BASE_IMAGE, on_progress=got.append)
    assert isinstance(result, EnsureResult)
    assert result.ref == BASE_IMAGE and result.pulled is False
    assert result.id == docker("image", "inspect", "-f", "{{.Id}}", BASE_IMAGE).strip()
    assert got == []
    assert (await client.ensure_image(BASE_IMAGE)).id == result.id


async def test_ensure_pulls_with_progress(
    client: SandboxClient, pushed: Callable[[str], str]
) -> None:
    ref = pushed("async")
    got: list[PullProgress] = []
    async with client.events(types=["image.*"]) as watcher:
        await watcher.start()
        result = await client.ensure_image(ref, on_progress=got.append)
        assert result.ref == ref and result.pulled is True
        assert result.id == docker("image", "inspect", "-f", "{{.Id}}", ref).strip()
        # Each progress event of the pull was handed over before ensure_image returned.
        assert got and all(isinstance(p, PullProgress) and p.ref == ref for p in got)
        assert any(p.total and p.current is not None and 0 <= p.current <= p.total
                   for p in got), got
        count = len(got)
        # Another subscriber of the same uid sees the same events, then image.pulled.
        seen = []
        while True:
            ev = await watcher.next_event(timeout=10)
            assert ev is not None
            assert ev.owner_uid == os.getuid() and ev.data["ref"] == ref
            seen.append(ev)
            if ev.type == "image.pulled":
                break
    progress = [ev for ev in seen if ev.type == "image.pull.progress"]
    assert [PullProgress.from_wire(ev.data) for ev in progress] == got
    assert seen[-1].data == {"ref": ref, "id": result.id}
    assert set(progress[0].data) == {"ref", "id", "status", "current", "total"}
    await asyncio.sleep(0.3)
    assert len(got) == count  # nothing after the end
    assert ref in {i.ref for i in await client.images()}
    again = await client.ensure_image(ref, on_progress=got.append)
    assert (again.pulled, again.id, len(got)) == (False, result.id, count)


async def test_concurrent_ensures_share_one_pull(
    daemon: Daemon, pushed: Callable[[str], str]
) -> None:
    ref = pushed("shared")
    got: tuple[list[PullProgress], list[PullProgress]] = ([], [])
    async with SandboxClient(daemon.socket) as a, SandboxClient(daemon.socket) as b:
        first, second = await asyncio.gather(a.ensure_image(ref, on_progress=got[0].append),
                                             b.ensure_image(ref, on_progress=got[1].append))
    assert first.id == second.id  # one pull, joined by the later call
    assert first.pulled and second.pulled
    assert (got[0] or got[1]) and all(p.ref == ref for p in got[0] + got[1])


async def test_a_failing_progress_callback_is_raised_after_the_reply(
    client: SandboxClient, pushed: Callable[[str], str]
) -> None:
    ref = pushed("raises")
    calls = []

    def explode(progress: PullProgress) -> None:
        calls.append(progress)
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        await client.ensure_image(ref, on_progress=explode)
    assert len(calls) == 1  # not called again once it failed
    # The pull went on; the connection is fine.
    assert (await client.ensure_image(ref)).pulled is False
    assert await client.ping() == "pong"


async def test_pull_errors_are_sandboxd_errors(client: SandboxClient, registry: Registry,
                                               token: str) -> None:
    got: list[PullProgress] = []
    with pytest.raises((NotFound, EngineError)):  # the registry has no such image
        await client.ensure_image(registry.ref(f"absent-{token}"), on_progress=got.append)
    with pytest.raises(NotFound):  # snapshots are made, never pulled
        await client.ensure_image(f"sandboxd-snapshot/u0/absent-{token}:1")
    assert await client.ping() == "pong"


def test_blocking_client_images_and_snapshots(
    daemon: Daemon, pushed: Callable[[str], str], token: str,
    images_named: Callable[[], list[str]],
) -> None:
    ref = pushed("blocking")
    with Client(daemon.socket) as c:
        got: list[PullProgress] = []
        result = c.ensure_image(ref, on_progress=got.append)
        assert result.pulled and got and all(p.ref == ref for p in got)
        listed = {i.ref: i for i in c.images()}
        assert listed[ref].id == result.id
        sb = c.create(ttl=120)
        try:
            assert sb.exec(["sh", "-c", "echo blocking > /workspace/f"]).ok
            snap = sb.snapshot(f"b-{token}:one")
            assert snap.ref == f"sandboxd-snapshot/u{os.getuid()}/b-{token}:one"
            assert c.snapshot(sb.id, f"b-{token}:two").ref.endswith(":two")
        finally:
            sb.remove()
        c.remove_image(snap.ref)
        c.remove_image(f"sandboxd-snapshot/u{os.getuid()}/b-{token}:two")
        with pytest.raises(NotFound):
            c.remove_image(snap.ref)
    subprocess.run(["docker", "rmi", ref], capture_output=True, check=True)
    assert images_named() == []
