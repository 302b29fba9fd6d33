"""Evaluate jobs: the recipe, the price, real Workers measuring a model on every row (exact, and with Gaussian noise),
and a real daemon charging the ledger for it. DP training jobs release no metrics computed on private rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trio

from hivecell.crypto.record import open_record
from hivecell.mesh.host import RemoteError
from hivecell.mesh.message import ErrorCode
from hivecell.node.client import Client
from hivecell.node.plan import EvalDpSpec, EvalRecipe, PlanError, build_plan, plan_hash, validate_recipe
from hivecell.node.privacy import EVAL_SENSITIVITY, eval_dp_plan, eval_epsilon, price_job
from hivecell.node.store import Store
from hivecell.node.workerpool import WorkerJob, WorkerLimits, WorkerResult, open_worker_pool
from hivecell.node.zoo import DigitsCNN, digits_example_input

from conftest import home_of

EVAL_DP = {"noise_multiplier": 2.0, "max_loss": 10.0, "delta": 1e-5}

# -- recipe -----------------------------------------------------------------------------------------------------------


def test_evaluate_recipe_defaults_and_form() -> None:
    recipe = validate_recipe({"kind": "evaluate"})
    assert isinstance(recipe, EvalRecipe) and recipe.kind == "evaluate"
    assert recipe.to_dict() == {"kind": "evaluate", "task": "classification", "loss": "cross_entropy",
                                "metrics": ["accuracy", "loss", "confusion"], "batch_size": 32}
    regression = validate_recipe({"kind": "evaluate", "task": "regression", "batch_size": 256, "dp": EVAL_DP})
    assert regression.to_dict() == {"kind": "evaluate", "task": "regression", "loss": "mse", "metrics": ["loss"],
                                    "batch_size": 256, "dp": {"noise_multiplier": 2.0, "max_loss": 10.0,
                                                              "delta": 1e-5}}
    assert regression.dp == EvalDpSpec(max_loss=10.0, delta=1e-5, noise_multiplier=2.0)
    # metrics come back in vocabulary order; normalizing is idempotent
    picked = validate_recipe({"kind": "evaluate", "metrics": ["confusion", "accuracy"]}).to_dict()
    assert picked["metrics"] == ["accuracy", "confusion"] and validate_recipe(picked).to_dict() == picked
    targeted = validate_recipe({"kind": "evaluate", "dp": {"target_epsilon": 1, "max_loss": 5, "delta": 1e-6}})
    assert targeted.to_dict()["dp"] == {"target_epsilon": 1.0, "max_loss": 5.0, "delta": 1e-6}


def test_train_kind_is_the_default_and_never_hashed() -> None:
    recipe = {"optimizer": "adam", "lr": 0.01, "epochs": 15, "batch_size": 32, "seed": 1}
    expected = {"task": "classification", "loss": "cross_entropy", "optimizer": "adam", "lr": 0.01, "momentum": 0.0,
                "weight_decay": 0.0, "epochs": 15, "batch_size": 32, "metrics": ["accuracy", "loss"],
                "eval_fraction": 0.2, "seed": 1}
    assert validate_recipe(recipe).to_dict() == expected
    assert validate_recipe({**recipe, "kind": "train"}).to_dict() == expected
    assert validate_recipe(recipe).kind == "train"
    # pinned from the code before kinds existed (test_privacy pins the same hash)
    assert plan_hash(b"p", b"w", expected) == "f9bd89805602ed7fbb0340a5c72d66f4593ab6568bed0426c1950b92ed73e911"
    evaluate = validate_recipe({"kind": "evaluate"}).to_dict()
    assert plan_hash(b"p", b"w", evaluate) != plan_hash(b"p", b"w", expected)


@pytest.mark.parametrize(
    ("recipe", "key"),
    [
        ({"kind": "predict"}, "kind"),
        ({"kind": 1}, "kind"),
        *[({"kind": "evaluate", key: value}, f"{key} is a training key")
          for key, value in (("optimizer", "adam"), ("lr", 0.1), ("momentum", 0.0), ("weight_decay", 0.0),
                             ("epochs", 1), ("eval_fraction", 0.0), ("seed", 0))],
        ({"kind": "evaluate", "nope": 1}, "unknown recipe key"),
        ({"kind": "evaluate", "metrics": []}, "at least one"),
        ({"kind": "evaluate", "metrics": ["f1"]}, "confusion"),
        ({"kind": "evaluate", "metrics": ["loss", "loss"]}, "repeat"),
        ({"kind": "evaluate", "task": "regression", "metrics": ["confusion"]}, "confusion needs task"),
        ({"kind": "evaluate", "task": "regression", "metrics": ["accuracy"]}, "accuracy needs task"),
        ({"kind": "evaluate", "task": "regression", "loss": "cross_entropy"}, "cross_entropy"),
        ({"kind": "evaluate", "batch_size": 0}, "batch_size"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "noise_multiplier": -1.0}}, "dp.noise_multiplier"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "noise_multiplier": 0}}, "dp.noise_multiplier"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "noise_multiplier": 1e9}}, "dp.noise_multiplier"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "max_loss": 0}}, "dp.max_loss"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "max_loss": -1}}, "dp.max_loss"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "max_loss": 101}}, "dp.max_loss"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "max_loss": float("inf")}}, "dp.max_loss"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "delta": 0}}, "dp.delta"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "delta": 0.5}}, "dp.delta"),
        ({"kind": "evaluate", "dp": {"noise_multiplier": 1.0, "max_loss": 1.0}}, "dp.delta is required"),
        ({"kind": "evaluate", "dp": {"noise_multiplier": 1.0, "delta": 1e-5}}, "dp.max_loss is required"),
        ({"kind": "evaluate", "dp": {"max_loss": 1.0, "delta": 1e-5}}, "exactly one"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "target_epsilon": 1.0}}, "exactly one"),
        ({"kind": "evaluate", "dp": {"target_epsilon": 0, "max_loss": 1.0, "delta": 1e-5}}, "dp.target_epsilon"),
        ({"kind": "evaluate", "dp": {"target_epsilon": 1e4, "max_loss": 1.0, "delta": 1e-5}}, "dp.target_epsilon"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "max_grad_norm": 1.0}}, "max_grad_norm is for training"),
        ({"kind": "evaluate", "dp": {**EVAL_DP, "clip": 1}}, "unknown dp key"),
        ({"kind": "evaluate", "dp": [1]}, "dp must be a map"),
        # the training dp section is unchanged: max_loss belongs to evaluate recipes
        ({"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "max_loss": 1.0}}, "unknown dp key"),
    ],
)
def test_evaluate_recipe_refused(recipe: dict, key: str) -> None:
    with pytest.raises(PlanError) as info:
        validate_recipe(recipe)
    assert info.value.code == "bad_recipe" and key in info.value.message


def test_evaluate_plan_builds_and_hashes() -> None:
    recipe = {"kind": "evaluate", "dp": EVAL_DP}
    plan = build_plan(DigitsCNN(), digits_example_input(), recipe)
    assert plan.recipe == validate_recipe(recipe).to_dict()
    assert plan.hash == plan_hash(plan.program, plan.weights, plan.recipe)
    assert plan.hash != build_plan(DigitsCNN(), digits_example_input(), {"kind": "evaluate"}).hash


def test_evaluate_price() -> None:
    """Priced as one Gaussian mechanism whatever the dataset's size; no dp: no bound (inf, 0)."""
    recipe = validate_recipe({"kind": "evaluate", "dp": EVAL_DP}).to_dict()
    assert price_job(recipe, 100) == price_job(recipe, 10**6) == (eval_epsilon(noise_multiplier=2.0, delta=1e-5), 1e-5)
    assert price_job(validate_recipe({"kind": "evaluate"}).to_dict(), 100) == (math.inf, 0.0)
    targeted = eval_dp_plan({"kind": "evaluate", "dp": {"target_epsilon": 0.5, "max_loss": 1.0, "delta": 1e-5}})
    assert targeted.epsilon <= 0.5 and targeted.noise_std == targeted.noise_multiplier * math.sqrt(2)
    with pytest.raises(PlanError) as info:
        eval_dp_plan({"kind": "evaluate", "dp": {"target_epsilon": 1e-3, "max_loss": 1.0, "delta": 1e-5}})
    assert info.value.code == "bad_recipe" and "cannot be reached" in info.value.message
    with pytest.raises(PlanError):
        eval_dp_plan({"kind": "evaluate"})  # nothing to price


