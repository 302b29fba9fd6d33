"""Faults: Workers that run or allocate without bound, and a daemon killed with SIGKILL in the middle of a job."""

from __future__ import annotations

import pytest
import trio

from hivecell.crypto.identity import Identity
from hivecell.node.client import Client
from hivecell.node.home import Home
from hivecell.node.localnet import start_daemon
from hivecell.node.store import Store

from conftest import add_dataset

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path, digits) -> Home:
    home = Home(tmp_path / "node")
    add_dataset(home, "digits", *digits)
    return home


async def _wait_state(client: Client, job_id: str, wanted: set[str], timeout: float = 300):
    with trio.fail_after(timeout):
        status = await client.status(job_id)
        while status.state not in wanted:
            status = await client.status(job_id, since=status.seq, wait_s=10)
        return status


async def test_worker_past_its_wall_time_is_killed(home, plan_factory):
    daemon = start_daemon(home.path, "--warm-workers", "0", "--worker-timeout", "4")
    try:
        async with Client.connect(daemon.address) as client:
            job_id = await client.submit("digits", plan_factory(epochs=1000))
            status = await _wait_state(client, job_id, {"failed", "released"})
            assert status.state == "failed" and status.reason.startswith("timeout"), status
            assert {d.name for d in await client.datasets()} == {"digits"}  # still serving
    finally:
        daemon.stop()


async def test_worker_past_its_memory_limit_is_killed(home):
    import torch

    from hivecell.node.plan import build_plan

    class Hog(torch.nn.Module):
        """Allocates ~80 GB in forward (expand + contiguous): a plan that passes the audit but would eat the box."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            flat = x.reshape(x.shape[0], 64)
            big = flat.reshape(x.shape[0], 64, 1).expand(x.shape[0], 64, 10_000_000).contiguous()
            return self.fc(flat) + big.sum() * 0

    plan = build_plan(Hog(), torch.zeros(4, 1, 8, 8), {"epochs": 1})
    daemon = start_daemon(home.path, "--warm-workers", "0", "--worker-memory-mb", "1024")
    try:
        async with Client.connect(daemon.address) as client:
            job_id = await client.submit("digits", plan)
            status = await _wait_state(client, job_id, {"failed", "released"})
            assert status.state == "failed" and status.reason.startswith("memory"), status
    finally:
        daemon.stop()


@pytest.mark.parametrize("max_attempts, final", [(2, "released"), (1, "failed")])
async def test_kill_9_while_a_job_runs(home, plan_factory, max_attempts, final):
    """After SIGKILL mid-job the store opens, nothing is lost, and the job re-runs or fails -- never stays running."""
    args = ("--warm-workers", "0", "--max-attempts", str(max_attempts))
    daemon = start_daemon(home.path, *args)
    plan = plan_factory(epochs=25)
    scientist = Identity.generate()  # the same scientist asks again after the restart
    try:
        async with Client.connect(daemon.address, identity=scientist) as client:
            job_id = await client.submit("digits", plan)
            status = await _wait_state(client, job_id, {"running"})
            while not status.progress.get("epoch"):  # well inside training
                status = await client.status(job_id, since=status.seq, wait_s=10)
        daemon.kill()
        with Store.open(home.store_path) as store:  # the store opens after a power-cut-like kill
            job = store.get_job(job_id)
            assert job["state"] == "running" and job["attempts"] == 1
            assert store.get_dataset("digits") is not None
            assert store.get_blob(job["program_key"]) is not None
        daemon = start_daemon(home.path, *args)
        async with Client.connect(daemon.address, identity=scientist) as client:
            status = await client.status(job_id)
            assert status.state != "running" or status.seq > job["seq"]  # recovered on start, maybe running again
            status = await client.wait(job_id, timeout=300)
            assert status.state == final, status
            if final == "released":
                result = await client.result(job_id, dataset="digits", plan_hash=plan.hash)
                assert result.signoff.plan_hash == plan.hash
                assert result.metrics["accuracy"] > 0.5
            else:
                assert status.reason.startswith("interrupted")
        with Store.open(home.store_path) as store:
            assert store.get_job(job_id)["attempts"] == max_attempts
            entries = store.ledger_entries()
        # the ledger verifies, and the job's reservation was closed exactly once: settled if it ran, else refunded
        from hivecell.crypto.record import open_record
        from hivecell.node.ledger import verify_chain

        verify_chain(entries, signer=daemon.peer_id)
        kinds = [f["kind"] for f in (open_record(e, domain="ledger", check_times=False).fields() for e in entries)
                 if f.get("job_id") == job_id]
        assert kinds == ["reserve", "settle" if final == "released" else "refund"]
    finally:
        daemon.stop()


async def test_clean_stop_requeues_without_using_an_attempt(home, plan_factory):
    daemon = start_daemon(home.path, "--warm-workers", "0")
    try:
        async with Client.connect(daemon.address) as client:
            job_id = await client.submit("digits", plan_factory(epochs=200))
            await _wait_state(client, job_id, {"running"})
        daemon.stop()  # SIGTERM, as systemd or docker stop send it
        assert daemon.process.returncode == 0, daemon.log_tail()
        with Store.open(home.store_path) as store:
            job = store.get_job(job_id)
        assert job["state"] == "queued" and job["attempts"] == 0 and "stopped" in job["reason"]
    finally:
        daemon.stop()


async def test_a_scientist_cannot_flood_the_queue(home, plan_factory):
    from hivecell.mesh.host import RemoteError
    from hivecell.mesh.message import ErrorCode

    daemon = start_daemon(home.path, "--warm-workers", "0", "--max-queued-per-peer", "2", "--worker-timeout", "60")
    plan = plan_factory(epochs=500)
    try:
        async with Client.connect(daemon.address) as client, Client.connect(daemon.address) as other:
            outcomes = []
            for _ in range(5):
                try:
                    outcomes.append(await client.submit("digits", plan))
                except RemoteError as exc:
                    outcomes.append(exc.code)
            assert outcomes.count(ErrorCode.BUSY) >= 2 and len(set(outcomes) - {ErrorCode.BUSY}) >= 2
            assert len(await other.submit("digits", plan)) == 32  # another scientist is not starved

        # Eight submits at once from a third scientist: the limit holds for requests checked concurrently too.
        async with Client.connect(daemon.address) as burst:
            codes = []

            async def one() -> None:
                try:
                    codes.append(len(await burst.submit("digits", plan)))
                except RemoteError as exc:
                    codes.append(exc.code)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
            assert codes.count(32) == 2 and codes.count(ErrorCode.BUSY) == 6, codes
    finally:
        daemon.stop()
