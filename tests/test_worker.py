"""The Worker and its pool, end to end: real interpreters, real torch, a real LMDB store."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch
import trio

from hivecell.node.plan import Plan, apply_weights, build_plan
from hivecell.node.workerpool import WorkerFailed, WorkerJob, WorkerLimits, WorkerResult, open_worker_pool
from hivecell.node.zoo import DigitsCNN, digits_example_input


@pytest.fixture(scope="module")
def digits_plan() -> Plan:
    torch.manual_seed(0)
    return build_plan(DigitsCNN(), digits_example_input(),
                      {"optimizer": "adam", "lr": 0.01, "epochs": 15, "batch_size": 32, "seed": 1})


def _job(store: tuple[Path, str], plan: Plan, *, recipe: dict | None = None, data_key: str | None = None,
         job_id: str = "job-1") -> WorkerJob:
    path, key = store
    return WorkerJob(job_id=job_id, store_path=str(path), data_key=data_key or key, program=plan.program,
                     weights=plan.weights, recipe=recipe or plan.recipe)


def _worker_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            # (the zygote that forks them has the same command line; its name tells it apart)
            if "hivecell.node.worker" in " ".join(child.cmdline()) and child.name() != "hivecell-zygote":
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


async def test_train_digits_with_warm_spares(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    progress: list[dict] = []
    quick = {**digits_plan.recipe, "epochs": 1}
    async with open_worker_pool(warm=1) as pool:
        result = await pool.run_job(_job(digits_store, digits_plan), limits=WorkerLimits(wall_s=600, threads=2),
                                    on_progress=progress.append)
        assert [p["epoch"] for p in progress] == list(range(1, 16))
        assert all(p["epochs"] == 15 and p["loss"] > 0 for p in progress)
        assert progress[-1]["loss"] < progress[0]["loss"]
        assert result.metrics["accuracy"] > 0.8
        assert result.metrics["eval_samples"] == 359 and result.metrics["train_samples"] == 1797 - 359
        assert set(result.timings) >= {"load_s", "train_s", "eval_s", "worker_wait_s", "worker_start_s"}
        apply_weights(DigitsCNN(), result.weights)  # same FQNs as the scientist's module
        if not torch.cuda.is_available():  # gpu = auto, the default, on a box without CUDA
            assert result.device == "cpu" and pool.device == {"type": "cpu"}

        # The first job claimed the spare and the pool started a replacement at once: once that one is ready, the
        # next job gets it without paying the interpreter + torch start-up.
        await pool.wait_warm()
        second = await pool.run_job(_job(digits_store, digits_plan, recipe=quick, job_id="job-2"),
                                    limits=WorkerLimits(wall_s=600))
        assert second.timings["worker_wait_s"] < second.timings["worker_start_s"]

        # A spare that dies while it waits is replaced, and the next job runs on the replacement.
        await pool.wait_warm()
        (spare,) = _worker_children()
        spare.kill()
        try:  # let the kernel finish it (a zombie); the pool reaps it and starts a replacement
            while spare.status() != psutil.STATUS_ZOMBIE:
                await trio.sleep(0.01)
        except psutil.NoSuchProcess:
            pass
        third = await pool.run_job(_job(digits_store, digits_plan, recipe=quick, job_id="job-3"),
                                   limits=WorkerLimits(wall_s=600))
        assert third.metrics["epochs"] == 1
        assert spare.pid not in {p.pid for p in _worker_children()}
    assert _worker_children() == []  # the pool killed and reaped its last spare


class MemoryHog(torch.nn.Module):
    """Passes the audit (expand + contiguous), then asks for ~80 GB in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], 64)
        huge = flat.reshape(x.shape[0], 64, 1).expand(x.shape[0], 64, 10_000_000).contiguous()
        return self.fc(flat) + huge.sum() * 0


async def test_cold_workers_and_failures(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    """Several cold workers at once: one succeeds, the others fail each in their own way."""
    hog = build_plan(MemoryHog(), digits_example_input())
    evil = WorkerJob("evil", str(digits_store[0]), digits_store[1],
                     digits_plan.program.replace(b"torch.ops.aten.relu.default", b"torch.ops.aten.from_file.default"),
                     digits_plan.weights, digits_plan.recipe)
    jobs = {
        "ok": (_job(digits_store, digits_plan, recipe={**digits_plan.recipe, "epochs": 1}), WorkerLimits(wall_s=120)),
        "timeout": (_job(digits_store, digits_plan, recipe={**digits_plan.recipe, "epochs": 1000}),
                    WorkerLimits(wall_s=3)),
        "memory": (_job(digits_store, hog), WorkerLimits(wall_s=60, memory_mb=1024)),
        "bad_data": (_job(digits_store, digits_plan, data_key="0" * 64), WorkerLimits(wall_s=60)),
        # A daemon audits before it runs a job; the worker audits again on its own.
        "bad_plan": (evil, WorkerLimits(wall_s=60)),
    }
    outcomes: dict[str, object] = {}

    async def run(name: str, job: WorkerJob, limits: WorkerLimits) -> None:
        try:
            outcomes[name] = await pool.run_job(job, limits=limits)
        except WorkerFailed as exc:
            outcomes[name] = exc

    async with open_worker_pool(warm=0) as pool:
        async with trio.open_nursery() as nursery:
            for name, (job, limits) in jobs.items():
                nursery.start_soon(run, name, job, limits)
    ok = outcomes.pop("ok")
    assert isinstance(ok, WorkerResult)
    assert ok.timings["worker_wait_s"] >= ok.timings["worker_start_s"] > 0  # no spare: it waited for its own start
    for name, failure in outcomes.items():
        assert isinstance(failure, WorkerFailed), name
        assert failure.code == name, (name, failure.code, failure.reason)
    assert "from_file" in outcomes["bad_plan"].reason
    assert _worker_children() == []  # every worker, the timed-out one included, was killed and reaped


def test_worker_refuses_an_unknown_gpu_choice() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hivecell.node.worker", "--gpu", "maybe"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert proc.returncode == 2 and "--gpu must be one of auto, on, off" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this box has CUDA: gpu = on is satisfied here")
async def test_gpu_on_without_cuda_fails_jobs_with_a_clear_error(digits_store: tuple[Path, str],
                                                                 digits_plan: Plan) -> None:
    """gpu = on is a requirement: on a box where torch sees no CUDA the worker still starts (so the pool does not
    spin restarting it), says why in its ready frame, and fails every job with that reason rather than quietly
    training on the CPU."""
    quick = {**digits_plan.recipe, "epochs": 1}
    async with open_worker_pool(warm=0, gpu="on") as pool:
        with pytest.raises(WorkerFailed) as info:
            await pool.run_job(_job(digits_store, digits_plan, recipe=quick), limits=WorkerLimits(wall_s=120))
        assert info.value.code == "error"
        assert "requires a GPU (gpu = on) but torch sees no CUDA device" in info.value.reason
        assert pool.device["type"] == "cpu" and "gpu = on" in pool.device["problem"]
    with pytest.raises(ValueError, match="gpu must be auto, on or off"):
        async with open_worker_pool(warm=0, gpu="yes"):
            pass
