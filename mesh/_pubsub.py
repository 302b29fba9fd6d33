"""py-libp2p 0.8.1's pubsub, patched where the gossip index pays for every message.

py-libp2p's queues drop silently past hard-wired sizes, and its per-message work is far above what gossiping small
signed adverts needs. Profiled with py-spy on ``bench/discovery.py``'s convergence section (50 index peers in two
processes, every peer publishing at once), about a third of the CPU went to work that carries no information:

- Every RPC carries the sender's signed peer record. The sender rebuilds it for every RPC (its listen addresses,
  turned into multiaddrs again, to see whether the cached record still matches), and the receiver verifies its
  Ed25519 signature and rewrites its peerstore entry, for every RPC (about 12% of the CPU).
- The receiver reads each RPC's varint length one byte at a time. Every one-byte read goes through Yamux and Noise,
  and Yamux answers it with a WINDOW_UPDATE frame of its own, encrypted and written back (about 15%).
- Each RPC in a peer's outbound queue is written alone, so a burst of N messages for one peer costs N Noise frames,
  N Yamux frames, N signed peer records and N protobuf parses on the other side.

:func:`apply` patches those paths, once per process, before any ``Pubsub`` starts:

1. Queue sizes (``shared/notes/py-libp2p-0.8.1.md``, pitfalls 3b-3d): the 32-message subscription queue and the
   32-deep, 1 MiB per-peer outbound queue become 1024 and 4 MiB.
2. The signed peer record to send is cached per host for :data:`RECORD_CACHE_S` seconds, so an address change still
   reaches peers within that time.
3. An incoming signed peer record byte-identical to the last one consumed from the same peer, less than
   :data:`RECORD_REVERIFY_S` seconds ago, is not verified and stored again: the answer would be the same. Anything
   else goes through py-libp2p's own check.
4. RPCs are read through a per-stream buffer: the varint and the body come out of reads of up to 64 KiB. The size
   cap is still checked before the body is read, with py-libp2p's exceptions.
5. The per-peer sending loop writes the messages waiting in the queue as one RPC, up to :data:`COALESCE_BYTES`:
   an RPC carries a list of messages, and the receiver handles each one as before. Only RPCs that hold nothing but
   published messages are merged; subscriptions and control messages go alone, in order, so nothing is reordered
   relative to them.
6. A received message already seen is dropped in the read loop, before py-libp2p spawns a task for it only to drop
   it there.
7. The peer scorer's gates answer at once when their threshold is -inf (py-libp2p's default; this mesh sets no score
   parameters), instead of computing a score that cannot fail them.
8. An RPC that fits the peer's size cap is queued as it is, not rebuilt message by message by ``split_rpc``.

And per Pubsub instance, :func:`spawn_messages_in` (called by the gossip service once its nursery is open): each new
received message is handled in a task of that plain trio nursery instead of a task of py-libp2p's service manager.
The manager's tasks carry a lifecycle tree whose bookkeeping grows with the tasks alive: 160-1000 us a task here
(spawning 2,000 no-op tasks in batches of 10 to 500), against 18 us for a nursery task, and a burst keeps hundreds
alive. A message whose handling raises is counted and logged at debug level; the manager would have stopped pubsub.

Each patch keeps py-libp2p's behaviour for anything it does not recognise, and :func:`apply` refuses to patch a
py-libp2p other than the one pinned in ``pyproject.toml`` (it logs and leaves it alone).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable
from typing import Any

from ._libp2p import is_pinned

__all__ = ["COALESCE_BYTES", "RECORD_CACHE_S", "RECORD_REVERIFY_S", "apply", "spawn_messages_in", "stats"]

logger = logging.getLogger(__name__)

RECORD_CACHE_S = 5.0
RECORD_REVERIFY_S = 600.0
READ_CHUNK = 64 << 10
COALESCE_BYTES = 256 << 10  # far below py-libp2p's default 1 MiB inbound cap, so any peer accepts the merged RPC
MAX_REMEMBERED_RECORDS = 4096

_applied = False
stats = {"records_built": 0, "records_reused": 0, "records_verified": 0, "records_skipped": 0, "rpcs_written": 0,
         "rpcs_merged": 0, "duplicates_dropped": 0, "messages_spawned": 0, "message_errors": 0,
         "messages_dropped_at_stop": 0}


def apply() -> bool:
    """Patch py-libp2p's pubsub (once per process); returns whether the patches are in place."""
    global _applied
    if _applied:
        return True
    if not is_pinned("its pubsub (slower gossip)"):
        return False
    import libp2p.pubsub.floodsub as floodsub
    import libp2p.pubsub.gossipsub as gossipsub
    import libp2p.pubsub.pubsub as pubsub
    import libp2p.pubsub.rpc_queue as rpc_queue
    import libp2p.pubsub.score as score

    pubsub.SUBSCRIPTION_CHANNEL_SIZE = max(pubsub.SUBSCRIPTION_CHANNEL_SIZE, 1024)
    rpc_queue.RpcQueue.__init__.__defaults__ = (1024, 4 << 20)

    build = _cached_record(pubsub.env_to_send_in_RPC)
    consume = _remembered_consume(pubsub.maybe_consume_signed_record)
    for module in (pubsub, gossipsub, floodsub):
        module.env_to_send_in_RPC = build
        module.maybe_consume_signed_record = consume
    pubsub.read_varint_prefixed_bytes_limited = _buffered_read
    pubsub.Pubsub.handle_sending_messages = _coalescing_sender(pubsub.Pubsub.handle_sending_messages)
    pubsub.Pubsub._is_subscribed_to_msg = _subscribed_and_unseen
    _open_gates_fast(score.PeerScorer)
    rpc_queue.RpcQueue.split_rpc = _split_only_if_needed(rpc_queue.RpcQueue.split_rpc)
    _applied = True
    return True


