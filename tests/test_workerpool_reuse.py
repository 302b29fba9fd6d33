"""Reusing a Worker across the rounds of one federation: real interpreters, real torch, a real LMDB store.

A job with a ``reuse_key`` leaves its worker parked; the next job with that key (and the same limits) runs on it, and
anything else (another key, a failed job, a CPU-time limit, an idle worker, a closing pool) ends in a fresh process.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch
import trio
from safetensors.torch import save

from hivecell.node.plan import Plan, apply_weights, build_plan, load_weights
from hivecell.node.workerpool import WorkerFailed, WorkerJob, WorkerLimits, open_worker_pool
from hivecell.node.zoo import DigitsCNN, digits_example_input

KEY = "scientist-a/digits/program-1"
LIMITS = WorkerLimits(wall_s=120, threads=1)


@pytest.fixture(scope="module")
def digits_plan() -> Plan:
    torch.manual_seed(0)
    return build_plan(DigitsCNN(), digits_example_input(),
                      {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 32, "seed": 1})


class FiveClasses(torch.nn.Module):
    """A classifier with fewer classes than the digits have labels: its job fails in the worker (bad_data)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], 64))


def _job(store: tuple[Path, str], plan: Plan, *, key: str | None, job_id: str, weights: bytes | None = None,
         recipe: dict | None = None) -> WorkerJob:
    path, data_key = store
    return WorkerJob(job_id=job_id, store_path=str(path), data_key=data_key, program=plan.program,
                     weights=plan.weights if weights is None else weights, recipe=recipe or plan.recipe,
                     reuse_key=key)


def _worker_pids() -> set[int]:
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            # (the zygote that forks them has the same command line; its name tells it apart)
            if "hivecell.node.worker" in " ".join(child.cmdline()) and child.name() != "hivecell-zygote":
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


async def _gone(pid: int) -> None:
    """Wait until the pool has reaped worker ``pid`` (a kill is immediate; the owner task reaps it just after)."""
    with trio.fail_after(60):
        while pid in _worker_pids():
            await trio.sleep(0.1)


def _state(weights: bytes) -> dict[str, torch.Tensor]:
    model = DigitsCNN()
    apply_weights(model, weights)
    return model.state_dict()


async def test_rounds_of_one_federation_share_a_worker(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    # An idle limit far above any job's time here: on a loaded box the cold "fresh" job below once took longer than
    # the default 60 s, and the parked worker was (rightly) let go before the last check.
    async with open_worker_pool(warm=0, reuse_idle_s=3600) as pool:
        first = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="round-1"), limits=LIMITS)
        assert first.timings["worker_reused"] == 0.0 and first.timings["worker_start_s"] > 0
        assert _worker_pids() == {first.worker_pid}  # parked: it waits for the next round

        # Round 2 starts from round 1's weights, as a federation's next round does.
        second = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="round-2", weights=first.weights),
                                    limits=LIMITS)
        assert second.worker_pid == first.worker_pid
        assert second.timings["worker_reused"] == 1.0 and second.timings["worker_start_s"] == 0.0
        assert second.metrics["train_samples"] == 1797 - 359 and second.metrics["epochs"] == 2
        assert second.metrics["accuracy"] > 0.8 and second.metrics["accuracy"] >= first.metrics["accuracy"] - 0.05

        # An evaluate job of the same federation runs on it too.
        evaluation = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="evaluate",
                                             weights=second.weights, recipe={"kind": "evaluate"}), limits=LIMITS)
        assert evaluation.worker_pid == first.worker_pid and evaluation.timings["worker_reused"] == 1.0
        assert evaluation.weights == b"" and evaluation.metrics["samples"] == 1797
        assert evaluation.metrics["accuracy"] > 0.8

        # Round 2 again in a process of its own computes the same weights: reuse changes nothing a job computes.
        fresh = await pool.run_job(_job(digits_store, digits_plan, key=None, job_id="round-2-fresh",
                                        weights=first.weights), limits=LIMITS)
        assert fresh.worker_pid != first.worker_pid and fresh.timings["worker_reused"] == 0.0
        assert fresh.metrics == second.metrics
        reused_state = _state(second.weights)
        for name, tensor in _state(fresh.weights).items():
            assert torch.equal(tensor, reused_state[name]), name
        assert _worker_pids() == {first.worker_pid}  # the job without a key had its worker exit after it
    assert _worker_pids() == set()


async def test_another_key_or_other_limits_get_another_worker(digits_store: tuple[Path, str],
                                                              digits_plan: Plan) -> None:
    quick = {**digits_plan.recipe, "epochs": 1}
    async with open_worker_pool(warm=0, max_parked=1) as pool:
        a = await pool.run_job(_job(digits_store, digits_plan, key="a", job_id="a", recipe=quick), limits=LIMITS)
        b = await pool.run_job(_job(digits_store, digits_plan, key="b", job_id="b", recipe=quick), limits=LIMITS)
        assert b.worker_pid != a.worker_pid and b.timings["worker_reused"] == 0.0
        await _gone(a.worker_pid)  # one parked worker at most: parking b's let a's go
        assert _worker_pids() == {b.worker_pid}
        # the same key with another memory limit: the parked worker's RLIMIT_DATA could not be raised for it
        bigger = WorkerLimits(wall_s=120, threads=1, memory_mb=LIMITS.memory_mb * 2)
        c = await pool.run_job(_job(digits_store, digits_plan, key="b", job_id="c", recipe=quick), limits=bigger)
        assert c.worker_pid not in {a.worker_pid, b.worker_pid} and c.timings["worker_reused"] == 0.0
        assert c.metrics["epochs"] == 1


