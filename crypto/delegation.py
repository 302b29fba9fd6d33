"""The data owner's delegation: the owner key lets a node key sign off results on its own, within limits.

Theory of operation
-------------------
A data owner may keep an **owner key** apart from the node key (on a laptop that is mostly offline). The owner signs a
delegation record (domain ``"delegation"``) that names one node key and the limits within which that node may sign
off a result without asking: the most epsilon per job, whether jobs without differential privacy may be released,
which datasets (all of the node's if none are named), and an expiry (the record's ``exp``).

A sign-off is valid for a dataset whose advert names owner ``O`` exactly when either

* it is signed by ``O`` itself (an approval, ``decision = "owner"``), or
* it is signed by a node key ``N`` with ``decision = "auto"``, and a delegation signed by ``O`` names ``N``, covers
  the dataset and the sign-off's epsilon, is valid now, and was valid when the sign-off was issued.

:func:`check_delegated` applies the second rule; :func:`hivecell.crypto.signoff.verify_signoff` applies both. When the
owner key *is* the node key (the default, one key per box), no delegation is needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .identity import Identity
from .record import CLOCK_SKEW_S, InvalidRecord, Record, open_record, seal

__all__ = ["DELEGATION_DOMAIN", "Delegation", "DelegationRefused", "sign_delegation", "open_delegation",
           "check_delegated", "MAX_DELEGATION_S"]

DELEGATION_DOMAIN = "delegation"
MAX_DELEGATION_S = 2 * 365 * 24 * 3600  # a delegation is renewed at least every two years
_MAX_DATASETS = 256


class DelegationRefused(Exception):
    """A delegation that does not allow what is asked. ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Delegation:
    node: str  # peer id of the node key that may sign off
    max_epsilon: float  # the most epsilon one job may spend and still be signed off by the node
    allow_non_dp: bool = False  # may the node release results of jobs without differential privacy (epsilon = inf)
    datasets: tuple[str, ...] = ()  # the datasets it covers; () covers all of the node's

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:
            raise ValueError("a delegation names a node peer id")
        eps = self.max_epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
            raise ValueError("max_epsilon must be a finite number >= 0")
        if not isinstance(self.allow_non_dp, bool):
            raise ValueError("allow_non_dp must be true or false")
        if (not isinstance(self.datasets, (tuple, list)) or len(self.datasets) > _MAX_DATASETS
                or not all(isinstance(d, str) and d for d in self.datasets)):
            raise ValueError(f"datasets must be at most {_MAX_DATASETS} names")
        object.__setattr__(self, "datasets", tuple(self.datasets))

    def covers(self, dataset: str, epsilon: float) -> str | None:
        """Why this delegation does not cover a sign-off of ``epsilon`` on ``dataset``, or ``None`` if it does."""
        if self.datasets and dataset not in self.datasets:
            return f"the delegation does not cover dataset {dataset[:64]!r}"
        if math.isinf(epsilon):
            return None if self.allow_non_dp else "the delegation does not cover jobs without differential privacy"
        if epsilon > self.max_epsilon * (1 + 1e-9):
            return f"epsilon {epsilon:.4g} is beyond the delegation's limit of {self.max_epsilon:g} per job"
        return None


def sign_delegation(owner: Identity, delegation: Delegation, *, ttl: float, now: float | None = None) -> bytes:
    """The owner's signed delegation, valid for ``ttl`` seconds (at most :data:`MAX_DELEGATION_S`)."""
    if not 0 < ttl <= MAX_DELEGATION_S:
        raise ValueError(f"a delegation lasts between 1 s and {MAX_DELEGATION_S // 86400} days")
    body = dict(asdict(delegation), datasets=list(delegation.datasets))
    return seal(owner, DELEGATION_DOMAIN, body, ttl=ttl, now=now)


def open_delegation(unverified: bytes, *, owner: str | None = None, now: float | None = None,
                    check_times: bool = True) -> tuple[Delegation, Record]:
    """Verify a delegation (signature, times unless ``check_times`` is false, and signer = ``owner`` if given).

    Raises:
        DelegationRefused: bad signature, expired, not yet valid, signed by another key, or malformed.
    """
    try:
        record = open_record(unverified, domain=DELEGATION_DOMAIN, now=now, check_times=check_times)
    except InvalidRecord as exc:
        reason = "the delegation has expired" if exc.reason == "expired" else f"invalid delegation: {exc.reason}"
        raise DelegationRefused(reason) from exc
    if owner is not None and record.signer != owner:
        raise DelegationRefused("the delegation is not signed by the dataset's owner")
    try:
        delegation = Delegation(**record.fields())
    except (TypeError, ValueError) as exc:
        raise DelegationRefused("malformed delegation") from exc
    return delegation, record


def check_delegated(delegation: bytes, *, owner: str, signer: str, dataset: str, epsilon: float,
                    signed_at: int, now: float | None = None) -> Delegation:
    """Check that ``delegation`` lets node key ``signer`` sign off ``epsilon`` on ``dataset`` at ``signed_at``.

    Raises:
        DelegationRefused: which check failed.
    """
    d, record = open_delegation(delegation, owner=owner, now=now)
    if d.node != signer:
        raise DelegationRefused("the delegation names another node key")
    if not record.issued_at - CLOCK_SKEW_S <= signed_at <= record.expires_at:
        raise DelegationRefused("the sign-off was made outside the delegation's validity")
    why = d.covers(dataset, epsilon)
    if why is not None:
        raise DelegationRefused(why)
    return d
