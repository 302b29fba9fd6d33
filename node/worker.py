"""The Worker: a fresh process per job (or per federation), run as ``python -m hivecell.node.worker``, or forked
from a zygote (``--zygote``, below) that has imported torch once.

Theory of operation
-------------------
The pool (``workerpool.py``) starts this module (or has the zygote fork it) with pipes on stdin/stdout. Frames in both directions are a 4-byte
big-endian length followed by one canonical msgpack map whose ``"t"`` field names the message::

    worker -> pool  {"t": "ready", "pid": int, "startup_s": float, "isolation": {"network": str},
                     "device": {"type": "cpu"|"cuda", "name": str, "memory_mb": int, "context_mb": int,
                                "problem": str}}
                    (name, memory_mb and context_mb, the CUDA context's host RSS, for cuda only; problem only
                    when ``--gpu on`` found no CUDA)
    pool -> worker  {"t": "job", "job_id": str, "store_path": str, "data_key": str, "program": bytes,
                     "weights": bytes, "recipe": map, "limits": {"memory_mb": int, "cpu_s": int|None,
                     "threads": int|None}}
    worker -> pool  {"t": "accepted", "job_id": str}      (at once, before the job touches anything)
    worker -> pool  {"t": "progress", "epoch": int, "epochs": int, "loss": float, "seconds": float}   (per epoch)
    worker -> pool  {"t": "result", "weights": bytes, "metrics": map, "timings": {"load_s", "train_s", "eval_s"},
                     "device": "cpu"|"cuda"}
                    (an evaluate job trains nothing: empty weights, no progress frames, no train_s)
    worker -> pool  {"t": "error", "code": "bad_plan"|"bad_data"|"memory"|"error", "message": str}

After ``result`` the worker waits for the next frame: another ``job`` runs the same way (``accepted``, progress,
``result`` or ``error``), EOF makes it exit 0 without a word. That is how every worker ends: a warm spare the pool
no longer wants, a one-job worker (the pool closes its stdin right after the job frame, so it exits 0 after its
result) and a worker the pool kept for a federation's next round (its stdin stays open; the pool sends only jobs of
the same scientist, dataset and program, see ``workerpool.py``, and kills it when it idles). After ``error`` the
worker exits 1 at once: a process whose job failed never runs another.

Zygote: with ``--zygote`` the process does step 1 below and the imports, then forks a worker per request of the pool
(:func:`_zygote`); each child takes its pipes, a session and a name (``hivecell-worker``; the zygote is
``hivecell-zygote``) and goes on exactly as a spawned worker does after its imports: device, ``ready``, jobs. The
zygote runs no torch operation (torch's thread pools and CUDA must start after the fork, in the child) and never sees a
job, so no job's data or state can reach another worker through it.

Isolation, in order:

1. at start, before torch is imported (in the zygote, inherited by its children) (the process is still single-threaded, as ``unshare(CLONE_NEWUSER)``
   requires): best-effort network drop with ``unshare(CLONE_NEWNET)`` (root) or ``CLONE_NEWUSER|CLONE_NEWNET``
   (unprivileged user namespaces); core dumps off (they would hold private rows);
2. on the job, before any job data is touched: ``RLIMIT_DATA`` (see :func:`_apply_limits` for why not
   ``RLIMIT_AS``), ``RLIMIT_CPU``, ``torch.set_num_threads``;
3. once the dataset is copied out of LMDB: ``RLIMIT_FSIZE`` 0 (the job has no reason to write a file).

A later job in the same process applies its limits again; they can only stay or go down (``_set_limit`` never raises
one, and ``RLIMIT_FSIZE`` is 0 from the first job on). Between jobs the worker keeps only what the next round of the
same federation would load again (:class:`_Kept`: the program, the dataset's rows, never handed to a program
themselves but as copies), drops the rest of the finished job's objects and returns freed heap to the kernel
(:func:`_release_memory`).

Device
------
``--gpu auto|on|off`` (the pool passes the node's ``gpu`` setting) picks where jobs train. ``auto`` uses the first
CUDA device when torch sees one, ``off`` never does, ``on`` requires one: without it every job fails with a message
that says so (the worker still starts, so the pool does not spin restarting it). The CUDA context is created at start,
like the imports: it costs seconds, and its mappings must exist before a job's ``RLIMIT_DATA`` (host memory) is set.
A job's ``memory_mb`` also caps the CUDA caching allocator (``set_per_process_memory_fraction``; on a Jetson the GPU
allocates from the same RAM); the host memory CUDA's libraries and context hold before the job are not counted
against it. The dataset's rows are copied to the device once and kept there between a federation's rounds. On CUDA
the worker asks torch for deterministic kernels (where it has them), so a seeded job computes the same weights on
every run, as it does on the CPU. A program that cannot run on the device (a graph that pins a tensor to the CPU)
falls back to the CPU for its jobs; the result frame says where each job ran, and the weights always come back as CPU
tensors.

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

__all__ = ["main", "ERROR_CODES", "GPU_CHOICES", "JOB_FRAME_CAP", "ZYGOTE_MESSAGE"]

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

    def _read_exactly(self, n: int) -> bytearray | None:
        """``n`` bytes read straight into one buffer (a job frame carries the model's weights: no copies of them)."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = os.readv(self._read_fd, [view[got:got + (1 << 20)]])
            if not k:
                return None
            got += k
        view.release()
        return buf

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
        for part in (_HEADER.pack(len(body)), body):  # not joined: a result frame carries the trained weights
            data = memoryview(part)
            while data:
                written = os.write(self._write_fd, data)
                data = data[written:]


# -- device -----------------------------------------------------------------------------------------------------------

GPU_CHOICES = ("auto", "on", "off")


class _Device:
    """Where this worker's jobs run; set once at start by :func:`_pick_device`."""

    def __init__(self) -> None:
        self.torch_device: Any = None  # torch.device("cpu") or torch.device("cuda", 0)
        self.report: dict[str, Any] = {"type": "cpu"}  # for the ready frame
        self.problem: str | None = None  # --gpu on without CUDA: every job fails with this


_device = _Device()


def _parse_gpu(argv: list[str]) -> str:
    """The ``--gpu`` choice from the worker's command line (default ``auto``)."""
    gpu = "auto"
    for i, arg in enumerate(argv):
        if arg.startswith("--gpu="):
            gpu = arg.split("=", 1)[1]
        elif arg == "--gpu" and i + 1 < len(argv):
            gpu = argv[i + 1]
    if gpu not in GPU_CHOICES:
        sys.stderr.write(f"worker: --gpu must be one of {', '.join(GPU_CHOICES)}, got {gpu!r}\n")
        os._exit(2)
    return gpu


def _pick_device(gpu: str) -> None:
    """Choose the device (see the module docstring) and, for CUDA, create its context now."""
    import torch

    _device.torch_device, _device.report, _device.problem = torch.device("cpu"), {"type": "cpu"}, None
    if gpu == "off":
        return
    try:
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
            # A seeded job computes the same weights on every run, as on the CPU (a federation's reused worker and a
            # fresh one agree; a result can be re-checked): deterministic kernels where torch has them. cuBLAS reads
            # its workspace setting when it starts, at the first matrix product, so it is set before any.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            rss = _vm_bytes("VmRSS")
            # The context, and cuBLAS and cuDNN (which start lazily, at the first product and convolution): seconds
            # and host memory, spent here before any job's clock and limits rather than in a federation's first round.
            x = torch.ones(2, 1, 8, 8, device=device, requires_grad=True)
            kernel = torch.ones(4, 1, 3, 3, device=device, requires_grad=True)
            out = torch.nn.functional.conv2d(x, kernel, padding=1).flatten(1) @ torch.ones(256, 2, device=device)
            out.sum().backward()
            torch.cuda.synchronize(device)
            props = torch.cuda.get_device_properties(device)
            _device.torch_device = device
            # That host memory is the node's, not the job's: the pool's RSS watch adds context_mb to a job's
            # memory_mb, and _apply_limits sets RLIMIT_DATA above what the worker holds when the job starts.
            _device.report = {"type": "cuda", "name": str(props.name)[:100], "memory_mb": int(props.total_memory >> 20),
                              "context_mb": max(0, _vm_bytes("VmRSS") - rss) >> 20}
            return
        why = "torch sees no CUDA device"
    except Exception as exc:  # noqa: BLE001 - a broken driver or a CUDA-less torch build
        why = f"CUDA did not start ({type(exc).__name__})"
        traceback.print_exc(file=sys.stderr)
    if gpu == "on":
        _device.problem = f"this node requires a GPU (gpu = on) but {why}"
        _device.report = {"type": "cpu", "problem": _device.problem}


def _vm_bytes(field: str) -> int:
    """A ``Vm*`` line of ``/proc/self/status`` in bytes; 0 where there is none (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _on_cuda(device: Any) -> bool:
    return device is not None and device.type == "cuda"


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
        # On CUDA the limit is what the job may add: the libraries and the context already hold private mappings
        # (hundreds of MB to GBs, by driver) that a CPU worker does not have.
        base = _vm_bytes("VmData") if _on_cuda(_device.torch_device) else 0
        _set_limit(resource.RLIMIT_DATA, base + (memory_mb << 20))
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
    if memory_mb is not None and _on_cuda(_device.torch_device):  # the caching allocator's share of the device
        total_mb = _device.report.get("memory_mb") or memory_mb
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_mb / total_mb), _device.torch_device)
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
    # FedProx (Li et al. 2020): mu/2 * ||w - w_start||^2 keeps a round's local training near the global weights.
    mu = recipe.prox_mu
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if mu else []
    for epoch in range(1, recipe.epochs + 1):
        epoch_start = time.monotonic()
        order = torch.randperm(n_train, generator=shuffle).to(x_train.device)
        total, seen = 0.0, 0
        for start in range(0, n_train, recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(x_train[batch]), y_train[batch])
            if not torch.isfinite(loss):
                raise JobError("error", "training diverged (non-finite loss)")
            if mu:
                (loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))).backward()
            else:
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


def _per_sample_grad_fn(module: Any, loss_fn: Any, sample_shape: tuple[int, ...]) -> Any:
    """``f(params, x, y) -> (grads, losses)``: each example's gradient of ``loss_fn`` on that example alone.

    ``grads`` maps parameter names to ``[batch, *shape]`` per-example gradients (a trainable parameter the program
    never reaches may be missing: its gradient is zero), ``losses`` is ``[batch]``. Build it once per job: the
    row-wise path (:class:`_RowwisePerSample`: one batched forward and backward, per-example weight gradients in the
    backward) is used when the program provably computes row ``i`` of its output from input row ``i`` alone, for
    ``sample_shape`` inputs; otherwise the general path, ``torch.func`` (vmap of grad of a ``functional_call`` on one
    example at a time). Both give the same gradients up to float rounding.
    """
    try:
        return _RowwisePerSample(module, loss_fn, sample_shape)
    except _NotRowwise:
        pass
    return _vmap_per_sample_grad_fn(module, loss_fn)


def _vmap_per_sample_grad_fn(module: Any, loss_fn: Any) -> Any:
    """The general path of :func:`_per_sample_grad_fn`: vmap of grad, correct for any program. Buffers are passed as
    they are; ``_run_dp`` refuses programs that have any, since batch statistics would mix examples."""
    from torch.func import functional_call, grad, vmap

    buffers = dict(module.named_buffers())

    def one(params: dict[str, Any], x: Any, y: Any) -> tuple[Any, Any]:
        loss = loss_fn(functional_call(module, (params, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))
        return loss, loss.detach()

    return vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")


class _NotRowwise(Exception):
    """The program is not one the row-wise path can prove per-example; the vmap path takes it."""


# The row-wise path's vocabulary (aten ``name.overload``). A value is "row-wise" when it is a tensor whose dimension 0
# is the batch, whose row i depends on input row i only, and whose other dimensions do not depend on the batch size;
# every op below keeps that when its arguments have the stated form, and anything else sends the program to vmap.
_ROW_ELEMENTWISE = frozenset({  # argument 0 row-wise, every other argument a constant
    "relu.default", "gelu.default", "silu.default", "sigmoid.default", "tanh.default", "leaky_relu.default",
    "hardtanh.default", "elu.default", "softplus.default", "neg.default", "exp.default", "log.default",
    "sqrt.default", "rsqrt.default", "clone.default", "contiguous.default", "alias.default", "detach.default",
    "dropout.default", "pow.Tensor_Scalar", "add.Scalar", "sub.Scalar", "mul.Scalar", "div.Scalar",
})
_ROW_BINARY = frozenset({  # both operands row-wise of the same rank, or the second a number
    "add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "pow.Tensor_Tensor",
})
_ROW_DIMS = {  # these dimension arguments (a non-empty list where a list) must not name dimension 0
    "softmax.int": ("dim",), "log_softmax.int": ("dim",), "_softmax.default": ("dim",),
    "_log_softmax.default": ("dim",), "squeeze.dim": ("dim",), "squeeze.dims": ("dim",), "select.int": ("dim",),
    "slice.Tensor": ("dim",), "transpose.int": ("dim0", "dim1"), "flatten.using_ints": ("start_dim", "end_dim"),
    "mean.dim": ("dim",), "sum.dim_IntList": ("dim",), "amax.default": ("dim",),
}
_ROW_POOL_RANK = {  # pooling over trailing dimensions of [B, C, L] or [B, C, H, W] only
    "max_pool1d.default": 3, "avg_pool1d.default": 3, "adaptive_avg_pool1d.default": 3,
    "max_pool2d.default": 4, "avg_pool2d.default": 4, "adaptive_avg_pool2d.default": 4,
    "_adaptive_avg_pool2d.default": 4,
}
_ROW_RESHAPE = frozenset({"view.default", "reshape.default", "_unsafe_view.default"})  # size[0] is the batch size
_ROW_PARAM_OPS = frozenset({"linear.default", "conv2d.default", "convolution.default", "layer_norm.default"})


def _bind(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """An aten overload's arguments by name, defaults filled in from its schema."""
    positional = list(args)
    bound: dict[str, Any] = {}
    for arg in target._schema.arguments:
        if positional and not arg.kwarg_only:
            bound[arg.name] = positional.pop(0)
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise _NotRowwise
    if positional or set(kwargs) - set(bound):
        raise _NotRowwise
    return bound


def _dims(value: Any, rank: int) -> list[int]:
    """Dimension arguments normalized to ``[0, rank)``; an empty list (reduce everything) or a bad one is refused."""
    dims = [value] if isinstance(value, int) else value
    if not isinstance(dims, (list, tuple)) or not dims:
        raise _NotRowwise
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or not -rank <= d < rank:
            raise _NotRowwise
        out.append(d % rank)
    return out


def _pair(value: Any) -> list[int]:
    return list(value) * 2 if len(value) == 1 else list(value)


class _RowwisePerSample:
    """Per-example gradients from one batched forward and one backward of the exported program.

    Exact for programs where output row ``i`` depends on input row ``i`` alone, not on other rows, nor on the batch
    size. That is proved op by op from the graph (never from metadata or a batch size: the verdict must not depend on
    the Poisson draw) by the rules in ``_ROW_*``; ranks come from one probe run on two zero examples. Any doubt raises
    :class:`_NotRowwise`. The program is copied with each parameterized op (linear, 2-d convolution, layer norm)
    replaced by an autograd function that, in the backward, records ``[batch, *weight]`` per-example gradients (the
    closed forms Opacus uses) instead of their sum. Per-example losses come from ``vmap(loss_fn)`` on the output
    rows, so any loss is taken one example at a time.
    """

    def __init__(self, module: Any, loss_fn: Any, sample_shape: tuple[int, ...]) -> None:
        from torch.func import vmap

        try:
            self._build(module, tuple(sample_shape))
        except (_NotRowwise, MemoryError):
            raise
        except Exception:  # noqa: BLE001 - a probe that fails for any reason: the general path decides
            raise _NotRowwise from None

        def one(output: Any, target: Any) -> Any:
            return loss_fn(output.unsqueeze(0), target.unsqueeze(0))

        self._losses = vmap(one, randomness="different")

    def _build(self, module: Any, sample_shape: tuple[int, ...]) -> None:
        import operator

        import torch
        import torch.fx as fx

        params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        sym_targets = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                       operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                       operator.getitem, torch.sym_max, torch.sym_min, torch.sym_float, torch.sym_int, torch.sym_not}
        const_types = (bool, int, float, str, type(None), torch.dtype, torch.layout, torch.device, torch.memory_format)
        graph = fx.Graph()
        x_in, anchor, tape = graph.placeholder("x"), graph.placeholder("anchor"), graph.placeholder("tape")
        env: dict[Any, Any] = {}
        param_inputs: dict[str, Any] = {}
        kind: dict[Any, str] = {}  # "row" | "bsize" (the batch size) | "const" | "param"
        probe: dict[Any, Any] = {}  # values on two zero examples, for ranks
        self._names: list[str] = []

        def kind_of(a: Any) -> str:
            if isinstance(a, fx.Node):
                return kind[a]
            if isinstance(a, (list, tuple, dict)):
                return "const" if all(kind_of(v) == "const" for v in (a.values() if isinstance(a, dict) else a)) \
                    else "mixed"
            return "const" if isinstance(a, const_types) else "mixed"

        def value(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: probe[n])

        def rank(a: Any) -> int:
            return value(a).dim()

        def ints(a: Any) -> bool:  # plain integers, baked into a recorder
            return isinstance(a, (list, tuple)) and all(type(v) is int for v in a)

        def check(node: Any) -> str:
            target = node.target
            if target in sym_targets:  # arithmetic on sizes: never on the batch size
                if kind_of(node.args) != "const" or kind_of(node.kwargs) != "const":
                    raise _NotRowwise
                return "const"
            if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
                raise _NotRowwise
            op = f"{target._schema.name.split('::', 1)[1]}.{target._overloadname}"
            bound = _bind(target, node.args, node.kwargs)
            first_name = target._schema.arguments[0].name
            first = bound.pop(first_name)
            if first_name == "tensors":  # cat, stack
                if op not in ("cat.default", "stack.default") or not isinstance(first, (list, tuple)) or not first:
                    raise _NotRowwise
                if any(kind_of(t) != "row" for t in first) or len({rank(t) for t in first}) != 1:
                    raise _NotRowwise
                if kind_of(bound) != "const" or 0 in _dims(bound["dim"], rank(first[0]) + (op == "stack.default")):
                    raise _NotRowwise
                return "row"
            if kind_of(first) != "row":
                raise _NotRowwise
            r = rank(first)
            if op in _ROW_PARAM_OPS:
                return check_param_op(op, bound, r)
            if op == "sym_size.int":
                return "bsize" if _dims(bound["dim"], r) == [0] else "const"
            if op in _ROW_BINARY:
                key = "exponent" if op == "pow.Tensor_Tensor" else "other"
                other = bound.pop(key)
                if kind_of(other) == "row":
                    if rank(other) != r:
                        raise _NotRowwise
                elif kind_of(other) != "const" or not isinstance(value(other), (bool, int, float)):
                    raise _NotRowwise
            if op in _ROW_RESHAPE:
                size = bound.pop("size" if "size" in bound else "shape")
                if not isinstance(size, (list, tuple)) or not size or kind_of(size[0]) != "bsize":
                    raise _NotRowwise
                if kind_of(list(size[1:])) != "const":
                    raise _NotRowwise
            if kind_of(bound) != "const":
                raise _NotRowwise
            if op in _ROW_ELEMENTWISE or op in _ROW_BINARY or op in _ROW_RESHAPE:
                return "row"
            if op in _ROW_DIMS:
                if any(0 in _dims(bound[key], r) for key in _ROW_DIMS[op]):
                    raise _NotRowwise
                return "row"
            if op == "unsqueeze.default":
                if _dims(bound["dim"], r + 1) == [0]:
                    raise _NotRowwise
                return "row"
            if op == "permute.default":
                if _dims(bound["dims"], r)[0] != 0:
                    raise _NotRowwise
                return "row"
            if op in _ROW_POOL_RANK and r == _ROW_POOL_RANK[op]:
                return "row"
            raise _NotRowwise

        def check_param_op(op: str, bound: dict[str, Any], r: int) -> str:
            weight, bias = bound.pop("weight"), bound.pop("bias")
            if kind_of(bound) != "const":
                raise _NotRowwise
            if op == "layer_norm.default":
                normalized = bound["normalized_shape"]
                if not isinstance(normalized, (list, tuple)) or not 0 < len(normalized) < r or not ints(normalized):
                    raise _NotRowwise
                if weight is None and bias is None:
                    return "row"
                for p in (weight, bias):
                    if p is not None and (kind_of(p) != "param" or list(value(p).shape) != list(normalized)):
                        raise _NotRowwise
                return "param_op"
            if kind_of(weight) != "param" or not (bias is None or kind_of(bias) == "param"):
                raise _NotRowwise
            if bias is not None and value(bias).dim() != 1:
                raise _NotRowwise
            if op == "linear.default":
                if r < 2 or value(weight).dim() != 2:
                    raise _NotRowwise
                return "param_op"
            if r != 4 or value(weight).dim() != 4 or bound["groups"] != 1:
                raise _NotRowwise
            if op == "convolution.default" and (bound["transposed"] or len(bound["stride"]) != 2):
                raise _NotRowwise
            if any(not ints(bound[k]) or len(bound[k]) not in (1, 2) for k in ("stride", "padding", "dilation")):
                raise _NotRowwise
            return "param_op"

        placeholders = 0
        for node in module.graph.nodes:
            if node.op == "placeholder":
                placeholders += 1
                kind[node], env[node], probe[node] = "row", x_in, torch.zeros((2, *sample_shape))
            elif node.op == "get_attr":
                if node.target not in params:
                    raise _NotRowwise
                if node.target not in param_inputs:
                    self._names.append(node.target)
                    param_inputs[node.target] = graph.placeholder(f"param_{len(self._names)}")
                kind[node], env[node], probe[node] = "param", param_inputs[node.target], params[node.target].detach()
            elif node.op == "call_function":
                kind[node] = check(node)
                if kind[node] == "param_op":
                    kind[node] = "row"
                    env[node] = graph.call_function(*self._recorder(node, anchor, tape, env))
                else:
                    env[node] = graph.node_copy(node, lambda n: env[n])
                with torch.no_grad():
                    probe[node] = node.target(*value(node.args), **value(node.kwargs))
                if kind[node] == "row" and not (isinstance(probe[node], torch.Tensor) and probe[node].dim() >= 1
                                                and probe[node].shape[0] == 2):
                    raise _NotRowwise
            elif node.op == "output":
                (flat,) = node.args
                if not isinstance(flat, (list, tuple)) or len(flat) != 1 or kind_of(flat[0]) != "row":
                    raise _NotRowwise
                graph.output((env[flat[0]],))
            else:
                raise _NotRowwise
        if placeholders != 1 or not self._names:
            raise _NotRowwise
        self._gm = fx.GraphModule(torch.nn.Module(), graph)
        self._process_outputs = module.graph.process_outputs  # what the module's own forward returns

    def _recorder(self, node: Any, anchor: Any, tape: Any, env: dict[Any, Any]) -> tuple[Any, tuple[Any, ...]]:
        """``(target, args)`` of the node that replaces a parameterized op."""
        bound = _bind(node.target, node.args, node.kwargs)
        weight, bias = bound["weight"], bound["bias"]
        names = (None if weight is None else weight.target, None if bias is None else bias.target)
        inputs = (env[bound["input"]], None if weight is None else env[weight], None if bias is None else env[bias])
        functions = _rowwise_functions()
        if node.target._schema.name == "aten::linear":
            def linear(anchor: Any, tape: Any, x: Any, weight: Any, bias: Any) -> Any:
                return functions["linear"].apply(anchor, tape, names, x, weight, bias)

            return linear, (anchor, tape, *inputs)
        if node.target._schema.name == "aten::layer_norm":
            normalized, eps = list(bound["normalized_shape"]), float(bound["eps"])

            def layer_norm(anchor: Any, tape: Any, x: Any, weight: Any, bias: Any) -> Any:
                return functions["layer_norm"].apply(anchor, tape, names, x, weight, bias, normalized, eps)

            return layer_norm, (anchor, tape, *inputs)
        conv = tuple(_pair(bound[k]) for k in ("stride", "padding", "dilation"))

        def conv2d(anchor: Any, tape: Any, x: Any, weight: Any, bias: Any) -> Any:
            return functions["conv2d"].apply(anchor, tape, names, x, weight, bias, conv)

        return conv2d, (anchor, tape, *inputs)

    def __call__(self, params: dict[str, Any], x: Any, y: Any) -> tuple[dict[str, Any], Any]:
        import torch

        anchor = torch.zeros((), requires_grad=True)
        tape: dict[str, Any] = {}
        output = self._process_outputs(self._gm(x, anchor, tape, *(params[name] for name in self._names)))
        losses = self._losses(output, y)
        total = losses.sum()
        if total.requires_grad:
            torch.autograd.grad(total, anchor, allow_unused=True)  # fills the tape
        return tape, losses.detach()


