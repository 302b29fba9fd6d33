"""The gossip index on real libp2p hosts on loopback: gossip, anti-entropy, convergence, bad adverts, search."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import pytest
import trio

from hivecell.crypto.identity import Identity
from hivecell.crypto.record import seal
from hivecell.mesh.frame import write_frame
from hivecell.mesh.gossip import (
    INDEX_PROTOCOL, TOPIC, GossipConfig, IndexAck, IndexDigest, IndexDigestRequest, IndexHits, IndexPush, IndexSearch,
    IndexSync, open_gossip,
)
from hivecell.mesh.host import RemoteError, open_host
from hivecell.mesh.index import AdvertIndex, Verdict

WAIT_S = 20.0


def micros() -> int:
    return time.time_ns() // 1000 % 1_000_000


def advert(identity: Identity, name: str, *, ttl: float = 600, description: str = "", **extra) -> bytes:
    return seal(identity, "advert", {"name": name, "description": description or f"dataset {name}",
                                     "tags": ["digits"], "schema": {"num_samples": 10}, "us": micros(), **extra},
                ttl=ttl)


def tombstone(identity: Identity, name: str) -> bytes:
    return seal(identity, "advert", {"name": name, "tombstone": True, "us": micros()}, ttl=600)


class Peer:
    """One host with its index service, in a task of its own: peers start and stop in any order."""

    def __init__(self, *, index: AdvertIndex | None = None, role: bool = True, sync_interval: float = 3.0) -> None:
        self.identity = Identity.generate()
        self.index = index if index is not None else AdvertIndex()
        self.role, self.sync_interval = role, sync_interval
        self._stop: trio.Event | None = None
        self._stopped: trio.Event | None = None

    async def _run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_host(self.identity) as host, trio.open_nursery() as nursery:
                self.host = host
                self.gossip = await open_gossip(host, self.index, GossipConfig(
                    index=self.role, sync_interval=self.sync_interval), nursery)
                task_status.started()
                await self._stop.wait()  # type: ignore[union-attr]
                nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()  # type: ignore[union-attr]

    async def start(self, nursery: trio.Nursery) -> Peer:
        self._stop, self._stopped = trio.Event(), trio.Event()
        await nursery.start(self._run)
        return self

    async def stop(self) -> None:
        if self._stop is not None and not self._stopped.is_set():  # type: ignore[union-attr]
            self._stop.set()
            await self._stopped.wait()  # type: ignore[union-attr]

    @property
    def addr(self) -> str:
        return self.host.addrs()[0]

    def digest(self) -> str:
        return self.index.digest()


async def connect(a: Peer, b: Peer) -> None:
    await a.host.connect(b.addr)


@asynccontextmanager
async def index_and_client(nursery):
    """An index peer and, connected to it, a peer without the index role; both stopped on exit."""
    server, client = Peer(), Peer(role=False)
    try:
        await server.start(nursery)
        await client.start(nursery)
        await connect(client, server)
        yield server, client
    finally:
        await client.stop()
        await server.stop()


async def until(predicate, what: str, timeout: float = WAIT_S) -> float:
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return trio.current_time() - start
    raise AssertionError(f"not within {timeout} s: {what}")


async def test_late_start_partition_and_heal_converge(nursery):
    peers = [Peer() for _ in range(6)]
    try:
        for p in peers[:5]:
            await p.start(nursery)
        a, b = peers[:3], peers[3:5]  # two partitions, chains inside each
        await connect(a[0], a[1])
        await connect(a[1], a[2])
        await connect(b[0], b[1])
        for i, p in enumerate(peers[:5]):
            await p.gossip.publish(advert(p.identity, f"ds-{i}"))
        await until(lambda: len({p.digest() for p in a}) == 1 and len(a[0].index) == 3, "partition A converges")
        await until(lambda: len({p.digest() for p in b}) == 1 and len(b[0].index) == 2, "partition B converges")
        assert a[0].digest() != b[0].digest()

        await connect(a[2], b[0])  # heal
        await until(lambda: len({p.digest() for p in peers[:5]}) == 1 and len(a[0].index) == 5, "heal")

        # A late index peer that meets one peer of the mesh gets everything by anti-entropy on connect.
        late = await peers[5].start(nursery)
        await connect(late, b[1])
        await until(lambda: late.digest() == a[0].digest(), "late peer catches up")

        # Partition one peer away, change the mesh behind its back (a new advert, a removal), bring it back.
        away = a[0]
        await away.host.disconnect(a[1].host.peer_id)
        await until(lambda: not away.host.connected_peers(), "a[0] is cut off")
        await b[1].gossip.publish(advert(b[1].identity, "while-away"))
        await a[2].gossip.publish(tombstone(a[2].identity, "ds-2"))
        await until(lambda: len({p.digest() for p in peers if p is not away}) == 1
                    and len(late.index) == 6, "the rest converge")
        assert away.digest() != late.digest()
        await connect(away, late)
        await until(lambda: away.digest() == late.digest(), "the partitioned peer converges")
        assert [x.name for x in away.index.search()] == ["ds-0", "ds-1", "ds-3", "ds-4", "while-away"]
    finally:
        for p in reversed(peers):
            await p.stop()


async def test_a_restarted_index_peer_converges_with_its_kept_state(nursery):
    kept = AdvertIndex()  # what the daemon persists in LMDB; here the same object across the restart
    x, y = Peer(index=kept), Peer()
    try:
        await x.start(nursery)
        await y.start(nursery)
        await connect(x, y)
        await y.gossip.publish(advert(y.identity, "first"))
        await until(lambda: len(kept) == 1, "gossip reaches x")
        await x.stop()
        await y.gossip.publish(advert(y.identity, "second"))
        x.identity = Identity.generate()  # a new host; the index is what survives
        await x.start(nursery)
        await connect(x, y)
        await until(lambda: x.digest() == y.digest(), "restarted peer converges")
        assert len(kept) == 2
    finally:
        await x.stop()
        await y.stop()


async def test_bad_adverts_stop_at_the_first_honest_peer(nursery):
    mallory = Peer(role=False)  # publishes raw bytes on the topic, with no validator of its own
    honest, behind = Peer(), Peer()
    alice = Identity.generate()
    try:
        for p in (mallory, honest, behind):
            await p.start(nursery)
        await connect(mallory, honest)
        await connect(honest, behind)
        await trio.sleep(1.5)  # let the gossip mesh form (heartbeat 1 s)
        good = advert(alice, "good")
        forged = bytearray(advert(alice, "forged"))
        forged[-3] ^= 0xFF
        expired = seal(alice, "advert", {"name": "old", "description": "", "tags": [], "schema": {}}, ttl=1,
                       now=1_000_000)
        oversized = advert(alice, "big", description="x" * 1900, schema={"pad": "y" * 40_000})
        for raw in (bytes(forged), expired, oversized, b"\x93garbage", good, good):
            await mallory.gossip._pubsub.publish(TOPIC, raw)
        await until(lambda: behind.index.get(next(iter(honest.index._by_key), b"")) is not None, "good arrives")
        counters = honest.index.counters
        assert counters["forged"] == 2 and counters["expired"] == 1 and counters["oversized"] == 1, counters
        assert [a.name for a in honest.index.adverts()] == ["good"]
        # The honest peer forwarded only the good advert (once).
        assert behind.index.counters == {"new": 1}, behind.index.counters
        assert [a.name for a in behind.index.adverts()] == ["good"]
    finally:
        for p in (behind, honest, mallory):
            await p.stop()


async def test_a_flood_is_throttled_and_bounded_without_starving_others(nursery):
    flooder, index_peer = Peer(role=False), Peer()
    spam_key, alice = Identity.generate(), Identity.generate()
    try:
        await flooder.start(nursery)
        await index_peer.start(nursery)
        await connect(flooder, index_peer)
        await trio.sleep(1.5)
        started = trio.current_time()
        for i in range(300):  # 100 a second: under gossipsub's own forwarder limit, far over the signer's bucket
            await flooder.gossip._pubsub.publish(TOPIC, advert(spam_key, f"spam-{i}"))
            await trio.sleep(0.01)
        elapsed = trio.current_time() - started
        seen = -1
        while seen != sum(index_peer.index.counters.values()):  # until the flood has been filed
            seen = sum(index_peer.index.counters.values())
            await trio.sleep(0.5)
        gossip_counts = dict(index_peer.index.counters)
        assert gossip_counts.get("throttled", 0) > 200, gossip_counts
        bucket = index_peer.index._buckets
        assert gossip_counts["new"] <= bucket.burst + bucket.rate * (elapsed + 1), (gossip_counts, elapsed)
        honest = Peer()
        await honest.start(nursery)
        try:
            await connect(honest, index_peer)
            await honest.gossip.publish(advert(alice, "honest"))
            await until(lambda: any(a.name == "honest" for a in index_peer.index.adverts()), "honest advert filed")
        finally:
            await honest.stop()
        # Pushing the flood by anti-entropy (no rate limit there) hits the per-signer cap instead.
        held_before = sum(1 for a in index_peer.index.adverts() if a.signer == spam_key.peer_id)
        ack = await flooder.host.request(index_peer.host.peer_id, INDEX_PROTOCOL, IndexPush(
            adverts=[advert(spam_key, f"push-{i}") for i in range(200)]), expect=IndexAck)
        c = index_peer.index.counters
        held = sum(1 for a in index_peer.index.adverts() if a.signer == spam_key.peer_id)
        assert held == index_peer.index.max_per_signer and c["full"] > 0, (held, c)
        assert ack.new == held - held_before
    finally:
        await flooder.stop()
        await index_peer.stop()


async def test_search_digest_and_bad_requests_over_the_protocol(nursery):
    async with index_and_client(nursery) as (server, client):
        alice = Identity.generate()
        for name, words in (("digits-a", "handwritten digits"), ("heart", "heart study"), ("gone", "old")):
            await server.gossip.publish(advert(alice, name, description=words))
        await server.gossip.publish(tombstone(alice, "gone"))
        peer = server.host.peer_id
        hits = await client.host.request(peer, INDEX_PROTOCOL, IndexSearch(words=["handwritten"]), expect=IndexHits)
        assert len(hits.adverts) == 1 and b"digits-a" in hits.adverts[0]
        hits = await client.host.request(peer, INDEX_PROTOCOL, IndexSearch(tags=["digits"]), expect=IndexHits)
        assert len(hits.adverts) == 2  # the tombstoned one is not found
        digest = await client.host.request(peer, INDEX_PROTOCOL, IndexDigestRequest(), expect=IndexDigest)
        assert digest.digest == server.digest() and digest.count == 3
        with pytest.raises(RemoteError) as err:
            await client.host.request(peer, INDEX_PROTOCOL, IndexSync(summary=b"\x00" * 33), expect=IndexHits)
        assert err.value.code == "bad_message"
        with pytest.raises(RemoteError) as err:
            await client.host.request(peer, INDEX_PROTOCOL, IndexSearch(words=["w"] * 65), expect=IndexHits)
        assert err.value.code == "bad_message"
        async with client.host.raw_stream(peer, INDEX_PROTOCOL) as stream:  # garbage frame
            await write_frame(stream, b"\xc1\xc1\xc1")
        # A peer without the index role refuses syncs and searches but files pushes.
        with pytest.raises(RemoteError) as err:
            await server.host.request(client.host.peer_id, INDEX_PROTOCOL, IndexSearch(), expect=IndexHits)
        assert err.value.code == "forbidden"
        # The server still answers.
        hits = await client.host.request(peer, INDEX_PROTOCOL, IndexSearch(words=["heart"]), expect=IndexHits)
        assert len(hits.adverts) == 1
        assert client.index.offer(hits.adverts[0]) is Verdict.NEW


async def test_an_expired_advert_leaves_search_results(nursery):
    async with index_and_client(nursery) as (server, client):
        alice = Identity.generate()
        # Times are whole seconds (iat is truncated): a ttl of 3 leaves the short advert valid for 2 to 3 s, so the
        # first search cannot straddle its expiry (a ttl of 1 once left a few milliseconds on a loaded CI box).
        await server.gossip.publish(advert(alice, "short", ttl=3))
        sealed_by = time.time()  # the short advert's exp = int(its seal time) + 3 <= sealed_by + 3
        await server.gossip.publish(advert(alice, "long", ttl=600))
        peer = server.host.peer_id
        hits = await client.host.request(peer, INDEX_PROTOCOL, IndexSearch(), expect=IndexHits)
        assert len(hits.adverts) == 2
        await trio.sleep(max(0.0, sealed_by + 3.1 - time.time()))
        hits = await client.host.request(peer, INDEX_PROTOCOL, IndexSearch(), expect=IndexHits)
        assert len(hits.adverts) == 1 and b"long" in hits.adverts[0]
