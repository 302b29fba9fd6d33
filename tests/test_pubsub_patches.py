"""mesh/_pubsub.py: py-libp2p's pubsub hot paths, patched. Each patch against its contract, then a burst of adverts
gossiped between real hosts on loopback with the patches in place."""

from __future__ import annotations

import random

import pytest
import trio
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.pubsub.score import PeerScorer, ScoreParams
from libp2p.utils.varint import encode_uvarint
from test_gossip import Peer, advert, connect, until

from hivecell.mesh import _pubsub
from hivecell.mesh.gossip import TOPIC

assert _pubsub.apply()  # the pinned py-libp2p: every test below runs against the patched classes


class ChunkedStream:
    """A byte stream that hands out its bytes in the chunk sizes given (then whatever is left, then EOF)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.reads = data, list(sizes), 0

    async def read(self, n: int = -1) -> bytes:
        self.reads += 1
        size = self.sizes.pop(0) if self.sizes else len(self.data)
        size = min(size, n if n > 0 else len(self.data))
        out, self.data = self.data[:size], self.data[size:]
        return out


def framed(*payloads: bytes) -> bytes:
    return b"".join(encode_uvarint(len(p)) + p for p in payloads)


async def test_buffered_read_returns_each_rpc_whatever_the_chunking():
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.choice([0, 1, 127, 128, 300, 3000])) for _ in range(40)] + [rng.randbytes(70_000)]
    data = framed(*payloads)
    for sizes in ([1] * len(data), [len(data)], [rng.randint(1, 5000) for _ in range(200)]):  # one byte at a time too
        stream = ChunkedStream(data, sizes)
        got = [await _pubsub._buffered_read(stream, 1 << 20) for _ in payloads]
        assert got == payloads
        with pytest.raises(IncompleteReadError):  # the stream is exhausted
            await _pubsub._buffered_read(stream, 1 << 20)
    # Many RPCs come out of one read: the point of the patch.
    stream = ChunkedStream(framed(*[b"x" * 100] * 50), [])
    for _ in range(50):
        await _pubsub._buffered_read(stream, 1 << 20)
    assert stream.reads == 1


async def test_buffered_read_keeps_the_size_cap_and_the_errors():
    big = ChunkedStream(framed(b"y" * 5000), [3])
    with pytest.raises(MessageTooLarge):
        await _pubsub._buffered_read(big, 4999)
    assert big.reads == 1  # refused on the length alone: the body was not read
    with pytest.raises(IncompleteReadError):  # ends inside the body
        await _pubsub._buffered_read(ChunkedStream(framed(b"z" * 100)[:50], []), 1 << 20)
    with pytest.raises(IncompleteReadError):  # ends inside the varint
        await _pubsub._buffered_read(ChunkedStream(b"\x80", []), 1 << 20)
    with pytest.raises(ParseError):  # more than 10 varint bytes
        await _pubsub._buffered_read(ChunkedStream(b"\xff" * 11, []), 1 << 20)
    with pytest.raises(ValueError):
        await _pubsub._buffered_read(ChunkedStream(b"", []), 0)


def test_a_sender_record_is_verified_once_until_it_changes():
    calls = []

    def original(msg, host, peer_id):
        calls.append(bytes(msg.senderRecord))
        return msg.senderRecord != b"forged"

    consume = _pubsub._remembered_consume(original)

    class Host:  # only its identity matters to the memo (one peerstore per host)
        pass

    host, other_host = Host(), Host()
    rpc = rpc_pb2.RPC(senderRecord=b"record-1")
    assert consume(rpc, host, "peer-a") and consume(rpc, host, "peer-a")
    assert calls == [b"record-1"]
    assert consume(rpc, other_host, "peer-a") and consume(rpc, host, "peer-b")  # per host and per peer
    assert len(calls) == 3
    assert consume(rpc_pb2.RPC(senderRecord=b"record-2"), host, "peer-a")  # a new record is checked
    assert calls[-1] == b"record-2"
    forged = rpc_pb2.RPC(senderRecord=b"forged")
    assert not consume(forged, host, "peer-a") and not consume(forged, host, "peer-a")  # refusals are not remembered
    assert calls[-2:] == [b"forged", b"forged"]
    assert consume(rpc_pb2.RPC(senderRecord=b"record-2"), host, "peer-a")  # the refusal also forgot record-2
    assert calls[-1] == b"record-2"
    n = len(calls)
    assert consume(rpc_pb2.RPC(), host, "peer-a")  # no record: nothing to check
    assert len(calls) == n


async def test_queued_messages_go_out_merged_and_control_keeps_its_place():
    def publish(*names: str) -> rpc_pb2.RPC:
        return rpc_pb2.RPC(publish=[rpc_pb2.Message(data=n.encode(), topicIDs=[TOPIC]) for n in names],
                           senderRecord=b"rec")

    control = rpc_pb2.RPC(control=rpc_pb2.ControlMessage(graft=[rpc_pb2.ControlGraft(topicID=TOPIC)]))
    subscribe = rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=TOPIC)])
    queue = RpcQueue()
    for rpc in (publish("a"), publish("b", "c"), control, publish("d"), subscribe, publish("e"), publish("f")):
        assert queue.push(rpc)
    queue.close()
    written: list[rpc_pb2.RPC] = []

    class Sender:  # what the sending loop uses of a Pubsub
        async def write_msg(self, stream, rpc):
            written.append(rpc)
            return True

        def _handle_dead_peer(self, peer_id):
            raise AssertionError("the loop failed")

    from libp2p.pubsub.pubsub import Pubsub

    await Pubsub.handle_sending_messages(Sender(), "peer", None, queue)
    shape = [([m.data.decode() for m in r.publish], r.HasField("control"), len(r.subscriptions)) for r in written]
    assert shape == [(["a", "b", "c"], False, 0), ([], True, 0), (["d"], False, 0), ([], False, 1),
                     (["e", "f"], False, 0)]
    assert written[0].senderRecord == b"rec"


async def test_merging_stops_at_the_size_cap():
    queue = RpcQueue()
    chunk = 100 << 10
    for i in range(7):
        queue.push(rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes([i]) * chunk, topicIDs=[TOPIC])]))
    queue.close()
    written = []

    class Sender:
        async def write_msg(self, stream, rpc):
            written.append(rpc)
            return True

    from libp2p.pubsub.pubsub import Pubsub

    await Pubsub.handle_sending_messages(Sender(), "peer", None, queue)
    assert [len(r.publish) for r in written] == [2, 2, 2, 1]
    assert all(r.ByteSize() <= _pubsub.COALESCE_BYTES for r in written)
    assert [m.data[0] for r in written for m in r.publish] == list(range(7))


def test_an_rpc_that_fits_is_not_split_and_one_that_does_not_is():
    queue = RpcQueue(max_message_size=10_000)
    small = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=b"s" * 100, topicIDs=[TOPIC])])
    assert queue.split_rpc(small) == [small]
    large = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes([i]) * 4000, topicIDs=[TOPIC]) for i in range(5)])
    parts = queue.split_rpc(large)
    assert len(parts) > 1 and all(p.ByteSize() <= 10_000 for p in parts)
    assert [m.data[0] for p in parts for m in p.publish] == list(range(5))


def test_score_gates_answer_as_before():
    open_scorer = PeerScorer(ScoreParams())
    for gate in ("allow_publish", "allow_gossip"):
        assert getattr(open_scorer, gate)("p", [TOPIC]) is True
        assert getattr(open_scorer, gate)("p", []) is False  # py-libp2p's answer for no topics
    assert open_scorer.is_graylisted("p", [TOPIC]) is False
    # With thresholds set, py-libp2p's own computation decides: a penalised peer is gated.
    strict = PeerScorer(ScoreParams(publish_threshold=-1.0, gossip_threshold=-1.0, graylist_threshold=-1.0,
                                    p5_behavior_penalty_weight=1.0))
    assert strict.allow_publish("good", [TOPIC]) and strict.allow_gossip("good", [TOPIC])
    strict.penalize_behavior("bad", 5.0)
    assert not strict.allow_publish("bad", [TOPIC]) and not strict.allow_gossip("bad", [TOPIC])
    assert strict.is_graylisted("bad", [TOPIC]) and not strict.is_graylisted("good", [TOPIC])


async def test_a_burst_reaches_every_index_by_gossip_alone(nursery):
    """8 index peers in a ring with chords; once connected (their anti-entropy on connect done), the next sync is 10
    minutes away, so what the 8 x 12 adverts published at once reach, gossip delivered."""
    peers = [Peer(sync_interval=600.0) for _ in range(8)]
    before = dict(_pubsub.stats)
    try:
        for p in peers:
            await p.start(nursery)
        for i, p in enumerate(peers):
            await connect(p, peers[(i + 1) % len(peers)])
        await connect(peers[0], peers[4])
        await connect(peers[2], peers[6])

        def mesh_formed() -> bool:
            return all(p.gossip._pubsub is not None and len(p.gossip._pubsub.router.mesh.get(TOPIC, ())) >= 2
                       for p in peers)

        await until(mesh_formed, "every peer has a gossipsub mesh of 2")
        await trio.sleep(0.5)  # the anti-entropy exchanges on connect finish
        synced = sum(p.gossip.messages["sync_sent"] for p in peers)
        raws = [[advert(p.identity, f"burst-{i}-{k}") for k in range(12)] for i, p in enumerate(peers)]
        async with trio.open_nursery() as publishers:
            for p, mine in zip(peers, raws):
                for raw in mine:
                    publishers.start_soon(p.gossip.publish, raw)
        await until(lambda: all(len(p.index) == 96 for p in peers), "96 adverts in every index")
        assert len({p.digest() for p in peers}) == 1
        assert sum(p.gossip.messages["sync_sent"] for p in peers) == synced  # no anti-entropy ran meanwhile
    finally:
        for p in reversed(peers):
            await p.stop()
    delta = {k: _pubsub.stats[k] - before.get(k, 0) for k in _pubsub.stats}
    assert delta["duplicates_dropped"] > 0  # a ring with chords delivers most adverts more than once
    assert delta["records_skipped"] > delta["records_verified"]
    assert delta["records_reused"] > delta["records_built"]
    assert delta["messages_spawned"] > 0 and delta["message_errors"] == 0  # handled in the gossip service's nursery


async def test_a_message_that_arrives_while_the_service_stops_is_dropped_quietly():
    """The race CI hit once: the gossip service's nursery had closed while py-libp2p's read loop, still running,
    handed it a message. The routing refuses nothing else and hands the manager back."""

    class Manager:  # records what reaches py-libp2p's manager
        def __init__(self) -> None:
            self.calls: list = []

        def run_task(self, async_fn, *args, **kwargs) -> None:
            self.calls.append(async_fn)

    class Pubsub:  # what spawn_messages_in uses of a py-libp2p Pubsub
        def __init__(self) -> None:
            self.manager = Manager()

        async def push_msg(self, forwarder, msg) -> None:
            pass

        async def other(self) -> None:
            pass

    pubsub = Pubsub()
    async with trio.open_nursery() as nursery:
        restore = _pubsub.spawn_messages_in(pubsub, nursery)
        pubsub.manager.run_task(pubsub.push_msg, "peer", "message")  # runs in the nursery
    before = dict(_pubsub.stats)
    pubsub.manager.run_task(pubsub.push_msg, "peer", "message")  # the nursery is closed: dropped, no exception
    assert _pubsub.stats["messages_dropped_at_stop"] == before["messages_dropped_at_stop"] + 1
    pubsub.manager.run_task(pubsub.other)  # every other task still goes to the manager
    restore()
    pubsub.manager.run_task(pubsub.push_msg, "peer", "message")
    assert pubsub.manager.calls == [pubsub.other, pubsub.push_msg]
