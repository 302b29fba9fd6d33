"""Cost of DP-SGD against non-private SGD for the demo CNN; prints one JSON object.

Goal (issue 3): an epoch of DP-SGD (per-sample gradients with ``torch.func``, clipping, Gaussian noise, Poisson
sampling) takes at most 2x the time of a non-private epoch. Both run in this process with the Worker's own training
functions (``_run_sgd`` and ``_run_dp`` from ``node/worker.py``) on the exported program (``ep.module()``) of
``DigitsCNN``, on the first of the demo's digits shards, with the same recipe (Adam, batch 32, the train/eval split
the Worker uses): a non-private epoch visits every training example once in ``ceil(n / 32)`` steps, a DP epoch takes
the same number of steps with Poisson batches of expected size 32, so both see the same number of samples on average.
The time per epoch is the median of the per-epoch ``seconds`` the progress frames report, after one warm-up epoch.

Usage: ``python bench/dp_cost.py [--epochs 5] [--threads 2] [--shards 4]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch

from hivecell.node.demo import digits_shards
from hivecell.node.plan import build_plan, load_program, validate_recipe
from hivecell.node.worker import _make_loss, _make_optimizer, _run_dp, _run_sgd, _split
from hivecell.node.zoo import DigitsCNN, digits_example_input

GOAL = {"ratio_max": 2.0}
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


class _Progress:
    """Stands in for the Worker's frame channel: keeps the progress frames."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.frames.append(message)


def _epoch_seconds(recipe_dict: dict[str, Any], x: torch.Tensor, y: torch.Tensor, *, dp: bool) -> tuple[float, int]:
    torch.manual_seed(0)
    plan = build_plan(DigitsCNN(), digits_example_input(), recipe_dict)
    recipe = validate_recipe(plan.recipe)
    module = load_program(plan.program, plan.weights)
    train_idx, _ = _split(x.shape[0], recipe.eval_fraction, recipe.seed)
    loss_fn = _make_loss(recipe, 10)
    optimizer = _make_optimizer(recipe, [p for p in module.parameters() if p.requires_grad])
    progress = _Progress()
    run = _run_dp if dp else _run_sgd
    run(progress, recipe, module, loss_fn, optimizer, x[train_idx], y[train_idx])  # type: ignore[arg-type]
    seconds = [frame["seconds"] for frame in progress.frames[1:]]  # the first epoch warms caches up
    return statistics.median(seconds), int(train_idx.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a Jetson-class CPU budget)")
    parser.add_argument("--shards", type=int, default=4, help="the demo's shard count; shard 0 is used")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on non-converging orders
    torch.set_num_threads(args.threads)

    x_np, y_np = digits_shards(args.shards)[0]
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    base = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": args.epochs, "seed": 0}
    started = time.monotonic()
    sgd_s, n_train = _epoch_seconds(base, x, y, dp=False)
    dp_s, _ = _epoch_seconds({**base, "dp": DP}, x, y, dp=True)
    ratio = dp_s / sgd_s
    print(json.dumps({
        "model": "DigitsCNN", "train_samples": n_train, "batch_size": 32, "threads": args.threads,
        "epochs_timed": args.epochs - 1, "sgd_epoch_s": round(sgd_s, 4), "dp_sgd_epoch_s": round(dp_s, 4),
        "ratio": round(ratio, 2), "goal": GOAL, "meets_goal": ratio <= GOAL["ratio_max"],
        "torch": torch.__version__, "bench_s": round(time.monotonic() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
