"""mesh/_streams.py: py-libp2p's Yamux window updates, multistream-select dialler and TCP reads, patched. Real hosts
on loopback, real streams."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
from libp2p.peer.id import ID

from hivecell.crypto.identity import Identity
from hivecell.mesh import _streams
from hivecell.mesh.host import PeerUnreachable, ProtocolUnsupported, open_host

PROTO = "/hivecell-test/sink/1.0.0"
MB = 1 << 20


async def test_a_large_stream_read_in_small_pieces_never_stalls():
    """3 MB, twelve times the initial 256 KiB window, read by the receiver in pieces of 1 byte to 5 KB (window
    updates now go out only at half a window): everything arrives, in order, and few updates were sent."""
    payload = random.Random(3).randbytes(3 * MB)
    got = bytearray()
    done = trio.Event()

    async def sink(stream) -> None:
        rng = random.Random(4)
        while len(got) < len(payload):
            chunk = await stream.read(rng.choice([1, 7, 100, 5000]))
            if not chunk:
                break
            got.extend(chunk)
        await stream.write(hashlib.sha256(got).digest())
        await stream.close()
        done.set()

    before = dict(_streams.stats)
    async with open_host(Identity.generate()) as a, open_host(Identity.generate()) as b:
        b.libp2p.set_stream_handler(PROTO, sink)
        await a.connect(b.addrs()[0])
        stream = await a.libp2p.new_stream(ID.from_base58(b.peer_id), [PROTO])
        with trio.fail_after(60):
            for i in range(0, len(payload), 64 << 10):
                await stream.write(payload[i:i + (64 << 10)])
            digest = b""
            while len(digest) < 32:
                piece = await stream.read(32 - len(digest))
                assert piece, "the receiver closed before answering"
                digest += piece
            await done.wait()
        await stream.close()
    assert bytes(got) == payload and digest == hashlib.sha256(payload).digest()
    sent = _streams.stats["window_updates_sent"] - before["window_updates_sent"]
    deferred = _streams.stats["window_updates_deferred"] - before["window_updates_deferred"]
    assert 0 < sent < 60 < deferred  # py-libp2p sent one per read: thousands here


async def test_window_grows_on_a_connection_whose_ping_measured_a_tiny_rtt():
    """A ping that measured 0.2 ms (loopback) used to keep the receive window at 256 KiB for good, and a stream at
    25-30 MB/s: auto-tuning doubles the window only for updates within 4 RTTs, and between two Python peers a
    write-to-credit cycle takes milliseconds. With the RTT floor the window grows on that connection too."""
    from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, YamuxStream

    payload = random.Random(5).randbytes(8 * MB)
    windows: list[int] = []

    async def sink(stream) -> None:
        muxed = stream.muxed_stream
        assert isinstance(muxed, YamuxStream)
        muxed.conn._rtt = 0.0002  # as py-libp2p's Yamux ping measures it on loopback
        assert muxed._effective_rtt() == _streams.AUTOTUNE_RTT_FLOOR
        got = 0
        while got < len(payload):
            chunk = await stream.read(1 << 20)
            assert chunk
            got += len(chunk)
        windows.append(muxed.target_recv_window)
        await stream.write(b"k")
        await stream.close()

    async with open_host(Identity.generate()) as a, open_host(Identity.generate()) as b:
        b.libp2p.set_stream_handler(PROTO, sink)
        await a.connect(b.addrs()[0])
        stream = await a.libp2p.new_stream(ID.from_base58(b.peer_id), [PROTO])
        with trio.fail_after(60):
            for i in range(0, len(payload), MB):
                await stream.write(payload[i:i + MB])
            assert await stream.read(1) == b"k"
        await stream.close()
    assert windows and windows[0] >= 8 * DEFAULT_WINDOW_SIZE, windows


async def test_the_dialler_pipelines_and_falls_back_to_its_next_choice():
    async def echo(stream) -> None:
        await stream.write(await stream.read(100))
        await stream.close()

    async with open_host(Identity.generate()) as a, open_host(Identity.generate()) as b:
        b.libp2p.set_stream_handler(PROTO, echo)
        await a.connect(b.addrs()[0])
        before = _streams.stats["pipelined_selects"]
        for choices in ([PROTO], ["/hivecell-test/missing/1.0.0", PROTO]):
            stream = await a.libp2p.new_stream(ID.from_base58(b.peer_id), choices)
            assert stream.get_protocol() == PROTO
            await stream.write(b"ping")
            assert await stream.read(100) == b"ping"
            await stream.close()
        assert _streams.stats["pipelined_selects"] - before >= 2  # ours, and identify's and others' meanwhile
        with pytest.raises(Exception) as refused:
            await a.libp2p.new_stream(ID.from_base58(b.peer_id), ["/hivecell-test/x/1", "/hivecell-test/y/1"])
        chain, error = [], refused.value
        while error is not None:
            chain.append(str(error))
            error = error.__cause__ or error.__context__
        assert any("protocols not supported" in text and "/hivecell-test/y/1" in text for text in chain), chain
        # The connection is still good after a refused negotiation.
        stream = await a.libp2p.new_stream(ID.from_base58(b.peer_id), [PROTO])
        await stream.write(b"again")
        assert await stream.read(100) == b"again"
        await stream.close()


async def test_requests_read_the_socket_ahead():
    from hivecell.mesh.gossip import INDEX_PROTOCOL, GossipConfig, IndexHits, IndexSearch, open_gossip
    from hivecell.mesh.index import AdvertIndex

    before = dict(_streams.stats)
    async with open_host(Identity.generate()) as a, open_host(Identity.generate()) as b, \
            trio.open_nursery() as nursery:
        await open_gossip(b, AdvertIndex(), GossipConfig(sync_interval=600), nursery)
        await a.connect(b.addrs()[0])
        for _ in range(20):
            hits = await a.request(b.peer_id, INDEX_PROTOCOL, IndexSearch(tags=["none"]), expect=IndexHits)
            assert hits.adverts == []
        absent = type("P", (), {"id": "/hivecell-test/absent/1"})()
        with pytest.raises(ProtocolUnsupported):  # a refusal, told apart from a failure (for anti-entropy)
            async with a.raw_stream(b.peer_id, absent):
                pass
        with pytest.raises(PeerUnreachable) as failed:  # a peer nobody can dial: a failure, not a refusal
            async with a.raw_stream(Identity.generate().peer_id, absent):
                pass
        assert not isinstance(failed.value, ProtocolUnsupported)
        nursery.cancel_scope.cancel()
    reads = _streams.stats["socket_reads"] - before["socket_reads"]
    buffered = _streams.stats["buffered_reads"] - before["buffered_reads"]
    assert buffered > reads > 0  # most of Noise's length-then-body reads came out of the buffer