_ROWWISE_FUNCTIONS: dict[str, Any] = {}


def _rowwise_functions() -> dict[str, Any]:
    """The autograd functions of :class:`_RowwisePerSample` (built on first use: this module imports torch late).

    Each takes ``(anchor, tape, names, x, weight, bias, ...)``: ``anchor`` is a scalar leaf that makes every one of
    them part of the backward (its gradient stays ``None``), ``tape`` a dict that receives ``{parameter name:
    [batch, *shape]}`` per-example gradients (added up where a parameter is used twice). The batched weight gradient
    is never computed.
    """
    if _ROWWISE_FUNCTIONS:
        return _ROWWISE_FUNCTIONS
    import torch
    import torch.nn.functional as F

    def record(tape: dict[str, Any], name: str | None, grad: Any) -> None:
        if name is not None:
            tape[name] = tape[name] + grad if name in tape else grad

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, anchor: Any, tape: Any, names: Any, x: Any, weight: Any, bias: Any) -> Any:
            ctx.save_for_backward(x, weight)
            ctx.tape, ctx.names = tape, names
            return torch.ops.aten.linear.default(x, weight, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x, weight = ctx.saved_tensors
            grad_x = grad.matmul(weight) if ctx.needs_input_grad[3] else None
            if x.dim() == 2:  # g_i = grad_i^T x_i
                record(ctx.tape, ctx.names[0], grad.unsqueeze(2) * x.unsqueeze(1))
                record(ctx.tape, ctx.names[1], grad)
            else:  # summed over the positions of each example
                g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
                record(ctx.tape, ctx.names[0], torch.bmm(g.transpose(1, 2), x.reshape(x.shape[0], -1, x.shape[-1])))
                record(ctx.tape, ctx.names[1], g.sum(1))
            return None, None, None, grad_x, None, None

    class Conv2d(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, anchor: Any, tape: Any, names: Any, x: Any, weight: Any, bias: Any, conv: Any) -> Any:
            ctx.save_for_backward(x, weight)
            ctx.tape, ctx.names, ctx.conv = tape, names, conv
            stride, padding, dilation = conv
            return torch.ops.aten.conv2d.default(x, weight, bias, stride, padding, dilation, 1)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x, weight = ctx.saved_tensors
            stride, padding, dilation = ctx.conv
            grad_x = None
            if ctx.needs_input_grad[3]:
                grad_x = torch.ops.aten.convolution_backward.default(
                    grad, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False])[0]
            batch = x.shape[0]
            g = grad.reshape(batch, grad.shape[1], -1)  # [B, out, L]
            columns = F.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)  # [B, in*k, L]
            record(ctx.tape, ctx.names[0], torch.bmm(g, columns.transpose(1, 2)).view(batch, *weight.shape))
            record(ctx.tape, ctx.names[1], g.sum(2))
            return None, None, None, grad_x, None, None, None

    class LayerNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, anchor: Any, tape: Any, names: Any, x: Any, weight: Any, bias: Any, normalized: Any,
                    eps: float) -> Any:
            out, mean, rstd = torch.ops.aten.native_layer_norm.default(x, normalized, weight, bias, eps)
            ctx.save_for_backward(x, weight, bias, mean, rstd)
            ctx.tape, ctx.names, ctx.normalized = tape, names, normalized
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x, weight, bias, mean, rstd = ctx.saved_tensors
            grad_x = None
            if ctx.needs_input_grad[3]:
                grad_x = torch.ops.aten.native_layer_norm_backward.default(
                    grad, x, ctx.normalized, mean, rstd, weight, bias, [True, False, False])[0]
            inner = tuple(range(1, x.dim() - len(ctx.normalized)))  # positions within an example
            if ctx.names[0] is not None:
                g = grad * ((x - mean) * rstd)
                record(ctx.tape, ctx.names[0], g.sum(inner) if inner else g)
            if ctx.names[1] is not None:
                record(ctx.tape, ctx.names[1], grad.sum(inner) if inner else grad)
            return None, None, None, grad_x, None, None, None, None

    _ROWWISE_FUNCTIONS.update(linear=Linear, conv2d=Conv2d, layer_norm=LayerNorm)
    return _ROWWISE_FUNCTIONS


