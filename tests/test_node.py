"""The data-centric workflow end to end against a real daemon: train, verify, and every kind of bad input."""

from __future__ import annotations

import hashlib
import pickle
import struct
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import trio

from hivecell.crypto.identity import Identity
from hivecell.crypto.record import seal
from hivecell.crypto.signoff import SignOff, sign_signoff
from hivecell.mesh.frame import read_frame
from hivecell.mesh.host import RemoteError
from hivecell.mesh.message import ErrorCode
from hivecell.node.client import Client, JobFailed, ResultRejected
from hivecell.node.release import encode_result
from hivecell.node.store import Store
from hivecell.node.wire import DATASET_PROTOCOL, JOB_DOMAIN, JOB_PROTOCOL, JobAccepted, SubmitJob

from conftest import CANARY, home_of

pytestmark = pytest.mark.slow


async def _still_serving(client: Client) -> None:
    names = {d.name for d in await client.datasets()}
    assert {"digits", "digits-manual", "canary", "digits-budget"} <= names


def _request(identity: Identity, node: str, plan, *, dataset: str = "digits", recipe=None, ttl: float = 300,
             now: float | None = None, job_id: str | None = None, plan_hash: str | None = None) -> bytes:
    return seal(identity, JOB_DOMAIN, {
        "job_id": job_id or hashlib.md5(str(time.time_ns()).encode()).hexdigest(), "node": node, "dataset": dataset,
        "plan_hash": plan_hash or plan.hash, "recipe": plan.recipe if recipe is None else recipe,
    }, ttl=ttl, now=now, with_nonce=True)


async def test_train_verify_and_use_the_model(node, plan_factory, digits):
    import torch

    from hivecell.node.zoo import DigitsCNN

    plan = plan_factory()
    seen = []
    async with Client.connect(node.address) as client:
        infos = {d.name: d for d in await client.datasets()}
        assert infos["digits"].owner == node.peer_id and infos["digits"].schema["num_samples"] == len(digits[0])
        result = await client.train("digits", plan, on_progress=seen.append, timeout=300)
    assert result.metrics["accuracy"] > 0.8
    assert result.signoff.node == node.peer_id and result.signoff.decision == "auto"
    assert result.signoff.plan_hash == plan.hash
    assert {s.state for s in seen} >= {"released"} and any(s.progress.get("epoch") for s in seen)
    # The weights are usable: load them into a fresh model and check it beats chance on data the node has.
    model = result.apply_to(DigitsCNN())
    x, y = digits
    with torch.no_grad():
        acc = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc > 0.8


async def test_a_job_with_an_int8_update_gives_the_trained_weights(node, plan_factory, digits):
    import torch

    from hivecell.node.plan import apply_update
    from hivecell.node.zoo import DigitsCNN

    plan = plan_factory(epochs=3, update="int8")
    async with Client.connect(node.address) as client:
        result = await client.train("digits", plan, timeout=300)
        bare = await client.result(result.job_id)  # without the plan the client cannot rebuild it, and says how
    assert len(result.weights) < 0.3 * len(plan.weights)  # a quarter of the bytes came back
    with pytest.raises(ValueError, match="apply_update"):
        bare.apply_to(DigitsCNN())
    assert apply_update(plan.weights, bare.weights, "int8") == apply_update(plan.weights, result.weights, "int8")
    model = result.apply_to(DigitsCNN())
    x, y = digits
    with torch.no_grad():
        acc = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc > 0.8 and acc == pytest.approx(result.metrics["accuracy"], abs=0.1)


