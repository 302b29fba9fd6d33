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

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from hivecell.crypto.identity import Identity

from .frame import FrameError, FrameTooLarge, read_frame, write_frame
from .message import ErrorCode, ErrorReply, Message, Protocol, RemoteProtocolError

__all__ = ["MeshHost", "open_host", "RemoteError", "PeerUnreachable", "Reply", "Replies", "short"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
REQUEST_TIMEOUT_S = 30.0


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

    def __init__(self, identity: Identity, host) -> None:
        self.identity = identity
        self._host = host

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def addrs(self) -> list[str]:
        """Listen addresses, each ending in ``/p2p/<peer id>``."""
        return [str(a) for a in self._host.get_addrs()]

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
                    with trio.fail_after(REQUEST_TIMEOUT_S):
                        raw = await read_frame(stream, cap=protocol.max_frame)
                    message = protocol.decode(raw)
                except FrameTooLarge as exc:
                    logger.info("peer %s: %s on %s", short(peer), exc, protocol.id)
                    await reply.send(ErrorReply(code=ErrorCode.FRAME_TOO_LARGE, message=f"cap is {exc.cap} bytes"))
                    return
                except RemoteProtocolError as exc:
                    logger.info("peer %s: bad message on %s: %s", short(peer), protocol.id, exc)
                    await reply.send(ErrorReply(code=ErrorCode.BAD_MESSAGE, message=str(exc)[:200]))
                    return
                try:
                    await handler(peer, message, reply)
                except RemoteError as exc:
                    await reply.send(ErrorReply(code=exc.code, message=exc.message[:500]))
            except (FrameError, trio.TooSlowError) as exc:
                logger.debug("peer %s: stream on %s ended: %s", short(peer), protocol.id, exc)
            except Exception:
                # A bug of ours or a broken stream: log it here, never let it reach libp2p (pitfall 1b).
                logger.exception("handler for %s failed (peer %s)", protocol.id, short(peer))
                try:
                    await Reply(stream, protocol).send(ErrorReply(code=ErrorCode.INTERNAL))
                except Exception:
                    pass
            finally:
                try:
                    await stream.close()
                except Exception:
                    pass

        self._host.set_stream_handler(protocol.id, guarded)

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
            raise PeerUnreachable(f"cannot open {protocol.id} to {short(peer_id)}: {exc}") from exc
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
    async with host.run(addrs):
        yield MeshHost(identity, host)
