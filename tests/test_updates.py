"""Compressed updates (recipe ``update``: ``fp16``, ``bf16``, ``int8``): a node sends the change from the round's weights in
fewer bytes, and the coordinator rebuilds the trained weights before screening and aggregating them.

Unit tests on real tensors for the encoding's error bounds, sizes and refusals, and a federation over real daemons
that compares an int8 round with a full-precision one from the same weights and seeds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from safetensors.torch import save

from hivecell.node.demo import fedavg_digits
from hivecell.node.federate import FederationConfig, decode_weights, federate
from hivecell.node.home import Home
from hivecell.node.localnet import start_daemon
from hivecell.node.plan import (
    PlanError,
    apply_update,
    build_plan,
    decode_update,
    encode_update,
    update_encoding,
    validate_recipe,
)
from hivecell.node.strategy import Update, screen_updates
from hivecell.node.zoo import FedDigitsCNN, digits_example_input

from conftest import add_dataset


class WithBatchNorm(torch.nn.Module):
    """Has an integer buffer (``num_batches_tracked``), which is sent whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _trained(model: torch.nn.Module, scale: float = 0.01) -> tuple[dict, dict]:
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {k: (v + scale * torch.randn_like(v)) if v.is_floating_point() else v + 7 for k, v in start.items()}
    return start, trained


