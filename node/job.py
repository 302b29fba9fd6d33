"""The job state machine (sans-IO): what a job may become next, and how a restart treats it.

Theory of operation
-------------------
A job request that passes validation is persisted as ``queued``; one that does not is refused on the spot and never
stored (a stranger cannot fill the disk with refusals). From there::

    queued ──────────► running ──────────► released            (policy "auto": the node signs off at once)
                         │  │
                         │  └────────────► awaiting_signoff ──► released   (owner: hivecell jobs approve)
                         │                                  └─► withheld   (owner: hivecell jobs reject)
                         └───────────────► failed              (worker error, limits, or too many restarts)

Every transition is one LMDB transaction (``Store.update_job``) and bumps ``seq``, which watchers long-poll on.

A clean stop (SIGTERM) puts a running job back to ``queued`` without using up an attempt.

Restart rule (``kill -9`` of the daemon): a job found ``running`` when the daemon starts was interrupted. It goes back
to ``queued`` and runs again if it has attempts left (``max_attempts``, default 2), else ``failed`` with reason
``interrupted``. A re-run starts from the job's original plan, so nothing is applied twice, and a job never stays
``running`` across a restart. ``awaiting_signoff`` jobs keep waiting; terminal jobs stay as they are.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

__all__ = ["JobState", "InvalidTransition", "transition", "touch", "requeue", "recover", "new_job", "TERMINAL",
           "MAX_ATTEMPTS"]

MAX_ATTEMPTS = 2


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_SIGNOFF = "awaiting_signoff"
    RELEASED = "released"
    WITHHELD = "withheld"
    FAILED = "failed"


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.RELEASED, JobState.AWAITING_SIGNOFF, JobState.FAILED, JobState.QUEUED}),
    JobState.AWAITING_SIGNOFF: frozenset({JobState.RELEASED, JobState.WITHHELD}),
    JobState.RELEASED: frozenset(),
    JobState.WITHHELD: frozenset(),
    JobState.FAILED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


class InvalidTransition(Exception):
    """A change the state machine does not allow (e.g. approving a job that already failed)."""


def new_job(*, job_id: str, now: float | None = None, **fields: Any) -> dict[str, Any]:
    t = time.time() if now is None else now
    return dict(fields, id=job_id, state=JobState.QUEUED.value, seq=1, attempts=0, reason="",
                created=t, updated=t, progress={}, timings={})


def transition(record: dict[str, Any], to: JobState, *, now: float | None = None, **changes: Any) -> dict[str, Any]:
    """Return ``record`` moved to state ``to`` with ``changes`` applied (a new dict; the input is not modified).

    Raises:
        InvalidTransition: ``to`` is not reachable from the record's state.
    """
    current = JobState(record["state"])
    if to not in TRANSITIONS[current]:
        raise InvalidTransition(f"job {record['id']} is {current.value}; it cannot become {to.value}")
    t = time.time() if now is None else now
    return dict(record, **changes, state=to.value, seq=record["seq"] + 1, updated=t)


def touch(record: dict[str, Any], *, now: float | None = None, **changes: Any) -> dict[str, Any]:
    """Apply changes that keep the state (progress, timings) and bump ``seq`` so watchers see them."""
    t = time.time() if now is None else now
    return dict(record, **changes, seq=record["seq"] + 1, updated=t)


def requeue(record: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """A running job whose daemon is stopping cleanly: back to the queue, and this run does not count as an attempt."""
    if record["state"] != JobState.RUNNING.value:
        return record
    return transition(record, JobState.QUEUED, now=now, progress={}, attempts=max(0, record.get("attempts", 1) - 1),
                      reason="re-queued: the node was stopped while it ran")


def recover(record: dict[str, Any], *, max_attempts: int = MAX_ATTEMPTS, now: float | None = None) -> dict[str, Any]:
    """The state a job found in the store at start-up should be in (see the restart rule above)."""
    if record["state"] != JobState.RUNNING.value:
        return record
    if record.get("attempts", 0) < max_attempts:
        return transition(record, JobState.QUEUED, now=now, progress={},
                          reason="re-queued: the node restarted while it ran")
    return transition(record, JobState.FAILED, now=now,
                      reason=f"interrupted: the node restarted while it ran ({record.get('attempts', 0)} attempts)")
