"""Per-round cost of model-centric federated learning on loopback (issue 4); prints one JSON object.

For each N in --nodes (default 4, 8, 16), N real daemons (``hivecell run``, one process each, a fresh home each) are
started on loopback, each holding its shard of the "fedavg-digits" work (:func:`hivecell.node.demo.fedavg_digits`:
non-IID, two label-sorted shards per node, the 20% test split kept by the coordinator). This process then runs
:func:`hivecell.node.federate.federate` over them: FedDigitsCNN, SGD lr 0.05, batch 16, one local epoch,
``eval_fraction`` 0, no metrics, FedAvg, ``min_nodes`` = N, a 600 s deadline, and the global weights evaluated on the
test split after every round (:func:`torch_evaluator`). Measured per round:

  round_s          the round's wall time as the coordinator records it (``RoundRecord.seconds``: first submit to
                   evaluated global weights)
  slowest_train_s  the slowest node's Worker training time (``train_s`` of its job)
  overhead_s       round_s - slowest_train_s: what the mesh adds on top of the training the round waits for
  bytes            ``bytes_sent + bytes_received`` of the record: plan (program + weights) up to each node, result
                   weights back (payload bytes; framing and the secure channel's own bytes are not counted)
  peak RSS         each daemon process, and each daemon plus its Worker children, sampled with psutil every 0.2 s
                   while the daemons run; the max over the run per node, then the max and median over nodes, in MB

A node reuses its Worker process across the rounds of one federation (``node/workerpool.py``, parked workers), so
round 1 is reported apart and headline numbers are medians over rounds 2..R. Before round 1 the benchmark waits until
the daemons' warm spares are ready and idle (``spares_settle_s``), as on nodes that have been up for a while. Round 1's
jobs claim those spares, and each node then starts a replacement spare, which imports torch (about 6 CPU-seconds):
on one box, N such imports at once would spread over the next several rounds and be counted as their overhead, though
on real nodes each import would compete only with its own node's work. So the coordinator also waits after round 1
until the replacements are ready (``spare_refill_s``, inside no round's time), but at most until 10 s before the
nodes would let their parked Workers go (60 s idle, ``reuse_idle_s``); ``spare_refill_complete`` is false if the
imports were still running then (at N = 16 on 2 cores they take longer and rounds 2-3 pay the rest, so the default
``--rounds`` gives N = 16 ten rounds, and the median is of steady rounds). ``--no-settle`` skips both waits and
measures the product as it runs, spare imports included.

Daemons run with ``--warm-workers 1 --worker-threads 1``: N nodes share this box's cores (2 on the dev box), and one
torch thread per Worker keeps N Workers from oversubscribing them; the coordinator's evaluation and the baselines
below also use one thread. With N Workers training at once on C cores, each node's ``train_s`` is roughly its
uncontended time times N / C: the training the round waits for is a contended one, and the overhead is measured
against it.

Where the overhead goes: each job's timeline is put together from this process's calls (``Client.submit``,
``submit_and_fetch``, ``result`` and ``verify`` are wrapped with timestamping shims for the run; nothing else changes) and the node's own job
record (``timings``: received, started, worker_wait_s, load_s, train_s, eval_s, finished, signoff_s; ``updated`` is
the release). For the round's last-fetched job (the critical path) the round splits exactly into

  to_received   round start until the node stored the job (submit transfer, audit of the program and weights,
                plan hash, pricing)
  queue         stored until the node's job loop claimed it
  worker        claimed until the Worker's result was back in the daemon; split into worker_wait, load, train, eval
                and worker_other (frames over the pipes, pool bookkeeping)
  release       storing the result and signing it off (``signoff_s`` is part of it)
  fetch         release until the coordinator holds the verified result: the node answers on the job's own stream
                (one per job: submit, accepted, and the result when the job ends), and the result is checked
                against its sign-off (``verify_s`` is part of it)
  after         last fetch until the round's end: decoding, screening, aggregation, and ``evaluate_s``

On loopback the N nodes and the coordinator share this box's cores, so wall times include waiting for a core (check
the load averages the report records: other processes on the box stretch every phase). ``cpu_s_per_round`` says how
much is work: CPU seconds (user + system) used per round by this process (the coordinator, its evaluation thread
included), by the N daemons and by their Workers, medians over rounds 2..R; no round on C cores can be shorter than
total / C. A node's Worker CPU minus ``baseline_worker_fn_epoch_s`` is roughly its per-job cost beyond training.

Baselines, measured in the same run: one epoch of the same model and recipe on node 0's shard for that N, in this
process with one torch thread, (a) in plain torch on an eager ``FedDigitsCNN`` (``baseline_local_epoch_s``) and (b)
with the Worker's own training function on the exported program (``baseline_worker_fn_epoch_s``); and one plain-torch
epoch over the whole training split (``baseline_full_train_epoch_s``: centralized training of one round's data on one
core). Medians of 3 after a warm-up.

Goal (issue 4): overhead under 0.5 s per round at N = 8, and overhead that grows no faster than linearly with N:
``overhead_growth`` = (overhead at the largest N / at the smallest N) / (largest N / smallest N), at most 1.

The bulk lane's effect (``lane_effect``, issue 5): with :class:`WideDigitsCNN` (the same CNN with a 6144-unit hidden
layer: 25.5 MB of weights), the same N daemons (default 4) run rounds with the lane (weights and updates above 1 MiB
pulled over TLS 1.3 bound to the peer ids) and rounds without it (``FederationConfig(lane=False)``: inline on
libp2p streams), alternately, each round from fresh weights (no node holds them yet), after a warm-up round; reported
as medians per mode and the ratio of overheads, with the nodes' lane counters (transfers by way, fallbacks).

Usage: ``python bench/fedavg_rounds.py [--nodes 4 8 16] [--rounds 6 | --rounds 6 6 10] [--lane-effect 4 4]
[--only-lane-effect]``. Progress goes to stderr (one
line per round), the JSON to stdout. Every daemon is stopped and every temporary home removed on exit, Ctrl-C and
SIGTERM included. Linux (psutil, /proc).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import trio

from hivecell.node.plan import UPDATE_ENCODINGS

RECIPE = {"optimizer": "sgd", "lr": 0.05, "batch_size": 16, "epochs": 1, "eval_fraction": 0.0, "metrics": [],
          "seed": 0}
GOAL = {"overhead_s_at_8_max": 0.5, "overhead_growth_max": 1.0}
DEADLINE_S = 600.0
REUSE_IDLE_S = 60.0  # open_worker_pool's reuse_idle_s: a node kills a Worker parked this long without a next job
MB = 1024 * 1024


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


# -- baselines --------------------------------------------------------------------------------------------------------


def plain_epoch_s(x: Any, y: Any, repeats: int = 3) -> float:
    """One epoch of the recipe on an eager FedDigitsCNN in plain torch; median of ``repeats`` after a warm-up."""
    import torch

    from hivecell.node.zoo import FedDigitsCNN

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for i in range(repeats + 1):
        torch.manual_seed(0)
        model = FedDigitsCNN()
        opt = torch.optim.SGD(model.parameters(), lr=RECIPE["lr"])
        t0 = time.perf_counter()
        order = torch.randperm(len(xt))
        for start in range(0, len(xt), RECIPE["batch_size"]):
            batch = order[start:start + RECIPE["batch_size"]]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            opt.step()
        if i:  # the first one warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Frames:
    """Stands in for the Worker's frame channel: keeps the progress frames."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.frames.append(message)