def _numpy(state: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


HALF_BITS = {"fp16": 11, "bf16": 8}  # significant bits: the rounding error is at most 2**-bits of a value


@pytest.mark.parametrize("encoding", ["fp16", "bf16", "int8"])
def test_the_trained_weights_come_back_within_the_encodings_error(encoding: str) -> None:
    start, trained = _trained(WithBatchNorm())
    out = decode_update(encode_update(start, trained, encoding), _numpy(start), encoding)
    assert set(out) == set(trained)
    for name, tensor in trained.items():
        got, want = out[name], tensor.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if not tensor.is_floating_point():
            assert np.array_equal(got, want), name  # integer buffers travel whole
            continue
        delta = np.abs(want - start[name].numpy()).max()
        # fp16/bf16: 11/8 significant bits of the change; int8: half a step of max|change| / 127
        bound = delta * (2.0 ** -HALF_BITS[encoding] if encoding in HALF_BITS else 0.5 / 127) + 1e-7
        assert np.abs(got - want).max() <= bound, name


def test_fp16_and_bf16_halve_and_int8_quarters_the_bytes() -> None:
    start, trained = _trained(FedDigitsCNN())
    full = len(save(trained))
    assert full > 500_000
    assert len(encode_update(start, trained, "fp16")) < 0.51 * full
    assert len(encode_update(start, trained, "bf16")) < 0.51 * full
    assert len(encode_update(start, trained, "int8")) < 0.26 * full


def test_bf16_keeps_the_tiny_changes_that_fp16_loses() -> None:
    """Changes of 1e-8 to 1e-5 (a small learning rate's steps) to float32 weights: fp16 flushes those under 3e-8 to
    zero (and keeps few bits of those under 6e-5), bf16 keeps 8 bits of every one, as it has float32's range."""
    start, _ = _trained(WithBatchNorm())
    torch.manual_seed(1)
    trained = {}
    for name, tensor in start.items():
        if tensor.is_floating_point():
            magnitude = 10.0 ** torch.empty_like(tensor).uniform_(-8, -5)
            trained[name] = tensor + magnitude * torch.sign(torch.randn_like(tensor))
        else:
            trained[name] = tensor
    base = _numpy(start)
    want, first = trained["fc.weight"].numpy(), base["fc.weight"]
    change = want - first  # exact in float32: the change that encode_update sees
    assert (change != 0).all()
    vanished = {}
    for encoding in ("bf16", "fp16"):
        got = decode_update(encode_update(start, trained, encoding), base, encoding)["fc.weight"]
        vanished[encoding] = float(((got == first) & (change != 0)).mean())
        if encoding == "bf16":  # 8 bits of the change, then float32's own rounding of the sum
            assert (np.abs(got - want) <= np.abs(change) * 2.0**-8 + np.spacing(np.abs(want)) / 2).all()
    assert vanished["bf16"] == 0.0
    assert vanished["fp16"] > 0.1  # about 16% of the changes are under 3e-8 here


@pytest.mark.parametrize("encoding", ["fp16", "bf16", "int8"])
def test_a_diverged_update_stays_non_finite_and_is_screened_out(encoding: str) -> None:
    start, trained = _trained(WithBatchNorm())
    trained["fc.weight"][0, 0] = float("nan")
    base = _numpy(start)
    out = decode_update(encode_update(start, trained, encoding), base, encoding)
    assert not np.isfinite(out["fc.weight"]).all()
    honest = decode_update(encode_update(*_trained(WithBatchNorm()), encoding), base, encoding)
    accepted, refused = screen_updates(base, [Update(node="bad", weights=out, num_samples=10, metrics={}),
                                              Update(node="good", weights=honest, num_samples=10, metrics={})])
    assert [u.node for u in accepted] == ["good"] and "non-finite" in refused["bad"]


def test_updates_that_do_not_fit_the_model_are_refused() -> None:
    start, trained = _trained(WithBatchNorm())
    base = _numpy(start)
    good = encode_update(start, trained, "int8")
    tensors = np_load(good)

    def refused(data: bytes, encoding: str = "int8") -> str:
        with pytest.raises(ValueError) as err:
            decode_update(data, base, encoding)
        return str(err.value)

    assert "not encoded as fp16" in refused(good, "fp16")
    assert "not encoded as int8" in refused(np_save(tensors))  # no metadata
    assert "missing ['fc.weight']" in refused(np_save({k: v for k, v in tensors.items() if k != "fc.weight"},
                                                      metadata={"hivecell.update": "int8"}))
    assert "unexpected ['extra']" in refused(np_save({**tensors, "extra": np.zeros(1, np.int8)},
                                                     metadata={"hivecell.update": "int8"}))
    assert "wrong dtype or shape ['fc.weight.q8scale']" in refused(np_save(
        {**tensors, "fc.weight.q8scale": np.ones(2, np.float32)}, metadata={"hivecell.update": "int8"}))
    assert "wrong dtype or shape ['fc.bias']" in refused(np_save(
        {**tensors, "fc.bias": tensors["fc.bias"].astype(np.int16)}, metadata={"hivecell.update": "int8"}))
    assert "malformed" in refused(b"\x10" + good[1:])  # a header length that does not fit
    assert "malformed" in refused(b"not safetensors")


def test_the_recipe_names_the_encoding() -> None:
    assert validate_recipe({"update": "int8"}).to_dict()["update"] == "int8"
    assert validate_recipe({"update": "full"}).to_dict() == validate_recipe({}).to_dict()  # plans hash as before
    assert validate_recipe({"update": "bf16"}).to_dict()["update"] == "bf16"
    with pytest.raises(PlanError, match="update must be one of full, fp16, bf16, int8"):
        validate_recipe({"update": "int4"})
    with pytest.raises(PlanError, match="update is a training key"):
        validate_recipe({"kind": "evaluate", "update": "fp16"})


@pytest.mark.parametrize("encoding", ["fp16", "bf16"])
def test_apply_update_rebuilds_the_weights_a_job_trained(encoding: str) -> None:
    start, trained = _trained(WithBatchNorm())
    weights = save(start)
    update = encode_update(start, trained, encoding)
    assert update_encoding(update) == encoding
    assert update_encoding(weights) == "full" and update_encoding(b"x") == "full"
    rebuilt = decode_weights(apply_update(weights, update, encoding))
    assert np.abs(rebuilt["conv.weight"] - trained["conv.weight"].numpy()).max() < 2e-4


@pytest.mark.slow
async def test_int8_and_bf16_rounds_land_where_a_full_round_does(tmp_path: Path) -> None:
    shards, _ = fedavg_digits(2)
    daemons = []
    try:
        for i, (x, y) in enumerate(shards):
            home = Home(tmp_path / f"n{i}")
            add_dataset(home, f"digits-{i}", x[:150], y[:150], tags=("digits",))
            daemons.append(start_daemon(home.path, "--warm-workers", "1", "--worker-threads", "1"))
        torch.manual_seed(0)
        recipe = {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 16, "eval_fraction": 0.0, "metrics": []}
        full_plan = build_plan(FedDigitsCNN(), digits_example_input(), recipe)
        int8_plan = build_plan(FedDigitsCNN(), digits_example_input(), dict(recipe, update="int8"))
        int8_plan = replace(int8_plan, weights=full_plan.weights)
        bf16_plan = replace(build_plan(FedDigitsCNN(), digits_example_input(), dict(recipe, update="bf16")),
                            weights=full_plan.weights)
        config = FederationConfig(rounds=1, min_nodes=2, deadline_s=300)
        addresses = [d.address for d in daemons]
        full = await federate(addresses, full_plan, config=config)
        small = await federate(addresses, int8_plan, config=config)
        half = await federate(addresses, bf16_plan, config=config)
    finally:
        for d in daemons:
            d.stop()
    (f,), (s,), (h,) = full.history, small.history, half.history
    assert f.applied and s.applied and len(s.accepted) == 2 and not s.dropped
    assert h.applied and len(h.accepted) == 2 and not h.dropped
    assert s.bytes_received < 0.27 * f.bytes_received  # what came back from the nodes
    assert h.bytes_received < 0.51 * f.bytes_received
    start = decode_weights(full_plan.weights)
    g_full = decode_weights(full.weights)
    moved = np.sqrt(sum(((g_full[k] - start[k]) ** 2).sum() for k in start))
    assert moved > 0
    # Same start, same seeds: the same round, up to the encoding's rounding (bf16: 2**-8 of each change).
    for result, bound in ((small, 0.02), (half, 0.01)):
        g = decode_weights(result.weights)
        assert np.sqrt(sum(((g[k] - g_full[k]) ** 2).sum() for k in start)) < bound * moved
