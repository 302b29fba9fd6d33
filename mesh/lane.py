"""The bulk lane: large blobs between two peers over a direct TLS 1.3 connection bound to their libp2p identities.

Theory of operation
-------------------
One py-libp2p stream (TCP + Noise + Yamux, all in Python) carried 45-70 MB/s on loopback in earlier measurements
(shared/notes/py-libp2p-0.8.1.md, section 2) and 180-250 MB/s on the box of 2026-11-25 (150-260 without ``_streams``'
patches), at 7-9 CPU-s per GB for both sides together; plain TCP carries 2,500-3,500 MB/s there. Models and updates therefore travel on a *lane*: a TCP connection
of their own, secured with TLS 1.3 from Python's :mod:`ssl` (OpenSSL does the records and the AEAD in C), one blob per
connection, no multiplexer, read straight into the receiver's buffer.

Transfers are **pulled**: a node serves only the blobs it has registered with :meth:`Lane.offer` (optionally only to
some peers), and a node receives only what it asked for with :meth:`Lane.fetch`. Nobody can push bytes into a daemon
that did not expect them, and a scientist's laptop behind a NAT can still pull results from a node it dialled.

1. The fetcher asks the holder on the libp2p protocol ``/hivecell/lane/1.0.0`` (Noise-authenticated, so each side
   knows the other's peer id): :class:`LaneFetch` (blob sha256, the fetcher's lane certificate, the largest size it
   takes, the offset to start from).
2. The holder checks the blob is offered to that peer and not larger than the fetcher takes, that its per-peer and
   total transfer caps have room, and that the certificate *binds the fetcher's peer id* (below). It answers
   :class:`LaneTicket`: a one-time 16-byte token (valid ``ticket_ttl`` seconds), its lane address, its own lane
   certificate and the blob's size.
3. The fetcher checks the size against its cap and that the holder's certificate binds the *holder's* peer id, dials
   the address, sends ``b"HCLANE1\\n" + token`` in clear (it only selects the ticket, like SNI would) and runs a TLS 1.3
   handshake as client, both sides requiring a certificate (mutual TLS).
4. Each side trusts exactly one certificate, the one the other side sent over libp2p in steps 1-2 (a self-signed
   certificate is its own trust anchor), so OpenSSL refuses any other certificate in the handshake. After the
   handshake each side checks again that the certificate presented is the pinned one and that it binds the expected
   peer id. A TLS handshake proves possession of the certificate's key; the binding proves the certificate speaks for
   the peer id.
5. The holder sends a 56-byte header (magic, size, offset, sha256) and the blob from the offset, in 4 MiB writes that
   OpenSSL cuts into 16 KiB records (TLS's largest). The fetcher reads the socket 256 KiB at a time, has OpenSSL
   decrypt from memory (:class:`_MemoryTLS`) into a buffer of the announced size (never more), hashes it in a second
   thread while it arrives, and answers one byte: ``1`` (hash matched) or ``0``.

A :class:`Download` keeps what arrived when a connection breaks, with the running sha256 of it; the next attempt
(over the lane or the stream, which also serves from an offset) asks only for the rest. ``hivecell.mesh.blob`` adds
retries and a local cache on top.

When no lane can be had (the holder runs without one, the dial or handshake fails, a certificate does not bind), the
fetch falls back to the libp2p stream, logged at INFO: the same request without a certificate is answered on the
stream itself with :class:`BlobHeader` and 1 MiB :class:`BlobChunk` messages. The blob's sha256 is checked either way.

Certificates follow the libp2p TLS handshake spec (libp2p/specs ``tls/tls.md``): an ephemeral Ed25519 key per node
process, a self-signed certificate carrying the extension 1.3.6.1.4.1.53594.1.1 whose value is
``SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }``, ``publicKey`` being the protobuf-encoded
libp2p identity key and ``signature`` the identity key's signature over ``b"libp2p-tls-handshake:"`` + the DER
SubjectPublicKeyInfo of the certificate key. The spec lets the extension be marked critical or not; we mark it
non-critical because OpenSSL, which verifies the chain here, would refuse a critical extension it does not know. We
require it ourselves.

Limits: a fetch allocates at most ``max_blob`` bytes, after the announced size was checked; at most ``max_transfers``
fetches run at once (so a receiver holds at most ``max_transfers * max_blob`` bytes of blobs) and at most
``max_per_peer`` from one peer; a holder serves at most ``max_transfers`` transfers and ``max_per_peer`` per peer
(tickets not yet used count) and answers ``busy`` past that. Every blocking socket call has ``idle_timeout`` (a
receive returns what the socket has, at most 256 KiB; a send is one 4 MiB piece): a peer that stops moving bytes is
cut off and its slot freed. Sockets run in worker threads: measured here, receiving over trio's ``SSLStream`` cost ~5
CPU-s/GB against ~1.2 for a blocking ``ssl.SSLSocket`` in a thread (both without hashing). When the calling task is
cancelled the socket is shut down from the trio side, so the thread ends at once.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import queue
import secrets
import socket
import ssl
import struct
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID
from hivecell.crypto.identity import (
    Identity,
    IdentityError,
    PublicIdentity,
    peer_id_from_public_key,
)

from .host import MeshHost, PeerUnreachable, RemoteError, Reply, short
from .message import ErrorCode, Message, Protocol, RemoteProtocolError

__all__ = [
    "LANE_PROTOCOL",
    "BlobChunk",
    "BlobCorrupt",
    "BlobHeader",
    "BlobTooLarge",
    "BlobUnavailable",
    "Download",
    "Lane",
    "LaneAuthError",
    "LaneBusy",
    "LaneConfig",
    "LaneCredentials",
    "LaneError",
    "LaneFetch",
    "LaneTicket",
    "LaneTimeout",
    "LaneUnavailable",
    "build_certificate",
    "decode_signed_key",
    "encode_signed_key",
    "make_context",
    "make_credentials",
    "open_lane",
    "lane_listen_host",
    "verify_lane_cert",
]

logger = logging.getLogger(__name__)

LIBP2P_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
SIGNING_PREFIX = b"libp2p-tls-handshake:"
_PB_ED25519 = b"\x08\x01\x12\x20"  # protobuf PublicKey{Type: Ed25519, Data: 32 bytes} (libp2p peer-ids spec)
CERT_LIFETIME = datetime.timedelta(days=30)
CERT_BACKDATE = datetime.timedelta(hours=1)  # tolerate clocks a little behind ours
MAX_CERT_BYTES = 4096

PREAMBLE_MAGIC = b"HCLANE1\n"
TOKEN_BYTES = 16
_PREAMBLE_SIZE = len(PREAMBLE_MAGIC) + TOKEN_BYTES
_BLOB_MAGIC = b"HCBLOB1\n"
_HEADER = struct.Struct(">8sQQ32s")  # magic, blob size, offset of the first byte sent, sha256
ACK_OK, ACK_BAD = b"\x01", b"\x00"

SEND_CHUNK = 4 << 20  # one sendall per 4 MiB: the idle timeout bounds each (ssl's timeout covers a whole call)
RECV_CHUNK = 256 << 10  # the fetcher's socket reads: up to 16 TLS records at a time, decrypted from memory
HASH_STEP = 1 << 20  # the receiver hashes in 1 MiB steps, in a thread of its own, while the rest arrives
STREAM_CHUNK = 1 << 20  # libp2p fallback: one BlobChunk message per MiB
MAX_LANE_FRAME = STREAM_CHUNK + 4096

TOO_LARGE = "too_large"  # larger than the asker's max_size
UNKNOWN_BLOB = "unknown_blob"  # not offered, or not to you: the same answer, so a peer learns nothing it may not
LANE_UNAVAILABLE = "lane_unavailable"  # this node runs without a lane: use the stream


# -- errors -------------------------------------------------------------------------------------------------------
class LaneError(Exception):
    """A blob could not be fetched."""


class LaneAuthError(LaneError):
    """A lane certificate does not bind the expected peer id, or the TLS peer is not the one pinned."""


class LaneBusy(LaneError):
    """The holder has no free transfer slot for us; retry later."""


class BlobUnavailable(LaneError):
    """The peer does not offer this blob (to us)."""


class BlobTooLarge(LaneError):
    """The announced size exceeds ``max_blob`` or the caller's buffer; nothing was read."""


