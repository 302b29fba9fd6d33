"""The gossip index, as a service on a mesh host: adverts by gossipsub, convergence by anti-entropy, search.

Theory of operation
-------------------
Every node keeps an :class:`~hivecell.mesh.index.AdvertIndex`. A node *publishes* its own adverts: into its index and
on the gossipsub topic ``hivecell/adverts/1``. Peers with the *index role* subscribe to the topic; the topic validator
files each message in the index and lets gossipsub forward only what was new, so forged, expired, oversized, replayed
and throttled adverts stop at the first honest peer.

Gossipsub is fast but lossy (py-libp2p drops under bursts, rate-limits forwarders, and a peer that joins late never
sees what was published before), so the index also converges by **anti-entropy** over ``/hivecell/index/1.0.0``: when
two peers connect (one exchange per pair, see ``_syncs_on_connect``), and then every ``sync_interval`` seconds with
one connected peer picked at random (put off while gossip is filing new records, by one interval at most), a node sends
its *summary* (32 bytes per record); the other side answers with the records the first lacks and the keys it wants,
and the first pushes those. Every node initiates syncs (a node without the index role holds only its own adverts and
so pushes them); only index peers answer them, and search requests.

The same protocol answers searches (``IndexSearch``): a scientist asks one or more index peers and verifies every
advert it gets itself; an index peer is never trusted with anything but finding records.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import trio

from ._pubsub import apply as _patch_pubsub
from ._pubsub import spawn_messages_in as _spawn_messages_in
from .host import MeshHost, PeerUnreachable, ProtocolUnsupported, RemoteError, Reply, short
from .index import KEY_BYTES, MAX_ADVERT_BYTES, AdvertIndex, Verdict, parse_summary
from .message import ErrorCode, Message, Protocol, RemoteProtocolError

__all__ = [
    "INDEX_PROTOCOL", "TOPIC", "GossipConfig", "GossipIndex", "IndexSearch", "IndexHits", "IndexSync", "IndexDelta",
    "IndexPush", "IndexAck", "IndexDigestRequest", "IndexDigest", "open_gossip",
]

logger = logging.getLogger(__name__)

TOPIC = "hivecell/adverts/1"
MAX_INDEX_FRAME = 4 << 20
MAX_BATCH_BYTES = 2 << 20  # adverts per delta or push; the rest follows in the next exchange
MAX_WANT = 4096
QUIET_S = 2.0  # a periodic anti-entropy sync waits until nothing new was filed for this long (see _anti_entropy)


@dataclass(frozen=True, kw_only=True)
class IndexSync(Message):
    TAG: ClassVar[str] = "sync"
    summary: bytes  # the sender's summary (see index.py)


@dataclass(frozen=True, kw_only=True)
class IndexDelta(Message):
    TAG: ClassVar[str] = "delta"
    adverts: list[bytes]  # records the requester lacks or holds older
    want: bytes  # 16-byte keys the answering peer lacks or holds older
    more: bool = False  # the delta was cut at MAX_BATCH_BYTES: sync again


@dataclass(frozen=True, kw_only=True)
class IndexPush(Message):
    TAG: ClassVar[str] = "push"
    adverts: list[bytes]


@dataclass(frozen=True, kw_only=True)
class IndexAck(Message):
    TAG: ClassVar[str] = "ack"
    new: int


@dataclass(frozen=True, kw_only=True)
class IndexSearch(Message):
    TAG: ClassVar[str] = "find"
    words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    limit: int = 100


@dataclass(frozen=True, kw_only=True)
class IndexHits(Message):
    TAG: ClassVar[str] = "hits"
    adverts: list[bytes]


@dataclass(frozen=True, kw_only=True)
class IndexDigestRequest(Message):
    TAG: ClassVar[str] = "dig?"


@dataclass(frozen=True, kw_only=True)
class IndexDigest(Message):
    TAG: ClassVar[str] = "dig"
    digest: str
    count: int


INDEX_PROTOCOL = Protocol(
    "/hivecell/index/1.0.0", IndexSync, IndexDelta, IndexPush, IndexAck, IndexSearch, IndexHits, IndexDigestRequest,
    IndexDigest, max_frame=MAX_INDEX_FRAME,
)


@dataclass(frozen=True, kw_only=True)
class GossipConfig:
    index: bool = True  # subscribe to the topic, answer syncs and searches
    sync_interval: float = 10.0  # seconds between anti-entropy rounds with a random connected peer
    heartbeat: float = 1.0  # gossipsub heartbeat (py-libp2p's default of 120 s would leave the mesh unformed)
    sweep_interval: float = 30.0


def _batch(adverts: Iterable[bytes], cap: int = MAX_BATCH_BYTES) -> tuple[list[bytes], bool]:
    out, size = [], 0
    for raw in adverts:
        if size + len(raw) > cap:
            return out, True
        out.append(raw)
        size += len(raw)
    return out, False


def _content_id(msg) -> bytes:
    """A gossipsub message id: the sha256 of the message's data (see ``GossipIndex.serve``)."""
    return hashlib.sha256(msg.data).digest()


