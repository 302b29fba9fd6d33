"""The pool of Worker processes: warm spares, one job per process (or one federation), limits enforced from outside.

Theory of operation
-------------------
Every Worker process (``python -m hivecell.node.worker``, or a fork of the zygote below; see ``worker.py`` for the
frame protocol) is owned by one task in the pool's nursery (:meth:`WorkerPool._own_worker`): it starts the process in
its own session (so the whole process group can be killed), drains stderr into a bounded tail for local logs, waits
for the ``ready`` frame, and finally kills and reaps the process whatever happens, including when the pool closes.

A keeper task holds ``warm`` spares: processes that have imported torch and wait, untouched by any job data. A job
claims a ready spare (or, with ``warm=0``, starts a cold one). A spare that dies while waiting is replaced with
exponential backoff so a broken interpreter cannot make the pool spin.

Forked workers (the default with ``warm`` > 0, on Linux 5.3+): importing torch costs seconds of CPU per interpreter
(about 5 on the 2-core dev box, more on a Jetson), so the pool keeps one *zygote* (``worker.py --zygote``) that has
imported everything a worker needs, never runs a torch operation nor sees job data, and forks each worker on request
(:class:`_Zygote`). The pool hands it the new worker's three pipes over a Unix socket (``SCM_RIGHTS``); the child
becomes an ordinary worker in a session of its own, so everything below applies unchanged. The worker is the
zygote's child, not the pool's: the pool sees it exit through a pidfd and learns its exit status from the zygote,
which reaps it (:class:`_ForkedProcess`). A zygote that dies is started again at the next request; its workers live
on, and a result one of them sends counts though its exit status is lost. With a zygote, a replacement spare is
forked at once; a spawned one (``fork=False``) is started only once no job runs, or at once if a job is waiting for a
worker, because on a 2-core box an interpreter importing torch beside a running job slowed its training several-fold
(bench/job_roundtrip.py).

:meth:`WorkerPool.run_job` talks to the claimed worker over its pipes and enforces, from the parent side: wall time
(``trio.fail_after`` then SIGKILL to the group), memory (RSS polled with psutil every 0.5 s, SIGKILL above the limit;
the worker's own ``RLIMIT_DATA`` is the first line), and a cap on every frame it reads. Every failure becomes
:class:`WorkerFailed` with a code from a small set and a short reason that is safe to send to a peer.

Reuse within a federation
-------------------------
In model-centric federated learning a node runs one job per round for the same federation, and a fresh interpreter
per job would pay the torch import every round. A job may therefore carry a ``reuse_key``; the daemon builds it from
(scientist, dataset, program hash). For such a job the pool keeps the worker's stdin open, and once the worker has
sent its ``result`` (it then waits for another job frame, see ``worker.py``) the pool *parks* it under the key instead
of letting it exit. The next job with the same key and the same memory and thread limits runs on the parked worker
(no spare is claimed); anything else claims a spare as before. A parked worker is killed and reaped when it has been
idle ``reuse_idle_s`` (the federation ended or went idle), when more than ``max_parked`` are parked (the oldest
goes), or when the pool closes; after ``max_jobs_per_worker`` jobs a worker is let exit instead of being parked.
Parked workers are not spares: the keeper still holds ``warm`` unclaimed ones, so a federation costs a node at most
one extra torch import, in its first round.

Why this is safe: the plan is data (an audited graph, no code), and the only state a second job can meet in the
process is what the first one left there, which came from the same scientist's program on the same dataset; the
key admits no other job. The worker keeps the loaded program and the dataset's rows between such jobs; new weights
replace every tensor of the program, and the rows are handed to each job as copies (``worker.py``, ``_Kept``). Each job gets its own wall-time deadline and RSS watcher exactly as a fresh worker would,
and the worker applies the job's limits again (same values: they only ever go down). A worker is parked only after
a well-formed ``result``; one whose job failed, timed out, exceeded its memory, broke the protocol or was killed is
never reused. A job with a CPU-time limit is never run on a parked worker nor parked: ``RLIMIT_CPU`` counts the
process's whole life, not one job's.
"""

from __future__ import annotations

import array
import errno
import inspect
import logging
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import trio

from hivecell.crypto.canonical import CanonicalError, canonical_packb, strict_unpackb

from .worker import ZYGOTE_MESSAGE

__all__ = ["WorkerFailed", "WorkerJob", "WorkerLimits", "WorkerPool", "WorkerResult", "open_worker_pool"]

logger = logging.getLogger(__name__)

FAILURE_CODES = frozenset({"timeout", "memory", "crashed", "bad_plan", "bad_data", "error"})
_WORKER_CODES = frozenset({"bad_plan", "bad_data", "memory", "error"})
_HEADER = struct.Struct(">I")
_SMALL_FRAME = 1 << 20  # ready / progress / error frames
_STDERR_TAIL = 4096
_RSS_POLL_S = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE")