def _clip_and_sum(grads: dict[str, Any], like: dict[str, Any], max_grad_norm: float) -> dict[str, Any]:
    """``sum_i min(1, C / (||g_i|| + 1e-6)) g_i`` over per-example gradients, the norm over all of ``like``'s
    parameters together (one flattened ``[batch, n_params]`` matrix; a missing parameter's gradient is zero)."""
    import torch

    present = [name for name in like if name in grads]
    out = {name: torch.zeros_like(p) for name, p in like.items() if name not in grads}
    if not present:
        return out
    batch = grads[present[0]].shape[0]
    flat = torch.cat([grads[name].reshape(batch, -1) for name in present], dim=1)
    scale = (max_grad_norm / (torch.linalg.vector_norm(flat, dim=1) + 1e-6)).clamp(max=1.0)
    summed = scale @ flat
    offset = 0
    for name in present:
        size = like[name].numel()
        out[name] = summed[offset : offset + size].view(like[name].shape)
        offset += size
    return out


def clipped_grad_sum(module: Any, loss_fn: Any, x: Any, y: Any, max_grad_norm: float, *,
                     grad_fn: Any = None) -> tuple[dict[str, Any], Any]:
    """Sum over the examples of ``(x, y)`` of each example's gradient clipped to L2 norm ``max_grad_norm``.

    The norm is taken over all trainable parameters together (one flat vector per example), and each gradient is
    scaled by ``min(1, C / (norm + 1e-6))`` as in Abadi et al. 2016 and Opacus. ``grad_fn`` is
    :func:`_per_sample_grad_fn` for this module and loss (built here when not given; a training loop builds it once).
    Returns ``({name: summed grad}, per-example losses)``; an empty batch gives zeros.
    """
    import torch

    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    if x.shape[0] == 0:
        return {name: torch.zeros_like(p) for name, p in params.items()}, torch.zeros(0)
    if grad_fn is None:
        grad_fn = _per_sample_grad_fn(module, loss_fn, tuple(x.shape[1:]))
    total: dict[str, Any] | None = None
    losses = []
    for start in range(0, x.shape[0], _DP_CHUNK):
        grads, loss = grad_fn(params, x[start : start + _DP_CHUNK], y[start : start + _DP_CHUNK])
        summed = _clip_and_sum(grads, params, max_grad_norm)
        total = summed if total is None else {name: total[name] + summed[name] for name in params}
        losses.append(loss)
    return total, torch.cat(losses)


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
    grad_fn = _per_sample_grad_fn(module, loss_fn, tuple(x_train.shape[1:]))  # once: the row-wise path compiles
    for epoch in range(1, recipe.epochs + 1):
        epoch_start = time.monotonic()
        total, seen = 0.0, 0
        for _ in range(steps_per_epoch):
            batch = (torch.rand(n_train, generator=secret) < plan.sample_rate).nonzero().squeeze(1).to(x_train.device)
            summed, losses = clipped_grad_sum(module, loss_fn, x_train[batch], y_train[batch], plan.clip_norm,
                                              grad_fn=grad_fn)
            if losses.numel() and not torch.isfinite(losses).all():
                raise JobError("error", "training diverged (non-finite loss)")
            for name, p in params.items():
                noise = torch.normal(0.0, std, size=p.shape, generator=secret, dtype=p.dtype).to(p.device)
                p.grad = (summed[name] + noise) / plan.expected_batch_size
            optimizer.step()
            total += float(losses.sum())
            seen += int(losses.numel())
        channel.send({"t": "progress", "epoch": epoch, "epochs": recipe.epochs, "loss": total / max(seen, 1),
                      "seconds": time.monotonic() - epoch_start})
    return {"epsilon": plan.epsilon, "delta": plan.delta}


