"""The bulk lane: certificates bound to peer ids (pure), then real hosts on loopback: transfers over the lane and the
libp2p stream, fallback, limits, stalls, and the refusal of lane connections whose certificate does not bind the
expected peer id."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import hivecell.mesh.lane as lane_module
import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivecell.crypto.identity import Identity
from hivecell.mesh.host import MeshHost, open_host
from hivecell.mesh.lane import (
    LANE_PROTOCOL,
    PREAMBLE_MAGIC,
    SIGNING_PREFIX,
    BlobChunk,
    BlobCorrupt,
    BlobHeader,
    BlobTooLarge,
    BlobUnavailable,
    Download,
    Lane,
    LaneAuthError,
    LaneBusy,
    LaneConfig,
    LaneCredentials,
    LaneFetch,
    LaneTicket,
    LaneTimeout,
    LaneUnavailable,
    build_certificate,
    decode_signed_key,
    encode_signed_key,
    make_context,
    make_credentials,
    open_lane,
    verify_lane_cert,
)
from hivecell.mesh.message import RemoteProtocolError

PB_ED25519 = b"\x08\x01\x12\x20"


# -- certificates (no I/O) -------------------------------------------------------------------------------------------
def _pem(cert, key) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def forged_credentials(claimed: Identity, signer: Identity, **kwargs) -> LaneCredentials:
    """A certificate whose extension names ``claimed``'s key but whose signature was made by ``signer``'s key."""
    key = Ed25519PrivateKey.generate()
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    signed_key = encode_signed_key(PB_ED25519 + claimed.public_key, signer.sign(SIGNING_PREFIX + spki))
    cert = build_certificate(key, signed_key, **kwargs)
    return LaneCredentials(claimed.peer_id, cert.public_bytes(serialization.Encoding.DER), _pem(cert, key))


def test_credentials_bind_their_identity():
    me = Identity.generate()
    verify_lane_cert(make_credentials(me).cert_der, me.peer_id)


def test_valid_certificate_of_another_peer_is_refused():
    x, y = Identity.generate(), Identity.generate()
    with pytest.raises(LaneAuthError, match="another peer id"):
        verify_lane_cert(make_credentials(x).cert_der, y.peer_id)


def test_certificate_signed_by_another_identity_key_is_refused():
    y, z = Identity.generate(), Identity.generate()
    with pytest.raises(LaneAuthError):
        verify_lane_cert(forged_credentials(claimed=y, signer=z).cert_der, y.peer_id)
    verify_lane_cert(forged_credentials(claimed=y, signer=y).cert_der, y.peer_id)  # the same path, honestly signed


def test_certificate_without_extension_or_expired_or_garbage_is_refused():
    me = Identity.generate()
    key = Ed25519PrivateKey.generate()
    bare = build_certificate(key, b"\x30\x00").public_bytes(serialization.Encoding.DER)  # an empty SignedKey
    with pytest.raises(LaneAuthError):
        verify_lane_cert(bare, me.peer_id)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    old = make_credentials(me, now=past, lifetime=datetime.timedelta(days=1))
    with pytest.raises(LaneAuthError, match="expired"):
        verify_lane_cert(old.cert_der, me.peer_id)
    verify_lane_cert(old.cert_der, me.peer_id, now=past)
    good = make_credentials(me).cert_der
    for garbage in (b"", os.urandom(300), good[:-1], good[:100], good + b"\x00"):
        with pytest.raises(LaneAuthError):
            verify_lane_cert(garbage, me.peer_id)


def test_certificate_with_ecdsa_p256_key_is_accepted():
    me = Identity.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = build_certificate(key, encode_signed_key(PB_ED25519 + me.public_key, me.sign(SIGNING_PREFIX + spki)))
    verify_lane_cert(cert.public_bytes(serialization.Encoding.DER), me.peer_id)


def test_signed_key_der_round_trip_and_strictness():
    pk, sig = PB_ED25519 + bytes(32), bytes(range(64))
    der = encode_signed_key(pk, sig)
    assert decode_signed_key(der) == (pk, sig)
    long_sig = bytes(200)  # a long-form length
    assert decode_signed_key(encode_signed_key(pk, long_sig)) == (pk, long_sig)
    for bad in (der + b"\x00", der[:-1], b"\x31" + der[1:], b"\x30\x81\x05" + der[2:], b""):
        with pytest.raises(ValueError):
            decode_signed_key(bad)


@pytest.mark.parametrize("message", [
    LaneFetch(sha256=bytes(32)), LaneFetch(sha256=bytes(range(32)), cert=b"c" * 400, max_size=10**9),
    LaneFetch(sha256=bytes(32), abandon=bytes(16)),
    LaneTicket(token=bytes(16), host="127.0.0.1", port=4001, cert=b"c" * 300, size=10**9),
    LaneTicket(token=bytes(16), host="", port=1, cert=b"", size=0),
    BlobHeader(size=0), BlobHeader(size=400 * 10**6), BlobChunk(data=b""), BlobChunk(data=os.urandom(1 << 20)),
])
def test_message_round_trip(message):
    assert LANE_PROTOCOL.decode(LANE_PROTOCOL.encode(message)) == message


@pytest.mark.parametrize("fields", [
    {"t": "fetch", "sha256": bytes(31)}, {"t": "fetch", "sha256": "00" * 32}, {"t": "fetch", "sha256": bytes(32),
                                                                              "cert": bytes(5000)},
    {"t": "ticket", "token": bytes(15), "host": "", "port": 1, "cert": b"", "size": 1},
    {"t": "ticket", "token": bytes(16), "host": "", "port": 0, "cert": b"", "size": 1},
    {"t": "ticket", "token": bytes(16), "host": "", "port": 1, "cert": b"", "size": -1},
    {"t": "fetch", "sha256": bytes(32), "abandon": bytes(3)}, {"t": "fetch", "sha256": bytes(32), "max_size": -1},
    {"t": "blob", "size": -5}, {"t": "chunk", "data": "text"}, {"t": "nope"},
])
def test_bad_messages_are_remote_protocol_errors(fields):
    from hivecell.crypto.canonical import canonical_packb

    with pytest.raises(RemoteProtocolError):
        LANE_PROTOCOL.decode(canonical_packb(fields))


# -- real hosts on loopback -------------------------------------------------------------------------------------------
@dataclass
class Pair:
    holder: MeshHost
    fetcher: MeshHost
    hl: Lane  # the holder's lane
    fl: Lane  # the fetcher's lane


@asynccontextmanager
async def pair(holder_config: LaneConfig | None = None, fetcher_config: LaneConfig | None = None, *,
               holder_credentials: LaneCredentials | None = None,
               fetcher_credentials: LaneCredentials | None = None):
    async with open_host(Identity.generate()) as holder, open_host(Identity.generate()) as fetcher:
        await fetcher.connect(holder.addrs()[0])
        async with open_lane(holder, holder_config, credentials=holder_credentials) as hl, \
                open_lane(fetcher, fetcher_config, credentials=fetcher_credentials) as fl:
            yield Pair(holder, fetcher, hl, fl)


async def until(lane: Lane, predicate, timeout: float = 10.0) -> None:
    """Wait for ``predicate`` over the lane's counters, woken by each change."""
    with trio.fail_after(timeout):
        while not predicate():
            await lane.changed()