_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _tree_rss(proc: psutil.Process) -> int:
    """RSS of a worker and its descendants, from the kernel's own lists (``/proc/PID/task/*/children``), so a poll
    costs a few small reads; psutil's ``children()`` scans every process on the box, which on a loaded node was a
    tenth of the daemon's CPU while jobs ran. Falls back to psutil where the kernel lacks those files.

    Raises:
        psutil.NoSuchProcess: the worker itself is gone.
    """
    if not _PROC_CHILDREN:
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    total, stack, seen = 0, [proc.pid], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
            tasks = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            if pid == proc.pid:
                raise psutil.NoSuchProcess(pid) from None
            continue  # a descendant that exited while we looked
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                    stack.extend(int(c) for c in f.read().split())
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that exited (its children went to another thread of the process)
    return total


_CLAIM_ATTEMPTS = 3


class WorkerFailed(Exception):
    """A job did not produce a result.

    ``code`` is one of ``timeout``, ``memory``, ``crashed``, ``bad_plan``, ``bad_data``, ``error``; ``reason`` is a
    short text that is safe to send to the peer that asked for the job.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class WorkerJob:
    """One job for a worker.

    ``reuse_key``: jobs with the same key may run one after another in the same worker process (see the module
    docstring); ``None`` (the default) gives the job a process of its own that exits after it.
    """

    job_id: str
    store_path: str
    data_key: str
    program: bytes
    weights: bytes
    recipe: dict[str, Any]
    reuse_key: str | None = None


@dataclass(frozen=True)
class WorkerLimits:
    wall_s: float = 3600
    memory_mb: int = 4096
    cpu_s: int | None = None
    threads: int | None = None


@dataclass(frozen=True)
class WorkerResult:
    """A job's trained weights, metrics and timings; ``worker_pid`` is for local logs and tests, never for a peer."""

    weights: bytes
    metrics: dict[str, Any]
    timings: dict[str, float]
    worker_pid: int = 0
    device: str = "cpu"  # where the job ran: "cpu" or "cuda"


class _NotAccepted(Exception):
    """The worker exited before it acknowledged the job: the job never ran."""


class _StartFailed(Exception):
    """A worker exited or misbehaved before it said it was ready."""


class _FrameReader:
    """Length-prefixed canonical msgpack maps from a trio receive stream, each capped before it is read."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = await self._stream.receive_some(min(max(n - len(self._buf), 65536), 1 << 22))
            if not chunk:
                return False
            self._buf += chunk
        return True

    async def _take(self, n: int) -> bytearray | None:
        """The next ``n`` bytes, received into one buffer of that size (a result frame carries the trained weights:
        no growing buffer, no copies of it); ``None`` if the stream ends first."""
        if len(self._buf) >= n:
            body = self._buf[:n]
            del self._buf[:n]
            return body
        body, got = bytearray(n), len(self._buf)
        body[:got], self._buf = self._buf, bytearray()
        while got < n:
            chunk = await self._stream.receive_some(min(max(n - got, 65536), 1 << 22))
            if not chunk:
                return None
            take = min(len(chunk), n - got)
            body[got:got + take] = memoryview(chunk)[:take]
            got += take
            if take < len(chunk):  # the start of the next frame
                self._buf += memoryview(chunk)[take:]
        return body

    async def read(self, *, cap: int) -> dict[str, Any] | None:
        """One frame, or ``None`` at EOF. Raises ``ValueError`` on an oversized, truncated or malformed frame."""
        if not await self._fill(_HEADER.size):
            if self._buf:
                raise ValueError("truncated frame")
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        if size > cap:
            raise ValueError("frame too large")
        del self._buf[:_HEADER.size]
        body = await self._take(size)
        if body is None:
            raise ValueError("truncated frame")
        try:
            value = strict_unpackb(body, max_len=cap)
        except CanonicalError:
            raise ValueError("malformed frame") from None
        if not isinstance(value, dict):
            raise ValueError("malformed frame")
        return value


def _kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads; the caller knows it is unreaped, so the id is not another's."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _drain_tail(stream: trio.abc.ReceiveStream, tail: deque[bytes]) -> None:
    """Read ``stream`` until it closes, keeping its last ``_STDERR_TAIL`` bytes (at least one chunk) in ``tail``."""
    size = 0
    try:
        async for chunk in stream:
            tail.append(chunk)
            size += len(chunk)
            while size - len(tail[0]) >= _STDERR_TAIL and len(tail) > 1:
                size -= len(tail.popleft())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _tail_text(tail: deque[bytes]) -> str:
    return b"".join(tail)[-_STDERR_TAIL:].decode("utf-8", "replace")


def fork_supported() -> bool:
    """Whether workers can be forked from a zygote here: Linux with pidfds (5.3+) and descriptor passing."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