class _Kept:
    """What a worker keeps from one job for the next, when the pool sends it another round of the same federation.

    The pool reuses a worker only for the same scientist, dataset and program (``workerpool.py``), so the next job
    normally finds here the program it would load again (a graph module, about 0.1 CPU-s to deserialize for a small
    CNN), its eval copy, the dataset's tensors (content-addressed by ``data_key``) and the number of classes the
    model's output was probed for. Each entry is checked against the job before use: the program by its sha256, the
    data by store and key. The job's weights replace every parameter and buffer (:func:`reload_weights`), so nothing
    trained in an earlier job reaches the next one but through the weights that job was sent. The kept rows are never
    handed to the program themselves, only copies (indexing with a tensor copies; slices are cloned), so an in-place
    op in one job's graph cannot change what the next job trains or evaluates on.
    """

    def __init__(self) -> None:
        self.program_hash: bytes | None = None
        self.module: Any = None
        self.eval_module: Any = None
        self.data_id: tuple[str, str, str] | None = None
        self.data: tuple[Any, Any] | None = None
        self.checked = False  # the kept program was checked against the kept rows (input shape, classes)
        self.n_classes: int | None = None  # what that check found
        self.device: Any = None  # where the kept program runs: the worker's device, or the CPU it fell back to

    def forget_program(self) -> None:
        self.program_hash = self.module = self.eval_module = self.n_classes = self.device = None
        self.checked = False