@pytest.mark.parametrize("case, code", [
    ("unknown_recipe_key", ErrorCode.BAD_RECIPE),
    ("negative_lr", ErrorCode.BAD_RECIPE),
    ("negative_dp_noise", ErrorCode.BAD_RECIPE),
    ("unknown_dataset", ErrorCode.UNKNOWN_DATASET),
    ("expired", ErrorCode.EXPIRED),
    ("future", ErrorCode.EXPIRED),
    ("bad_signature", ErrorCode.BAD_SIGNATURE),
    ("signed_by_another_peer", ErrorCode.FORBIDDEN),
    ("wrong_node", ErrorCode.WRONG_NODE),
    ("plan_hash_mismatch", ErrorCode.BAD_PLAN),
    ("pickle_program", ErrorCode.BAD_PLAN),
    ("pickle_weights", ErrorCode.BAD_PLAN),
    ("pt2_archive", ErrorCode.BAD_PLAN),
])
async def test_bad_job_requests_are_refused_with_a_code(node, plan_factory, tmp_path, case, code):
    plan = plan_factory(epochs=1)
    program, weights, recipe = plan.program, plan.weights, None
    marker = tmp_path / "pwned"

    class Exploit:  # unpickling this runs code: it must never be unpickled
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    async with Client.connect(node.address) as client:
        me = client.host.identity
        kwargs = {}
        if case == "unknown_recipe_key":
            recipe = dict(plan.recipe, sneaky_python="import os")
        elif case == "negative_lr":
            recipe = dict(plan.recipe, lr=-1.0)
        elif case == "negative_dp_noise":
            recipe = dict(plan.recipe, dp={"noise_multiplier": -1.0, "max_grad_norm": 1.0, "delta": 1e-5})
        elif case == "unknown_dataset":
            kwargs["dataset"] = "no-such-data"
        elif case == "expired":
            kwargs.update(now=time.time() - 3600, ttl=60)
        elif case == "future":
            kwargs.update(now=time.time() + 3600)
        elif case == "signed_by_another_peer":
            me = Identity.generate()
        elif case == "wrong_node":
            pass
        elif case == "plan_hash_mismatch":
            kwargs["plan_hash"] = "0" * 64
        elif case == "pickle_program":
            program = pickle.dumps(Exploit())
        elif case == "pickle_weights":
            weights = pickle.dumps({"c1.weight": Exploit()})
        elif case == "pt2_archive":
            import io

            import torch

            from hivecell.node.zoo import DigitsCNN, digits_example_input
            buf = io.BytesIO()
            torch.export.save(torch.export.export(DigitsCNN(), (digits_example_input(),)), buf)
            program = buf.getvalue()
        if recipe is not None or case.startswith(("pickle", "pt2")):
            from hivecell.node.plan import plan_hash
            kwargs["plan_hash"] = plan_hash(program, weights, plan.recipe if recipe is None else recipe)
        target = Identity.generate().peer_id if case == "wrong_node" else node.peer_id
        request = _request(me, target, plan, recipe=recipe, **kwargs)
        if case == "bad_signature":
            request = request[:-3] + bytes(b ^ 0xFF for b in request[-3:])
        with pytest.raises(RemoteError) as err:
            await client.host.request(node.peer_id, JOB_PROTOCOL,
                                      SubmitJob(request=request, program=program, weights=weights),
                                      expect=JobAccepted)
        assert err.value.code == code, err.value
        await _still_serving(client)
    assert not marker.exists(), "code from the network ran"


async def test_replayed_request_is_refused(node, plan_factory):
    plan = plan_factory(epochs=1)
    async with Client.connect(node.address) as client:
        request = _request(client.host.identity, node.peer_id, plan)
        msg = SubmitJob(request=request, program=plan.program, weights=plan.weights)
        await client.host.request(node.peer_id, JOB_PROTOCOL, msg, expect=JobAccepted)
        with pytest.raises(RemoteError) as err:
            await client.host.request(node.peer_id, JOB_PROTOCOL, msg, expect=JobAccepted)
        assert err.value.code == ErrorCode.REPLAY
        await _still_serving(client)


@pytest.mark.parametrize("payload, code", [
    (b"\x00\x00\x00\x05garbg", ErrorCode.BAD_MESSAGE),
    (struct.pack(">I", 3) + msgpack.packb([1, 2]), ErrorCode.BAD_MESSAGE),
    (struct.pack(">I", 12) + msgpack.packb({"t": "sub", "request": 1}), ErrorCode.BAD_MESSAGE),
    (struct.pack(">I", 0xFFFFFFF0), ErrorCode.FRAME_TOO_LARGE),  # 4 GB announced; nothing more sent
])
async def test_garbage_and_oversized_frames(node, payload, code):
    async with Client.connect(node.address) as client:
        for protocol in (JOB_PROTOCOL, DATASET_PROTOCOL):
            async with client.host.raw_stream(node.peer_id, protocol) as stream:
                await stream.write(payload)
                with trio.fail_after(10):
                    reply = protocol.decode(await read_frame(stream, cap=1 << 20))
            assert reply.code == code
        await _still_serving(client)


