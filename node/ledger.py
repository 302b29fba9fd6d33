"""The privacy ledger: an append-only, hash-chained, signed record of every epsilon a dataset has spent.

Theory of operation
-------------------
Each entry is a signed record (domain ``"ledger"``, signed by the node key) whose body carries ``seq`` (0, 1, 2, ...),
``prev`` (sha256 of the previous entry's bytes; 64 zeros for the first) and one of four kinds:

    budget   the owner sets a dataset's policy: its total epsilon, whether jobs without DP are allowed, and optionally a
             cap per job, a default limit per scientist (peer id) and limits for named scientists
    reserve  a job's epsilon is set aside when the job is accepted, before anything runs
    settle   the job's result was stored: the reservation becomes spent
    refund   the job failed or its result was withheld: the reservation is given back

:class:`LedgerState` replays entries and refuses any that would break the rules (a reservation that does not fit, a
settle or refund without an open reservation, a second settle). The store appends entries in the same LMDB write
transaction as the job change they belong to, and LMDB serialises writers across processes, so concurrent jobs cannot
overspend, and a crash never separates a job's state from its ledger entry.

Restart rule: a job killed mid-run keeps its reservation; when it re-runs, its completion settles it (once); when it
fails for good, the reservation is refunded (once). Nothing is charged twice and nothing is lost.

:func:`verify_chain` checks every signature, the hash links and the sequence, replays the rules, and reports the first
bad entry -- an edited, reordered, removed or truncated-then-extended ledger fails.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from hivecell.crypto.identity import Identity
from hivecell.crypto.record import InvalidRecord, open_record, seal

__all__ = ["LEDGER_DOMAIN", "GENESIS", "LedgerError", "ChainBroken", "DatasetBudget", "LedgerState", "seal_entry",
           "verify_chain", "replay_chain", "entry_hash"]

LEDGER_DOMAIN = "ledger"
GENESIS = "0" * 64
KINDS = ("budget", "reserve", "settle", "refund")
_FOREVER_S = 100 * 365 * 24 * 3600
_EPS_TOLERANCE = 1e-9


class LedgerError(Exception):
    """An entry the rules refuse (e.g. a reservation that does not fit the budget)."""


class ChainBroken(Exception):
    """The stored ledger does not verify; ``index`` is the first bad entry."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"entry {index}: {reason}")
        self.index, self.reason = index, reason


