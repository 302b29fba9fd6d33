"""Job round-trip latency and Worker start: prints one JSON object.

Real daemons on loopback hold the same digits shard. Four modes, N short jobs each (DigitsCNN, 1 epoch by default):

  warm_spare               ``--warm-workers 1`` (the default), jobs spaced by --gap seconds, as on a node whose
                           scientists do not queue jobs back to back: the spare is ready when a job arrives
  warm_spare_back_to_back  the same daemon, the next job submitted as soon as the last is released: the spare for it
                           is forked from the zygote (the default, ``worker_fork``) the moment the last was claimed
  spawned_back_to_back     the same with ``--no-worker-fork``: each spare is a fresh interpreter importing torch, which
                           the pool starts only once no job runs, so a job sent at once waits for it (the baseline of
                           the zygote)
  cold                     ``--warm-workers 0``: a fresh interpreter is started for each job

Each job's time is split into

  transfer    client-side submit call (plan upload + validation) and result fetch
  worker      time the job waited for a ready Worker (``worker_wait_s``; ~0 with a warm spare)
  load        the Worker loading the dataset and the plan
  training    training + evaluation in the Worker
  signoff     signing the result
  other       the rest (queueing, progress round trips, status long-poll latency)

Baseline, measured in the same run: the same plan trained in this process with plain torch (no mesh, no Worker), so
``overhead_ratio`` = round trip / local training. Usage: ``python bench/job_roundtrip.py [--jobs 5] [--epochs 1]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import trio


def _median(values):
    return round(statistics.median(values), 4) if values else None


def local_baseline(x, y, epochs: int, repeats: int) -> float:
    """Train the same model with plain torch in this process: the floor a job cannot beat."""
    import torch

    from hivecell.node.zoo import DigitsCNN

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        n_train = int(len(xt) * 0.8)
        for _ in range(epochs):
            perm = torch.randperm(n_train)
            for i in range(0, n_train, 32):
                idx = perm[i:i + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
        with torch.no_grad():
            model(xt[n_train:]).argmax(1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def run_jobs(address: str, plan, n: int, gap: float) -> list[dict]:
    from hivecell.node.client import Client

    rows = []
    for _ in range(n):
        await trio.sleep(gap)
        # A scientist of its own per job: a node keeps a finished job's Worker for the next job of the same scientist,
        # dataset and program (a federation's rounds), which would leave nothing of the Worker start to measure.
        async with Client.connect(address) as client:
            await client.datasets()
            t0 = time.perf_counter()
            job_id = await client.submit("digits", plan)
            t_submit = time.perf_counter() - t0
            status = await client.wait(job_id, timeout=600)
            t1 = time.perf_counter()
            await client.result(job_id)
            t_fetch = time.perf_counter() - t1
            total = time.perf_counter() - t0
            tm = status.timings
            worker = tm.get("worker_wait_s", 0.0)
            load = tm.get("load_s", 0.0)
            training = tm.get("train_s", 0.0) + tm.get("eval_s", 0.0)
            signoff = tm.get("signoff_s", 0.0)
            rows.append({
                "total_s": total, "transfer_s": t_submit + t_fetch, "worker_s": worker, "load_s": load,
                "training_s": training, "signoff_s": signoff,
                "other_s": max(0.0, total - t_submit - t_fetch - worker - load - training - signoff),
                "worker_start_s": tm.get("worker_start_s"),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5, help="jobs per mode (default 5)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per job (default 1: a short job)")
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between spaced jobs (default 10)")
    args = parser.parse_args()

    from hivecell.node.dataset import encode_tensors, make_record
    from hivecell.node.demo import digits_shards
    from hivecell.node.home import Home
    from hivecell.node.localnet import start_daemon
    from hivecell.node.plan import build_plan
    from hivecell.node.store import Store
    from hivecell.node.zoo import DigitsCNN, digits_example_input

    x, y = digits_shards(4)[0]
    plan = build_plan(DigitsCNN(), digits_example_input(), {"optimizer": "adam", "lr": 0.01, "epochs": args.epochs})
    report: dict = {"benchmark": "job_roundtrip", "jobs_per_mode": args.jobs, "epochs": args.epochs, "gap_s": args.gap,
                    "samples": int(len(x)), "plan_bytes": len(plan.program) + len(plan.weights)}
    with tempfile.TemporaryDirectory(prefix="hivecell-bench-") as tmp:
        modes = (("warm_spare", ("--warm-workers", "1"), args.gap),
                 ("warm_spare_back_to_back", ("--warm-workers", "1"), 0.0),
                 ("spawned_back_to_back", ("--warm-workers", "1", "--no-worker-fork"), 0.0),
                 ("cold", ("--warm-workers", "0"), 0.0))
        for mode, flags, gap in modes:
            home = Home(Path(tmp) / mode)
            identity, _ = home.init()
            with Store.open(home.store_path) as store:
                store.add_dataset(make_record(name="digits", features=x, labels=y, feature_names=[],
                                              owner=identity.peer_id), encode_tensors(x, y))
            daemon = start_daemon(home.path, *flags)
            try:
                rows = trio.run(run_jobs, daemon.address, plan, args.jobs, gap)
            finally:
                daemon.stop()
            report[mode] = {k: _median([r[k] for r in rows if r[k] is not None]) for k in rows[0]}
    baseline = local_baseline(x, y, args.epochs, repeats=3)
    report["baseline_local_training_s"] = round(baseline, 4)
    for mode, _, _ in modes:
        report[mode]["overhead_ratio_vs_local"] = round(report[mode]["total_s"] / baseline, 2)
    report["worker_start"] = {
        "cold_interpreter_s": report["cold"]["worker_start_s"],
        "cold_wait_s": report["cold"]["worker_s"],
        "warm_spare_wait_s": report["warm_spare"]["worker_s"],
        "back_to_back_wait_s": report["warm_spare_back_to_back"]["worker_s"],
        "spawned_back_to_back_wait_s": report["spawned_back_to_back"]["worker_s"],
        "speedup_fork_over_spawn_back_to_back_total": round(
            report["spawned_back_to_back"]["total_s"] / report["warm_spare_back_to_back"]["total_s"], 2),
        "speedup_cold_over_warm_total": round(report["cold"]["total_s"] / report["warm_spare"]["total_s"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