# -- a real Worker ----------------------------------------------------------------------------------------------------


def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = torch.from_numpy((digits.images / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    return features, torch.from_numpy(digits.target.astype(np.int64))


def _trained_model() -> DigitsCNN:
    """DigitsCNN after a short local training on the digits (a confusion matrix with a clear diagonal)."""
    torch.manual_seed(0)
    model = DigitsCNN()
    features, labels = _all_digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for start in range(0, features.shape[0], 64):
            optimizer.zero_grad()
            F.cross_entropy(model(features[start : start + 64]), labels[start : start + 64]).backward()
            optimizer.step()
    return model.eval()


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture(scope="module")
def regression_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, torch.Tensor, torch.Tensor]:
    from safetensors.numpy import save

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32) + rng.normal(size=500).astype(np.float32))
    path = tmp_path_factory.mktemp("regression")
    with Store.open(path) as store:
        store.add_dataset({"name": "lin", "tags": []}, save({"features": x, "labels": y}))
        key = store.get_dataset("lin")["data_key"]
    return path, key, torch.from_numpy(x), torch.from_numpy(y)


SMALL_NOISE = {"noise_multiplier": 0.5, "max_loss": 10.0, "delta": 1e-5}
LARGE_NOISE = {"noise_multiplier": 100.0, "max_loss": 10.0, "delta": 1e-5}


