"""DP-SGD: the accountant against a second implementation (Opacus), the recipe's dp section, per-sample clipping, and
a real Worker training with DP."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch

from hivecell.node.plan import PlanError, apply_weights, build_plan, load_program, plan_hash, validate_recipe
from hivecell.node.privacy import (
    RDP_ORDERS,
    dp_plan,
    epsilon_spent,
    eval_epsilon,
    eval_noise_for_epsilon,
    noise_for_epsilon,
    search_noise,
    train_samples,
)
from hivecell.node import worker
from hivecell.node.worker import _make_loss, _per_sample_grad_fn, _RowwisePerSample, clipped_grad_sum
from hivecell.node.workerpool import WorkerJob, WorkerLimits, open_worker_pool
from hivecell.node.zoo import DigitsCNN, digits_example_input

DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}

# -- accountant -------------------------------------------------------------------------------------------------------

_GRID = [
    (sigma, q, steps, [1e-5, 1e-6][i % 2])
    for i, (sigma, q, steps) in enumerate(itertools.product([0.5, 1.0, 2.0, 4.0], [0.001, 0.01, 0.1], [10, 1000, 10000]))
]


def _opacus_epsilon(sigma: float, q: float, steps: int, delta: float, *, alphas: list[float] | None) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha" at the grid's corners
        warnings.simplefilter("ignore", UserWarning)
        return accountant.get_epsilon(delta, alphas=alphas)


def test_epsilon_matches_opacus_on_a_grid() -> None:
    """Two implementations of the sampled Gaussian mechanism's RDP agree once they use the same orders.

    Systematic differences found and handled here:

    - Opacus' default alphas stop at 63 and skip 11; dp-accounting's go on to 128, 256, 512, 1024. With little noise
      per step (sigma 4, q 0.001) the best order is above 63 and Opacus' default reports up to 2x more epsilon, so
      Opacus is given our orders.
    - dp-accounting drops a fractional order whose series does not converge in 1000 terms (an absl warning); Opacus
      sums on. That only happens when the best order is below ~2, i.e. epsilon in the tens or more, and dp-accounting
      then reports *more* epsilon than Opacus: the node overcharges, never undercharges. Below epsilon 30 they agree.
    """
    worst = 0.0
    for sigma, q, steps, delta in _GRID:
        ours = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
        theirs = _opacus_epsilon(sigma, q, steps, delta, alphas=list(RDP_ORDERS))
        assert ours >= theirs * (1 - 1e-6), (sigma, q, steps, delta, ours, theirs)
        if theirs <= 30:
            worst = max(worst, abs(ours - theirs) / theirs)
            assert ours == pytest.approx(theirs, rel=0.01), (sigma, q, steps, delta)
    assert worst < 0.01
    # Opacus' default orders are the systematic difference: at small sigma * q they lose the best order.
    default = _opacus_epsilon(4.0, 0.001, 10, 1e-6, alphas=None)
    assert default > 1.5 * epsilon_spent(noise_multiplier=4.0, sample_rate=0.001, steps=10, delta=1e-6)


@pytest.mark.parametrize("delta", [1e-5, 1e-6, 1e-3])
def test_eval_epsilon_matches_opacus(delta: float) -> None:
    """One Gaussian mechanism (an evaluate job): Opacus' sampled Gaussian at sample rate 1 and one step is the plain
    Gaussian, computed by another implementation."""
    for sigma in (0.5, 0.8, 1.0, 2.0, 5.0, 10.0, 50.0):
        ours = eval_epsilon(noise_multiplier=sigma, delta=delta)
        theirs = _opacus_epsilon(sigma, 1.0, 1, delta, alphas=list(RDP_ORDERS))
        assert ours == pytest.approx(theirs, rel=0.01), (sigma, delta, ours, theirs)
    with pytest.raises(ValueError):
        eval_epsilon(noise_multiplier=0.0, delta=delta)


@pytest.mark.parametrize("target", [0.05, 0.3, 1.0, 3.0, 8.0, 30.0])
def test_eval_noise_for_epsilon_never_exceeds_the_target(target: float) -> None:
    sigma = eval_noise_for_epsilon(target_epsilon=target, delta=1e-5)
    spent = eval_epsilon(noise_multiplier=sigma, delta=1e-5)
    assert spent <= target
    assert sigma == 0.1 or spent == pytest.approx(target, rel=1e-3)  # the floor spends less; else the search is tight
    assert search_noise(target, lambda s: eval_epsilon(noise_multiplier=s, delta=1e-5)) == sigma


def test_epsilon_domain_errors() -> None:
    for kwargs in ({"noise_multiplier": 0.0}, {"sample_rate": 1.5}, {"steps": 0}, {"delta": 0.0}):
        with pytest.raises(ValueError):
            epsilon_spent(**{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5, **kwargs})


@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 0.01, 1000), (8.0, 0.05, 300)])
def test_noise_for_epsilon_round_trips(target: float, q: float, steps: int) -> None:
    sigma = noise_for_epsilon(target_epsilon=target, sample_rate=q, steps=steps, delta=1e-5)
    spent = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert spent <= target and spent == pytest.approx(target, rel=1e-3)


def test_noise_for_epsilon_unreachable_and_floor() -> None:
    with pytest.raises(PlanError) as info:
        noise_for_epsilon(target_epsilon=1e-4, sample_rate=1.0, steps=10000, delta=1e-5)
    assert info.value.code == "bad_recipe" and "target_epsilon" in info.value.message
    # a target the smallest allowed noise already meets: the floor, spending less than asked
    assert noise_for_epsilon(target_epsilon=100.0, sample_rate=0.001, steps=1, delta=1e-3) == 0.1


def test_dp_plan_derives_rate_and_steps() -> None:
    recipe = {"batch_size": 32, "epochs": 3, "dp": DP}
    plan = dp_plan(recipe, 1000)
    assert plan.sample_rate == 32 / 1000 and plan.steps == 3 * 32 and plan.expected_batch_size == pytest.approx(32)
    assert plan.noise_multiplier == 1.0 and plan.clip_norm == 1.0 and plan.delta == 1e-5
    assert plan.epsilon == epsilon_spent(noise_multiplier=1.0, sample_rate=0.032, steps=96, delta=1e-5)
    targeted = dp_plan({"batch_size": 32, "epochs": 3,
                        "dp": {"target_epsilon": 2.0, "max_grad_norm": 1.0, "delta": 1e-5}}, 1000)
    assert targeted.epsilon <= 2.0
    for bad, n in (({"batch_size": 64, "dp": DP}, 50), ({"dp": DP}, 0), ({}, 100)):
        with pytest.raises(PlanError) as info:
            dp_plan(bad, n)
        assert info.value.code == "bad_recipe"
    assert train_samples(1797, 0.2) == 1797 - 359 and train_samples(10, 0.0) == 10 and train_samples(2, 0.01) == 1


# -- recipe -----------------------------------------------------------------------------------------------------------


def test_recipe_without_dp_is_unchanged() -> None:
    recipe = {"optimizer": "adam", "lr": 0.01, "epochs": 15, "batch_size": 32, "seed": 1}
    normalized = validate_recipe(recipe).to_dict()
    assert "dp" not in normalized
    # the exact form (and so the plan hash) recipes had before dp existed
    assert normalized == {"task": "classification", "loss": "cross_entropy", "optimizer": "adam", "lr": 0.01,
                          "momentum": 0.0, "weight_decay": 0.0, "epochs": 15, "batch_size": 32,
                          "metrics": ["accuracy", "loss"], "eval_fraction": 0.2, "seed": 1}
    assert validate_recipe(normalized).to_dict() == normalized  # normalizing is idempotent
    # pinned from the code before dp existed
    assert plan_hash(b"p", b"w", normalized) == "f9bd89805602ed7fbb0340a5c72d66f4593ab6568bed0426c1950b92ed73e911"
    with_dp = validate_recipe({**recipe, "dp": {"max_grad_norm": 2, "delta": 1e-6, "target_epsilon": 3}}).to_dict()
    assert with_dp["dp"] == {"target_epsilon": 3.0, "max_grad_norm": 2.0, "delta": 1e-6}
    assert plan_hash(b"p", b"w", with_dp) != plan_hash(b"p", b"w", normalized)


@pytest.mark.parametrize(
    ("dp", "key"),
    [
        ({**DP, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({**DP, "noise_multiplier": 0.05}, "noise_multiplier"),
        ({**DP, "noise_multiplier": 101}, "noise_multiplier"),
        ({**DP, "noise_multiplier": float("nan")}, "noise_multiplier"),
        ({**DP, "noise_multiplier": True}, "noise_multiplier"),
        ({**DP, "max_grad_norm": 0}, "max_grad_norm"),
        ({**DP, "max_grad_norm": -1}, "max_grad_norm"),
        ({**DP, "max_grad_norm": 1000}, "max_grad_norm"),
        ({**DP, "delta": 0}, "delta"),
        ({**DP, "delta": 0.01}, "delta"),
        ({**DP, "delta": "1e-5"}, "delta"),
        ({"target_epsilon": 0, "max_grad_norm": 1, "delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": 1000, "max_grad_norm": 1, "delta": 1e-5}, "target_epsilon"),
        ({**DP, "target_epsilon": 1.0}, "exactly one"),
        ({"max_grad_norm": 1, "delta": 1e-5}, "exactly one"),
        ({"noise_multiplier": 1.0, "delta": 1e-5}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1}, "delta"),
        ({**DP, "clip": 1}, "clip"),
        ([1, 2], "dp"),
    ],
)
def test_recipe_dp_refused(dp: object, key: str) -> None:
    with pytest.raises(PlanError) as info:
        validate_recipe({"dp": dp})
    assert info.value.code == "bad_recipe" and key in info.value.message


# -- per-sample clipping ----------------------------------------------------------------------------------------------


class _MLP(torch.nn.Module):
    """Linear, layer norm, a view on the batch size, scalars and log-softmax: all on the row-wise path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.fc1(x)))
        return torch.log_softmax(self.fc2(h.view(h.size(0), -1) * 2 + 1), dim=1)