async def test_tampered_signoffs_are_refused(node, plan_factory):
    plan = plan_factory(epochs=2)
    async with Client.connect(node.address) as client:
        await client.datasets()
        good = await client.train("digits", plan, timeout=300)
        job_id, result = good.job_id, encode_result(good.weights, good.metrics)
        client.verify(job_id, result, good.signoff_record)  # the untampered pair verifies

        other = Identity.generate()
        changed_weights = encode_result(good.weights[:-4] + b"\x00\x00\x80\x3f", good.metrics)
        fields = {**good.signoff.__dict__}
        forged_signer = sign_signoff(other, SignOff(**fields))
        forged_eps = sign_signoff(other, SignOff(**{**fields, "epsilon": 0.1}))
        flipped = bytearray(good.signoff_record)
        flipped[-10] ^= 0x01
        other_job = sign_signoff(other, SignOff(**{**fields, "job_id": "f" * 32}))
        node_key_for_other_node = sign_signoff(other, SignOff(**{**fields, "node": other.peer_id}))
        for res, so in [(changed_weights, good.signoff_record), (result, forged_signer), (result, forged_eps),
                        (result, bytes(flipped)), (result, other_job), (result, b"garbage"),
                        (result, node_key_for_other_node)]:
            with pytest.raises(ResultRejected):
                client.verify(job_id, res, so)
        with pytest.raises(ResultRejected, match="not submitted by this client"):
            client.verify("e" * 32, result, good.signoff_record)


async def test_manual_signoff_approve_and_reject(node, plan_factory):
    plan = plan_factory(epochs=2)
    home = home_of(node)
    async with Client.connect(node.address) as client:
        await client.datasets()
        t0 = time.monotonic()
        approved, none_yet = await client.submit_and_fetch("digits-manual", plan, wait_s=1)
        assert none_yet is None and time.monotonic() - t0 >= 1  # waited its second, then: not ready
        rejected = await client.submit("digits-manual", plan_factory(epochs=2, seed=1))  # another result
        for job_id in (approved, rejected):
            seen = []
            with trio.fail_after(300):
                while (await client.status(job_id, wait_s=5)).state != "awaiting_signoff":
                    seen.append(await client.status(job_id))
            # until the owner signs off, the scientist learns how far the job is, not the loss on private data
            assert any(s.progress.get("epoch") for s in seen) or not seen
            assert not any("loss" in s.progress for s in seen)
            with pytest.raises(RemoteError) as err:
                await client.result(job_id)
            assert err.value.code == ErrorCode.NOT_READY
            # the long polls wait for an end that an awaiting job has not reached, then say so
            t0 = time.monotonic()
            assert (await client.status(job_id, wait_s=1, until_done=True)).state == "awaiting_signoff"
            with pytest.raises(RemoteError) as err:
                await client.result(job_id, wait_s=1)
            assert err.value.code == ErrorCode.NOT_READY and time.monotonic() - t0 >= 2
        cli = [sys.executable, "-m", "hivecell.node.cli", "--home", str(home.path), "jobs"]
        await trio.run_process([*cli, "approve", approved])
        await trio.run_process([*cli, "reject", rejected, "--reason", "too revealing"])
        again = await trio.run_process([*cli, "approve", rejected], check=False, capture_stderr=True)
        assert again.returncode == 4 and b"withheld" in again.stderr
        result = await client.result(approved, wait_s=60)  # released by the approval: the long poll answers at once
        assert result.signoff.decision == "owner" and result.signoff.dataset == "digits-manual"
        assert (await client.wait(approved, timeout=60)).state == "released"
        status = await client.wait(rejected, timeout=60)
        assert status.state == "withheld" and "too revealing" in status.reason
        with pytest.raises(RemoteError) as err:
            await client.result(rejected, wait_s=30)
        assert err.value.code == ErrorCode.WITHHELD
    with Store.open(home.store_path) as store:  # a withheld result is deleted; the plan of a finished job too
        job = store.get_job(rejected)
        assert store.get_blob(job["result_hash"]) is None and store.get_blob(job["program_key"]) is None
        assert store.get_blob(store.get_job(approved)["result_hash"]) is not None


