"""A libp2p host for Hivecell: Ed25519 identity, Noise, Yamux, TCP, one connection per peer, guarded handlers.

Request/response: a client opens a stream per request, writes one frame and reads one or more reply frames. A server
handler reads one frame with the protocol's cap, decodes it into a typed message and answers with messages or an
:class:`~hivecell.mesh.message.ErrorReply`. Every handler is guarded: in py-libp2p an exception escaping a stream
handler takes the whole host down (see shared/notes/py-libp2p-0.8.1.md, pitfall 1b), so nothing escapes ours.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from . import _libp2p  # noqa: F401  (first: py-libp2p's import resets its logger; see _libp2p)

# isort: split
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from hivecell.crypto.identity import Identity


from ._streams import apply as _patch_streams
from .errors import BaseExceptionGroup, leaves
from .frame import FrameError, FrameTooLarge, read_frame, write_frame
from .message import ErrorCode, ErrorReply, Message, Protocol, RemoteProtocolError

__all__ = ["MeshHost", "open_host", "RemoteError", "PeerUnreachable", "ProtocolUnsupported", "Reply", "Replies",
           "short"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
REQUEST_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 30.0  # a peer that sends nothing for this long mid-frame is cut off
MAX_HANDLERS = 16


def short(peer_id: str) -> str:
    """A short form of a peer id for logs."""
    return peer_id[-8:]


class RemoteError(Exception):
    """The remote node answered with an error code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code, self.message = code, message


class PeerUnreachable(Exception):
    """The peer could not be dialled, or the stream broke before a reply."""


class ProtocolUnsupported(PeerUnreachable):
    """The peer is connected but refused the protocol in the multistream-select negotiation (it does not serve it),
    as opposed to a dial, a negotiation or a stream that failed or timed out (:class:`PeerUnreachable`)."""


def _refused(exc: BaseException) -> bool:
    """Whether py-libp2p's error for a stream open says the peer answered "na" to every protocol offered."""
    from libp2p.protocol_muxer.exceptions import ProtocolNotSupportedError

    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ProtocolNotSupportedError) or "protocols not supported" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@dataclass
class Reply:
    """What a handler may use to answer: one or more messages on the same stream."""

    _stream: object
    _protocol: Protocol

    async def send(self, message: Message) -> None:
        await write_frame(self._stream, self._protocol.encode(message))  # type: ignore[arg-type]


Handler = Callable[[str, Message, Reply], Awaitable[None]]


def _libp2p_keypair(identity: Identity) -> KeyPair:
    private = Ed25519PrivateKey.from_bytes(identity.seed())
    return KeyPair(private, private.get_public_key())


