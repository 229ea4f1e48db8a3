"""The Docker Engine connection: the only module that imports aiodocker and aiohttp.

Owns the aiodocker client, every call to the engine, and the translation of
its failures into sandboxd errors (``translate``): a refused call becomes
``EngineError`` with the engine's text, an unreachable or silent engine
``EngineUnavailable`` (every aiohttp ``ClientError`` is one of the two, never
an internal error), a missing object ``NotFound``, a state clash
``Conflict``. It uses aiodocker's public API wherever one exists; the raw
queries left are named where they are made, with the reason. It returns plain
dicts and raw byte streams; it must not know about sandboxes, owners, policy
or the wire protocol.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiodocker
import aiohttp
from aiodocker.stream import Stream
from yarl import URL

from sandboxd.wire.errors import Conflict, EngineError, EngineUnavailable, NotFound, SandboxdError

DEFAULT_ENGINE_URL = "unix:///var/run/docker.sock"
# A request/response call to the engine that takes longer than this is treated as the
# engine being unavailable (exec output and event streams have no such limit).
CALL_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
_UNREACHABLE_STATUS = 900  # aiodocker's code for a connection failure


def _text(exc: BaseException) -> str:
    """An exception's text, never raising (some aiohttp errors cannot render themselves)."""
    try:
        return str(exc) or type(exc).__name__
    except Exception:
        return type(exc).__name__


def _unavailable(what: str, exc: BaseException) -> EngineUnavailable:
    return EngineUnavailable(
        f"The Docker Engine cannot be reached while trying to {what}; "
        "check that dockerd is running.",
        {"engine_message": _text(exc)},
    )


@contextmanager
def translate(what: str) -> Iterator[None]:
    """Map aiodocker/aiohttp failures during ``what`` to sandboxd errors."""
    try:
        yield
    except SandboxdError:
        raise
    except aiodocker.DockerError as exc:
        message = str(exc.message or "").strip()
        if exc.status == _UNREACHABLE_STATUS:
            raise _unavailable(what, exc) from None
        data = {"engine_message": message, "engine_status": exc.status}
        if exc.status == 404:
            raise NotFound(f"The Docker Engine has no such object ({message}).", data) from None
        if exc.status == 409:
            raise Conflict(f"The Docker Engine refused to {what}: {message}.", data) from None
        raise EngineError(f"The Docker Engine refused to {what}: {message}.", data) from None
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise EngineUnavailable(
            f"The Docker Engine did not answer in time while trying to {what}.",
            {"engine_message": _text(exc)},
        ) from None
    except (aiohttp.ClientConnectionError, ConnectionError, FileNotFoundError) as exc:
        raise _unavailable(what, exc) from None
    except (aiohttp.ClientError, json.JSONDecodeError) as exc:
        # Anything else aiohttp reports (a malformed reply, a cut-off payload), or a body
        # that is not the JSON it should be: the engine answered, but not usably.
        raise EngineError(
            f"The Docker Engine's answer could not be read while trying to {what} "
            f"({type(exc).__name__}).",
            {"engine_message": _text(exc)},
        ) from None


class RawStream:
    """The raw bytes of a hijacked engine connection (exec or attach), both ways.

    Reading applies back-pressure: while nobody reads, the engine's socket is
    not read either, so a process that writes faster than we consume blocks.
    """

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    async def read(self) -> bytes | None:
        """The next chunk, or None at the end."""
        with translate("read a process's output"):
            msg = await self._stream.read_out()
        return None if msg is None else msg.data

    async def write(self, data: bytes) -> None:
        with translate("write a process's input"):
            try:
                await self._stream.write_in(data)
            except (AssertionError, RuntimeError) as exc:  # aiodocker: the stream is closed
                raise EngineUnavailable(
                    "The process's input stream is closed.", {"engine_message": _text(exc)}
                ) from None

    def write_nowait(self, data: bytes) -> None:
        """Queue bytes on the connection without waiting for it to drain."""
        resp = self._stream._resp  # aiodocker has no public non-waiting write
        transport = resp.connection.transport if resp and resp.connection else None
        if transport is None or transport.is_closing():
            raise EngineUnavailable("The stream to the container is closed.")
        transport.write(data)

    def close_stdin(self) -> None:
        """Half-close: the process sees end-of-file on its stdin."""
        # aiodocker has no public half-close: its close() also drops the read side.
        resp = self._stream._resp
        if resp is not None and resp.connection is not None:
            transport = resp.connection.transport
            if transport is not None and transport.can_write_eof():
                transport.write_eof()

    async def close(self) -> None:
        try:
            await self._stream.close()
        except Exception:  # the engine already dropped the connection
            pass


