"""Aggregation strategies for model-centric federated learning: how a coordinator turns the nodes' locally trained
weights into the next round's global weights, and which updates it refuses to use at all.

Theory of operation
-------------------
Pure numpy, no torch and no I/O: the coordinator decodes the nodes' replies into :class:`Update` values, passes them
through :func:`screen_updates`, and hands the accepted ones to a :class:`Strategy`. The loop that sends recipes and
collects replies lives elsewhere (the Flower split between ``configure_train`` and ``aggregate_train``).

Weights are ``dict[str, np.ndarray]`` keyed by the model's ``state_dict`` names. Floating-point tensors are
aggregated; every other tensor (integers such as batch-norm's ``num_batches_tracked``, booleans) is taken from the
global weights unchanged, because averaging a counter or a mask means nothing. Arithmetic is done in float64 and
each result is cast back to the global tensor's dtype. An update carries the node's full trained weights, not a
difference; its *delta* is ``weights - global``, and its *norm* is the L2 norm of the delta flattened over all
floating-point tensors.

Screening (:func:`screen_updates`) refuses, with a short reason per node: tensors whose names, shapes or dtypes
differ from the global weights; non-finite values; a ``num_samples`` that is not an integer in ``[1, 10**9]``; two
updates from one node (both are refused, so a node cannot vote twice); a norm above ``max_norm`` when one is given;
and, when at least three updates are well formed, a norm above ``norm_factor`` times the median norm of those
well-formed updates. The last rule catches an update scaled by 1e6 without a fixed cap; its baseline is the median,
so it holds while fewer than half of the well-formed updates are outliers. When the median norm is 0 (most nodes did
not move), every update that moved is refused.

Strategies (``aggregate`` takes screened updates and returns new weights; it never mutates its inputs):

- :class:`FedAvg`: the mean of the updates' weights weighted by ``num_samples`` (McMahan et al. 2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data", arXiv:1602.05629).
- :class:`FedAvgM`: server momentum (Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical Data Distribution
  for Federated Visual Classification", arXiv:1909.06335). With ``d = global - fedavg(updates)`` the pseudo-gradient,
  ``v = momentum * v + d`` and ``new = global - server_lr * v``; ``v`` starts at 0. The new weights are computed as
  ``fedavg - (server_lr * v - d)``, algebraically the same, so that ``momentum=0, server_lr=1`` gives FedAvg's
  result bit for bit.
- :class:`FedProx`: aggregates exactly as FedAvg (Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
  arXiv:1812.06127). The proximal term ``mu / 2 * ||w - global||^2`` belongs to each node's local objective, so the
  strategy only carries ``mu`` for the coordinator to put into the training recipes.
- :class:`FedMedian`: the coordinate-wise median of the updates' weights, unweighted (Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", arXiv:1803.01498).
- :class:`FedTrimmedMean`: per coordinate, drop the ``floor(beta * n)`` lowest and highest values and average the
  rest, unweighted (Yin et al. 2018, as above).

Everything is deterministic: the updates are processed in the order of their node ids, so the result does not depend
on the order in which replies arrived, and the same inputs give the same bits.

Checkpoints: ``Strategy.state()`` returns the server-side state as ``dict[str, np.ndarray]`` (safetensors can store
it) and ``load_state`` restores it, so a coordinator that restarts between rounds resumes bit-exactly. Only
:class:`FedAvgM` has state (its velocity, float64, under keys ``"velocity/<tensor name>"``); the others return ``{}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "MAX_SAMPLES",
    "STRATEGY_NAMES",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedTrimmedMean",
    "Strategy",
    "Update",
    "make_strategy",
    "screen_updates",
    "update_norm",
]

MAX_SAMPLES = 10**9  # the most samples one update may claim: FedAvg weights by it, so a huge claim would dominate
_VELOCITY = "velocity/"

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Update:
    """One node's reply to a training round, as the coordinator decoded it; nothing is checked until
    :func:`screen_updates`.

    ``weights`` are the node's full locally trained weights (not a difference), ``num_samples`` the number of training
    examples it used (FedAvg's weight), ``metrics`` whatever the node reported (not used for aggregation).
    """

    node: str
    weights: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _float_names(global_weights: Mapping[str, np.ndarray]) -> list[str]:
    return [name for name, value in global_weights.items() if _is_float(value)]


def update_norm(global_weights: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``weights - global_weights`` flattened over the global's floating-point tensors, in float64.

    Raises:
        KeyError: ``weights`` lacks one of those tensors.
        ValueError: a shape differs.
    """
    total = 0.0
    for name in _float_names(global_weights):
        if np.shape(weights[name]) != np.shape(global_weights[name]):
            raise ValueError(f"{name} has shape {np.shape(weights[name])}, expected {np.shape(global_weights[name])}")
        delta = np.asarray(weights[name], dtype=np.float64) - np.asarray(global_weights[name], dtype=np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def _listed(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _malformed(global_weights: Mapping[str, np.ndarray], update: Update) -> str | None:
    """Why ``update`` cannot be used with ``global_weights``, or None. Norms are checked by the caller."""
    samples = update.num_samples
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)):
        return f"num_samples must be an integer, not {type(samples).__name__}"
    if not 1 <= samples <= MAX_SAMPLES:
        return f"num_samples {samples} is outside [1, {MAX_SAMPLES:.0e}]"
    weights = update.weights
    if not isinstance(weights, Mapping):
        return f"weights must be a mapping of tensors, not {type(weights).__name__}"
    missing = [name for name in global_weights if name not in weights]
    if missing:
        return f"missing tensor {_listed(missing)}"
    unexpected = [str(name) for name in weights if name not in global_weights]
    if unexpected:
        return f"unexpected tensor {_listed(unexpected)}"
    for name, expected in global_weights.items():
        value = weights[name]
        if not isinstance(value, np.ndarray):
            return f"{name} is not an array but {type(value).__name__}"
        if value.dtype != expected.dtype:
            return f"{name} has dtype {value.dtype}, expected {expected.dtype}"
        if value.shape != expected.shape:
            return f"{name} has shape {value.shape}, expected {expected.shape}"
        if _is_float(value) and not np.isfinite(value).all():
            return f"non-finite values in {name}"
    return None


def _check_global(global_weights: Mapping[str, np.ndarray]) -> None:
    if not isinstance(global_weights, Mapping) or not global_weights:
        raise ValueError("global_weights must be a non-empty mapping of tensor names to arrays")
    for name, value in global_weights.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise ValueError(f"global_weights[{name!r}] must be a numpy array under a string name")


def screen_updates(global_weights: Mapping[str, np.ndarray], updates: Sequence[Update], *,
                   max_norm: float | None = None, norm_factor: float = 10.0) -> tuple[list[Update], dict[str, str]]:
    """Split a round's updates into those safe to aggregate and those refused (see the module docstring for the
    rules).

    Args:
        global_weights: the weights the round started from.
        updates: the round's updates, in any order.
        max_norm: if given, refuse an update whose delta norm (:func:`update_norm`) is above it.
        norm_factor: with at least three well-formed updates, refuse one whose norm is above this many times the
            median norm of the well-formed updates.

    Returns:
        ``(accepted, rejected)``: the accepted updates in their input order (the same objects, not copies), and a
        reason for each refused node id. A node id is in at most one of the two.

    Raises:
        ValueError: ``global_weights`` is empty or holds something other than arrays, ``max_norm`` is not a
            positive finite number, or ``norm_factor`` is not a finite number above 1.
    """
    _check_global(global_weights)
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                 or not math.isfinite(max_norm) or max_norm <= 0):
        raise ValueError(f"max_norm must be a positive finite number or None, not {max_norm!r}")
    if isinstance(norm_factor, bool) or not isinstance(norm_factor, (int, float)) or not (
            math.isfinite(norm_factor) and norm_factor > 1):
        raise ValueError(f"norm_factor must be a finite number above 1, not {norm_factor!r}")

    rejected: dict[str, str] = {}
    counts: dict[str, int] = {}
    for update in updates:
        counts[update.node] = counts.get(update.node, 0) + 1
    norms: dict[int, float] = {}  # index into updates -> delta norm, for the well-formed ones
    for index, update in enumerate(updates):
        if counts[update.node] > 1:
            rejected[update.node] = f"{counts[update.node]} updates from the same node"
            continue
        reason = _malformed(global_weights, update)
        if reason is None:
            norm = update_norm(global_weights, update.weights)
            if not math.isfinite(norm):
                reason = "update norm overflows"
            else:
                norms[index] = norm
        if reason is not None:
            rejected[update.node] = reason

    median = float(np.median(list(norms.values()))) if len(norms) >= 3 else None
    accepted: list[Update] = []
    for index, norm in norms.items():
        update = updates[index]
        if max_norm is not None and norm > max_norm:
            rejected[update.node] = f"update norm {norm:.2g} is over the cap of {max_norm:.2g}"
        elif median is not None and norm > norm_factor * median:
            rejected[update.node] = (f"update norm {norm:.2g} is {norm / median:.2g}x the round's median {median:.2g}"
                                     if median > 0 else f"update norm {norm:.2g} while the round's median is 0")
        else:
            accepted.append(update)
    return accepted, rejected