_kept = _Kept()


def _module_for(job: dict[str, Any]) -> tuple[Any, bool]:
    """The job's trainable module (``ep.module()``) loaded with its weights; True if the program was kept."""
    import hashlib

    from hivecell.node.plan import PlanError, load_program, reload_weights

    digest = hashlib.sha256(job["program"]).digest()
    try:
        if _kept.program_hash == digest:
            reload_weights(_kept.module, job["weights"])
            return _kept.module, True
        _kept.forget_program()
        module = load_program(job["program"], job["weights"])
    except PlanError as exc:
        raise JobError("bad_plan", exc.message) from None
    if _on_cuda(_device.torch_device):
        module.to(_device.torch_device)
    _kept.program_hash, _kept.module, _kept.device = digest, module, _device.torch_device
    return module, False


def _fall_back_unless_it_runs(module: Any, features: Any) -> None:
    """Run the kept program once on one row on the worker's GPU; a program that cannot (its graph pins a tensor to
    the CPU) is moved to the CPU, where it and later rounds of it run. Out of memory is the job's failure."""
    import torch

    try:
        with torch.no_grad():
            _eval_module(module)(features[:1].clone())
        return
    except RuntimeError as exc:
        if _is_out_of_memory(exc):
            raise
        print(f"worker: the program does not run on {features.device}: {exc}; its jobs run on the CPU", file=sys.stderr)
    module.to("cpu")
    _kept.eval_module, _kept.device = None, torch.device("cpu")