async def ask_ticket(p: Pair, sha256: str, credentials: LaneCredentials) -> LaneTicket:
    return await p.fetcher.request(p.holder.peer_id, LANE_PROTOCOL,
                                   LaneFetch(sha256=bytes.fromhex(sha256), cert=credentials.cert_der),
                                   expect=LaneTicket)


def connect_with(credentials: LaneCredentials, p: Pair, token: bytes, download: Download) -> None:
    """Run the fetcher's side of a lane connection with ``credentials`` (blocking; for a worker thread)."""
    ctx = make_context(False, credentials, p.hl.credentials.cert_der)
    lane_module._fetch_blocking(ctx, ("127.0.0.1", p.hl.port), lane_module._Abort(), token=token,
                                pinned=p.hl.credentials.cert_der, peer_id=p.holder.peer_id, download=download,
                                idle_timeout=5.0)


def download_of(sha256: str, size: int) -> Download:
    download = Download(sha256)
    download._prepare(size)
    return download


async def test_fetch_over_the_lane_and_the_stream():
    blob = os.urandom(3_000_001)
    async with pair() as p:
        sha = await p.hl.offer(blob)
        assert sha == __import__("hashlib").sha256(blob).hexdigest()
        assert await p.fl.fetch(p.holder.peer_id, sha, via="lane") == blob
        assert await p.fl.fetch(p.holder.peer_id, sha, via="stream") == blob
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob  # auto: the lane
        buffer = bytearray(4_000_000)
        assert await p.fl.fetch_into(p.holder.peer_id, bytes.fromhex(sha), buffer) == len(blob)
        assert buffer[:len(blob)] == blob
        await until(p.hl, lambda: p.hl.stats["lane_served"] == 3)
        assert p.fl.stats["lane_fetched"] == 3 and p.fl.stats["stream_fetched"] == 1
        assert p.fl.stats["fallbacks"] == 0 and p.hl.stats["bytes_sent_lane"] == 3 * len(blob)
        empty = await p.hl.offer(b"")
        assert await p.fl.fetch(p.holder.peer_id, empty) == b""
        array = np.arange(100_000, dtype=np.float32).reshape(100, 1000)
        assert await p.fl.fetch(p.holder.peer_id, await p.hl.offer(array)) == array.tobytes()


