"""py-libp2p 0.8.1's streams, patched where every request pays.

A request between two daemons (``MeshHost.request``: a new stream, one frame each way) cost 12.3 ms of CPU on this
box, both sides together, for a few hundred bytes. py-spy put most of it in two places:

- **Yamux window updates.** py-libp2p sends a WINDOW_UPDATE frame after nearly every read, however small: the
  multistream-select messages are read a varint byte at a time, so opening a stream sent several 12-byte frames back,
  each one a Noise-encrypted write and a read on the other side (27% of the dialler's CPU). go-yamux, whose
  semantics py-libp2p's docstring claims, sends an update only once the bytes read and not yet credited reach half
  the receive window. :func:`apply` puts that rule back; a stream that is being read still credits its sender long
  before its window runs out, so nothing stalls.
- **multistream-select round trips.** The dialler writes ``/multistream/1.0.0``, waits for the echo, then writes the
  protocol and waits again. The spec lets the dialler send both at once (go-libp2p does); :func:`apply` makes the
  dialler write the header and its first choice in one write and then read both answers. A listener that refuses
  the first choice gets the rest one at a time, as before.
- **Window auto-tuning stuck at 256 KiB.** Every stream starts with a 256 KiB receive window, and py-libp2p doubles
  it (up to 16 MiB) when two updates come within four round-trip times, as go-yamux does, with the RTT of its Yamux
  pings (0.5 s after a connection opens, then every 30 s; 1 ms is assumed before the first). Between two Python peers
  the time from a write to the reader's credit is event-loop scheduling on both sides: milliseconds. Where the ping
  found both peers idle it measured 0.2-0.4 ms on loopback, and from then on no stream on that connection grew its
  window: they crawled at 25-40 MB/s instead of 150-280 (1-2 runs in 6 of ``bench/transfer.py``'s stream mode; where
  the ping caught the peers busy it measured 1.7-6.8 ms and windows grew). It decides the speed of the lane's stream
  fallback and of job frames. :func:`apply` gives the RTT used for auto-tuning a floor of ``AUTOTUNE_RTT_FLOOR`` (5
  ms). A window still grows only for a reader that keeps up, so a slow reader holds no more than before.
- **Reads from the socket.** Noise reads each message's 2-byte length and then its body, each a separate read on
  the TCP stream, so every frame cost two ``recv`` calls and two trips through trio. :func:`apply` gives py-libp2p's
  TCP stream a read-ahead buffer: a read takes up to 64 KiB from the socket and later reads are served from what is
  left. Every reader of the connection goes through that method, so none of them can see the difference.

:func:`apply` runs once per process before a host starts (``open_host``) and only on the pinned py-libp2p.
"""

from __future__ import annotations

import logging

from ._libp2p import is_pinned

__all__ = ["apply", "stats"]

logger = logging.getLogger(__name__)

READ_AHEAD = 64 << 10
AUTOTUNE_RTT_FLOOR = 0.005  # seconds: a write-to-credit cycle between two Python peers, not the wire's RTT
stats = {"window_updates_sent": 0, "window_updates_deferred": 0, "pipelined_selects": 0, "socket_reads": 0,
         "buffered_reads": 0}
_applied = False


def apply() -> bool:
    """Patch py-libp2p's Yamux window updates and auto-tuning, multistream-select dialler and TCP reads (once per
    process); returns whether the patches are in place."""
    global _applied
    if _applied:
        return True
    if not is_pinned("its streams (slower requests)"):
        return False
    from libp2p.protocol_muxer.multiselect_client import MultiselectClient
    from libp2p.io.trio import TrioTCPStream
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    YamuxStream._auto_tune_and_send_window_update = _window_update_at_half
    YamuxStream._effective_rtt = _rtt_with_floor(YamuxStream._effective_rtt)
    MultiselectClient.select_one_of = _pipelined_select(MultiselectClient.select_one_of)
    TrioTCPStream.read = _read_ahead
    _applied = True
    return True