class _ForkedProcess:
    """A worker the zygote forked: what the pool uses of :class:`trio.Process` (``pid``, the three pipes,
    ``returncode``, ``wait``). It is the zygote's child, not ours: its exit is seen through a pidfd (exact, whoever
    reaps it) and its exit status comes from the zygote, which reaps it. One task at a time may ``wait``."""

    def __init__(self, pid: int, pidfd: int, stdin: trio.lowlevel.FdStream, stdout: trio.lowlevel.FdStream,
                 stderr: trio.lowlevel.FdStream) -> None:
        self.pid, self._pidfd = pid, pidfd
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self.reported = trio.Event()  # the zygote reported the exit status, or the zygote is gone
        self.status_lost = False  # it exited after the zygote died: nobody can tell its exit status now

    def has_exited(self) -> bool:
        if self.returncode is not None or self._pidfd < 0:
            return True
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

    def report(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
        self.reported.set()

    async def wait(self) -> int | None:
        """Wait until it has exited; its exit status, or ``None`` (and :attr:`status_lost`) if the zygote died."""
        if self._pidfd >= 0:
            await trio.lowlevel.wait_readable(self._pidfd)
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        with trio.move_on_after(10):  # the zygote reaps its children at once; a stuck one must not hang the pool
            await self.reported.wait()
        self.status_lost = self.returncode is None
        return self.returncode


def _has_exited(process: trio.Process | _ForkedProcess) -> bool:
    """``poll()`` reaps a spawned worker that died a moment ago rather than trusting a stale status."""
    return process.has_exited() if isinstance(process, _ForkedProcess) else process.poll() is not None


class _Zygote:
    """One interpreter that has imported everything a worker needs and forks workers on request (``python -m
    hivecell.node.worker --zygote``, see ``worker.py``). A worker then costs a fork and its device's start
    (milliseconds on a CPU) instead of importing torch (seconds of CPU: most of a short job on a Jetson). The zygote
    is started at the first request and again after it died; a request fails with :class:`_StartFailed`, as a
    spawned worker that never became ready does, and the pool's back-off applies alike."""

    def __init__(self, nursery: trio.Nursery, *, python: str, gpu: str, start_timeout: float) -> None:
        self._nursery, self._python, self._gpu, self._start_timeout = nursery, python, gpu, start_timeout
        self._lock = trio.Lock()
        self._sock: trio.socket.SocketType | None = None
        self._replies: trio.MemoryReceiveChannel[tuple[bytes, int, int]] | None = None
        self._children: dict[int, _ForkedProcess] = {}
        self._early: dict[int, int] = {}  # exits reported before the fork's requester registered the child
        self.pid: int | None = None  # of the running zygote
        self.stderr_tail: deque[bytes] = deque()

    @property
    def ready(self) -> bool:
        return self._sock is not None

    async def fork(self) -> _ForkedProcess:
        async with self._lock:
            if self._sock is None:
                await self._nursery.start(self._own)
            return await self._fork()

    async def _own(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the zygote, wait for it to be ready, serve its messages; kill and reap it when done."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await trio.lowlevel.open_process(
                [self._python, "-m", "hivecell.node.worker", "--zygote", "--gpu", self._gpu],
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise _StartFailed("cannot start the worker interpreter") from exc
        finally:
            theirs.close()
        sock = trio.socket.from_stdlib_socket(ours)
        send, receive = trio.open_memory_channel[tuple[bytes, int, int]](1)
        try:
            failed = None  # raised after the nursery: raised inside, trio would wrap it in an ExceptionGroup
            async with trio.open_nursery() as nursery:
                assert process.stderr is not None
                nursery.start_soon(_drain_tail, process.stderr, self.stderr_tail)
                first = b""
                with trio.move_on_after(self._start_timeout):
                    first = await sock.recv(64)
                if len(first) != ZYGOTE_MESSAGE.size or first[:1] != b"R":
                    failed = "the worker zygote did not become ready"
                    nursery.cancel_scope.cancel()
                else:
                    self._sock, self._replies, self.pid = sock, receive, process.pid
                    logger.debug("worker zygote %d ready", process.pid)
                    task_status.started()
                    with send:
                        await self._serve(sock, send)
                    nursery.cancel_scope.cancel()
            if failed is not None:
                logger.info("worker zygote failed to start; stderr tail:\n%s", _tail_text(self.stderr_tail))
                raise _StartFailed(failed)
        finally:
            self._sock = self._replies = self.pid = None
            for child in self._children.values():  # their exit statuses will not come now
                child.reported.set()
            self._children.clear()
            self._early.clear()
            with trio.CancelScope(shield=True):
                if process.returncode is None:  # unreaped, so its process group id is still its own
                    _kill_group(process.pid)
                await process.wait()
                sock.close()
                if process.stderr is not None:
                    await process.stderr.aclose()
            if process.returncode not in (0, -signal.SIGKILL):
                logger.warning("worker zygote exited (%s); stderr tail:\n%s", process.returncode,
                               _tail_text(self.stderr_tail))

    async def _serve(self, sock: trio.socket.SocketType, replies: trio.MemorySendChannel[tuple[bytes, int, int]]
                     ) -> None:
        """Hand fork replies to the requester and exit statuses to the children, until the zygote goes away."""
        while True:
            try:
                message = await sock.recv(64)
            except OSError:
                return
            if len(message) != ZYGOTE_MESSAGE.size:
                return  # EOF: the zygote died (or broke the protocol, which ends it too)
            kind, pid, value = ZYGOTE_MESSAGE.unpack(message)
            if kind == b"X":
                child = self._children.pop(pid, None)
                if child is None:
                    self._early[pid] = value
                else:
                    child.report(value)
            elif kind in (b"P", b"E"):
                try:
                    replies.send_nowait((kind, pid, value))  # one request at a time (the lock)
                except trio.WouldBlock:
                    return  # a reply nobody asked for: a broken zygote, ended by returning
            else:
                return

    def _kill(self) -> None:
        """SIGKILL the zygote; its owner task sees EOF, cleans up, and the next request starts another."""
        if self.pid is not None:
            _kill_group(self.pid)

    async def _fork(self) -> _ForkedProcess:
        assert self._sock is not None and self._replies is not None
        pipes = [os.pipe() for _ in range(3)]  # the worker's stdin, stdout, stderr
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
        try:
            try:
                await self._sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))])
                with trio.fail_after(self._start_timeout):
                    kind, pid, value = await self._replies.receive()
            except (OSError, trio.EndOfChannel, trio.ClosedResourceError, trio.TooSlowError) as exc:
                self._kill()  # a late reply would answer the next request: this zygote is done
                raise _StartFailed("the worker zygote is gone") from exc
            finally:
                for fd in theirs:
                    os.close(fd)
            if kind != b"P":
                raise _StartFailed(f"the worker zygote could not fork: {os.strerror(value)}")
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:  # it exited and was reaped already; its status is on its way
            if exc.errno != errno.ESRCH:
                raise
            pidfd = -1
        child = _ForkedProcess(pid, pidfd, trio.lowlevel.FdStream(ours[0]), trio.lowlevel.FdStream(ours[1]),
                               trio.lowlevel.FdStream(ours[2]))
        if pid in self._early:
            child.report(self._early.pop(pid))
        else:
            self._children[pid] = child
        return child


