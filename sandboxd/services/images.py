"""Images (SPEC §3 images) and snapshots: what a caller may see, pull, make and remove.

Owns ``image.list`` (the images the policy lets a caller use, plus the
caller's own snapshots; admins see all), ``image.ensure`` (pull when missing,
one pull per reference however many ask, with ``image.pull.progress`` events
at a bounded rate and ``image.pulled``), ``sandbox.snapshot`` (a sandbox's
filesystem committed as a local image in its owner's namespace,
``sandboxd-snapshot/u<uid>/<name>:<tag>``, labelled with its owner), removing
a snapshot, and the one rule about using an image: another user's snapshot
is ``not_found`` to a non-admin whatever the image policy allows. It must not
create sandboxes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import structlog

from sandboxd.backend.base import Backend, ImageInfo
from sandboxd.core import status
from sandboxd.core.policy import image_allowed
from sandboxd.core.records import (
    LABEL_SNAPSHOT_OF,
    LABEL_SNAPSHOT_OWNER,
    LABEL_SNAPSHOT_UID,
    Caller,
    SandboxRecord,
)
from sandboxd.core.settings import Policy
from sandboxd.services.registry import Registry
from sandboxd.services.remover import Remover
from sandboxd.wire.errors import Conflict, InvalidParams, NotFound, PermissionDenied, SandboxdError
from sandboxd.wire.units import format_time

log = structlog.get_logger("sandboxd.images")

SNAPSHOT_REPO = "sandboxd-snapshot"
PROGRESS_EVERY = 0.1  # seconds between two byte-count events of one pull
REMOVAL_WAIT = 10.0  # seconds image.remove waits for just-removed sandboxes' containers
NAME_RE = re.compile(r"^(?=.{1,64}$)[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")  # Docker's rule
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
ID_LIKE = re.compile(r"^(sha256:)?[0-9a-f]{1,64}$")  # the engine takes any unique id prefix

EventSink = Callable[[str, int | None, dict[str, Any]], None]  # (type, owner uid, data)


def snapshot_owner(image: ImageInfo) -> int | None:
    """The uid whose snapshot ``image`` is, or None. The label alone is not trusted: any
    image can carry it (one pulled from a registry, say); a snapshot is also named in its
    owner's namespace (or left untagged, after a newer snapshot took its tag)."""
    raw = image.labels.get(LABEL_SNAPSHOT_OWNER)
    if raw is None or not raw.isdigit():
        return None
    owner = int(raw)
    if image.refs and not any(r.startswith(f"{SNAPSHOT_REPO}/u{owner}/") for r in image.refs):
        return None
    return owner


def needs_inspection(ref: str) -> bool:
    """Whether ``ref`` may name a snapshot (by its repository, or by an image id)."""
    return ref.startswith(SNAPSHOT_REPO + "/") or bool(ID_LIKE.match(ref))