@pytest.fixture(scope="module")
def evaluated(digits_store: tuple[Path, str], regression_store) -> dict[str, object]:
    """Every evaluate job of the Worker tests, run once, side by side, in real Workers: name -> (result, model)."""
    digits_model = _trained_model()
    torch.manual_seed(1)
    linear = Linear()
    jobs = {
        "exact": (digits_model, digits_store, {"kind": "evaluate", "batch_size": 100}),
        "small": (digits_model, digits_store, {"kind": "evaluate", "dp": SMALL_NOISE}),
        "large": (digits_model, digits_store, {"kind": "evaluate", "dp": LARGE_NOISE}),
        "accuracy_only": (digits_model, digits_store, {"kind": "evaluate", "metrics": ["accuracy"], "dp": SMALL_NOISE}),
        "regression": (linear, regression_store[:2], {"kind": "evaluate", "task": "regression", "loss": "l1"}),
        "regression_dp": (linear, regression_store[:2], {"kind": "evaluate", "task": "regression", "dp": SMALL_NOISE}),
    }
    results: dict[str, object] = {}

    async def main() -> None:
        async with open_worker_pool(warm=0) as pool, trio.open_nursery() as nursery:
            for name, (model, (path, key), recipe) in jobs.items():
                example = digits_example_input() if isinstance(model, DigitsCNN) else torch.zeros(2, 4)
                plan = build_plan(model, example, recipe)
                job = WorkerJob(name, str(path), key, plan.program, plan.weights, plan.recipe)

                async def run(name: str = name, job: WorkerJob = job) -> None:
                    results[name] = await pool.run_job(job, limits=WorkerLimits(wall_s=120, threads=1))

                nursery.start_soon(run)

    trio.run(main)
    return {name: (results[name], jobs[name][0]) for name in jobs}


