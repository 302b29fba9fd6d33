"""Content-addressed blobs between peers: a bounded local cache, and fetches that resume after a broken connection.

A blob is named by the sha256 of its bytes. :func:`fetch_blob` first looks in the caller's :class:`BlobCache` (a node
that has a blob is never sent it again), then pulls it from a peer's :class:`~hivecell.mesh.lane.Lane` with a
:class:`~hivecell.mesh.lane.Download` that survives failures: when a connection breaks, the bytes that arrived are
kept and the next attempt asks the holder only for the rest (``LaneFetch.offset``), over the lane or the libp2p
stream. The bytes that arrive are authenticated as the holder's by TLS or Noise, so a prefix that arrived is sound as
far as the transport goes; whether it is the blob asked for is known when the last byte is hashed, and a blob that
does not match is dropped whole and fetched again from the start.

Not done here: per-chunk hashes (a manifest), which would let a node fetch parts of one blob from several peers, or
keep a partial download across a restart. Within one process a running sha256 over the received prefix gives the
same resume without a manifest.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext

import trio

from .host import short
from .lane import (
    BlobTooLarge,
    BlobUnavailable,
    Download,
    Lane,
    LaneAuthError,
    LaneError,
    LaneTimeout,
    _byte_view,
    _digest,
)

__all__ = ["BlobCache", "SharedOffers", "fetch_blob"]

logger = logging.getLogger(__name__)

# Failures that another attempt cannot mend: the holder does not offer it, it is too large for us, or (with
# via="lane") a certificate is wrong.
_FINAL = (BlobUnavailable, BlobTooLarge, LaneAuthError, LaneTimeout)


class BlobCache:
    """Blobs this node holds, by sha256, up to ``max_bytes`` in all (the least recently used go first).

    Blobs are kept by reference: do not change a buffer after handing it over.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.stats: Counter[str] = Counter()
        self._blobs: OrderedDict[bytes, memoryview] = OrderedDict()

    def __contains__(self, sha256: str | bytes) -> bool:
        return _digest(sha256) in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def get(self, sha256: str | bytes) -> memoryview | None:
        """The blob, or ``None`` if it is not here."""
        digest = _digest(sha256)
        blob = self._blobs.get(digest)
        if blob is None:
            self.stats["misses"] += 1
            return None
        self._blobs.move_to_end(digest)
        self.stats["hits"] += 1
        return blob

    def discard(self, sha256: str | bytes) -> bool:
        """Drop the blob if it is here; returns whether it was."""
        dropped = self._blobs.pop(_digest(sha256), None)
        if dropped is not None:
            self.size -= len(dropped)
        return dropped is not None

    async def add(self, blob) -> str:
        """Keep ``blob`` and return its sha256 in hex (hashed in a thread: a checkpoint)."""
        view = _byte_view(blob)
        digest = await trio.to_thread.run_sync(lambda: hashlib.sha256(view).digest())
        self.put_verified(digest, view)
        return digest.hex()

    def put_verified(self, digest: bytes, blob) -> None:
        """Keep ``blob`` under ``digest``, which the caller has checked is its sha256. A blob larger than the whole
        cache is not kept."""
        view = _byte_view(blob)
        if len(view) > self.max_bytes:
            return
        old = self._blobs.pop(digest, None)
        if old is not None:
            self.size -= len(old)
        self._blobs[digest] = view
        self.size += len(view)
        while self.size > self.max_bytes:
            _, dropped = self._blobs.popitem(last=False)
            self.size -= len(dropped)
            self.stats["evicted"] += 1