async def test_a_failed_job_ends_its_worker(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    quick = {**digits_plan.recipe, "epochs": 1}
    too_few_classes = build_plan(FiveClasses(), digits_example_input(), quick)
    async with open_worker_pool(warm=0) as pool:
        ok = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="ok", recipe=quick), limits=LIMITS)
        assert _worker_pids() == {ok.worker_pid}

        # It runs on the parked worker, fails there, and that process is gone: it is never parked again.
        with pytest.raises(WorkerFailed) as failed:
            await pool.run_job(_job(digits_store, too_few_classes, key=KEY, job_id="bad"), limits=LIMITS)
        assert failed.value.code == "bad_data" and "classes" in failed.value.reason
        assert _worker_pids() == set()

        again = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="again", recipe=quick),
                                   limits=LIMITS)
        assert again.worker_pid != ok.worker_pid and again.timings["worker_reused"] == 0.0
        assert again.metrics["epochs"] == 1 and again.metrics["accuracy"] > 0.3

        # A job that fails in a fresh worker with a reuse key is not parked either.
        with pytest.raises(WorkerFailed) as failed:
            await pool.run_job(_job(digits_store, too_few_classes, key="other", job_id="bad-2"), limits=LIMITS)
        assert failed.value.code == "bad_data"
        assert _worker_pids() == {again.worker_pid}

        # The parked worker kept the loaded program; weights that do not fit it (a tensor of another shape, or other
        # tensors) fail there as in a fresh worker, and end it.
        tensors = load_weights(digits_plan.weights)
        reshaped = save(dict(tensors, **{name: torch.zeros(t.shape[0] + 1, *t.shape[1:])
                                         for name, t in list(tensors.items())[-1:]}))
        for job_id, weights in (("bad-3", reshaped), ("bad-4", too_few_classes.weights)):
            parked = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id=f"ok-{job_id}",
                                             recipe=quick), limits=LIMITS)
            assert _worker_pids() == {parked.worker_pid}
            with pytest.raises(WorkerFailed) as failed:
                await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id=job_id, recipe=quick,
                                        weights=weights), limits=LIMITS)
            assert failed.value.code == "bad_plan" and "do not match" in failed.value.reason
            assert _worker_pids() == set()


async def test_an_idle_parked_worker_is_let_go(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    quick = {**digits_plan.recipe, "epochs": 1}
    async with open_worker_pool(warm=0, reuse_idle_s=1) as pool:
        first = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="1", recipe=quick), limits=LIMITS)
        assert _worker_pids() == {first.worker_pid}
        await _gone(first.worker_pid)
        later = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="2", recipe=quick), limits=LIMITS)
        assert later.worker_pid != first.worker_pid and later.timings["worker_reused"] == 0.0


async def test_a_cpu_limited_job_is_never_parked(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    quick = {**digits_plan.recipe, "epochs": 1}
    cpu_limited = WorkerLimits(wall_s=120, threads=1, cpu_s=600)
    async with open_worker_pool(warm=0) as pool:
        limited = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="1", recipe=quick),
                                     limits=cpu_limited)
        assert limited.timings["worker_reused"] == 0.0
        assert _worker_pids() == set()  # RLIMIT_CPU counts the process's whole life: it exited after its job

        parked = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="2", recipe=quick), limits=LIMITS)
        again = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="3", recipe=quick),
                                   limits=cpu_limited)
        assert again.worker_pid != parked.worker_pid and again.timings["worker_reused"] == 0.0
        assert _worker_pids() == {parked.worker_pid}  # the parked worker still waits for a job it may serve


async def test_a_worker_serves_at_most_max_jobs(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    quick = {**digits_plan.recipe, "epochs": 1}
    async with open_worker_pool(warm=0, max_jobs_per_worker=2) as pool:
        first = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="1", recipe=quick), limits=LIMITS)
        second = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="2", recipe=quick), limits=LIMITS)
        assert second.worker_pid == first.worker_pid and second.timings["worker_reused"] == 1.0
        assert _worker_pids() == set()  # its second job was its last: it exited after it
        third = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="3", recipe=quick), limits=LIMITS)
        assert third.worker_pid != first.worker_pid and third.timings["worker_reused"] == 0.0


async def test_closing_the_pool_kills_parked_workers(digits_store: tuple[Path, str], digits_plan: Plan) -> None:
    quick = {**digits_plan.recipe, "epochs": 1}
    async with open_worker_pool(warm=1) as pool:
        result = await pool.run_job(_job(digits_store, digits_plan, key=KEY, job_id="1", recipe=quick),
                                    limits=LIMITS)
        # Parked workers are not spares: the keeper still holds its warm one beside the parked one.
        await pool.wait_warm()
        pids = _worker_pids()
        assert result.worker_pid in pids and len(pids) == 2
    assert _worker_pids() == set()  # killed and reaped, the parked one included
