"""The data owner's privacy-budget sign-off: the statement that lets a result leave its node.

A sign-off is a signed record (domain ``"signoff"``) over the job id, dataset, scientist, plan hash, result hash, the
epsilon and delta spent, the budget left and how it was decided (``auto`` by the node's policy or ``owner`` by a
person). A client uses a result only after :func:`verify_signoff` accepted the sign-off for exactly what it asked and
exactly the bytes it received, signed by the dataset's owner key or by a node key the owner delegated to (see
``delegation.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .delegation import DelegationRefused, check_delegated
from .identity import Identity
from .record import InvalidRecord, Record, open_record, seal

__all__ = ["SignOff", "SignoffRejected", "sign_signoff", "verify_signoff", "SIGNOFF_DOMAIN"]

SIGNOFF_DOMAIN = "signoff"
# A sign-off is evidence kept with the model; it stays valid long after the job (a year).
SIGNOFF_TTL_S = 365 * 24 * 3600
DECISIONS = ("auto", "owner")


class SignoffRejected(Exception):
    """A sign-off that does not allow the use of a result. ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class SignOff:
    job_id: str
    dataset: str
    scientist: str
    node: str
    plan_hash: str
    result_hash: str
    epsilon: float
    delta: float
    budget_left: float | None
    decision: str

    def __post_init__(self) -> None:
        for name in ("job_id", "dataset", "scientist", "node", "plan_hash", "result_hash", "decision"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"sign-off field {name} must be text")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}")
        for name in ("epsilon", "delta"):
            v = getattr(self, name)
            # inf is honest for a job without differential privacy: no bound on what the result reveals.
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v < 0:
                raise ValueError(f"sign-off field {name} must be a non-negative number")


def sign_signoff(identity: Identity, statement: SignOff, *, now: float | None = None) -> bytes:
    return seal(identity, SIGNOFF_DOMAIN, asdict(statement), ttl=SIGNOFF_TTL_S, now=now)


def verify_signoff(
    unverified: bytes,
    *,
    owner: str,
    job_id: str,
    result_hash: str,
    plan_hash: str | None = None,
    scientist: str | None = None,
    dataset: str | None = None,
    delegation: bytes | None = None,
    now: float | None = None,
) -> tuple[SignOff, Record]:
    """Check a sign-off against what the caller asked for and the bytes it received.

    Args:
        owner: peer id of the dataset's owner key (from its advert).
        delegation: the owner's delegation to the node (from the advert), if the owner key is not the node key.
            A sign-off by any key other than ``owner`` is accepted only as an ``auto`` decision within it.
        result_hash: sha256 hex of the result bytes as received, computed by the caller.

    Raises:
        SignoffRejected: bad signature, a signer that is neither the owner nor a node within the owner's delegation,
            or any field that differs from what is expected.
    """
    try:
        record = open_record(unverified, domain=SIGNOFF_DOMAIN, now=now)
    except InvalidRecord as exc:
        raise SignoffRejected(f"invalid record: {exc.reason}") from exc
    try:
        statement = SignOff(**record.fields())
    except (TypeError, ValueError) as exc:
        raise SignoffRejected("malformed statement") from exc
    if record.signer != owner:
        if delegation is None:
            raise SignoffRejected("signed by a key that is not the dataset owner's, and without a delegation")
        if statement.decision != "auto" or statement.node != record.signer:
            raise SignoffRejected("a delegated node may only sign off automatically, as itself")
        try:
            check_delegated(delegation, owner=owner, signer=record.signer, dataset=statement.dataset,
                            epsilon=statement.epsilon, signed_at=record.issued_at, now=now)
        except DelegationRefused as exc:
            raise SignoffRejected(exc.reason) from exc
    expected = {"job_id": job_id, "result_hash": result_hash, "plan_hash": plan_hash,
                "scientist": scientist, "dataset": dataset}
    for name, want in expected.items():
        if want is not None and getattr(statement, name) != want:
            raise SignoffRejected(f"{name} does not match")
    return statement, record
