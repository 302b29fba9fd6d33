"""Workers forked from a zygote (``worker.py --zygote``): real interpreters, real torch, a real LMDB store."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import trio

from hivecell.node.plan import Plan, build_plan
from hivecell.node.workerpool import WorkerFailed, WorkerJob, WorkerLimits, fork_supported, open_worker_pool
from hivecell.node.zoo import DigitsCNN, digits_example_input

pytestmark = pytest.mark.skipif(not fork_supported(), reason="needs Linux 5.3+ (pidfds) to fork workers")


@pytest.fixture(scope="module")
def quick_plan() -> Plan:
    import torch

    torch.manual_seed(0)
    return build_plan(DigitsCNN(), digits_example_input(),
                      {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 32, "seed": 1})


def _job(store: tuple[Path, str], plan: Plan, job_id: str, **recipe) -> WorkerJob:
    path, key = store
    return WorkerJob(job_id=job_id, store_path=str(path), data_key=key, program=plan.program, weights=plan.weights,
                     recipe={**plan.recipe, **recipe})


def _processes() -> dict[str, list[psutil.Process]]:
    """Our descendants running the worker module, by name: the zygote and the workers it forked."""
    found: dict[str, list[psutil.Process]] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if "hivecell.node.worker" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.setdefault(child.name(), []).append(child)
        except psutil.NoSuchProcess:
            pass
    return found


async def test_workers_are_forked_from_one_zygote(digits_store: tuple[Path, str], quick_plan: Plan) -> None:
    async with open_worker_pool(warm=1) as pool:
        await pool.wait_warm()
        procs = _processes()
        (zygote,) = procs["hivecell-zygote"]
        (spare,) = procs["hivecell-worker"]
        assert zygote.ppid() == os.getpid() and spare.ppid() == zygote.pid
        # The spare holds its three pipes and the frame descriptor, nothing else of the zygote's.
        fds = {int(fd) for fd in os.listdir(f"/proc/{spare.pid}/fd")}
        assert len(fds) == 4 and {0, 1, 2} < fds
        assert os.readlink(f"/proc/{spare.pid}/fd/0").startswith("pipe:")
        assert os.getpgid(spare.pid) == spare.pid  # a session of its own: the pool kills its whole group
        if os.geteuid() == 0:  # the zygote dropped the network before forking; the spare is in that namespace
            assert os.readlink(f"/proc/{spare.pid}/ns/net") != os.readlink("/proc/self/ns/net")

        first = await pool.run_job(_job(digits_store, quick_plan, "z-1"), limits=WorkerLimits(wall_s=300))
        assert first.worker_pid == spare.pid and first.metrics["epochs"] == 1
        await pool.wait_warm()  # the replacement is forked at once, from the same zygote
        second = await pool.run_job(_job(digits_store, quick_plan, "z-2"), limits=WorkerLimits(wall_s=300))
        assert second.worker_pid != first.worker_pid
        assert [p.pid for p in _processes()["hivecell-zygote"]] == [zygote.pid]

        # Exit statuses come from the zygote, which reaps its children: a job past its CPU-time limit dies of
        # SIGXCPU, and the pool tells it from a crash.
        await pool.wait_warm()
        with pytest.raises(WorkerFailed) as failed:
            await pool.run_job(_job(digits_store, quick_plan, "z-3", epochs=1000),
                               limits=WorkerLimits(wall_s=300, cpu_s=2))
        assert failed.value.code == "timeout" and "CPU-time" in failed.value.reason
    assert _processes() == {}  # the zygote and the last spare are killed and reaped with the pool


async def test_a_killed_zygote_is_replaced_and_its_spare_still_serves(digits_store: tuple[Path, str],
                                                                       quick_plan: Plan) -> None:
    async with open_worker_pool(warm=1) as pool:
        await pool.wait_warm()
        (zygote,) = _processes()["hivecell-zygote"]
        (spare,) = _processes()["hivecell-worker"]
        zygote.send_signal(signal.SIGKILL)
        with trio.fail_after(30):
            while zygote.is_running() and zygote.status() != psutil.STATUS_ZOMBIE:
                await trio.sleep(0.05)
        # The spare outlives its zygote; its result counts though no one can read its exit status any more.
        first = await pool.run_job(_job(digits_store, quick_plan, "k-1"), limits=WorkerLimits(wall_s=300))
        assert first.worker_pid == spare.pid
        await pool.wait_warm()  # the next spare comes from a new zygote
        (again,) = _processes()["hivecell-zygote"]
        (spare,) = _processes()["hivecell-worker"]
        assert again.pid != zygote.pid and spare.ppid() == again.pid
        second = await pool.run_job(_job(digits_store, quick_plan, "k-2"), limits=WorkerLimits(wall_s=300))
        assert second.worker_pid == spare.pid and second.metrics["epochs"] == 1
    assert _processes() == {}


@pytest.mark.parametrize(("warm", "fork"), [(1, True), (1, False), (0, True)])
async def test_a_broken_interpreter_fails_jobs_and_the_pool_lives(warm: int, fork: bool,
                                                                   digits_store: tuple[Path, str],
                                                                   quick_plan: Plan) -> None:
    """No worker can start (the interpreter exits at once): jobs fail with a clear code, the pool keeps trying with
    back-off instead of dying, and closes cleanly."""
    async with open_worker_pool(warm=warm, fork=fork, python="/bin/false", start_timeout=1) as pool:
        with pytest.raises(WorkerFailed) as failed:
            await pool.run_job(_job(digits_store, quick_plan, "b-1"), limits=WorkerLimits(wall_s=60))
        assert failed.value.code == "crashed"
        with pytest.raises(WorkerFailed):  # and again: nothing broke in the pool
            await pool.run_job(_job(digits_store, quick_plan, "b-2"), limits=WorkerLimits(wall_s=60))