@dataclass(eq=False)
class _Worker:
    claimed: bool = False
    process: trio.Process | _ForkedProcess | None = None
    reader: _FrameReader | None = None
    startup_s: float = math.nan
    ready_at: float = math.nan
    isolation: dict[str, Any] = field(default_factory=dict)
    context_mb: int = 0  # host RSS of its CUDA context, which a job's memory limit does not count
    stderr_tail: deque[bytes] = field(default_factory=deque)
    killed_for: str | None = None
    exited: trio.Event = field(default_factory=trio.Event)

    ready: bool = False
    accepted: bool = False  # the current job was acknowledged
    jobs: int = 0  # jobs started on this process
    # while parked: the key and the (memory_mb, threads) limits of the job it served, and when it is let go
    reuse_key: str | None = None
    reuse_limits: tuple[int, int | None] | None = None
    idle_deadline: float = math.inf

    @property
    def alive(self) -> bool:
        """Not yet exited (see :func:`_has_exited`)."""
        return self.process is not None and not _has_exited(self.process)

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the worker's process group (only while it is unreaped, so its pgid cannot have been reused)."""
        if reason is not None and self.killed_for is None:
            self.killed_for = reason
        if self.alive:
            assert self.process is not None
            _kill_group(self.process.pid)

    def stderr_text(self) -> str:
        return _tail_text(self.stderr_tail)