async def fetch_blob(lane: Lane, peer_id: str, sha256: str | bytes, *, cache: BlobCache | None = None,
                     attempts: int = 4, backoff: float = 0.2, timeout: float | None = None,
                     via: str = "auto") -> memoryview | bytearray:
    """The blob named ``sha256``: from ``cache`` if there, else from ``peer_id``, resuming after broken connections.

    Up to ``attempts`` tries, ``backoff * 2**n`` seconds apart; each asks only for the bytes still missing. A blob
    fetched is added to ``cache``.

    Raises:
        BlobUnavailable, BlobTooLarge, LaneAuthError (``via="lane"``): at once, as :meth:`Lane.fetch`.
        LaneTimeout: not done within ``timeout`` seconds, all attempts together.
        BlobCorrupt, LaneBusy, LaneUnavailable, LaneError: the last attempt failed so.
    """
    digest = _digest(sha256)
    if cache is not None:
        held = cache.get(digest)
        if held is not None:
            return held
    download = Download(digest)
    try:
        with trio.fail_after(timeout) if timeout is not None else nullcontext():
            for attempt in range(attempts):
                try:
                    await lane.fetch_download(peer_id, download, via=via)
                    break
                except _FINAL:
                    raise
                except LaneError as exc:  # broken, stalled, busy, corrupt: try again (a corrupt blob from scratch)
                    if attempt + 1 == attempts:
                        raise
                    logger.info("fetch of %s from %s failed after %d of %s bytes (%s); retrying",
                                digest.hex()[:12], short(peer_id), download.received, download.size, exc)
                    await trio.sleep(backoff * 2**attempt)
    except trio.TooSlowError as exc:
        raise LaneTimeout(f"fetch of {digest.hex()[:12]} from {short(peer_id)} took over {timeout} s") from exc
    blob = download.result()
    if cache is not None:
        cache.put_verified(digest, blob)
    return blob


class SharedOffers:
    """Blobs offered on a lane to peers, held by reference counts: the same blob (a round's global model) held for
    several peers at once is one offer whose peer set is the union; it is withdrawn when the last hold ends.

    ``nursery`` (optional) runs :meth:`release_later`.
    """

    def __init__(self, lane: Lane, nursery: trio.Nursery | None = None) -> None:
        self.lane, self.nursery = lane, nursery
        self._holds: dict[bytes, tuple[memoryview, Counter[str]]] = {}

    def __len__(self) -> int:
        return len(self._holds)

    async def hold(self, blob, peer: str, *, sha256: str | bytes | None = None) -> str:
        """Offer ``blob`` to ``peer`` (also) until :meth:`release`; return its sha256 in hex."""
        view = _byte_view(blob)
        if sha256 is None:
            sha256 = await trio.to_thread.run_sync(lambda: hashlib.sha256(view).digest())
        digest = _digest(sha256)
        held = self._holds.get(digest)
        if held is None:
            held = self._holds[digest] = (view, Counter())
        held[1][peer] += 1
        self.lane.offer_hashed(held[0], digest, to=set(held[1]))
        return digest.hex()

    def release(self, sha256: str | bytes, peer: str) -> None:
        """End one hold of ``peer`` on the blob; the offer shrinks to the peers still holding it, or is withdrawn."""
        digest = _digest(sha256)
        held = self._holds.get(digest)
        if held is None or held[1][peer] <= 0:
            return
        held[1][peer] -= 1
        if held[1][peer] == 0:
            del held[1][peer]
        if not held[1]:
            del self._holds[digest]
            self.lane.withdraw(digest)
            return
        self.lane.offer_hashed(held[0], digest, to=set(held[1]))

    def release_later(self, sha256: str | bytes, peer: str, delay: float) -> None:
        """:meth:`release` after ``delay`` seconds (in ``nursery``): for an answer that names the blob and leaves the
        peer time to fetch it."""
        if self.nursery is None:
            raise RuntimeError("release_later needs a nursery")

        async def later() -> None:
            await trio.sleep(delay)
            self.release(sha256, peer)

        self.nursery.start_soon(later)

    @asynccontextmanager
    async def holding(self, blob, peer: str, *, sha256: str | bytes | None = None) -> AsyncIterator[str]:
        """Hold ``blob`` for ``peer`` while the block runs; yields its sha256 in hex."""
        digest = await self.hold(blob, peer, sha256=sha256)
        try:
            yield digest
        finally:
            self.release(digest, peer)