class _Sequences(torch.nn.Module):
    """[B, 5, 4] inputs: linear and layer norm over positions, reductions within each example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(4, 8), torch.nn.LayerNorm([5, 8]), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.norm(torch.relu(self.fc1(x))))
        return h.mean(dim=1) + h.amax(dim=1)


class _StridedConv(torch.nn.Module):
    """Convolutions with stride, dilation and no bias; a layer applied twice (its gradients add up per example)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(4, 5, 2, dilation=2)
        self.fc, self.out = torch.nn.Linear(5, 3), torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.conv2(torch.nn.functional.gelu(self.conv1(x))))
        h = self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))
        return self.out(torch.tanh(self.out(h)))


class _Centered(torch.nn.Module):
    """Mixes the batch (each row minus the batch mean): only the general path gets per-example gradients right."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(0, keepdim=True))


class _Grouped(torch.nn.Module):
    """A grouped convolution: per-example, but not on the row-wise path (which falls back to vmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(2, 4, 3, groups=2), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def _clipped_reference(module: torch.nn.Module, loss_fn: object, x: torch.Tensor, y: torch.Tensor,
                       clip: float | None) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """The straightforward way: one autograd backward per example, clip it, add it up. ``clip=None``: median norm."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    grads, losses = [], []
    for i in range(x.shape[0]):
        loss = loss_fn(module(x[i : i + 1]), y[i : i + 1])
        got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(got, params.values())])
        losses.append(loss.item())
    norms = [float(torch.cat([g.flatten() for g in grad]).double().norm()) for grad in grads]
    if clip is None:
        clip = sorted(norms)[len(norms) // 2]  # about half the examples are clipped
    expected = {name: sum(grad[j] * min(1.0, clip / (norm + 1e-6)) for grad, norm in zip(grads, norms))
                for j, name in enumerate(params)}
    return expected, losses, [clip]


@pytest.mark.parametrize(
    ("model", "example", "n_classes", "rowwise"),
    [
        (DigitsCNN, digits_example_input(), 10, True),
        (_MLP, torch.zeros(4, 6), 3, True),
        (_Sequences, torch.zeros(4, 5, 4), 3, True),
        (_StridedConv, torch.zeros(4, 2, 7, 7), 3, True),
        (_Centered, torch.zeros(4, 6), 3, False),
        (_Grouped, torch.zeros(4, 2, 4, 4), 3, False),
    ],
)
def test_clipped_grad_sum_matches_a_per_example_loop(model: type, example: torch.Tensor, n_classes: int,
                                                      rowwise: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-example gradients of the loaded program (row-wise or vmap), clipped and summed, against one backward per
    example; in chunks smaller than the batch."""
    torch.manual_seed(0)
    plan = build_plan(model(), example, {})
    module = load_program(plan.program, plan.weights)
    loss_fn = _make_loss(validate_recipe(plan.recipe), n_classes)
    sample_shape = tuple(example.shape[1:])
    x, y = torch.rand(20, *sample_shape) * 3 - 1, torch.randint(0, n_classes, (20,))
    grad_fn = _per_sample_grad_fn(module, loss_fn, sample_shape)
    assert isinstance(grad_fn, _RowwisePerSample) is rowwise
    expected, losses, (clip,) = _clipped_reference(module, loss_fn, x, y, None)

    monkeypatch.setattr(worker, "_DP_CHUNK", 8)  # chunks of 8, 8 and 4
    for fn in (grad_fn, None):  # built once by the caller, or by clipped_grad_sum itself
        summed, per_example_losses = clipped_grad_sum(module, loss_fn, x, y, clip, grad_fn=fn)
        assert per_example_losses.tolist() == pytest.approx(losses, rel=1e-5)
        assert set(summed) == set(expected)
        for name in expected:
            torch.testing.assert_close(summed[name], expected[name], rtol=1e-5, atol=1e-5)

    empty, none = clipped_grad_sum(module, loss_fn, x[:0], y[:0], clip, grad_fn=grad_fn)
    assert none.numel() == 0 and all(float(g.abs().sum()) == 0 for g in empty.values())


class _Mixer(torch.nn.Module):
    def __init__(self, mix: object) -> None:
        super().__init__()
        self.fc, self.mix = torch.nn.Linear(6, 6), mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.fc(x))


