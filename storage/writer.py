"""A writer process: one hot write path's transactions, run in a child process fed over a socket pair.

Why: on SQLite, alert intake's writer thread (building and writing a batch's rows) shares the interpreter
lock with the HTTP front (aiohttp, auth, parsing); each of its many SQLite calls gives the lock up and has to
win it back from the front. A child process has an interpreter lock of its own, so the two run on two
cores. SQLite's file lock (transactions begin IMMEDIATE, with a busy timeout) serialises the child's
transactions with those of the parent's other writers.

Protocol: frames of a 4-byte big-endian length and a pickle. The parent's first frame names a factory
(`module:function`) and its keyword arguments; the child calls it to get a handler and answers
`("ready", pid)` (or `("error", text)`). Every further frame from the parent is one message, sent as
soon as it is made (the parent never waits for an answer before sending more). The child takes every
message that has arrived (at least one, at most MAX_TAKE), calls `handler(messages)`, which returns one
answer per message, and sends those answers back as one frame: a handler can apply what queued up while
it was busy in one transaction. Answers come back in the order of the messages.

The child exits at the end of its input: when the parent closes its end, or when the parent dies,
SIGKILL included (the kernel closes the parent's socket), so it never outlives the bot by more than the
transaction it is in. It ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the
parent, finishing the requests in flight, still needs it.

`python -m storage.writer FD` is the child; `WriterProcess` is the parent's end.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger("chatops.writer")
_HEADER = struct.Struct(">I")
_ROOT = str(Path(__file__).resolve().parent.parent)  # the child imports the same code as the parent
_PICKLE = pickle.HIGHEST_PROTOCOL
MAX_TAKE = 256  # messages a handler gets at once, at most


class WriterGone(ConnectionError):
    """The writer process is not there (it failed to start, exited or was killed) and will not answer.

    What it was given and had not answered was not committed, unless it died in the instant between a commit
    and its answer: as with any server that dies before answering, a sender's retry then repeats it (a retry
    with the same X-Delivery-ID gets the first answer)."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def wire_time(moment: datetime) -> datetime | int:
    """A time as it travels to a writer process: a UTC datetime as microseconds since 1970 (an int pickles in a tenth
    of a microsecond; a datetime with its tzinfo takes about 9, and unpickling it 5, for every message); any other as
    it is. `from_wire_time` takes it back."""
    return (moment - _EPOCH) // _MICROSECOND if moment.tzinfo is UTC else moment


def from_wire_time(moment: datetime | int) -> datetime:
    """What `wire_time` sent: the same datetime (UTC, to the microsecond)."""
    return _EPOCH + timedelta(microseconds=moment) if type(moment) is int else moment  # type: ignore[return-value]


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, _PICKLE)
    return _HEADER.pack(len(data)) + data


