"""Ed25519 node identity and its libp2p peer id.

A node's name everywhere in the mesh is its libp2p peer id: the base58btc encoding of an identity multihash of the
protobuf-encoded Ed25519 public key (libp2p peer-ids spec, "Inlining"). We compute it here without libp2p so the crypto
layer stays pure; ``tests/test_crypto.py`` checks it against libp2p's own ``ID.from_pubkey``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError, CryptoError

__all__ = ["Identity", "PublicIdentity", "IdentityError", "peer_id_from_public_key", "public_key_from_peer_id"]

_B58 = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, wrapped in an identity multihash (code 0x00, length 36).
_PB_PREFIX = b"\x08\x01\x12\x20"
_MH_PREFIX = b"\x00\x24"
_KEY_FILE_MAGIC = b"hivecell-ed25519-v1\n"


class IdentityError(ValueError):
    """A key file or peer id that cannot be used."""


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text.encode("ascii"):
        idx = _B58.find(bytes([ch]))
        if idx < 0:
            raise IdentityError("peer id is not base58")
        n = n * 58 + idx
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\x00" * pad + body


def peer_id_from_public_key(raw_public_key: bytes) -> str:
    """Return the libp2p peer id (``12D3KooW...``) of a raw 32-byte Ed25519 public key."""
    if len(raw_public_key) != 32:
        raise IdentityError("an Ed25519 public key is 32 bytes")
    return _peer_id(bytes(raw_public_key))


@functools.lru_cache(maxsize=8192)  # every advert, record and sign-off names its signer; base58 is a bignum loop
def _peer_id(raw_public_key: bytes) -> str:
    return _b58encode(_MH_PREFIX + _PB_PREFIX + raw_public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Return the raw Ed25519 public key inlined in a peer id.

    Raises:
        IdentityError: the text is not an Ed25519 identity-multihash peer id.
    """
    if not isinstance(peer_id, str) or not 40 <= len(peer_id) <= 64:
        raise IdentityError("not a peer id")
    try:
        raw = _b58decode(peer_id)
    except (IdentityError, UnicodeEncodeError) as exc:
        raise IdentityError("not a peer id") from exc
    if len(raw) != len(_MH_PREFIX) + len(_PB_PREFIX) + 32 or not raw.startswith(_MH_PREFIX + _PB_PREFIX):
        raise IdentityError("not an Ed25519 peer id")
    return raw[6:]


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of an identity: what a peer knows about another."""

    public_key: bytes

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    @classmethod
    def from_peer_id(cls, peer_id: str) -> PublicIdentity:
        return cls(public_key_from_peer_id(peer_id))

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return nothing if ``signature`` is valid over ``data``.

        Verified by libsodium (PyNaCl, which py-libp2p already depends on): 110 us per signature here against
        OpenSSL's 181 us, and every advert a gossip index files is one. libsodium's Ed25519 check is also the stricter
        one (it refuses small-order keys and points, which OpenSSL accepts), so nothing OpenSSL would refuse passes.

        Raises:
            cryptography.exceptions.InvalidSignature: it is not.
        """
        if len(signature) != 64 or len(self.public_key) != 32:
            raise InvalidSignature("an Ed25519 signature is 64 bytes and a public key 32")
        try:
            crypto_sign_open(bytes(signature) + bytes(data), bytes(self.public_key))
        except (BadSignatureError, CryptoError, ValueError, TypeError) as exc:
            raise InvalidSignature(str(exc)) from None


class Identity:
    """An Ed25519 private key: a node's, an owner's or a scientist's."""

    __slots__ = ("_key", "public")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw_pub = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = PublicIdentity(raw_pub)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def peer_id(self) -> str:
        return self.public.peer_id

    @property
    def public_key(self) -> bytes:
        return self.public.public_key

    def seed(self) -> bytes:
        """The 32 private bytes. Handle with care: whoever has them is this node."""
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to ``path`` with mode 0600, atomically (a crash leaves the old file or none).

        Raises:
            FileExistsError: ``path`` already exists; keys are never overwritten silently.
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite a key")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, _KEY_FILE_MAGIC + self.seed().hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process saved a key meanwhile: never replace a key
        finally:
            os.unlink(tmp)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the key survives a power cut once save() returns
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            IdentityError: the file is not a Hivecell key, or others can read it.
        """
        path = Path(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise IdentityError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        data = path.read_bytes()
        if not data.startswith(_KEY_FILE_MAGIC):
            raise IdentityError(f"{path} is not a Hivecell key file")
        try:
            seed = bytes.fromhex(data[len(_KEY_FILE_MAGIC):].strip().decode("ascii"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise IdentityError(f"{path} is corrupt") from exc
        return cls.from_seed(seed)


def verify_by_peer_id(peer_id: str, signature: bytes, data: bytes) -> None:
    """Verify ``signature`` over ``data`` by the key inlined in ``peer_id``.

    Raises:
        InvalidSignature: the signature does not verify, or ``peer_id`` is not an Ed25519 peer id.
    """
    try:
        public = PublicIdentity.from_peer_id(peer_id)
    except IdentityError as exc:
        raise InvalidSignature() from exc
    public.verify(signature, data)
