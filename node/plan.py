"""Plans: what a scientist sends to train on someone else's data, and the audit that makes it safe to load.

Theory of operation
-------------------
A plan is three parts:

``program``
    The JSON graph of a ``torch.export`` program (``serialize(ep).exported_program``). Never an export archive:
    ``torch.export.load`` runs ``torch.load(weights_only=False)``, ``pickle.loads``, ``sympy.sympify`` (``eval``) on
    shape strings and ``getattr`` walks from ``torch``/``operator``/``math`` on call targets, so it is never called
    on a plan. :func:`audit_program` (pure Python, no torch import: the daemon runs it) walks the whole JSON and returns
    a sanitized copy; only that copy ever reaches torch's deserializer.
``weights``
    safetensors bytes of the program's state dict (parameters and persistent buffers, keyed by their FQN in the
    original ``nn.Module``). Lifted tensor constants, non-persistent buffers, custom objects and tokens are refused
    by the audit: a plan carries exactly ``model.state_dict()`` and nothing else, so trained weights load straight
    back into the scientist's module with :func:`apply_weights`.
``recipe``
    A dict from a fixed vocabulary (:func:`validate_recipe`). Its ``kind`` says what the node does with the model:
    ``"train"`` (the default) trains it on the private rows and releases the trained weights; ``"evaluate"`` only
    runs it on every private row and releases metrics (accuracy, loss, confusion counts), no weights.

What the program audit enforces (each rule names the deserializer path it closes, see
``torch/_export/serde/serialize.py``):

- size cap before parsing, bounded nesting and node count;
- every node target in :data:`ALLOWED_ATEN` (``torch.ops.aten.<op>.<overload>``) or a handful of symbolic-int
  helpers (``_operator.*``, ``torch.sym_*``): ``deserialize_operator`` resolves targets by ``getattr`` walks, so
  ``torch.serialization.os.system`` would otherwise be callable. ``#`` extension ops and higher-order ops are refused;
- no ``as_graph`` / ``as_operator`` / ``as_custom_obj`` arguments, no ``custom_obj_values`` (torchbind, pickles);
- every ``expr_str`` (sympified) matches a strict token grammar: symbols ``s<N>``/``u<N>``, integers, a few sympy
  function names, ``+ - * / % ( ) ,`` and spaces; no ``**`` (so no ``9**9**9`` hang);
- ``guards_code`` is emptied (``ep.module()`` ``exec``\\s it), node metadata (stack traces, ``nn_module_stack``,
  ``source_fn_stack``, ``torch_fn`` resolved by ``getattr``; ``from_node``; ``custom`` JSON) is dropped;
- every name that FX pastes into generated Python source (tensor and symbol names) is an identifier; FQNs are
  dotted identifiers; every other string matches a conservative character set; no string anywhere contains ``__``;
- ``in_spec``/``out_spec`` (pytree specs, which can ``importlib.import_module`` through ``defaultdict`` contexts and
  enum hooks) are re-parsed and limited to tuples, lists and dicts with identifier keys;
- the signature is one tensor user input, one tensor user output, parameters and persistent buffers (and their
  in-place mutations) only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from hivecell.crypto.canonical import canonical_packb

if TYPE_CHECKING:  # torch is imported lazily: the daemon imports this module and never imports torch
    import numpy as np
    import torch

__all__ = [
    "ALLOWED_ATEN",
    "DP_NOISE_RANGE",
    "UPDATE_ENCODINGS",
    "DpSpec",
    "EvalDpSpec",
    "EvalRecipe",
    "Plan",
    "PlanError",
    "Recipe",
    "apply_update",
    "apply_weights",
    "audit_program",
    "audit_weights",
    "build_plan",
    "decode_update",
    "encode_update",
    "load_program",
    "load_weights",
    "plan_hash",
    "plan_hash_of",
    "program_input_shape",
    "reload_weights",
    "to_eval_module",
    "update_encoding",
    "validate_recipe",
]


class PlanError(Exception):
    """A plan or recipe that is refused. ``code`` is ``"bad_plan"`` or ``"bad_recipe"``; ``message`` is short and safe
    to send to the peer that sent the plan (it never contains Python exception text)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _bad_plan(message: str) -> PlanError:
    return PlanError("bad_plan", message)


# -- recipe -----------------------------------------------------------------------------------------------------------

_KINDS = ("train", "evaluate")
_TASKS = ("classification", "regression")
_LOSSES = ("cross_entropy", "mse", "l1")
_OPTIMIZERS = ("sgd", "adam", "adamw")
_METRICS = ("accuracy", "loss")
_EVAL_METRICS = ("accuracy", "loss", "confusion")
_RECIPE_KEYS = frozenset(
    {"kind", "task", "loss", "optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size", "metrics",
     "eval_fraction", "seed", "dp", "prox_mu", "update"}
)
UPDATE_ENCODINGS = ("full", "fp16", "bf16", "int8")
_UPDATE_META = "hivecell.update"
_SCALE_SUFFIX = ".q8scale"
_HALF_DTYPES = {"fp16": ("F16", "float16"), "bf16": ("BF16", "bfloat16")}  # encoding: (safetensors, torch) dtype
_EVAL_KEYS = ("kind", "task", "loss", "metrics", "batch_size", "dp")  # the rest of _RECIPE_KEYS is about training
_DP_KEYS = frozenset({"noise_multiplier", "target_epsilon", "max_grad_norm", "delta"})
_EVAL_DP_KEYS = frozenset({"noise_multiplier", "target_epsilon", "max_loss", "delta"})
_DP_EVAL_FRACTION = ("eval_fraction must be 0 under dp: evaluating on private rows is an evaluate job of its own, "
                     "charged to the budget")
DP_NOISE_RANGE = (0.1, 100.0)  # noise multipliers a recipe may state, and noise_for_epsilon searches


def _dp_dict(noise: float | None, target: float | None, bound_key: str, bound: float, delta: float
             ) -> dict[str, Any]:
    """A ``dp`` section in its normalized form: the noise (or target), then the bound, then delta."""
    out: dict[str, Any] = {}
    if noise is not None:
        out["noise_multiplier"] = noise
    if target is not None:
        out["target_epsilon"] = target
    out[bound_key] = bound
    out["delta"] = delta
    return out