def _eval_module(module: Any) -> Any:
    """The kept eval copy of ``module`` (dropout off, batch norm on running statistics) with its current weights."""
    from hivecell.node.plan import to_eval_module

    if _kept.module is not module or _kept.eval_module is None:
        evaluator = to_eval_module(module)
        if _kept.module is module:
            _kept.eval_module = evaluator
        return evaluator
    _kept.eval_module.load_state_dict(module.state_dict())
    return _kept.eval_module


def _run_job(channel: _Channel, job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from safetensors.torch import save

    from hivecell.node.plan import PlanError, program_input_shape, validate_recipe
    from hivecell.node.privacy import dp_plan

    if _device.problem:
        raise JobError("error", _device.problem)
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
    data_id = (job["store_path"], job["data_key"], recipe.task)
    if _kept.data_id != data_id:
        _kept.data_id = _kept.data = _kept.n_classes = None
        _kept.checked = False
        features, labels = _load_dataset(job["store_path"], job["data_key"], recipe.task)
        if _on_cuda(_device.torch_device):  # once per dataset: a federation's later rounds find the rows there
            features, labels = features.to(_device.torch_device), labels.to(_device.torch_device)
        _kept.data, _kept.data_id = (features, labels), data_id
    features, labels = _kept.data
    _set_limit(resource.RLIMIT_FSIZE, 0)  # from here on the job has no file to write
    module, kept = _module_for(job)
    checked = kept and _kept.checked  # this program was already checked against these rows
    if not checked:
        try:
            expected = program_input_shape(module)
        except PlanError as exc:
            _kept.forget_program()
            raise JobError("bad_plan", exc.message) from None
        sample_shape = tuple(features.shape[1:])
        if len(expected) != len(sample_shape) or any(e is not None and e != s for e, s in zip(expected, sample_shape)):
            raise JobError("bad_data", "the model's input shape does not match the dataset's sample shape")
        if _on_cuda(_kept.device):
            _fall_back_unless_it_runs(module, features)
    if features.device != _kept.device:  # a program that fell back to the CPU: this job's copy of the rows
        features, labels = features.to(_kept.device), labels.to(_kept.device)
    received = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    n_classes = _kept.n_classes if checked else None
    if recipe.task == "classification" and not checked:
        with torch.no_grad():  # on an eval copy: a probe must not move batch-norm statistics
            probe = _eval_module(module)(features[:1].clone())  # a copy: the kept rows are never handed out
        if probe.dim() != 2:
            raise JobError("bad_data", "a classification model must return [batch, classes]")
        n_classes = int(probe.shape[1])
        if int(labels.max()) >= n_classes:
            raise JobError("bad_data", "labels exceed the model's number of classes")
    _kept.n_classes, _kept.checked = n_classes, True
    if recipe.kind == "evaluate":
        return _run_evaluate(recipe, module, features, labels, n_classes, load_s=time.monotonic() - t0)
    train_idx, eval_idx = _split(features.shape[0], recipe.eval_fraction, recipe.seed)
    torch.manual_seed(recipe.seed)  # dropout masks
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
        # the noise the job ran with (a target_epsilon search is memoized, so this costs nothing more)
        dp_metrics = {"noise_multiplier": dp_plan(recipe.to_dict(), int(n_train)).noise_multiplier, **dp_metrics}
    train_s = time.monotonic() - t1

    t2 = time.monotonic()
    metrics: dict[str, Any] = {"train_samples": int(n_train), "eval_samples": int(eval_idx.numel()),
                               "epochs": recipe.epochs}
    if recipe.dp is None and recipe.metrics:  # a DP job releases nothing computed on private rows but its weights
        metrics.update(_evaluate_trained(recipe, module, loss_fn, features, labels, train_idx, eval_idx))
    metrics.update(dp_metrics)
    eval_s = time.monotonic() - t2

    state = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    if {name: tuple(t.shape) for name, t in state.items()} != received:  # pragma: no cover - a torch regression
        raise JobError("error", "trained weights lost their names")
    if recipe.update == "full":
        weights = save(state)
    else:  # the change from the weights the job was sent, compressed (a federation's coordinator has those)
        from safetensors.torch import load

        from hivecell.node.plan import encode_update

        weights = encode_update(load(bytes(job["weights"])), state, recipe.update)
    return {"t": "result", "weights": weights, "metrics": metrics,
            "timings": {"load_s": load_s, "train_s": train_s, "eval_s": eval_s}, "device": _kept.device.type}


def _evaluate_trained(recipe: Any, module: Any, loss_fn: Any, features: Any, labels: Any, train_idx: Any,
                      eval_idx: Any) -> dict[str, Any]:
    """A non-DP training job's exact metrics on its held-out rows (on its training rows if it held none out)."""
    import torch

    evaluated_on = "eval" if eval_idx.numel() else "train"
    idx = eval_idx if eval_idx.numel() else train_idx
    evaluator = _eval_module(module)
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, idx.numel(), recipe.batch_size):
            batch = idx[start : start + recipe.batch_size]
            output = evaluator(features[batch])
            total_loss += float(loss_fn(output, labels[batch])) * batch.shape[0]
            if recipe.task == "classification":
                correct += int((output.argmax(dim=1) == labels[batch]).sum())
    metrics: dict[str, Any] = {"evaluated_on": evaluated_on}
    if "accuracy" in recipe.metrics:
        metrics["accuracy"] = correct / idx.numel()
    if "loss" in recipe.metrics:
        metrics["loss"] = total_loss / idx.numel()
    return metrics