class MeshHost:
    """Our view of a running libp2p host. Create with :func:`open_host`."""

    def __init__(self, identity: Identity, host, *, max_handlers: int = MAX_HANDLERS) -> None:
        self.identity = identity
        self._host = host
        # Requests being handled at once, over all peers and protocols: each may hold a frame of up to its protocol's
        # cap in memory, so this bounds the daemon's memory whatever peers do. Past it, peers get "busy".
        self._handlers = trio.CapacityLimiter(max_handlers)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def addrs(self) -> list[str]:
        """Listen addresses, each ending in ``/p2p/<peer id>``."""
        return [str(a) for a in self._host.get_addrs()]

    @property
    def libp2p(self):
        """The py-libp2p host underneath, for services built on it (gossipsub, the DHT)."""
        return self._host

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.get_connected_peers()]

    async def disconnect(self, peer_id: str) -> None:
        """Close the connection to ``peer_id``, if any (no error if there is none)."""
        try:
            await self._host.disconnect(ID.from_base58(peer_id))
        except Exception as exc:
            logger.debug("disconnect from %s: %r", short(peer_id), exc)

    def serve(self, protocol: Protocol, handler: Handler) -> None:
        """Answer requests of ``protocol`` with ``handler(peer_id, message, reply)``.

        The handler answers through ``reply.send``; if it raises :class:`RemoteError`, the peer gets that code; any
        other exception is logged here and the peer gets ``internal``. Nothing escapes to libp2p.
        """

        async def guarded(stream) -> None:
            peer = "?"
            try:
                peer = stream.muxed_conn.peer_id.to_base58()  # authenticated by the Noise handshake
                reply = Reply(stream, protocol)
                try:
                    self._handlers.acquire_on_behalf_of_nowait(stream)
                except trio.WouldBlock:
                    logger.debug("peer %s: busy, refusing a %s request", short(peer), protocol.id)
                    with trio.move_on_after(IDLE_TIMEOUT_S):
                        await reply.send(ErrorReply(code=ErrorCode.BUSY, message="too many requests; retry later"))
                    return
                try:
                    await self._handle(stream, peer, protocol, handler, reply)
                finally:
                    self._handlers.release_on_behalf_of(stream)
            except Exception:
                # A bug of ours: log it here, never let it reach libp2p (pitfall 1b).
                logger.exception("handler for %s failed (peer %s)", protocol.id, short(peer))
                with trio.move_on_after(1):
                    try:
                        await Reply(stream, protocol).send(ErrorReply(code=ErrorCode.INTERNAL))
                    except Exception:
                        pass
            finally:
                with trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:
                        pass

        self._host.set_stream_handler(protocol.id, guarded)

    async def _handle(self, stream, peer: str, protocol: Protocol, handler: Handler, reply: Reply) -> None:
        """Read, decode and answer one request; what the peer did wrong is logged at DEBUG (a hostile peer must not
        flood the operator's log) and answered with a code."""
        try:
            raw = await read_frame(stream, cap=protocol.max_frame, idle_timeout=IDLE_TIMEOUT_S)
            message = protocol.decode(raw) if len(raw) < 1 << 20 else await trio.to_thread.run_sync(protocol.decode,
                                                                                                     raw)
            del raw
        except FrameTooLarge as exc:
            logger.debug("peer %s: %s on %s", short(peer), exc, protocol.id)
            await reply.send(ErrorReply(code=ErrorCode.FRAME_TOO_LARGE, message=f"cap is {exc.cap} bytes"))
            return
        except RemoteProtocolError as exc:
            logger.debug("peer %s: bad message on %s: %s", short(peer), protocol.id, exc)
            await reply.send(ErrorReply(code=ErrorCode.BAD_MESSAGE, message=str(exc)[:200]))
            return
        except (FrameError, trio.TooSlowError, BaseLibp2pError, OSError) as exc:  # closed, reset or silent mid-frame
            logger.debug("peer %s: stream on %s ended: %r", short(peer), protocol.id, exc)
            return
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S * 4):  # a long-poll waits at most 30 s; a reply must drain
                await handler(peer, message, reply)
        except RemoteError as exc:
            await reply.send(ErrorReply(code=exc.code, message=exc.message[:500]))
        except (trio.TooSlowError, BaseLibp2pError, OSError) as exc:  # the peer stopped reading or reset the stream
            logger.debug("peer %s: reply on %s not delivered: %r", short(peer), protocol.id, exc)

    async def connect(self, address: str) -> str:
        """Dial a ``/ip4/.../tcp/.../p2p/<id>`` address and return the peer id.

        Raises:
            ValueError: the address has no ``/p2p/`` part or does not parse.
            PeerUnreachable: the dial failed.
        """
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        except Exception as exc:
            raise ValueError(f"not a peer address (expected /ip4/HOST/tcp/PORT/p2p/PEER_ID): {address}") from exc
        try:
            await self._host.connect(info)
        except Exception as exc:
            raise PeerUnreachable(f"cannot reach {address}: {exc}") from exc
        return info.peer_id.to_base58()

    @asynccontextmanager
    async def raw_stream(self, peer_id: str, protocol: Protocol) -> AsyncIterator[object]:
        """A bare stream of ``protocol`` to ``peer_id`` (``read``/``write`` bytes), for diagnostics and tests."""
        try:
            stream = await self._host.new_stream(ID.from_base58(peer_id), [protocol.id])
        except Exception as exc:
            kind = ProtocolUnsupported if _refused(exc) else PeerUnreachable
            raise kind(f"cannot open {protocol.id} to {short(peer_id)}: {exc}") from exc
        try:
            yield stream
        finally:
            try:
                await stream.close()
            except Exception:
                pass

    async def request(
        self, peer_id: str, protocol: Protocol, message: Message, *, expect: type[M],
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> M:
        """Send one request and return the single reply, which must be an ``expect``.

        Raises:
            RemoteError: the peer answered with an error code.
            PeerUnreachable: dial or stream failure, or no reply within ``timeout``.
            RemoteProtocolError: the reply is not a valid message.
        """
        async with self.conversation(peer_id, protocol, message) as replies:
            reply = await replies.receive(timeout=timeout)
        if reply is None:
            raise PeerUnreachable(f"{short(peer_id)} closed the stream without a reply")
        if not isinstance(reply, expect):
            raise RemoteProtocolError(f"expected {expect.TAG!r}, got {reply.TAG!r}")
        return reply

    @asynccontextmanager
    async def conversation(self, peer_id: str, protocol: Protocol, message: Message) -> AsyncIterator[Replies]:
        """Send one request and hand back the stream's replies, for requests answered by several messages."""
        async with self.raw_stream(peer_id, protocol) as stream:
            replies = Replies(stream, protocol, peer_id)
            try:
                await write_frame(stream, protocol.encode(message))
            except Exception as exc:
                # The peer may have refused the request mid-write (e.g. over its frame cap): read its answer.
                with trio.move_on_after(2):
                    await replies.receive()
                raise PeerUnreachable(f"write to {short(peer_id)} failed: {exc}") from exc
            yield replies


class Replies:
    """The replies to one request, read one at a time."""

    def __init__(self, stream: object, protocol: Protocol, peer_id: str) -> None:
        self._stream, self._protocol, self._peer = stream, protocol, peer_id
        self._seen = 0

    async def receive(self, *, timeout: float = REQUEST_TIMEOUT_S) -> Message | None:
        """The next reply, or ``None`` once the peer has closed the stream after at least one reply.

        Raises:
            RemoteError, PeerUnreachable, RemoteProtocolError: as for :meth:`MeshHost.request`.
        """
        try:
            with trio.fail_after(timeout):
                raw = await read_frame(self._stream, cap=self._protocol.max_frame)  # type: ignore[arg-type]
        except trio.TooSlowError as exc:
            raise PeerUnreachable(f"no reply from {short(self._peer)} within {timeout:.0f} s") from exc
        except FrameTooLarge as exc:
            raise RemoteProtocolError(str(exc)) from exc
        except Exception as exc:  # FrameError, or libp2p's StreamEOF / StreamReset
            if self._seen:
                return None
            raise PeerUnreachable(f"stream to {short(self._peer)} broke: {exc}") from exc
        reply = self._protocol.decode(raw)
        self._seen += 1
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        return reply


@asynccontextmanager
async def open_host(identity: Identity, listen: list[str] | None = None) -> AsyncIterator[MeshHost]:
    """Start a libp2p host with ``identity`` listening on ``listen`` (default: loopback, a free port)."""
    _patch_streams()
    addrs = [multiaddr.Multiaddr(a) for a in (listen or [DEFAULT_LISTEN])]
    keypair = _libp2p_keypair(identity)
    host = new_host(
        key_pair=keypair,
        sec_opt={NOISE_ID: NoiseTransport(keypair, noise_privkey=create_x25519().private_key)},
        muxer_opt={YAMUX_ID: Yamux},
        listen_addrs=addrs,
        # One connection per peer: with the default of 3 every dial waits out a 250 ms happy-eyeballs timer.
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    try:
        async with host.run(addrs):
            try:
                yield MeshHost(identity, host)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await _close_connections(host)
    except BaseExceptionGroup as group:
        # py-libp2p runs the body inside its own nursery, so an error raised in the ``async with`` body (ours or the
        # caller's) arrives wrapped in one or two exception groups. When the group holds exactly one error, that
        # error is the whole story: raise it as itself, so callers can catch PeerUnreachable, RemoteError, ...
        inner = leaves(group)
        if len(inner) == 1 and isinstance(inner[0], Exception):
            raise inner[0] from None
        raise


async def _close_connections(host) -> None:
    """Close every connection and its socket before the host stops. py-libp2p 0.8.1's shutdown leaves accepted and
    dialled TCP sockets open in the process (measured: still ESTABLISHED after ``host.run`` exits), so a peer never
    sees them close; it keeps the dead connection and its next stream to our peer id (a scientist who joins again
    with the same identity from the same process) waits 10 s on it before failing."""
    network = host.get_network()
    for conns in list(network.connections.values()):
        for conn in list(conns):
            try:
                await conn.close()
            except Exception as exc:  # best effort: the host is going away either way
                logger.debug("closing a connection: %r", exc)
            raw = _raw_stream(conn)
            if raw is not None:
                try:
                    await raw.close()
                except Exception as exc:
                    logger.debug("closing a socket: %r", exc)


def _raw_stream(conn):
    """The trio stream under a swarm connection (muxer -> secure session -> raw connection), if it can be found."""
    node = getattr(conn, "muxed_conn", None)
    for attr in ("secured_conn", "conn", "stream"):
        nxt = getattr(node, attr, None)
        if nxt is None:
            continue
        node = nxt
    return node if node is not None and hasattr(node, "close") and node is not conn else None