class WorkerPool:
    """Runs jobs in Worker processes: a fresh one per job, or a parked one for a job with a matching ``reuse_key``.

    Obtain one with :func:`open_worker_pool`.
    """

    def __init__(self, nursery: trio.Nursery, *, warm: int, python: str, max_frame: int, start_timeout: float,
                 reuse_idle_s: float, max_parked: int, max_jobs_per_worker: int, gpu: str = "auto",
                 fork: bool = True) -> None:
        self._nursery = nursery
        # Forking needs a zygote that holds torch for the pool's life: only where spares are wanted anyway.
        self._zygote = (_Zygote(nursery, python=python, gpu=gpu, start_timeout=start_timeout)
                        if fork and warm > 0 and fork_supported() else None)
        self._gpu = gpu
        self.device: dict[str, Any] | None = None  # what the last worker to start reported (see worker.py)
        self._warm = warm
        self._python = python
        self._max_frame = max_frame
        self._start_timeout = start_timeout
        self._reuse_idle_s = reuse_idle_s
        self._max_parked = max_parked
        self._max_jobs_per_worker = max_jobs_per_worker
        self._spares: set[_Worker] = set()  # unclaimed: starting or ready
        self._parked: list[_Worker] = []  # served a job, wait for the next one with their key; oldest first
        self._parked_changed = trio.Event()
        self._ready_send, self._ready_recv = trio.open_memory_channel[_Worker](math.inf)
        self._wake = trio.Event()
        self._spares_changed = trio.Event()
        self._failures = 0
        self._running = 0  # jobs running now
        self._claimers = 0  # jobs waiting for a worker

    # -- processes ---------------------------------------------------------------------------------------------------
    async def _own_worker(self, w: _Worker, *, task_status: trio.TaskStatus[_Worker] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a worker, report it once ready, and kill and reap it when it is done or the pool closes."""
        t0 = time.monotonic()
        try:
            if self._zygote is not None:
                w.process = await self._zygote.fork()
            else:
                w.process = await trio.lowlevel.open_process(
                    [self._python, "-m", "hivecell.node.worker", "--gpu", self._gpu],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
        except OSError as exc:
            w.exited.set()
            raise _StartFailed("cannot start the worker interpreter") from exc
        except _StartFailed:
            w.exited.set()
            raise
        assert w.process.stdout is not None and w.process.stderr is not None
        w.reader = _FrameReader(w.process.stdout)
        try:
            failed = None  # raised after the nursery: raised inside, trio would wrap it in an ExceptionGroup
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain_tail, w.process.stderr, w.stderr_tail)
                ready = None
                try:
                    with trio.fail_after(self._start_timeout):
                        ready = await w.reader.read(cap=_SMALL_FRAME)
                except (trio.TooSlowError, ValueError, trio.BrokenResourceError):
                    failed = "worker did not become ready"
                if failed is None and (ready is None or ready.get("t") != "ready"):
                    failed = "worker exited before it was ready"
                if failed is not None:
                    nursery.cancel_scope.cancel()
                else:
                    w.startup_s = time.monotonic() - t0
                    w.ready_at = time.monotonic()
                    isolation = ready.get("isolation")
                    w.isolation = isolation if isinstance(isolation, dict) else {}
                    logger.debug("worker %d ready in %.2fs (%s)", w.process.pid, w.startup_s, w.isolation)
                    self._note_device(ready.get("device"))
                    w.context_mb = _context_mb(ready.get("device"))
                    w.ready = True
                    self._notify_spares()
                    task_status.started(w)
                    await w.process.wait()
                    nursery.cancel_scope.cancel()  # stderr of a killed group may stay open in a grandchild
            if failed is not None:
                logger.info("worker failed to start (%s); stderr tail:\n%s", failed, w.stderr_text())
                raise _StartFailed(failed)
        finally:
            self._unpark(w)  # at once: no job may take a worker that is about to die
            w.kill()
            with trio.CancelScope(shield=True):
                await w.process.wait()
                if not w.claimed:  # a claimed worker's pipes belong to run_job until it has read the last frame
                    await _close_pipes(w.process)
            w.exited.set()
            if w in self._spares:  # a spare died (or the pool is closing) before any job claimed it
                self._spares.discard(w)
                self._failures += 1
                self._wake.set()
                self._notify_spares()

    def _note_device(self, report: object) -> None:
        """Log where jobs will train, once, and again if it changes (a driver that broke or came back)."""
        report = {k: v for k, v in report.items() if isinstance(k, str)} if isinstance(report, dict) else {}
        if report == self.device:
            return
        self.device = report
        if report.get("problem"):
            logger.warning("Worker: %s; jobs fail until it is fixed (or set gpu = auto)", _safe_text(report["problem"]))
        elif report.get("type") == "cuda":
            logger.info("Worker: jobs train on CUDA (%s, %s MiB)", _safe_text(report.get("name")),
                        report.get("memory_mb"))
        else:
            logger.info("Worker: jobs train on the CPU (gpu = %s)", self._gpu)

    async def _keep_spares(self) -> None:
        """Hold ``warm`` spares, replacing claimed and dead ones; back off after failures."""
        while True:
            # A spawned spare imports torch: seconds of CPU that a running job would lose, so it waits for the job to
            # end. A forked one costs milliseconds and starts at once.
            cheap = self._zygote is not None and self._zygote.ready
            if len(self._spares) >= self._warm or (self._running and not self._claimers and not cheap):
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            if self._failures > 1:  # one death is replaced at once; repeated ones back off (0.5 s ... 30 s)
                await trio.sleep(min(30.0, 0.25 * 2 ** min(self._failures, 7)))
            w = _Worker()
            self._spares.add(w)
            try:
                await self._nursery.start(self._own_worker, w)
            except _StartFailed:
                if w in self._spares:  # (otherwise _own_worker has counted it already)
                    self._spares.discard(w)
                    self._failures += 1
                continue
            if w in self._spares:
                self._ready_send.send_nowait(w)

    def _notify_spares(self) -> None:
        self._spares_changed.set()
        self._spares_changed = trio.Event()

    async def wait_warm(self) -> None:
        """Wait until the pool holds ``warm`` ready spares (a daemon may report readiness after this)."""
        while sum(1 for w in self._spares if w.ready) < self._warm:
            await self._spares_changed.wait()

    async def _claim(self) -> _Worker:
        self._claimers += 1
        self._wake.set()
        try:
            return await self._claim_one()
        finally:
            self._claimers -= 1

    async def _claim_one(self) -> _Worker:
        if self._warm == 0:
            w = _Worker(claimed=True)
            try:
                await self._nursery.start(self._own_worker, w)
            except _StartFailed:
                raise WorkerFailed("crashed", "the worker could not start") from None
            return w
        with trio.move_on_after(self._start_timeout * 2) as scope:
            while True:
                w = await self._ready_recv.receive()
                if w.alive and w in self._spares:
                    break
        if scope.cancelled_caught:
            raise WorkerFailed("crashed", "no worker could be started")
        w.claimed = True
        self._spares.discard(w)
        self._failures = 0
        self._wake.set()
        self._notify_spares()
        return w

    # -- parked workers ----------------------------------------------------------------------------------------------
    def _take_parked(self, key: str | None, limits: WorkerLimits) -> _Worker | None:
        """A live parked worker for ``key`` with the same limits (the most recently parked), now claimed; or None."""
        if key is None or limits.cpu_s is not None:
            return None
        for w in reversed(self._parked):
            if w.reuse_key == key and w.reuse_limits == (limits.memory_mb, limits.threads) and w.alive:
                self._unpark(w)
                w.claimed = True
                return w
        return None

    def _park(self, w: _Worker, key: str, limits: WorkerLimits) -> None:
        """Keep a worker that has just sent a well-formed result for the next job with ``key``."""
        w.reuse_key, w.reuse_limits = key, (limits.memory_mb, limits.threads)
        w.idle_deadline = trio.current_time() + self._reuse_idle_s
        w.claimed = False  # its pipes are the owner task's again: it closes them once the process is gone
        self._parked.append(w)
        while len(self._parked) > self._max_parked:
            oldest = self._parked.pop(0)
            assert oldest.process is not None
            logger.debug("worker %d evicted from the parked workers", oldest.process.pid)
            oldest.kill("evicted")
        self._parked_changed.set()

    def _unpark(self, w: _Worker) -> None:
        if w in self._parked:
            self._parked.remove(w)
            w.reuse_key, w.reuse_limits, w.idle_deadline = None, None, math.inf

    async def _expire_parked(self) -> None:
        """Kill each parked worker once it has been idle ``reuse_idle_s``: its federation ended or went idle."""
        while True:
            now = trio.current_time()
            for w in [w for w in self._parked if w.idle_deadline <= now]:
                self._unpark(w)
                assert w.process is not None
                logger.debug("worker %d idle for %gs; letting it go", w.process.pid, self._reuse_idle_s)
                w.kill("idle")
            with trio.move_on_at(min((w.idle_deadline for w in self._parked), default=math.inf)):
                await self._parked_changed.wait()
            self._parked_changed = trio.Event()

    # -- jobs --------------------------------------------------------------------------------------------------------
    async def run_job(
        self, job: WorkerJob, *, limits: WorkerLimits, on_progress: Callable[[dict[str, Any]], Any] | None = None
    ) -> WorkerResult:
        """Run one job and return its trained weights, metrics and timings.

        The job runs on a parked worker of its ``reuse_key`` if there is one, else in a fresh worker. The timings
        add ``worker_wait_s`` (waiting for a worker), ``worker_start_s`` (that worker's start-up; 0 for a parked
        one) and ``worker_reused`` (1.0 on a parked worker, else 0.0). ``on_progress`` is called with each progress
        frame (``epoch``, ``epochs``, ``loss``, ``seconds``); it may be a plain function or return an awaitable.

        Raises:
            WorkerFailed: the job timed out, ran out of memory, crashed or was refused by the worker.
        """
        t0 = time.monotonic()
        for _ in range(_CLAIM_ATTEMPTS):
            w = self._take_parked(job.reuse_key, limits)
            reused = w is not None
            if w is None:
                w = await self._claim()
            else:
                assert w.process is not None
                logger.debug("job %s runs on parked worker %d", job.job_id, w.process.pid)
            self._running += 1
            try:
                return await self._run_on(w, job, limits, on_progress, wait_s=time.monotonic() - t0, reused=reused)
            except _NotAccepted:
                # The worker died before it acknowledged the job (a spare that died a moment before it was claimed):
                # the job never started, so it is safe to hand it to another worker.
                logger.info("worker %d exited before it accepted job %s; retrying", w.process.pid, job.job_id)
            finally:
                self._running -= 1
                self._wake.set()  # the keeper may start the next spare now
        raise WorkerFailed("crashed", "no worker accepted the job")

    async def _run_on(self, w: _Worker, job: WorkerJob, limits: WorkerLimits,
                      on_progress: Callable[[dict[str, Any]], Any] | None, *, wait_s: float,
                      reused: bool) -> WorkerResult:
        assert w.process is not None and w.process.stdin is not None and w.reader is not None
        w.accepted = False
        w.jobs += 1
        # A worker that may be parked after this job keeps its stdin and waits for the next job frame; any other
        # reads EOF after the job and exits, as a one-job worker always did.
        keep = (job.reuse_key is not None and limits.cpu_s is None and self._max_parked > 0
                and w.jobs < self._max_jobs_per_worker)
        message = {
            "t": "job",
            "job_id": job.job_id,
            "store_path": job.store_path,
            "data_key": job.data_key,
            "program": job.program,
            "weights": job.weights,
            "recipe": job.recipe,
            "limits": {"memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s, "threads": limits.threads},
        }
        outcome: dict[str, Any] | None = None
        parked = False
        try:
            with trio.fail_after(limits.wall_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_memory, w, limits.memory_mb + w.context_mb)
                    body = canonical_packb(message)
                    try:
                        # Two writes: joining them would copy a body that carries the model's weights.
                        await w.process.stdin.send_all(_HEADER.pack(len(body)))
                        await w.process.stdin.send_all(body)
                        if not keep:
                            await w.process.stdin.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # it died; what it said (if anything) is on stdout
                    outcome = await self._read_outcome(w, on_progress)
                    nursery.cancel_scope.cancel()
                if keep and outcome.get("t") == "result" and w.killed_for is None and w.alive:
                    try:  # it waits for its next job: the result frame is all there is to check
                        result = self._result(w, outcome, wait_s, reused=reused, exited=False)
                    except WorkerFailed:
                        w.kill("protocol")
                        raise
                    self._park(w, job.reuse_key, limits)
                    parked = True
                    return result
                await w.process.stdin.aclose()  # a kept worker that failed exits on its own; EOF for any other
                await w.exited.wait()
        except trio.TooSlowError:
            w.kill("timeout")
            raise WorkerFailed("timeout", f"the job ran past its wall-time limit of {limits.wall_s:g}s") from None
        finally:
            if not parked:
                if outcome is None or w.killed_for is not None:
                    w.kill()
                with trio.CancelScope(shield=True):  # never leave one behind; normally it has exited already
                    with trio.move_on_after(5):
                        await w.exited.wait()
                    w.kill()
                    await w.exited.wait()
                    await _close_pipes(w.process)
        return self._result(w, outcome, wait_s, reused=reused)

    async def _read_outcome(self, w: _Worker, on_progress: Callable[[dict[str, Any]], Any] | None) -> dict[str, Any]:
        assert w.reader is not None
        while True:
            try:
                frame = await w.reader.read(cap=self._max_frame)
            except ValueError:
                w.kill("protocol")
                return {"t": "protocol"}
            except trio.BrokenResourceError:
                frame = None
            if frame is None:
                return {"t": "eof" if w.accepted else "not_accepted"}
            kind = frame.get("t")
            if kind == "accepted" and not w.accepted:
                w.accepted = True
            elif kind == "progress":
                if on_progress is not None:
                    update = {k: frame.get(k) for k in ("epoch", "epochs", "loss", "seconds")}
                    maybe = on_progress(update)
                    if inspect.isawaitable(maybe):
                        await maybe
            elif kind in ("result", "error"):
                return frame
            else:
                w.kill("protocol")
                return {"t": "protocol"}

    async def _watch_memory(self, w: _Worker, memory_mb: int) -> None:
        """Second line of defence behind the worker's RLIMIT_DATA: kill the group when RSS exceeds the limit."""
        assert w.process is not None
        limit = memory_mb << 20
        try:
            proc = psutil.Process(w.process.pid)
        except psutil.Error:
            return
        while w.alive:
            try:
                rss = _tree_rss(proc)
            except psutil.Error:
                return
            if rss > limit:
                logger.info("worker %d over its memory limit (%d MiB RSS)", w.process.pid, rss >> 20)
                w.kill("memory")
                return
            await trio.sleep(_RSS_POLL_S)

    def _result(self, w: _Worker, outcome: dict[str, Any] | None, wait_s: float, *, reused: bool,
                exited: bool = True) -> WorkerResult:
        """The job's result, or the failure it was. ``exited``: a result counts only once the worker has exited 0;
        otherwise (a worker kept for reuse) the well-formed result frame is enough."""
        assert w.process is not None
        returncode = w.process.returncode
        kind = None if outcome is None else outcome.get("t")
        if kind == "not_accepted" and w.killed_for is None:
            raise _NotAccepted
        if w.killed_for == "memory":
            raise WorkerFailed("memory", "the job exceeded its memory limit")
        if kind == "error":
            code = outcome.get("code") if isinstance(outcome.get("code"), str) else "error"
            code = code if code in _WORKER_CODES else "error"
            logger.info("worker %d failed (%s); stderr tail:\n%s", w.process.pid, code, w.stderr_text())
            raise WorkerFailed(code, _safe_text(outcome.get("message")))
        # A worker that exits after its result exits 0. A forked worker whose zygote died has no exit status anyone
        # can read; its result frame arrived whole, which is what the status would confirm.
        lost = isinstance(w.process, _ForkedProcess) and w.process.status_lost
        if kind == "result" and ((returncode == 0 or lost) if exited else returncode is None):
            weights, metrics, timings = outcome.get("weights"), outcome.get("metrics"), outcome.get("timings")
            if isinstance(weights, bytes) and isinstance(metrics, dict) and isinstance(timings, dict):
                clean = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float)) and isinstance(k, str)}
                clean["worker_wait_s"] = wait_s
                clean["worker_start_s"] = 0.0 if reused else w.startup_s
                clean["worker_reused"] = 1.0 if reused else 0.0
                device = "cuda" if outcome.get("device") == "cuda" else "cpu"
                return WorkerResult(weights=weights, metrics=metrics, timings=clean, worker_pid=w.process.pid,
                                    device=device)
        if returncode == -signal.SIGXCPU:  # the worker's soft RLIMIT_CPU
            raise WorkerFailed("timeout", "the job ran past its CPU-time limit")
        logger.info("worker %d crashed (exit %s, %s); stderr tail:\n%s", w.process.pid, returncode, kind,
                    w.stderr_text())
        if kind == "protocol":
            raise WorkerFailed("crashed", "the worker broke the frame protocol")
        raise WorkerFailed("crashed", "the worker exited without a result")


