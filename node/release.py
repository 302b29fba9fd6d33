"""Finishing a job: store its result, and sign it off (by policy or by the owner) or withhold it.

These are synchronous store operations shared by the daemon (automatic sign-off) and the CLI (``hivecell jobs
approve/reject``, which may run while the daemon runs: LMDB serialises the writers).
"""

from __future__ import annotations

import math
import time
from typing import Any

from hivecell.crypto.canonical import canonical_packb
from hivecell.crypto.identity import Identity
from hivecell.crypto.signoff import SignOff, SignoffRejected, sign_signoff, verify_signoff

from .job import JobState, transition
from .owner import load_owner
from .store import Store, sha256_hex

__all__ = ["complete_job", "approve_job", "reject_job", "encode_result", "plan_blobs", "reserve_entry", "fail_entry",
           "signoff_statement", "check_approval", "ApprovalError"]


class ApprovalError(Exception):
    """An approval that cannot be used: the wrong key, or a signed approval for something else."""

# A job without differential privacy has no formal privacy bound: its honest epsilon is infinity. A DP-SGD job carries
# the epsilon and delta the node computed before running it (privacy.dp_plan), and the sign-off states them.
NO_DP_EPSILON = math.inf


def encode_result(weights: bytes, metrics: dict[str, Any]) -> bytes:
    """The bytes whose sha256 the sign-off covers."""
    return canonical_packb({"weights": weights, "metrics": metrics})


def signoff_statement(job: dict[str, Any], *, node: str, decision: str, budget_left: float | None) -> SignOff:
    """What a sign-off of ``job`` states (``node``: the peer id of the node that ran it)."""
    return SignOff(
        job_id=job["id"], dataset=job["dataset"], scientist=job["scientist"], node=node,
        plan_hash=job["plan_hash"], result_hash=job["result_hash"], epsilon=job.get("epsilon", NO_DP_EPSILON),
        delta=job.get("delta", 0.0), budget_left=budget_left, decision=decision,
    )


def _signoff(identity: Identity, job: dict[str, Any], decision: str, budget_left: float | None) -> bytes:
    return sign_signoff(identity, signoff_statement(job, node=identity.peer_id, decision=decision,
                                                    budget_left=budget_left))


def _ledger(identity: Identity, kind: str) -> Any:
    """The ledger entry that closes a job's reservation, written in the job's own transaction."""
    return identity, lambda job: [{"kind": kind, "dataset": job["dataset"], "job_id": job["id"]}]


def reserve_entry(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"kind": "reserve", "dataset": job["dataset"], "job_id": job["id"], "scientist": job["scientist"],
             "epsilon": job.get("epsilon", NO_DP_EPSILON), "delta": job.get("delta", 0.0)}]