@dataclass(frozen=True)
class DpSpec:
    """A recipe's ``dp`` section: exactly one of ``noise_multiplier`` and ``target_epsilon`` is set.

    ``max_grad_norm`` is the per-example L2 clip norm, ``delta`` the (epsilon, delta)-DP delta. How the Worker uses them
    and what the accountant assumes is described in ``privacy.py``.
    """

    max_grad_norm: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _dp_dict(self.noise_multiplier, self.target_epsilon, "max_grad_norm", self.max_grad_norm, self.delta)


@dataclass(frozen=True)
class EvalDpSpec:
    """An evaluate recipe's ``dp`` section: exactly one of ``noise_multiplier`` and ``target_epsilon`` is set.

    ``max_loss`` bounds what one example adds to the loss sum (a larger or non-finite loss counts as ``max_loss``),
    ``delta`` is the (epsilon, delta)-DP delta. The mechanism is described in ``privacy.py``.
    """

    max_loss: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _dp_dict(self.noise_multiplier, self.target_epsilon, "max_loss", self.max_loss, self.delta)


@dataclass(frozen=True)
class Recipe:
    """A validated, normalized training recipe (every default filled)."""

    kind: ClassVar[str] = "train"
    task: str = "classification"
    loss: str = "cross_entropy"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    metrics: tuple[str, ...] = ("accuracy", "loss")
    eval_fraction: float = 0.2
    seed: int = 0
    dp: DpSpec | None = None  # None: no differential privacy
    prox_mu: float = 0.0  # FedProx's proximal term: mu/2 * ||w - w_start||^2 added to the training loss
    update: str = "full"  # fp16/bf16/int8: the result is the change from the job's weights, compressed (encode_update)

    def to_dict(self) -> dict[str, Any]:
        """The normalized recipe; ``kind`` never appears (``"train"`` is the default) and ``dp`` only when set, so
        recipes without them hash as they always did."""
        out = {
            "task": self.task,
            "loss": self.loss,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "metrics": list(self.metrics),
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
        }
        if self.dp is not None:
            out["dp"] = self.dp.to_dict()
        if self.prox_mu:
            out["prox_mu"] = self.prox_mu
        if self.update != "full":
            out["update"] = self.update
        return out


@dataclass(frozen=True)
class EvalRecipe:
    """A validated, normalized evaluate recipe: run the model on every row and release metrics, no weights."""

    kind: ClassVar[str] = "evaluate"
    task: str = "classification"
    loss: str = "cross_entropy"
    batch_size: int = 32
    metrics: tuple[str, ...] = _EVAL_METRICS
    dp: EvalDpSpec | None = None  # None: the exact metrics, no privacy bound

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "task": self.task, "loss": self.loss, "metrics": list(self.metrics),
                               "batch_size": self.batch_size}
        if self.dp is not None:
            out["dp"] = self.dp.to_dict()
        return out


def _bad_recipe(message: str) -> PlanError:
    return PlanError("bad_recipe", message)


def _shown(key: object) -> str:
    """A peer's key, fit to quote back in an error message."""
    return key if isinstance(key, str) and len(key) <= 40 and key.isprintable() else "?"