class BlobCorrupt(LaneError):
    """The bytes received do not match the sha256 asked for (or more were sent than announced)."""


class LaneTimeout(LaneError):
    """The fetch did not finish within the caller's ``timeout``."""


class LaneUnavailable(LaneError):
    """The lane could not be used for this transfer (no listener, dial or handshake failed, transfer broke); the
    libp2p stream may still work. Raised only with ``via="lane"``; ``"auto"`` falls back."""


# -- wire messages (/hivecell/lane/1.0.0) --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LaneFetch(Message):
    """Ask for a blob. With ``cert`` (the asker's lane certificate) the answer is a :class:`LaneTicket`; without, the
    blob comes on this stream (:class:`BlobHeader`, then :class:`BlobChunk` messages)."""

    TAG: ClassVar[str] = "fetch"
    sha256: bytes
    cert: bytes = b""
    max_size: int = 0  # the largest blob the asker takes (0: no limit); a larger one is refused before any ticket
    abandon: bytes = b""  # token of a ticket of ours that we will not use: free its slot first
    offset: int = 0  # send from this byte on: the asker has the bytes before it (a resumed transfer)

    def __post_init__(self) -> None:
        if len(self.sha256) != 32:
            raise ValueError("sha256 must be 32 bytes")
        if len(self.cert) > MAX_CERT_BYTES:
            raise ValueError("certificate too large")
        if self.max_size < 0 or self.offset < 0 or len(self.abandon) not in (0, TOKEN_BYTES):
            raise ValueError("bad max_size, offset or abandon token")


@dataclass(frozen=True, kw_only=True)
class LaneTicket(Message):
    """Where and how to collect the blob: dial ``host:port`` (``host`` empty: the address you reach us at), send the
    preamble with ``token``, expect ``cert`` in the TLS handshake and ``size`` bytes."""

    TAG: ClassVar[str] = "ticket"
    token: bytes
    host: str
    port: int
    cert: bytes
    size: int

    def __post_init__(self) -> None:
        if len(self.token) != TOKEN_BYTES:
            raise ValueError("token must be 16 bytes")
        if not 0 < self.port < 65536:
            raise ValueError("port out of range")
        if len(self.host) > 255 or len(self.cert) > MAX_CERT_BYTES:
            raise ValueError("host or certificate too long")
        if self.size < 0:
            raise ValueError("negative size")


@dataclass(frozen=True, kw_only=True)
class BlobHeader(Message):
    """Stream fallback: bytes ``offset`` to ``size`` of the blob follow in :class:`BlobChunk` messages."""

    TAG: ClassVar[str] = "blob"
    size: int  # of the whole blob
    offset: int = 0  # of the first byte that follows

    def __post_init__(self) -> None:
        if self.size < 0 or not 0 <= self.offset <= self.size:
            raise ValueError("bad size or offset")


@dataclass(frozen=True, kw_only=True)
class BlobChunk(Message):
    TAG: ClassVar[str] = "chunk"
    data: bytes


LANE_PROTOCOL = Protocol("/hivecell/lane/1.0.0", LaneFetch, LaneTicket, BlobHeader, BlobChunk, max_frame=MAX_LANE_FRAME)


