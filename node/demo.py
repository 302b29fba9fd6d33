"""``hivecell demo``: a whole local mesh in one command.

Starts N node daemons as separate processes on loopback, each holding one shard of scikit-learn's digits as a
registered private dataset, then acts as a data scientist: lists every node's datasets (signed adverts), sends a small
CNN training plan to the first node, follows its progress, verifies the owner's sign-off and reports the evaluation
that the node computed on its held-out data.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cli import ExitCode
from .localnet import DaemonProcess, DaemonStartError, start_daemon

__all__ = ["run_demo", "DemoError", "digits_shards"]

DEMO_RECIPE = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "loss": "cross_entropy",
               "metrics": ["accuracy", "loss"], "eval_fraction": 0.2, "seed": 0}


class DemoError(Exception):
    def __init__(self, message: str, exit_code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def digits_shards(n: int, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits (shipped inside the wheel, no download), shuffled and cut into ``n`` shards."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DemoError("the demo needs scikit-learn: pip install 'hivecell[demo]'", ExitCode.FAILURE) from exc
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # [N, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    return [(x[idx], y[idx]) for idx in np.array_split(order, n)]


def _prepare_nodes(root: Path, n: int) -> list[dict[str, Any]]:
    from .dataset import encode_tensors, make_record
    from .home import Home
    from .store import Store

    nodes = []
    for i, (x, y) in enumerate(digits_shards(n)):
        home = Home(root / f"node{i}")
        identity, _ = home.init()
        record = make_record(name=f"digits-{i}", features=x, labels=y, feature_names=[], tags=["digits", "images"],
                             description=f"handwritten digits 8x8, shard {i + 1} of {n}", signoff="auto",
                             owner=identity.peer_id, seed=i)
        with Store.open(home.store_path) as store:
            if store.get_dataset(record["name"]) is None:
                store.add_dataset(record, encode_tensors(x, y))
        nodes.append({"home": home.path, "dataset": record["name"], "samples": int(len(x))})
    return nodes


def run_demo(*, nodes: int = 4, epochs: int = 30, workdir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the demo and return its report (the ``--json`` output)."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet, soft_wrap=True)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hivecell-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    daemons: list[DaemonProcess] = []
    t_start = time.perf_counter()
    try:
        with console.status("preparing node homes and digits shards"):
            specs = _prepare_nodes(root, nodes)
        with console.status(f"starting {nodes} node daemons"):
            for i, spec in enumerate(specs):
                # Only the node that gets the job keeps a warm Worker; the others would only spend memory.
                daemons.append(start_daemon(spec["home"], "--warm-workers", "1" if i == 0 else "0"))
        for spec, d in zip(specs, daemons):
            spec.update(peer_id=d.peer_id, address=d.address)
            console.print(f"node {d.peer_id[-8:]} at {d.address} holds [bold]{spec['dataset']}[/] "
                          f"({spec['samples']} samples)")
        job = _scientist(daemons, specs, epochs=epochs, console=console)
        report = {
            "nodes": [{k: str(v) if isinstance(v, Path) else v for k, v in s.items()} for s in specs],
            "job": job,
            "seconds": round(time.perf_counter() - t_start, 2),
            "workdir": str(root) if workdir else None,
        }
        return report
    except DaemonStartError as exc:
        raise DemoError(f"a node daemon did not start: {exc}") from exc
    finally:
        for d in daemons:
            d.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _scientist(daemons: list[DaemonProcess], specs: list[dict[str, Any]], *, epochs: int, console: Any
               ) -> dict[str, Any]:
    import trio
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .client import Client, JobFailed, ResultRejected
    from .plan import build_plan
    from .zoo import DigitsCNN, digits_example_input

    target = daemons[0]
    out: dict[str, Any] = {"node": target.peer_id, "dataset": specs[0]["dataset"], "status": "not_started",
                           "signoff_verified": False}

    async def main() -> None:
        # Search: every node's signed adverts (PyGrid's "search the network", here node by node).
        for d in daemons:
            async with Client.connect(d.address) as c:
                for info in await c.datasets():
                    console.print(f"  found [bold]{info.name}[/] on …{info.node[-8:]}: tags {', '.join(info.tags)}, "
                                  f"{info.schema['num_samples']} samples, mock preview of {len(info.mock['labels'])}"
                                  f" synthetic rows")
        plan = build_plan(DigitsCNN(), digits_example_input(), dict(DEMO_RECIPE, epochs=epochs))
        async with Client.connect(target.address) as client:
            await client.datasets()
            t0 = time.perf_counter()
            progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), console=console, disable=console.quiet)
            with progress:
                bar = progress.add_task("training on …" + target.peer_id[-8:], total=epochs, info="queued")

                def on_progress(status: Any) -> None:
                    p = status.progress
                    info = status.state if not p else f"epoch {p.get('epoch')}/{p.get('epochs')} loss {p.get('loss', 0):.3f}"
                    progress.update(bar, completed=p.get("epoch", 0) if p else 0, info=info)

                try:
                    result = await client.train(specs[0]["dataset"], plan, on_progress=on_progress, timeout=900)
                except JobFailed as exc:
                    out.update(status=exc.state, reason=exc.reason, seconds=round(time.perf_counter() - t0, 2))
                    return
                except ResultRejected as exc:
                    out.update(status="rejected", reason=str(exc), seconds=round(time.perf_counter() - t0, 2))
                    return
            status = await client.status(result.job_id)
        out.update(
            job_id=result.job_id, status="released", signoff_verified=True, seconds=round(time.perf_counter() - t0, 2),
            accuracy=result.metrics.get("accuracy"), loss=result.metrics.get("loss"), metrics=result.metrics,
            signoff={"signer": target.peer_id, "decision": result.signoff.decision,
                     "result_hash": result.result_hash, "plan_hash": result.signoff.plan_hash},
            timings=status.timings,
        )
        console.print(f"[green]released[/] job {result.job_id}: accuracy [bold]{out['accuracy']:.3f}[/] on "
                      f"{result.metrics.get('eval_samples')} held-out samples, sign-off by …{target.peer_id[-8:]} "
                      f"verified ({result.signoff.decision}), {out['seconds']:.1f} s")

    from hivecell.mesh.host import PeerUnreachable, RemoteError

    try:
        trio.run(main)
    except PeerUnreachable as exc:
        raise DemoError(f"a node could not be reached: {exc}", ExitCode.UNREACHABLE) from exc
    except RemoteError as exc:
        raise DemoError(f"the node refused the job: {exc}", ExitCode.JOB_FAILED) from exc
    except trio.TooSlowError as exc:
        raise DemoError("the job did not finish within 15 minutes", ExitCode.JOB_FAILED) from exc
    return out
