"""Privacy accounting for DP-SGD jobs: how much epsilon a recipe spends, computed before the job runs.

Theory of operation
-------------------
Pure Python plus ``dp_accounting`` (Google's accountant library): no torch import, so the daemon can price a job
before it starts a Worker. No RDP formula is written here; :func:`epsilon_spent` only describes the mechanism to
``dp_accounting.rdp.RdpAccountant`` as events.

The mechanism the accountant is told about, and that ``worker.py`` runs exactly:

- **Adjacency**: add/remove one example (``NeighboringRelation.ADD_OR_REMOVE_ONE``): a dataset and the same dataset
  with one training example more or less.
- **Sampling**: ``steps`` steps; at each step every training example is included independently with probability
  ``q = batch_size / n_train`` (Poisson subsampling, ``PoissonSampledDpEvent``). Batch sizes vary and may be 0. The
  amplification this buys assumes the sample is secret, so the Worker draws it from operating-system randomness,
  never from the recipe's seed (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
  Mechanism", arXiv:1908.10530).
- **Query**: the sum over the sampled examples of each example's gradient clipped to L2 norm ``C`` (flat over all
  parameters), so adding or removing one example moves the sum by at most ``C``.
- **Noise**: ``N(0, (sigma * C)^2)`` added to every coordinate of the sum (``GaussianDpEvent(sigma)``, sigma the noise
  multiplier), also from operating-system randomness.
- Dividing by the *expected* batch size ``q * n_train`` (a constant, not the drawn size) and the optimizer step are
  post-processing and cost nothing.

The ``steps`` events are composed with ``SelfComposedDpEvent`` and converted to (epsilon, delta) at the standard RDP
orders ``dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS`` (1.1 .. 10.9 by 0.1, 11 .. 63, 128, 256, 512,
1024). Only the trained weights are covered: metrics computed on private rows without noise (evaluation accuracy and
loss) are not, and are the business of whoever releases them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hivecell.node.plan import DP_NOISE_RANGE, PlanError, validate_recipe

__all__ = ["RDP_ORDERS", "DpPlan", "dp_plan", "epsilon_spent", "noise_for_epsilon", "train_samples", "price_job"]


def _rdp_orders() -> tuple[float, ...]:
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(float(o) for o in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


RDP_ORDERS: tuple[float, ...] = _rdp_orders()


def _bad_recipe(message: str) -> PlanError:
    return PlanError("bad_recipe", message)


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError("noise_multiplier must be a positive number")
    if not 0 < sample_rate <= 1:
        raise ValueError("sample_rate must be in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError("steps must be a positive integer")
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")


def epsilon_spent(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon that ``steps`` Poisson-subsampled Gaussian steps spend at ``delta`` (add/remove adjacency).

    Raises:
        ValueError: a parameter outside its domain (noise <= 0, rate outside (0, 1], steps < 1, delta outside (0, 1)).
    """
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    _check(noise_multiplier, sample_rate, steps, delta)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps
    )
    accountant = RdpAccountant(list(RDP_ORDERS), dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(*, target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier in the recipe's range whose :func:`epsilon_spent` is at most ``target_epsilon``.

    Bisection on ``log(sigma)`` over ``[0.1, 100]`` (epsilon falls as sigma grows) to a relative width of 1e-4; the
    upper end of the final bracket is returned, so the job never spends more than the target. If even sigma = 0.1
    fits, 0.1 is returned (the job then spends less than the target).

    Raises:
        PlanError: ``"bad_recipe"`` if the target cannot be met even with the largest noise multiplier (100).
        ValueError: a parameter outside its domain.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError("target_epsilon must be a positive number")
    lo, hi = DP_NOISE_RANGE

    def eps(sigma: float) -> float:
        return epsilon_spent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta)

    if eps(hi) > target_epsilon:
        raise _bad_recipe(f"dp target_epsilon {target_epsilon:g} cannot be reached with noise_multiplier <= {hi:g} "
                          f"at this sample rate and number of steps")
    if eps(lo) <= target_epsilon:
        return lo
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def train_samples(n_samples: int, eval_fraction: float) -> int:
    """How many of a dataset's ``n_samples`` rows the Worker trains on (the rest are held out for evaluation)."""
    n_eval = math.floor(n_samples * eval_fraction)
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), n_samples - 1)
    return n_samples - n_eval


@dataclass(frozen=True)
class DpPlan:
    """What a DP-SGD job will run and spend. ``expected_batch_size`` is ``sample_rate * n_train``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    clip_norm: float
    expected_batch_size: float


def dp_plan(recipe: Mapping[str, Any], num_train_samples: int) -> DpPlan:
    """Price a recipe with a ``dp`` section on ``num_train_samples`` training rows (see :func:`train_samples`).

    ``sample_rate = batch_size / n_train`` and ``steps = epochs * ceil(n_train / batch_size)``: the recipe's batch size
    becomes the expected batch size and an epoch keeps its usual number of steps.

    Raises:
        PlanError: ``"bad_recipe"``: the recipe is refused by :func:`~hivecell.node.plan.validate_recipe`, has no
            ``dp`` section, its batch size exceeds the training rows, or its target epsilon cannot be reached.
    """
    checked = validate_recipe(recipe)
    if checked.dp is None:
        raise _bad_recipe("recipe has no dp section")
    if isinstance(num_train_samples, bool) or not isinstance(num_train_samples, int) or num_train_samples < 1:
        raise _bad_recipe("dp needs at least one training sample")
    if checked.batch_size > num_train_samples:
        raise _bad_recipe("batch_size must not exceed the number of training samples under dp")
    dp = checked.dp
    sample_rate = checked.batch_size / num_train_samples
    steps = checked.epochs * math.ceil(num_train_samples / checked.batch_size)
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        assert dp.target_epsilon is not None  # validate_recipe guarantees exactly one
        sigma = noise_for_epsilon(target_epsilon=dp.target_epsilon, sample_rate=sample_rate, steps=steps,
                                  delta=dp.delta)
    epsilon = epsilon_spent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=dp.delta)
    return DpPlan(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=dp.delta, epsilon=epsilon,
                  clip_norm=dp.max_grad_norm, expected_batch_size=sample_rate * num_train_samples)


def price_job(recipe: Mapping[str, Any], num_samples: int) -> tuple[float, float]:
    """The (epsilon, delta) a job with this normalized ``recipe`` spends on a dataset of ``num_samples`` rows, computed
    before it runs with the numbers the Worker will use. A job without differential privacy costs ``(inf, 0)``: no
    bound on what its result reveals.

    Raises:
        PlanError: ``"bad_recipe"``: the node cannot price it (see :func:`dp_plan`).
    """
    if not recipe.get("dp"):
        return math.inf, 0.0
    plan = dp_plan(recipe, train_samples(num_samples, recipe["eval_fraction"]))
    return plan.epsilon, plan.delta