def _prepare(global_weights: Mapping[str, np.ndarray], updates: Sequence[Update]) -> list[Update]:
    """The updates sorted by node id, after the checks every strategy needs.

    Raises:
        ValueError: no updates, two from one node, or one that does not fit the global weights.
    """
    _check_global(global_weights)
    if not updates:
        raise ValueError("cannot aggregate an empty round: no updates were accepted")
    ordered = sorted(updates, key=lambda u: u.node)
    for before, after in zip(ordered, ordered[1:]):
        if before.node == after.node:
            raise ValueError(f"two updates from node {before.node}; screen the round with screen_updates first")
    for update in ordered:
        reason = _malformed(global_weights, update)
        if reason is not None:
            raise ValueError(f"update from node {update.node} cannot be aggregated ({reason}); "
                             "screen the round with screen_updates first")
    return ordered


def _assemble(global_weights: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray]) -> Weights:
    """New weights in the global's order: ``merged`` float64 tensors cast back to their dtype, the rest copied."""
    return {name: merged[name].astype(value.dtype) if name in merged else value.copy()
            for name, value in global_weights.items()}


def _weighted_mean(global_weights: Mapping[str, np.ndarray], ordered: Sequence[Update]) -> Weights:
    """FedAvg in float64: ``sum(n_i * w_i) / sum(n_i)`` per floating-point tensor."""
    total = float(sum(int(u.num_samples) for u in ordered))
    merged: Weights = {}
    for name in _float_names(global_weights):
        acc = np.zeros(global_weights[name].shape, dtype=np.float64)
        for update in ordered:
            acc += float(update.num_samples) * update.weights[name].astype(np.float64)
        merged[name] = acc / total
    return merged