_MIXERS = {
    "mean over the batch": lambda h: h - h.mean(0, keepdim=True),
    "sum of everything": lambda h: h * h.sum(),
    "softmax over the batch": lambda h: torch.softmax(h, dim=0),
    "max over the batch": lambda h: h - h.amax(0),
    "transposed twice": lambda h: h.t().t(),
    "batch dimension swapped and back": lambda h: h.transpose(0, 1).transpose(0, 1),
    "reshape across rows": lambda h: h.reshape(-1, 3).reshape(-1, 6),
    "flatten the batch": lambda h: h.flatten().view(h.shape[0], 6),
    "new leading dimension": lambda h: h.unsqueeze(0).sum(1),
    "cat along the batch": lambda h: torch.cat([h, h], dim=0)[: h.shape[0]],
    "first row to all": lambda h: h + h[0],
    "times the batch size": lambda h: h * h.shape[0],
    "row sums broadcast to a batch x batch matrix": lambda h: h.sum(1) + h.sum(1).unsqueeze(1),
    "permuted through the batch": lambda h: h.unsqueeze(2).permute(1, 0, 2).permute(1, 0, 2).squeeze(2),
}


@pytest.mark.parametrize("name", list(_MIXERS))
def test_programs_that_mix_examples_take_the_vmap_path(name: str) -> None:
    """The row-wise path must never take a program whose output row depends on other rows or on the batch size
    (including ones that happen to undo the mixing: the proof is op by op)."""
    plan = build_plan(_Mixer(_MIXERS[name]), torch.zeros(4, 6), {})
    module = load_program(plan.program, plan.weights)
    grad_fn = _per_sample_grad_fn(module, _make_loss(validate_recipe(plan.recipe), 6), (6,))
    assert not isinstance(grad_fn, _RowwisePerSample)