async def test_unknown_or_not_offered_to_us_is_unavailable():
    async with pair() as p:
        secret = await p.hl.offer(b"for someone else", to=[Identity.generate().peer_id])
        for via in ("lane", "stream"):
            with pytest.raises(BlobUnavailable):
                await p.fl.fetch(p.holder.peer_id, "ab" * 32, via=via)
            with pytest.raises(BlobUnavailable):
                await p.fl.fetch(p.holder.peer_id, secret, via=via)
        ours = await p.hl.offer(b"for the fetcher", to=[p.fetcher.peer_id])
        assert await p.fl.fetch(p.holder.peer_id, ours) == b"for the fetcher"
        assert p.hl.withdraw(ours) and not p.hl.withdraw(ours)
        with pytest.raises(BlobUnavailable):
            await p.fl.fetch(p.holder.peer_id, ours)


async def test_falls_back_to_the_stream_when_the_holder_has_no_lane(caplog):
    blob = os.urandom(1_500_000)
    with caplog.at_level(logging.INFO, logger="hivecell.mesh.lane"):
        async with pair(LaneConfig(lane=False)) as p:
            sha = await p.hl.offer(blob)
            assert await p.fl.fetch(p.holder.peer_id, sha) == blob
            assert p.fl.stats["fallbacks"] == 1 and p.fl.stats["stream_fetched"] == 1
            with pytest.raises(LaneUnavailable):
                await p.fl.fetch(p.holder.peer_id, sha, via="lane")
    assert any("fetching" in r.getMessage() and "libp2p stream" in r.getMessage() for r in caplog.records)


async def test_falls_back_to_the_stream_when_the_lane_cannot_be_dialled():
    blob = os.urandom(1_000_000)
    async with pair() as p:
        sha = await p.hl.offer(blob)
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            p.hl.port = probe.getsockname()[1]
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob
        assert p.fl.stats["fallbacks"] == 1 and p.fl.stats["lane_fetched"] == 0
        with pytest.raises(LaneUnavailable, match="lane transfer failed"):
            await p.fl.fetch(p.holder.peer_id, sha, via="lane")


async def test_ticket_may_only_name_an_address_the_peer_is_known_at():
    async with pair() as p:
        with pytest.raises(LaneUnavailable):
            p.fl._dial_address(p.holder.peer_id, "10.9.8.7", 4001)
        assert p.fl._dial_address(p.holder.peer_id, "127.0.0.1", 4001) == ("127.0.0.1", 4001)
        assert p.fl._dial_address(p.holder.peer_id, "", 4001) == ("127.0.0.1", 4001)


async def test_size_caps_are_checked_before_anything_is_read():
    blob = os.urandom(2_000_000)
    async with pair(fetcher_config=LaneConfig(max_blob=1_000_000)) as p:
        sha = await p.hl.offer(blob)
        for via in ("lane", "stream"):
            with pytest.raises(BlobTooLarge):
                await p.fl.fetch(p.holder.peer_id, sha, via=via)
        with pytest.raises(BlobTooLarge):
            await p.fl.fetch_into(p.holder.peer_id, sha, bytearray(100))
        # The holder refused each request from the size announced in it: no ticket, no byte, no slot held.
        assert not p.hl._tickets and not p.hl._serving
        assert p.hl.stats["lane_served"] == 0 and p.hl.stats["bytes_sent_stream"] == 0


