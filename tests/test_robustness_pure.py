"""Failures that must not stop the daemon's background work, each driven directly.

The periodic re-list goes on after any exception; a failed write-behind of
activity timestamps is retried, not dropped; every aiohttp failure becomes
engine_unavailable or engine_error, never internal. Pure logic: the re-list
loop with a reconciler that fails on purpose, the state store on a real
SQLite file, the error translation with aiohttp's own exception classes.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sandboxd.backend.docker.engine import translate
from sandboxd.core.records import SandboxRecord
from sandboxd.services.reconcile import EngineWatcher
from sandboxd.store import state
from sandboxd.store.state import StateStore
from sandboxd.wire.errors import EngineError, EngineUnavailable, SandboxdError

pytestmark = pytest.mark.pure

REQUEST = aiohttp.RequestInfo(
    URL("http://docker/v1.41/containers/json"), "GET", CIMultiDictProxy(CIMultiDict()),
    URL("http://docker/v1.41/containers/json"),
)


class FlakyReconciler:
    """Fails its first re-lists with errors of several kinds, then succeeds."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0
        self.succeeded = asyncio.Event()

    async def reconcile(self) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        self.succeeded.set()


async def test_relist_survives_any_exception() -> None:
    flaky = FlakyReconciler([RuntimeError("a bug"), KeyError("x"), EngineUnavailable("away")])
    watcher = EngineWatcher(flaky, relist_interval=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(watcher.relist_forever())
    try:
        async with asyncio.timeout(10):
            await flaky.succeeded.wait()
        assert flaky.calls == 4
        assert not task.done()  # it keeps going after a success too
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _record(sid: str) -> SandboxRecord:
    return SandboxRecord(id=sid, name=sid, image="img", owner_uid=1, owner_gid=1,
                         created_at=1.0, memory=1, cpus=1.0, pids=1, network="none",
                         workdir="/", status="running", last_activity_at=1.0)


def _stored_activity(path: Path, sid: str) -> float:
    with sqlite3.connect(path) as db:
        (text,) = db.execute("SELECT record FROM sandboxes WHERE id = ?", (sid,)).fetchone()
    return float(state.record_from_json(text).last_activity_at)


async def test_a_failed_activity_write_is_retried_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "TOUCH_DELAY", 0.01)
    store = StateStore(str(tmp_path))
    await store.open()
    record = _record("sb1")
    await store.put(record)
    real = store._put_rows
    failures = [sqlite3.OperationalError("database is locked")] * 2

    def flaky(rows: list[tuple[str, str]]) -> None:
        if failures:
            raise failures.pop()
        real(rows)

    monkeypatch.setattr(store, "_put_rows", flaky)
    record.last_activity_at = 42.0
    store.touch(record)
    try:
        async with asyncio.timeout(10):
            while _stored_activity(store.path, "sb1") != 42.0:  # noqa: ASYNC110 - a file
                await asyncio.sleep(0.01)
        assert failures == []  # written after both failures
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (aiohttp.ClientPayloadError("cut off"), EngineError),
        (aiohttp.ClientResponseError(REQUEST, (), status=500), EngineError),
        (aiohttp.InvalidURL("x"), EngineError),
        (aiohttp.ContentTypeError(REQUEST, ()), EngineError),
        (aiohttp.ServerDisconnectedError(), EngineUnavailable),
        (aiohttp.ClientOSError(), EngineUnavailable),
        (aiohttp.ServerTimeoutError(), EngineUnavailable),
        (TimeoutError(), EngineUnavailable),
        (ConnectionResetError(), EngineUnavailable),
    ],
)
def test_every_aiohttp_failure_is_an_engine_error(exc: Exception,
                                                 expected: type[SandboxdError]) -> None:
    with pytest.raises(expected) as info:
        with translate("do a thing"):
            raise exc
    assert info.value.code in ("engine_error", "engine_unavailable")
    assert "do a thing" in info.value.message


def test_translation_leaves_our_own_errors_alone() -> None:
    err = EngineError("already ours")
    with pytest.raises(EngineError) as info:
        with translate("x"):
            raise err
    assert info.value is err


