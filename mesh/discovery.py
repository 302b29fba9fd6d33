"""Finding peers: mDNS on the LAN, bootstrap addresses beyond it; a book of who is known, how, and since when.

A peer found by any source is dialled (at most ``MAX_DIALS`` at once, and not again for ``REDIAL_S`` after a failed
dial); the book records every source that named it (``mdns``, ``bootstrap``, ``inbound`` for peers that dialled us,
``dht``) so ``hivecell peers`` can say how each peer was found. A peer that leaves the LAN (an mDNS goodbye or an
expired record) is forgotten unless another source still names it. Bootstrap addresses are re-dialled every
``BOOTSTRAP_RETRY_S`` while not connected, so a node that starts before its bootstrap peer still joins.

Clocks: signed records carry their issue time and are refused outside ``CLOCK_SKEW_S`` of the receiver's clock, so a
box whose clock is off cannot take part. Every peer serves ``/hivecell/time/1.0.0`` (its wall clock), and each
connected peer's clock is read ``CLOCK_FIRST_S`` after it connects (a new connection's identify, gossip, anti-entropy
and DHT exchanges go first) and then every ``CLOCK_CHECK_S``: offset = its time - the midpoint of our
request and its answer (off by at most half the round trip). ``snapshot`` reports it and ``hivecell doctor`` checks it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from .host import MeshHost, PeerUnreachable, RemoteError, Reply, short
from .mdns import announce_addrs, serve_mdns
from .message import ErrorCode, Message, Protocol, RemoteProtocolError

__all__ = ["TIME_PROTOCOL", "Discovery", "PeerEntry", "TimeQuery", "TimeReply"]

logger = logging.getLogger(__name__)

MAX_DIALS = 8
REDIAL_S = 5.0
MDNS_DEFER_S = 1.0  # of two daemons that find each other by mDNS, the one with the greater peer id waits this long
BOOTSTRAP_RETRY_S = 15.0
MAX_PEERS = 4096  # the book is bounded: mDNS answers are unauthenticated and anyone on the LAN can send them
CLOCK_CHECK_S = 300.0  # read each connected peer's clock this often
CLOCK_FIRST_S = 3.0  # and first this long after it connects
CLOCK_TIMEOUT_S = 5.0
MAX_CLOCK_READS = 4  # at once


@dataclass(frozen=True, kw_only=True)
class TimeQuery(Message):
    TAG: ClassVar[str] = "time?"


@dataclass(frozen=True, kw_only=True)
class TimeReply(Message):
    TAG: ClassVar[str] = "time"
    wall: float  # the answering peer's time.time()

    def __post_init__(self) -> None:
        if not (self.wall == self.wall and 0 < self.wall < 1e11):  # not NaN; after 1970, before year 5000
            raise ValueError("not a wall-clock time")


TIME_PROTOCOL = Protocol("/hivecell/time/1.0.0", TimeQuery, TimeReply, max_frame=256)


@dataclass
class PeerEntry:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    last_dial_failed: float = 0.0
    dial_error: str = ""
    clock_offset_s: float | None = None  # the peer's clock minus ours, from the last reading
    clock_rtt_s: float | None = None  # the round trip of that reading: the offset is good to half of it
    clock_due: float | None = None  # monotonic time of the next reading (None: not seen connected yet)
    clock_error: str = ""


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
        self._clock_reads = trio.CapacityLimiter(MAX_CLOCK_READS)
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
                 "last_seen": round(e.last_seen, 3), **({"dial_error": e.dial_error} if e.dial_error else {}),
                 **({"clock_offset_s": round(e.clock_offset_s, 3), "clock_rtt_s": round(e.clock_rtt_s or 0.0, 4)}
                    if e.clock_offset_s is not None else {}),
                 **({"clock_error": e.clock_error} if e.clock_error else {})}
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
            defer = MDNS_DEFER_S if source == "mdns" and self.announce and self.host.peer_id > peer_id else 0.0
            self._nursery.start_soon(self._dial, entry, defer)

    async def _dial(self, entry: PeerEntry, defer: float = 0.0) -> bool:
        """Dial ``entry`` (after ``defer`` seconds, if it has not dialled us meanwhile).

        Two daemons on a LAN find each other's mDNS records at the same moment, and if both dial, py-libp2p keeps
        both connections, each set up in full (security, muxer, identify, gossipsub, DHT). So the one with the
        smaller peer id dials at once and the other waits ``MDNS_DEFER_S`` for that connection, dialling itself only
        if it does not come (the other side may not have seen our record). A client that does not announce itself,
        and any other source (bootstrap, DHT), dials at once."""
        if defer:
            await trio.sleep(defer)
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
            connected = self.host.connected_peers()
            if connected:
                self.connected_event.set()
            now = time.monotonic()
            for peer in connected:
                entry = self.peers.get(peer) or self._note(peer, [], "inbound")
                if entry is None:
                    continue
                if entry.clock_due is None:
                    entry.clock_due = now + CLOCK_FIRST_S
                if now >= entry.clock_due:
                    entry.clock_due = now + CLOCK_CHECK_S
                    self._nursery.start_soon(self._read_clock, entry)  # type: ignore[union-attr]
            await trio.sleep(0.5)

    async def _read_clock(self, entry: PeerEntry) -> None:
        """Read ``entry``'s clock once; a peer that does not serve the protocol (a scientist's short-lived client) is
        noted and asked again only after ``CLOCK_CHECK_S``."""
        async with self._clock_reads:
            t0, m0 = time.time(), time.monotonic()
            try:
                reply = await self.host.request(entry.peer_id, TIME_PROTOCOL, TimeQuery(), expect=TimeReply,
                                                timeout=CLOCK_TIMEOUT_S)
            except (PeerUnreachable, RemoteError, RemoteProtocolError, trio.TooSlowError) as exc:
                entry.clock_error = str(exc)[:200] or type(exc).__name__
                logger.debug("cannot read the clock of %s: %s", short(entry.peer_id), entry.clock_error)
                return
            t1, m1 = time.time(), time.monotonic()
            entry.clock_offset_s, entry.clock_rtt_s, entry.clock_error = reply.wall - (t0 + t1) / 2, m1 - m0, ""
            if abs(entry.clock_offset_s) > 30:
                logger.warning("the clock of %s is %+.1f s off ours: signed records outside the allowed skew are "
                               "refused; check time sync on both boxes", short(entry.peer_id), entry.clock_offset_s)

    @staticmethod
    async def _answer_time(peer: str, message: Message, reply: Reply) -> None:
        if not isinstance(message, TimeQuery):
            raise RemoteError(ErrorCode.BAD_MESSAGE, "expected a time query")
        await reply.send(TimeReply(wall=time.time()))

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run mDNS (if it has interfaces) and the bootstrap dialler until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.serve(TIME_PROTOCOL, self._answer_time)
            if self.mdns_ips:
                announce = announce_addrs(self.host.addrs(), self.mdns_ips) if self.announce else []
                await nursery.start(lambda task_status: serve_mdns(
                    peer_id=self.host.peer_id, ips=self.mdns_ips, announce=announce,
                    on_found=lambda p, a: self.found(p, a, "mdns"), on_lost=self.lost, task_status=task_status))
            if self.bootstrap:
                nursery.start_soon(self._bootstrap)
            nursery.start_soon(self._watch_connections)
            task_status.started()
