"""The Worker: one fresh interpreter per job, run as ``python -m hivecell.node.worker``.

Theory of operation
-------------------
The pool (``workerpool.py``) starts this module with pipes on stdin/stdout. Frames in both directions are a 4-byte
big-endian length followed by one canonical msgpack map whose ``"t"`` field names the message::

    worker -> pool  {"t": "ready", "pid": int, "startup_s": float, "isolation": {"network": str}}
    pool -> worker  {"t": "job", "job_id": str, "store_path": str, "data_key": str, "program": bytes,
                     "weights": bytes, "recipe": map, "limits": {"memory_mb": int, "cpu_s": int|None,
                     "threads": int|None}}
    worker -> pool  {"t": "accepted", "job_id": str}      (at once, before the job touches anything)
    worker -> pool  {"t": "progress", "epoch": int, "epochs": int, "loss": float, "seconds": float}   (per epoch)
    worker -> pool  {"t": "result", "weights": bytes, "metrics": map, "timings": {"load_s", "train_s", "eval_s"}}
    worker -> pool  {"t": "error", "code": "bad_plan"|"bad_data"|"memory"|"error", "message": str}

After ``result`` the worker exits 0; after ``error`` it exits 1. A worker that reads EOF instead of a job (the pool is
closing, a warm spare is no longer wanted) exits 0 without a word.

Isolation, in order:

1. at start, before torch is imported (the process is still single-threaded, as ``unshare(CLONE_NEWUSER)``
   requires): best-effort network drop with ``unshare(CLONE_NEWNET)`` (root) or ``CLONE_NEWUSER|CLONE_NEWNET``
   (unprivileged user namespaces); core dumps off (they would hold private rows);
2. on the job, before any job data is touched: ``RLIMIT_DATA`` (see :func:`_apply_limits` for why not
   ``RLIMIT_AS``), ``RLIMIT_CPU``, ``torch.set_num_threads``;
3. once the dataset is copied out of LMDB: ``RLIMIT_FSIZE`` 0 (the job has no reason to write a file).

The real stdout descriptor is kept for frames only; fd 1 and ``sys.stdout`` point at stderr so a stray ``print`` in a
library cannot corrupt the stream. Nothing derived from the data other than the trained weights and aggregate metrics
is ever written to the frame stream; error messages are fixed strings.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import resource
import struct
import sys
import time
import traceback
from typing import Any, NoReturn

from hivecell.crypto.canonical import CanonicalError, canonical_packb, strict_unpackb

__all__ = ["main", "JOB_FRAME_CAP", "ERROR_CODES"]

JOB_FRAME_CAP = (64 << 20) + (1 << 30) + (1 << 20)  # program cap + weights cap + room for the rest
ERROR_CODES = ("bad_plan", "bad_data", "memory", "error")
_HEADER = struct.Struct(">I")
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


class JobError(Exception):
    """A failure to report to the pool with a code and a fixed, data-free message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# -- framing (blocking: this process does one thing at a time) --------------------------------------------------------