def _choice(recipe: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = recipe.get(key, default)
    if not isinstance(value, str) or value not in choices:
        raise _bad_recipe(f"{key} must be one of {', '.join(choices)}")
    return value


def _number(recipe: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = False) -> float:
    value = recipe.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad_recipe(f"{key} must be a number")
    value = float(value)
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise _bad_recipe(f"{key} must be in {left}{lo:g}, {hi:g}{right}")
    return value


def _integer(recipe: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = recipe.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_recipe(f"{key} must be an integer")
    if not lo <= value <= hi:
        raise _bad_recipe(f"{key} must be between {lo} and {hi}")
    return value


def _dp_section(dp: object, keys: frozenset[str], bound: str,
                refused: Mapping[str, str]) -> tuple[float | None, float | None, float, float]:
    """Check a ``dp`` section with the keys ``keys``, of which ``bound`` and ``delta`` are required; return
    ``(noise_multiplier, target_epsilon, bound, delta)``, exactly one of the first two set. ``refused`` maps keys that
    belong to the other kind of recipe to the message that says so."""
    if not isinstance(dp, Mapping):
        raise _bad_recipe("dp must be a map")
    for key in dp:
        if isinstance(key, str) and key in refused:
            raise _bad_recipe(refused[key])
        if not isinstance(key, str) or key not in keys:
            raise _bad_recipe(f"unknown dp key {_shown(key)!r}")
    if ("noise_multiplier" in dp) == ("target_epsilon" in dp):
        raise _bad_recipe("dp needs exactly one of noise_multiplier and target_epsilon")
    for key in (bound, "delta"):
        if key not in dp:
            raise _bad_recipe(f"dp.{key} is required")

    def number(key: str, lo: float, hi: float, *, lo_open: bool) -> float:
        try:
            return _number(dp, key, 0.0, lo, hi, lo_open=lo_open)
        except PlanError as exc:
            raise _bad_recipe(f"dp.{exc.message}") from None

    noise = target = None
    if "noise_multiplier" in dp:
        noise = number("noise_multiplier", *DP_NOISE_RANGE, lo_open=False)
    else:
        target = number("target_epsilon", 0.0, 100.0, lo_open=True)
    return noise, target, number(bound, 0.0, 100.0, lo_open=True), number("delta", 0.0, 1e-3, lo_open=True)


def _validate_dp(dp: object) -> DpSpec:
    noise, target, max_grad_norm, delta = _dp_section(dp, _DP_KEYS, "max_grad_norm", {})
    return DpSpec(max_grad_norm=max_grad_norm, delta=delta, noise_multiplier=noise, target_epsilon=target)


def _validate_eval_dp(dp: object) -> EvalDpSpec:
    refused = {"max_grad_norm": "dp.max_grad_norm is for training; an evaluate recipe bounds each example's loss "
                                "with dp.max_loss instead"}
    noise, target, max_loss, delta = _dp_section(dp, _EVAL_DP_KEYS, "max_loss", refused)
    return EvalDpSpec(max_loss=max_loss, delta=delta, noise_multiplier=noise, target_epsilon=target)


def _task_and_loss(recipe: Mapping[str, Any]) -> tuple[str, str]:
    task = _choice(recipe, "task", _TASKS, "classification")
    loss = _choice(recipe, "loss", _LOSSES, "cross_entropy" if task == "classification" else "mse")
    if loss == "cross_entropy" and task != "classification":
        raise _bad_recipe("loss cross_entropy needs task classification")
    return task, loss


def _metrics(recipe: Mapping[str, Any], vocabulary: tuple[str, ...], default: tuple[str, ...],
             classification: bool) -> tuple[str, ...]:
    """The recipe's metrics, in vocabulary order."""
    metrics = recipe.get("metrics", list(default))
    if not isinstance(metrics, (list, tuple)) or not all(isinstance(m, str) and m in vocabulary for m in metrics):
        raise _bad_recipe(f"metrics must be a list drawn from {', '.join(vocabulary)}")
    if len(set(metrics)) != len(metrics):
        raise _bad_recipe("metrics must not repeat")
    for metric in ("accuracy", "confusion"):
        if metric in metrics and not classification:
            raise _bad_recipe(f"metric {metric} needs task classification")
    return tuple(m for m in vocabulary if m in metrics)


def _validate_evaluate(recipe: Mapping[str, Any]) -> EvalRecipe:
    for key in recipe:
        if key not in _EVAL_KEYS:
            raise _bad_recipe(f"{key} is a training key; an evaluate recipe takes only {', '.join(_EVAL_KEYS)}")
    task, loss = _task_and_loss(recipe)
    classification = task == "classification"
    batch_size = _integer(recipe, "batch_size", 32, 1, 65536)
    metrics = _metrics(recipe, _EVAL_METRICS, _EVAL_METRICS if classification else ("loss",), classification)
    if not metrics:
        raise _bad_recipe("metrics must name at least one metric to evaluate")
    dp = _validate_eval_dp(recipe["dp"]) if "dp" in recipe else None
    return EvalRecipe(task=task, loss=loss, batch_size=batch_size, metrics=metrics, dp=dp)


def validate_recipe(recipe: object) -> Recipe | EvalRecipe:
    """Check a recipe against the vocabulary and fill its defaults: a :class:`Recipe` for ``kind`` ``"train"`` (the
    default), an :class:`EvalRecipe` for ``"evaluate"``.

    Under ``dp`` a training recipe releases nothing computed on private rows but the weights: ``eval_fraction`` must
    be 0 and ``metrics`` empty (both their defaults there); an evaluate job measures a model with noise instead.

    Raises:
        PlanError: code ``"bad_recipe"``, naming the offending key.
    """
    if not isinstance(recipe, Mapping):
        raise _bad_recipe("recipe must be a map")
    for key in recipe:
        if not isinstance(key, str) or key not in _RECIPE_KEYS:
            raise _bad_recipe(f"unknown recipe key {_shown(key)!r}")
    if _choice(recipe, "kind", _KINDS, "train") == "evaluate":
        return _validate_evaluate(recipe)
    task, loss = _task_and_loss(recipe)
    classification = task == "classification"
    optimizer = _choice(recipe, "optimizer", _OPTIMIZERS, "adam")
    lr = _number(recipe, "lr", 1e-3, 0.0, 10.0, lo_open=True)
    momentum = _number(recipe, "momentum", 0.0, 0.0, 1.0, hi_open=True)
    if momentum and optimizer != "sgd":
        raise _bad_recipe("momentum applies to optimizer sgd only")
    weight_decay = _number(recipe, "weight_decay", 0.0, 0.0, 1.0)
    epochs = _integer(recipe, "epochs", 1, 1, 1000)
    batch_size = _integer(recipe, "batch_size", 32, 1, 65536)
    dp = _validate_dp(recipe["dp"]) if "dp" in recipe else None
    default_metrics: tuple[str, ...] = () if dp else ("accuracy", "loss") if classification else ("loss",)
    metrics = _metrics(recipe, _METRICS, default_metrics, classification)
    eval_fraction = _number(recipe, "eval_fraction", 0.0 if dp else 0.2, 0.0, 0.9)
    if dp is not None and eval_fraction:
        raise _bad_recipe(_DP_EVAL_FRACTION)
    if dp is not None and metrics:
        raise _bad_recipe("metrics must be empty under dp: evaluating on private rows is an evaluate job of its own, "
                          "charged to the budget")
    seed = _integer(recipe, "seed", 0, 0, 2**31 - 1)
    prox_mu = _number(recipe, "prox_mu", 0.0, 0.0, 10.0)
    if prox_mu and dp is not None:
        raise _bad_recipe("prox_mu is not supported under dp yet")
    update = _choice(recipe, "update", UPDATE_ENCODINGS, "full")
    return Recipe(task=task, loss=loss, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                  epochs=epochs, batch_size=batch_size, metrics=metrics, eval_fraction=eval_fraction, seed=seed, dp=dp,
                  prox_mu=prox_mu, update=update)


# -- program audit (pure Python) --------------------------------------------------------------------------------------

# Operator packets a plan may call, as torch.export's training IR (and the eval-mode ATen IR) emits them for MLPs and
# small CNNs. Every one of them reads and writes tensors only: nothing that opens files (from_file), picks devices,
# touches the RNG seed, or calls back into Python.
ALLOWED_ATEN = frozenset(
    {
        # layers
        "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "linear", "addmm", "mm", "matmul", "bmm",
        "embedding",
        # activations
        "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "leaky_relu", "leaky_relu_", "hardtanh",
        "hardtanh_", "elu", "softplus", "softmax", "_softmax", "log_softmax", "_log_softmax",
        # pooling
        "max_pool1d", "max_pool2d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
        # shapes and copies
        "view", "_unsafe_view", "reshape", "flatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
        "contiguous", "clone", "slice", "select", "cat", "stack", "alias", "detach",
        # arithmetic and reductions
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "pow", "sqrt", "rsqrt", "exp", "log",
        "mean", "sum", "amax",
        # normalization and regularization
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
        "_native_batch_norm_legit_no_training", "layer_norm", "native_layer_norm", "dropout", "native_dropout",
        # symbolic sizes
        "sym_size",
    }
)
_ALLOWED_PY_TARGETS = frozenset(
    {
        "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
        "_operator.truediv", "_operator.mod", "_operator.neg", "_operator.eq", "_operator.ne", "_operator.lt",
        "_operator.le", "_operator.gt", "_operator.ge", "torch.sym_max", "torch.sym_min", "torch.sym_float",
        "torch.sym_int", "torch.sym_not",
    }
)
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([a-z0-9_]{1,64})\.([A-Za-z0-9_]{1,64})\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_FQN = re.compile(r"[A-Za-z0-9_]{1,100}(\.[A-Za-z0-9_]{1,100}){0,31}\Z")
_SAFE_STRING = re.compile(r"[A-Za-z0-9_.:+\- ]{0,256}\Z")
_EXPR_CALLS = frozenset(
    {"Symbol", "Integer", "Add", "Mul", "Mod", "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod", "Max", "Min"}
)
_EXPR_KEYWORDS = frozenset({"positive", "integer", "nonnegative"})
_EXPR_NAMES = _EXPR_CALLS | _EXPR_KEYWORDS | {"True", "False"}
_EXPR_TOKEN = re.compile(r"\s+|'[su][0-9]{1,9}'|[0-9]{1,18}(?![0-9])|[A-Za-z][A-Za-z0-9]{0,31}|[-+*/%(),=]")
_SYMBOL = re.compile(r"[su][0-9]{1,9}\Z")
_ARG_TYPES = frozenset(
    {
        "as_none", "as_tensor", "as_tensors", "as_optional_tensors", "as_int", "as_ints", "as_float", "as_floats",
        "as_bool", "as_bools", "as_string", "as_strings", "as_sym_int", "as_sym_ints", "as_sym_float",
        "as_sym_floats", "as_sym_bool", "as_sym_bools", "as_scalar_type", "as_memory_format", "as_layout",
        "as_device",
    }
)
_DEVICE_TYPES = frozenset({"cpu", "cuda"})
_STRIPPED = {"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "from_node", "custom"}
_MAX_DEPTH = 48
_MAX_NODES = 20_000
_SPEC_KEYS = ("in_spec", "out_spec")
_NAME_KEYS = frozenset({"name", "as_name"})
_FQN_KEYS = frozenset({"parameter_name", "buffer_name", "target", "fqn"})


def _check_expr(expr: object) -> None:
    """Shape expressions are ``sympy.sympify``'d (an ``eval``): allow only a tiny token grammar.

    The serializer writes sympy's ``srepr`` form, e.g. ``Symbol('s77', positive=True, integer=True)`` or
    ``Mul(Integer(2), Symbol('s0', ...))``; plain infix (``2*s0 + 1``) is accepted too. No attribute access, no
    subscripts, no strings other than quoted symbol names, no powers, bounded integers and length.
    """
    if not isinstance(expr, str) or len(expr) > 1024:
        raise _bad_plan("shape expression too long or not a string")
    tokens = []
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            raise _bad_plan("shape expression contains a forbidden token")
        token = m.group()
        pos = m.end()
        if token.isspace():
            continue
        if token[0].isalpha() and not _SYMBOL.match(token) and token not in _EXPR_NAMES:
            raise _bad_plan("shape expression names something that is not allowed")
        tokens.append(token)
    for a, b in zip(tokens, tokens[1:]):
        if a == "*" and b == "*":  # powers: 9**9**9 would hang sympy
            raise _bad_plan("shape expression contains a power")
        if a == "=" and b not in ("True", "False"):
            raise _bad_plan("shape expression misuses a keyword")
        if b == "=" and a not in _EXPR_KEYWORDS:
            raise _bad_plan("shape expression misuses a keyword")
        if a in _EXPR_CALLS and b != "(":
            raise _bad_plan("shape expression misuses a function name")


def _check_treespec(spec: object) -> None:
    """Re-parse a pytree spec string: only tuples, lists and dicts with identifier keys, and leaves."""
    if not isinstance(spec, str) or len(spec) > 65536:
        raise _bad_plan("bad pytree spec")
    try:
        protocol, schema = json.loads(spec)
    except (ValueError, TypeError, RecursionError):
        raise _bad_plan("bad pytree spec") from None
    if protocol != 1:
        raise _bad_plan("bad pytree spec")

    def walk(node: object, depth: int) -> None:
        if depth > 16 or not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise _bad_plan("bad pytree spec")
        typ, context, children = node["type"], node["context"], node["children_spec"]
        if not isinstance(children, list):
            raise _bad_plan("bad pytree spec")
        if typ is None:
            if context is not None or children:
                raise _bad_plan("bad pytree spec")
            return
        if typ in ("builtins.tuple", "builtins.list"):
            if context != "null":
                raise _bad_plan("bad pytree spec")
        elif typ == "builtins.dict":
            try:
                keys = json.loads(context) if isinstance(context, str) else None
            except ValueError:
                keys = None
            if not isinstance(keys, list) or len(keys) != len(children):
                raise _bad_plan("bad pytree spec")
            for key in keys:
                if not isinstance(key, str) or not _IDENT.match(key) or "__" in key:
                    raise _bad_plan("bad pytree spec key")
        else:
            raise _bad_plan("pytree spec uses a type that is not allowed")
        for child in children:
            walk(child, depth + 1)

    walk(schema, 0)


def _walk_strings(value: object, depth: int, parent_key: str | None) -> None:
    """Check every string in the (already de-metadata'd) program: keys and values."""
    if depth > _MAX_DEPTH:
        raise _bad_plan("program nests too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if "__" in key or not _SAFE_STRING.match(key):
                raise _bad_plan("program contains a forbidden key")
            if parent_key in ("tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values"):
                if not _IDENT.match(key):
                    raise _bad_plan("program contains a value name that is not an identifier")
            if key == "expr_str":
                _check_expr(item)
            elif key in _SPEC_KEYS:
                if item is not None:
                    _check_treespec(item)
            else:
                _walk_strings(item, depth + 1, key)
    elif isinstance(value, list):
        for item in value:
            _walk_strings(item, depth + 1, parent_key)
    elif isinstance(value, str):
        if "__" in value or not _SAFE_STRING.match(value):
            raise _bad_plan("program contains a forbidden string")
        if parent_key in _NAME_KEYS or parent_key == "forward_arg_names":
            if not _IDENT.match(value):
                raise _bad_plan("program contains a name that is not an identifier")
        elif parent_key in _FQN_KEYS and parent_key != "target":
            if value and not _FQN.match(value):
                raise _bad_plan("program contains a malformed module path")
    elif isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return
    else:  # pragma: no cover - json.loads yields nothing else
        raise _bad_plan("program contains an unexpected value")


def _one(union: object, what: str) -> tuple[str, Any]:
    if not isinstance(union, dict) or len(union) != 1:
        raise _bad_plan(f"malformed {what}")
    return next(iter(union.items()))


def _check_target(target: object) -> None:
    if not isinstance(target, str):
        raise _bad_plan("node target is not a string")
    if target.startswith("#"):
        raise _bad_plan("extension operators are not allowed")
    if target.startswith("torch.ops.higher_order"):
        raise _bad_plan("higher-order operators are not allowed")
    if target in _ALLOWED_PY_TARGETS:
        return
    m = _ATEN_TARGET.match(target)
    if m is None or m.group(1) not in ALLOWED_ATEN or "out" in m.group(2).lower().split("_"):
        shown = target if len(target) <= 80 and _SAFE_STRING.match(target) and "__" not in target else "?"
        raise _bad_plan(f"operator {shown} is not allowed")


def _check_argument(arg: object) -> None:
    kind, value = _one(arg, "argument")
    if kind not in _ARG_TYPES:
        raise _bad_plan(f"argument kind {kind if _SAFE_STRING.match(kind) else '?'} is not allowed")
    if kind == "as_device":
        if not isinstance(value, dict) or value.get("type") not in _DEVICE_TYPES:
            raise _bad_plan("device not allowed")


def _check_graph(graph: object) -> None:
    if not isinstance(graph, dict):
        raise _bad_plan("malformed graph")
    if graph.get("custom_obj_values"):
        raise _bad_plan("custom objects are not allowed")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or len(nodes) > _MAX_NODES:
        raise _bad_plan("graph has too many nodes or none")
    for inp in graph.get("inputs", ()):
        kind, _ = _one(inp, "graph input")
        if kind != "as_tensor":
            raise _bad_plan("graph inputs must be tensors")
    for out in graph.get("outputs", ()):
        kind, _ = _one(out, "graph output")
        if kind not in ("as_tensor", "as_none"):
            raise _bad_plan("graph outputs must be tensors")
    for meta in (graph.get("tensor_values") or {}).values():
        if not isinstance(meta, dict) or not isinstance(meta.get("device"), dict):
            raise _bad_plan("malformed tensor metadata")
        if meta["device"].get("type") not in _DEVICE_TYPES:
            raise _bad_plan("device not allowed")
    for node in nodes:
        if not isinstance(node, dict):
            raise _bad_plan("malformed node")
        _check_target(node.get("target"))
        for named in node.get("inputs", ()):
            if not isinstance(named, dict):
                raise _bad_plan("malformed node input")
            _check_argument(named.get("arg"))
        for out in node.get("outputs", ()):
            _check_argument(out)
        node["metadata"] = {}  # resolved by getattr walks and json.loads in deserialize_metadata


def _check_signature(signature: object) -> None:
    if not isinstance(signature, dict):
        raise _bad_plan("malformed signature")
    user_inputs = user_outputs = 0
    for spec in signature.get("input_specs", ()):
        kind, value = _one(spec, "input spec")
        if kind == "user_input":
            arg_kind, _ = _one(value.get("arg") if isinstance(value, dict) else None, "user input")
            if arg_kind != "as_tensor":
                raise _bad_plan("the program's input must be a tensor")
            user_inputs += 1
        elif kind == "parameter":
            pass
        elif kind == "buffer":
            if not (isinstance(value, dict) and value.get("persistent") is True):
                raise _bad_plan("non-persistent buffers are not supported")
        else:
            raise _bad_plan(f"program inputs of kind {kind if _SAFE_STRING.match(kind) else '?'} are not allowed")
    for spec in signature.get("output_specs", ()):
        kind, value = _one(spec, "output spec")
        if kind == "user_output":
            arg_kind, _ = _one(value.get("arg") if isinstance(value, dict) else None, "user output")
            if arg_kind != "as_tensor":
                raise _bad_plan("the program's output must be a tensor")
            user_outputs += 1
        elif kind not in ("buffer_mutation", "parameter_mutation"):
            raise _bad_plan(f"program outputs of kind {kind if _SAFE_STRING.match(kind) else '?'} are not allowed")
    if user_inputs != 1 or user_outputs != 1:
        raise _bad_plan("the program must take one tensor and return one tensor")


def _check_range_constraints(constraints: object) -> None:
    if not isinstance(constraints, dict):
        raise _bad_plan("malformed range constraints")
    for key, value in constraints.items():
        if not _SYMBOL.match(key):
            raise _bad_plan("malformed range constraint symbol")
        if not isinstance(value, dict):
            raise _bad_plan("malformed range constraint")
        for bound in ("min_val", "max_val"):
            b = value.get(bound)
            if b is not None and (isinstance(b, bool) or not isinstance(b, int)):
                raise _bad_plan("range constraint bounds must be integers")


def audit_program(program: bytes, *, max_bytes: int = 64 << 20) -> bytes:
    """Audit an exported program's JSON and return a sanitized copy, the only form ever handed to torch.

    Pure Python: safe to call in a process that must not import torch.

    Raises:
        PlanError: code ``"bad_plan"``.
    """
    if not isinstance(program, (bytes, bytearray, memoryview)):
        raise _bad_plan("program must be bytes")
    if len(program) > max_bytes:
        raise _bad_plan("program too large")
    try:
        doc = json.loads(bytes(program).decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise _bad_plan("program is not a JSON export graph") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise _bad_plan("program is not a JSON export graph")
    gm = doc["graph_module"]
    _check_graph(gm.get("graph"))
    _check_signature(gm.get("signature"))
    _check_range_constraints(doc.get("range_constraints", {}))
    gm["metadata"] = {}  # "custom" is json.loads'ed into graph meta
    gm["treespec_namedtuple_fields"] = {}
    doc["guards_code"] = []  # exec'd by ep.module(): never from the network
    verifiers = doc.get("verifiers", [])
    if not isinstance(verifiers, list) or not set(verifiers) <= {"ATEN", "TRAINING", ""}:
        raise _bad_plan("unknown verifier dialect")
    for entry in gm.get("module_call_graph", ()):
        if isinstance(entry, dict) and isinstance(entry.get("signature"), dict):
            for arg in entry["signature"].get("inputs", []) + entry["signature"].get("outputs", []):
                _check_argument(arg)
    _walk_strings(doc, 0, None)
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN / Infinity: turned into "not a JSON export graph"


# -- weights audit (pure Python) --------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                       "BOOL": 1}
_MAX_HEADER = 16 << 20
_NUMPY_TO_ST = {"f8": "F64", "f4": "F32", "f2": "F16", "i8": "I64", "i4": "I32", "i2": "I16", "i1": "I8", "u1": "U8",
                "b1": "BOOL"}
_ST_TO_NUMPY = {st: ("|" if np_code[1] == "1" else "<") + np_code for np_code, st in _NUMPY_TO_ST.items()}


def audit_weights(weights: bytes, *, max_bytes: int = 1 << 30) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse and check a safetensors buffer's header without torch; return ``{name: (dtype, shape)}``.

    Raises:
        PlanError: code ``"bad_plan"``: not safetensors, a dtype we do not take, offsets that overlap, leave holes or
            point outside the buffer, or more than ``max_bytes``.
    """
    return _audit_safetensors(weights, max_bytes=max_bytes)[0]


def _safetensors_header(weights: bytes) -> tuple[dict[str, Any], int]:
    """A safetensors buffer's JSON header (not yet checked beyond being a JSON object) and where its data starts."""
    if len(weights) < 8:
        raise _bad_plan("weights are not safetensors")
    (header_len,) = struct.unpack_from("<Q", weights, 0)
    if header_len > min(_MAX_HEADER, len(weights) - 8):
        raise _bad_plan("weights are not safetensors")
    try:
        header = json.loads(bytes(weights[8 : 8 + header_len]).decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise _bad_plan("weights are not safetensors") from None
    if not isinstance(header, dict):
        raise _bad_plan("weights are not safetensors")
    return header, 8 + header_len


def _audit_safetensors(weights: bytes, *, max_bytes: int
                       ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """:func:`audit_weights`, and the header's ``__metadata__`` (``{}`` when there is none)."""
    if not isinstance(weights, (bytes, bytearray, memoryview)):
        raise _bad_plan("weights must be bytes")
    if len(weights) > max_bytes:
        raise _bad_plan("weights too large")
    header, data_start = _safetensors_header(weights)
    data_len = len(weights) - data_start
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    metadata: dict[str, str] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _bad_plan("weights metadata malformed")
            metadata = entry
            continue
        if not _FQN.match(name) or "__" in name:
            raise _bad_plan("weights contain a malformed tensor name")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad_plan("weights header malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise _bad_plan("weights use a dtype that is not allowed")
        if not isinstance(shape, list) or len(shape) > 16 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
        ):
            raise _bad_plan("weights header has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets
        )):
            raise _bad_plan("weights header has malformed offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad_plan("weights offsets out of range")
        if end - begin != math.prod(shape) * _SAFETENSORS_DTYPES[dtype]:
            raise _bad_plan("weights offsets do not match the shape")
        spans.append((begin, end))
        out[name] = (dtype, tuple(shape))
    cursor = 0
    for begin, end in sorted(spans):
        if begin != cursor:
            raise _bad_plan("weights offsets overlap or leave holes")
        cursor = end
    if cursor != data_len:
        raise _bad_plan("weights size does not match the header")
    return out, metadata


# -- hashing ----------------------------------------------------------------------------------------------------------


def plan_hash(program: bytes, weights: bytes, recipe: dict[str, Any]) -> str:
    """The plan's identity: sha256 over canonical msgpack of the parts' hashes and the (normalized) recipe."""
    return _plan_hash(program, hashlib.sha256(weights).hexdigest(), recipe)


def _plan_hash(program: bytes, weights_sha256: str, recipe: dict[str, Any]) -> str:
    return plan_hash_of(hashlib.sha256(program).hexdigest(), weights_sha256, recipe)


def plan_hash_of(program_sha256: str, weights_sha256: str, recipe: dict[str, Any]) -> str:
    """:func:`plan_hash` from the sha256 (hex) of the program and of the weights, for a caller that has them."""
    return hashlib.sha256(canonical_packb([program_sha256, weights_sha256, recipe])).hexdigest()


@dataclass(frozen=True)
class Plan:
    """A plan ready to send: program JSON, safetensors weights and a normalized recipe dict."""

    program: bytes
    weights: bytes
    recipe: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def weights_sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    @functools.cached_property
    def hash(self) -> str:
        """As :func:`plan_hash` (computed once: a FedAvg round sends one plan to many nodes)."""
        return _plan_hash(self.program, self.weights_sha256, self.recipe)


# -- client side (torch) ----------------------------------------------------------------------------------------------


def build_plan(model: torch.nn.Module, example_input: torch.Tensor, recipe: Mapping[str, Any] | None = None) -> Plan:
    """Export ``model`` (in training mode, batch dimension dynamic) into a plan and audit it as a node would.

    Raises:
        PlanError: the recipe is refused (``"bad_recipe"``), or the exported program would be refused by a node
            (``"bad_plan"``, e.g. an operator outside :data:`ALLOWED_ATEN` or a lifted tensor constant).
    """
    import torch
    from safetensors.torch import save

    normalized = validate_recipe(recipe or {}).to_dict()
    was_training = model.training
    model.train()  # dropout and batch norm are traced in their training form; to_eval_module switches them off
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        ep = torch.export.export(model, (example_input,), dynamic_shapes=({0: batch},))
    finally:
        model.train(was_training)
    if ep.constants:
        raise _bad_plan("the model has tensor constants or non-persistent buffers; register them as buffers")
    program = audit_program(_serialize_graph(ep))
    state = {k: v.detach().contiguous().cpu() for k, v in ep.state_dict.items()}
    weights = save(state)
    audit_weights(weights)
    return Plan(program=program, weights=weights, recipe=normalized)


def _serialize_graph(ep: Any) -> bytes:
    """The JSON graph of an exported program, without its state dict (the weights travel as safetensors).

    torch 2.13 can skip pickling the state dict, constants and example inputs; older torch (2.5 on JetPack 6, 2.11)
    always pickles them alongside. That happens here, on the scientist's own model, and those bytes are dropped:
    only the JSON graph is kept.
    """
    import inspect

    from torch._export.serde.serialize import serialize

    if "serialize_state_dict" in inspect.signature(serialize).parameters:
        artifact = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    else:
        artifact = serialize(ep)
    return artifact.exported_program


def encode_update(start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], encoding: str) -> bytes:
    """A job's trained weights as their change from the weights it started from, compressed (recipe ``update``).

    ``fp16``: every floating-point tensor's difference in half precision (half the bytes of float32; 11 significant
    bits, but changes under 6e-5 lose bits and under 3e-8 vanish). ``bf16``: the same in bfloat16 (half the bytes, 8
    significant bits, float32's range: the tiny changes of a small learning rate survive). ``int8``: the difference
    rounded to 127 steps of a per-tensor scale (``max |difference| / 127``, stored as ``NAME.q8scale``, float32): a
    quarter of the bytes, an error of at most half a step per value. Integer tensors (batch norm's
    counter) are sent whole. A difference that is not finite stays so (a NaN scale for int8), so the coordinator's
    finite check refuses the update. The encoding is named in the safetensors metadata; :func:`decode_update` undoes
    it against the same starting weights.
    """
    import torch
    from safetensors.torch import save

    if encoding not in UPDATE_ENCODINGS or encoding == "full":
        raise ValueError(f"update encoding must be one of {', '.join(UPDATE_ENCODINGS[1:])}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in trained.items():
        tensor = tensor.detach().cpu()
        if not tensor.is_floating_point():
            out[name] = tensor.contiguous()
            continue
        delta = tensor.float() - start[name].detach().cpu().float()
        if encoding in _HALF_DTYPES:
            out[name] = delta.to(getattr(torch, _HALF_DTYPES[encoding][1])).contiguous()
            continue
        if name + _SCALE_SUFFIX in trained:
            raise ValueError(f"cannot encode int8: the model has a tensor named {name + _SCALE_SUFFIX}")
        peak = float(delta.abs().max()) if delta.numel() else 0.0
        if not math.isfinite(peak):
            scale, q = math.nan, torch.zeros_like(delta, dtype=torch.int8)
        else:
            scale = peak / 127.0 if peak > 0 else 1.0
            q = torch.round(delta / scale).clamp_(-127, 127).to(torch.int8)
        out[name] = q.contiguous()
        out[name + _SCALE_SUFFIX] = torch.tensor([scale], dtype=torch.float32)
    return save(out, metadata={_UPDATE_META: encoding})


def decode_update(data: bytes, base: Mapping[str, np.ndarray], encoding: str, *,
                  max_bytes: int = 1 << 30) -> dict[str, np.ndarray]:
    """The trained weights from an update made by :func:`encode_update` against ``base`` (numpy, the coordinator's
    global weights of the round). ``data`` comes from another peer: everything is checked before it is used.

    Raises:
        ValueError: the update is not safetensors, is not encoded as ``encoding``, or its tensors do not match
            ``base`` (a missing, extra, misshapen or mistyped tensor, a scale that is not one float32).
    """
    import numpy as np
    from safetensors.numpy import load

    try:
        header, meta = _audit_safetensors(data, max_bytes=max_bytes)
    except PlanError as exc:
        raise ValueError(f"the update is malformed: {exc}") from None
    if meta.get(_UPDATE_META) != encoding:
        raise ValueError(f"the update is not encoded as {encoding}")
    want: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, array in base.items():
        shape = tuple(int(d) for d in array.shape)
        if array.dtype.kind != "f":
            want[name] = (_NUMPY_TO_ST.get(array.dtype.str.lstrip("<>|="), "?"), shape)
        elif encoding in _HALF_DTYPES:
            want[name] = (_HALF_DTYPES[encoding][0], shape)
        else:
            want[name], want[name + _SCALE_SUFFIX] = ("I8", shape), ("F32", (1,))
    if header != want:
        missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
        wrong = sorted(k for k in set(want) & set(header) if want[k] != header[k])
        raise ValueError(f"the update does not match the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong dtype or shape {wrong[:3]}")
    tensors = _bf16_as_float32(data) if encoding == "bf16" else load(bytes(data))  # numpy has no bfloat16
    out: dict[str, np.ndarray] = {}
    for name, array in base.items():
        if array.dtype.kind != "f":
            out[name] = tensors[name]
            continue
        delta = tensors[name].astype(np.float32)
        if encoding == "int8":
            delta *= tensors[name + _SCALE_SUFFIX][0]
        out[name] = (array.astype(np.float32) + delta).astype(array.dtype)
    return out


def _bf16_as_float32(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of safetensors bytes that :func:`_audit_safetensors` passed, BF16 ones widened to float32 (a
    bfloat16 is the top half of a float32: exact)."""
    import numpy as np

    header, start = _safetensors_header(data)
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        stored = "<u2" if dtype == "BF16" else _ST_TO_NUMPY[dtype]
        width = np.dtype(stored).itemsize
        array = np.frombuffer(data, dtype=stored, count=(end - begin) // width, offset=start + begin)
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array.reshape(shape).copy()
    return out


def update_encoding(data: bytes) -> str:
    """``"fp16"``/``"bf16"``/``"int8"`` for an update made by :func:`encode_update`, ``"full"`` for plain weights."""
    try:
        _, meta = _audit_safetensors(data, max_bytes=1 << 30)
    except PlanError:
        return "full"
    encoding = meta.get(_UPDATE_META, "full")
    return encoding if encoding in UPDATE_ENCODINGS else "full"


def apply_update(weights: bytes, update: bytes, encoding: str) -> bytes:
    """The trained weights (safetensors) of a job whose recipe asked for an ``update`` encoding, from the weights the
    job was sent (``plan.weights``) and the weights its result carries."""
    from safetensors.numpy import load, save

    return save(decode_update(update, load(bytes(weights)), encoding))


def load_weights(data: bytes) -> dict[str, torch.Tensor]:
    """Audit safetensors bytes and load them as tensors (no pickle involved).

    Raises:
        PlanError: code ``"bad_plan"``.
    """
    from safetensors.torch import load

    audit_weights(data)
    return load(bytes(data))


def apply_weights(model: torch.nn.Module, data: bytes) -> None:
    """Load trained weights (as returned by a job) into the scientist's original module.

    Raises:
        PlanError: ``"bad_plan"`` if the names or shapes do not match ``model.state_dict()``.
    """
    tensors = load_weights(data)
    own = model.state_dict()
    if set(tensors) != set(own):
        raise _bad_plan("weights do not match the model's state dict")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise _bad_plan(f"weight {name} has the wrong shape")
    model.load_state_dict(tensors, strict=True)


# -- worker side (torch) ----------------------------------------------------------------------------------------------

_ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def load_program(program: bytes, weights: bytes, *, max_program: int = 64 << 20,
                 max_weights: int = 1 << 30) -> torch.nn.Module:
    """Audit and load a plan's program and weights into a trainable module (``ep.module()``).

    Never calls ``torch.export.load``, ``torch.load`` or pickle: the sanitized JSON goes to the deserializer's
    dataclass layer and the state dict is passed as a dict of tensors loaded by safetensors.

    Raises:
        PlanError: code ``"bad_plan"``.
    """
    import torch
    from safetensors.torch import load
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    clean = audit_program(program, max_bytes=max_program)
    header = audit_weights(weights, max_bytes=max_weights)
    doc = json.loads(clean)
    wanted: dict[str, bool] = {}  # FQN -> is parameter
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        kind, value = next(iter(spec.items()))
        if kind == "parameter":
            wanted[value["parameter_name"]] = True
        elif kind == "buffer":
            wanted[value["buffer_name"]] = False
    if set(header) != set(wanted):
        raise _bad_plan("weights do not match the program's parameters and buffers")
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, doc)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any failure to fit the schema is a bad plan
        raise _bad_plan("program does not fit the export schema") from None
    tensors = load(bytes(weights))
    state: dict[str, torch.Tensor] = {
        name: torch.nn.Parameter(t, requires_grad=t.is_floating_point()) if wanted[name] else t
        for name, t in tensors.items()
    }
    try:
        ep = ExportedProgramDeserializer().deserialize(serialized, state, {}, None)
    except MemoryError:
        raise  # the job's memory limit, not a bad plan
    except Exception:  # noqa: BLE001
        raise _bad_plan("program could not be deserialized") from None
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for name, spec_target in ep.graph_signature.inputs_to_parameters.items():
        _check_placeholder(placeholders.get(name), state[spec_target])
    for name, spec_target in ep.graph_signature.inputs_to_buffers.items():
        _check_placeholder(placeholders.get(name), state[spec_target])
    try:
        return ep.module()
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001
        raise _bad_plan("program could not be turned into a module") from None


def reload_weights(module: torch.nn.Module, weights: bytes, *, max_weights: int = 1 << 30) -> None:
    """Put new weights into a module :func:`load_program` returned, in place (a later round of the same program).

    Every parameter and buffer is overwritten, so nothing of the module's last job survives but its graph; gradients
    are dropped. The weights must name exactly the module's tensors, with the same shapes and dtypes, as
    :func:`load_program` requires of the first weights.

    Raises:
        PlanError: code ``"bad_plan"``; the module is unchanged then.
    """
    import torch
    from safetensors.torch import load

    header = audit_weights(weights, max_bytes=max_weights)
    current = dict(module.named_parameters())
    current.update(module.named_buffers())
    if set(header) != set(current):
        raise _bad_plan("weights do not match the program's parameters and buffers")
    tensors = load(bytes(weights))
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(current[name].shape) or t.dtype != current[name].dtype:
            raise _bad_plan("weights do not match the program's tensor shapes")
    with torch.no_grad():
        for name, t in tensors.items():
            current[name].copy_(t)
    for p in module.parameters():
        p.grad = None


def _check_placeholder(node: Any, tensor: torch.Tensor) -> None:
    val = None if node is None else node.meta.get("val")
    if val is None or tuple(val.shape) != tuple(tensor.shape) or val.dtype != tensor.dtype:
        raise _bad_plan("weights do not match the program's tensor shapes")


def program_input_shape(module: torch.nn.Module) -> tuple[int | None, ...]:
    """The per-sample input shape a loaded program expects; ``None`` marks a dynamic dimension."""
    import torch

    user = [n for n in module.graph.nodes if n.op == "placeholder"]
    val = user[-1].meta.get("val") if user else None
    if val is None:
        raise _bad_plan("program has no tensor input")
    return tuple(d if isinstance(d, int) else None for d in val.shape[1:]) if isinstance(val, torch.Tensor) else ()


def to_eval_module(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of an exported training module with dropout off and batch norm on running statistics.

    ``ep.module().eval()`` is refused by torch: the training flags are baked into the graph as arguments, so we
    rewrite them on a copy (the original keeps training behaviour). Running statistics are left untouched.
    """
    import copy
    import warnings

    import torch

    aten = torch.ops.aten
    with warnings.catch_warnings():  # torch's own pytree deprecation noise on deepcopy of the in/out specs
        warnings.simplefilter("ignore", FutureWarning)
        clone = copy.deepcopy(module)
    for node in clone.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (aten.dropout.default, aten.native_dropout.default):
            _set_arg(node, 2, "train", False)
        elif node.target is aten.batch_norm.default:
            _set_arg(node, 5, "training", False)
        elif node.target is aten._native_batch_norm_legit_functional.default:
            _set_arg(node, 5, "training", False)
    clone.recompile()
    return clone


def _set_arg(node: Any, index: int, name: str, value: Any) -> None:
    if name in node.kwargs:
        node.update_kwarg(name, value)
    elif len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)