class Engine:
    """A connection to one Docker Engine: calls bounded and queued, streams apart.

    Request/response calls share ``concurrency`` connections (aiohttp queues
    the rest, so a burst of calls never opens one engine connection each);
    streams that stay open for a process's life (exec and attach, the event
    stream) use a second pool, so they can never starve the calls.
    """

    def __init__(self, url: str | None = None, *, concurrency: int = 32) -> None:
        # Explicit, so a missing socket at start-up is "unreachable", not a crash.
        self.url = url or os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE_URL
        self.concurrency = concurrency
        self._calls: aiodocker.Docker | None = None
        self._streams: aiodocker.Docker | None = None
        self._connectors: list[aiohttp.BaseConnector] = []  # ours to close, not aiodocker's

    def _client(self, limit: int) -> aiodocker.Docker:
        connector: aiohttp.BaseConnector | None = None
        url = self.url
        if url.startswith("unix://"):
            connector = aiohttp.UnixConnector(url[len("unix://") :], limit=limit)
            self._connectors.append(connector)
            url = "unix://localhost"  # the host part of every request URL, as aiodocker's own
        try:
            docker = aiodocker.Docker(url=url, connector=connector, timeout=CALL_TIMEOUT)
        except ValueError as exc:
            raise EngineUnavailable(
                f"The Docker Engine URL {self.url!r} is not usable: {exc}",
                {"engine_message": str(exc)},
            ) from None
        if connector is None:
            # A tcp:// or ssh:// engine: aiodocker builds the connector (TLS settings and
            # all) and offers no way to size it but this attribute.
            built = getattr(docker, "connector", None)
            if built is not None and hasattr(built, "_limit"):
                built._limit = limit
        return docker

    @property
    def docker(self) -> aiodocker.Docker:
        """The client for request/response calls (``concurrency`` connections)."""
        if self._calls is None:
            self._calls = self._client(self.concurrency)
        return self._calls

    @property
    def streams(self) -> aiodocker.Docker:
        """The client for long-lived streams (one connection each, no limit)."""
        if self._streams is None:
            self._streams = self._client(0)
        return self._streams

    async def close(self) -> None:
        for client in (self._calls, self._streams):
            if client is not None:
                # aiodocker re-raises what its session saw last (a dead engine's cut-off
                # reply, say) from close(): closing must still complete.
                with contextlib.suppress(Exception):
                    await client.close()
        for connector in self._connectors:
            with contextlib.suppress(Exception):
                await connector.close()
        self._calls = self._streams = None
        self._connectors = []

    async def version(self) -> dict[str, Any]:
        with translate("report its version"):
            result: dict[str, Any] = await self.docker.version()
            return result

    async def info(self) -> dict[str, Any]:
        with translate("report its configuration"):
            result = await self.docker.system.info()
            return dict(result)

    # containers -------------------------------------------------------
    async def create_container(self, name: str, config: dict[str, Any]) -> str:
        with translate("create a container"):
            container = await self.docker.containers.create(config, name=name)
            return str(container.id)

    async def start(self, cid: str) -> None:
        with translate("start the container"):
            await self.docker.containers.container(cid).start()

    async def pause(self, cid: str) -> None:
        with translate("pause the container"):
            await self.docker.containers.container(cid).pause()

    async def unpause(self, cid: str) -> None:
        with translate("resume the container"):
            await self.docker.containers.container(cid).unpause()

    async def remove(self, cid: str) -> bool:
        """Force-remove (SIGKILL, no stop grace). False when it was already gone."""
        try:
            with translate("remove the container"):
                await self.docker.containers.container(cid).delete(
                    force=True, v=True, timeout=CALL_TIMEOUT
                )
        except NotFound:
            return False
        return True

    async def inspect(self, cid: str) -> dict[str, Any]:
        with translate("inspect the container"):
            container = await self.docker.containers.get(cid)
            return dict(container._container)

    async def list_labelled(self, label: str) -> list[dict[str, Any]]:
        # Raw: containers.list() wraps each entry in an object we would only unwrap.
        with translate("list containers"):
            result: list[dict[str, Any]] = await self.docker._query_json(
                "containers/json",
                params={"all": "true", "filters": json.dumps({"label": [label]})},
            )
            return result

    async def path_mode(self, cid: str, path: str) -> int | None:
        """The mode bits of ``path`` in the container's filesystem, None when absent."""
        # Raw: aiodocker has no HEAD on the archive endpoint, only get_archive (which
        # would download the whole directory).
        try:
            with translate("look at a path in the container"):
                async with self.docker._query(
                    f"containers/{cid}/archive", method="HEAD", params={"path": path}
                ) as response:
                    header = response.headers.get("X-Docker-Container-Path-Stat", "")
        except NotFound:
            return None
        try:
            return int(json.loads(base64.b64decode(header))["mode"])
        except (ValueError, KeyError, TypeError):
            return None

    async def put_archive(self, cid: str, path: str, data: bytes) -> None:
        with translate("copy into the container"):
            container = self.docker.containers.container(cid)
            await container.put_archive(path, data)  # type: ignore[no-untyped-call]

    # images -------------------------------------------------------------
    async def images(self) -> list[dict[str, Any]]:
        with translate("list images"):
            result = await self.docker.images.list()
            return [dict(i) for i in result]

    async def image_inspect(self, ref: str) -> dict[str, Any]:
        with translate("inspect an image"):
            return dict(await self.docker.images.inspect(ref))

    async def pull(self, ref: str) -> AsyncIterator[dict[str, Any]]:
        """Pull ``ref``, yielding the engine's progress lines."""
        with translate(f"pull {ref}"):
            async for line in self.streams.images.pull(ref, stream=True):
                yield dict(line)

    async def image_remove(self, ref: str) -> None:
        with translate("remove an image"):
            await self.docker.images.delete(ref)

    async def commit(self, cid: str, repository: str, tag: str, labels: dict[str, str],
                     pause: bool) -> str:
        with translate("commit the container"):
            container = self.docker.containers.container(cid)
            # The engine merges these labels over the container's own: the sandbox labels
            # travel into the image, and records.container_labels blanks them again in
            # every sandbox made from it.
            result = await container.commit(
                repository=repository, tag=tag, pause=pause, config={"Labels": labels},
            )
            return str(result["Id"])

    async def update_limits(self, cid: str, memory: int, cpus: float, pids: int) -> None:
        """Change a running container's memory (swap kept equal), cpus and pids limits."""
        with translate("update the container's limits"):
            await self.docker._query_json(
                f"containers/{cid}/update", method="POST",
                data={"Memory": memory, "MemorySwap": memory,
                      "NanoCpus": int(cpus * 1e9), "PidsLimit": pids},
            )

    async def kill(self, cid: str) -> None:
        with translate("kill the container"):
            await self.docker.containers.container(cid).kill(signal="KILL")

    async def stats_once(self, cid: str) -> dict[str, Any]:
        """One stats sample without Docker's 1-2 s CPU sampling wait."""
        # Raw: aiodocker's stats() has no ``one-shot`` parameter, and without it every
        # call waits for the engine's one-second CPU sample.
        with translate("read container stats"):
            result: dict[str, Any] = await self.docker._query_json(
                f"containers/{cid}/stats", params={"stream": "false", "one-shot": "true"}
            )
            return result

    # execs --------------------------------------------------------------
    async def exec_create(
        self,
        cid: str,
        cmd: list[str],
        *,
        env: list[str],
        workdir: str | None,
        user: str | None,
        stdin: bool,
        tty: bool,
    ) -> str:
        with translate("create an exec"):
            handle = await self.docker.containers.container(cid).exec(
                cmd,
                stdin=stdin,
                tty=tty,
                user=user or "",
                environment=env,
                workdir=workdir,
            )
            return str(handle.id)

    async def exec_start(self, exec_id: str) -> RawStream:
        """Start an exec and return its raw output stream (our own demuxer reads it)."""
        # aiodocker's Exec.start() demultiplexes in Python, copying and re-slicing its
        # buffer for every frame; its Stream given "tty" hands over the raw bytes, which
        # our demuxer splits at about twice the speed.
        body = json.dumps({"Detach": False, "Tty": False}).encode()

        async def setup() -> tuple[URL, bytes, bool]:
            return URL(f"exec/{exec_id}/start"), body, True

        stream = Stream(self.streams, setup, None)
        with translate("start an exec"):
            await stream.__aenter__()
        return RawStream(stream)

    async def attach(self, cid: str) -> RawStream:
        """The container's stdin, stdout and stderr as one raw hijacked stream."""
        # Raw for the same reason as exec_start; and aiodocker's attach() inspects the
        # container first to learn whether it has a TTY (ours never do).
        url = URL(f"containers/{cid}/attach").with_query(
            {"stream": "1", "stdin": "1", "stdout": "1", "stderr": "1", "logs": "0",
             "detachKeys": ""}
        )

        async def setup() -> tuple[URL, bytes | None, bool]:
            return url, None, True

        stream = Stream(self.streams, setup, None)
        with translate("attach to the container"):
            await stream.__aenter__()
        return RawStream(stream)

    async def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        with translate("inspect an exec"):
            result: dict[str, Any] = await self.docker.containers.exec(exec_id).inspect()
            return result

    async def events(
        self, label: str, actions: list[str], since: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Follow the engine's container events for containers carrying ``label``.

        Yields each event as a dict; ends (or raises ``EngineUnavailable``)
        when the engine goes away. No internal queue: a slow consumer only
        slows the read of this one stream.
        """
        # Raw: aiodocker's DockerEvents pushes into an unbounded channel and awaits each
        # subscriber; reading the stream here keeps the back-pressure with the consumer.
        filters = {"type": ["container"], "label": [label], "event": actions}
        params = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = f"{since:.3f}"
        with translate("follow engine events"):
            async with self.streams._query(
                "events", params=params, timeout=aiohttp.ClientTimeout()
            ) as response:
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            try:
                                yield json.loads(line)
                            except ValueError:
                                continue