# -- 2. the signed peer record we send -----------------------------------------------------------------------------
def _cached_record(original):
    cache: weakref.WeakKeyDictionary[Any, tuple[float, tuple[bytes, bool]]] = weakref.WeakKeyDictionary()

    def env_to_send_in_RPC(host):  # noqa: N802 (py-libp2p's name)
        now = time.monotonic()
        held = cache.get(host)
        if held is not None and now - held[0] < RECORD_CACHE_S:
            stats["records_reused"] += 1
            return held[1][0], False
        result = original(host)
        cache[host] = (now, result)
        stats["records_built"] += 1
        return result

    return env_to_send_in_RPC


# -- 3. the signed peer records we receive -------------------------------------------------------------------------
def _remembered_consume(original):
    # host -> {peer id: (record bytes, when consumed)}; bounded per host
    seen: weakref.WeakKeyDictionary[Any, dict[Any, tuple[bytes, float]]] = weakref.WeakKeyDictionary()

    def maybe_consume_signed_record(msg, host, peer_id) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        record = msg.senderRecord
        now = time.monotonic()
        known = seen.setdefault(host, {})
        held = known.get(peer_id)
        if held is not None and held[0] == record and now - held[1] < RECORD_REVERIFY_S:
            stats["records_skipped"] += 1
            return True
        ok = original(msg, host, peer_id)
        stats["records_verified"] += 1
        if ok:
            if len(known) >= MAX_REMEMBERED_RECORDS:
                known.pop(next(iter(known)))
            known[peer_id] = (record, now)
        else:
            known.pop(peer_id, None)
        return ok

    return maybe_consume_signed_record


# -- 4. buffered RPC reads -----------------------------------------------------------------------------------------
_read_buffers: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()


async def _buffered_read(reader, max_length: int) -> bytes:
    """``read_varint_prefixed_bytes_limited`` with the same contract, reading ahead into a buffer per stream (only
    pubsub's read loop reads these streams, one RPC after the other)."""
    from libp2p.exceptions import ParseError
    from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge

    if max_length <= 0:
        raise ValueError("max_length must be greater than 0")
    buf = _read_buffers.get(reader)
    if buf is None:
        buf = _read_buffers[reader] = bytearray()
    while True:
        length, shift, end = 0, 0, -1
        for i in range(min(len(buf), 10)):
            length |= (buf[i] & 0x7F) << shift
            shift += 7
            if not buf[i] & 0x80:
                end = i + 1
                break
        if end > 0:
            break
        if len(buf) >= 10:
            raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            raise IncompleteReadError("Stream ended while reading varint length prefix", expected_bytes=1,
                                      received_bytes=0)
        buf += chunk
    if length > max_length:
        raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
    del buf[:end]
    while len(buf) < length:
        chunk = await reader.read(max(length - len(buf), READ_CHUNK))
        if not chunk:
            raise IncompleteReadError(f"Incomplete message: expected {length}, got {len(buf)}",
                                      expected_bytes=length, received_bytes=len(buf))
        buf += chunk
    out = bytes(buf[:length])
    del buf[:length]
    return out


# -- 5. coalesced sending ------------------------------------------------------------------------------------------
def _publish_only(rpc) -> bool:
    return bool(rpc.publish) and not rpc.subscriptions and not rpc.HasField("control")


