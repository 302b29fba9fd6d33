"""Signed records: the only way anything that matters crosses between peers.

Theory of operation
-------------------
A record is a typed body (a msgpack map) signed by one Ed25519 key under a *domain tag* (``"job"``, ``"signoff"``,
``"advert"``, ...). The envelope on the wire is the msgpack array::

    [1, domain, body_bytes, signer_public_key, signature]

and the signature covers ``b"hivecell-record-v1\\0" + domain + b"\\0" + body_bytes`` -- the exact body bytes, so a
verifier never re-encodes anything. The domain tag stops a signature made for one purpose (say, a job request) from
being replayed as another (a sign-off). Every body carries ``iat`` (issued at, unix seconds) and ``exp`` (expiry);
requests also carry a random ``nonce`` so the receiver can refuse replays.

:func:`open_record` verifies the signature *before* decoding the body, checks the domain, the times (with a clock-skew
allowance) and returns a :class:`Record`. Every failure is one exception type, :class:`InvalidRecord`, whose ``reason``
is for local logs only (as Fernet does, a remote peer learns nothing from which check failed).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature

from .canonical import CanonicalError, canonical_packb, strict_unpackb
from .identity import Identity, PublicIdentity, peer_id_from_public_key

__all__ = ["Record", "InvalidRecord", "seal", "open_record", "MAX_RECORD_BYTES", "CLOCK_SKEW_S"]

_CONTEXT = b"hivecell-record-v1\x00"
MAX_RECORD_BYTES = 1 << 20  # records are small; blobs travel beside them, named by hash
CLOCK_SKEW_S = 120
_RESERVED = frozenset({"iat", "exp", "nonce"})


class InvalidRecord(Exception):
    """A record that must not be used. ``reason`` is for local logs, never for the remote peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    domain: str
    signer: str  # peer id of the signing key
    signer_key: bytes
    body: dict[str, Any]
    issued_at: int
    expires_at: int
    nonce: bytes | None
    raw: bytes = field(repr=False)  # the whole envelope, as received

    def fields(self) -> dict[str, Any]:
        """The body without the reserved ``iat``/``exp``/``nonce`` keys."""
        return {k: v for k, v in self.body.items() if k not in _RESERVED}


def _signed_bytes(domain: str, body: bytes) -> bytes:
    return _CONTEXT + domain.encode("utf-8") + b"\x00" + body


def seal(
    identity: Identity,
    domain: str,
    fields: dict[str, Any],
    *,
    ttl: float = 3600.0,
    now: float | None = None,
    with_nonce: bool = False,
) -> bytes:
    """Sign ``fields`` under ``domain`` and return the envelope bytes."""
    if _RESERVED & fields.keys():
        raise ValueError(f"fields may not use reserved keys {sorted(_RESERVED)}")
    issued = int(time.time() if now is None else now)
    body = dict(fields, iat=issued, exp=issued + int(ttl))
    if with_nonce:
        body["nonce"] = os.urandom(16)
    body_bytes = canonical_packb(body)
    signature = identity.sign(_signed_bytes(domain, body_bytes))
    return canonical_packb([1, domain, body_bytes, identity.public_key, signature])


def open_record(
    unverified: bytes,
    *,
    domain: str,
    now: float | None = None,
    max_bytes: int = MAX_RECORD_BYTES,
    skew: float = CLOCK_SKEW_S,
    check_times: bool = True,
) -> Record:
    """Verify a record and return it.

    ``check_times=False`` skips the validity window, for records kept as evidence of the past (a ledger entry stays
    valid after the clock that signed it was corrected).

    Raises:
        InvalidRecord: malformed, wrong domain, bad signature, not yet valid or expired.
    """
    if not isinstance(unverified, (bytes, bytearray, memoryview)):
        raise InvalidRecord("not bytes")
    try:
        envelope = strict_unpackb(bytes(unverified), max_len=max_bytes)
    except CanonicalError as exc:
        raise InvalidRecord("malformed envelope") from exc
    if not (isinstance(envelope, list) and len(envelope) == 5 and envelope[0] == 1):
        raise InvalidRecord("unknown envelope version")
    _, unverified_domain, body_bytes, signer_key, signature = envelope
    if not (
        isinstance(unverified_domain, str)
        and isinstance(body_bytes, bytes)
        and isinstance(signer_key, bytes)
        and len(signer_key) == 32
        and isinstance(signature, bytes)
        and len(signature) == 64
    ):
        raise InvalidRecord("malformed envelope fields")
    if unverified_domain != domain:
        raise InvalidRecord(f"domain {unverified_domain!r} where {domain!r} was expected")
    try:
        PublicIdentity(signer_key).verify(signature, _signed_bytes(domain, body_bytes))
    except (InvalidSignature, ValueError) as exc:
        raise InvalidRecord("bad signature") from exc
    # Signed by signer_key from here on; still validate the body's shape, the signer may be hostile.
    try:
        body = strict_unpackb(body_bytes, max_len=max_bytes)
    except CanonicalError as exc:
        raise InvalidRecord("malformed body") from exc
    if not isinstance(body, dict):
        raise InvalidRecord("body is not a map")
    iat, exp, nonce = body.get("iat"), body.get("exp"), body.get("nonce")
    if not (isinstance(iat, int) and isinstance(exp, int) and not isinstance(iat, bool) and exp >= iat):
        raise InvalidRecord("bad validity window")
    if nonce is not None and not (isinstance(nonce, bytes) and 8 <= len(nonce) <= 64):
        raise InvalidRecord("bad nonce")
    t = time.time() if now is None else now
    if check_times and iat > t + skew:
        raise InvalidRecord("issued in the future")
    if check_times and exp < t - skew:
        raise InvalidRecord("expired")
    return Record(
        domain=domain,
        signer=peer_id_from_public_key(signer_key),
        signer_key=signer_key,
        body=body,
        issued_at=iat,
        expires_at=exp,
        nonce=nonce,
        raw=bytes(unverified),
    )