# -- certificates (pure: no I/O) -----------------------------------------------------------------------------------
def _der_tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_read(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    """One DER element of ``tag`` at ``pos``: (content, position after it). Strict: minimal lengths, in bounds."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError("unexpected DER tag")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 3 or pos + count > len(data) or data[pos] == 0:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        if length < 0x80:
            raise ValueError("non-minimal DER length")
        pos += count
    if pos + length > len(data):
        raise ValueError("DER element runs past the end")
    return data[pos:pos + length], pos + length


def encode_signed_key(public_key: bytes, signature: bytes) -> bytes:
    """DER of ``SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }``."""
    return _der_tlv(0x30, _der_tlv(0x04, public_key) + _der_tlv(0x04, signature))


def decode_signed_key(der: bytes) -> tuple[bytes, bytes]:
    """(publicKey, signature) from a SignedKey.

    Raises:
        ValueError: the bytes are not exactly one SignedKey.
    """
    body, end = _der_read(der, 0, 0x30)
    if end != len(der):
        raise ValueError("trailing bytes after SignedKey")
    public_key, pos = _der_read(body, 0, 0x04)
    signature, pos = _der_read(body, pos, 0x04)
    if pos != len(body):
        raise ValueError("trailing bytes inside SignedKey")
    return public_key, signature


@dataclass(frozen=True)
class LaneCredentials:
    """A node's lane certificate (DER) and the PEM of that certificate and its private key, for :mod:`ssl`."""

    peer_id: str
    cert_der: bytes
    chain_pem: bytes = field(repr=False)


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def build_certificate(cert_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, extension_value: bytes, *,
                      now: datetime.datetime | None = None,
                      lifetime: datetime.timedelta = CERT_LIFETIME) -> x509.Certificate:
    """A self-signed certificate of ``cert_key`` carrying ``extension_value`` as the libp2p public key extension.

    Normally called through :func:`make_credentials`; tests build forged certificates with it.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hivecell-lane")])
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(name)
               .public_key(cert_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - CERT_BACKDATE)
               .not_valid_after(now + lifetime)
               .add_extension(x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, extension_value), critical=False))
    algorithm = None if isinstance(cert_key, Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(cert_key, algorithm)


def make_credentials(identity: Identity, *, now: datetime.datetime | None = None,
                     lifetime: datetime.timedelta = CERT_LIFETIME) -> LaneCredentials:
    """A fresh Ed25519 lane key and a certificate binding it to ``identity`` (libp2p TLS handshake spec)."""
    cert_key = Ed25519PrivateKey.generate()
    signature = identity.sign(SIGNING_PREFIX + _spki(cert_key.public_key()))
    cert = build_certificate(cert_key, encode_signed_key(_PB_ED25519 + identity.public_key, signature), now=now,
                             lifetime=lifetime)
    key_pem = cert_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    return LaneCredentials(identity.peer_id, cert.public_bytes(serialization.Encoding.DER),
                           cert.public_bytes(serialization.Encoding.PEM) + key_pem)


def verify_lane_cert(unverified_der: bytes, expected_peer_id: str, *, now: datetime.datetime | None = None) -> None:
    """Return nothing if the certificate is a valid lane certificate bound to ``expected_peer_id``.

    Checks, as the libp2p TLS spec asks: within its validity period, self-signed with a valid signature, an Ed25519 or
    ECDSA P-256 key, no critical extension we do not know, and the libp2p extension present, holding an Ed25519
    identity key whose peer id is ``expected_peer_id`` and whose signature over the certificate key verifies.

    Raises:
        LaneAuthError: any check failed (one error type whatever failed; the message is for local logs only).
    """
    try:
        cert = x509.load_der_x509_certificate(bytes(unverified_der))
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise LaneAuthError("certificate expired or not yet valid")
        key = cert.public_key()
        if not (isinstance(key, Ed25519PublicKey) or
                (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1))):
            raise LaneAuthError("certificate key is not Ed25519 or ECDSA P-256")
        cert.verify_directly_issued_by(cert)
        extension_value = None
        for ext in cert.extensions:
            if ext.oid == LIBP2P_EXTENSION_OID:
                extension_value = ext.value.value
            elif ext.critical:
                raise LaneAuthError("certificate has a critical extension we do not understand")
        if extension_value is None:
            raise LaneAuthError("certificate lacks the libp2p public key extension")
        public_key, signature = decode_signed_key(extension_value)
        if len(public_key) != 36 or not public_key.startswith(_PB_ED25519):
            raise LaneAuthError("identity key in the certificate is not Ed25519")
        if peer_id_from_public_key(public_key[4:]) != expected_peer_id:
            raise LaneAuthError("certificate is bound to another peer id")
        PublicIdentity(public_key[4:]).verify(signature, SIGNING_PREFIX + _spki(key))
    except LaneAuthError:
        raise
    except (ValueError, TypeError, InvalidSignature, IdentityError, x509.ExtensionNotFound) as exc:
        raise LaneAuthError(f"invalid lane certificate: {type(exc).__name__}") from exc


# -- TLS contexts ------------------------------------------------------------------------------------------------
def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes) -> None:
    """``load_cert_chain`` takes only paths: hand it an anonymous in-memory file where Linux has one, else a file in a
    private temporary folder removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("hivecell-lane", getattr(os, "MFD_CLOEXEC", 0))
        try:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(chain_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except FileNotFoundError:  # no /proc
            pass
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="hivecell-lane-") as folder:
        path = os.path.join(folder, "lane.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as fh:
            fh.write(chain_pem)
        ctx.load_cert_chain(path)


def make_context(server_side: bool, credentials: LaneCredentials, peer_cert_der: bytes) -> ssl.SSLContext:
    """A TLS 1.3-only context presenting ``credentials`` and trusting only ``peer_cert_der`` (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the peer is named by the pinned certificate and its libp2p binding, not a hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bytes(peer_cert_der))
    _load_chain(ctx, credentials.chain_pem)
    if server_side:
        ctx.num_tickets = 0  # one blob per connection: session tickets would never be used
    return ctx


def _check_peer(tls: ssl.SSLSocket | ssl.SSLObject, pinned_der: bytes, peer_id: str) -> None:
    presented = tls.getpeercert(binary_form=True)
    if presented is None or not hmac.compare_digest(presented, pinned_der):
        raise LaneAuthError("TLS peer presented another certificate than the pinned one")
    verify_lane_cert(presented, peer_id)


# -- blocking socket work (runs in worker threads) -------------------------------------------------------------------
class _Abort:
    """Lets the trio side stop a blocking socket that a worker thread is using (shutdown wakes any blocked call)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._aborted:
                self._shutdown(sock)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                self._shutdown(self._sock)

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket call: SSLSocket's own also drops state
        except OSError:
            pass


def _tune(sock: socket.socket, idle_timeout: float) -> None:
    sock.settimeout(idle_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _MemoryTLS:
    """The client end of TLS over a blocking socket, through memory BIOs: the socket is read ``RECV_CHUNK`` bytes at
    a time and OpenSSL decrypts from memory.

    An ``ssl.SSLSocket`` reads each record with two ``recv`` calls (its 5-byte header, then the body): 131,072 calls
    and as many GIL round trips per GB, beside the thread that hashes. Measured here, 400 MB blobs, two runs of
    ``python bench/transfer.py --sizes 400 --repeats 5 --modes tcp,lane`` each way: 644-729 MB/s and 1.46-1.69
    CPU-s/GB on the receiver with ``SSLSocket``, 778-807 MB/s and 1.31-1.34 CPU-s/GB this way. The holder keeps
    ``SSLSocket``: memory BIOs measured no better there (one more copy of every byte).

    Same calls as the socket it replaces (``recv_into``, ``sendall``); errors are ``OSError`` subclasses alike:
    ``ssl.SSLError``, the socket's timeout, ``ConnectionError`` when the peer closes.
    """

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket) -> None:
        self._sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._incoming, self._outgoing, server_side=False)
        self._view = memoryview(bytearray(RECV_CHUNK))

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._sock.sendall(self._outgoing.read())

    def _fill(self) -> None:
        self._flush()  # whatever OpenSSL has to say first (handshake messages, a KeyUpdate's answer)
        n = self._sock.recv_into(self._view)
        if not n:
            raise ConnectionError("the peer closed the connection")
        self._incoming.write(self._view[:n])

    def do_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._fill()
        self._flush()

    def recv_into(self, buffer: memoryview, nbytes: int) -> int:
        """Up to ``nbytes`` of plaintext (one TLS record at most) into ``buffer``; 0 once the peer ended TLS."""
        while True:
            try:
                return self.tls.read(nbytes, buffer)
            except ssl.SSLWantReadError:
                self._fill()

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()


