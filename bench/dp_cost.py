"""Cost of DP-SGD against non-private SGD for the demo CNN; prints one JSON object.

Goal (issue 3): an epoch of DP-SGD (per-sample gradients, clipping, Gaussian noise, Poisson sampling) takes at most 2x
the time of a non-private epoch. Both run in this process, with the same thread count, with the Worker's own training
functions (``_run_sgd`` and ``_run_dp`` from ``node/worker.py``) on the exported program (``ep.module()``) of
``DigitsCNN``, on the first of the demo's digits shards, with the same recipe (Adam, batch 32) and the same training
rows: ``eval_fraction`` is 0 for both, since a DP recipe holds no rows out (``validate_recipe``) and a non-private
one would otherwise train on 20% fewer rows. A non-private epoch visits every training example once in
``ceil(n / 32)`` steps; a DP epoch takes the same number of steps with Poisson batches of expected size 32, so both see
the same number of samples on average.

Each round runs one epoch of each (a one-epoch job, on the same module and optimizer as the rounds before), the order
alternating from round to round, so that load from other processes falls on both alike; the first round warms caches
up and is not counted. The time per epoch is the median of the ``seconds`` the progress frames report. Time a job
spends outside its epochs (the DP accountant, building the per-sample gradient function) is reported apart, as
``*_setup_s``.

Usage: ``python bench/dp_cost.py [--epochs 11] [--threads 2] [--shards 4]``.
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


def _job(recipe_dict: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> tuple[Any, ...]:
    """What ``_run_job`` hands to the training functions: recipe, module, loss, optimizer, training rows."""
    torch.manual_seed(0)
    plan = build_plan(DigitsCNN(), digits_example_input(), recipe_dict)
    recipe = validate_recipe(plan.recipe)
    module = load_program(plan.program, plan.weights)
    train_idx, _ = _split(x.shape[0], recipe.eval_fraction, recipe.seed)
    loss_fn = _make_loss(recipe, 10)
    optimizer = _make_optimizer(recipe, [p for p in module.parameters() if p.requires_grad])
    return recipe, module, loss_fn, optimizer, x[train_idx], y[train_idx]


def _one_epoch(run: Any, job: tuple[Any, ...]) -> tuple[float, float]:
    """Run a one-epoch job; returns (epoch seconds from its progress frame, seconds outside the epoch)."""
    progress = _Progress()
    started = time.monotonic()
    run(progress, *job)
    wall = time.monotonic() - started
    (frame,) = progress.frames
    return frame["seconds"], wall - frame["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=11, help="rounds of one epoch each (the first warms up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a Jetson-class CPU budget)")
    parser.add_argument("--shards", type=int, default=4, help="the demo's shard count; shard 0 is used")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first round is not timed)")
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on non-converging orders
    torch.set_num_threads(args.threads)

    x_np, y_np = digits_shards(args.shards)[0]
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    base = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 1, "seed": 0, "eval_fraction": 0.0}
    started = time.monotonic()
    runs = {"sgd": (_run_sgd, _job(base, x, y)), "dp": (_run_dp, _job({**base, "dp": DP}, x, y))}
    n_train = int(runs["sgd"][1][4].shape[0])
    assert n_train == runs["dp"][1][4].shape[0]  # the same rows, so the same steps and expected samples
    epochs: dict[str, list[float]] = {"sgd": [], "dp": []}
    setup: dict[str, list[float]] = {"sgd": [], "dp": []}
    for round_ in range(args.epochs):
        for name in ("sgd", "dp") if round_ % 2 == 0 else ("dp", "sgd"):
            epoch_s, setup_s = _one_epoch(*runs[name])
            if round_:  # the first round warms caches up
                epochs[name].append(epoch_s)
                setup[name].append(setup_s)
    sgd_s, dp_s = statistics.median(epochs["sgd"]), statistics.median(epochs["dp"])
    ratio = dp_s / sgd_s
    print(json.dumps({
        "model": "DigitsCNN", "train_samples": n_train, "batch_size": 32, "threads": args.threads,
        "epochs_timed": args.epochs - 1, "sgd_epoch_s": round(sgd_s, 4), "dp_sgd_epoch_s": round(dp_s, 4),
        "sgd_setup_s": round(statistics.median(setup["sgd"]), 4),
        "dp_setup_s": round(statistics.median(setup["dp"]), 4),
        "ratio": round(ratio, 2), "goal": GOAL, "meets_goal": ratio <= GOAL["ratio_max"],
        "torch": torch.__version__, "bench_s": round(time.monotonic() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