async def test_blob_that_does_not_match_its_hash_is_refused():
    blob = bytearray(os.urandom(2_000_000))
    async with pair() as p:
        sha = await p.hl.offer(blob)
        blob[1_234_567] ^= 1  # the holder's memory changes under the offer
        for via in ("lane", "stream"):
            with pytest.raises(BlobCorrupt):
                await p.fl.fetch(p.holder.peer_id, sha, via=via)
        await until(p.hl, lambda: p.hl.stats["lane_failed"] == 1)  # the receiver answered "bad" to the holder
        assert p.fl.stats["corrupt"] == 2


# -- refusal: certificates that do not bind the expected peer id ------------------------------------------------------
@pytest.mark.parametrize("kind", ["cert_of_other_peer", "signed_by_other_key"])
async def test_holder_refuses_a_fetcher_certificate_not_bound_to_the_fetcher(kind):
    blob = os.urandom(1_000_000)
    async with pair() as p:
        p.fl.credentials = (make_credentials(Identity.generate()) if kind == "cert_of_other_peer"
                            else forged_credentials(claimed=p.fetcher.identity, signer=Identity.generate()))
        sha = await p.hl.offer(blob)
        with pytest.raises(LaneAuthError):
            await p.fl.fetch(p.holder.peer_id, sha, via="lane")
        assert p.hl.stats["refused_cert"] == 1 and not p.hl._tickets and p.hl.stats["lane_served"] == 0
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob  # auto: refused on the lane, served on the stream
        assert p.fl.stats["fallbacks"] == 1 and p.fl.stats["stream_fetched"] == 1


@pytest.mark.parametrize("kind", ["cert_of_other_peer", "signed_by_other_key"])
async def test_fetcher_refuses_a_holder_certificate_not_bound_to_the_holder(kind):
    blob = os.urandom(1_000_000)
    holder_identity = Identity.generate()
    creds = (make_credentials(Identity.generate()) if kind == "cert_of_other_peer"
             else forged_credentials(claimed=holder_identity, signer=Identity.generate()))
    async with open_host(holder_identity) as holder, open_host(Identity.generate()) as fetcher:
        await fetcher.connect(holder.addrs()[0])
        # One transfer per peer: the fallback only fits because it gives the refused ticket back.
        async with open_lane(holder, LaneConfig(max_per_peer=1), credentials=creds) as hl, open_lane(fetcher) as fl:
            sha = await hl.offer(blob)
            with pytest.raises(LaneAuthError):
                await fl.fetch(holder.peer_id, sha, via="lane")
            assert fl.stats["refused_cert"] == 1
            assert hl.stats["lane_served"] == 0 and hl.stats["bad_token"] == 0  # never dialled
            with pytest.raises(LaneBusy):  # the ticket of the refused attempt is still held
                await fl.fetch(holder.peer_id, sha, via="stream")
            hl._sweep()
            for ticket in hl._tickets.values():
                ticket.deadline = 0
            hl._sweep()
            assert await fl.fetch(holder.peer_id, sha) == blob
            assert fl.stats["fallbacks"] == 1 and hl.stats["stream_served"] == 1 and not hl._tickets


async def test_tls_refuses_a_valid_certificate_of_peer_x_where_peer_y_was_expected():
    """Peer Y got a ticket; peer X (a valid lane certificate of its own) connects with Y's token. OpenSSL refuses it:
    the only certificate the holder trusts for that ticket is Y's."""
    blob = os.urandom(8_000_000)
    x = make_credentials(Identity.generate())
    async with pair() as p:
        sha = await p.hl.offer(blob)
        ticket = await ask_ticket(p, sha, p.fl.credentials)
        download = download_of(sha, len(blob))
        with pytest.raises(OSError) as failure:
            await trio.to_thread.run_sync(connect_with, x, p, ticket.token, download)
        assert isinstance(failure.value, (ssl.SSLError, ConnectionError)) and download.received == 0
        await until(p.hl, lambda: p.hl.stats["refused_tls"] == 1)
        assert p.hl.stats["bytes_sent_lane"] == 0 and p.hl.stats["lane_served"] == 0
        assert not p.hl._serving  # the slot is free again
        # The ticket was spent; Y itself fetches with a new one.
        assert await p.fl.fetch(p.holder.peer_id, sha, via="lane") == blob