# -- evaluate jobs ----------------------------------------------------------------------------------------------------

_CONFUSION_MAX_CLASSES = 1000  # a k x k confusion matrix is released and noised cell by cell


def _example_losses(recipe: Any, output: Any, target: Any, n_classes: int | None) -> Any:
    """Per-example losses ``[batch]``: their mean is what :func:`_make_loss` computes for the batch."""
    import torch.nn.functional as F

    if recipe.task == "classification":
        if recipe.loss == "cross_entropy":
            return F.cross_entropy(output, target, reduction="none")
        target = F.one_hot(target, n_classes).to(output.dtype)
    elif output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.shape != target.shape:
        raise JobError("bad_data", "model output does not match the labels' shape")
    err = F.mse_loss(output, target, reduction="none") if recipe.loss == "mse" else F.l1_loss(output, target,
                                                                                              reduction="none")
    return err.reshape(err.shape[0], -1).mean(dim=1)


def _run_evaluate(recipe: Any, module: Any, features: Any, labels: Any, n_classes: int | None, *,
                  load_s: float) -> dict[str, Any]:
    """An evaluate job: the model (eval mode, no gradients) on every row; no weights leave the node.

    Without ``dp`` the metrics are exact. With it, the Gaussian mechanism of ``privacy.py``: every example lands in
    one cell (confusion ``C[true][pred]`` if asked for, else (correct, wrong), or the count for regression) and adds
    ``min(loss, L) / L`` to a loss term; noise ``N(0, (sigma * sqrt(2))^2)`` from the secret generator goes on every
    coordinate, and the metrics are post-processed from the noisy vector only.
    """
    import torch

    from hivecell.node.plan import PlanError
    from hivecell.node.privacy import eval_dp_plan

    t0 = time.monotonic()
    plan = None
    if recipe.dp is not None:
        try:
            plan = eval_dp_plan(recipe.to_dict())
        except PlanError as exc:
            raise JobError("bad_plan", exc.message) from None
    classification = recipe.task == "classification"
    confusion = classification and "confusion" in recipe.metrics
    if confusion and n_classes > _CONFUSION_MAX_CLASSES:
        raise JobError("bad_plan", f"metric confusion needs a model with at most {_CONFUSION_MAX_CLASSES} classes")
    n_cells = n_classes * n_classes if confusion else 2 if classification else 1
    cells = torch.zeros(n_cells, dtype=torch.float64)
    loss_term = torch.zeros((), dtype=torch.float64)
    evaluator = _eval_module(module)
    n = int(features.shape[0])
    with torch.no_grad():
        for start in range(0, n, recipe.batch_size):
            # copies, not views: a program's in-place op must not reach the rows a parked worker keeps for later jobs
            x = features[start : start + recipe.batch_size].clone()
            y = labels[start : start + recipe.batch_size].clone()
            output = evaluator(x)
            if output.device.type != "cpu":  # the counts below are kept on the CPU
                output, y = output.cpu(), y.cpu()
            losses = _example_losses(recipe, output, y, n_classes).to(torch.float64)
            if plan is not None:  # each example adds at most 1: a NaN or inf counts as max_loss
                bound = plan.max_loss
                losses = torch.nan_to_num(losses, nan=bound, posinf=bound, neginf=bound).clamp(0.0, bound) / bound
            loss_term += losses.sum()
            if confusion:
                cell = y * n_classes + output.argmax(dim=1)
                cells += torch.bincount(cell, minlength=n_cells).to(torch.float64)
            elif classification:
                correct = int((output.argmax(dim=1) == y).sum())
                cells += torch.tensor([correct, y.shape[0] - correct], dtype=torch.float64)
            else:
                cells[0] += y.shape[0]

    metrics: dict[str, Any] = {"evaluated_on": "all"}
    if plan is None:
        total = float(loss_term) / n
        if "loss" in recipe.metrics and not math.isfinite(total):
            raise JobError("error", "the model's loss is not finite on this dataset")
        metrics["samples"] = n
        correct_count = float(cells.reshape(n_classes, n_classes).trace()) if confusion else float(cells[0])
        if "accuracy" in recipe.metrics:
            metrics["accuracy"] = correct_count / n
        if "loss" in recipe.metrics:
            metrics["loss"] = total
        if confusion:
            metrics["confusion"] = cells.reshape(n_classes, n_classes).to(torch.int64).tolist()
    else:
        secret = _secret_generator()
        noisy = cells + torch.normal(0.0, plan.noise_std, size=cells.shape, generator=secret, dtype=torch.float64)
        noisy_loss = float(loss_term + torch.normal(0.0, plan.noise_std, size=(), generator=secret,
                                                     dtype=torch.float64))
        # post-processing of the noisy vector alone from here on
        n_hat = max(1.0, float(noisy.sum()))
        metrics["samples"] = round(n_hat, 2)
        correct_hat = float(noisy.reshape(n_classes, n_classes).trace()) if confusion else float(noisy[0])
        if "accuracy" in recipe.metrics:
            metrics["accuracy"] = min(1.0, max(0.0, correct_hat / n_hat))
        if "loss" in recipe.metrics:
            metrics["loss"] = min(plan.max_loss, max(0.0, noisy_loss * plan.max_loss / n_hat))
        if confusion:
            metrics["confusion"] = [[round(v, 2) for v in row] for row in noisy.reshape(n_classes, n_classes).tolist()]
        metrics.update(epsilon=plan.epsilon, delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                       max_loss=plan.max_loss)
    return {"t": "result", "weights": b"", "metrics": metrics,
            "timings": {"load_s": load_s, "eval_s": time.monotonic() - t0}, "device": features.device.type}


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return "can't allocate memory" in text or "out of memory" in text.lower() or "not enough memory" in text


def main() -> NoReturn:
    started = time.time()
    gpu = _parse_gpu(sys.argv[1:])
    if "--zygote" in sys.argv[1:]:
        _zygote(gpu)
    frame_fd = os.dup(1)  # frames only; fd 1 and sys.stdout now go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = _Channel(0, frame_fd)
    network = _isolate()
    _import_all()
    _serve(channel, gpu, network, started)