def worker_fn_epoch_s(plan: Any, x: Any, y: Any, repeats: int = 3) -> float:
    """One epoch with the Worker's own ``_run_sgd`` on the plan's exported program (as ``bench/dp_cost.py`` does)."""
    import torch

    from hivecell.node.plan import load_program, validate_recipe
    from hivecell.node.worker import _make_loss, _make_optimizer, _run_sgd

    recipe = validate_recipe(plan.recipe)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for i in range(repeats + 1):
        module = load_program(plan.program, plan.weights)
        optimizer = _make_optimizer(recipe, [p for p in module.parameters() if p.requires_grad])
        frames = _Frames()
        _run_sgd(frames, recipe, module, _make_loss(recipe, 10), optimizer, xt, yt)
        if i:
            times.append(frames.frames[-1]["seconds"])
    return statistics.median(times)


def _proc_table(attrs: list[str]) -> dict[int, dict[str, Any]]:
    """``{pid: {attr: value}}`` for every process, one pass over /proc.

    ``as_dict`` rather than ``process_iter(attrs)``: psutil caches the Process objects that ``process_iter`` yields
    and sets ``.info`` on them, so two threads calling it (the RSS sampler and the per-round CPU snapshot) would
    overwrite each other's ``.info``.
    """
    table = {}
    for p in psutil.process_iter():
        try:
            table[p.pid] = p.as_dict(attrs)
        except psutil.Error:
            continue
    return table


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, from the kernel's lists (``/proc/PID/task/*/children``): a few small reads, where
    a pass over the process table would cost the coordinator CPU that the benchmark counts as overhead."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children", "rb") as f:
                    kids = [int(c) for c in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


# -- memory -----------------------------------------------------------------------------------------------------------


class RssSampler:
    """Samples the RSS of each daemon and of its descendants every ``interval`` s in a thread; keeps peaks per node.

    The process tree is re-read every ``refresh`` samples (one pass over /proc), the RSS of the known processes every
    sample, so that sampling costs little CPU beside N daemons.
    """

    def __init__(self, pids: list[int], interval: float = 0.2, refresh: int = 3) -> None:
        self.pids, self.interval, self.refresh = pids, interval, refresh
        self.daemon_peak = [0] * len(pids)
        self.tree_peak = [0] * len(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._trees: list[list[psutil.Process]] = [[] for _ in pids]
        self._roots = [psutil.Process(pid) for pid in pids]
        self.cpu_s = 0.0  # CPU time of the sampling thread itself, so it can be left out of the coordinator's
        self.pss_at_end: list[int] = []

    def _refresh_trees(self) -> None:
        self._trees = [[_process(pid) for pid in _descendants(root.pid)] for root in self._roots]
        self._trees = [[p for p in tree if p is not None] for tree in self._trees]

    @staticmethod
    def _rss(p: psutil.Process) -> int:
        try:
            return p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if n % self.refresh == 0:
                self._refresh_trees()
            n += 1
            for i, root in enumerate(self._roots):
                own = self._rss(root)
                total = own + sum(self._rss(c) for c in self._trees[i])
                self.daemon_peak[i] = max(self.daemon_peak[i], own)
                self.tree_peak[i] = max(self.tree_peak[i], total)
            self.cpu_s = time.thread_time()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.pss_at_end = self._pss_now()

    def _pss_now(self) -> list[int]:
        """Each node's tree by PSS: a node's Workers are forked from its zygote and share most pages with it, which the
        RSS sum counts once per process (PSS splits them; it costs ~8 ms per process to read, too much to sample
        beside N daemons, so it is read once, when the sampling ends, while the nodes still run)."""
        pss = []
        for root in self._roots:
            total = 0
            for p in [root, *(_process(pid) for pid in _descendants(root.pid))]:
                try:
                    total += p.memory_full_info().pss if p is not None else 0
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            pss.append(total)
        return pss

    def summary(self) -> dict[str, float]:
        return {"daemon_max": round(max(self.daemon_peak) / MB, 1),
                "daemon_median": round(statistics.median(self.daemon_peak) / MB, 1),
                "daemon_plus_workers_max": round(max(self.tree_peak) / MB, 1),
                "daemon_plus_workers_median": round(statistics.median(self.tree_peak) / MB, 1),
                "daemon_plus_workers_pss_at_end_median": round(statistics.median(self.pss_at_end or [0]) / MB, 1)}


def wait_settled(pids: list[int], *, warm: int, timeout: float = 300.0, window: float = 1.0) -> tuple[float, bool]:
    """Wait until every daemon has ``warm`` children and all the trees used < 10% of one core over ``window`` s.

    Returns the seconds waited (the warm spares importing torch) and whether they settled; gives up after ``timeout``.
    """
    roots = [psutil.Process(pid) for pid in pids]
    t0 = time.monotonic()

    def tree_cpu() -> tuple[float, int]:
        used, fewest = 0.0, 1 << 30
        for root in roots:
            procs = [root, *root.children(recursive=True)]
            fewest = min(fewest, len(procs) - 1)
            for p in procs:
                try:
                    t = p.cpu_times()
                    used += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        return used, fewest

    while time.monotonic() - t0 < timeout:
        before, fewest = tree_cpu()
        time.sleep(window)
        after, _ = tree_cpu()
        if fewest >= warm and (after - before) / window < 0.1:
            return time.monotonic() - t0, True
    return time.monotonic() - t0, False


def cpu_snapshot(daemon_pids: list[int], not_mine: float = 0.0) -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (less ``not_mine``: the RSS sampler's thread), the
    daemons, and the daemons' descendants.

    One pass over /proc. A process that exited since the last snapshot takes its CPU time with it, so differences are
    exact only while the Workers stay (rounds 2..R, where each node reuses its parked Worker).
    """
    procs = _proc_table(["ppid", "cpu_times"])
    children: dict[int, list[int]] = {}
    for pid, info in procs.items():
        children.setdefault(info["ppid"], []).append(pid)

    def used(pid: int) -> float:
        t = procs[pid]["cpu_times"] if pid in procs else None
        return 0.0 if t is None else t.user + t.system

    daemons = workers = 0.0
    for root in daemon_pids:
        daemons += used(root)
        todo = list(children.get(root, []))
        while todo:
            pid = todo.pop()
            workers += used(pid)
            todo.extend(children.get(pid, []))
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"coordinator": me.ru_utime + me.ru_stime - not_mine, "daemons": daemons, "workers": workers}


# -- the coordinator's side of each job ----------------------------------------------------------------------------


class JobClock:
    """Timestamps (``time.time()``) of this process's client calls per job, tagged with the round they belong to."""

    def __init__(self) -> None:
        self.round = 1
        self.jobs: dict[str, dict[str, Any]] = {}

    @contextmanager
    def installed(self) -> Iterator[JobClock]:
        """Wrap ``Client.submit``, ``submit_and_fetch``, ``result`` and ``verify`` for the duration; then put the
        originals back."""
        from hivecell.node.client import Client

        submit, submit_and_fetch, result, verify = Client.submit, Client.submit_and_fetch, Client.result, Client.verify
        clock = self

        async def timed_submit(client: Any, dataset: str, plan: Any) -> str:
            t0 = time.time()
            job_id = await submit(client, dataset, plan)
            clock.jobs[job_id] = {"round": clock.round, "node": client.node, "submit_start": t0,
                                  "submit_end": time.time()}
            return job_id

        async def timed_submit_and_fetch(client: Any, dataset: str, plan: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            job_id, out = await submit_and_fetch(client, dataset, plan, **kwargs)
            # update, not replace: the verify shim has already stamped this job when the result came on this stream
            clock.jobs.setdefault(job_id, {}).update(round=clock.round, node=client.node, submit_start=t0)
            if out is not None:
                clock.jobs[job_id]["fetch_end"] = time.time()
            return job_id, out

        async def timed_result(client: Any, job_id: str, **kwargs: Any) -> Any:
            out = await result(client, job_id, **kwargs)
            clock.jobs.setdefault(job_id, {})["fetch_end"] = time.time()
            return out

        def timed_verify(client: Any, job_id: str, *args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return verify(client, job_id, *args)
            finally:
                clock.jobs.setdefault(job_id, {})["verify_s"] = time.perf_counter() - t0

        Client.submit, Client.submit_and_fetch, Client.result, Client.verify = (
            timed_submit, timed_submit_and_fetch, timed_result, timed_verify)
        try:
            yield self
        finally:
            Client.submit, Client.submit_and_fetch, Client.result, Client.verify = (
                submit, submit_and_fetch, result, verify)


def job_phases(clock: dict[str, Any], record: dict[str, Any]) -> dict[str, float] | None:
    """One job's timeline from the coordinator's stamps and the node's job record; ``None`` if a stamp is missing."""
    tm = record.get("timings", {})
    try:
        received, started, finished = tm["received"], tm["started"], tm["finished"]
        released = record["updated"]
        in_worker = [tm.get(k, 0.0) for k in ("worker_wait_s", "load_s", "train_s", "eval_s")]
        out = {
            "upload": received - clock["submit_start"],
            "queue": started - received,
            "worker": finished - started,
            "worker_wait": in_worker[0], "load": in_worker[1], "train": in_worker[2], "eval": in_worker[3],
            "worker_other": finished - started - sum(in_worker),
            "release": released - finished,
            "signoff": tm.get("signoff_s", 0.0),
            "fetch": clock["fetch_end"] - released,
            "verify": clock.get("verify_s", 0.0),
            "worker_start": tm.get("worker_start_s", 0.0),
        }
    except KeyError:
        return None
    return out


def round_breakdown(rnd: dict[str, Any], clocks: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]]
                    ) -> dict[str, Any] | None:
    """Medians over the round's jobs, and the critical path (the last-fetched job) that sums to the round's time."""
    jobs = {j: c for j, c in clocks.items() if c.get("round") == rnd["round"] and "fetch_end" in c and j in records}
    if not jobs:
        return None
    phases = {j: p for j, p in ((j, job_phases(c, records[j])) for j, c in jobs.items()) if p is not None}
    if not phases:
        return None
    last = max(phases, key=lambda j: jobs[j]["fetch_end"])
    start, end = rnd["end"] - rnd["seconds"], rnd["end"]
    p = phases[last]
    critical = {"to_received": p["upload"] + (jobs[last]["submit_start"] - start), "queue": p["queue"],
                "worker": p["worker"], "worker_wait": p["worker_wait"], "load": p["load"], "train": p["train"],
                "eval": p["eval"], "worker_other": p["worker_other"], "release": p["release"],
                "signoff": p["signoff"], "fetch": p["fetch"], "verify": p["verify"],
                "after": end - jobs[last]["fetch_end"], "evaluate": rnd["evaluate_s"]}
    per_job = {k: statistics.median(v[k] for v in phases.values()) for k in next(iter(phases.values()))}
    starts = [records[j]["timings"]["started"] for j in phases]
    per_job["start_skew"] = max(starts) - min(starts)  # first to last Worker job start
    return {"critical": critical, "per_job_median": per_job}


def _median_dicts(rows: list[dict[str, float]]) -> dict[str, float] | None:
    rows = [r for r in rows if r]
    if not rows:
        return None
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


# -- one N ------------------------------------------------------------------------------------------------------------


def _add_dataset(home_dir: Path, name: str, x: Any, y: Any) -> None:
    from hivecell.node.dataset import encode_tensors, make_record
    from hivecell.node.home import Home
    from hivecell.node.store import Store

    home = Home(home_dir)
    identity, _ = home.init()
    record = make_record(name=name, features=x, labels=y, feature_names=[], tags=["digits"], owner=identity.peer_id,
                         description=f"fedavg-digits shard {name}")
    with Store.open(home.store_path) as store:
        store.add_dataset(record, encode_tensors(x, y))


def _stop_all(daemons: list[Any]) -> None:
    for d in daemons:  # SIGTERM to all first, so they stop side by side
        if d.alive():
            try:
                d.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    for d in daemons:
        d.stop()


def _read_jobs(homes: list[Path]) -> dict[str, dict[str, Any]]:
    from hivecell.node.home import Home
    from hivecell.node.store import Store

    out = {}
    for h in homes:
        with Store.open(Home(h).store_path) as store:
            out.update({j["id"]: j for j in store.list_jobs()})
    return out


def run_n(n: int, rounds: int, *, root: Path, settle: bool, warm: int, lane_threshold: int | None = None,
          update: str = "full") -> dict[str, Any]:
    import torch

    from hivecell.node.demo import fedavg_digits
    from hivecell.node.federate import FederationConfig, federate, torch_evaluator
    from hivecell.node.localnet import start_daemon
    from hivecell.node.plan import build_plan
    from hivecell.node.zoo import FedDigitsCNN, digits_example_input

    shards, (x_test, y_test) = fedavg_digits(n)
    torch.manual_seed(0)
    recipe = RECIPE if update == "full" else dict(RECIPE, update=update)
    plan = build_plan(FedDigitsCNN(), digits_example_input(), recipe)
    out: dict[str, Any] = {"nodes": n, "rounds": rounds, "update": update,
                           "spare_refill_s": None, "spare_refill_complete": None,
                           "loadavg_before": [round(v, 2) for v in os.getloadavg()],
                           "samples_per_node": sorted({int(len(y)) for _, y in shards}),
                           "baseline_local_epoch_s": _r(plain_epoch_s(*shards[0])),
                           "baseline_worker_fn_epoch_s": _r(worker_fn_epoch_s(plan, *shards[0]))}
    homes = []
    for i, (x, y) in enumerate(shards):
        homes.append(root / f"n{n}-{i}")
        _add_dataset(homes[-1], f"digits-{i}", x, y)

    daemons: list[Any] = []
    history: list[Any] = []
    extra: list[dict[str, Any]] = []  # per round: end time, evaluate seconds
    clock = JobClock()
    evaluate = torch_evaluator(FedDigitsCNN, x_test, y_test)
    eval_s: list[float] = []

    def timed_evaluate(weights: bytes) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            return evaluate(weights)
        finally:
            eval_s.append(time.perf_counter() - t0)

    cpu: list[dict[str, float]] = []  # snapshots: before round 1, then after every round

    def on_round(record: Any) -> None:
        # federate calls this after the round's time is taken and before the next round starts, so what is done here
        # (blocking the coordinator's loop) counts in no round
        extra.append({"round": record.round, "seconds": record.seconds, "end": time.time(),
                      "evaluate_s": eval_s[-1] if eval_s else 0.0})
        if record.round == 1 and rounds > 1 and settle:
            # After round 1 each node starts a replacement spare (its job claimed the warm one), which imports torch:
            # N imports at once on a shared box would bleed into every later round, so wait until they are done, but
            # not so long that the nodes let their parked Workers go (idle REUSE_IDLE_S since their round-1 job).
            cap = max(0.0, REUSE_IDLE_S - record.seconds - 10.0)
            waited, done = wait_settled(pids, warm=warm, timeout=cap)
            out["spare_refill_s"], out["spare_refill_complete"] = _r(waited, 2), done
        cpu.append(cpu_snapshot(pids, sampler.cpu_s))
        history.append(record)
        clock.round = record.round + 1
        _log(f"N={n} round {record.round}/{rounds}: {record.seconds:.2f} s, slowest train "
             f"{record.slowest_train_s:.2f} s, overhead {record.seconds - record.slowest_train_s:.2f} s, "
             f"{len(record.accepted)}/{len(record.participants)} accepted, accuracy {record.accuracy:.3f}")

    config = FederationConfig(rounds=rounds, min_nodes=n, deadline_s=DEADLINE_S, strategy="fedavg", tag="digits")
    flags = ["--warm-workers", str(warm), "--worker-threads", "1"]
    if lane_threshold is not None:  # both ways: the coordinator's weights and the nodes' results
        config = replace(config, lane_threshold=lane_threshold)
        flags += ["--lane-threshold", str(lane_threshold)]
        out["lane_threshold"] = lane_threshold
    try:
        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=n)
        futures = [pool.submit(start_daemon, h, *flags) for h in homes]
        try:
            wait(futures)
        finally:  # even on Ctrl-C: let every start that began end, and keep each daemon that came up for the stop
            pool.shutdown(wait=True, cancel_futures=True)
            daemons.extend(f.result() for f in futures if not f.cancelled() and f.exception() is None)
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            raise errors[0]
        out["daemon_start_s"] = _r(time.perf_counter() - t0, 2)
        _log(f"N={n}: {n} daemons up in {out['daemon_start_s']} s")
        pids = [d.process.pid for d in daemons]
        with RssSampler(pids) as sampler:
            out["spares_settle_s"] = _r(wait_settled(pids, warm=warm)[0], 2) if settle else None
            cpu.append(cpu_snapshot(pids, sampler.cpu_s))
            with clock.installed():
                t0 = time.perf_counter()
                result = trio.run(lambda: federate([d.address for d in daemons], plan, config=config,
                                                   evaluate=timed_evaluate, on_round=on_round))
                out["federation_s"] = _r(time.perf_counter() - t0, 2)
    finally:
        _stop_all(daemons)
    records = _read_jobs(homes)

    hist = result.history
    rs = [r.seconds for r in hist]
    tr = [r.slowest_train_s for r in hist]
    ov = [a - b for a, b in zip(rs, tr)]
    steady = slice(1, None) if len(hist) > 1 else slice(0, None)
    breakdowns = [round_breakdown(e, clock.jobs, records) for e in extra]
    moved = [r.bytes_sent + r.bytes_received for r in hist]
    cpu_rounds = [{k: b[k] - a[k] for k in a} for a, b in zip(cpu, cpu[1:])]
    cpu_steady = _median_dicts(cpu_rounds[steady]) or {}
    out.update({
        "round1_s": _r(rs[0]), "round1_slowest_train_s": _r(tr[0]), "round1_overhead_s": _r(ov[0]),
        "round_s_median": _median(rs[steady]), "slowest_train_s_median": _median(tr[steady]),
        "overhead_s_median": _median(ov[steady]),
        "round_s_per_round": [_r(v) for v in rs], "slowest_train_s_per_round": [_r(v) for v in tr],
        "overhead_s_per_round": [_r(v) for v in ov],
        "bytes_per_round": int(statistics.median(moved)),
        "bytes_per_round_per_node": int(statistics.median(moved)) // n,
        "plan_bytes": len(plan.program) + len(plan.weights),
        "peak_rss_mb_per_node": sampler.summary(),
        "cpu_s_per_round": {"coordinator": cpu_steady.get("coordinator"), "daemons": cpu_steady.get("daemons"),
                            "workers": cpu_steady.get("workers"),
                            "daemon_per_node": _r(cpu_steady["daemons"] / n) if cpu_steady else None,
                            "workers_per_node": _r(cpu_steady["workers"] / n) if cpu_steady else None,
                            "total": _r(sum(cpu_steady.values())) if cpu_steady else None,
                            "total_per_round": [_r(sum(c.values()), 2) for c in cpu_rounds],
                            "sampler_thread_total": _r(sampler.cpu_s, 2)},
        "accepted_min": min(len(r.accepted) for r in hist),
        "accuracy_per_round": [_r(r.accuracy) for r in hist], "final_accuracy": _r(hist[-1].accuracy),
        "overhead_breakdown": {
            "critical_path_round1_s": _median_dicts([breakdowns[0]["critical"]] if breakdowns[0] else []),
            "critical_path_median_s": _median_dicts([b["critical"] for b in breakdowns[steady] if b]),
            "per_job_median_s": _median_dicts([b["per_job_median"] for b in breakdowns[steady] if b]),
        },
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    })
    return out


def run_lane_effect(n: int, rounds: int, *, root: Path, warm: int, settle: bool = True) -> dict[str, Any]:
    """The bulk lane's effect on a round with a model of about 25 MB (:class:`WideDigitsCNN`): the same N daemons run
    one federation with the lane (weights and updates above 1 MiB pulled over TLS 1.3 bound to the peer ids) and one
    without (``FederationConfig(lane=False)``: everything inline on libp2p streams), alternately, ``rounds`` rounds
    each after a one-round warm-up; one coordinator identity throughout, so each node's parked Worker serves every
    federation and no federation pays a Worker start. Reports medians over the rounds of each mode."""
    import torch

    from hivecell.crypto.identity import Identity
    from hivecell.node.demo import fedavg_digits
    from hivecell.node.federate import FederationConfig, federate
    from hivecell.node.localnet import start_daemon
    from hivecell.node.plan import build_plan
    from hivecell.node.zoo import WideDigitsCNN, digits_example_input

    shards, _ = fedavg_digits(n)
    torch.manual_seed(0)
    plan = build_plan(WideDigitsCNN(), digits_example_input(), RECIPE)
    homes = []
    for i, (x, y) in enumerate(shards):
        homes.append(root / f"lane-n{n}-{i}")
        _add_dataset(homes[-1], f"digits-{i}", x, y)
    identity = Identity.generate()
    daemons: list[Any] = []
    per_mode: dict[str, list[Any]] = {"lane": [], "stream": []}
    coordinator_log: list[str] = []  # the coordinator's own retried or fallen-back transfers

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            coordinator_log.append(f"{time.strftime('%H:%M:%S')} {record.getMessage()}"[:300])

    handler = Collect(level=logging.INFO)
    for name in ("hivecell.mesh.blob", "hivecell.mesh.lane"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            daemons.extend(pool.map(lambda h: start_daemon(h, "--warm-workers", str(warm), "--worker-threads", "1"),
                                    homes))
        pids = [d.process.pid for d in daemons]
        if settle:
            wait_settled(pids, warm=warm)
        addresses = [d.address for d in daemons]

        seeds = iter(range(1, 1_000_000))

        def one(lane: bool, r: int) -> list[Any]:
            # fresh initial weights each time (same program, so the parked Workers serve it): as in a real round,
            # no node holds the round's weights yet, so the lane mode gets no help from deduplication
            round_plan = replace(plan, weights=_reseeded_weights(plan.weights, next(seeds)))
            config = FederationConfig(rounds=r, min_nodes=n, deadline_s=DEADLINE_S, strategy="fedavg", tag="digits",
                                      lane=lane)
            return trio.run(lambda: federate(addresses, round_plan, config=config, identity=identity)).history

        one(True, 1)  # warm-up: every node's Worker starts and parks; not counted
        if settle:  # the warm-up's jobs took the spares: let their replacements import torch
            wait_settled(pids, warm=warm)
        for i in range(rounds):  # alternate, so that drift on the shared box spreads over both modes
            for mode in (("lane", "stream") if i % 2 == 0 else ("stream", "lane")):
                record = one(mode == "lane", 1)[0]
                per_mode[mode].append(record)
                _log(f"lane effect N={n} {mode}: round {record.seconds:.2f} s, slowest train "
                     f"{record.slowest_train_s:.2f} s, overhead {record.seconds - record.slowest_train_s:.2f} s")
        lane_stats = _lane_counters(homes)
        # transfers that failed and were retried or fell back, as the nodes logged them
        lines = [line for d in daemons for line in d.log_tail(2_000_000).splitlines()
                 if "retrying" in line or "unavailable" in line]
    finally:
        _stop_all(daemons)

    def summary(records: list[Any]) -> dict[str, Any]:
        return {"round_s_median": _median([r.seconds for r in records]),
                "slowest_train_s_median": _median([r.slowest_train_s for r in records]),
                "overhead_s_median": _median([r.seconds - r.slowest_train_s for r in records]),
                "overhead_s": [_r(r.seconds - r.slowest_train_s) for r in records],
                "bytes_per_round": int(statistics.median(r.bytes_sent + r.bytes_received for r in records)),
                "accepted_min": min(len(r.accepted) for r in records)}

    lane, stream = summary(per_mode["lane"]), summary(per_mode["stream"])
    out = {"nodes": n, "rounds_per_mode": rounds, "model": "WideDigitsCNN", "weights_bytes": len(plan.weights),
           "lane": lane, "stream": stream, "node_lane_counters": lane_stats,
           "node_log_transfer_retries": [line[-300:] for line in lines[:20]],
           "coordinator_log_transfer_retries": coordinator_log[:20]}
    if lane["overhead_s_median"] and stream["overhead_s_median"]:
        out["overhead_stream_over_lane"] = round(stream["overhead_s_median"] / lane["overhead_s_median"], 2)
        out["overhead_saved_s"] = _r(stream["overhead_s_median"] - lane["overhead_s_median"])
    return out


def _reseeded_weights(weights: bytes, seed: int) -> bytes:
    """The same tensors (names, shapes, dtypes), scaled by a factor drawn from ``seed``: other bytes, same model."""
    from hivecell.node.federate import decode_weights, encode_weights

    scale = 1.0 + 0.01 * (seed % 97) / 97
    return encode_weights({k: (v * scale).astype(v.dtype) for k, v in decode_weights(weights).items()})


def _lane_counters(homes: list[Path]) -> dict[str, int]:
    """The nodes' bulk-lane counters (from each daemon's peers.json), summed: how the weights and updates moved."""
    total: dict[str, int] = {}
    for home in homes:
        try:
            stats = json.loads((home / "peers.json").read_text()).get("lane", {}).get("stats", {})
        except (OSError, ValueError):
            continue
        for key, value in stats.items():  # transfers by way, bytes, fallbacks, stalls, busy answers, ...
            total[key] = total.get(key, 0) + int(value)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16], help="node counts (default 4 8 16)")
    parser.add_argument("--rounds", type=int, nargs="+", default=None,
                        help="rounds per federation: one value for every N, or one per --nodes value (default 6, and "
                             "10 from N = 16 on, where the spare refill after round 1 outlasts a few rounds)")
    parser.add_argument("--warm-workers", type=int, default=1, help="each daemon's --warm-workers (default 1)")
    parser.add_argument("--no-settle", action="store_true",
                        help="do not wait for the warm spares to be ready, before round 1 and after it")
    parser.add_argument("--lane-effect", type=int, nargs=2, default=[4, 4], metavar=("NODES", "ROUNDS"),
                        help="the bulk lane's effect with a 25 MB model: NODES daemons, ROUNDS rounds with the lane "
                             "and as many without (default 4 4; 0 0 skips it)")
    parser.add_argument("--only-lane-effect", action="store_true", help="measure only the lane's effect")
    parser.add_argument("--update", choices=UPDATE_ENCODINGS, default="full",
                        help="how nodes send updates (recipe `update`): full float32 weights, or the change from the "
                             "round's weights in fp16, bf16 or int8 (default full)")
    parser.add_argument("--lane-threshold", type=int, default=None, metavar="BYTES",
                        help="weights and results above BYTES go on the bulk lane, in the coordinator and the nodes "
                             "(default: the product's, 1 MiB, which keeps the digits CNN's 0.6 MB inline)")
    args = parser.parse_args()
    if args.only_lane_effect:
        args.nodes = []
    if args.rounds is None:
        args.rounds = [10 if n >= 16 else 6 for n in args.nodes]
    if len(args.rounds) not in (1, len(args.nodes)) and args.nodes:
        parser.error("--rounds takes one value or one per --nodes value")
    if any(n < 1 for n in args.nodes) or any(r < 1 for r in args.rounds):
        parser.error("--nodes and --rounds must be positive")
    rounds = args.rounds * len(args.nodes) if len(args.rounds) == 1 else args.rounds

    def on_term(signum: int, frame: Any) -> None:  # SIGTERM cleans up as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    import torch

    from hivecell.node.demo import fedavg_digits

    torch.set_num_threads(1)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "fedavg_rounds", "model": "FedDigitsCNN", "recipe": RECIPE, "strategy": "fedavg",
        "rounds": dict(zip(map(str, args.nodes), rounds)), "warm_workers": args.warm_workers, "worker_threads": 1,
        "cpus": os.cpu_count(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    (whole_train,), _ = fedavg_digits(1)  # one node: the whole training split
    report["baseline_full_train_epoch_s"] = _r(plain_epoch_s(*whole_train))
    results = []
    with tempfile.TemporaryDirectory(prefix="hivecell-fedbench-") as tmp:
        for n, r in zip(args.nodes, rounds):
            results.append(run_n(n, r, root=Path(tmp), settle=not args.no_settle, warm=args.warm_workers,
                                 lane_threshold=args.lane_threshold, update=args.update))
        lane_n, lane_rounds = args.lane_effect
        if lane_n > 0 and lane_rounds > 0:
            report["lane_effect"] = run_lane_effect(lane_n, lane_rounds, root=Path(tmp), warm=args.warm_workers,
                                                    settle=not args.no_settle)
    report["results"] = results
    if not results:
        report["bench_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(report, indent=2))
        return
    report["baseline_local_epoch_s"] = {str(x["nodes"]): x["baseline_local_epoch_s"] for x in results}
    report["goal"] = GOAL
    by_n = {x["nodes"]: x for x in results}
    at8 = by_n.get(8, {}).get("overhead_s_median")
    small, large = min(by_n), max(by_n)
    growth = None
    if large > small and by_n[small]["overhead_s_median"] and by_n[small]["overhead_s_median"] > 0:
        growth = round(by_n[large]["overhead_s_median"] / by_n[small]["overhead_s_median"] / (large / small), 3)
    report["overhead_growth"] = growth
    report["overhead_growth_nodes"] = [small, large]
    report["meets_goal"] = (None if at8 is None else
                            at8 <= GOAL["overhead_s_at_8_max"]
                            and (growth is None or growth <= GOAL["overhead_growth_max"]))
    report["coordinator_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["torch"] = torch.__version__
    report["bench_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