async def test_lane_connection_refused_when_pinned_certificate_does_not_bind_the_ticket_peer():
    """The check after the handshake, alone: a ticket for peer Y pins X's valid certificate (as a flawed negotiation
    might). OpenSSL accepts X's handshake; the binding check refuses the connection before any blob byte is sent."""
    blob = os.urandom(8_000_000)
    x = make_credentials(Identity.generate())
    async with pair() as p:
        sha = await p.hl.offer(blob)
        token = os.urandom(16)
        p.hl._tickets[token] = lane_module._Ticket(p.fetcher.peer_id, x.cert_der, p.hl._offers[bytes.fromhex(sha)],
                                                   trio.current_time() + 10)
        p.hl._serving[p.fetcher.peer_id] += 1
        download = download_of(sha, len(blob))
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(connect_with, x, p, token, download)
        assert download.received == 0
        await until(p.hl, lambda: p.hl.stats["refused_tls"] == 1)
        assert p.hl.stats["bytes_sent_lane"] == 0 and not p.hl._serving


async def test_unknown_and_spent_tokens_are_refused():
    blob = os.urandom(100_000)
    async with pair() as p:
        sha = await p.hl.offer(blob)

        def unknown_token() -> bytes:
            with socket.create_connection(("127.0.0.1", p.hl.port), timeout=5) as raw:
                raw.sendall(PREAMBLE_MAGIC + os.urandom(16))
                return raw.recv(1)

        assert await trio.to_thread.run_sync(unknown_token) == b""  # closed without a TLS handshake
        await until(p.hl, lambda: p.hl.stats["bad_token"] == 1)
        ticket = await ask_ticket(p, sha, p.fl.credentials)
        download = download_of(sha, len(blob))
        await trio.to_thread.run_sync(connect_with, p.fl.credentials, p, ticket.token, download)
        assert download.result() == blob
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(connect_with, p.fl.credentials, p, ticket.token, download_of(sha, len(blob)))
        await until(p.hl, lambda: p.hl.stats["bad_token"] == 2)


# -- back-pressure and limits ------------------------------------------------------------------------------------------
async def test_holder_caps_transfers_per_peer_and_unused_tickets_expire():
    blob = os.urandom(100_000)
    async with pair(LaneConfig(max_per_peer=1, ticket_ttl=0.5)) as p:
        sha = await p.hl.offer(blob)
        await ask_ticket(p, sha, p.fl.credentials)  # taken, never used
        for via in ("lane", "stream"):
            with pytest.raises(LaneBusy):
                await p.fl.fetch(p.holder.peer_id, sha, via=via)
        assert p.hl.stats["busy"] == 2
        await until(p.hl, lambda: p.hl.stats["tickets_expired"] == 1)
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob


async def test_stalled_receiver_is_cut_off():
    blob = os.urandom(64_000_000)  # far more than the loopback socket buffers hold
    release = threading.Event()
    async with pair(LaneConfig(idle_timeout=0.5)) as p:
        sha = await p.hl.offer(blob)
        ticket = await ask_ticket(p, sha, p.fl.credentials)

        def connect_and_stall() -> None:
            ctx = make_context(False, p.fl.credentials, p.hl.credentials.cert_der)
            with socket.create_connection(("127.0.0.1", p.hl.port)) as sock:
                sock.sendall(PREAMBLE_MAGIC + ticket.token)
                with ctx.wrap_socket(sock) as tls:
                    tls.recv(1)  # handshake done, one byte read, then nothing
                    release.wait(10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, connect_and_stall)
            started = trio.current_time()
            await until(p.hl, lambda: p.hl.stats["stalled"] == 1)
            assert trio.current_time() - started < 5
            assert not p.hl._serving
            release.set()