def _isolate() -> str:
    """What every worker does first, while still single-threaded: no core dumps (they would hold private rows), and
    the network dropped (see :func:`_drop_network`). Returns what :func:`_drop_network` got."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return _drop_network()  # before torch starts threads: user namespaces need a single-threaded process


def _import_all() -> None:
    """The slow part, done before a job arrives so a warm spare starts at once. Deserializing and running a program
    lazily imports much of torch.export (which probes the temp dir by writing a file): do it all now, while we may
    still write files, since a job runs under RLIMIT_FSIZE 0. No torch operation runs here: a zygote forks after it,
    and torch's thread pools and CUDA must start in the forked worker, not before the fork."""
    import tempfile

    import psutil  # noqa: F401 - the ready frame's startup_s
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torch._export.serde.serialize  # noqa: F401
    import torch.export._trace  # noqa: F401
    import torch.func  # noqa: F401

    import hivecell.node.plan  # noqa: F401
    import hivecell.node.privacy  # noqa: F401 - dp_accounting, for DP jobs
    import hivecell.node.store  # noqa: F401

    tempfile.gettempdir()


def _serve(channel: _Channel, gpu: str, network: str, started: float) -> NoReturn:
    """Start the device, say ``ready``, then run jobs until EOF (or until one fails)."""
    _pick_device(gpu)
    import gc

    gc.collect()
    gc.freeze()  # the imports stay for the process's life: each job's collection (_release_memory) skips them

    try:
        import psutil

        startup_s = time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil is a nicety here
        startup_s = time.time() - started
    channel.send({"t": "ready", "pid": os.getpid(), "startup_s": startup_s, "isolation": {"network": network},
                  "device": _device.report})

    while True:  # one job per frame until EOF; a failed job ends the process (_fail exits)
        try:
            job = channel.read(cap=JOB_FRAME_CAP)
            if job is None:
                sys.stderr.flush()
                os._exit(0)  # the pool no longer wants this worker
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
        del job, reply
        sys.stderr.flush()
        _release_memory()


# -- the zygote ------------------------------------------------------------------------------------------------------

ZYGOTE_MESSAGE = struct.Struct(">cii")  # kind, pid, value: the zygote's messages to the pool, one per datagram
_FORK_REQUEST = b"F"  # pool -> zygote, with the new worker's stdin, stdout and stderr descriptors (SCM_RIGHTS)


def _zygote(gpu: str) -> NoReturn:
    """``--zygote``: import everything a worker needs once, then fork a worker per request of the pool.

    fd 0 is one end of an ``AF_UNIX`` ``SOCK_SEQPACKET`` pair whose other end the pool holds. The pool sends ``F`` with
    three descriptors (the new worker's stdin, stdout, stderr); the zygote forks, the child becomes a worker on them
    (:func:`_forked_worker`), and the zygote answers ``(P, pid, 0)`` or ``(E, 0, errno)``. It reaps its children
    through pidfds and reports each exit as ``(X, pid, returncode)`` (``-N`` for signal N, as ``subprocess`` does), so
    the pool knows exit statuses though the workers are not its children. EOF from the pool (it closed, or died) ends
    the zygote; the workers it forked live on until their own stdin closes.

    The zygote never runs a torch operation, never touches job data, keys or the network (dropped at start like any
    worker's, so every child inherits an empty network namespace), and is single-threaded but for the BLAS library's
    threads, which pause across a fork (``pthread_atfork``).
    """
    import select
    import socket

    control = socket.socket(fileno=0)
    _name_process(b"hivecell-zygote")
    os.dup2(2, 1)  # nothing is written to stdout; a stray print goes to the log
    sys.stdout = sys.stderr
    network = _isolate()
    _import_all()
    import gc

    gc.collect()
    gc.freeze()  # shared with every child, which would otherwise copy pages as its collector touched them
    control.send(ZYGOTE_MESSAGE.pack(b"R", os.getpid(), 0))
    children: dict[int, int] = {}  # pidfd -> pid
    while True:
        readable, _, _ = select.select([control, *children], [], [])
        for fd in readable:
            if fd is not control:
                pid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                control.send(ZYGOTE_MESSAGE.pack(b"X", pid, os.waitstatus_to_exitcode(status)))
                continue
            message, fds, _, _ = socket.recv_fds(control, 64, 3)
            if not message:
                os._exit(0)  # the pool is gone
            if message != _FORK_REQUEST or len(fds) != 3:
                for extra in fds:
                    os.close(extra)
                control.send(ZYGOTE_MESSAGE.pack(b"E", 0, errno.EINVAL))
                continue
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:
                pid, failed = -1, exc.errno or errno.EAGAIN
            if pid == 0:
                _forked_worker(control, list(children), fds, gpu, network)
            for passed in fds:
                os.close(passed)
            if pid < 0:
                control.send(ZYGOTE_MESSAGE.pack(b"E", 0, failed))
                continue
            children[os.pidfd_open(pid)] = pid  # a child that already exited still has a pidfd: it is unreaped
            control.send(ZYGOTE_MESSAGE.pack(b"P", pid, 0))


def _name_process(name: bytes) -> None:
    """Set the process name (``/proc/PID/comm``, what ``ps -o comm`` and ``top`` show; at most 15 bytes)."""
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _forked_worker(control: Any, pidfds: list[int], fds: list[int], gpu: str, network: str) -> NoReturn:
    """In the zygote's child: become a worker on the descriptors the pool sent, in a session of its own."""
    started = time.time()
    try:
        control.close()
        for pidfd in pidfds:
            os.close(pidfd)
        os.setsid()  # its own process group, which the pool kills as a whole
        _name_process(b"hivecell-worker")  # its command line is the zygote's; ps -o comm tells them apart
        stdin, stdout, stderr = fds
        os.dup2(stdin, 0)
        os.dup2(stderr, 2)
        os.dup2(stderr, 1)  # as in main(): fd 1 and sys.stdout go to stderr, frames go to their own descriptor
        frame_fd = os.dup(stdout)
        keep = {0, 1, 2, frame_fd}
        for fd in os.listdir("/proc/self/fd"):  # nothing else of the zygote's stays open in a worker
            if int(fd) not in keep:
                try:
                    os.close(int(fd))
                except OSError:
                    pass  # the directory's own descriptor, closed by now
        sys.stdout = sys.stderr
        _serve(_Channel(0, frame_fd), gpu, network, started)
    except BaseException:  # noqa: BLE001 - never return into the zygote's loop
        traceback.print_exc(file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(1)


def _release_memory() -> None:
    """After a job: collect its objects and give the freed heap back to the kernel, so a worker waiting for its next
    job holds the imports and what :class:`_Kept` keeps, not the previous job's peak (the pool polls RSS against the
    next job's limit). The imports were frozen out of the collector's sight at start (``gc.freeze``), so this costs
    milliseconds, not the 0.15 s a full collection of torch's objects took per job."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory stays with the allocator, which the next job reuses
        pass


def _fail(channel: _Channel, code: str, message: str) -> NoReturn:
    try:
        channel.send({"t": "error", "code": code if code in ERROR_CODES else "error", "message": message})
    finally:
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
