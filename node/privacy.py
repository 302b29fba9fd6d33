"""Privacy accounting for DP jobs (DP-SGD training and noisy evaluation): how much epsilon a recipe spends, computed
before the job runs.

Theory of operation
-------------------
Pure Python plus ``dp_accounting`` (Google's accountant library): no torch import, so the daemon can price a job
before it starts a Worker. No RDP formula is written here; :func:`epsilon_spent` only describes the mechanism to
``dp_accounting.rdp.RdpAccountant`` as events.

DP-SGD (a training recipe with ``dp``), the mechanism the accountant is told about and that ``worker.py`` runs
exactly:

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
1024). The trained weights are all such a job releases: its recipe has ``eval_fraction`` 0 and no metrics, so no
accuracy or loss computed on private rows leaves the node without noise (the per-epoch training loss is kept from the
scientist too).

Evaluation (an evaluate recipe with ``dp``; :func:`eval_dp_plan`), the Gaussian mechanism on one query:

- **Adjacency**: add/remove one example, as above.
- **Query**: the model (eval mode, no gradients) runs on *every* row. Each example falls in exactly one *cell* and
  adds its clipped loss ``min(loss_i, L) / L`` (``L`` the recipe's ``max_loss``; a non-finite loss counts as ``L``)
  to a loss term. The cells are the confusion counts ``C[true][pred]`` (k x k) when the recipe asks for ``confusion``,
  else (correct, wrong) for classification and the single count ``n`` for regression. The released vector is (cells,
  loss term): one example moves one cell by 1 and the loss term by at most 1, so its L2 sensitivity is ``sqrt(2)``.
- **Noise**: ``N(0, (sigma * sqrt(2))^2)`` on every coordinate, from operating-system randomness; with sensitivity
  ``sqrt(2)`` that is ``GaussianDpEvent(sigma)``, one event, at the same orders and adjacency as DP-SGD
  (:func:`eval_epsilon`).
- **Post-processing** (free): noisy ``n`` = the sum of the noisy cells (at least 1), accuracy = noisy correct / ``n``
  clamped to [0, 1], loss = noisy loss term * ``L`` / ``n`` clamped to [0, ``L``], confusion counts as noisy floats.
  The noise does not depend on the number of rows, so the error of accuracy and loss falls as ``1 / n``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hivecell.node.plan import DP_NOISE_RANGE, PlanError, validate_recipe

__all__ = [
    "EVAL_SENSITIVITY",
    "RDP_ORDERS",
    "DpPlan",
    "EvalDpPlan",
    "dp_plan",
    "epsilon_spent",
    "eval_dp_plan",
    "eval_epsilon",
    "eval_noise_for_epsilon",
    "noise_for_epsilon",
    "price_job",
    "search_noise",
    "train_samples",
]


@functools.cache
def _rdp_orders() -> tuple[float, ...]:
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(float(o) for o in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def __getattr__(name: str) -> Any:
    # RDP_ORDERS is computed on first use: dp_accounting imports scipy (~1.7 s and ~65 MB), which a daemon that
    # never prices a DP job must not pay for at start.
    if name == "RDP_ORDERS":
        return _rdp_orders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
EVAL_SENSITIVITY = math.sqrt(2.0)  # L2 sensitivity of the evaluate query (module docstring)


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

    _check(noise_multiplier, sample_rate, steps, delta)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps
    )
    return _rdp_epsilon(event, delta)


def eval_epsilon(*, noise_multiplier: float, delta: float) -> float:
    """The epsilon one evaluate query spends at ``delta``: a single Gaussian mechanism whose noise is
    ``noise_multiplier`` times the query's L2 sensitivity (add/remove adjacency; see the module docstring).

    Raises:
        ValueError: noise <= 0 or delta outside (0, 1).
    """
    import dp_accounting

    _check(noise_multiplier, 1.0, 1, delta)
    return _rdp_epsilon(dp_accounting.GaussianDpEvent(noise_multiplier), delta)


def _rdp_epsilon(event: Any, delta: float) -> float:
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(list(_rdp_orders()), NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def search_noise(target_epsilon: float, epsilon_of: Callable[[float], float], *, setting: str = "") -> float:
    """The smallest noise multiplier in the recipe's range whose ``epsilon_of(sigma)`` is at most ``target_epsilon``;
    ``epsilon_of`` must fall as sigma grows.

    Bisection on ``log(sigma)`` over ``[0.1, 100]`` to a relative width of 1e-4; the upper end of the final bracket is
    returned, so the job never spends more than the target. If even sigma = 0.1 fits, 0.1 is returned (the job then
    spends less than the target). ``setting`` ends the error message (e.g. "at this sample rate").

    Raises:
        PlanError: ``"bad_recipe"`` if the target cannot be met even with the largest noise multiplier (100).
        ValueError: a parameter outside its domain.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError("target_epsilon must be a positive number")
    lo, hi = DP_NOISE_RANGE
    if epsilon_of(hi) > target_epsilon:
        raise _bad_recipe(f"dp target_epsilon {target_epsilon:g} cannot be reached with noise_multiplier <= {hi:g}"
                          + (f" {setting}" if setting else ""))
    if epsilon_of(lo) <= target_epsilon:
        return lo
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        if epsilon_of(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


# Memoized (pure, and a search costs seconds): the daemon prices a job and its Worker derives the same noise again.
@functools.lru_cache(maxsize=256)
def noise_for_epsilon(*, target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (see :func:`search_noise`) whose :func:`epsilon_spent` is at most
    ``target_epsilon``.

    Raises:
        PlanError: ``"bad_recipe"`` if the target cannot be met even with the largest noise multiplier (100).
        ValueError: a parameter outside its domain.
    """
    return search_noise(
        target_epsilon,
        lambda sigma: epsilon_spent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta),
        setting="at this sample rate and number of steps",
    )


@functools.lru_cache(maxsize=256)
def eval_noise_for_epsilon(*, target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier (see :func:`search_noise`) whose :func:`eval_epsilon` is at most
    ``target_epsilon``.

    Raises:
        PlanError: ``"bad_recipe"`` if the target cannot be met even with the largest noise multiplier (100).
        ValueError: a parameter outside its domain.
    """
    return search_noise(target_epsilon, lambda sigma: eval_epsilon(noise_multiplier=sigma, delta=delta),
                        setting="at this delta")


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
    if checked.kind != "train":
        raise _bad_recipe("dp_plan prices training recipes; see eval_dp_plan")
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


@dataclass(frozen=True)
class EvalDpPlan:
    """What a DP evaluate job will add and spend: noise of standard deviation ``noise_std`` on every coordinate."""

    noise_multiplier: float
    delta: float
    epsilon: float
    max_loss: float

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * EVAL_SENSITIVITY


def eval_dp_plan(recipe: Mapping[str, Any]) -> EvalDpPlan:
    """Price an evaluate recipe with a ``dp`` section. It does not depend on the number of rows.

    Raises:
        PlanError: ``"bad_recipe"``: the recipe is refused, is not an evaluate recipe with ``dp``, or its target
            epsilon cannot be reached.
    """
    checked = validate_recipe(recipe)
    if checked.kind != "evaluate" or checked.dp is None:
        raise _bad_recipe("eval_dp_plan prices evaluate recipes with a dp section")
    dp = checked.dp
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        assert dp.target_epsilon is not None  # validate_recipe guarantees exactly one
        sigma = eval_noise_for_epsilon(target_epsilon=dp.target_epsilon, delta=dp.delta)
    return EvalDpPlan(noise_multiplier=sigma, delta=dp.delta, epsilon=eval_epsilon(noise_multiplier=sigma,
                                                                                    delta=dp.delta),
                      max_loss=dp.max_loss)


def price_job(recipe: Mapping[str, Any], num_samples: int) -> tuple[float, float]:
    """The (epsilon, delta) a job with this normalized ``recipe`` spends on a dataset of ``num_samples`` rows, computed
    before it runs with the numbers the Worker will use. A job without differential privacy (training or evaluate)
    costs ``(inf, 0)``: no bound on what its result reveals.

    Raises:
        PlanError: ``"bad_recipe"``: the node cannot price it (see :func:`dp_plan` and :func:`eval_dp_plan`).
    """
    checked = validate_recipe(recipe)
    if checked.dp is None:
        return math.inf, 0.0
    if checked.kind == "evaluate":
        evaluation = eval_dp_plan(recipe)
        return evaluation.epsilon, evaluation.delta
    plan = dp_plan(recipe, train_samples(num_samples, checked.eval_fraction))
    return plan.epsilon, plan.delta