async def test_stalled_holder_is_cut_off(monkeypatch):
    blob = os.urandom(4_000_000)

    def stall_after_one_mib(ctx, sock, abort, *, pinned, peer_id, view, digest, offset, idle_timeout):
        abort.attach(sock)
        try:
            sock.settimeout(5)
            tls = ctx.wrap_socket(sock, server_side=True)
            abort.attach(tls)
            tls.sendall(lane_module._HEADER.pack(lane_module._BLOB_MAGIC, len(view), offset, digest) +
                        view[offset:offset + (1 << 20)])
            try:
                tls.recv(1)  # nothing comes: returns when the fetcher gives up and closes
            except OSError:
                pass
            return 0
        finally:
            abort.close()

    monkeypatch.setattr(lane_module, "_serve_blocking", stall_after_one_mib)
    async with pair(LaneConfig(max_per_peer=4), LaneConfig(idle_timeout=0.5)) as p:
        sha = await p.hl.offer(blob)
        started = time.monotonic()
        with pytest.raises(LaneUnavailable, match="timed out"):
            await p.fl.fetch(p.holder.peer_id, sha, via="lane")
        assert time.monotonic() - started < 3
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob  # auto: the lane stalls, the stream serves
        assert p.fl.stats["fallbacks"] == 1


async def test_fetch_timeout_and_cancellation_stop_the_transfer_thread(monkeypatch):
    blob = os.urandom(4_000_000)
    release = threading.Event()

    def stall(ctx, sock, abort, **kwargs):
        abort.attach(sock)
        try:
            sock.settimeout(5)
            tls = ctx.wrap_socket(sock, server_side=True)
            abort.attach(tls)
            release.wait(10)
            return 0
        finally:
            abort.close()

    monkeypatch.setattr(lane_module, "_serve_blocking", stall)
    async with pair(fetcher_config=LaneConfig(idle_timeout=30)) as p:
        sha = await p.hl.offer(blob)
        with pytest.raises(LaneTimeout):
            await p.fl.fetch(p.holder.peer_id, sha, via="lane", timeout=0.5)
        with trio.move_on_after(0.5) as scope:
            await p.fl.fetch(p.holder.peer_id, sha, via="lane")
        assert scope.cancelled_caught
        # The abandoned threads were woken by the socket shutdown, not by the 30 s idle timeout.
        with trio.fail_after(3):
            while p.fl._threads.borrowed_tokens:
                await trio.sleep(0.05)
        release.set()


# -- resume and dedup (hivecell.mesh.blob) ---------------------------------------------------------------------------
def break_first_connection_at_half(monkeypatch) -> dict[str, int]:
    """The holder's first lane connection sends the header and half the blob, then drops; later ones are honest."""
    real = lane_module._serve_blocking
    seen = {"connections": 0, "bytes_sent_by_broken": 0}

    def serve(ctx, sock, abort, *, pinned, peer_id, view, digest, offset, idle_timeout):
        seen["connections"] += 1
        if seen["connections"] > 1:
            return real(ctx, sock, abort, pinned=pinned, peer_id=peer_id, view=view, digest=digest, offset=offset,
                        idle_timeout=idle_timeout)
        abort.attach(sock)
        try:
            sock.settimeout(5)
            tls = ctx.wrap_socket(sock, server_side=True)
            abort.attach(tls)
            half = len(view) // 2
            tls.sendall(lane_module._HEADER.pack(lane_module._BLOB_MAGIC, len(view), offset, digest))
            tls.sendall(view[offset:half])
            seen["bytes_sent_by_broken"] = half - offset
            raise ConnectionResetError("dropped on purpose")
        finally:
            abort.close()

    monkeypatch.setattr(lane_module, "_serve_blocking", serve)
    return seen


async def test_interrupted_lane_transfer_resumes_with_only_the_missing_bytes(monkeypatch):
    blob = os.urandom(10_000_000)
    seen = break_first_connection_at_half(monkeypatch)
    async with pair() as p:
        sha = await p.hl.offer(blob)
        download = Download(sha)
        with pytest.raises(LaneUnavailable, match="after 5000000 of 10000000"):
            await p.fl.fetch_download(p.holder.peer_id, download, via="lane")
        assert download.received == 5_000_000 == seen["bytes_sent_by_broken"]
        await p.fl.fetch_download(p.holder.peer_id, download, via="lane")
        assert download.result() == blob
        await until(p.hl, lambda: p.hl.stats["lane_served"] == 1)
        assert p.hl.stats["bytes_sent_lane"] == 5_000_000  # the second connection carried only the rest
        assert p.fl.stats["bytes_received_lane"] == 10_000_000


