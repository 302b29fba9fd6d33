"""Finding peers: mDNS on the LAN, bootstrap addresses beyond it; a book of who is known, how, and since when.

A peer found by any source is dialled (at most ``MAX_DIALS`` at once, and not again for ``REDIAL_S`` after a failed
dial); the book records every source that named it (``mdns``, ``bootstrap``, ``inbound`` for peers that dialled us,
``dht``) so ``hivecell peers`` can say how each peer was found. A peer that leaves the LAN (an mDNS goodbye or an
expired record) is forgotten unless another source still names it. Bootstrap addresses are re-dialled every
``BOOTSTRAP_RETRY_S`` while not connected, so a node that starts before its bootstrap peer still joins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .host import MeshHost, PeerUnreachable, short
from .mdns import announce_addrs, serve_mdns

__all__ = ["Discovery", "PeerEntry"]

logger = logging.getLogger(__name__)

MAX_DIALS = 8
REDIAL_S = 5.0
BOOTSTRAP_RETRY_S = 15.0
MAX_PEERS = 4096  # the book is bounded: mDNS answers are unauthenticated and anyone on the LAN can send them


@dataclass
class PeerEntry:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    last_dial_failed: float = 0.0
    dial_error: str = ""


class Discovery:
    """Peer discovery for one host; run :meth:`serve` in a nursery."""

    def __init__(self, host: MeshHost, *, mdns_ips: Sequence[str] = (), announce: bool = True,
                 bootstrap: Sequence[str] = ()) -> None:
        self.host = host
        self.mdns_ips = list(mdns_ips)
        self.announce = announce
        self.bootstrap = list(bootstrap)
        self.peers: dict[str, PeerEntry] = {}
        self._dials = trio.CapacityLimiter(MAX_DIALS)
        self._nursery: trio.Nursery | None = None
        self.connected_event = trio.Event()  # set once any peer is connected

    # -- the book --------------------------------------------------------------------------------------------------
    def _note(self, peer_id: str, addrs: Sequence[str], source: str) -> PeerEntry | None:
        entry = self.peers.get(peer_id)
        if entry is None:
            if len(self.peers) >= MAX_PEERS:
                return None
            entry = self.peers[peer_id] = PeerEntry(peer_id)
        entry.sources.add(source)
        entry.last_seen = time.time()
        for a in addrs:
            if a not in entry.addrs:
                entry.addrs.append(a)
        del entry.addrs[:-8]
        return entry

    def snapshot(self) -> list[dict[str, Any]]:
        """The book as JSON-ready rows, connected peers first."""
        connected = set(self.host.connected_peers())
        for peer in connected - set(self.peers):  # peers that dialled us
            self._note(peer, [], "inbound")
        rows = [{"peer_id": e.peer_id, "addrs": list(e.addrs), "found_by": sorted(e.sources),
                 "connected": e.peer_id in connected, "first_seen": round(e.first_seen, 3),
                 "last_seen": round(e.last_seen, 3), **({"dial_error": e.dial_error} if e.dial_error else {})}
                for e in self.peers.values()]
        rows.sort(key=lambda r: (not r["connected"], r["peer_id"]))
        return rows

    # -- dialling --------------------------------------------------------------------------------------------------
    async def found(self, peer_id: str, addrs: Sequence[str], source: str) -> None:
        """Note ``peer_id`` and dial it in the background unless it is connected or was dialled in vain just now."""
        if peer_id == self.host.peer_id:
            return
        entry = self._note(peer_id, addrs, source)
        if entry is None or peer_id in self.host.connected_peers():
            return
        if time.monotonic() - entry.last_dial_failed < REDIAL_S:
            return
        if self._nursery is not None:
            self._nursery.start_soon(self._dial, entry)

    async def _dial(self, entry: PeerEntry) -> bool:
        async with self._dials:
            if entry.peer_id in self.host.connected_peers():
                return True
            for addr in list(entry.addrs):
                try:
                    with trio.fail_after(10):
                        await self.host.connect(addr)
                except (PeerUnreachable, ValueError, trio.TooSlowError) as exc:
                    entry.dial_error = str(exc)[:200]
                    continue
                entry.dial_error = ""
                self.connected_event.set()
                logger.info("connected to %s (%s)", short(entry.peer_id), ", ".join(sorted(entry.sources)))
                return True
            entry.last_dial_failed = time.monotonic()
            logger.debug("cannot dial %s: %s", short(entry.peer_id), entry.dial_error)
            return False

    async def lost(self, peer_id: str) -> None:
        entry = self.peers.get(peer_id)
        if entry is None:
            return
        entry.sources.discard("mdns")
        if not entry.sources:
            del self.peers[peer_id]
            logger.info("peer %s left the LAN", short(peer_id))

    async def _bootstrap(self) -> None:
        while True:
            for addr in self.bootstrap:
                peer = addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else ""
                if not peer:
                    logger.warning("bootstrap address %s has no /p2p/<peer id>; ignored", addr)
                    continue
                if peer not in self.host.connected_peers():
                    entry = self._note(peer, [addr], "bootstrap")
                    if entry is not None:
                        self._nursery.start_soon(self._dial, entry)  # type: ignore[union-attr]
            await trio.sleep(BOOTSTRAP_RETRY_S)

    async def _watch_connections(self) -> None:
        while True:
            if self.host.connected_peers():
                self.connected_event.set()
            await trio.sleep(0.5)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run mDNS (if it has interfaces) and the bootstrap dialler until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.mdns_ips:
                announce = announce_addrs(self.host.addrs(), self.mdns_ips) if self.announce else []
                await nursery.start(lambda task_status: serve_mdns(
                    peer_id=self.host.peer_id, ips=self.mdns_ips, announce=announce,
                    on_found=lambda p, a: self.found(p, a, "mdns"), on_lost=self.lost, task_status=task_status))
            if self.bootstrap:
                nursery.start_soon(self._bootstrap)
            nursery.start_soon(self._watch_connections)
            task_status.started()