def fail_entry(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A job that ended ``failed`` gives its reservation back; one that did not change writes nothing."""
    if job["state"] != JobState.FAILED.value:
        return []
    return [{"kind": "refund", "dataset": job["dataset"], "job_id": job["id"]}]


def complete_job(store: Store, identity: Identity, job_id: str, *, weights: bytes, metrics: dict[str, Any],
                 timings: dict[str, Any], policy: str) -> dict[str, Any]:
    """Store a finished job's result; sign it off now if ``policy`` is ``auto``, else leave it for the owner."""
    result = encode_result(weights, metrics)
    result_hash = sha256_hex(result)
    owner = load_owner(store, identity)

    def change(job: dict[str, Any]) -> dict[str, Any]:
        job = dict(job, result_hash=result_hash, metrics=metrics, timings=dict(job.get("timings", {}), **timings))
        beyond = owner.may_sign(job["dataset"], job.get("epsilon", NO_DP_EPSILON)) if policy == "auto" else None
        if beyond is not None:  # the owner keeps a key of their own and did not delegate this much to the node
            return transition(job, JobState.AWAITING_SIGNOFF, reason=f"waiting for the data owner's key: {beyond}")
        if policy == "auto":
            t0 = time.perf_counter()
            left = store.ledger_state().budget(job["dataset"]).left  # this job's epsilon is already reserved
            signoff = _signoff(identity, job, "auto", left)
            job["timings"]["signoff_s"] = time.perf_counter() - t0
            return transition(job, JobState.RELEASED, signoff=signoff, decision="auto")
        return transition(job, JobState.AWAITING_SIGNOFF, reason="waiting for the data owner's sign-off")

    def entries(job: dict[str, Any]) -> list[dict[str, Any]]:
        # Released now: the reservation is spent (settle). Waiting for the owner: reserved until approve or reject.
        if job["state"] != JobState.RELEASED.value:
            return []
        return [{"kind": "settle", "dataset": job["dataset"], "job_id": job["id"]}]

    return store.update_job(job_id, change, blobs=[(result_hash, result)], drop=plan_blobs, ledger=(identity, entries))


def plan_blobs(job: dict[str, Any]) -> list[str]:
    """The blobs a job needs only until it has run (its plan); the plan hash and the signed request stay."""
    return [job.get("program_key", ""), job.get("weights_key", "")]


def approve_job(store: Store, identity: Identity, job_id: str, *, owner_key: Identity | None = None,
                signoff: bytes | None = None) -> dict[str, Any]:
    """The owner signs off a job waiting for it: with the node key (when it is the owner key), with ``owner_key``, or
    by delivering ``signoff``, an approval signed elsewhere (``hivecell owner sign``).

    Raises:
        StoreError: no such job. InvalidTransition: the job is not awaiting sign-off.
        ApprovalError: the owner keeps a key of their own and neither it nor its signed approval was given, or the
            key or the approval is not the owner's, or the approval is for something else.
    """
    owner = load_owner(store, identity)
    signer = owner_key or identity
    if signoff is None and signer.peer_id != owner.owner:
        raise ApprovalError(f"the results of this node are signed off by the owner key {owner.owner}: approve with "
                            f"--owner-key FILE, or deliver its signed approval with --signoff FILE")

    def change(job: dict[str, Any]) -> dict[str, Any]:
        nxt = transition(job, JobState.RELEASED)  # checks the state first
        if signoff is None:
            left = store.ledger_state().budget(job["dataset"]).left
            return dict(nxt, signoff=_signoff_as(signer, job, identity.peer_id, left), decision="owner", reason="")
        check_approval(signoff, job, owner=owner.owner, node=identity.peer_id)
        return dict(nxt, signoff=signoff, decision="owner", reason="")

    return store.update_job(job_id, change, ledger=_ledger(identity, "settle"))


def _signoff_as(signer: Identity, job: dict[str, Any], node: str, budget_left: float | None) -> bytes:
    return sign_signoff(signer, signoff_statement(job, node=node, decision="owner", budget_left=budget_left))


def check_approval(signoff: bytes, job: dict[str, Any], *, owner: str, node: str) -> SignOff:
    """Check an owner's signed approval against the job it is delivered for, as a client will check it.

    Raises:
        ApprovalError: what does not match.
    """
    try:
        statement, _ = verify_signoff(signoff, owner=owner, job_id=job["id"], result_hash=job["result_hash"],
                                      plan_hash=job["plan_hash"], scientist=job["scientist"], dataset=job["dataset"])
    except SignoffRejected as exc:
        raise ApprovalError(f"the approval does not verify: {exc.reason}") from exc
    if statement.decision != "owner" or statement.node != node:
        raise ApprovalError("the approval is not the owner's decision for this node")
    if (statement.epsilon, statement.delta) != (job.get("epsilon", NO_DP_EPSILON), job.get("delta", 0.0)):
        raise ApprovalError("the approval states another epsilon or delta than the job spends")
    return statement


def reject_job(store: Store, identity: Identity, job_id: str, reason: str = "") -> dict[str, Any]:
    """The owner refuses to release a result; the result bytes are deleted, their hash is kept, and the epsilon
    reserved for it is refunded (a result that never leaves the node spends no privacy).

    Raises:
        StoreError: no such job. InvalidTransition: the job is not awaiting sign-off.
    """
    return store.update_job(job_id, lambda j: transition(j, JobState.WITHHELD, reason=reason or "withheld by the owner"),
                            drop=lambda j: [j.get("result_hash", "")],  # one transaction: no orphan after a crash
                            ledger=_ledger(identity, "refund"))