async def _window_update_at_half(self, *, bytes_read: int = 0) -> None:
    """go-yamux's ``sendWindowUpdate``: credit the sender once what was read and not yet credited reaches the
    threshold (half the target window), growing the target as py-libp2p's auto-tuning does."""
    total = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta > 0 and delta >= self._grow_threshold():
            total = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
    if total > 0:
        stats["window_updates_sent"] += 1
        await self.send_window_update(total, skip_lock=True)
    elif bytes_read:
        stats["window_updates_deferred"] += 1


def _rtt_with_floor(original):
    def _effective_rtt(self) -> float:
        return max(original(self), AUTOTUNE_RTT_FLOOR)

    return _effective_rtt


async def _read_ahead(self, n: int | None = None) -> bytes:
    """``TrioTCPStream.read`` (up to ``n`` bytes; b"" at EOF or once closed here) served from a read-ahead buffer."""
    import trio
    from libp2p.io.exceptions import ConnectionClosedError

    async with self.read_lock:
        if n is not None and n == 0:
            return b""
        held = self.__dict__.get("_read_ahead")
        if held:
            stats["buffered_reads"] += 1
            if n is None or n >= len(held):
                self._read_ahead = None
                return bytes(held)
            out = bytes(held[:n])
            del held[:n]
            return out
        try:
            data = await self.stream.receive_some(max(n or 0, READ_AHEAD))
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        except trio.ClosedResourceError:
            return b""
        stats["socket_reads"] += 1
        if n is None or len(data) <= n:
            return data
        self._read_ahead = bytearray(data[n:])
        return data[:n]


def _pipelined_select(original):
    from libp2p.protocol_muxer.exceptions import (
        MultiselectClientError, MultiselectCommunicatorError, ProtocolNotSupportedError,
    )
    from libp2p.protocol_muxer.multiselect_client import (
        DEFAULT_NEGOTIATE_TIMEOUT, MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG,
    )
    from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
    from libp2p.utils import encode_delim

    async def select_one_of(self, protocols, communicator, negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT):
        import trio
        from libp2p.io.exceptions import IOException

        protocols = list(protocols)
        if not protocols or type(communicator) is not MultiselectCommunicator:
            return await original(self, protocols, communicator, negotiate_timeout)
        first = protocols[0]
        with trio.move_on_after(negotiate_timeout):
            try:
                await communicator.read_writer.write(encode_delim(MULTISELECT_PROTOCOL_ID.encode())
                                                     + encode_delim(str(first).encode()))
            except (IOException, AssertionError, ValueError) as error:
                raise MultiselectClientError(f"handshake write failed: {error}") from error
            stats["pipelined_selects"] += 1
            try:
                handshake = await communicator.read()
            except MultiselectCommunicatorError as error:
                raise MultiselectClientError(f"handshake read failed: {error}") from error
            if handshake != MULTISELECT_PROTOCOL_ID:
                raise MultiselectClientError(f"multiselect protocol ID mismatch: expected {MULTISELECT_PROTOCOL_ID}, "
                                             f"got {handshake!r}")
            try:
                response = await communicator.read()
            except MultiselectCommunicatorError as error:
                raise MultiselectClientError(f"protocol read failed: {error}, protocol={first}") from error
            if response == str(first):
                return first
            if response != PROTOCOL_NOT_FOUND_MSG:
                raise MultiselectClientError(f"unrecognized response: {response!r}, expected {str(first)!r} or "
                                             f"{PROTOCOL_NOT_FOUND_MSG!r}, protocol={first}")
            refused = [f"protocol not supported: {first}, response={response!r}"]
            for protocol in protocols[1:]:
                try:
                    return await self.try_select(communicator, protocol)
                except ProtocolNotSupportedError as error:
                    refused.append(str(error))
            raise MultiselectClientError(f"protocols not supported: tried {protocols}, timeout={negotiate_timeout}s. "
                                         f"Last error: {refused[-1]}")
        raise MultiselectClientError(f"response timed out after {negotiate_timeout}s, protocols tried: {protocols}")

    select_one_of.__wrapped__ = original  # type: ignore[attr-defined]
    return select_one_of