class ImageService:
    def __init__(self, backend: Backend, registry: Registry, policy: Policy,
                 events: EventSink, removals: Remover) -> None:
        self.backend = backend
        self.removals = removals  # containers still being deleted may hold an image
        self.registry = registry
        self.policy = policy
        self.events = events
        self._pulls: dict[str, asyncio.Task[str]] = {}
        self._waiters: dict[str, set[int]] = {}

    # -- the one rule --------------------------------------------------------------

    def _visible(self, caller: Caller, image: ImageInfo) -> bool:
        owner = snapshot_owner(image)
        if owner is not None:
            return caller.admin or owner == caller.uid
        return caller.admin or any(image_allowed(r, self.policy.images) for r in image.refs)

    async def check_use(self, caller: Caller, ref: str) -> ImageInfo | None:
        """Before a create from ``ref``: another user's snapshot is ``not_found``. The image
        when it had to be looked at (a snapshot), else None."""
        if not needs_inspection(ref):
            return None
        try:
            image = await self.backend.image(ref)
        except NotFound:
            return None  # the create reports the missing image in its own words
        owner = snapshot_owner(image)
        if owner is not None and owner != caller.uid and not caller.admin:
            raise NotFound(f"No image {ref!r}.", {"image": ref})
        return image

    # -- the calls -------------------------------------------------------------------

    async def list(self, caller: Caller) -> list[dict[str, Any]]:
        out = []
        for image in await self.backend.images():
            if not self._visible(caller, image):
                continue
            for ref in image.refs or (image.id,):
                out.append({"ref": ref, "id": image.id, "size": image.size,
                            "created_at": format_time(image.created)})
        out.sort(key=lambda i: str(i["ref"]))
        return out

    async def ensure(self, caller: Caller, ref: str) -> dict[str, Any]:
        if not image_allowed(ref, self.policy.images):
            raise PermissionDenied(f"Image {ref!r} is not allowed by the policy.",
                                   {"policy": "images"})
        try:
            image = await self.backend.image(ref)
        except NotFound:
            pass
        else:
            if not self._visible(caller, image):
                raise NotFound(f"No image {ref!r}.", {"image": ref})
            return {"ref": ref, "id": image.id, "pulled": False}
        if needs_inspection(ref):  # snapshots are made here, never pulled
            raise NotFound(f"No image {ref!r}.", {"image": ref})
        waiters = self._waiters.setdefault(ref, set())
        waiters.add(caller.uid)
        task = self._pulls.get(ref)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._pull(ref, waiters))
            self._pulls[ref] = task

            def done(_: asyncio.Task[str]) -> None:
                self._pulls.pop(ref, None)
                self._waiters.pop(ref, None)

            task.add_done_callback(done)
        image_id = await asyncio.shield(task)  # a caller that goes does not stop the pull
        return {"ref": ref, "id": image_id, "pulled": True}

    async def _pull(self, ref: str, waiters: set[int]) -> str:
        """One pull, its events told to each uid that asked for it."""
        last = 0.0
        statuses: dict[Any, Any] = {}  # layer -> its last status sent
        async for progress in self.backend.pull(ref):
            now = time.monotonic()
            layer, state = progress.get("id"), progress.get("status")
            # A status change always goes out; byte counts at most every PROGRESS_EVERY.
            if statuses.get(layer) != state or now - last >= PROGRESS_EVERY:
                statuses[layer] = state
                last = now
                for uid in waiters:
                    self.events("image.pull.progress", uid, {"ref": ref, **progress})
        image = await self.backend.image(ref)
        log.info("image_pulled", ref=ref, id=image.id)
        for uid in waiters:
            self.events("image.pulled", uid, {"ref": ref, "id": image.id})
        return image.id

    async def snapshot(self, caller: Caller, record: SandboxRecord,
                       name: str | None) -> dict[str, Any]:
        status.check("snapshot", record.status, record.name)
        repo_name, tag = _snapshot_name(name, record)
        repository = f"{SNAPSHOT_REPO}/u{record.owner_uid}/{repo_name}"
        labels = {LABEL_SNAPSHOT_OWNER: str(record.owner_uid), LABEL_SNAPSHOT_OF: record.id}
        if record.uid is not None:
            labels[LABEL_SNAPSHOT_UID] = str(record.uid)
        assert record.container_id is not None
        image_id = await self.backend.commit(
            record.container_id, repository, tag, labels,
            pause=record.status == status.RUNNING,
        )
        ref = f"{repository}:{tag}"
        log.info("sandbox_snapshot", sandbox_id=record.id, ref=ref, id=image_id)
        return {"ref": ref, "id": image_id}

    async def remove(self, caller: Caller, ref: str) -> None:
        """Remove a snapshot of the caller's (an admin: anyone's); never another image."""
        try:
            image = await self.backend.image(ref)
        except NotFound:
            raise NotFound(f"No image {ref!r}.", {"image": ref}) from None
        owner = snapshot_owner(image)
        if owner is None:
            if caller.admin:
                raise PermissionDenied("Only snapshots are removed through sandboxd.",
                                       {"image": ref})
            raise NotFound(f"No snapshot {ref!r}.", {"image": ref})
        if owner != caller.uid and not caller.admin:
            raise NotFound(f"No image {ref!r}.", {"image": ref})
        try:
            try:
                await self.backend.remove_image(ref)
            except Conflict:
                if not self.removals.containers:
                    raise
                # A sandbox made from it was removed just now: its container is still
                # being deleted in the background. Wait for that, then try again.
                await self.removals.flush(within=REMOVAL_WAIT)
                await self.backend.remove_image(ref)
        except SandboxdError as exc:
            if exc.code == "conflict":
                raise type(exc)(f"Snapshot {ref!r} is in use by a sandbox; remove that first.",
                                exc.data) from None
            raise


def _snapshot_name(name: str | None, record: SandboxRecord) -> tuple[str, str]:
    now = time.time()
    tag = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    if name is None:
        return re.sub(r"[^a-z0-9]+", "-", record.name.lower()).strip("-")[:64] or record.id, tag
    repo_name, _, given_tag = name.partition(":")
    if not NAME_RE.match(repo_name) or (given_tag and not TAG_RE.match(given_tag)):
        raise InvalidParams(
            f"Snapshot name {name!r} is not valid: use lowercase letters, digits, '.', '_' "
            "or '-', optionally ':tag'.", {"argument": "ref"},
        )
    return repo_name, given_tag or tag
