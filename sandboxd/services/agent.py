"""The channel to one sandbox's agent: handshake, frames both ways, execs, files, resync.

Owns an ``AgentSession`` per sandbox with an agent: attaching through the
backend (``Backend.attach``), the HELLO/STATE handshake (resent until the
agent's STATE carries the latest nonce), then one reader that decodes the
agent's frames (``sandboxd.agent.frames``) and hands them on without ever
waiting for a consumer, and re-attaching with back-off when the stream ends
(an engine restart with live-restore keeps the agent and its execs: they
resume where they were acknowledged). Every byte from the agent is untrusted:
a malformed frame, output for an exec it was not asked to run, output past
the send window, or a reply to no request ends this sandbox's channel for
good (``failed``, reported; commands then go through the engine) and touches
no other sandbox. It owns ``AgentExec`` (one exec as the daemon follows it:
its output queue with acknowledgement, stdin within its window, exit) and
``AgentProcess``, the ``backend.base.Process`` view of an exec that the
buffered exec path uses. It must not decide who may run what (the exec
services do) or know about connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from sandboxd.agent import frames as fr
from sandboxd.backend.base import Backend, Channel, Process, ProcessStream
from sandboxd.wire.errors import Conflict, EngineUnavailable, SandboxdError

log = structlog.get_logger("sandboxd.agent")

STARTING, READY, UNAVAILABLE, FAILED = "starting", "ready", "unavailable", "failed"
HELLO_EVERY = 0.5  # seconds between HELLOs until the agent answers
HANDSHAKE_LIMIT = 10.0  # no STATE within this: the stream is given up and attached again
# Bytes an agent may send before its STATE (leftovers of an earlier channel are far less);
# more is a flood, ended as a violation instead of being parsed again at every re-attach.
HANDSHAKE_DISCARD_MAX = 16 * 1024 * 1024
ACK_STEP = 256 * 1024  # output acknowledged at least every this many bytes consumed
ACK_DELAY = 0.01  # a consumer that caught up is acknowledged this soon after (coalesced)
MERGE_MAX = 1024 * 1024  # contiguous pieces of one stream handed on together, up to this
STDIN_CHUNK = 256 * 1024
RETRY_FIRST, RETRY_MAX = 0.1, 2.0
RELEASED_MEMORY = 256  # ids of released execs whose late frames are still tolerated
CHANNEL_GRACE = 30.0  # a channel down this long: those waiting for commands get an error
STAY_DOWN = 5.0  # a channel down this long is not waited for by new calls


@dataclass(frozen=True, slots=True)
class ExitInfo:
    exit_code: int
    timed_out: bool
    signaled: bool


class AgentExec:
    """One exec on the agent: output in order with its offsets, stdin, exit."""

    def __init__(self, session: AgentSession, num: int, *, detached: bool, tty: bool,
                 cmd: list[str]) -> None:
        self.session = session
        self.num = num
        self.detached = detached
        self.tty = tty
        self.cmd = cmd
        self.started_at = time.time()
        self.exit: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self.end_offset: int | None = None  # output's end, once the exit is known
        # (stream, data, offset); data views the bytes the channel read (no copy)
        self._pieces: deque[tuple[int, bytes | memoryview, int]] = deque()
        self._wake = asyncio.Event()
        self.received = 0  # output offset received so far (end of the last OUTPUT)
        self.taken = 0  # output offset handed to the consumer
        self.acked = 0  # acknowledged to the agent
        self._ack_to = 0  # delivered, to be acknowledged by the timer
        self._ack_timer: asyncio.TimerHandle | None = None
        self.stdin_sent = 0
        self.stdin_consumed = 0
        self._stdin_room = asyncio.Event()
        self.released = False
        self.failure: SandboxdError | None = None

    @property
    def running(self) -> bool:
        return not self.exit.done()

    # -- from the session (never waits) ----------------------------------------

    def _output(self, frame: fr.Output) -> None:
        data = frame.data
        offset = frame.offset
        if offset < self.received:  # re-sent after a re-attach: keep what is new only
            skip = self.received - offset
            if skip >= len(data):
                return
            data, offset = data[skip:], self.received
        elif offset > self.received:
            if not self.detached:
                raise fr.ChannelViolation(f"exec {self.num:#x}: output skipped ahead to {offset}")
            self.acked = max(self.acked, offset)  # dropped output counts as acknowledged
        if offset + len(data) > self.acked + fr.SEND_WINDOW:
            raise fr.ChannelViolation(f"exec {self.num:#x}: output past the send window")
        self._pieces.append((frame.stream, data, offset))
        self.received = offset + len(data)
        self._wake.set()

    def _exited(self, frame: fr.Exit) -> None:
        self.end_offset = frame.end_offset
        if not self.exit.done():
            self.exit.set_result(ExitInfo(frame.exit_code, frame.timed_out, frame.signaled))
        self._wake.set()

    def _stdin_ack(self, consumed: int) -> None:
        if consumed > self.stdin_sent:
            raise fr.ChannelViolation(f"exec {self.num:#x}: stdin acknowledged past what was sent")
        self.stdin_consumed = max(self.stdin_consumed, consumed)
        self._stdin_room.set()

    def fail(self, error: SandboxdError) -> None:
        self.failure = error
        if not self.exit.done():
            self.exit.set_exception(error)
            self.exit.exception()  # retrieved here: a consumer may never ask
        self._wake.set()
        self._stdin_room.set()

    # -- for the consumer ------------------------------------------------------

    async def next_output(
        self, ack_now: bool = True
    ) -> tuple[int, bytes | memoryview, int] | None:
        """The next piece of output ``(stream, data, offset)``; None after the last.

        With ``ack_now`` the piece counts as delivered at once (acknowledged in steps);
        otherwise the consumer calls ``ack`` when it has really passed it on.
        """
        while not self._pieces:
            if self.exit.done() and (self.end_offset is None or self.received >= self.end_offset):
                if self.failure is not None:
                    raise self.failure
                return None
            if self.failure is not None:
                raise self.failure
            self._wake.clear()
            await self._wake.wait()
        piece = self._pieces.popleft()
        stream, data, offset = piece
        if self._pieces and self._pieces[0][0] == stream:
            # Hand on what has arrived of this stream at once: fewer, larger pieces.
            parts = [data]
            size = len(data)
            while self._pieces and self._pieces[0][0] == stream and size < MERGE_MAX:
                nxt = self._pieces.popleft()[1]
                parts.append(nxt)
                size += len(nxt)
            piece = (stream, b"".join(parts), offset)
        self.taken = piece[2] + len(piece[1])
        if ack_now:
            self.ack(self.taken, eager=not self._pieces)
        return piece

    def ack(self, offset: int, eager: bool = True) -> None:
        """Output before ``offset`` is delivered. The agent is told in steps of ACK_STEP,
        and, when the consumer has caught up (``eager``), ACK_DELAY later (one
        acknowledgement for all that a fast stream delivers meanwhile), so its window
        keeps moving and it can let go of what it holds."""
        if offset <= self.acked:
            return
        self._ack_to = max(self._ack_to, offset)
        if offset - self.acked >= ACK_STEP:
            self._send_ack()
        elif eager and self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._send_ack)

    def _send_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._ack_to > self.acked:
            self.acked = self._ack_to
            self.session.send_soon(fr.encode_ack(self.num, self.acked))

    async def write(self, data: bytes) -> None:
        """Feed stdin, within the agent's stdin window (this wait is the back-pressure)."""
        view = memoryview(data)
        while view:
            if self.failure is not None:
                raise self.failure
            if not self.running:
                return  # it ended: the rest of its input is moot
            room = fr.STDIN_WINDOW - (self.stdin_sent - self.stdin_consumed)
            if room <= 0:
                self._stdin_room.clear()
                await self._stdin_room.wait()
                continue
            piece = bytes(view[: min(room, STDIN_CHUNK)])
            view = view[len(piece) :]
            self.stdin_sent += len(piece)
            await self.session.send_data(fr.encode_stdin(self.num, piece))

    def close_stdin(self) -> None:
        self.session.send(fr.encode_close_stdin(self.num))

    def signal(self, signo: int) -> None:
        """Signal the command; 9 kills its whole tree."""
        self.session.send(fr.encode_signal(self.num, signo))

    def resize(self, rows: int, cols: int) -> None:
        self.session.send(fr.encode_resize(self.num, rows, cols))

    async def rewind(self, offset: int) -> int:
        """Replay output from ``offset`` (the first byte still held at or after it);
        where the replay really starts."""
        return await self.session.rewind(self, offset)

    def _rewound(self, start: int) -> None:
        """The agent will now send output from ``start``: set in the same step as the
        REWOUND is read, so the replayed frames that follow it are taken, not trimmed."""
        self._pieces.clear()
        self.received = self.taken = start
        self.acked = max(self.acked, start)  # REWOUND raises the agent's acknowledged offset

    def release(self) -> None:
        """Forget the exec at the agent (it has exited and its exit was delivered)."""
        if not self.released:
            self.released = True
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None
            self.session.release(self)


