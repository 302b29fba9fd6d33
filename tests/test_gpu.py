"""The Worker's GPU path, on a machine whose torch sees CUDA (a GPU lent to CI, a Jetson); skipped elsewhere.

CPU-only machines cover the rest of the path: ``gpu = auto`` trains on the CPU and ``gpu = on`` fails jobs clearly
(``test_worker.py``). Here: training, a federation's reused worker, DP-SGD and an evaluate job run on the GPU, the
weights come back as CPU tensors with the scientist's names, and the accuracy matches what the CPU reaches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hivecell.node.plan import Plan, apply_weights, build_plan
from hivecell.node.workerpool import WorkerJob, WorkerLimits, open_worker_pool
from hivecell.node.zoo import DigitsCNN, digits_example_input

if not torch.cuda.is_available():
    sys.stderr.write("\n*** test_gpu.py SKIPPED: torch sees no CUDA device here; the Worker's GPU path was not run ***\n")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not run here")


def _plan(recipe: dict) -> Plan:
    torch.manual_seed(0)
    return build_plan(DigitsCNN(), digits_example_input(), recipe)


def _job(store: tuple[Path, str], plan: Plan, job_id: str, reuse: str | None = None) -> WorkerJob:
    return WorkerJob(job_id=job_id, store_path=str(store[0]), data_key=store[1], program=plan.program,
                     weights=plan.weights, recipe=plan.recipe, reuse_key=reuse)


async def test_jobs_train_on_the_gpu(digits_store: tuple[Path, str]) -> None:
    plan = _plan({"optimizer": "adam", "lr": 0.01, "epochs": 5, "batch_size": 32, "seed": 1})
    limits = WorkerLimits(wall_s=600, memory_mb=8192)
    async with open_worker_pool(warm=0, gpu="off") as cpu_pool:
        on_cpu = await cpu_pool.run_job(_job(digits_store, plan, "cpu"), limits=limits)
    async with open_worker_pool(warm=0, gpu="on") as pool:
        first = await pool.run_job(_job(digits_store, plan, "gpu-1", reuse="fed"), limits=limits)
        assert pool.device["type"] == "cuda" and pool.device["memory_mb"] > 0 and not pool.device.get("problem")
        assert first.device == "cuda" and on_cpu.device == "cpu"
        assert abs(first.metrics["accuracy"] - on_cpu.metrics["accuracy"]) < 0.05
        apply_weights(DigitsCNN(), first.weights)  # CPU tensors with the scientist's names

        # A federation's next round: the parked worker keeps the rows and the program on the GPU.
        second = await pool.run_job(_job(digits_store, plan, "gpu-2", reuse="fed"), limits=limits)
        assert second.timings["worker_reused"] == 1.0 and second.device == "cuda"
        assert second.worker_pid == first.worker_pid

        dp = _plan({"optimizer": "sgd", "lr": 0.5, "epochs": 1, "batch_size": 64, "seed": 1,
                    "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}})
        private = await pool.run_job(_job(digits_store, dp, "gpu-dp"), limits=limits)
        assert private.device == "cuda" and private.metrics["epsilon"] > 0

        evaluate = _plan({"kind": "evaluate", "metrics": ["accuracy", "loss"], "batch_size": 128})
        scored = await pool.run_job(_job(digits_store, evaluate, "gpu-eval"), limits=limits)
        assert scored.device == "cuda" and 0.0 <= scored.metrics["accuracy"] <= 1.0


async def test_a_jobs_memory_limit_does_not_count_the_cuda_context(digits_store: tuple[Path, str]) -> None:
    """The CUDA context maps host memory of its own (hundreds of MB of RSS, more of private mappings) before any job:
    a job's ``memory_mb`` means on a GPU node what it means on a CPU one, and a job far over it still fails."""
    plan = _plan({"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 16, "seed": 0})
    async with open_worker_pool(warm=0, gpu="on") as pool:
        small = await pool.run_job(_job(digits_store, plan, "gpu-small"),
                                   limits=WorkerLimits(wall_s=600, memory_mb=1024))
        assert small.device == "cuda" and small.metrics["train_samples"] > 0
        assert pool.device["context_mb"] > 0
