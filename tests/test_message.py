"""Wire messages: every type round-trips, and any bytes decode to a message or raise RemoteProtocolError."""

from __future__ import annotations

import random

import msgpack
import pytest

from hivecell.mesh.message import ErrorReply, RemoteProtocolError
from hivecell.node.wire import (
    DATASET_PROTOCOL, JOB_PROTOCOL, DatasetList, FetchResult, JobAccepted, JobResultMsg, JobStatus, ListDatasets,
    SubmitJob, WatchJob,
)

SAMPLES = [
    (DATASET_PROTOCOL, ListDatasets()),
    (DATASET_PROTOCOL, DatasetList(adverts=[b"a", b"bc"])),
    (JOB_PROTOCOL, SubmitJob(request=b"r", program=b"p", weights=b"w")),
    (JOB_PROTOCOL, JobAccepted(job_id="j", state="queued")),
    (JOB_PROTOCOL, WatchJob(job_id="j", since=3, wait_s=1.5)),
    (JOB_PROTOCOL, JobStatus(job_id="j", state="running", seq=4, progress={"epoch": 1, "loss": 0.5})),
    (JOB_PROTOCOL, WatchJob(job_id="j", wait_s=30.0, until_done=True)),
    (JOB_PROTOCOL, FetchResult(job_id="j")),
    (JOB_PROTOCOL, FetchResult(job_id="j", wait_s=30.0)),
    (JOB_PROTOCOL, JobResultMsg(job_id="j", result=b"r", signoff=b"s")),
    (JOB_PROTOCOL, JobResultMsg(job_id="j", result=b"r", signoff=b"s", timings={"train_s": 0.5})),
    (JOB_PROTOCOL, ErrorReply(code="replay", message="seen")),
]


@pytest.mark.parametrize("protocol, message", SAMPLES, ids=lambda v: getattr(v, "TAG", ""))
def test_round_trip(protocol, message):
    assert protocol.decode(protocol.encode(message)) == message


def test_fields_left_at_their_default_are_not_sent():
    """A field added later reaches a peer that predates it (and would refuse it as unknown) only when it is used."""
    assert msgpack.unpackb(JOB_PROTOCOL.encode(FetchResult(job_id="j"))) == {"t": "get", "job_id": "j"}
    assert msgpack.unpackb(JOB_PROTOCOL.encode(WatchJob(job_id="j", since=2, wait_s=30.0))) == {
        "t": "watch", "job_id": "j", "since": 2, "wait_s": 30.0}
    assert msgpack.unpackb(JOB_PROTOCOL.encode(WatchJob(job_id="j", until_done=True)))["until_done"] is True
    assert msgpack.unpackb(JOB_PROTOCOL.encode(JobResultMsg(job_id="j", result=b"r", signoff=b"s"))) == {
        "t": "res", "job_id": "j", "result": b"r", "signoff": b"s"}


@pytest.mark.parametrize("obj", [
    None, 1, [], {}, {"t": 1}, {"t": "nope"}, {"t": "sub"}, {"t": "sub", "request": "str", "program": b"", "weights": b""},
    {"t": "watch", "job_id": "j", "since": True}, {"t": "watch", "job_id": "j", "since": 1.5},
    {"t": "acc", "job_id": "j", "state": "q", "extra": 1}, {"t": "st", "job_id": "j", "state": "s", "seq": 1,
                                                           "progress": {"a": object.__name__, 1: 2}},
])
def test_invalid_messages(obj):
    try:
        data = msgpack.packb(obj, use_bin_type=True, strict_types=False)
    except TypeError:
        pytest.skip("not encodable")
    with pytest.raises(RemoteProtocolError):
        JOB_PROTOCOL.decode(data)


def test_fuzz_any_bytes_decode_or_raise_remote_protocol_error():
    rng = random.Random(7)
    valid = [JOB_PROTOCOL.encode(m) for p, m in SAMPLES if p is JOB_PROTOCOL]
    for _ in range(5000):
        if rng.random() < 0.5:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        else:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data)
        try:
            JOB_PROTOCOL.decode(data)
        except RemoteProtocolError:
            pass


def test_encode_refuses_messages_over_the_cap():
    with pytest.raises(ValueError, match="cap"):
        DATASET_PROTOCOL.encode(DatasetList(adverts=[b"x" * (DATASET_PROTOCOL.max_frame + 1)]))