def _exact_digits(model: DigitsCNN, max_loss: float | None = None) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean loss (each example's clipped to ``max_loss`` if given) and confusion counts, computed here."""
    features, labels = _all_digits()
    with torch.no_grad():
        output = model(features)
    losses = F.cross_entropy(output, labels, reduction="none").double()
    if max_loss is not None:
        losses = losses.clamp(max=max_loss)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), output.argmax(dim=1).numpy()), 1)
    return float((output.argmax(dim=1) == labels).double().mean()), float(losses.mean()), confusion


def test_evaluate_without_dp_is_exact(evaluated) -> None:
    result, model = evaluated["exact"]
    assert isinstance(result, WorkerResult) and result.weights == b""
    accuracy, loss, confusion = _exact_digits(model)
    m = result.metrics
    assert m["evaluated_on"] == "all" and m["samples"] == 1797
    assert m["accuracy"] == pytest.approx(accuracy, abs=1e-12) and 0.5 < accuracy < 1.0
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    assert np.array_equal(np.array(m["confusion"]), confusion)
    assert "epsilon" not in m and set(result.timings) >= {"load_s", "eval_s"}


def _noise_bounds(std: float, k: int) -> tuple[float, float, float]:
    """Six standard deviations of the noise on one cell, on the diagonal's sum (k cells) and on all k x k cells."""
    return 6 * std, 6 * std * math.sqrt(k), 6 * std * k


def test_evaluate_with_small_noise_is_close(evaluated) -> None:
    result, model = evaluated["small"]
    accuracy, loss, confusion = _exact_digits(model, max_loss=10.0)
    m = result.metrics
    n = 1797
    std = 0.5 * EVAL_SENSITIVITY
    cell, diagonal, total = _noise_bounds(std, 10)
    # |acc^ - acc| <= (|e_trace| + acc |e_n|) / (n - |e_n|), and the same shape for the loss (e_loss scaled by 10)
    assert m["accuracy"] == pytest.approx(accuracy, abs=(diagonal + accuracy * total) / (n - total))
    assert m["loss"] == pytest.approx(loss, abs=(cell * 10.0 + loss * total) / (n - total))
    noisy = np.array(m["confusion"])
    assert noisy.shape == (10, 10) and noisy.dtype == np.float64
    assert np.all(np.abs(noisy - confusion) <= cell + 0.005)
    assert abs(noisy.sum() - n) <= total + 0.5  # 100 cells rounded to 2 decimals
    assert m["samples"] == pytest.approx(noisy.sum(), abs=0.51)
    priced = eval_dp_plan({"kind": "evaluate", "dp": SMALL_NOISE})
    assert (m["epsilon"], m["delta"], m["noise_multiplier"]) == (priced.epsilon, 1e-5, 0.5)
    assert m["evaluated_on"] == "all" and result.weights == b""


def test_evaluate_with_large_noise_stays_in_range(evaluated) -> None:
    result, model = evaluated["large"]
    accuracy, loss, _ = _exact_digits(model, max_loss=10.0)
    m = result.metrics
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["loss"] <= 10.0 and m["samples"] >= 1.0
    assert (m["accuracy"], m["loss"]) != (accuracy, loss)  # noise of std 141 per count: never the exact values
    assert all(v == round(v, 2) for row in m["confusion"] for v in row)
    assert m["epsilon"] == eval_epsilon(noise_multiplier=100.0, delta=1e-5) < 0.05