class _OncePerMinute(logging.Filter):
    """py-libp2p logs a WARNING for every message its forwarder rate limit drops: a flooding peer would flood the
    operator's log. Let one through per minute and drop the rest."""

    def __init__(self) -> None:
        super().__init__()
        self._last = -math.inf
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Rate limit exceeded"):
            return True
        now = time.monotonic()
        if now - self._last >= 60.0:
            self._last = now
            return True
        self.dropped += 1
        return False


_RATE_LIMIT_FILTER = _OncePerMinute()


class GossipIndex:
    """The index service of one host. Create with :func:`open_gossip`."""

    def __init__(self, host: MeshHost, index: AdvertIndex, config: GossipConfig) -> None:
        self.host, self.index, self.config = host, index, config
        self._pubsub = None
        self._my_id = None
        self._synced: dict[str, float] = {}  # peer -> when we last synced with it
        self._not_index: dict[str, float] = {}  # peers that refused the protocol -> when
        self._sync_limit = trio.CapacityLimiter(4)
        self.messages = {"published": 0, "sync_sent": 0, "sync_answered": 0, "adverts_sent": 0}
        self.on_new: Callable[[bytes], None] | None = None  # called for each advert filed as new (for waiters)
        self._changed = trio.Event()
        self._last_new = -math.inf  # trio time of the last record filed as new

    # -- publishing ------------------------------------------------------------------------------------------------
    async def publish(self, raw: bytes) -> Verdict:
        """File ``raw`` (one of our own adverts) in our index and gossip it."""
        verdict = self.index.offer(raw)
        if verdict is Verdict.NEW:
            self._wake()
        if self._pubsub is not None and verdict.accepted:
            try:
                await self._pubsub.publish(TOPIC, raw)
                self.messages["published"] += 1
            except Exception as exc:  # no peers yet, or the router is stopping: anti-entropy carries it later
                logger.debug("gossip publish failed: %r", exc)
        return verdict

    def _wake(self) -> None:
        self._last_new = trio.current_time()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def changed(self) -> None:
        """Wait until the index files a new record."""
        await self._changed.wait()

    # -- gossipsub -------------------------------------------------------------------------------------------------
    def _validate(self, forwarder, msg) -> bool:
        try:
            verdict = self.index.offer(bytes(msg.data), throttle=True)
        except Exception:  # offer never raises for any input; this is a bug of ours and must not reach libp2p
            logger.exception("advert validator failed")
            return False
        if verdict is Verdict.NEW:
            self._wake()
            return True
        if verdict is Verdict.KNOWN and forwarder == self._my_id:  # our own publish: publish() filed it already
            return True
        if not verdict.accepted:
            logger.debug("gossip: advert dropped (%s) from %s", verdict.value, short(str(forwarder)))
        return False

    # -- anti-entropy: the answering side --------------------------------------------------------------------------
    async def handle(self, peer: str, message: Message, reply: Reply) -> None:
        if isinstance(message, IndexPush):
            new = self._offer_all(message.adverts[:MAX_WANT])
            await reply.send(IndexAck(new=new))
            return
        if not self.config.index:
            raise RemoteError(ErrorCode.FORBIDDEN, "this peer does not run the index")
        if isinstance(message, IndexSync):
            try:
                remote = parse_summary(message.summary)
            except ValueError as exc:
                raise RemoteError(ErrorCode.BAD_MESSAGE, str(exc)) from None
            ours_newer, theirs_newer = self.index.diff(remote)
            adverts, more = _batch(a.raw for a in ours_newer)
            self.messages["sync_answered"] += 1
            self.messages["adverts_sent"] += len(adverts)
            await reply.send(IndexDelta(adverts=adverts, want=b"".join(theirs_newer[:MAX_WANT]), more=more))
            self._synced[peer] = time.monotonic()
        elif isinstance(message, IndexSearch):
            if len(message.words) + len(message.tags) + len(message.fields) > 64:
                raise RemoteError(ErrorCode.BAD_MESSAGE, "at most 64 search terms")
            hits = self.index.search(message.words, tags=message.tags, fields=message.fields, limit=message.limit)
            await reply.send(IndexHits(adverts=_batch(a.raw for a in hits)[0]))
        elif isinstance(message, IndexDigestRequest):
            self.index.sweep()
            await reply.send(IndexDigest(digest=self.index.digest(), count=len(self.index)))
        else:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "not an index request")

    def _offer_all(self, adverts: list[bytes]) -> int:
        new = 0
        for raw in adverts:
            if len(raw) <= MAX_ADVERT_BYTES and self.index.offer(raw) is Verdict.NEW:
                new += 1
        if new:
            self._wake()
        return new

    # -- anti-entropy: the initiating side -------------------------------------------------------------------------
    async def sync(self, peer: str) -> int:
        """One anti-entropy exchange with ``peer``; returns how many records we filed as new.

        Raises:
            PeerUnreachable, RemoteError, RemoteProtocolError: the exchange failed (the peer may not run the index).
        """
        filed = 0
        for _ in range(8):  # a delta is cut at MAX_BATCH_BYTES; keep going while the peer says there is more
            self.messages["sync_sent"] += 1
            delta = await self.host.request(peer, INDEX_PROTOCOL, IndexSync(summary=self.index.summary()),
                                            expect=IndexDelta)
            filed += self._offer_all(delta.adverts[:MAX_WANT])
            want = delta.want[:MAX_WANT * KEY_BYTES]
            keys = [want[i:i + KEY_BYTES] for i in range(0, len(want) - len(want) % KEY_BYTES, KEY_BYTES)]
            held = [a.raw for a in (self.index.get(k) for k in keys) if a is not None]
            while held:
                batch, _ = _batch(held)
                if not batch:  # cannot happen (adverts are far below the batch cap); never loop forever
                    break
                held = held[len(batch):]
                self.messages["adverts_sent"] += len(batch)
                await self.host.request(peer, INDEX_PROTOCOL, IndexPush(adverts=batch), expect=IndexAck)
            if not delta.more:
                break
        self._synced[peer] = time.monotonic()
        return filed

    async def _sync_quietly(self, peer: str) -> None:
        async with self._sync_limit:
            try:
                new = await self.sync(peer)
                if new:
                    logger.debug("anti-entropy with %s: %d new adverts", short(peer), new)
            except RemoteError as exc:
                if exc.code == ErrorCode.FORBIDDEN:  # a peer without the index role: push to it never again
                    self._not_index[peer] = time.monotonic()
                logger.debug("anti-entropy with %s failed: %s", short(peer), exc)
            except (ProtocolUnsupported, RemoteProtocolError) as exc:
                self._not_index[peer] = time.monotonic()  # e.g. a scientist's client: it does not speak the protocol
                logger.debug("anti-entropy with %s failed: %s", short(peer), exc)
            except PeerUnreachable as exc:  # a timeout or a broken stream says nothing about the peer's role
                logger.debug("anti-entropy with %s failed: %s", short(peer), exc)

    def _syncs_on_connect(self, peer: str) -> bool:
        """Whether this side starts the exchange with a newly connected peer. One exchange moves records both ways,
        so of two index peers only the one with the smaller peer id starts it; a node without the index role always
        starts (only it knows that it must push, and an index peer that starts gets refused). A new node on a LAN
        meets every daemon at once, and halving these exchanges is part of answering its first searches sooner."""
        return not self.config.index or self.host.peer_id < peer

    async def _anti_entropy(self) -> None:
        """Sync with each newly connected peer at once (:meth:`_syncs_on_connect`), and with a random connected peer
        every sync_interval."""
        known: set[str] = set()
        next_random = trio.current_time() + self.config.sync_interval * random.uniform(0.5, 1.0)
        async with trio.open_nursery() as nursery:
            while True:
                connected = set(self.host.connected_peers())
                for peer in connected - known:
                    self._not_index.pop(peer, None)  # a reconnect may be a restart with the index role now
                    if self._syncs_on_connect(peer):
                        nursery.start_soon(self._sync_quietly, peer)
                known = connected
                now = trio.current_time()
                # While gossip is filing new adverts, a sync would mostly fetch what gossip is delivering anyway, on
                # the same busy CPU: wait for a quiet moment, but never more than one extra interval.
                busy = now - self._last_new < QUIET_S and now < next_random + self.config.sync_interval
                if now >= next_random and not busy:
                    candidates = [p for p in connected if p not in self._not_index]
                    if candidates:
                        nursery.start_soon(self._sync_quietly, random.choice(candidates))
                    next_random = trio.current_time() + self.config.sync_interval * random.uniform(0.75, 1.25)
                await trio.sleep(0.25)

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(self.config.sweep_interval)
            gone = self.index.sweep()
            if gone:
                logger.info("index: %d expired adverts dropped", len(gone))

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run gossipsub (index role), anti-entropy and the sweep until cancelled."""
        from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        _patch_pubsub()
        gossipsub_log = logging.getLogger("libp2p.pubsub.gossipsub")
        if _RATE_LIMIT_FILTER not in gossipsub_log.filters:
            gossipsub_log.addFilter(_RATE_LIMIT_FILTER)
        self.host.serve(INDEX_PROTOCOL, self.handle)
        # gossipsub v1.1, not v1.2: py-libp2p's v1.2 sends an IDONTWANT to every mesh peer for every message, which
        # doubled the RPCs and the CPU per delivered advert (23.6 -> 12.6 ms, 20 peers in one process); degree 3
        # instead of 6 cut duplicate deliveries to 7.8 ms. Anti-entropy repairs what a thinner mesh misses.
        # degree_high 12, not 6: a peer over degree_high prunes the extra ones, and a pruned peer may not graft it
        # again for the 60 s backoff. With 6, the well-connected peers of bench/discovery.py's 100-peer graph pruned
        # the peers that had only 2-3 connections, and 4-6 of those were left with no mesh at all for the run.
        router = GossipSub(
            [PROTOCOL_ID_V11, PROTOCOL_ID], degree=3, degree_low=2, degree_high=12,
            heartbeat_initial_delay=0.2, heartbeat_interval=self.config.heartbeat,  # type: ignore[arg-type]
            # Forwarders are rate-limited per topic; the per-signer bucket of the index is the real throttle.
            max_messages_per_topic_per_second=200.0,
            # IP-diversity eclipse protection assumes the public internet; on a LAN (or loopback) every peer shares
            # a subnet and it would keep the mesh from forming.
            eclipse_protection_enabled=False,
        )
        # py-libp2p's "GRAFT flood" check is inverted: it times the PRUNEs a peer *sent us*, so after peer A prunes
        # B, B refuses A's GRAFTs for 10 s and prunes A back, which restarts A's clock. That too left peers with no
        # mesh. The prune backoff, which py-libp2p checks right after, is the spec's protection against re-grafting
        # too soon; keep only that.
        router.graft_flood_threshold = 0.0
        # Every advert is a record signed by its node, and the validator checks that signature before anything is
        # filed or forwarded; a second signature by the publishing libp2p peer adds nothing but an Ed25519 sign and
        # a verify per message. So messages go unsigned and are named by the hash of their content (the "StrictNoSign"
        # mode with content ids that Ethereum's gossipsub topics use): a forwarder cannot forge an id to shadow
        # somebody else's advert, and the same advert arriving twice is one message.
        pubsub = Pubsub(self.host.libp2p, router, max_inbound_rpc_size=MAX_INDEX_FRAME, strict_signing=False,
                        msg_id_constructor=_content_id)
        self._my_id = self.host.libp2p.get_id()
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            if self.config.index:
                pubsub.set_topic_validator(TOPIC, self._validate, is_async_validator=False)
                subscription = await pubsub.subscribe(TOPIC)
            else:
                subscription = None
            self._pubsub = pubsub
            restore = None
            try:
                async with trio.open_nursery() as nursery:
                    restore = _spawn_messages_in(pubsub, nursery)
                    nursery.start_soon(self._anti_entropy)
                    nursery.start_soon(self._sweep)
                    if subscription is not None:
                        nursery.start_soon(self._drain, subscription)
                    task_status.started()
            finally:
                if restore is not None:  # messages that arrive while py-libp2p stops go to its manager again
                    restore()
                self._pubsub = None

    @staticmethod
    async def _drain(subscription) -> None:
        """Filing happens in the validator; the subscription's queue only has to be emptied."""
        while True:
            await subscription.get()


async def open_gossip(host: MeshHost, index: AdvertIndex, config: GossipConfig, nursery: trio.Nursery
                      ) -> GossipIndex:
    """Start the index service of ``host`` in ``nursery`` and return it once gossipsub is ready."""
    service = GossipIndex(host, index, config)
    await nursery.start(service.serve)
    return service
