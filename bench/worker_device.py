"""The Worker on the CPU against the Worker on the GPU, with the same jobs; prints one JSON object.

Runs real Worker subprocesses (``open_worker_pool``) with ``gpu = off`` and ``gpu = on`` over a bare store holding
scikit-learn's digits, and times, for each device: the worker's start (the CUDA context is created there), a
federation's rounds on one reused worker (the demo CNN, E=1, batch 16, SGD lr 0.05, as issue 4's "fedavg-digits"),
a longer job (5 epochs, Adam, batch 32), a DP-SGD epoch and an evaluate job. The job times are the Worker's own
``train_s``/``eval_s``; ``wall_s`` is the whole ``run_job`` call as the daemon sees it. Accuracy is reported for both
devices so a GPU result that trains worse shows up.

Where torch sees no CUDA device only the CPU half runs and ``cuda`` is ``null``, with the reason.

Usage: ``python bench/worker_device.py [--rounds 5] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio
from hivecell.node.plan import build_plan
from hivecell.node.store import Store
from hivecell.node.workerpool import WorkerJob, WorkerLimits, open_worker_pool
from hivecell.node.zoo import DigitsCNN, digits_example_input

FEDAVG = {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 16, "seed": 0}
LONG = {"optimizer": "adam", "lr": 0.01, "epochs": 5, "batch_size": 32, "seed": 1}
DP = {"optimizer": "sgd", "lr": 0.5, "epochs": 1, "batch_size": 64, "seed": 1,
      "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}}
EVALUATE = {"kind": "evaluate", "metrics": ["accuracy", "loss"], "batch_size": 128}


def make_store(root: Path) -> tuple[str, str]:
    from safetensors.numpy import save
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    with Store.open(root) as store:
        store.add_dataset({"name": "digits", "tags": ["digits"]}, save({"features": features, "labels": labels}))
        return str(root), store.get_dataset("digits")["data_key"]


def _plan(recipe: dict):
    import torch

    torch.manual_seed(0)
    return build_plan(DigitsCNN(), digits_example_input(), recipe)


async def measure(gpu: str, store: tuple[str, str], rounds: int) -> dict[str, Any]:
    limits = WorkerLimits(wall_s=600, memory_mb=8192)

    def job(plan, job_id: str, reuse: str | None = None) -> WorkerJob:
        return WorkerJob(job_id=job_id, store_path=store[0], data_key=store[1], program=plan.program,
                         weights=plan.weights, recipe=plan.recipe, reuse_key=reuse)

    async def timed(pool, plan, job_id: str, reuse: str | None = None) -> tuple[float, Any]:
        t0 = time.perf_counter()
        result = await pool.run_job(job(plan, job_id, reuse), limits=limits)
        return time.perf_counter() - t0, result

    out: dict[str, Any] = {}
    async with open_worker_pool(warm=0, gpu=gpu) as pool:
        fedavg = _plan(FEDAVG)
        first_wall, first = await timed(pool, fedavg, f"{gpu}-r0", reuse="fed")
        out["device"] = first.device
        out["first_round"] = {"wall_s": round(first_wall, 4),
                              "worker_start_s": first.timings.get("worker_start_s"),
                              "train_s": first.timings.get("train_s")}
        walls, trains = [], []
        for r in range(1, rounds + 1):
            wall, res = await timed(pool, fedavg, f"{gpu}-r{r}", reuse="fed")
            assert res.timings.get("worker_reused") == 1.0, "the federation's worker was not reused"
            walls.append(wall)
            trains.append(res.timings.get("train_s", 0.0) + res.timings.get("eval_s", 0.0))
        out["fedavg_round"] = {"rounds": rounds, "wall_s_median": round(statistics.median(walls), 4),
                               "train_s_median": round(statistics.median(trains), 4),
                               "accuracy": res.metrics.get("accuracy")}
        wall, long = await timed(pool, _plan(LONG), f"{gpu}-long")
        out["long_job"] = {"epochs": LONG["epochs"], "wall_s": round(wall, 4),
                           "train_s": long.timings.get("train_s"), "accuracy": long.metrics.get("accuracy")}
        wall, private = await timed(pool, _plan(DP), f"{gpu}-dp")
        out["dp_epoch"] = {"wall_s": round(wall, 4), "train_s": private.timings.get("train_s"),
                           "epsilon": private.metrics.get("epsilon")}
        evaluate = _plan(EVALUATE)
        wall, scored = await timed(pool, evaluate, f"{gpu}-eval")
        out["evaluate"] = {"wall_s": round(wall, 4), "accuracy": scored.metrics.get("accuracy")}
        out["pool_device"] = pool.device
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="federation rounds on one reused worker (default 5)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    import torch

    report: dict[str, Any] = {"benchmark": "worker_device", "torch": torch.__version__,
                              "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="hivecell-bench-") as tmp:
        store = make_store(Path(tmp) / "store")
        report["cpu"] = trio.run(measure, "off", store, args.rounds)
        if torch.cuda.is_available():
            report["gpu_name"] = torch.cuda.get_device_name(0)
            report["cuda"] = trio.run(measure, "on", store, args.rounds)
            cpu, gpu = report["cpu"], report["cuda"]
            report["speedup_cuda_over_cpu"] = {
                "fedavg_round_train": round(cpu["fedavg_round"]["train_s_median"]
                                            / max(gpu["fedavg_round"]["train_s_median"], 1e-9), 2),
                "long_job_train": round(cpu["long_job"]["train_s"] / max(gpu["long_job"]["train_s"], 1e-9), 2),
                "dp_epoch_train": round(cpu["dp_epoch"]["train_s"] / max(gpu["dp_epoch"]["train_s"], 1e-9), 2),
            }
        else:
            report["cuda"] = None
            report["cuda_reason"] = "torch sees no CUDA device here: only the CPU half ran"
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
