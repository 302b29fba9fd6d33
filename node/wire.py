"""The node's wire protocols: dataset listing and jobs. Built on :mod:`hivecell.mesh.message`.

Each protocol id carries one union of messages; tags are stable wire names. Fields added later get defaults and go last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from hivecell.mesh.message import Message, Protocol

__all__ = [
    "DATASET_PROTOCOL", "JOB_PROTOCOL", "ListDatasets", "DatasetList", "SubmitJob", "JobAccepted", "WatchJob",
    "JobStatus", "FetchResult", "JobResultMsg", "MAX_SUBMIT_BYTES", "MAX_BLOB_REF_BYTES", "MAX_WATCH_S", "JOB_DOMAIN",
]

MAX_SUBMIT_BYTES = 256 << 20  # a plan (program + weights) sent inline; larger weights go by reference (lane)
MAX_BLOB_REF_BYTES = 2 << 30  # the largest blob a message may refer to (each node caps what it fetches lower)
MAX_CONTROL_BYTES = 4 << 20
MAX_WATCH_S = 30.0
JOB_DOMAIN = "job"  # signed-record domain of job requests


@dataclass(frozen=True, kw_only=True)
class ListDatasets(Message):
    TAG: ClassVar[str] = "ls"


@dataclass(frozen=True, kw_only=True)
class DatasetList(Message):
    TAG: ClassVar[str] = "dsl"
    adverts: list[bytes]  # each a signed "advert" record


@dataclass(frozen=True, kw_only=True)
class SubmitJob(Message):
    TAG: ClassVar[str] = "sub"
    request: bytes  # signed "job" record: job_id, node, dataset, plan_hash, recipe, nonce
    program: bytes
    weights: bytes
    # > 0: after JobAccepted, keep the stream and answer a second time, as FetchResult with this wait_s would (the
    # result, or an error: not_ready, job_failed, withheld): one stream per job for a caller that wants no progress
    wait_s: float = 0.0
    # weights by reference: ``weights`` is empty and the node pulls the blob with this sha256 (hex) from the sender's
    # bulk lane (hivecell.mesh.lane); the signed plan_hash covers its sha256 either way
    weights_ref: str = ""
    weights_size: int = 0
    lane: bool = False  # the sender pulls blobs over the lane: a large result may come by reference (result_ref)

    def __post_init__(self) -> None:
        _check_ref(self.weights_ref, self.weights_size, self.weights)


@dataclass(frozen=True, kw_only=True)
class JobAccepted(Message):
    TAG: ClassVar[str] = "acc"
    job_id: str
    state: str


@dataclass(frozen=True, kw_only=True)
class WatchJob(Message):
    TAG: ClassVar[str] = "watch"
    job_id: str
    since: int = 0  # answer as soon as the job's seq is above this, or after wait_s
    wait_s: float = 0.0
    until_done: bool = False  # answer only once the job is released, withheld or failed (or after wait_s)


@dataclass(frozen=True, kw_only=True)
class JobStatus(Message):
    TAG: ClassVar[str] = "st"
    job_id: str
    state: str
    seq: int
    reason: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FetchResult(Message):
    TAG: ClassVar[str] = "get"
    job_id: str
    wait_s: float = 0.0  # wait up to this long (at most MAX_WATCH_S) for the job to end before answering not_ready
    lane: bool = False  # as SubmitJob.lane


@dataclass(frozen=True, kw_only=True)
class JobResultMsg(Message):
    TAG: ClassVar[str] = "res"
    job_id: str
    result: bytes  # canonical msgpack {"weights": safetensors bytes, "metrics": {...}}; its sha256 is signed
    signoff: bytes  # signed "signoff" record
    timings: dict[str, Any] = field(default_factory=dict)  # the node's job timings (as in JobStatus), unsigned
    # result by reference: ``result`` is empty; pull the blob with this sha256 (hex) from the node's lane
    result_ref: str = ""
    result_size: int = 0

    def __post_init__(self) -> None:
        _check_ref(self.result_ref, self.result_size, self.result)


def _check_ref(ref: str, size: int, inline: bytes) -> None:
    """A blob reference is 64 lowercase hex with a size, instead of inline bytes (never both)."""
    if not ref:
        if size:
            raise ValueError("a blob size without a reference")
        return
    if len(ref) != 64 or any(c not in "0123456789abcdef" for c in ref):
        raise ValueError("a blob reference is a sha256 in 64 lowercase hex digits")
    if not 0 < size <= MAX_BLOB_REF_BYTES:
        raise ValueError(f"a referenced blob has 1 to {MAX_BLOB_REF_BYTES} bytes")
    if inline:
        raise ValueError("a blob goes inline or by reference, not both")


DATASET_PROTOCOL = Protocol("/hivecell/dataset/1.0.0", ListDatasets, DatasetList, max_frame=MAX_CONTROL_BYTES)
JOB_PROTOCOL = Protocol(
    "/hivecell/job/1.0.0", SubmitJob, JobAccepted, WatchJob, JobStatus, FetchResult, JobResultMsg,
    max_frame=MAX_SUBMIT_BYTES,
)
