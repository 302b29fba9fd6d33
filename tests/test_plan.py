"""Plans: recipe vocabulary, the program and weights audits (with real hostile payloads), hashing, round trips."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from hivecell.node.plan import (
    Plan,
    PlanError,
    Recipe,
    apply_weights,
    audit_program,
    audit_weights,
    build_plan,
    load_program,
    load_weights,
    plan_hash,
    reload_weights,
    to_eval_module,
    validate_recipe,
)
from hivecell.node.zoo import DigitsCNN, digits_example_input


@pytest.fixture(scope="module")
def digits_plan() -> tuple[DigitsCNN, Plan]:
    torch.manual_seed(0)
    model = DigitsCNN()
    return model, build_plan(model, digits_example_input(), {"lr": 0.01, "epochs": 3})


_DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


def _doc(plan: Plan) -> dict:
    return json.loads(plan.program)


def _first_node(doc: dict) -> dict:
    return doc["graph_module"]["graph"]["nodes"][0]


# -- recipe -----------------------------------------------------------------------------------------------------------


def test_recipe_defaults_classification() -> None:
    recipe = validate_recipe({})
    assert recipe == Recipe()
    assert recipe.to_dict() == {
        "task": "classification", "loss": "cross_entropy", "optimizer": "adam", "lr": 1e-3, "momentum": 0.0,
        "weight_decay": 0.0, "epochs": 1, "batch_size": 32, "metrics": ["accuracy", "loss"], "eval_fraction": 0.2,
        "seed": 0,
    }


def test_recipe_defaults_regression_and_full() -> None:
    assert validate_recipe({"task": "regression"}).to_dict()["loss"] == "mse"
    assert validate_recipe({"task": "regression"}).metrics == ("loss",)
    full = {"task": "classification", "loss": "mse", "optimizer": "sgd", "lr": 0.5, "momentum": 0.9,
            "weight_decay": 0.01, "epochs": 1000, "batch_size": 65536, "metrics": ["loss"], "eval_fraction": 0.0,
            "seed": 2**31 - 1}
    assert validate_recipe(full).to_dict() == {**full, "lr": 0.5}
    assert validate_recipe({"lr": 1}).lr == 1.0  # an int is a fine float


@pytest.mark.parametrize(
    ("recipe", "key"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": 0}, "lr"),
        ({"lr": 11.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 10**6}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"seed": False}, "seed"),
        ({"momentum": 1.0, "optimizer": "sgd"}, "momentum"),
        ({"momentum": 0.5}, "momentum"),  # adam has no momentum
        ({"weight_decay": 2}, "weight_decay"),
        ({"eval_fraction": 0.95}, "eval_fraction"),
        ({"task": "clustering"}, "task"),
        ({"loss": "hinge"}, "loss"),
        ({"task": "regression", "loss": "cross_entropy"}, "cross_entropy"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"metrics": ["f1"]}, "metrics"),
        ({"metrics": "accuracy"}, "metrics"),
        ({"task": "regression", "metrics": ["accuracy"]}, "accuracy"),
        ({"dp": True}, "dp"),
        ({"eval_fraction": 0.2, "dp": _DP}, "eval_fraction must be 0 under dp"),
        ({"metrics": ["accuracy"], "dp": _DP}, "metrics must be empty under dp"),
        ({"kind": "fit"}, "kind"),
    ],
)
def test_recipe_refused(recipe: dict, key: str) -> None:
    with pytest.raises(PlanError) as info:
        validate_recipe(recipe)
    assert info.value.code == "bad_recipe"
    assert key in info.value.message


def test_dp_training_recipe_evaluates_nothing() -> None:
    """Under dp every row trains and no metric is computed on private rows (an evaluate job measures the model)."""
    recipe = validate_recipe({"epochs": 2, "dp": _DP})
    assert recipe.eval_fraction == 0.0 and recipe.metrics == ()
    assert validate_recipe({"epochs": 2, "eval_fraction": 0, "metrics": [], "dp": _DP}) == recipe
    assert validate_recipe({"epochs": 2}).eval_fraction == 0.2  # without dp the default stays


def test_recipe_not_a_map() -> None:
    with pytest.raises(PlanError, match="bad_recipe"):
        validate_recipe(["lr", 0.1])


# -- program audit ----------------------------------------------------------------------------------------------------


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):  # noqa: D105 - the classic payload
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Evil())


def _refused(program: bytes) -> PlanError:
    with pytest.raises(PlanError) as info:
        audit_program(program)
    assert info.value.code == "bad_plan"
    return info.value


def test_audit_refuses_pickle_and_zip(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _evil_pickle(marker)
    _refused(payload)
    archive = BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model/models/model.json", b"{}")
        zf.writestr("model/data/weights/model.pt", payload)
    _refused(archive.getvalue())
    with pytest.raises(PlanError, match="bad_plan"):
        load_program(payload, payload)
    assert not marker.exists()


def test_audit_accepts_and_sanitizes(digits_plan: tuple[DigitsCNN, Plan]) -> None:
    _, plan = digits_plan
    doc = _doc(plan)
    node = _first_node(doc)
    node["metadata"] = {"stack_trace": "File x", "source_fn_stack": "conv,torch.serialization.os.system"}
    doc["guards_code"] = ["L['x'].size()[0] == 1"]
    clean = json.loads(audit_program(json.dumps(doc).encode()))
    assert _first_node(clean)["metadata"] == {}
    assert clean["guards_code"] == []


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.aten.from_file.default",
        "torch.serialization.os.system",
        "torch.ops.aten.conv2d.out",
        "#myext:evil",
        "torch.ops.higher_order.cond",
        "builtins.eval",
        "_operator.attrgetter",
    ],
)
def test_audit_refuses_targets(digits_plan: tuple[DigitsCNN, Plan], target: str) -> None:
    doc = _doc(digits_plan[1])
    _first_node(doc)["target"] = target
    _refused(json.dumps(doc).encode())


def test_audit_refuses_malicious_expr(digits_plan: tuple[DigitsCNN, Plan], tmp_path: Path) -> None:
    marker = tmp_path / "X"
    for expr in (f"__import__('os').system('touch {marker}')", "s0.func", "s0**s0", "9*9*Symbol('x')",
                 "Symbol('s0', positive=exec)", "lambda: 1", "s0[0]"):
        doc = _doc(digits_plan[1])
        values = doc["graph_module"]["graph"]["tensor_values"]
        sizes = values["x"]["sizes"]
        sizes[0] = {"as_expr": {"expr_str": expr, "hint": None}}
        _refused(json.dumps(doc).encode())
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["range_constraints"].update({"__import__('os')": {"min_val": 1, "max_val": 2}}),
                     id="range-key"),
        pytest.param(lambda d: d["graph_module"]["graph"].update(
            {"custom_obj_values": {"obj": {"class_fqn": "torch.classes.x"}}}), id="custom-obj"),
        pytest.param(lambda d: _first_node(d)["inputs"].append(
            {"name": "fn", "arg": {"as_operator": "torch.serialization.os.system"}}), id="as-operator"),
        pytest.param(lambda d: _first_node(d)["inputs"].append(
            {"name": "g", "arg": {"as_graph": {"name": "g", "graph": {}}}}), id="as-graph"),
        pytest.param(lambda d: d["graph_module"]["signature"]["input_specs"].append(
            {"tensor_constant": {"arg": {"name": "c"}, "tensor_constant_name": "c"}}), id="tensor-constant"),
        pytest.param(lambda d: _first_node(d)["outputs"][0]["as_tensor"].update(
            {"name": "a;import os;os.system('id')"}), id="name-injection"),
        pytest.param(lambda d: d["graph_module"]["module_call_graph"][0]["signature"].update(
            {"in_spec": json.dumps([1, {"type": "collections.defaultdict", "context": json.dumps(
                {"default_factory_module": "os", "default_factory_name": "system", "dict_context": []}),
                "children_spec": []}])}), id="treespec-import"),
        pytest.param(lambda d: d["graph_module"]["graph"]["tensor_values"]["x"]["device"].update(
            {"type": "privateuseone"}), id="device"),
        pytest.param(lambda d: d.update({"verifiers": ["custom"]}), id="verifier"),
    ],
)
def test_audit_refuses_structures(digits_plan: tuple[DigitsCNN, Plan], mutate) -> None:
    doc = _doc(digits_plan[1])
    mutate(doc)
    _refused(json.dumps(doc).encode())


def test_audit_refuses_garbage_and_oversize(digits_plan: tuple[DigitsCNN, Plan]) -> None:
    _refused(b"\xff\xfe not json")
    _refused(b"[]")
    _refused(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(PlanError, match="too large"):
        audit_program(digits_plan[1].program, max_bytes=100)


def test_audit_program_does_not_import_torch(digits_plan: tuple[DigitsCNN, Plan], tmp_path: Path) -> None:
    path = tmp_path / "program.json"
    path.write_bytes(digits_plan[1].program)
    code = (
        "import sys; from hivecell.node.plan import audit_program, audit_weights, plan_hash, validate_recipe;"
        f"audit_program(open({str(path)!r}, 'rb').read()); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- weights audit ----------------------------------------------------------------------------------------------------


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_weights_audit(tmp_path: Path) -> None:
    good = save({"a.weight": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.int64)})
    assert audit_weights(good) == {"a.weight": ("F32", (2, 3)), "b": ("I64", (4,))}
    marker = tmp_path / "pwned"
    for bad in (
        b"",
        b"garbage that is not safetensors",
        _evil_pickle(marker),
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, b"\0" * 16),  # out of range
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16),  # size mismatch
        _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),  # overlap
        _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),  # trailing bytes
        _safetensors({"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),  # dtype
        _safetensors({"__import__": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),  # name
        struct.pack("<Q", 1 << 60) + b"{}",  # header length beyond the buffer
    ):
        with pytest.raises(PlanError) as info:
            audit_weights(bad)
        assert info.value.code == "bad_plan"
    with pytest.raises(PlanError, match="too large"):
        audit_weights(good, max_bytes=10)
    assert not marker.exists()


# -- hashing ----------------------------------------------------------------------------------------------------------


def test_plan_hash_stable_and_sensitive() -> None:
    recipe = validate_recipe({}).to_dict()
    base = plan_hash(b"p", b"w", recipe)
    assert base == plan_hash(b"p", b"w", dict(reversed(list(recipe.items()))))
    assert len(base) == 64
    assert plan_hash(b"q", b"w", recipe) != base
    assert plan_hash(b"p", b"x", recipe) != base
    assert plan_hash(b"p", b"w", {**recipe, "epochs": 2}) != base
    assert Plan(b"p", b"w", recipe).hash == base


# -- round trips ------------------------------------------------------------------------------------------------------


def test_digits_round_trip(digits_plan: tuple[DigitsCNN, Plan]) -> None:
    model, plan = digits_plan
    assert plan.recipe == validate_recipe({"lr": 0.01, "epochs": 3}).to_dict()
    assert audit_program(plan.program) == plan.program  # what build_plan sends is already sanitized
    module = load_program(plan.program, plan.weights)
    x = torch.rand(7, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-6)
        assert module(torch.rand(1, 1, 8, 8)).shape == (1, 10)  # the batch dimension is dynamic down to 1
        assert torch.allclose(to_eval_module(module)(x), model(x), atol=1e-6)
    assert set(module.state_dict()) == set(model.state_dict())


def test_load_program_checks_weights(digits_plan: tuple[DigitsCNN, Plan]) -> None:
    _, plan = digits_plan
    tensors = load_weights(plan.weights)
    missing = dict(tensors)
    missing.pop("fc.bias")
    with pytest.raises(PlanError, match="do not match"):
        load_program(plan.program, save(missing))
    wrong = dict(tensors, **{"fc.bias": torch.zeros(11)})
    with pytest.raises(PlanError, match="bad_plan"):
        load_program(plan.program, save(wrong))


def test_reload_weights_replaces_every_tensor_or_nothing(digits_plan: tuple[DigitsCNN, Plan]) -> None:
    """A parked Worker's next round: the kept module takes the new weights whole, and refuses any that do not fit."""
    model, plan = digits_plan
    module = load_program(plan.program, plan.weights)
    module(torch.rand(4, 1, 8, 8)).pow(2).mean().backward()  # a finished job leaves gradients behind
    torch.manual_seed(1)
    other = DigitsCNN()
    other_weights = save({k: v.detach().contiguous() for k, v in other.state_dict().items()})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    tensors = load_weights(other_weights)
    bad = [
        save({k: v for k, v in tensors.items() if k != "fc.bias"}),  # a tensor missing
        save(dict(tensors, extra=torch.zeros(1))),  # one too many
        save(dict(tensors, **{"fc.bias": torch.zeros(11)})),  # another shape
        save(dict(tensors, **{"fc.bias": tensors["fc.bias"].double()})),  # another dtype
        b"not safetensors at all",
    ]
    for weights in bad:
        with pytest.raises(PlanError, match="bad_plan"):
            reload_weights(module, weights)
        for name, tensor in module.state_dict().items():  # refused: nothing changed
            assert torch.equal(tensor, before[name]), name
    reload_weights(module, other_weights)
    assert all(p.grad is None for p in module.parameters())
    x = torch.rand(5, 1, 8, 8)
    other.eval()
    with torch.no_grad():
        assert torch.equal(module(x), load_program(plan.program, other_weights)(x))
        assert torch.allclose(module(x), other(x), atol=1e-6)