class WriterProcess:
    """The parent's end of one writer process: `call(message)` answers in order; `close()` ends it.

    Calls made while it starts are queued and sent once it is ready. If the process exits (or cannot
    start), every call waiting for an answer, and every later one, fails with WriterGone: the caller
    starts another WriterProcess for what comes next.
    """

    def __init__(self, factory: str, kwargs: dict[str, Any], *, name: str = "writer"):
        self.factory, self.kwargs, self.name = factory, kwargs, name
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None  # set once the process is ready
        self._backlog: list[bytes] = []  # frames of calls made before it was ready
        self._waiting: deque[asyncio.Future[Any]] = deque()  # answers due, in order
        self._ready: asyncio.Future[Any] | None = None
        self._drained: asyncio.Future[None] | None = None  # set when no answer is due (close() waits for it)
        self._gone: BaseException | None = None
        self._starting: asyncio.Task[None] | None = None
        self._reaping: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._gone is None

    def start(self) -> asyncio.Task[None]:
        """Spawn it (once); the task ends when it is ready or gone."""
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
        return self._starting

    def call(self, message: Any) -> asyncio.Future[Any]:
        """Send `message` now (or as soon as the process is ready); the future gets the handler's answer."""
        if self._gone is not None:
            raise WriterGone(f"the {self.name} process is gone ({self._gone})")
        frame = _frame(message)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if self._transport is None:
            self._backlog.append(frame)
            self.start()
        else:
            self._transport.write(frame)
        return future

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        transport: asyncio.Transport | None = None
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
            env[LOG_ENV] = _log_setting()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "storage.writer", str(child.fileno())], pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL, env=env)
            self.pid = self._proc.pid
            child.close()
            self._ready = loop.create_future()
            transport, _ = await loop.create_unix_connection(lambda: _Answers(self), sock=parent)
            transport.write(_frame((self.factory, self.kwargs)))
            status, detail = await self._ready
            if status != "ready":
                raise WriterGone(f"the {self.name} process did not start: {detail}")
            self._transport = transport
            for frame in self._backlog:
                transport.write(frame)
            self._backlog.clear()
            log.info("%s process %s started", self.name, self.pid)
        except BaseException as exc:
            child.close()
            if transport is None:
                parent.close()
            else:
                transport.close()
            self._lost(exc if isinstance(exc, WriterGone) else WriterGone(f"{type(exc).__name__}: {exc}"))
            if not isinstance(exc, Exception):
                raise

    def abandon(self, why: str) -> None:
        """Give the process up (it stopped answering): kill it, so that nothing it was given commits after this;
        every call waiting for an answer, and every later one, fails with WriterGone."""
        log.error("%s process %s %s; killing it: what it was given gets 503, and senders retry", self.name, self.pid,
                  why)
        self._lost(WriterGone(f"the {self.name} process {why}"), kill=True)

    def _received(self, frame: Any) -> None:
        """A frame from the process: its handshake, then lists of answers (to the messages taken together)."""
        if self._transport is None:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(frame)
            return
        waiting = self._waiting
        for answer in frame:
            future = waiting.popleft()
            if not future.done():
                future.set_result(answer)
        if not waiting and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _disconnected(self, exc: BaseException | None) -> None:
        unexpected = self._gone is None  # not closed from here
        code = self._proc.poll() if self._proc is not None else None
        reason = f"exited with {code}" if code is not None else (
            f"closed its end ({type(exc).__name__}: {exc})" if exc else "closed its end")
        if unexpected:
            if self._waiting:
                log.error("%s process %s %s with %d answers due; they get 503", self.name, self.pid, reason,
                          len(self._waiting))
            else:
                log.warning("%s process %s %s", self.name, self.pid, reason)
        gone = WriterGone(f"the {self.name} process {reason}")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(gone)
        # Still running (its answers made no sense, say): it must not commit anything once its successor runs.
        self._lost(gone, kill=unexpected)

    def _lost(self, exc: BaseException, *, kill: bool = False) -> None:
        if self._gone is None:
            self._gone = exc
        if kill and self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(WriterGone(str(self._gone)))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._transport is not None:
            self._transport.close()
        if self._proc is not None and self._reaping is None and self._proc.poll() is None:
            self._reaping = asyncio.get_running_loop().create_task(self._reap(15.0))  # no zombie

    async def _reap(self, timeout: float) -> None:
        assert self._proc is not None
        try:
            await asyncio.to_thread(self._proc.wait, timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s process %s did not exit %.0f s after its input ended; killing it", self.name,
                        self.pid, timeout)
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)

    async def close(self, timeout: float = 15.0) -> None:
        """No more calls; the answers due arrive (for up to `timeout`), then end of input: the process exits.

        What is still unanswered after `timeout` fails with WriterGone, and the process is killed first, so
        that nothing it was given commits after that."""
        if self._gone is None:
            self._gone = WriterGone(f"the {self.name} process was closed")
        if self._starting is not None and not self._starting.done():
            await asyncio.wait([self._starting], timeout=timeout)
        if self._waiting and self._transport is not None:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except asyncio.TimeoutError:
                log.warning("%s process %s: %d answers still due after %.0f s; killing it", self.name, self.pid,
                            len(self._waiting), timeout)
        self._lost(self._gone, kill=bool(self._waiting))
        if self._reaping is not None:
            await asyncio.shield(self._reaping)


class _Answers(asyncio.Protocol):
    """Frames from the writer process, handed over as they complete (no task, no extra loop iteration)."""

    def __init__(self, owner: WriterProcess):
        self.owner = owner
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            end = _HEADER.size + size
            if len(buffer) < end:
                return
            frame = pickle.loads(buffer[_HEADER.size:end])
            del buffer[:end]
            self.owner._received(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._disconnected(exc)


# -- the child ----------------------------------------------------------------------------------------


class _Frames:
    """The child's input: whole frames, as many as have arrived."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    def _parse(self, out: list[Any], limit: int) -> None:
        buffer = self.buffer
        while len(out) < limit and len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            end = _HEADER.size + size
            if len(buffer) < end:
                return
            out.append(pickle.loads(buffer[_HEADER.size:end]))
            del buffer[:end]

    def take(self, limit: int) -> list[Any] | None:
        """Wait for one frame, then take every other whole frame already here (up to `limit`); None at the end."""
        out: list[Any] = []
        while True:
            self._parse(out, limit)
            if len(out) >= limit or self.eof:
                return out or None
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT if out else 0)
            except BlockingIOError:
                return out
            except OSError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.buffer += data


LOG_ENV = "CHATOPS_WRITER_LOG"  # "FORMAT:LEVEL" of the parent's log, for what the child logs itself


def _log_setting() -> str:
    """How the parent logs ("text:INFO", "json:DEBUG"): the child's own lines (its WAL checkpointer's) look the same,
    where they were bare lines on stderr, without time or level."""
    from bot.logs import JsonFormatter

    root = logging.getLogger()
    json_log = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return f"{'json' if json_log else 'text'}:{logging.getLevelName(root.getEffectiveLevel())}"


def main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fmt, _, level = os.environ.get(LOG_ENV, "").partition(":")
    if fmt in ("text", "json") and level:
        from bot.logs import setup

        setup(fmt, level)
    sock = socket.socket(fileno=fd)
    frames = _Frames(sock)

    def send(message: Any) -> bool:
        try:
            sock.sendall(_frame(message))
            return True
        except OSError:  # the parent is gone
            return False

    init = frames.take(1)
    if init is None:
        return 0
    factory, kwargs = init[0]
    try:
        module, _, name = factory.partition(":")
        handler: Callable[[list[Any]], list[Any]] = getattr(importlib.import_module(module), name)(**kwargs)
    except Exception:
        send(("error", traceback.format_exc(limit=5)))
        return 1
    if not send(("ready", os.getpid())):
        return 0
    while (messages := frames.take(MAX_TAKE)) is not None:
        answers = handler(messages)
        assert len(answers) == len(messages)
        if not send(answers):
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