class _FiveClasses(torch.nn.Module):
    """Fewer classes than the digits have labels: its job fails in the Worker (bad_data)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], 64))


async def test_one_stream_per_job(node, plan_factory):
    """What a FedAvg round does on each node: submit, and the node answers on the same stream when the job is done."""
    from hivecell.node.plan import build_plan
    from hivecell.node.zoo import digits_example_input

    plan = plan_factory(epochs=1)
    async with Client.connect(node.address) as client:
        await client.datasets()
        streams = []
        conversation = client.host.conversation

        def counted(*args, **kwargs):  # every request opens one stream here (MeshHost.request too)
            streams.append(type(args[2]).__name__)
            return conversation(*args, **kwargs)

        client.host.conversation = counted  # a spy on the real host: every request still goes over the wire
        job_id, result = await client.submit_and_fetch("digits", plan, wait_s=30)
        assert result is not None, "a 1-epoch job ends well within one 30 s wait"
        assert streams == ["SubmitJob"]
        assert result.job_id == job_id and result.signoff.plan_hash == plan.hash and result.metrics["epochs"] == 1
        assert result.timings["train_s"] > 0 and result.timings["finished"] >= result.timings["started"]

        # the long-poll fetch gives the same verified result; Client.wait without progress is one request
        again = await client.result(job_id, wait_s=30)
        assert again.result_hash == result.result_hash and again.timings == result.timings
        status = await client.wait(job_id, timeout=30)
        assert status.state == "released"
        assert streams == ["SubmitJob", "FetchResult", "WatchJob"], streams

        # a job that fails in the Worker: the second answer says so
        failing = build_plan(_FiveClasses(), digits_example_input(), {"epochs": 1})
        with pytest.raises(JobFailed) as failed:
            await client.submit_and_fetch("digits", failing, wait_s=30)
        assert failed.value.state == "failed" and "classes" in failed.value.reason

        with pytest.raises(RemoteError) as err:
            await client.result("0" * 32, wait_s=30)
        assert err.value.code == ErrorCode.UNKNOWN_JOB


async def test_another_scientist_cannot_see_my_job(node, plan_factory):
    plan = plan_factory(epochs=1)
    async with Client.connect(node.address) as mine, Client.connect(node.address) as theirs:
        job_id = await mine.submit("digits", plan)
        for call in (theirs.status(job_id), theirs.result(job_id), theirs.status(job_id, wait_s=5, until_done=True),
                     theirs.result(job_id, wait_s=5)):
            with pytest.raises(RemoteError) as err:
                await call
            assert err.value.code == ErrorCode.UNKNOWN_JOB
        await mine.wait(job_id, timeout=300)


async def test_private_rows_never_leave_the_node(node, plan_factory):
    """Run a job on the dataset holding planted canary rows; no frame the node sent may contain them."""
    plan = plan_factory(epochs=2)
    async with Client.connect(node.address) as client:
        infos = {d.name: d for d in await client.datasets()}
        assert infos["canary"].mock["synthetic"] is True
        result = await client.train("canary", plan, timeout=300)
    canary = CANARY.tobytes()
    stored = (home_of(node).store_path / "data.mdb").read_bytes()
    assert canary[:32] in stored  # the canary really is in the private data, so the check below can fail
    tap = (home_of(node).path / "wire.tap").read_bytes()
    assert result.signoff_record in tap and len(tap) > 10_000  # the tap saw what the node sent
    for offset in range(0, len(canary) - 16, 16):
        assert canary[offset:offset + 16] not in tap


async def test_dp_job_signs_off_the_epsilon_it_spent(node, plan_factory):
    """A DP-SGD job is priced before it runs; the sign-off states that epsilon and delta, and the Worker agrees."""
    import math

    plan = plan_factory(epochs=2, dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5})
    seen = []
    async with Client.connect(node.address) as client:
        await client.datasets()
        result = await client.train("digits", plan, on_progress=seen.append, timeout=300)
    assert not any("loss" in s.progress for s in seen)  # DP noise does not cover the training loss
    assert math.isfinite(result.signoff.epsilon) and 0 < result.signoff.epsilon < 10
    assert result.signoff.delta == 1e-5
    assert result.metrics["epsilon"] == pytest.approx(result.signoff.epsilon, rel=1e-9)


async def test_budget_is_never_overspent(node, plan_factory, digits):
    """The budget fits two DP jobs: the third is refused before it runs, a job without DP too; the sign-offs state
    the budget left, and the ledger verifies."""
    from conftest import BUDGET_JOBS, DP_RECIPE, _dp_epsilon

    from hivecell.node.ledger import verify_chain

    eps = _dp_epsilon(len(digits[0]))
    plan = plan_factory(**{k: v for k, v in DP_RECIPE.items()})
    async with Client.connect(node.address) as client:
        await client.datasets()
        first = await client.submit("digits-budget", plan)
        second = await client.submit("digits-budget", plan)
        for bad in (plan, plan_factory(epochs=1)):  # over budget; and no DP on a DP-only dataset
            with pytest.raises(RemoteError) as err:
                await client.submit("digits-budget", bad)
            assert err.value.code == ErrorCode.BUDGET_EXCEEDED
        results = []
        for job_id in (first, second):
            assert (await client.wait(job_id, timeout=300)).state == "released"
            results.append(await client.result(job_id))
    for r in results:
        assert r.signoff.epsilon == pytest.approx(eps) and r.signoff.budget_left == pytest.approx(
            (BUDGET_JOBS - 2) * eps, abs=1e-9)
    with Store.open(home_of(node).store_path) as store:
        state = verify_chain(store.ledger_entries(), signer=node.peer_id)
    b = state.budget("digits-budget")
    assert b.spent == pytest.approx(2 * eps) and b.reserved == 0 and b.spent <= b.total
