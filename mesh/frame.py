"""Length-prefixed frames over a byte stream, with the size cap checked before the body is read.

A frame is a 4-byte big-endian length followed by that many bytes. We read with our own loop because py-libp2p's
``read_exactly`` gives up after 101 reads (about 6.8 MB through Yamux's 64 KiB frames) even on a healthy connection.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from typing import Protocol

import trio

__all__ = ["FrameTooLarge", "FrameError", "read_frame", "write_frame", "encode_frame"]

logger = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer closed the stream mid-frame or sent something that is not a frame."""


class FrameTooLarge(FrameError):
    """The announced length exceeds the cap; the body was not read."""

    def __init__(self, size: int, cap: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the cap of {cap}")
        self.size, self.cap = size, cap


class ByteStream(Protocol):
    async def read(self, n: int = -1) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


# Debugging and privacy audits: when HIVECELL_WIRE_TAP names a file, every frame this process sends is appended to it
# (length-prefixed). Tests use it to prove that no frame a node sends carries private rows.
_tap_lock = threading.Lock()
_tap_path: str | None = os.environ.get("HIVECELL_WIRE_TAP") or None


def _tap(frame: bytes) -> None:
    if _tap_path is None:
        return
    with _tap_lock, open(_tap_path, "ab") as fh:
        fh.write(frame)


def encode_frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


async def write_frame(stream: ByteStream, payload: bytes) -> None:
    frame = encode_frame(payload)
    _tap(frame)
    await stream.write(frame)


async def _read_exactly(stream: ByteStream, n: int, idle_timeout: float) -> bytes:
    buf = bytearray(n)  # one allocation of the announced size (already checked against the cap)
    view = memoryview(buf)
    got = 0
    while got < n:
        with trio.fail_after(idle_timeout):
            chunk = await stream.read(n - got)
        if not chunk:
            raise FrameError(f"stream closed after {got} of {n} bytes")
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return bytes(buf) if n < 1 << 16 else buf  # type: ignore[return-value]  # bytes-like; large frames avoid a copy


async def read_frame(stream: ByteStream, *, cap: int, idle_timeout: float = math.inf) -> bytes:
    """Read one frame of at most ``cap`` bytes.

    ``idle_timeout`` bounds the wait for each piece, not the whole frame: a slow link may take minutes to carry a
    large plan, but a peer that stops sending is cut off.

    Raises:
        FrameTooLarge: the length prefix exceeds ``cap`` (nothing more is read).
        FrameError: the stream ended early.
        trio.TooSlowError: nothing arrived for ``idle_timeout`` seconds.
    """
    (size,) = _HEADER.unpack(await _read_exactly(stream, _HEADER.size, idle_timeout))
    if size > cap:
        raise FrameTooLarge(size, cap)
    return await _read_exactly(stream, size, idle_timeout)
