"""The pool of Worker processes: warm spares, one job per process, limits enforced from the outside.

Theory of operation
-------------------
Every Worker process (``python -m hivecell.node.worker``, see ``worker.py`` for the frame protocol) is owned by one
task in the pool's nursery (:meth:`WorkerPool._own_worker`): it starts the process in its own session (so the whole
process group can be killed), drains stderr into a bounded tail for local logs, waits for the ``ready`` frame, and
finally kills and reaps the process whatever happens, including when the pool closes.

A keeper task holds ``warm`` spares: processes that have imported torch and wait, untouched by any job data. A job
claims a ready spare (or, with ``warm=0``, starts a cold one). The replacement is started once no job runs, or at once
if a job is waiting for a worker: importing torch costs seconds of CPU, and on a 2-core box a spare starting beside a
running job slowed its training several-fold (bench/job_roundtrip.py), so an idle node pays for the next spare, not a
busy one. A spare that dies while waiting is replaced with exponential backoff so a broken interpreter cannot make the
pool spin.

:meth:`WorkerPool.run_job` talks to the claimed worker over its pipes and enforces, from the parent side: wall time
(``trio.fail_after`` then SIGKILL to the group), memory (RSS polled with psutil every 0.5 s, SIGKILL above the limit;
the worker's own ``RLIMIT_DATA`` is the first line), and a cap on every frame it reads. Every failure becomes
:class:`WorkerFailed` with a code from a small set and a short reason that is safe to send to a peer.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import signal
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

__all__ = ["WorkerFailed", "WorkerJob", "WorkerLimits", "WorkerPool", "WorkerResult", "open_worker_pool"]

logger = logging.getLogger(__name__)

FAILURE_CODES = frozenset({"timeout", "memory", "crashed", "bad_plan", "bad_data", "error"})
_WORKER_CODES = frozenset({"bad_plan", "bad_data", "memory", "error"})
_HEADER = struct.Struct(">I")
_SMALL_FRAME = 1 << 20  # ready / progress / error frames
_STDERR_TAIL = 4096
_RSS_POLL_S = 0.5
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
    job_id: str
    store_path: str
    data_key: str
    program: bytes
    weights: bytes
    recipe: dict[str, Any]


@dataclass(frozen=True)
class WorkerLimits:
    wall_s: float = 3600
    memory_mb: int = 4096
    cpu_s: int | None = None
    threads: int | None = None


@dataclass(frozen=True)
class WorkerResult:
    weights: bytes
    metrics: dict[str, Any]
    timings: dict[str, float]


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

    async def read(self, *, cap: int) -> dict[str, Any] | None:
        """One frame, or ``None`` at EOF. Raises ``ValueError`` on an oversized, truncated or malformed frame."""
        if not await self._fill(_HEADER.size):
            if self._buf:
                raise ValueError("truncated frame")
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        if size > cap:
            raise ValueError("frame too large")
        if not await self._fill(_HEADER.size + size):
            raise ValueError("truncated frame")
        body = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        try:
            value = strict_unpackb(body, max_len=cap)
        except CanonicalError:
            raise ValueError("malformed frame") from None
        if not isinstance(value, dict):
            raise ValueError("malformed frame")
        return value


@dataclass(eq=False)
class _Worker:
    claimed: bool = False
    process: trio.Process | None = None
    reader: _FrameReader | None = None
    startup_s: float = math.nan
    ready_at: float = math.nan
    isolation: dict[str, Any] = field(default_factory=dict)
    stderr_tail: deque[bytes] = field(default_factory=deque)
    killed_for: str | None = None
    exited: trio.Event = field(default_factory=trio.Event)

    ready: bool = False
    accepted: bool = False

    @property
    def alive(self) -> bool:
        """Not yet exited; ``poll()`` reaps a worker that died a moment ago rather than trusting a stale status."""
        return self.process is not None and self.process.poll() is None

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the worker's process group (only while it is unreaped, so its pgid cannot have been reused)."""
        if reason is not None and self.killed_for is None:
            self.killed_for = reason
        if self.alive:
            assert self.process is not None
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stderr_text(self) -> str:
        return b"".join(self.stderr_tail)[-_STDERR_TAIL:].decode("utf-8", "replace")