def _coalescing_sender(original):
    async def handle_sending_messages(self, peer_id, stream, queue) -> None:
        from libp2p.pubsub.pb import rpc_pb2

        waiting = queue._queue  # the PriorityQueue behind RpcQueue: pop() without waiting
        held = None  # an RPC popped while merging that must go out on its own, next
        try:
            while True:
                rpc, held = (held, None) if held is not None else (await queue.pop(), None)
                if rpc is None:
                    return
                if _publish_only(rpc) and len(waiting):
                    merged = rpc_pb2.RPC()
                    merged.CopyFrom(rpc)
                    size = rpc.ByteSize()
                    while len(waiting):
                        nxt = waiting.pop()
                        if nxt is None:
                            break
                        more = nxt.ByteSize()  # counts its own sender record: the merged RPC stays below the cap
                        if not _publish_only(nxt) or size + more > COALESCE_BYTES:
                            held = nxt
                            break
                        merged.publish.extend(nxt.publish)
                        size += more
                        stats["rpcs_merged"] += 1
                    rpc = merged
                stats["rpcs_written"] += 1
                if not await self.write_msg(stream, rpc):
                    return
        except Exception:
            logger.debug("pubsub sending loop for %s ended with an error", peer_id, exc_info=True)
            self._handle_dead_peer(peer_id)

    handle_sending_messages.__wrapped__ = original  # type: ignore[attr-defined]
    return handle_sending_messages


# -- 6. duplicates dropped before a task is spawned ----------------------------------------------------------------
def _subscribed_and_unseen(self, msg) -> bool:
    """Pubsub's read loop asks this for every received message before it spawns a ``push_msg`` task for it, and
    ``push_msg``'s first step drops a message already seen (with no other effect). Asking the seen cache here saves
    the task for every duplicate, which is most of what a gossipsub mesh delivers."""
    if not any(topic in self.topic_ids for topic in msg.topicIDs):
        return False
    if self._is_msg_seen(msg):
        stats["duplicates_dropped"] += 1
        return False
    return True


# -- per instance: received messages handled in a nursery ---------------------------------------------------------
def spawn_messages_in(pubsub, nursery) -> Callable[[], None]:
    """Route ``pubsub``'s ``push_msg`` tasks (one per new received message) to ``nursery``; every other task still
    goes to py-libp2p's manager. Returns a function that puts the manager back (call it when the nursery closes).
    Nothing changes on a py-libp2p that :func:`apply` left unpatched."""
    if not _applied:
        return lambda: None
    run_task = pubsub.manager.run_task
    push_msg = pubsub.push_msg

    def routed_run_task(async_fn, *args, **kwargs) -> None:
        if async_fn != push_msg or kwargs:
            run_task(async_fn, *args, **kwargs)
            return
        try:
            nursery.start_soon(_handle_message, async_fn, *args)
        except RuntimeError:  # the nursery has closed: the service is stopping, and so would the manager's task
            stats["messages_dropped_at_stop"] += 1
            return
        stats["messages_spawned"] += 1

    def restore() -> None:
        pubsub.manager.run_task = run_task

    pubsub.manager.run_task = routed_run_task
    return restore


async def _handle_message(push_msg, forwarder, msg) -> None:
    try:
        await push_msg(forwarder, msg)
    except Exception:  # one bad message must not stop the others (the manager would have ended the service)
        stats["message_errors"] += 1
        logger.debug("pubsub: handling a message from %s failed", forwarder, exc_info=True)


# -- 7. score gates that cannot close ------------------------------------------------------------------------------
def _open_gates_fast(scorer_class) -> None:
    """With py-libp2p's default ``ScoreParams`` (all weights 0, every threshold -inf), a gate compares a score of 0
    with -inf, yet it is computed for every message forwarded and every mesh peer. Answer without computing when the
    threshold is -inf; any other threshold takes py-libp2p's path."""
    allow_publish, allow_gossip, is_graylisted = (scorer_class.allow_publish, scorer_class.allow_gossip,
                                                  scorer_class.is_graylisted)

    def fast_allow_publish(self, peer, topics) -> bool:
        if self.params.publish_threshold == -math.inf:
            return bool(topics)
        return allow_publish(self, peer, topics)

    def fast_allow_gossip(self, peer, topics) -> bool:
        if self.params.gossip_threshold == -math.inf:
            return bool(topics)
        return allow_gossip(self, peer, topics)

    def fast_is_graylisted(self, peer, topics) -> bool:
        if self.params.graylist_threshold == -math.inf:
            return False
        return is_graylisted(self, peer, topics)

    scorer_class.allow_publish, scorer_class.allow_gossip, scorer_class.is_graylisted = (
        fast_allow_publish, fast_allow_gossip, fast_is_graylisted)


# -- 8. splitting only what is too large ---------------------------------------------------------------------------
def _split_only_if_needed(original):
    """The router splits every RPC it queues, message by message, to fit the peer's size cap; an RPC that already
    fits comes out as one part with the same content. Return it as is (callers only read the parts)."""

    def split_rpc(self, rpc):
        if rpc.ByteSize() <= self.max_message_size:
            return [rpc]
        return original(self, rpc)

    return split_rpc