def test_evaluate_without_confusion_counts_right_and_wrong(evaluated) -> None:
    """Asked for accuracy only, the cells are (correct, wrong): two noisy counts instead of a hundred."""
    result, model = evaluated["accuracy_only"]
    accuracy, _, _ = _exact_digits(model)
    m = result.metrics
    cell, _, _ = _noise_bounds(0.5 * EVAL_SENSITIVITY, 2)
    assert set(m) == {"accuracy", "samples", "evaluated_on", "epsilon", "delta", "noise_multiplier", "max_loss"}
    # acc^ - acc = ((1 - acc) e_right - acc e_wrong) / (n + e_right + e_wrong)
    assert m["accuracy"] == pytest.approx(accuracy, abs=cell / (1797 - 2 * cell))


def test_evaluate_regression(evaluated, regression_store) -> None:
    _, _, x, y = regression_store
    exact, model = evaluated["regression"]
    with torch.no_grad():
        output = model(x).squeeze(-1)
    assert exact.metrics["loss"] == pytest.approx(float(F.l1_loss(output, y)), rel=1e-5)
    assert exact.metrics["samples"] == 500 and "accuracy" not in exact.metrics and "confusion" not in exact.metrics
    noisy, _ = evaluated["regression_dp"]
    mse = float(F.mse_loss(output, y, reduction="none").clamp(max=10.0).double().mean())
    cell = 6 * 0.5 * EVAL_SENSITIVITY
    assert noisy.metrics["samples"] == pytest.approx(500, abs=cell)
    assert noisy.metrics["loss"] == pytest.approx(mse, abs=(cell * 10.0 + mse * cell) / (500 - cell))


# -- a real daemon ----------------------------------------------------------------------------------------------------


def _ledger_bodies(node) -> list[dict]:
    with Store.open(home_of(node).store_path) as store:
        entries = store.ledger_entries()
    return [open_record(raw, domain="ledger", check_times=False).fields() for raw in entries]


async def test_evaluate_job_is_charged_its_price(node) -> None:
    """On a budgeted dataset: refused without dp, and with dp reserved and settled at exactly its price, which the
    sign-off states; the result carries metrics and no weights."""
    torch.manual_seed(0)
    plan = build_plan(DigitsCNN(), digits_example_input(), {"kind": "evaluate", "dp": EVAL_DP})
    exact = build_plan(DigitsCNN(), digits_example_input(), {"kind": "evaluate"})
    epsilon, delta = price_job(plan.recipe, 450)
    async with Client.connect(node.address) as client:
        await client.datasets()
        with pytest.raises(RemoteError) as err:  # no bound at all: the owner allows only DP jobs here
            await client.submit("digits-budget", exact)
        assert err.value.code == ErrorCode.BUDGET_EXCEEDED
        result = await client.train("digits-budget", plan, timeout=300)
    assert result.weights == b""
    with pytest.raises(ValueError, match="no weights"):
        result.apply_to(DigitsCNN())
    assert result.signoff.epsilon == epsilon and result.signoff.delta == delta == 1e-5
    assert result.metrics["epsilon"] == epsilon and result.metrics["evaluated_on"] == "all"
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and len(result.metrics["confusion"]) == 10
    bodies = [b for b in _ledger_bodies(node) if b.get("job_id") == result.job_id]
    assert [b["kind"] for b in bodies] == ["reserve", "settle"]
    assert bodies[0]["epsilon"] == epsilon and bodies[0]["dataset"] == "digits-budget"


async def test_dp_training_releases_no_metrics_on_private_rows(node, plan_factory) -> None:
    plan = plan_factory(epochs=1, dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5})
    assert plan.recipe["eval_fraction"] == 0.0 and plan.recipe["metrics"] == []
    async with Client.connect(node.address) as client:
        await client.datasets()
        result = await client.train("digits", plan, timeout=300)
    m = result.metrics
    assert not {"accuracy", "loss", "evaluated_on", "confusion"} & set(m)
    assert m["train_samples"] == 450 and m["eval_samples"] == 0 and m["epochs"] == 1
    assert m["epsilon"] == result.signoff.epsilon and m["noise_multiplier"] == 1.0 and m["delta"] == 1e-5
    result.apply_to(DigitsCNN())  # a training job still releases its weights