def _stacked(ordered: Sequence[Update], name: str) -> np.ndarray:
    return np.stack([u.weights[name].astype(np.float64) for u in ordered])


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    return float(value)


class Strategy:
    """How a round's screened updates become the next global weights.

    Subclasses set ``name`` (the stable name :func:`make_strategy` knows them by) and implement :meth:`aggregate`;
    stateful ones also override :meth:`state` and :meth:`load_state`.
    """

    name: ClassVar[str] = ""

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Weights:
        """The next global weights: a new dict in ``global_weights``' order with its dtypes and shapes; non-float
        tensors are copies of the global ones. Inputs are not mutated; a stateful strategy updates its state only
        when it returns.

        Raises:
            ValueError: ``updates`` is empty, holds two updates from one node, or holds one that does not match
                ``global_weights`` (names, shapes, dtypes, non-finite values, ``num_samples``).
        """
        raise NotImplementedError

    def options(self) -> dict[str, float]:
        """The keyword options that rebuild this strategy with :func:`make_strategy`."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """The server-side state to checkpoint (copies); ``{}`` for a stateless strategy."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned.

        Raises:
            ValueError: ``state`` is not something this strategy's :meth:`state` produces.
        """
        if state:
            raise ValueError(f"{self.name} has no server-side state, but a state with {len(state)} entries was given")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


class FedAvg(Strategy):
    """The sample-weighted mean of the updates' weights (McMahan et al. 2017)."""

    name = "fedavg"

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Weights:
        ordered = _prepare(global_weights, updates)
        return _assemble(global_weights, _weighted_mean(global_weights, ordered))


