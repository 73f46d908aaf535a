"""A writer process, and the frames that pass between it and its server.

Shared by the two stores whose writes go through a writer process of their own (SQLite's
``sqlite_writer``, PostgreSQL's ``pg_writer``): the server sends frames of jobs on the
child's stdin and reads one reply per frame on its stdout. A frame is a header (length,
frame id) and a pickle of plain data: first the writer's set-up, answered ``"ready"`` (or a
``JobFailure``); then a list of jobs ``(op, args)`` per frame, answered under the same frame
id with the writer's count of transactions committed so far and one answer per job: its
result, a ``Problem`` (the request's own 4xx) or a ``JobFailure`` (503). No exception object
ever crosses: the writer runs as ``__main__``, and a class pickled from there can't be read
by the server. Replies are matched by id, so a frame that can't be read or sent fails alone
and never shifts the others' answers.

What the server does with a writer (supervision, backpressure, group commit by loop turn)
is ``writer_supervisor.WriterSupervisor``; what a writer does with its jobs is its store's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import select
import signal
import struct
import sys
import time
from typing import Any, BinaryIO

from .. import logs
from .base import JobFailure

_FRAME = struct.Struct("!IQ")  # payload length, frame id
INGEST_OPS = ("ingest", "ingest_browser")  # the jobs that store events (a commit that works)
EXIT_WAIT_S = 1.0  # a writer whose output ended has this long to exit before it is killed


class WriterGone(Exception):
    """The writer process exited or was killed before answering (a server-side exception:
    it never crosses the pipe)."""



class WriterProcess:
    """A writer in a process of its own (``python -m <module>``: ``sqlite_writer``, ``pg_writer``).

    Frames are pipelined: the server sends each (up to ``frame_jobs`` jobs) as soon as it
    has one, up to ``depth`` in flight, and the writer applies the frames waiting in its
    pipe together (SQLite: up to ``TRANSACTION_JOBS`` jobs a transaction) — so the commit
    never waits on a round trip, and a slow commit makes the next one bigger, not later. Each
    reply names its frame's id. The pipes are asyncio's own, so no helper thread has to
    win the GIL from the event loop to pass a frame or an answer along.

    One life of one process: when it exits, is killed, or leaves a frame unanswered for
    ``timeout_s`` (killed then), every frame it held fails with ``WriterGone`` and
    ``on_exit`` is called; the store's supervisor starts a new one. A job is answered only
    after its commit, so nothing acknowledged depends on a writer living on. If the server
    dies (even by kill -9), the writer reads end-of-file and exits.
    """

    depth = 64
    frame_jobs = 8  # small frames, so that a SQLite transaction can stop at TRANSACTION_JOBS

    def __init__(self, module: str, setup: Any, timeout_s: float = 10.0):
        self.module = module  # run as ``python -m module``; its main() serves the frames
        self.args = setup  # the first frame: what the writer needs to set up
        self.timeout_s = timeout_s
        self._process: asyncio.subprocess.Process | None = None
        self._replies: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._waiting: dict[int, tuple[asyncio.Future[Any], float]] = {}  # id: (answer, sent)
        self._ids = itertools.count(1)
        self.transactions = 0  # committed so far, as the last reply said
        self.exit_reason: str | None = None
        self.on_exit: Any = None  # called once with this writer when its process is gone
        self.on_commit: Any = None  # called with the jobs of each committed transaction
        self._counting = (0, 0)  # (transaction, its jobs replied so far): ``_count_commit``

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._replies is not None and not self._replies.done()

    async def start(self) -> None:
        # Linux refuses a single environment string over 128 KiB (MAX_ARG_STRLEN); the
        # writer needs nothing that large, so such values are not passed on.
        env = {k: v for k, v in os.environ.items() if len(k) + len(v) < 65536}
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        # -P: without it, ``-m`` puts the working directory first on the path, and a shop
        # that runs ``onetag serve`` from a project with a ``server/`` package of its own
        # would start that package's module instead of this writer.
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", self.module,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 24)
        self._replies = asyncio.create_task(self._read_replies(), name="onetag-writer-replies")
        try:
            ready = await asyncio.wait_for(self._send(0, self.args), max(self.timeout_s, 30))
        except (asyncio.TimeoutError, WriterGone) as exc:
            ready = JobFailure("writer", f"the writer process did not start ({exc or 'timeout'})")
        if ready != "ready":
            await self.stop(grace_s=1)
            failure = ready if isinstance(ready, JobFailure) else JobFailure("writer", repr(ready))
            raise WriterStartFailed(failure)
        if self.timeout_s > 0:
            self._watchdog = asyncio.create_task(self._watch(), name="onetag-writer-watchdog")

    def submit(self, jobs: list[tuple[str, tuple[Any, ...]]]) -> asyncio.Future[Any]:
        """Send one frame (a group commit's jobs); its answers, once committed.

        Raises ``WriterGone`` if the process is gone, or the pickling error of a frame that
        can't be sent (nothing was written to the pipe then).
        """
        return self._send(next(self._ids), jobs)

    def _send(self, frame_id: int, message: Any) -> asyncio.Future[Any]:
        if not self.alive or self._process is None or self._process.stdin is None:
            raise WriterGone(self.exit_reason or "the writer process is not running")
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # may raise: not sent
        future = asyncio.get_running_loop().create_future()
        self._waiting[frame_id] = (future, time.monotonic())
        self._process.stdin.write(_FRAME.pack(len(data), frame_id) + data)
        return future

    async def _read_replies(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        try:
            while True:
                size, frame_id = _FRAME.unpack(await stdout.readexactly(_FRAME.size))
                payload = await stdout.readexactly(size)
                waiting = self._waiting.pop(frame_id, None)
                try:
                    transactions, reply = pickle.loads(payload)
                except Exception as exc:  # this frame's answer alone is lost
                    if waiting is not None and not waiting[0].done():
                        waiting[0].set_exception(WriterGone(f"an unreadable reply ({exc})"))
                    continue
                self.transactions = transactions
                if self.on_commit is not None and isinstance(reply, list):
                    self._count_commit(transactions, len(reply))
                if waiting is not None and not waiting[0].done():
                    waiting[0].set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._process.returncode is None:
                # Its output ends as it exits: asyncio's child watcher reaps it a moment
                # later. Killing it at once polled (Popen.send_signal) and reaped it first,
                # and the watcher printed "Unknown child process pid N, will report
                # returncode 255" on the command's stderr.
                try:
                    await asyncio.wait_for(self._process.wait(), EXIT_WAIT_S)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        self._process.kill()  # a writer whose output ended is of no more use
            code = await self._process.wait()
            self.exit_reason = self.exit_reason or f"the writer process exited (code {code})"
            self._fail_waiting()
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self.on_exit is not None:
                self.on_exit(self)

    def _count_commit(self, transaction: int, jobs: int) -> None:
        """Group commit sizes, from the replies alone: the frames of one transaction are
        answered one after another under its number (the count after its commit). It is
        complete when a later number arrives, or when no frame is left waiting (its frames
        were all sent before its first reply). A failed commit's replies repeat the last
        number, which was counted already, and are not a commit."""
        counting, so_far = self._counting
        if transaction != counting:
            if so_far:
                self.on_commit(so_far)
            counting, so_far = transaction, 0
        elif so_far == 0:  # a number whose transaction was counted: a failed commit
            return
        so_far += jobs
        if not self._waiting:
            self.on_commit(so_far)
            so_far = 0
        self._counting = (counting, so_far)

    def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(WriterGone(self.exit_reason or "the writer process exited"))

    async def _watch(self) -> None:
        """Kill a writer that leaves a frame unanswered for ``timeout_s`` (hung, stopped)."""
        period = min(1.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            if not self._waiting:
                continue
            oldest = min(sent for _, sent in self._waiting.values())
            waited = time.monotonic() - oldest
            if waited > self.timeout_s and self._process is not None:
                self.exit_reason = (f"the writer process (pid {self._process.pid}) answered "
                                    f"nothing for {waited:.1f} s; it was killed")
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()  # works on a stopped process too
                return

    async def stop(self, grace_s: float = 10) -> None:
        """End of file after what was sent: it finishes and exits; killed after ``grace_s``."""
        process = self._process
        if process is None:
            return
        self.on_exit = None  # a stop is not a death to recover from
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if self._replies is not None:
            await self._replies
        if self._watchdog is not None:
            self._watchdog.cancel()


class WriterStartFailed(Exception):
    """A writer process that could not set up (the database can't be opened or written)."""

    def __init__(self, failure: JobFailure):
        super().__init__(failure.message)
        self.failure = failure


READ_BYTES = 64 * 1024


class FrameReader:
    """Frames from a file descriptor: block for the first, then take whatever else is there.

    Each frame is ``(id, message)``; a message that can't be unpickled is ``UNREADABLE``.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()
        self.eof = False

    def _complete(self) -> list[tuple[int, Any]]:
        frames = []
        while len(self.buffer) >= _FRAME.size:
            size, frame_id = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + size:
                break
            try:
                message = pickle.loads(self.buffer[_FRAME.size:_FRAME.size + size])
            except Exception:
                message = UNREADABLE
            frames.append((frame_id, message))
            del self.buffer[:_FRAME.size + size]
        return frames

    def _fill(self) -> None:
        # 64 KiB: under glibc's mmap threshold (128 KiB), so a read's buffer comes from the
        # heap; a 1 MiB one was an mmap, an mremap and a munmap every read. A larger frame
        # takes a few more reads.
        chunk = os.read(self.fd, READ_BYTES)
        if chunk:
            self.buffer += chunk
        else:
            self.eof = True

    def next(self) -> list[tuple[int, Any]]:
        """At least one frame (blocking), plus every frame already waiting; [] at the end."""
        frames = self._complete()
        while not frames and not self.eof:
            self._fill()
            frames = self._complete()
        return frames + self.waiting()

    def read_ready(self) -> list[tuple[int, Any]]:
        """One read (the descriptor is readable: an event loop said so) and the frames it
        completed; ``eof`` is set at the end."""
        self._fill()
        return self._complete()

    def waiting(self) -> list[tuple[int, Any]]:
        """Every frame already there, without blocking."""
        frames = self._complete()
        while not self.eof and select.select([self.fd], [], [], 0)[0]:
            self._fill()
            frames += self._complete()
        return frames


UNREADABLE = "unreadable frame"


def encode_frame(frame_id: int, message: Any) -> bytes:
    """One message on the pipe: its length and id, then its pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data), frame_id) + data


def reply_frame(frame_id: int, transactions: int, answers: list[Any]) -> bytes:
    """A frame's reply: the writer's count of commits and one answer per job. Answers that
    can't be pickled fail their frame alone, each job with a ``JobFailure``."""
    try:
        return encode_frame(frame_id, (transactions, answers))
    except Exception as exc:
        failure = JobFailure("writer", f"an answer could not be sent ({exc})")
        return encode_frame(frame_id, (transactions, [failure] * len(answers)))


def child_pipes() -> tuple[BinaryIO, FrameReader]:
    """In the writer process: its reply stream (the real stdout, which nothing else may
    write to: ``print`` goes to stderr from here on) and a reader of its frames. Ctrl-C and
    SIGTERM to the process group are the server's to handle: it closes our stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure_from_env()  # the server's format, on the server's stderr
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr
    return stdout, FrameReader(sys.stdin.fileno())

