"""Images and snapshots, the daemon's side: a paused sandbox's snapshot, what a fork
inherits and what it does not, who owns a snapshot (the label alone proves nothing), and
what image.ensure refuses. (The client's and the CLI's sides, pulls from a registry
included, are in test_client_images.py and test_cli_images.py.)"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    Daemon,
    MakeSandbox,
    docker_inspect,
    raw_call,
    reachable,
    remove_images,
    run_as,
)
from sandboxd_client import NotFound, PermissionDenied, SandboxClient
from sandboxd_client.blocking import Client as BlockingClient

OTHER = 65534


@pytest.fixture
def drop_images() -> Iterator[list[str]]:
    """Refs to delete after the test, once no container uses them (ask for this fixture
    before ``make_sandbox``: it is then torn down after it)."""
    refs: list[str] = []
    yield refs
    remove_images(refs)


async def test_a_paused_sandbox_is_snapshotted_and_stays_paused(
    drop_images: list[str], client: SandboxClient, make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox(labels={"origin": "yes"}, name=f"orig-{secrets.token_hex(3)}")
    assert (await sb.exec(["sh", "-c", "echo kept > data.txt; mkdir d; echo x > d/y"])) \
        .exit_code == 0
    await sb.pause()
    snap = await sb.snapshot()
    drop_images.append(snap.ref)
    assert (await client.get(sb.id)).status == "paused"
    fork = await make_sandbox(image=snap.ref)
    r = await fork.exec(["sh", "-c", "cat data.txt d/y && echo more >> data.txt && cat data.txt"])
    assert r.exit_code == 0 and r.stdout == b"kept\nx\nkept\nmore\n"
    # The fork is its own sandbox: none of the original's identity came with the image.
    assert fork.labels == {} and fork.name != sb.name
    labels = docker_inspect(fork.container_id or "")["Config"]["Labels"]
    assert labels["io.sandboxd.id"] == fork.id
    assert labels["io.sandboxd.name"] == fork.name
    assert labels.get("io.sandboxd.label.origin", "") == ""  # blanked over the image's
    assert labels["io.sandboxd.snapshot.of"] == sb.id  # the image's provenance stays
    image_labels = docker_inspect(snap.ref)["Config"]["Labels"]
    assert image_labels["io.sandboxd.snapshot.owner"] == "0"
    await sb.resume()
    assert (await sb.exec(["cat", "data.txt"])).stdout == b"kept\n"  # untouched by the fork


@pytest.fixture
def forged_image() -> Iterator[str]:
    """An ordinary image that claims, by label only, to be root's snapshot."""
    ref = f"sbd-forged-{secrets.token_hex(4)}:1"
    dockerfile = ("FROM sandboxd/base\nLABEL io.sandboxd.snapshot.owner=0 "
                  "io.sandboxd.snapshot.uid=100000\n")
    subprocess.run(["docker", "build", "-q", "-t", ref, "-"], input=dockerfile.encode(),
                   check=True, capture_output=True, timeout=120)
    yield ref
    remove_images([ref])


def _as_other(socket_path: str, ref: str) -> dict[str, Any]:
    with BlockingClient(socket_path) as c:
        out: dict[str, Any] = {"listed": ref in {i.ref for i in c.images()}}
        sb = c.create(image=ref, ttl=30, memory="32m")
        out["created"] = sb.image
        out["run"] = c.exec(sb.id, ["true"]).exit_code
        c.remove(sb.id)
        return out


def test_a_label_does_not_make_an_image_someones_snapshot(
    spawn_daemon: Callable[..., Daemon], forged_image: str,
) -> None:
    d = reachable(spawn_daemon())
    seen = run_as(OTHER, _as_other, d.socket, forged_image)
    assert seen == {"listed": True, "created": forged_image, "run": 0}
    reply = raw_call(d.socket, "image.remove", [{"ref": forged_image}])
    assert reply[2][0] == "permission_denied"  # no snapshot: not removed through sandboxd


def test_image_ensure_refusals(spawn_daemon: Callable[..., Daemon]) -> None:
    d = spawn_daemon(config='[policy]\nimages = ["sandboxd/*", "sandboxd-snapshot/*"]\n')
    cases = {
        "127.0.0.1:1/elsewhere:1": "permission_denied",  # not allowed by the policy
        "sandboxd-snapshot/u0/none:1": "not_found",  # snapshots are made, never pulled
        "": "invalid_params",
    }
    for ref, code in cases.items():
        reply = raw_call(d.socket, "image.ensure", [{"ref": ref}], timeout=30)
        assert reply[2] is not None and reply[2][0] == code, (ref, reply[2])
    ok = raw_call(d.socket, "image.ensure", [{"ref": "sandboxd/base"}], timeout=30)
    assert ok[2] is None and ok[3]["pulled"] is False


async def test_a_snapshot_id_of_another_user_is_not_found(
    drop_images: list[str], spawn_daemon: Callable[..., Daemon],
) -> None:
    d = reachable(spawn_daemon())
    async with SandboxClient(d.socket) as root:
        sb = await root.create(ttl=60, memory="32m")
        try:
            snap = await sb.snapshot()
            drop_images.append(snap.ref)
        finally:
            await root.remove(sb.id)

    def by_id(ref: str) -> str:
        with BlockingClient(d.socket) as c:
            try:
                c.create(image=ref, ttl=30)
            except NotFound as exc:
                return exc.code
            except PermissionDenied as exc:
                return exc.code
            return "created"

    for ref in (snap.id, snap.id.removeprefix("sha256:")[:12], snap.id.removeprefix("sha256:")[:4]):
        assert run_as(OTHER, by_id, ref) == "not_found"
