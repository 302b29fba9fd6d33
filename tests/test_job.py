"""The job state machine and its restart rule (sans-IO), and the store under it (real LMDB)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hivecell.node import job as jobsm
from hivecell.node.job import InvalidTransition, JobState
from hivecell.node.store import Store, StoreError


def _job(state: JobState = JobState.QUEUED, **kw):
    return dict(jobsm.new_job(job_id="a" * 32, now=1.0, dataset="d", scientist="s"), state=state.value, **kw)


@pytest.mark.parametrize("src", list(JobState))
@pytest.mark.parametrize("dst", list(JobState))
def test_transition_table(src, dst):
    rec = _job(src)
    if dst in jobsm.TRANSITIONS[src]:
        out = jobsm.transition(rec, dst, now=2.0, reason="x")
        assert out["state"] == dst.value and out["seq"] == rec["seq"] + 1 and out["updated"] == 2.0
        assert rec["state"] == src.value  # the input is not modified
    else:
        with pytest.raises(InvalidTransition):
            jobsm.transition(rec, dst)


def test_terminal_states():
    assert jobsm.TERMINAL == {JobState.RELEASED, JobState.WITHHELD, JobState.FAILED}


@pytest.mark.parametrize("attempts, state", [(1, "queued"), (2, "failed"), (5, "failed")])
def test_restart_rule(attempts, state):
    out = jobsm.recover(_job(JobState.RUNNING, attempts=attempts), max_attempts=2)
    assert out["state"] == state
    for other in (JobState.QUEUED, JobState.AWAITING_SIGNOFF, JobState.RELEASED):
        assert jobsm.recover(_job(other)) == _job(other)


def test_store_jobs_blobs_and_claims(tmp_path):
    with Store.open(tmp_path / "s") as store:
        first = jobsm.new_job(job_id="1" * 32, now=1.0)
        second = jobsm.new_job(job_id="2" * 32, now=2.0)
        from hivecell.node.store import sha256_hex
        store.create_job(second, [b"plan", (sha256_hex(b"weights"), b"weights")])  # a caller may give the hash
        store.create_job(first)
        with pytest.raises(StoreError):
            store.create_job(first)
        assert store.get_blob(sha256_hex(b"plan")) == b"plan"
        assert store.get_blob(sha256_hex(b"weights")) == b"weights"
        claimed = store.claim_next_job("queued", lambda j: jobsm.transition(j, JobState.RUNNING))
        assert claimed["id"] == "1" * 32 and store.get_job("1" * 32)["state"] == "running"
        with pytest.raises(InvalidTransition):  # an aborted change writes nothing
            store.update_job("1" * 32, lambda j: jobsm.transition(j, JobState.WITHHELD))
        assert store.get_job("1" * 32)["state"] == "running"
        with pytest.raises(StoreError):
            store.update_job("f" * 32, lambda j: j)
        assert store.remember_nonce(b"n" * 16, 10**10) and not store.remember_nonce(b"n" * 16, 10**10)


def test_store_datasets(tmp_path):
    with Store.open(tmp_path / "s") as store:
        store.add_dataset({"name": "a"}, b"tensors")
        store.add_dataset({"name": "b"}, b"tensors")  # same bytes, one blob
        with pytest.raises(StoreError):
            store.add_dataset({"name": "a"}, b"other")
        key = store.get_dataset("a")["data_key"]
        store.remove_dataset("a")
        assert store.get_blob(key) == b"tensors"  # still used by b
        store.remove_dataset("b")
        assert store.get_blob(key) is None
        with pytest.raises(StoreError):
            store.remove_dataset("b")


def test_worker_side_reader_is_read_only(tmp_path):
    with Store.open(tmp_path / "s") as store:
        key = store.put_blob(b"private")
    code = (
        "import sys; from hivecell.node.store import open_blob_reader\n"
        f"with open_blob_reader({str(tmp_path / 's')!r}) as get:\n"
        f"    assert bytes(get({key!r})) == b'private' and get('0' * 64) is None\n"
        "import lmdb\n"
        f"env = lmdb.open({str(tmp_path / 's')!r}, readonly=True, max_dbs=8)\n"
        "try:\n    env.begin(write=True); sys.exit(3)\nexcept lmdb.Error:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_withheld_result_keeps_a_blob_another_job_shares(tmp_path):
    """Two jobs with the same plan and data produce the same result bytes: withholding one keeps the other's."""
    with Store.open(tmp_path / "s") as store:
        key = store.put_blob(b"same result")
        for jid, state in (("1" * 32, "released"), ("2" * 32, "withheld")):
            store.create_job(dict(jobsm.new_job(job_id=jid), state=state, result_hash=key))
        store.update_job("2" * 32, lambda j: j, drop=lambda j: [key])  # job 1 (released) still needs it
        assert store.get_blob(key) == b"same result"
        store.update_job("1" * 32, lambda j: j, drop=lambda j: [key])  # only a withheld job refers to it now
        assert store.get_blob(key) is None