async def _close_pipes(process: trio.Process) -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            await stream.aclose()


def _context_mb(report: object) -> int:
    """The CUDA context's host RSS from a ready frame's device report; 0 when absent or not a sane number."""
    value = report.get("context_mb") if isinstance(report, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 64 << 10 else 0


def _safe_text(value: object) -> str:
    if not isinstance(value, str):
        return "the job failed"
    text = "".join(c for c in value if c.isprintable())[:200]
    return text or "the job failed"


@asynccontextmanager
async def open_worker_pool(
    *, warm: int = 1, python: str = sys.executable, max_frame: int = 1 << 30, start_timeout: float = 120.0,
    reuse_idle_s: float = 60.0, max_parked: int = 4, max_jobs_per_worker: int = 1000, gpu: str = "auto",
    fork: bool = True,
) -> AsyncIterator[WorkerPool]:
    """Open a pool that keeps ``warm`` ready spares; every worker is killed and reaped when the block exits.

    Args:
        warm: how many started, idle workers to hold (0: every job starts a cold worker).
        python: the interpreter that runs ``-m hivecell.node.worker``.
        max_frame: cap on any frame read from a worker (the result frame carries the trained weights).
        start_timeout: how long a worker may take to import torch and say it is ready.
        reuse_idle_s: how long a worker parked for a ``reuse_key`` waits for its next job before it is killed.
        max_parked: how many parked workers to hold at most, the oldest going first (0: no reuse).
        max_jobs_per_worker: a worker that has run this many jobs exits instead of being parked again.
        gpu: ``auto`` (CUDA when torch sees it), ``on`` (required: jobs fail without it) or ``off`` (CPU only).
        fork: with ``warm`` > 0 (and on Linux 5.3+), fork workers from a zygote that imported torch once, instead of
            starting each in a fresh interpreter.

    Raises:
        ValueError: an argument is out of range.
    """
    if warm < 0:
        raise ValueError("warm must be >= 0")
    if not reuse_idle_s > 0 or max_parked < 0 or max_jobs_per_worker < 1:
        raise ValueError("reuse_idle_s must be > 0, max_parked >= 0 and max_jobs_per_worker >= 1")
    if gpu not in ("auto", "on", "off"):
        raise ValueError(f"gpu must be auto, on or off, not {gpu!r}")
    async with trio.open_nursery() as nursery:
        pool = WorkerPool(nursery, warm=warm, python=python, max_frame=max_frame, start_timeout=start_timeout,
                          reuse_idle_s=reuse_idle_s, max_parked=max_parked, max_jobs_per_worker=max_jobs_per_worker,
                          gpu=gpu, fork=fork)
        nursery.start_soon(pool._expire_parked)
        if warm:
            nursery.start_soon(pool._keep_spares)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()