def entry_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _limit(value: Any) -> bool:
    """A limit is absent (None) or a finite epsilon >= 0."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                             and value >= 0)


@dataclass
class DatasetBudget:
    total: float | None = None  # None: no budget set (no limit, but every epsilon is still recorded)
    allow_non_dp: bool = True
    per_job: float | None = None  # the most one job may spend
    per_scientist: float | None = None  # the most one scientist may spend in all (reserved + spent)
    scientists: dict[str, float] = field(default_factory=dict)  # limits for named scientists, over per_scientist
    reserved: float = 0.0
    spent: float = 0.0
    used: dict[str, float] = field(default_factory=dict)  # scientist -> reserved + spent (finite epsilons)

    @property
    def left(self) -> float | None:
        return None if self.total is None else max(0.0, self.total - self.reserved - self.spent)

    def scientist_limit(self, scientist: str) -> float | None:
        return self.scientists.get(scientist, self.per_scientist)

    def left_for(self, scientist: str) -> float | None:
        """What ``scientist`` may still spend: the least of the dataset's left and the scientist's own limit left."""
        limits = [v for v in (self.left, self.scientist_limit(scientist)) if v is not None]
        if self.scientist_limit(scientist) is not None:
            limits[-1] = max(0.0, limits[-1] - self.used.get(scientist, 0.0))
        return min(limits) if limits else None

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "allow_non_dp": self.allow_non_dp, "per_job": self.per_job,
                "per_scientist": self.per_scientist, "scientists": dict(self.scientists), "reserved": self.reserved,
                "spent": self.spent, "left": self.left, "used": dict(self.used)}


@dataclass
class LedgerState:
    """The ledger replayed: budgets per dataset and open reservations per job."""

    seq: int = 0  # the next entry's seq
    head: str = GENESIS
    datasets: dict[str, DatasetBudget] = field(default_factory=dict)
    open: dict[str, tuple[str, float, str]] = field(default_factory=dict)  # job id -> (dataset, epsilon, scientist)
    closed: set[str] = field(default_factory=set)

    def budget(self, dataset: str) -> DatasetBudget:
        return self.datasets.get(dataset, DatasetBudget())

    def check(self, fields: dict[str, Any]) -> None:
        """Raise :class:`LedgerError` if ``fields`` (an entry body without seq/prev) breaks a rule."""
        kind, dataset, job = fields.get("kind"), fields.get("dataset"), fields.get("job_id", "")
        if kind not in KINDS or not isinstance(dataset, str):
            raise LedgerError("malformed entry")
        if kind == "budget":
            total = fields.get("epsilon")
            if total is None or not _limit(total):
                raise LedgerError("a budget is a finite epsilon >= 0")
            if not (_limit(fields.get("per_job")) and _limit(fields.get("per_scientist"))):
                raise LedgerError("per-job and per-scientist limits are finite epsilons >= 0")
            named = fields.get("scientists") or {}
            if not (isinstance(named, dict) and all(isinstance(k, str) and v is not None and _limit(v)
                                                    for k, v in named.items())):
                raise LedgerError("scientist limits map peer ids to finite epsilons >= 0")
            return
        if kind == "reserve":
            eps = fields.get("epsilon")
            if not (isinstance(eps, (int, float)) and eps >= 0 and not math.isnan(eps)):
                raise LedgerError("bad epsilon")
            if job in self.open or job in self.closed:
                raise LedgerError(f"job {job} already has a reservation")
            scientist = fields.get("scientist", "")
            if not isinstance(scientist, str):
                raise LedgerError("malformed entry")
            b = self.budget(dataset)
            if b.total is not None:
                if math.isinf(eps) and not b.allow_non_dp:
                    raise LedgerError("this dataset's owner allows only differentially private jobs")
                if math.isinf(eps):
                    return
                if b.per_job is not None and eps > b.per_job + _EPS_TOLERANCE:
                    raise LedgerError(f"epsilon {eps:.4g} is over this dataset's cap of {b.per_job:.4g} per job")
                if eps > (b.left or 0.0) + _EPS_TOLERANCE:
                    raise LedgerError(f"epsilon {eps:.4g} does not fit: {b.left:.4g} left of {b.total:.4g}")
                limit = b.scientist_limit(scientist)
                if limit is not None and b.used.get(scientist, 0.0) + eps > limit + _EPS_TOLERANCE:
                    raise LedgerError(f"epsilon {eps:.4g} does not fit this scientist's limit: "
                                      f"{max(0.0, limit - b.used.get(scientist, 0.0)):.4g} left of {limit:.4g}")
            return
        if job not in self.open or self.open[job][0] != dataset:
            raise LedgerError(f"job {job} has no open reservation on {dataset}")

    def apply(self, fields: dict[str, Any]) -> None:
        self.check(fields)
        kind, dataset, job = fields["kind"], fields["dataset"], fields.get("job_id", "")
        b = self.datasets.setdefault(dataset, DatasetBudget())
        if kind == "budget":
            b.total, b.allow_non_dp = float(fields["epsilon"]), bool(fields.get("allow_non_dp", False))
            b.per_job = None if fields.get("per_job") is None else float(fields["per_job"])
            b.per_scientist = None if fields.get("per_scientist") is None else float(fields["per_scientist"])
            b.scientists = {k: float(v) for k, v in (fields.get("scientists") or {}).items()}
        elif kind == "reserve":
            eps, scientist = float(fields["epsilon"]), fields.get("scientist", "")
            self.open[job] = (dataset, eps, scientist)
            finite = 0.0 if math.isinf(eps) else eps
            b.reserved += finite
            if finite:
                b.used[scientist] = b.used.get(scientist, 0.0) + finite
        else:
            _, eps, scientist = self.open.pop(job)
            self.closed.add(job)
            finite = 0.0 if math.isinf(eps) else eps
            b.reserved = max(0.0, b.reserved - finite)
            if kind == "settle":
                b.spent += finite
            elif finite:  # a refund gives the scientist's share back too
                b.used[scientist] = max(0.0, b.used.get(scientist, 0.0) - finite)


def seal_entry(identity: Identity, state: LedgerState, fields: dict[str, Any], *, now: float | None = None) -> bytes:
    """Check ``fields`` against ``state``, sign it as the next entry, apply it to ``state`` and return its bytes.

    Raises:
        LedgerError: the rules refuse it (``state`` is unchanged then).
    """
    state.check(fields)
    raw = seal(identity, LEDGER_DOMAIN, dict(fields, seq=state.seq, prev=state.head), ttl=_FOREVER_S, now=now)
    state.apply(fields)
    state.seq += 1
    state.head = entry_hash(raw)
    return raw


def replay_chain(entries: list[bytes]) -> LedgerState:
    """Replay a ledger this node wrote itself (its signer is taken from the first entry) into its state.

    Raises:
        ChainBroken: as :func:`verify_chain`.
    """
    if not entries:
        return LedgerState()
    try:
        signer = open_record(entries[0], domain=LEDGER_DOMAIN, check_times=False).signer
    except InvalidRecord as exc:
        raise ChainBroken(0, f"not a valid signed entry ({exc.reason})") from exc
    return verify_chain(entries, signer=signer)


def verify_chain(entries: list[bytes], *, signer: str) -> LedgerState:
    """Replay and check a whole ledger.

    Raises:
        ChainBroken: the first entry that is not validly signed by ``signer``, not linked to its predecessor, out of
            sequence, or against the rules.
    """
    state = LedgerState()
    for index, raw in enumerate(entries):
        try:
            record = open_record(raw, domain=LEDGER_DOMAIN, check_times=False)
        except InvalidRecord as exc:
            raise ChainBroken(index, f"not a valid signed entry ({exc.reason})") from exc
        if record.signer != signer:
            raise ChainBroken(index, "signed by another key than the node's")
        body = record.fields()
        if body.get("seq") != state.seq:
            raise ChainBroken(index, f"sequence {body.get('seq')} where {state.seq} was expected")
        if body.get("prev") != state.head:
            raise ChainBroken(index, "does not link to the previous entry (edited, reordered or removed)")
        try:
            state.apply({k: v for k, v in body.items() if k not in ("seq", "prev")})
        except LedgerError as exc:
            raise ChainBroken(index, str(exc)) from exc
        state.seq += 1
        state.head = entry_hash(raw)
    return state