class WorkerPool:
    """Runs jobs in fresh Worker processes. Obtain one with :func:`open_worker_pool`."""

    def __init__(self, nursery: trio.Nursery, *, warm: int, python: str, max_frame: int, start_timeout: float) -> None:
        self._nursery = nursery
        self._warm = warm
        self._python = python
        self._max_frame = max_frame
        self._start_timeout = start_timeout
        self._spares: set[_Worker] = set()  # unclaimed: starting or ready
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
            w.process = await trio.lowlevel.open_process(
                [self._python, "-m", "hivecell.node.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            w.exited.set()
            raise _StartFailed("cannot start the worker interpreter") from exc
        assert w.process.stdout is not None and w.process.stderr is not None
        w.reader = _FrameReader(w.process.stdout)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain_stderr, w)
                try:
                    with trio.fail_after(self._start_timeout):
                        ready = await w.reader.read(cap=_SMALL_FRAME)
                except (trio.TooSlowError, ValueError, trio.BrokenResourceError) as exc:
                    raise _StartFailed("worker did not become ready") from exc
                if ready is None or ready.get("t") != "ready":
                    raise _StartFailed("worker exited before it was ready")
                w.startup_s = time.monotonic() - t0
                w.ready_at = time.monotonic()
                isolation = ready.get("isolation")
                w.isolation = isolation if isinstance(isolation, dict) else {}
                logger.debug("worker %d ready in %.2fs (%s)", w.process.pid, w.startup_s, w.isolation)
                w.ready = True
                self._notify_spares()
                task_status.started(w)
                await w.process.wait()
                nursery.cancel_scope.cancel()  # stderr of a killed group may stay open in a grandchild
        except _StartFailed:
            logger.info("worker failed to start; stderr tail:\n%s", w.stderr_text())
            raise
        finally:
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

    async def _drain_stderr(self, w: _Worker) -> None:
        assert w.process is not None and w.process.stderr is not None
        size = 0
        try:
            async for chunk in w.process.stderr:
                w.stderr_tail.append(chunk)
                size += len(chunk)
                while size - len(w.stderr_tail[0]) >= _STDERR_TAIL and len(w.stderr_tail) > 1:
                    size -= len(w.stderr_tail.popleft())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _keep_spares(self) -> None:
        """Hold ``warm`` spares, replacing claimed and dead ones; back off after failures."""
        while True:
            if len(self._spares) >= self._warm or (self._running and not self._claimers):
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

    # -- jobs --------------------------------------------------------------------------------------------------------
    async def run_job(
        self, job: WorkerJob, *, limits: WorkerLimits, on_progress: Callable[[dict[str, Any]], Any] | None = None
    ) -> WorkerResult:
        """Run one job in a fresh worker and return its trained weights, metrics and timings.

        ``on_progress`` is called with each progress frame (``epoch``, ``epochs``, ``loss``, ``seconds``); it may be
        a plain function or return an awaitable.

        Raises:
            WorkerFailed: the job timed out, ran out of memory, crashed or was refused by the worker.
        """
        t0 = time.monotonic()
        for _ in range(_CLAIM_ATTEMPTS):
            w = await self._claim()
            self._running += 1
            try:
                return await self._run_on(w, job, limits, on_progress, wait_s=time.monotonic() - t0)
            except _NotAccepted:
                # The worker died before it acknowledged the job (a spare that died a moment before it was claimed):
                # the job never started, so it is safe to hand it to another worker.
                logger.info("worker %d exited before it accepted job %s; retrying", w.process.pid, job.job_id)
            finally:
                self._running -= 1
                self._wake.set()  # the keeper may start the next spare now
        raise WorkerFailed("crashed", "no worker accepted the job")

    async def _run_on(self, w: _Worker, job: WorkerJob, limits: WorkerLimits,
                      on_progress: Callable[[dict[str, Any]], Any] | None, *, wait_s: float) -> WorkerResult:
        assert w.process is not None and w.process.stdin is not None and w.reader is not None
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
        try:
            with trio.fail_after(limits.wall_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_memory, w, limits.memory_mb)
                    body = canonical_packb(message)
                    try:
                        await w.process.stdin.send_all(_HEADER.pack(len(body)) + body)
                        await w.process.stdin.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # it died; what it said (if anything) is on stdout
                    outcome = await self._read_outcome(w, on_progress)
                    nursery.cancel_scope.cancel()
                await w.exited.wait()
        except trio.TooSlowError:
            w.kill("timeout")
            raise WorkerFailed("timeout", f"the job ran past its wall-time limit of {limits.wall_s:g}s") from None
        finally:
            if outcome is None or w.killed_for is not None:
                w.kill()
            with trio.CancelScope(shield=True):  # never leave one behind; normally it has exited already
                with trio.move_on_after(5):
                    await w.exited.wait()
                w.kill()
                await w.exited.wait()
                await _close_pipes(w.process)
        return self._result(w, outcome, wait_s)

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
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                return
            if rss > limit:
                logger.info("worker %d over its memory limit (%d MiB RSS)", w.process.pid, rss >> 20)
                w.kill("memory")
                return
            await trio.sleep(_RSS_POLL_S)

    def _result(self, w: _Worker, outcome: dict[str, Any] | None, wait_s: float) -> WorkerResult:
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
        if kind == "result" and returncode == 0:
            weights, metrics, timings = outcome.get("weights"), outcome.get("metrics"), outcome.get("timings")
            if isinstance(weights, bytes) and isinstance(metrics, dict) and isinstance(timings, dict):
                clean = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float)) and isinstance(k, str)}
                clean["worker_wait_s"] = wait_s
                clean["worker_start_s"] = w.startup_s
                return WorkerResult(weights=weights, metrics=metrics, timings=clean)
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


def _safe_text(value: object) -> str:
    if not isinstance(value, str):
        return "the job failed"
    text = "".join(c for c in value if c.isprintable())[:200]
    return text or "the job failed"


@asynccontextmanager
async def open_worker_pool(
    *, warm: int = 1, python: str = sys.executable, max_frame: int = 1 << 30, start_timeout: float = 120.0
) -> AsyncIterator[WorkerPool]:
    """Open a pool that keeps ``warm`` ready spares; every worker is killed and reaped when the block exits.

    Args:
        warm: how many started, idle workers to hold (0: every job starts a cold worker).
        python: the interpreter that runs ``-m hivecell.node.worker``.
        max_frame: cap on any frame read from a worker (the result frame carries the trained weights).
        start_timeout: how long a worker may take to import torch and say it is ready.
    """
    if warm < 0:
        raise ValueError("warm must be >= 0")
    async with trio.open_nursery() as nursery:
        pool = WorkerPool(nursery, warm=warm, python=python, max_frame=max_frame, start_timeout=start_timeout)
        if warm:
            nursery.start_soon(pool._keep_spares)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()