class _WithBatchNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
        self.bn = torch.nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.reshape(x.shape[0], 64)))


def test_reload_weights_replaces_buffers_too() -> None:
    """Batch-norm statistics a job moved are buffers: the next job's weights replace them, in its eval copy too."""
    torch.manual_seed(0)
    plan = build_plan(_WithBatchNorm(), digits_example_input(), {"epochs": 1})
    module = load_program(plan.program, plan.weights)
    module(torch.rand(8, 1, 8, 8) * 5)  # training mode: moves running_mean / running_var / num_batches_tracked
    assert int(module.state_dict()["bn.num_batches_tracked"]) == 1
    torch.manual_seed(1)
    fresh = _WithBatchNorm()
    fresh.bn.running_mean.fill_(0.25)
    reload_weights(module, save({k: v.detach().contiguous() for k, v in fresh.state_dict().items()}))
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name
    x = torch.rand(6, 1, 8, 8)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(to_eval_module(module)(x), fresh(x), atol=1e-6)


def test_trained_module_and_apply_weights(digits_plan: tuple[DigitsCNN, Plan]) -> None:
    _, plan = digits_plan
    module = load_program(plan.program, plan.weights)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = module(torch.rand(4, 1, 8, 8)).pow(2).mean()
    loss.backward()
    optimizer.step()
    trained = save({k: v.detach().contiguous() for k, v in module.state_dict().items()})
    fresh = DigitsCNN()
    apply_weights(fresh, trained)
    for name, tensor in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    with pytest.raises(PlanError):
        apply_weights(torch.nn.Linear(3, 2), trained)


def test_build_plan_refuses_constants() -> None:
    class WithConstant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.tensor([2.0])

    with pytest.raises(PlanError, match="constants"):
        build_plan(WithConstant(), torch.rand(2, 3))


def test_batchnorm_dropout_model_eval_copy() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(6, 8)
            self.bn = torch.nn.BatchNorm1d(8)
            self.drop = torch.nn.Dropout(0.5)
            self.fc2 = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))

    torch.manual_seed(0)
    net = Net()
    plan = build_plan(net, torch.rand(4, 6))
    assert net.training
    module = load_program(plan.program, plan.weights)
    x = torch.rand(5, 6)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(to_eval_module(module)(x), net(x), atol=1e-6)
