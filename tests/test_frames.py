"""The frames between a daemon's Worker pool and its Workers (length-prefixed canonical msgpack maps over pipes):
the pool's reader (``_FrameReader``) and the Worker's channel (``_Channel``), over real pipes. Job and result frames
carry a model's weights, so both read a body straight into one buffer of its announced size; these tests pin what
that must keep: frames split anywhere or run together, and the refusals."""

from __future__ import annotations

import os
import struct
import threading

import pytest
import trio

from hivecell.crypto.canonical import canonical_packb
from hivecell.node.worker import JobError, _Channel
from hivecell.node.workerpool import _FrameReader

HEADER = struct.Struct(">I")
CAP = 16 << 20


def frame(message: dict) -> bytes:
    body = canonical_packb(message)
    return HEADER.pack(len(body)) + body


def _write_all(fd: int, data: bytes, pieces: list[int] | None = None) -> None:
    view = memoryview(data)
    for size in pieces or []:
        os.write(fd, view[:size])
        view = view[size:]
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


async def _read_frames(data: bytes, pieces: list[int] | None = None, cap: int = CAP) -> list:
    r, w = os.pipe()
    writer = threading.Thread(target=_write_all, args=(w, data, pieces))  # a pipe holds 64 KiB: write alongside
    writer.start()
    out: list = []
    try:
        async with trio.lowlevel.FdStream(r) as stream:
            reader = _FrameReader(stream)
            while True:
                try:
                    value = await reader.read(cap=cap)
                except ValueError as exc:
                    out.append(str(exc))
                    break
                if value is None:
                    break
                out.append(value)
    finally:
        await trio.to_thread.run_sync(writer.join)
    return out


async def test_the_pool_reads_frames_run_together_and_split_anywhere() -> None:
    weights = os.urandom(3 << 20)
    messages = [{"kind": "progress", "step": 1}, {"kind": "result", "weights": weights}, {"kind": "done"}]
    data = b"".join(frame(m) for m in messages)
    assert await _read_frames(data) == messages
    assert await _read_frames(data, pieces=[1, 2, 3, 30, 65536, 7]) == messages  # headers and bodies cut up


async def test_the_pool_refuses_oversized_and_truncated_frames_and_sees_a_clean_end() -> None:
    assert await _read_frames(b"") == []
    assert await _read_frames(frame({"a": 1}) + HEADER.pack(100) + b"x" * 10) == [{"a": 1}, "truncated frame"]
    assert await _read_frames(b"\x00\x00") == ["truncated frame"]
    assert await _read_frames(frame({"w": b"x" * 1000}), cap=999) == ["frame too large"]
    assert await _read_frames(HEADER.pack(3) + b"\xc1\xc1\xc1") == ["malformed frame"]


def test_the_worker_channel_round_trips_a_large_frame_over_a_pipe() -> None:
    to_worker_r, to_worker_w = os.pipe()
    back_r, back_w = os.pipe()
    try:
        weights = os.urandom(3 << 20)
        sender = _Channel(-1, to_worker_w)
        writer = threading.Thread(target=sender.send, args=({"kind": "job", "weights": weights},))
        writer.start()
        assert _Channel(to_worker_r, back_w).read(cap=CAP) == {"kind": "job", "weights": weights}
        writer.join()
        os.close(to_worker_w)
        assert _Channel(to_worker_r, back_w).read(cap=CAP) is None  # a clean end before a frame
    finally:
        for fd in (to_worker_r, back_r, back_w):
            os.close(fd)


@pytest.mark.parametrize("data, error", [
    (HEADER.pack(100) + b"x" * 10, "truncated frame"),
    (HEADER.pack(CAP + 1), "frame too large"),
    (HEADER.pack(3) + b"\xc1\xc1\xc1", "malformed frame"),
])
def test_the_worker_channel_refuses_bad_frames(data: bytes, error: str) -> None:
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        with pytest.raises(JobError) as refused:
            _Channel(r, -1).read(cap=CAP)
        assert error in str(refused.value)
    finally:
        os.close(r)