class FedProx(FedAvg):
    """FedAvg's aggregation plus ``mu``, the proximal coefficient the coordinator puts into each training recipe.

    FedProx (Li et al. 2020) changes the nodes' local objective to ``loss + mu / 2 * ||w - global||^2``; the server
    side is FedAvg unchanged. This class does not apply ``mu`` anywhere: the node's training recipe must.

    Raises:
        ValueError: ``mu`` is negative or not a finite number.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = _number(mu, "mu")
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, not {mu!r}")

    def options(self) -> dict[str, float]:
        return {"mu": self.mu}


class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al. 2019); see the module docstring for the update rule.

    The velocity lives in float64 for every floating-point tensor and is the strategy's checkpointed state.

    Raises:
        ValueError: ``server_lr`` is not a positive finite number or ``momentum`` is outside ``[0, 1)``.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = _number(server_lr, "server_lr")
        self.momentum = _number(momentum, "momentum")
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, not {server_lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), not {momentum!r}")
        self._velocity: Weights = {}  # empty before the first round: v starts at 0

    def options(self) -> dict[str, float]:
        return {"server_lr": self.server_lr, "momentum": self.momentum}

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Weights:
        ordered = _prepare(global_weights, updates)
        names = _float_names(global_weights)
        if self._velocity and (sorted(self._velocity) != sorted(names) or any(
                self._velocity[n].shape != global_weights[n].shape for n in names)):
            raise ValueError("the server momentum does not match the model's tensors (a different model?)")
        mean = _weighted_mean(global_weights, ordered)
        velocity: Weights = {}
        merged: Weights = {}
        for name in names:
            d = global_weights[name].astype(np.float64) - mean[name]  # the pseudo-gradient
            v = self.momentum * self._velocity[name] + d if self._velocity else d
            velocity[name] = v
            # global - server_lr * v, written so that momentum=0 and server_lr=1 leave FedAvg's mean exactly.
            merged[name] = mean[name] - (self.server_lr * v - d)
        self._velocity = velocity
        return _assemble(global_weights, merged)

    def state(self) -> dict[str, np.ndarray]:
        return {_VELOCITY + name: v.copy() for name, v in self._velocity.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        velocity: Weights = {}
        for key, value in state.items():
            if not isinstance(key, str) or not key.startswith(_VELOCITY):
                raise ValueError(f"unexpected state entry {key!r}; FedAvgM keeps only {_VELOCITY}<tensor name>")
            if not isinstance(value, np.ndarray) or value.dtype != np.float64 or not np.isfinite(value).all():
                raise ValueError(f"state entry {key} must be a finite float64 array")
            velocity[key[len(_VELOCITY):]] = value.copy()
        self._velocity = velocity


class FedMedian(Strategy):
    """The coordinate-wise median of the updates' weights, ignoring ``num_samples`` (Yin et al. 2018)."""

    name = "median"

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Weights:
        ordered = _prepare(global_weights, updates)
        merged = {name: np.median(_stacked(ordered, name), axis=0) for name in _float_names(global_weights)}
        return _assemble(global_weights, merged)


class FedTrimmedMean(Strategy):
    """The coordinate-wise mean after dropping the ``floor(beta * n)`` lowest and highest values of each coordinate,
    ignoring ``num_samples`` (Yin et al. 2018). ``beta = 0`` is the plain unweighted mean.

    Raises:
        ValueError: ``beta`` is outside ``[0, 0.5)``.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = _number(beta, "beta")
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), not {beta!r}")

    def options(self) -> dict[str, float]:
        return {"beta": self.beta}

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Weights:
        ordered = _prepare(global_weights, updates)
        n = len(ordered)
        k = math.floor(self.beta * n)  # beta < 0.5 keeps n - 2k >= 1
        merged = {name: np.sort(_stacked(ordered, name), axis=0)[k:n - k].mean(axis=0)
                  for name in _float_names(global_weights)}
        return _assemble(global_weights, merged)


_STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "median": FedMedian,
    "trimmed_mean": FedTrimmedMean,
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("server_lr", "momentum"),
    "fedprox": ("mu",),
    "median": (),
    "trimmed_mean": ("beta",),
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)


def make_strategy(name: str, **options: float) -> Strategy:
    """A fresh strategy by its stable name (one of :data:`STRATEGY_NAMES`) with keyword options.

    Options: ``fedavgm``: ``server_lr`` (default 1.0), ``momentum`` (0.9); ``fedprox``: ``mu`` (0.01);
    ``trimmed_mean``: ``beta`` (0.1); ``fedavg`` and ``median`` take none.

    Raises:
        ValueError: an unknown name, an option the strategy does not take, or an option value out of its range.
    """
    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
        raise ValueError(f"strategy {name} does not take {', '.join(unknown)}; it {takes}")
    return _STRATEGIES[name](**options)