async def test_lane_broken_mid_way_is_resumed_on_the_stream(monkeypatch):
    blob = os.urandom(6_000_000)
    break_first_connection_at_half(monkeypatch)
    async with pair() as p:
        sha = await p.hl.offer(blob)
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob
        assert p.fl.stats["fallbacks"] == 1 and p.hl.stats["bytes_sent_stream"] == 3_000_000


async def test_fetch_blob_retries_resumes_and_dedups(monkeypatch):
    from hivecell.mesh.blob import BlobCache, fetch_blob

    blob = os.urandom(8_000_000)
    seen = break_first_connection_at_half(monkeypatch)
    cache = BlobCache(max_bytes=20_000_000)
    async with pair() as p:
        sha = await p.hl.offer(blob)
        assert await fetch_blob(p.fl, p.holder.peer_id, sha, cache=cache, via="lane", backoff=0.01) == blob
        assert seen["connections"] == 2 and sha in cache
        await until(p.hl, lambda: p.hl.stats["lane_served"] == 1)
        assert p.hl.stats["bytes_sent_lane"] == 4_000_000
        # A node that has the blob is not sent it again: no request reaches the holder.
        assert await fetch_blob(p.fl, p.holder.peer_id, sha, cache=cache) == blob
        assert seen["connections"] == 2 and cache.stats["hits"] == 1
        assert p.hl.stats["bytes_sent_lane"] == 4_000_000 and p.hl.stats["bytes_sent_stream"] == 0
        with pytest.raises(BlobUnavailable):  # not worth retrying
            await fetch_blob(p.fl, p.holder.peer_id, "cd" * 32, cache=cache, backoff=10)


async def test_blob_cache_is_bounded():
    from hivecell.mesh.blob import BlobCache

    cache = BlobCache(max_bytes=250)
    a = await cache.add(b"a" * 100)
    b = await cache.add(b"b" * 100)
    assert cache.get(a) is not None  # a is now the most recently used
    c = await cache.add(b"c" * 100)
    assert a in cache and c in cache and b not in cache and cache.size == 200
    await cache.add(b"x" * 300)  # larger than the cache: not kept
    assert len(cache) == 2


async def test_shared_offers_union_their_peers_and_end_with_the_last_hold():
    """A round's global model held for several nodes at once is one offer to all of them; each release narrows it to
    the peers still holding it, and the last one withdraws it."""
    from hivecell.mesh.blob import SharedOffers

    blob = os.urandom(200_000)
    other = Identity.generate().peer_id
    async with pair() as p:
        offers = SharedOffers(p.hl)
        sha = await offers.hold(blob, p.fetcher.peer_id)
        assert sha == __import__("hashlib").sha256(blob).hexdigest()
        assert await offers.hold(blob, other, sha256=sha) == sha and len(offers) == 1
        assert await offers.hold(blob, p.fetcher.peer_id, sha256=sha) == sha  # a second hold by the same peer
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob
        offers.release(sha, p.fetcher.peer_id)  # one of the fetcher's two holds: still offered to it
        assert await p.fl.fetch(p.holder.peer_id, sha) == blob
        offers.release(sha, p.fetcher.peer_id)  # narrowed to `other`: no longer to the fetcher
        with pytest.raises(BlobUnavailable):
            await p.fl.fetch(p.holder.peer_id, sha)
        assert p.hl.offered() == [sha]
        offers.release(sha, other)
        offers.release(sha, other)  # a release too many is ignored
        assert p.hl.offered() == [] and len(offers) == 0
        async with offers.holding(blob, p.fetcher.peer_id) as held:
            assert await p.fl.fetch(p.holder.peer_id, held) == blob
        assert p.hl.offered() == []
        with pytest.raises(RuntimeError):
            offers.release_later(sha, other, 1.0)  # no nursery given
        async with trio.open_nursery() as nursery:
            timed = SharedOffers(p.hl, nursery)
            await timed.hold(blob, p.fetcher.peer_id)
            timed.release_later(sha, p.fetcher.peer_id, 0.2)
            assert p.hl.offered() == [sha]
        assert p.hl.offered() == []