def _recv_exactly(sock: socket.socket | _MemoryTLS, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


class _Hasher:
    """sha256 of a buffer being filled, computed by a thread of its own as the data arrives (hashlib releases the GIL),
    so that hashing overlaps receiving instead of following it."""

    def __init__(self, view: memoryview, running: hashlib._Hash, start: int) -> None:
        self._view, self._fed, self._stopped = view, start, False
        self._hash = running  # sha256 of view[:start] so far; updated in place
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hivecell-lane-sha256", daemon=True)

    def start(self) -> _Hasher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while (span := self._queue.get()) is not None:
            self._hash.update(self._view[span[0]:span[1]])

    def feed(self, upto: int, *, final: bool = False) -> None:
        if upto - self._fed >= HASH_STEP or (final and upto > self._fed):
            self._queue.put((self._fed, upto))
            self._fed = upto

    def finish(self, upto: int) -> None:
        """Hash up to ``upto``, stop the thread and wait for it. Call exactly once after :meth:`start`."""
        if not self._stopped:
            self._stopped = True
            self.feed(upto, final=True)
            self._queue.put(None)
            self._thread.join()


class Download:
    """A blob being fetched: where its bytes go, how many have arrived, and the sha256 of the prefix hashed so far.

    :meth:`Lane.fetch` and :meth:`Lane.fetch_into` make one per call. Keep one yourself and hand it to
    :meth:`Lane.fetch_download` again after a failure: the next attempt asks the holder only for the bytes that are
    missing, over the lane or the stream (see ``hivecell.mesh.blob`` for a retrying fetch). Over both transports
    the bytes that arrive are authenticated as the holder's (TLS or Noise), so a prefix that arrived is kept; whether
    the holder sent the blob it was asked for is known only when the last byte is hashed.
    """

    def __init__(self, sha256: str | bytes, buffer=None) -> None:
        self.digest = _digest(sha256)
        self.size: int | None = None
        self.received = 0  # bytes at the start of ``view`` that arrived
        self.hashed = 0  # of which ``running`` has hashed this many
        self.running = hashlib.sha256()
        self.view: memoryview | None = None
        self._buffer: bytearray | None = None
        self._given = None
        if buffer is not None:
            self._given = _byte_view(buffer)
            if self._given.readonly:
                raise TypeError("buffer must be writable")
        self.tainted = False  # an abandoned thread may still write: start again from nothing

    def limit(self, max_blob: int) -> int:
        return min(max_blob, len(self._given)) if self._given is not None else max_blob

    def _prepare(self, size: int) -> None:
        """Bind to the size a holder announced; a different size for the same sha256 starts over."""
        if self.tainted or (self.size is not None and self.size != size):
            self.reset()
        if self.size is None:
            self.size = size
            if self._given is not None:
                self.view = self._given[:size]
            else:
                self._buffer = bytearray(size)
                self.view = memoryview(self._buffer)

    def reset(self) -> None:
        self.size, self.received, self.hashed, self.running = None, 0, 0, hashlib.sha256()
        self.view, self._buffer, self.tainted = None, None, False

    def complete(self) -> bool:
        """Whether every byte arrived, was hashed, and the sha256 matches."""
        return (self.size is not None and self.hashed == self.received == self.size and
                hmac.compare_digest(self.running.copy().digest(), self.digest))

    def result(self) -> bytearray | memoryview:
        """The blob: the bytearray made for it, or the caller's buffer cut to its size."""
        if not self.complete():
            raise LaneError("download not complete")
        return self._buffer if self._buffer is not None else self.view  # type: ignore[return-value]


def _serve_blocking(ctx: ssl.SSLContext, sock: socket.socket, abort: _Abort, *, pinned: bytes, peer_id: str,
                    view: memoryview, digest: bytes, offset: int, idle_timeout: float) -> int:
    """Holder side of one lane connection: handshake, check the peer, send the header and the blob from ``offset``,
    wait for the ack. Returns the number of blob bytes sent."""
    abort.attach(sock)
    try:
        _tune(sock, idle_timeout)
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        abort.attach(tls)
        tls.do_handshake()
        _check_peer(tls, pinned, peer_id)
        size = len(view)
        tls.sendall(_HEADER.pack(_BLOB_MAGIC, size, offset, digest))
        for start in range(offset, size, SEND_CHUNK):
            tls.sendall(view[start:start + SEND_CHUNK])
        if _recv_exactly(tls, 1) != ACK_OK:
            raise BlobCorrupt("the receiver's hash did not match")
        return size - offset
    finally:
        abort.close()


def _fetch_blocking(ctx: ssl.SSLContext, address: tuple[str, int], abort: _Abort, *, token: bytes, pinned: bytes,
                    peer_id: str, download: Download, idle_timeout: float) -> None:
    """Fetcher side of one lane connection: dial, preamble, handshake, check the peer, then read the rest of
    ``download`` (from ``download.received``), hashing behind the data; on any exit ``download`` records what
    arrived, so that a later attempt resumes there."""
    sock = socket.create_connection(address, timeout=idle_timeout)
    abort.attach(sock)
    try:
        _tune(sock, idle_timeout)
        sock.sendall(PREAMBLE_MAGIC + token)
        tls = _MemoryTLS(ctx, sock)
        tls.do_handshake()
        _check_peer(tls.tls, pinned, peer_id)
        magic, size, offset, announced = _HEADER.unpack(_recv_exactly(tls, _HEADER.size))
        if (magic != _BLOB_MAGIC or size != download.size or offset != download.received
                or announced != download.digest):
            raise BlobCorrupt("lane header does not match the ticket")
        out, got = download.view, offset
        hasher = _Hasher(out, download.running, download.hashed).start()
        try:
            hasher.feed(got, final=True)  # bytes an earlier attempt received but did not hash
            while got < size:
                k = tls.recv_into(out[got:], min(size - got, RECV_CHUNK))
                if not k:
                    raise ConnectionError(f"lane closed after {got} of {size} bytes")
                got += k
                hasher.feed(got)
        finally:
            hasher.finish(got)  # hashes the tail and joins the thread, whatever happened
            download.received = download.hashed = got
        if not download.complete():
            tls.sendall(ACK_BAD)
            raise BlobCorrupt("sha256 of the blob received does not match")
        tls.sendall(ACK_OK)
    finally:
        abort.close()


def _sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


def _catch_up(download: Download) -> None:
    """Hash what arrived but was not hashed yet (blocking: for a worker thread)."""
    if download.view is not None and download.hashed < download.received:
        download.running.update(download.view[download.hashed:download.received])
        download.hashed = download.received


def _digest(sha256: str | bytes) -> bytes:
    if isinstance(sha256, str):
        try:
            raw = bytes.fromhex(sha256)
        except ValueError as exc:
            raise ValueError("sha256 must be 64 hex digits") from exc
    else:
        raw = bytes(sha256)
    if len(raw) != 32:
        raise ValueError("sha256 must be 32 bytes (64 hex digits)")
    return raw


def _byte_view(blob) -> memoryview:
    view = memoryview(blob)
    if not view.c_contiguous:
        raise ValueError("a blob must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# -- the I/O shell ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LaneConfig:
    """Settings of a node's lane. ``listen_host`` is where the TLS listener binds (loopback unless told otherwise)."""

    listen_host: str = "127.0.0.1"
    port: int = 0
    lane: bool = True  # False: no TLS listener; blobs go over libp2p streams only
    max_blob: int = 2 << 30  # the largest blob this node fetches
    max_transfers: int = 4  # fetches at once, and transfers served at once
    max_per_peer: int = 2  # of those, with one peer
    idle_timeout: float = 10.0  # a peer that moves no byte for this long is cut off
    ticket_ttl: float = 10.0  # a ticket not used within this is dropped


@dataclass
class _Offer:
    view: memoryview
    digest: bytes
    to: frozenset[str] | None


@dataclass
class _Ticket:
    peer: str
    cert: bytes
    offer: _Offer
    deadline: float
    offset: int = 0


class Lane:
    """A node's bulk lane: serves the blobs it offers, fetches blobs from others. Create with :func:`open_lane`.

    ``stats`` counts what happened (``lane_served``, ``lane_fetched``, ``stream_served``, ``stream_fetched``,
    ``fallbacks``, ``refused_cert``, ``refused_tls``, ``bad_token``, ``busy``, ``stalled``, ``bytes_sent_lane``, ...).
    """

    def __init__(self, host: MeshHost, config: LaneConfig, credentials: LaneCredentials) -> None:
        self.host, self.config, self.credentials = host, config, credentials
        self.stats: Counter[str] = Counter()
        self.port: int | None = None
        self._closed = False
        self._offers: dict[bytes, _Offer] = {}
        self._tickets: dict[bytes, _Ticket] = {}
        self._serving: Counter[str] = Counter()  # per peer: tickets outstanding + transfers running
        self._fetching = trio.CapacityLimiter(config.max_transfers)
        self._fetching_from: dict[str, trio.CapacityLimiter] = {}
        self._threads = trio.CapacityLimiter(2 * config.max_transfers + 2)
        self._contexts: OrderedDict[tuple[bool, bytes], ssl.SSLContext] = OrderedDict()
        self._connections = 0
        self._changed = trio.Event()

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def changed(self) -> None:
        """Wait until a counter in ``stats`` changes (for tests and monitors)."""
        await self._changed.wait()

    # -- offering ---------------------------------------------------------------------------------------------------
    async def offer(self, blob, *, to: Iterable[str] | None = None, sha256: str | bytes | None = None) -> str:
        """Serve ``blob`` (bytes-like, kept by reference: do not change it while offered) to the peers ``to`` (any peer
        when ``None``) and return its sha256 in hex. Hashing a large blob runs in a thread (a checkpoint); a caller
        that has just hashed it may pass ``sha256`` (a wrong one only makes fetchers fail: they check the bytes).
        Offering a blob again replaces the earlier offer (and its ``to``)."""
        view = _byte_view(blob)
        if sha256 is not None:
            digest = _digest(sha256)
        else:
            digest = await trio.to_thread.run_sync(_sha256, view) if view.nbytes > 1 << 20 else _sha256(view)
        self.offer_hashed(view, digest, to=to)
        return digest.hex()

    def offer_hashed(self, blob, sha256: str | bytes, *, to: Iterable[str] | None = None) -> None:
        """:meth:`offer` of a blob whose sha256 the caller knows (no hashing, no checkpoint)."""
        digest = _digest(sha256)
        self._offers[digest] = _Offer(_byte_view(blob), digest, frozenset(to) if to is not None else None)

    def withdraw(self, sha256: str | bytes) -> bool:
        """Stop serving a blob (transfers already running finish). Returns whether it was offered."""
        return self._offers.pop(_digest(sha256), None) is not None

    def offered(self) -> list[str]:
        return [d.hex() for d in self._offers]

    # -- fetching ---------------------------------------------------------------------------------------------------
    async def fetch(self, peer_id: str, sha256: str | bytes, *, timeout: float | None = None,
                    via: str = "auto") -> bytearray:
        """Fetch a blob that ``peer_id`` offers and return it (a new bytearray, already checked against ``sha256``).

        ``via``: ``"auto"`` (the lane, else the libp2p stream, logged; a lane that breaks mid-way is resumed on the
        stream), ``"lane"`` or ``"stream"`` only.

        Raises:
            BlobUnavailable: the peer does not offer it to us.
            BlobTooLarge: it is larger than ``max_blob``.
            BlobCorrupt: what arrived does not hash to ``sha256``.
            LaneBusy: the peer has no transfer slot free for us.
            LaneAuthError: with ``via="lane"``, a certificate did not bind the expected peer id.
            LaneUnavailable: with ``via="lane"``, the lane could not be used.
            LaneTimeout: not done within ``timeout`` seconds.
            LaneError: any other failure (peer unreachable, stream broken or stalled).
        """
        download = Download(sha256)
        await self.fetch_download(peer_id, download, timeout=timeout, via=via)
        return download.result()  # type: ignore[return-value]

    async def fetch_into(self, peer_id: str, sha256: str | bytes, buffer, *, timeout: float | None = None,
                         via: str = "auto") -> int:
        """Like :meth:`fetch`, into the start of the writable ``buffer``; returns the blob's size. On failure the
        buffer holds partial, unchecked bytes.

        Raises:
            BlobTooLarge: the blob does not fit in ``buffer`` (nothing was read); otherwise as :meth:`fetch`.
        """
        download = Download(sha256, buffer)
        await self.fetch_download(peer_id, download, timeout=timeout, via=via)
        return download.size  # type: ignore[return-value]

    async def fetch_download(self, peer_id: str, download: Download, *, timeout: float | None = None,
                             via: str = "auto") -> None:
        """Fetch what ``download`` still lacks from ``peer_id``; on return ``download.result()`` is the blob.

        After a failure, ``download`` keeps the bytes that arrived: calling again asks only for the rest. Raises as
        :meth:`fetch`; after :class:`BlobCorrupt` the download starts over.
        """
        if via not in ("auto", "lane", "stream"):
            raise ValueError("via must be 'auto', 'lane' or 'stream'")
        if download.complete():
            return
        if via == "lane" and not self.config.lane:
            raise LaneUnavailable("this node runs without a lane")
        try:
            with trio.fail_after(timeout) if timeout is not None else nullcontext():
                async with self._fetch_slot(peer_id):
                    abandon = b""
                    if via != "stream" and self.config.lane:
                        try:
                            await self._fetch_lane(peer_id, download)
                            return
                        except (LaneUnavailable, LaneAuthError) as exc:
                            if via == "lane":
                                raise
                            abandon = getattr(exc, "ticket_token", b"")
                            self._count("fallbacks")
                            logger.info("bulk lane to %s unavailable (%s); fetching %s over the libp2p stream from "
                                        "byte %d", short(peer_id), exc, download.digest.hex()[:12], download.received)
                    await self._fetch_stream(peer_id, download, abandon)
        except BlobCorrupt:
            download.reset()
            raise
        except trio.TooSlowError as exc:
            raise LaneTimeout(f"fetch of {download.digest.hex()[:12]} from {short(peer_id)} took over {timeout} s"
                              ) from exc

    @asynccontextmanager
    async def _fetch_slot(self, peer_id: str) -> AsyncIterator[None]:
        limiter = self._fetching_from.get(peer_id)
        if limiter is None:
            limiter = self._fetching_from[peer_id] = trio.CapacityLimiter(self.config.max_per_peer)
        try:
            async with limiter, self._fetching:
                yield
        finally:
            if limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
                self._fetching_from.pop(peer_id, None)

    def _remote_error(self, exc: RemoteError, peer_id: str, digest: bytes) -> LaneError:
        if exc.code == UNKNOWN_BLOB:
            return BlobUnavailable(f"{short(peer_id)} does not offer {digest.hex()[:12]}")
        if exc.code == ErrorCode.BUSY:
            return LaneBusy(f"{short(peer_id)} is busy")
        if exc.code == TOO_LARGE:
            return BlobTooLarge(f"{short(peer_id)}: {digest.hex()[:12]} is larger than we take")
        if exc.code == ErrorCode.FORBIDDEN:
            return LaneAuthError(f"{short(peer_id)} refused our lane certificate")
        if exc.code in (LANE_UNAVAILABLE, ErrorCode.NOT_READY):
            return LaneUnavailable(f"{short(peer_id)} has no lane")
        return LaneError(f"{short(peer_id)} answered {exc.code}")

    def _check_size(self, download: Download, size: int) -> None:
        limit = download.limit(self.config.max_blob)
        if size > limit:
            raise BlobTooLarge(f"blob of {size} bytes exceeds our limit of {limit}")
        download._prepare(size)

    async def _fetch_lane(self, peer_id: str, download: Download) -> None:
        digest = download.digest
        request = LaneFetch(sha256=digest, cert=self.credentials.cert_der,
                            max_size=max(download.limit(self.config.max_blob), 1),
                            offset=0 if download.tainted else download.received)
        try:
            ticket = await self.host.request(peer_id, LANE_PROTOCOL, request, expect=LaneTicket,
                                             timeout=self.config.idle_timeout)
        except RemoteError as exc:
            raise self._remote_error(exc, peer_id, digest) from exc
        except (PeerUnreachable, RemoteProtocolError) as exc:
            raise LaneError(f"lane request to {short(peer_id)} failed: {exc}") from exc
        try:
            self._check_size(download, ticket.size)
            if request.offset > ticket.size:
                raise BlobCorrupt("holder announced fewer bytes than we already have")
            try:
                verify_lane_cert(ticket.cert, peer_id)
            except LaneAuthError:
                self._count("refused_cert")
                raise
            address = self._dial_address(peer_id, ticket.host, ticket.port)
        except LaneError as exc:
            exc.ticket_token = ticket.token  # type: ignore[attr-defined]  # unused: a fallback frees its slot
            raise
        ctx = self._context(False, ticket.cert)
        abort = _Abort()
        start = download.received
        job = partial(_fetch_blocking, ctx, address, abort, token=ticket.token, pinned=ticket.cert, peer_id=peer_id,
                      download=download, idle_timeout=self.config.idle_timeout)
        try:
            await self._in_thread(job, abort, download)
        except BlobCorrupt:
            self._count("corrupt")
            raise
        except LaneAuthError:
            self._count("refused_tls")
            raise
        except OSError as exc:  # ssl.SSLError, timeouts, resets: the lane failed, the stream may not
            self._count("bytes_received_lane", download.received - start)
            failure = LaneUnavailable(f"lane transfer failed after {download.received} of {download.size} bytes: "
                                      f"{exc!r}")
            failure.ticket_token = ticket.token  # type: ignore[attr-defined]  # spent if the holder saw it; else freed
            raise failure from exc
        self._count("lane_fetched")
        self._count("bytes_received_lane", download.received - start)

    async def _fetch_stream(self, peer_id: str, download: Download, abandon: bytes = b"") -> None:
        idle = self.config.idle_timeout
        if download.tainted:
            download.reset()
        offset = download.received
        request = LaneFetch(sha256=download.digest, max_size=max(download.limit(self.config.max_blob), 1),
                            abandon=abandon, offset=offset)
        try:
            async with self.host.conversation(peer_id, LANE_PROTOCOL, request) as replies:
                head = await replies.receive(timeout=idle)
                if not isinstance(head, BlobHeader):
                    raise LaneError(f"{short(peer_id)} answered {getattr(head, 'TAG', None)!r}, not a blob")
                self._check_size(download, head.size)
                if head.offset != offset:
                    raise BlobCorrupt("holder answered from another offset")
                out = download.view
                assert out is not None
                while download.received < head.size:
                    chunk = await replies.receive(timeout=idle)
                    if not isinstance(chunk, BlobChunk):
                        raise LaneError(f"stream from {short(peer_id)} ended after {download.received} of "
                                        f"{head.size} bytes")
                    got, n = download.received, len(chunk.data)
                    if got + n > head.size:
                        raise BlobCorrupt("more bytes than announced")
                    out[got:got + n] = chunk.data
                    download.received = got + n
        except RemoteError as exc:
            raise self._remote_error(exc, peer_id, download.digest) from exc
        except (PeerUnreachable, RemoteProtocolError) as exc:
            raise LaneError(f"stream fetch from {short(peer_id)} failed: {exc}") from exc
        finally:
            self._count("bytes_received_stream", download.received - offset)
        await trio.to_thread.run_sync(_catch_up, download)
        if not download.complete():
            self._count("corrupt")
            raise BlobCorrupt("sha256 of the blob received does not match")
        self._count("stream_fetched")

    def _dial_address(self, peer_id: str, host: str, port: int) -> tuple[str, int]:
        """Where to dial the peer's lane. A ticket may only name an address the peer is known at (its libp2p
        addresses), so that a peer cannot make us connect elsewhere; an empty or wildcard host means "there"."""
        known = self._known_ips(peer_id)
        wildcard = not host or host in ("0.0.0.0", "::")
        if wildcard:
            if not known:
                raise LaneUnavailable("no address known for the peer")
            return known[0], port
        try:
            canonical = str(ipaddress.ip_address(host))
        except ValueError as exc:
            raise LaneUnavailable("ticket host is not an IP address") from exc
        if known and canonical not in known:
            raise LaneUnavailable(f"ticket names {canonical}, where the peer is not known to be")
        return canonical, port

    def _known_ips(self, peer_id: str) -> list[str]:
        from libp2p.peer.id import ID

        ips: list[str] = []
        try:
            for addr in self.host.libp2p.get_peerstore().addrs(ID.from_base58(peer_id)):
                for proto in ("ip4", "ip6"):
                    try:
                        ip = str(ipaddress.ip_address(addr.value_for_protocol(proto)))
                    except Exception:
                        continue
                    if ip not in ips:
                        ips.append(ip)
        except Exception as exc:  # unknown peer: the peerstore raises
            logger.debug("no addresses for %s: %r", short(peer_id), exc)
        return ips

    def _context(self, server_side: bool, peer_cert: bytes) -> ssl.SSLContext:
        key = (server_side, bytes(peer_cert))
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = make_context(server_side, self.credentials, peer_cert)
            while len(self._contexts) > 64:
                self._contexts.popitem(last=False)
        else:
            self._contexts.move_to_end(key)
        return ctx

    async def _in_thread(self, job: Callable[[], object], abort: _Abort, download: Download | None = None) -> object:
        try:
            return await trio.to_thread.run_sync(job, abandon_on_cancel=True, limiter=self._threads)
        except trio.Cancelled:
            abort.abort()  # the abandoned thread's next (or current) socket call fails at once
            if download is not None:
                download.tainted = True  # ... but it may still touch the download meanwhile
            raise

    # -- serving ----------------------------------------------------------------------------------------------------
    def _sweep(self) -> None:
        now = trio.current_time()
        expired = [t for t, ticket in self._tickets.items() if ticket.deadline < now]
        for token in expired:
            self._release(self._tickets.pop(token).peer)
        if expired:
            self._count("tickets_expired", len(expired))

    def _release(self, peer: str) -> None:
        self._serving[peer] -= 1
        if self._serving[peer] <= 0:
            del self._serving[peer]

    def _has_room(self, peer: str) -> bool:
        return (self._serving[peer] < self.config.max_per_peer and
                sum(self._serving.values()) < self.config.max_transfers)

    async def _handle(self, peer: str, message: Message, reply: Reply) -> None:
        if self._closed:
            raise RemoteError(ErrorCode.NOT_READY)
        if not isinstance(message, LaneFetch):
            raise RemoteError(ErrorCode.BAD_MESSAGE, "expected a fetch request")
        offer = self._offers.get(message.sha256)
        if offer is None or (offer.to is not None and peer not in offer.to):
            logger.debug("peer %s asked for %s, not offered to it", short(peer), message.sha256.hex()[:12])
            raise RemoteError(UNKNOWN_BLOB)
        if message.max_size and len(offer.view) > message.max_size:
            raise RemoteError(TOO_LARGE)
        if message.offset > len(offer.view):
            raise RemoteError(ErrorCode.BAD_MESSAGE, "offset past the end of the blob")
        pending = self._tickets.get(message.abandon) if message.abandon else None
        if pending is not None and pending.peer == peer:
            del self._tickets[message.abandon]
            self._release(peer)
        self._sweep()
        if not self._has_room(peer):
            self._count("busy")
            raise RemoteError(ErrorCode.BUSY, "too many transfers; retry later")
        if message.cert:
            await self._issue_ticket(peer, message.cert, offer, message.offset, reply)
        else:
            await self._serve_stream(peer, offer, message.offset, reply)

    async def _issue_ticket(self, peer: str, cert: bytes, offer: _Offer, offset: int, reply: Reply) -> None:
        if self.port is None:
            raise RemoteError(LANE_UNAVAILABLE)
        try:
            verify_lane_cert(cert, peer)
        except LaneAuthError as exc:
            self._count("refused_cert")
            logger.debug("peer %s: lane certificate refused: %s", short(peer), exc)
            raise RemoteError(ErrorCode.FORBIDDEN, "lane certificate does not bind your peer id") from None
        token = secrets.token_bytes(TOKEN_BYTES)
        self._tickets[token] = _Ticket(peer, bytes(cert), offer, trio.current_time() + self.config.ticket_ttl,
                                       offset)
        self._serving[peer] += 1
        host = self.config.listen_host
        await reply.send(LaneTicket(token=token, host="" if host in ("0.0.0.0", "::") else host, port=self.port,
                                    cert=self.credentials.cert_der, size=len(offer.view)))

    async def _serve_stream(self, peer: str, offer: _Offer, offset: int, reply: Reply) -> None:
        self._serving[peer] += 1
        try:
            size = len(offer.view)
            await reply.send(BlobHeader(size=size, offset=offset))
            for start in range(offset, size, STREAM_CHUNK):
                with trio.fail_after(self.config.idle_timeout):
                    await reply.send(BlobChunk(data=bytes(offer.view[start:start + STREAM_CHUNK])))
                self._count("bytes_sent_stream", min(STREAM_CHUNK, size - start))
            self._count("stream_served")
        except trio.TooSlowError:
            self._count("stalled")
            logger.debug("peer %s stopped reading a blob on the stream; cut off", short(peer))
        finally:
            self._release(peer)

    async def _serve_listener(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self.config.listen_host else socket.AF_INET
        listener = trio.socket.socket(family, socket.SOCK_STREAM)
        with listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await listener.bind((self.config.listen_host, self.config.port))
            listener.listen(128)
            self.port = listener.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                while True:
                    conn, _ = await listener.accept()
                    if self._connections >= 4 * self.config.max_transfers + 8:
                        conn.close()
                        self._count("connections_refused")
                        continue
                    self._connections += 1
                    nursery.start_soon(self._serve_connection, conn)

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        ticket = None
        try:
            preamble = b""
            with trio.move_on_after(self.config.idle_timeout):
                while len(preamble) < _PREAMBLE_SIZE:
                    piece = await conn.recv(_PREAMBLE_SIZE - len(preamble))
                    if not piece:
                        break
                    preamble += piece
            if len(preamble) < _PREAMBLE_SIZE or not preamble.startswith(PREAMBLE_MAGIC):
                self._count("bad_token")
                return
            self._sweep()
            ticket = self._tickets.pop(preamble[len(PREAMBLE_MAGIC):], None)  # one use, even if it fails
            if ticket is None:
                self._count("bad_token")
                logger.debug("lane connection with an unknown or expired ticket; closed")
                return
            ctx = self._context(True, ticket.cert)
            sock = socket.socket(fileno=conn.detach())  # from here on the socket belongs to the worker thread
            abort = _Abort()
            job = partial(_serve_blocking, ctx, sock, abort, pinned=ticket.cert, peer_id=ticket.peer,
                          view=ticket.offer.view, digest=ticket.offer.digest, offset=ticket.offset,
                          idle_timeout=self.config.idle_timeout)
            try:
                sent = await self._in_thread(job, abort)
            except LaneAuthError as exc:
                self._count("refused_tls")
                logger.debug("peer %s: lane connection refused: %s", short(ticket.peer), exc)
            except ssl.SSLCertVerificationError as exc:
                self._count("refused_tls")
                logger.debug("peer %s: lane handshake refused: %s", short(ticket.peer), exc.verify_message)
            except TimeoutError:
                self._count("stalled")
                logger.debug("peer %s: lane stalled; cut off", short(ticket.peer))
            except (OSError, LaneError) as exc:
                self._count("lane_failed")
                logger.debug("peer %s: lane transfer failed: %r", short(ticket.peer), exc)
            else:
                self._count("lane_served")
                self._count("bytes_sent_lane", sent)  # type: ignore[arg-type]
        finally:
            conn.close()  # no-op once detached
            self._connections -= 1
            if ticket is not None:
                self._release(ticket.peer)

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(max(self.config.ticket_ttl / 2, 0.05))
            self._sweep()



def lane_listen_host(listen: Iterable[str]) -> str:
    """Where a node's lane listens: the IPv4 host of its first TCP listen multiaddr (a node that serves a LAN serves its
    lane there too), else loopback."""
    for addr in listen:
        parts = addr.split("/")
        if len(parts) >= 5 and parts[1] == "ip4" and parts[3] == "tcp":
            return parts[2]
    return "127.0.0.1"


@asynccontextmanager
async def open_lane(host: MeshHost, config: LaneConfig | None = None, *,
                    credentials: LaneCredentials | None = None) -> AsyncIterator[Lane]:
    """Serve ``/hivecell/lane/1.0.0`` on ``host`` and, unless ``config.lane`` is off, a TLS listener; yield the lane.

    ``credentials`` defaults to a fresh certificate bound to ``host.identity`` (one per lane; pass one to reuse it).
    On exit the listener closes, running transfers are cancelled and the protocol handler is removed.
    """
    config = config or LaneConfig()
    lane = Lane(host, config, credentials or make_credentials(host.identity))
    async with trio.open_nursery() as nursery:
        if config.lane:
            await nursery.start(lane._serve_listener)
        nursery.start_soon(lane._sweeper)
        host.serve(LANE_PROTOCOL, lane._handle)
        try:
            yield lane
        finally:
            lane._closed = True
            try:
                host.libp2p.remove_stream_handler(LANE_PROTOCOL.id)
            except Exception as exc:
                logger.debug("removing the lane handler: %r", exc)
            nursery.cancel_scope.cancel()