class AgentStream(ProcessStream):
    def __init__(self, exec_: AgentExec) -> None:
        self._exec = exec_

    async def read(self) -> tuple[int, bytes] | None:
        piece = await self._exec.next_output()
        return None if piece is None else (piece[0], bytes(piece[1]))

    async def write(self, data: bytes) -> None:
        await self._exec.write(data)

    def close_stdin(self) -> None:
        self._exec.session.send_soon(fr.encode_close_stdin(self._exec.num))


    async def close(self) -> None:
        if not self._exec.running:
            self._exec.release()


class AgentProcess(Process):
    """An agent exec as the buffered exec path sees any process."""

    def __init__(self, exec_: AgentExec) -> None:
        self.exec = exec_
        self.stream = AgentStream(exec_)

    async def exit_code(self) -> int | None:
        done = self.exec.exit
        return done.result().exit_code if done.done() and not done.exception() else None

    async def wait_exit_code(self) -> int:
        return (await self.exec.exit).exit_code

    async def kill_tree(self) -> int:
        if not self.exec.running:
            return 0
        self.exec.signal(9)  # EngineUnavailable while the channel is down: the reaper retries
        return 1


class AgentSession:
    """The channel to one sandbox's agent; see the module docstring."""

    def __init__(self, backend: Backend, container_id: str, sandbox_id: str,
                 on_state: Callable[[AgentSession], None]) -> None:
        self.backend = backend
        self.container_id = container_id
        self.sandbox_id = sandbox_id
        self.on_state = on_state
        self.state = STARTING
        self.error: str | None = None
        self.execs: dict[int, AgentExec] = {}
        self._requests: dict[int, asyncio.Future[fr.FResult]] = {}
        # Per exec, the REWINDs sent and not yet answered, in order (the agent answers each
        # with one REWOUND, in the order it got them).
        self._rewinds: dict[int, deque[asyncio.Future[int]]] = {}
        self._released: deque[int] = deque(maxlen=RELEASED_MEMORY)
        self._abandoned: deque[int] = deque(maxlen=RELEASED_MEMORY)
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._grace: asyncio.TimerHandle | None = None
        self._channel: Channel | None = None
        self._ready = asyncio.Event()
        self._down_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self.log = log.bind(sandbox_id=sandbox_id)

    @property
    def ready(self) -> bool:
        return self.state == READY

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"agent-{self.sandbox_id}"
        )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._lost(EngineUnavailable("The sandbox is gone."), final=True)

    async def wait_ready(self, within: float) -> bool:
        """Whether the agent is (or within ``within`` becomes) ready. A channel that has
        been down for a while is not waited for: callers then use the engine at once."""
        if self.state in (READY, FAILED):
            return self.ready
        if self.state == UNAVAILABLE and time.monotonic() - self._down_since > STAY_DOWN:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._ready.wait()
        return self.ready

    async def ping(self, within: float) -> bool:
        """Whether the agent answers a PING within ``within`` seconds (a health check:
        the channel is up and the agent's loop is serving)."""
        if not self.ready:
            return False
        ident = self._new_num()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ident] = fut
        try:
            self.send(fr.encode_ping(ident))
            async with asyncio.timeout(within):
                await fut
            return True
        except (TimeoutError, SandboxdError):
            return False
        finally:
            self._pings.pop(ident, None)

    # -- sending ---------------------------------------------------------------

    def _live(self) -> Channel:
        channel = self._channel
        if channel is None or self.state != READY:
            raise EngineUnavailable("The sandbox's agent cannot be reached right now.")
        return channel

    def send(self, frame: bytes) -> None:
        """Queue a frame at once (control frames: their number is bounded by the execs);
        ``EngineUnavailable`` when the channel is down."""
        self._live().write_nowait(frame)

    async def send_data(self, frame: bytes) -> None:
        """Send a frame that carries data (stdin, a file chunk), waiting while the engine
        does not take it."""
        await self._live().write(frame)

    def send_soon(self, frame: bytes) -> None:
        """Send if the channel is up (acknowledgements, releases); lost with it otherwise,
        which the resync after the next attach makes good."""
        with contextlib.suppress(SandboxdError):
            self.send(frame)

    # -- execs and files -------------------------------------------------------

    def _new_num(self) -> int:
        while True:
            num = secrets.randbits(64)
            if num and num not in self.execs:
                return num

    async def start_exec(
        self, cmd: list[str], *, env: dict[str, str], workdir: str | None, stdin: bool,
        tty: bool = False, detached: bool = False, kill_after: float | None = None,
        rows: int = 0, cols: int = 0,
    ) -> AgentExec:
        if not self.ready:
            raise EngineUnavailable("The sandbox's agent cannot be reached right now.")
        num = self._new_num()
        exec_ = AgentExec(self, num, detached=detached, tty=tty, cmd=cmd)
        self.execs[num] = exec_
        # The agent keeps the timeout too, so it holds even while the channel is down.
        timeout_ms = 0 if kill_after is None else max(1, min(int(kill_after * 1000), 0xFFFFFFFF))
        try:
            self.send(fr.encode_start(
                num, cmd, env=env, cwd=workdir or "", tty=tty, stdin=stdin,
                detached=detached, timeout_ms=timeout_ms, rows=rows, cols=cols,
            ))
        except BaseException:
            self.execs.pop(num, None)
            raise
        return exec_

    def release(self, exec_: AgentExec) -> None:
        if self.execs.get(exec_.num) is exec_:
            del self.execs[exec_.num]
            self._released.append(exec_.num)
            self.send_soon(fr.encode_release(exec_.num))

    async def rewind(self, exec_: AgentExec, offset: int) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.send(fr.encode_rewind(exec_.num, offset))
        self._rewinds.setdefault(exec_.num, deque()).append(fut)
        return await fut

    async def file_request(self, frame_for: Callable[[int], bytes]) -> fr.FResult:
        """Send ``frame_for(request_id)`` and wait for its FRESULT."""
        rid = self._new_num()
        fut: asyncio.Future[fr.FResult] = asyncio.get_running_loop().create_future()
        self._requests[rid] = fut
        try:
            await self.send_data(frame_for(rid))
            return await fut
        finally:
            if self._requests.pop(rid, None) is not None and not fut.done():
                self._abandoned.append(rid)  # its caller went: the result may still come

    # -- the channel -----------------------------------------------------------

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state == self.state and error == self.error:
            return
        if state == UNAVAILABLE and self.state != UNAVAILABLE:
            self._down_since = time.monotonic()
        self.state, self.error = state, error
        if state == READY:
            self._ready.set()
        else:
            self._ready.clear()
        self.on_state(self)

    async def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                await self._attach_and_serve()
                delay = RETRY_FIRST  # it was up, then the stream ended: try again at once
            except fr.ChannelViolation as exc:
                self.log.warning("agent_channel_violation", error=str(exc))
                self._set_state(FAILED, f"the agent broke the protocol: {exc}")
                self._lost(EngineUnavailable("The sandbox's agent channel was ended."),
                           final=True)
                return
            except SandboxdError as exc:
                self.log.info("agent_unreachable", error=exc.message, retry_in=delay)
            self._set_state(UNAVAILABLE, "the channel to the agent is down")
            self._lost(EngineUnavailable("The channel to the sandbox's agent was lost."))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _attach_and_serve(self) -> None:
        channel = await self.backend.attach(self.container_id)
        self._channel = channel  # usable once READY (the handshake's STATE sets it)
        try:
            decoder = await self._handshake(channel)
            while True:
                for frame in decoder:
                    self._dispatch(frame)
                data = await channel.read()
                if data is None:
                    return
                decoder.feed(data)
        finally:
            self._channel = None
            await channel.close()

    async def _handshake(self, channel: Channel) -> fr.Decoder:
        nonce = fr.new_nonce()
        decoder = fr.Decoder(nonce)
        deadline = time.monotonic() + HANDSHAKE_LIMIT
        await channel.write(fr.encode_hello(nonce))
        next_hello = time.monotonic() + HELLO_EVERY
        reading: asyncio.Future[bytes | memoryview | None] | None = None
        try:
            while True:
                frame = decoder.next()
                if frame is not None:
                    if not isinstance(frame, fr.State):
                        raise fr.ChannelViolation("the first frame after HELLO is not STATE")
                    self._resync(frame)
                    return decoder
                now = time.monotonic()
                if now > deadline:
                    raise EngineUnavailable("The sandbox's agent did not answer its HELLO.")
                if reading is None:
                    reading = asyncio.ensure_future(channel.read())
                done, _ = await asyncio.wait({reading}, timeout=max(0.0, next_hello - now))
                if reading in done:
                    data, reading = reading.result(), None
                    if data is None:
                        raise EngineUnavailable("The agent's stream ended during the handshake.")
                    decoder.feed(data)
                    if decoder.discarded > HANDSHAKE_DISCARD_MAX:
                        raise fr.ChannelViolation(
                            f"over {HANDSHAKE_DISCARD_MAX} bytes before the answer to HELLO")
                elif time.monotonic() >= next_hello:
                    nonce = fr.new_nonce()
                    decoder.expect(nonce)
                    await channel.write(fr.encode_hello(nonce))
                    next_hello = time.monotonic() + HELLO_EVERY
        finally:
            if reading is not None and not reading.done():
                reading.cancel()

    def _resync(self, state: fr.State) -> None:
        """The agent's view after (re-)attaching: known execs go on, a detached one this
        daemon did not start (it was restarted) is kept for ``exec.attach``, any other
        is killed and forgotten."""
        listed = {rec.exec_id for rec in state.execs}
        for num, exec_ in list(self.execs.items()):
            if num not in listed:
                self.execs.pop(num)
                exec_.fail(EngineUnavailable("The agent no longer knows this command."))
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._set_state(READY)
        for rec in state.execs:
            known = self.execs.get(rec.exec_id)
            if known is not None:
                known.acked = max(known.acked, rec.acked)
                continue
            if rec.detached:
                adopted = AgentExec(self, rec.exec_id, detached=True, tty=rec.tty, cmd=[])
                adopted.received = adopted.taken = adopted.acked = rec.acked
                if rec.exited:
                    adopted.end_offset = rec.end_offset
                    adopted.exit.set_result(ExitInfo(rec.exit_code, rec.timed_out, rec.signaled))
                self.execs[rec.exec_id] = adopted
            else:  # its caller went with the old daemon: end it; its last frames are late
                self._released.append(rec.exec_id)
                self.send_soon(fr.encode_signal(rec.exec_id, 9))
                self.send_soon(fr.encode_release(rec.exec_id))
        self.log.info("agent_ready", execs=len(state.execs), agent_version=state.agent_version)

    def _dispatch(self, frame: fr.AgentFrame) -> None:
        if isinstance(frame, fr.Output):
            exec_ = self.execs.get(frame.exec_id)
            if exec_ is None:
                self._late(frame.exec_id, "OUTPUT")
            else:
                exec_._output(frame)
        elif isinstance(frame, fr.Exit):
            exec_ = self.execs.get(frame.exec_id)
            if exec_ is None:
                self._late(frame.exec_id, "EXIT")
            else:
                exec_._exited(frame)
        elif isinstance(frame, fr.StdinAck):
            exec_ = self.execs.get(frame.exec_id)
            if exec_ is None:
                self._late(frame.exec_id, "STDIN_ACK")
            else:
                exec_._stdin_ack(frame.consumed)
        elif isinstance(frame, fr.StartFailed):
            exec_ = self.execs.pop(frame.exec_id, None)
            if exec_ is None:
                self._late(frame.exec_id, "START_FAILED")
            else:
                exec_.fail(Conflict(
                    f"The sandbox could not start the command: {frame.message}",
                    {"errno": frame.errno},
                ))
        elif isinstance(frame, fr.FResult):
            fut = self._requests.get(frame.request_id)
            if fut is None:
                if frame.request_id not in self._abandoned:
                    raise fr.ChannelViolation("a file result for no request")
            elif not fut.done():
                fut.set_result(frame)
        elif isinstance(frame, fr.Rewound):
            waiting = self._rewinds.get(frame.exec_id)
            rewound = waiting.popleft() if waiting else None
            if waiting is not None and not waiting:
                del self._rewinds[frame.exec_id]
            exec_ = self.execs.get(frame.exec_id)
            if rewound is None or exec_ is None:
                if rewound is not None and not rewound.done():
                    rewound.set_exception(Conflict("The command was released."))
                self._late(frame.exec_id, "REWOUND")
                return
            exec_._rewound(frame.offset)
            if not rewound.done():
                rewound.set_result(frame.offset)
        elif isinstance(frame, fr.Error):
            self.log.warning("agent_error", code=frame.code, message=frame.message[:200],
                             ident=frame.ident)
        elif isinstance(frame, fr.Pong):
            pinged = self._pings.pop(frame.ident, None)
            if pinged is not None and not pinged.done():
                pinged.set_result(None)
        elif isinstance(frame, fr.State):
            raise fr.ChannelViolation("a STATE without a HELLO")
        # Started: nothing to do.

    def _late(self, num: int, what: str) -> None:
        """A frame for an exec this daemon does not follow: fine for one it just released
        or killed after a resync; a violation otherwise."""
        if num not in self._released:
            raise fr.ChannelViolation(f"{what} for an exec the daemon did not start")

    def _lost(self, error: SandboxdError, final: bool = False) -> None:
        """The channel went down: pending file requests fail; execs wait for the channel
        to come back (their commands go on in the sandbox), or fail when it never will."""
        pending: list[asyncio.Future[Any]] = [
            *self._requests.values(), *(f for q in self._rewinds.values() for f in q),
            *self._pings.values()]
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)
        self._requests.clear()
        self._rewinds.clear()
        self._pings.clear()
        if final:
            for exec_ in self.execs.values():
                exec_.fail(error)
            self.execs.clear()
        elif self._grace is None and self.execs:
            # Commands run on in the sandbox and their output is kept by the agent; those
            # who wait for them give up if the channel stays down this long.
            self._grace = asyncio.get_running_loop().call_later(
                CHANNEL_GRACE, self._give_up, error
            )

    def _give_up(self, error: SandboxdError) -> None:
        self._grace = None
        if self.ready:
            return
        for exec_ in self.execs.values():
            if not exec_.detached:
                exec_.fail(error)


__all__ = [
    "FAILED", "READY", "STARTING", "UNAVAILABLE", "AgentExec", "AgentProcess", "AgentSession",
    "ExitInfo",
]