class _Channel:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd, self._write_fd = read_fd, write_fd

    def _read_exactly(self, n: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = os.read(self._read_fd, min(n - len(chunks), 1 << 20))
            if not chunk:
                return None
            chunks += chunk
        return bytes(chunks)

    def read(self, *, cap: int) -> dict[str, Any] | None:
        """Read one frame; ``None`` on a clean EOF before a frame starts."""
        header = self._read_exactly(_HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        if size > cap:
            raise JobError("error", "frame too large")
        body = self._read_exactly(size)
        if body is None:
            raise JobError("error", "truncated frame")
        try:
            value = strict_unpackb(body, max_len=cap)
        except CanonicalError:
            raise JobError("error", "malformed frame") from None
        if not isinstance(value, dict):
            raise JobError("error", "malformed frame")
        return value

    def send(self, message: dict[str, Any]) -> None:
        body = canonical_packb(message)
        data = memoryview(_HEADER.pack(len(body)) + body)
        while data:
            written = os.write(self._write_fd, data)
            data = data[written:]


# -- isolation --------------------------------------------------------------------------------------------------------


def _drop_network() -> str:
    """Best effort: move into an empty network namespace. Returns what we got, for the ready message."""
    if not sys.platform.startswith("linux"):
        return "none"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return "none"
    for flags, name in ((_CLONE_NEWNET, "netns"), (_CLONE_NEWUSER | _CLONE_NEWNET, "userns+netns")):
        if libc.unshare(ctypes.c_int(flags)) == 0:
            return name
    return "none"


def _set_limit(which: int, soft: int, *, slack: int = 0) -> None:
    """Lower a limit; the hard limit sits ``slack`` above the soft one (RLIMIT_CPU: SIGXCPU first, SIGKILL later)."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
        new_hard = min(hard, soft + slack)
    else:
        new_hard = soft + slack
    resource.setrlimit(which, (soft, new_hard))


def _apply_limits(limits: dict[str, Any]) -> dict[str, Any]:
    """Limit this process before it touches job data.

    Memory is capped with ``RLIMIT_DATA``, which on Linux >= 4.7 counts the heap and every private writable mapping
    (that is where torch's allocator puts tensors), and not ``RLIMIT_AS``: the address-space limit also counts the
    read-only file mapping of the LMDB store (its map size is recorded as 1 TiB in the environment, so the reader
    maps that much address space), thread-stack reservations and CUDA's huge virtual reservations, so it refuses
    healthy jobs. An allocation over the limit makes torch raise ``RuntimeError`` ("can't allocate memory") and
    Python ``MemoryError``; both are reported as code ``memory``. The pool also polls RSS as a second line.
    """
    import torch

    memory_mb = limits.get("memory_mb")
    cpu_s = limits.get("cpu_s")
    threads = limits.get("threads")
    applied: dict[str, Any] = {}
    if memory_mb is not None:
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
            raise JobError("error", "bad memory limit")
        _set_limit(resource.RLIMIT_DATA, memory_mb << 20)
        applied["memory_mb"] = memory_mb
    if cpu_s is not None:
        if isinstance(cpu_s, bool) or not isinstance(cpu_s, int) or cpu_s < 1:
            raise JobError("error", "bad cpu limit")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = math.ceil(usage.ru_utime + usage.ru_stime)  # the import of torch already spent some
        _set_limit(resource.RLIMIT_CPU, used + cpu_s, slack=5)
        applied["cpu_s"] = cpu_s
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
            raise JobError("error", "bad thread limit")
        torch.set_num_threads(threads)
        applied["threads"] = threads
    return applied


# -- the job ----------------------------------------------------------------------------------------------------------


def _load_dataset(store_path: str, data_key: str, task: str) -> tuple[Any, Any]:
    """Copy the dataset's tensors out of the store (read-only) and check their dtypes and shapes."""
    import torch
    from safetensors.torch import load

    from hivecell.node.store import open_blob_reader

    try:
        with open_blob_reader(store_path) as get:
            view = get(data_key)
            if view is None:
                raise JobError("bad_data", "no such dataset")
            try:
                tensors = load(bytes(view))
            except Exception:  # noqa: BLE001 - safetensors raises its own error types
                raise JobError("bad_data", "dataset is not safetensors") from None
    except JobError:
        raise
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - lmdb.Error and OSError: the store is missing or unreadable
        raise JobError("bad_data", "dataset store cannot be read") from None
    features, labels = tensors.get("features"), tensors.get("labels")
    if features is None or labels is None:
        raise JobError("bad_data", "dataset lacks features or labels")
    if features.dtype != torch.float32 or features.dim() < 2:
        raise JobError("bad_data", "features must be float32 [N, ...]")
    if features.shape[0] != labels.shape[0] or features.shape[0] < 2:
        raise JobError("bad_data", "features and labels disagree on the sample count")
    if task == "classification":
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise JobError("bad_data", "classification labels must be int64 [N]")
        if int(labels.min()) < 0:
            raise JobError("bad_data", "classification labels must be non-negative")
    elif labels.dtype != torch.float32:
        raise JobError("bad_data", "regression labels must be float32")
    return features, labels


def _split(n: int, eval_fraction: float, seed: int) -> tuple[Any, Any]:
    import torch

    from hivecell.node.privacy import train_samples

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_eval = n - train_samples(n, eval_fraction)  # the daemon prices DP jobs with the same count
    return order[n_eval:], order[:n_eval]


def _make_loss(recipe: Any, n_classes: int | None) -> Any:
    import torch.nn.functional as F

    def loss_fn(output: Any, target: Any) -> Any:
        if recipe.task == "classification":
            if recipe.loss == "cross_entropy":
                return F.cross_entropy(output, target)
            target = F.one_hot(target, n_classes).to(output.dtype)
        elif output.dim() == target.dim() + 1 and output.shape[-1] == 1:
            output = output.squeeze(-1)
        if output.shape != target.shape:
            raise JobError("bad_data", "model output does not match the labels' shape")
        return F.mse_loss(output, target) if recipe.loss == "mse" else F.l1_loss(output, target)

    return loss_fn


def _make_optimizer(recipe: Any, params: Any) -> Any:
    import torch

    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _run_sgd(channel: _Channel, recipe: Any, module: Any, loss_fn: Any, optimizer: Any, x_train: Any,
             y_train: Any) -> None:
    """Non-private training: shuffled mini-batches (seeded by the recipe), one progress frame per epoch."""
    import torch

    shuffle = torch.Generator().manual_seed(recipe.seed + 1)
    n_train = x_train.shape[0]
    for epoch in range(1, recipe.epochs + 1):
        epoch_start = time.monotonic()
        order = torch.randperm(n_train, generator=shuffle)
        total, seen = 0.0, 0
        for start in range(0, n_train, recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(x_train[batch]), y_train[batch])
            if not torch.isfinite(loss):
                raise JobError("error", "training diverged (non-finite loss)")
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.shape[0]
            seen += batch.shape[0]
        channel.send({"t": "progress", "epoch": epoch, "epochs": recipe.epochs, "loss": total / seen,
                      "seconds": time.monotonic() - epoch_start})


# -- DP-SGD -----------------------------------------------------------------------------------------------------------

_DP_CHUNK = 256  # per-sample gradients are computed this many examples at a time (memory: chunk x model size)


def _secret_generator() -> Any:
    """A torch generator seeded from the operating system, for everything the privacy guarantee rests on.

    The recipe's seed is chosen by the scientist, who is the adversary DP protects against: noise drawn from it could
    be subtracted, and a batch drawn from it would tell which rows each step used (subsampling amplification needs the
    sample to be secret). So DP sampling and noise come from 64 bits of ``os.urandom``; the recipe seed still fixes the
    train/eval split, initial dropout masks and everything else. (torch's generator is a Mersenne Twister, not a
    CSPRNG, and its Gaussian sampler has the floating-point caveats of Mironov 2012; both are common to Opacus too.)
    """
    import torch

    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def _per_sample_grad_fn(module: Any, loss_fn: Any) -> Any:
    """``f(params, x, y) -> (grads, losses)``: per-example gradients of ``loss_fn`` with ``torch.func`` (vmap of grad
    of a ``functional_call`` on one example at a time). Buffers are passed as they are; ``_run_dp`` refuses programs
    that have any, since batch statistics would mix examples."""
    from torch.func import functional_call, grad, vmap

    buffers = dict(module.named_buffers())

    def one(params: dict[str, Any], x: Any, y: Any) -> tuple[Any, Any]:
        loss = loss_fn(functional_call(module, (params, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))
        return loss, loss.detach()

    return vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")


def clipped_grad_sum(module: Any, loss_fn: Any, x: Any, y: Any, max_grad_norm: float) -> tuple[dict[str, Any], Any]:
    """Sum over the examples of ``(x, y)`` of each example's gradient clipped to L2 norm ``max_grad_norm``.

    The norm is taken over all trainable parameters together (one flat vector per example), and each gradient is
    scaled by ``min(1, C / (norm + 1e-6))`` as in Abadi et al. 2016 and Opacus. Returns ``({name: summed grad},
    per-example losses)``; an empty batch gives zeros.
    """
    import torch

    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    losses = []
    fn = _per_sample_grad_fn(module, loss_fn)
    for start in range(0, x.shape[0], _DP_CHUNK):
        grads, loss = fn(params, x[start : start + _DP_CHUNK], y[start : start + _DP_CHUNK])
        norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads.values()))
        scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, g in grads.items():
            total[name] += torch.einsum("b,b...->...", scale, g)
        losses.append(loss)
    return total, torch.cat(losses) if losses else torch.zeros(0)


def _run_dp(channel: _Channel, recipe: Any, module: Any, loss_fn: Any, optimizer: Any, x_train: Any,
            y_train: Any) -> dict[str, Any]:
    """DP-SGD exactly as ``privacy.py`` accounts for it; returns the metrics it adds (``epsilon``, ``delta``).

    Each of ``steps`` steps: draw every training example with probability ``q`` (Poisson, secret generator), sum the
    clipped per-example gradients, add ``N(0, (sigma * C)^2)`` per coordinate, divide by the expected batch size
    ``q * n_train``, step the optimizer. An epoch is ``ceil(n_train / batch_size)`` steps, as without DP.
    """
    import torch

    from hivecell.node.plan import PlanError
    from hivecell.node.privacy import dp_plan

    if any(True for _ in module.buffers()):
        raise JobError("bad_plan", "dp needs a model without buffers (batch norm mixes examples; use group norm)")
    n_train = int(x_train.shape[0])
    try:
        plan = dp_plan(recipe.to_dict(), n_train)
    except PlanError as exc:
        raise JobError("bad_plan", exc.message) from None
    secret = _secret_generator()
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    std = plan.noise_multiplier * plan.clip_norm
    steps_per_epoch = math.ceil(n_train / recipe.batch_size)
    assert steps_per_epoch * recipe.epochs == plan.steps  # the accountant priced exactly these steps
    for epoch in range(1, recipe.epochs + 1):
        epoch_start = time.monotonic()
        total, seen = 0.0, 0
        for _ in range(steps_per_epoch):
            batch = (torch.rand(n_train, generator=secret) < plan.sample_rate).nonzero().squeeze(1)
            summed, losses = clipped_grad_sum(module, loss_fn, x_train[batch], y_train[batch], plan.clip_norm)
            if losses.numel() and not torch.isfinite(losses).all():
                raise JobError("error", "training diverged (non-finite loss)")
            for name, p in params.items():
                noise = torch.normal(0.0, std, size=p.shape, generator=secret, dtype=p.dtype)
                p.grad = (summed[name] + noise) / plan.expected_batch_size
            optimizer.step()
            total += float(losses.sum())
            seen += int(losses.numel())
        channel.send({"t": "progress", "epoch": epoch, "epochs": recipe.epochs, "loss": total / max(seen, 1),
                      "seconds": time.monotonic() - epoch_start})
    return {"epsilon": plan.epsilon, "delta": plan.delta}


def _run_job(channel: _Channel, job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from safetensors.torch import save

    from hivecell.node.plan import PlanError, load_program, program_input_shape, to_eval_module, validate_recipe

    limits = job.get("limits")
    if not isinstance(limits, dict):
        raise JobError("error", "malformed job")
    _apply_limits(limits)
    for key in ("store_path", "data_key"):
        if not isinstance(job.get(key), str):
            raise JobError("error", "malformed job")
    if not isinstance(job.get("program"), bytes) or not isinstance(job.get("weights"), bytes):
        raise JobError("bad_plan", "program and weights must be bytes")
    try:
        recipe = validate_recipe(job.get("recipe"))
    except PlanError as exc:
        raise JobError("bad_plan", exc.message) from None

    t0 = time.monotonic()
    features, labels = _load_dataset(job["store_path"], job["data_key"], recipe.task)
    _set_limit(resource.RLIMIT_FSIZE, 0)  # from here on the job has no file to write
    try:
        module = load_program(job["program"], job["weights"])
        expected = program_input_shape(module)
    except PlanError as exc:
        raise JobError("bad_plan", exc.message) from None
    sample_shape = tuple(features.shape[1:])
    if len(expected) != len(sample_shape) or any(e is not None and e != s for e, s in zip(expected, sample_shape)):
        raise JobError("bad_data", "the model's input shape does not match the dataset's sample shape")
    received = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    train_idx, eval_idx = _split(features.shape[0], recipe.eval_fraction, recipe.seed)
    torch.manual_seed(recipe.seed)  # dropout masks
    n_classes = None
    if recipe.task == "classification":
        with torch.no_grad():  # on an eval copy: a probe must not move batch-norm statistics
            probe = to_eval_module(module)(features[:1])
        if probe.dim() != 2:
            raise JobError("bad_data", "a classification model must return [batch, classes]")
        n_classes = int(probe.shape[1])
        if int(labels.max()) >= n_classes:
            raise JobError("bad_data", "labels exceed the model's number of classes")
    loss_fn = _make_loss(recipe, n_classes)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = _make_optimizer(recipe, params)
    load_s = time.monotonic() - t0

    t1 = time.monotonic()
    x_train, y_train = features[train_idx], labels[train_idx]
    n_train = x_train.shape[0]
    if recipe.dp is None:
        _run_sgd(channel, recipe, module, loss_fn, optimizer, x_train, y_train)
        dp_metrics: dict[str, Any] = {}
    else:
        dp_metrics = _run_dp(channel, recipe, module, loss_fn, optimizer, x_train, y_train)
    train_s = time.monotonic() - t1

    t2 = time.monotonic()
    evaluated_on = "eval" if eval_idx.numel() else "train"
    idx = eval_idx if eval_idx.numel() else train_idx
    evaluator = to_eval_module(module)
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, idx.numel(), recipe.batch_size):
            batch = idx[start : start + recipe.batch_size]
            output = evaluator(features[batch])
            total_loss += float(loss_fn(output, labels[batch])) * batch.shape[0]
            if recipe.task == "classification":
                correct += int((output.argmax(dim=1) == labels[batch]).sum())
    metrics: dict[str, Any] = {"train_samples": int(n_train), "eval_samples": int(eval_idx.numel()),
                               "epochs": recipe.epochs, "evaluated_on": evaluated_on}
    if "accuracy" in recipe.metrics:
        metrics["accuracy"] = correct / idx.numel()
    if "loss" in recipe.metrics:
        metrics["loss"] = total_loss / idx.numel()
    metrics.update(dp_metrics)
    eval_s = time.monotonic() - t2

    state = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    if {name: tuple(t.shape) for name, t in state.items()} != received:  # pragma: no cover - a torch regression
        raise JobError("error", "trained weights lost their names")
    return {"t": "result", "weights": save(state), "metrics": metrics,
            "timings": {"load_s": load_s, "train_s": train_s, "eval_s": eval_s}}


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return "can't allocate memory" in text or "out of memory" in text.lower() or "not enough memory" in text


def main() -> NoReturn:
    started = time.time()
    frame_fd = os.dup(1)  # frames only; fd 1 and sys.stdout now go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = _Channel(0, frame_fd)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core file would hold private rows
    network = _drop_network()  # before torch starts threads: user namespaces need a single-threaded process

    # The slow part, done before a job arrives so a warm spare starts at once. Deserializing and running a program
    # lazily imports much of torch.export (which probes the temp dir by writing a file): do it all now, while we may
    # still write files, since a job runs under RLIMIT_FSIZE 0.
    import tempfile

    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torch._export.serde.serialize  # noqa: F401
    import torch.export._trace  # noqa: F401
    import torch.func  # noqa: F401

    import hivecell.node.plan  # noqa: F401
    import hivecell.node.privacy  # noqa: F401 - dp_accounting, for DP jobs
    import hivecell.node.store  # noqa: F401

    tempfile.gettempdir()

    try:
        import psutil

        startup_s = time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil is a nicety here
        startup_s = time.time() - started
    channel.send({"t": "ready", "pid": os.getpid(), "startup_s": startup_s, "isolation": {"network": network}})

    try:
        job = channel.read(cap=JOB_FRAME_CAP)
        if job is None:
            os._exit(0)  # the pool no longer wants this spare
        if job.get("t") != "job":
            raise JobError("error", "expected a job")
        channel.send({"t": "accepted", "job_id": job.get("job_id") if isinstance(job.get("job_id"), str) else ""})
        reply = _run_job(channel, job)
    except JobError as exc:
        _fail(channel, exc.code, exc.message)
    except BaseException as exc:  # noqa: BLE001 - the worker reports every failure as a code, never as text
        if _is_out_of_memory(exc):
            _fail(channel, "memory", "the job ran out of memory")
        traceback.print_exc(file=sys.stderr)  # local log only
        _fail(channel, "error", f"the job failed ({type(exc).__name__})")
    try:
        channel.send(reply)
    except MemoryError:
        _fail(channel, "memory", "the job ran out of memory")
    sys.stderr.flush()
    os._exit(0)


def _fail(channel: _Channel, code: str, message: str) -> NoReturn:
    try:
        channel.send({"t": "error", "code": code if code in ERROR_CODES else "error", "message": message})
    finally:
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