# -- a real Worker ----------------------------------------------------------------------------------------------------


async def test_worker_trains_digits_with_dp(digits_store: tuple[Path, str]) -> None:
    torch.manual_seed(0)
    recipe = {"optimizer": "adam", "lr": 0.01, "epochs": 15, "batch_size": 32, "seed": 1, "dp": DP}
    plan = build_plan(DigitsCNN(), digits_example_input(), recipe)
    path, key = digits_store
    progress: list[dict] = []
    async with open_worker_pool(warm=0) as pool:
        result = await pool.run_job(WorkerJob("dp-1", str(path), key, plan.program, plan.weights, plan.recipe),
                                    limits=WorkerLimits(wall_s=600, threads=2), on_progress=progress.append)
    n_train = train_samples(1797, plan.recipe["eval_fraction"])
    assert n_train == 1797  # under dp every row trains; evaluating is a job of its own
    priced = dp_plan(plan.recipe, n_train)
    assert [p["epoch"] for p in progress] == list(range(1, 16))
    assert result.metrics["train_samples"] == n_train and result.metrics["eval_samples"] == 0
    assert result.metrics["epsilon"] == priced.epsilon and result.metrics["delta"] == 1e-5
    assert result.metrics["noise_multiplier"] == 1.0
    assert 1 < priced.epsilon < 10
    # nothing computed on private rows is released without noise: no accuracy, no loss
    assert not {"accuracy", "loss", "evaluated_on"} & set(result.metrics)
    model = DigitsCNN()  # the noisy weights still learnt: checked here, where the data is not private
    apply_weights(model, result.weights)
    features, labels = _all_digits()
    with torch.no_grad():
        assert (model.eval()(features).argmax(dim=1) == labels).float().mean() > 0.6


def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (torch.from_numpy(digits.images / 16.0).float().reshape(-1, 1, 8, 8),
            torch.from_numpy(digits.target).long())
