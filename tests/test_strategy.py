"""Aggregation strategies and update screening, on real numpy weights shaped like a small CNN's state_dict."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from hivecell.node.strategy import (
    STRATEGY_NAMES,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedMean,
    Update,
    make_strategy,
    screen_updates,
    update_norm,
)


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "conv1.bias": rng.normal(size=(4,)).astype(np.float32),
        "bn.running_mean": rng.normal(size=(4,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.weight": rng.normal(size=(3, 4)).astype(np.float32),
    }


def trained(global_weights: dict[str, np.ndarray], seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    """A node's honest local result: the global weights moved a little (and its own batch counter)."""
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for name, value in global_weights.items():
        if np.issubdtype(value.dtype, np.floating):
            out[name] = (value + scale * rng.normal(size=value.shape)).astype(value.dtype)
        else:
            out[name] = np.asarray(value + 100 + seed, dtype=value.dtype)
    return out


def honest_round(global_weights, n: int = 4) -> list[Update]:
    return [Update(node=f"node{i}", weights=trained(global_weights, i), num_samples=10 * (i + 1), metrics={})
            for i in range(n)]


def scaled(update: Update, global_weights, factor: float, node: str = "evil") -> Update:
    weights = {name: (global_weights[name] + factor * (value - global_weights[name])).astype(value.dtype)
               if np.issubdtype(value.dtype, np.floating) else value for name, value in update.weights.items()}
    return Update(node=node, weights=weights, num_samples=update.num_samples, metrics={})


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name


def test_fedavg_matches_hand_computation_for_unequal_sample_counts():
    g = {"w": np.array([0.0, 0.0], dtype=np.float32), "step": np.array(3, dtype=np.int64)}
    updates = [
        Update(node="a", weights={"w": np.array([1.0, 2.0], np.float32), "step": np.array(9)}, num_samples=1,
               metrics={}),
        Update(node="b", weights={"w": np.array([4.0, -1.0], np.float32), "step": np.array(9)}, num_samples=3,
               metrics={}),
    ]
    out = FedAvg().aggregate(g, updates)
    # (1 * [1, 2] + 3 * [4, -1]) / 4 = [13/4, -1/4]
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [3.25, -0.25]
    assert out["step"] == 3


def test_fedavg_on_a_model_computes_in_float64_and_keeps_dtypes():
    g = model()
    updates = honest_round(g)
    out = FedAvg().aggregate(g, updates)
    total = sum(u.num_samples for u in updates)
    for name in ("conv1.weight", "conv1.bias", "bn.running_mean", "fc.weight"):
        expected = sum(u.num_samples * u.weights[name].astype(np.float64) for u in updates) / total
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(out[name], expected.astype(np.float32))


@pytest.mark.parametrize("strategy", [FedAvg(), FedProx(mu=0.1), FedAvgM(momentum=0.5), FedMedian(),
                                      FedTrimmedMean(beta=0.25)], ids=lambda s: s.name)
def test_integer_tensors_are_kept_from_the_global_and_inputs_untouched(strategy):
    g = model()
    updates = honest_round(g)
    before = [{k: v.copy() for k, v in u.weights.items()} for u in updates]
    g_before = {k: v.copy() for k, v in g.items()}
    out = strategy.aggregate(g, updates)
    assert out["bn.num_batches_tracked"] == 7 and out["bn.num_batches_tracked"].dtype == np.int64
    assert out["bn.num_batches_tracked"] is not g["bn.num_batches_tracked"]
    assert_same(g, g_before)
    for update, saved in zip(updates, before):
        assert_same(update.weights, saved)


@pytest.mark.parametrize("strategy", [FedAvg(), FedAvgM(), FedMedian(), FedTrimmedMean(beta=0.25)],
                         ids=lambda s: s.name)
def test_result_does_not_depend_on_arrival_order(strategy):
    g = model()
    updates = honest_round(g, n=5)
    first = type(strategy)(**strategy.options()).aggregate(g, updates)
    second = type(strategy)(**strategy.options()).aggregate(g, updates[::-1])
    assert_same(first, second)


def test_fedprox_aggregates_as_fedavg_and_carries_mu():
    g = model()
    updates = honest_round(g)
    prox = make_strategy("fedprox", mu=0.5)
    assert isinstance(prox, FedProx) and prox.mu == 0.5
    assert_same(prox.aggregate(g, updates), FedAvg().aggregate(g, updates))


def test_fedavgm_without_momentum_equals_fedavg_exactly():
    g = model()
    strategy = FedAvgM(server_lr=1.0, momentum=0.0)
    for round_ in range(3):
        updates = [Update(node=f"n{i}", weights=trained(g, 10 * round_ + i), num_samples=i + 1, metrics={})
                   for i in range(3)]
        expected = FedAvg().aggregate(g, updates)
        g = strategy.aggregate(g, updates)
        assert_same(g, expected)


def test_fedavgm_momentum_accumulates_as_the_formula_says():
    g0 = {"w": np.array([1.0, -2.0, 0.5], dtype=np.float32)}
    lr, m = 0.5, 0.9
    strategy = FedAvgM(server_lr=lr, momentum=m)

    def one(node: str, values, n: int) -> Update:
        return Update(node=node, weights={"w": np.array(values, dtype=np.float32)}, num_samples=n, metrics={})

    round1 = [one("a", [0.0, -1.0, 1.0], 1), one("b", [2.0, -3.0, 0.0], 3)]
    g1 = strategy.aggregate(g0, round1)
    d1 = g0["w"].astype(np.float64) - (np.array([0.0, -1.0, 1.0]) * 1 + np.array([2.0, -3.0, 0.0]) * 3) / 4
    v1 = d1
    np.testing.assert_allclose(g1["w"], g0["w"] - lr * v1, rtol=1e-6)
    np.testing.assert_array_equal(strategy.state()["velocity/w"], v1)

    round2 = [one("a", [0.5, 0.5, 0.5], 2), one("b", [1.5, -0.5, 2.5], 2)]
    g2 = strategy.aggregate(g1, round2)
    d2 = g1["w"].astype(np.float64) - np.array([1.0, 0.0, 1.5])
    v2 = m * v1 + d2
    np.testing.assert_allclose(strategy.state()["velocity/w"], v2, rtol=1e-12)
    np.testing.assert_allclose(g2["w"], g1["w"] - lr * v2, rtol=1e-6)
    # Momentum carries round 1's direction on: the step differs from what FedAvg alone would give.
    assert not np.allclose(g2["w"], FedAvg().aggregate(g1, round2)["w"])


def test_fedavgm_state_round_trip_resumes_bit_exactly():
    g = model()
    rounds = [[Update(node=f"n{i}", weights=trained(g, 10 * r + i), num_samples=5 + i, metrics={}) for i in range(3)]
              for r in range(3)]
    running = FedAvgM(server_lr=0.7, momentum=0.9)
    g1 = running.aggregate(g, rounds[0])
    # The checkpoint goes through safetensors, as a coordinator would store it.
    saved = st_load(st_save(running.state()))
    continued = [running.aggregate(g1, rounds[1])]
    continued.append(running.aggregate(continued[0], rounds[2]))

    resumed = make_strategy("fedavgm", **FedAvgM(server_lr=0.7, momentum=0.9).options())
    resumed.load_state(saved)
    again = [resumed.aggregate(g1, rounds[1])]
    again.append(resumed.aggregate(again[0], rounds[2]))
    for a, b in zip(continued, again):
        assert_same(a, b)
    assert running.state().keys() == resumed.state().keys()
    for key in running.state():
        assert np.array_equal(running.state()[key], resumed.state()[key])


def test_fedavgm_refuses_bad_state():
    with pytest.raises(ValueError, match="unexpected state entry"):
        FedAvgM().load_state({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="finite float64"):
        FedAvgM().load_state({"velocity/w": np.zeros(3, dtype=np.float32)})
    strategy = FedAvgM()
    strategy.load_state({"velocity/other": np.zeros(3)})
    g = model()
    with pytest.raises(ValueError, match="does not match the model"):
        strategy.aggregate(g, honest_round(g))
    with pytest.raises(ValueError, match="no server-side state"):
        FedAvg().load_state({"velocity/w": np.zeros(3)})
    FedAvg().load_state(FedAvg().state())


@pytest.mark.parametrize("strategy", [FedMedian(), FedTrimmedMean(beta=0.2)], ids=lambda s: s.name)
def test_robust_strategies_resist_one_update_scaled_by_1e6(strategy):
    g = model()
    honest = honest_round(g, n=5)
    attacked = honest[:4] + [scaled(honest[4], g, 1e6)]
    out = strategy.aggregate(g, attacked)
    reference = FedAvg().aggregate(g, honest)
    fedavg = FedAvg().aggregate(g, attacked)
    # Honest updates move each weight by ~0.01; the robust result stays within that spread.
    assert update_norm(reference, out) < 0.1
    assert update_norm(reference, fedavg) > 1e3


def test_trimmed_mean_removes_floor_beta_n_from_each_end():
    g = {"w": np.zeros(2, dtype=np.float32)}
    values = [[1.0, -50.0], [2.0, 3.0], [3.0, 4.0], [4.0, 5.0], [100.0, 6.0]]
    updates = [Update(node=f"n{i}", weights={"w": np.array(v, np.float32)}, num_samples=1 + i, metrics={})
               for i, v in enumerate(values)]
    assert FedTrimmedMean(beta=0.2).aggregate(g, updates)["w"].tolist() == [3.0, 4.0]  # k = 1 per end
    assert FedTrimmedMean(beta=0.1).aggregate(g, updates)["w"].tolist() == pytest.approx([22.0, -6.4])  # k = 0
    assert FedMedian().aggregate(g, updates)["w"].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("strategy", [FedAvg(), FedAvgM(), FedProx(), FedMedian(), FedTrimmedMean()],
                         ids=lambda s: s.name)
def test_aggregate_refuses_an_empty_round_and_unscreened_updates(strategy):
    g = model()
    with pytest.raises(ValueError, match="empty round"):
        strategy.aggregate(g, [])
    bad = honest_round(g, n=2)
    bad[1].weights["fc.weight"] = bad[1].weights["fc.weight"][:2]
    with pytest.raises(ValueError, match="screen the round"):
        strategy.aggregate(g, bad)
    twice = honest_round(g, n=1) * 2
    with pytest.raises(ValueError, match="two updates from node"):
        strategy.aggregate(g, twice)
    assert strategy.state() == {}  # nothing was committed


def test_screen_accepts_honest_updates():
    g = model()
    updates = honest_round(g, n=5)
    accepted, rejected = screen_updates(g, updates, max_norm=1.0)
    assert accepted == updates and rejected == {}
    assert screen_updates(g, []) == ([], {})


def _with(update: Update, name: str, value) -> Update:
    weights = dict(update.weights)
    if value is None:
        del weights[name]
    else:
        weights[name] = value
    return Update(node="bad", weights=weights, num_samples=update.num_samples, metrics={})


def _nan(g):
    w = g["conv1.weight"].copy()
    w[0, 0, 1, 1] = np.nan
    return w


def _inf(g):
    w = g["fc.weight"].copy()
    w[2, 3] = -np.inf
    return w


@pytest.mark.parametrize("name, make, reason", [
    ("conv1.weight", _nan, "non-finite values in conv1.weight"),
    ("fc.weight", _inf, "non-finite values in fc.weight"),
    ("fc.weight", lambda g: np.zeros((4, 3), np.float32), "fc.weight has shape (4, 3), expected (3, 4)"),
    ("conv1.bias", lambda g: None, "missing tensor conv1.bias"),
    ("extra.weight", lambda g: np.zeros(2, np.float32), "unexpected tensor extra.weight"),
    ("conv1.bias", lambda g: g["conv1.bias"].astype(np.float64), "conv1.bias has dtype float64, expected float32"),
    ("bn.num_batches_tracked", lambda g: np.array(7, np.int32), "dtype int32, expected int64"),
    ("conv1.bias", lambda g: g["conv1.bias"].tolist(), "conv1.bias is not an array but list"),
])
def test_screen_rejects_malformed_weights(name, make, reason):
    g = model()
    updates = honest_round(g, n=3)
    bad = _with(updates[0], name, make(g))
    accepted, rejected = screen_updates(g, updates + [bad])
    assert accepted == updates
    assert list(rejected) == ["bad"] and reason in rejected["bad"]


@pytest.mark.parametrize("samples, reason", [
    (0, "outside [1, 1e+09]"),
    (-5, "outside"),
    (10**9 + 1, "outside"),
    (True, "must be an integer"),
    (2.5, "must be an integer, not float"),
    ("10", "must be an integer, not str"),
])
def test_screen_rejects_bad_num_samples(samples, reason):
    g = model()
    updates = honest_round(g, n=2)
    bad = Update(node="bad", weights=trained(g, 9), num_samples=samples, metrics={})
    accepted, rejected = screen_updates(g, updates + [bad])
    assert accepted == updates and reason in rejected["bad"]
    ok = Update(node="ok", weights=trained(g, 9), num_samples=np.int64(10**9), metrics={})
    assert screen_updates(g, [ok]) == ([ok], {})


def test_screen_rejects_an_update_scaled_by_1e6_without_a_cap():
    g = model()
    honest = honest_round(g, n=3)
    evil = scaled(honest[0], g, 1e6)
    accepted, rejected = screen_updates(g, honest + [evil])
    assert accepted == honest
    assert rejected["evil"].startswith("update norm ") and "x the round's median" in rejected["evil"]
    # With fewer than three well-formed updates there is no median to compare with: only a cap catches it.
    accepted, rejected = screen_updates(g, honest[:1] + [evil])
    assert len(accepted) == 2 and rejected == {}
    accepted, rejected = screen_updates(g, honest[:1] + [evil], max_norm=10.0)
    assert accepted == honest[:1] and "over the cap of 10" in rejected["evil"]


def test_screen_max_norm_and_norm_factor():
    g = model()
    updates = honest_round(g, n=4)
    norms = [update_norm(g, u.weights) for u in updates]
    cap = sorted(norms)[2]
    accepted, rejected = screen_updates(g, updates, max_norm=cap)
    assert sorted(rejected) == [u.node for u, n in zip(updates, norms) if n > cap] and len(accepted) == 3
    loud = scaled(updates[0], g, 5.0, node="loud")
    assert "loud" not in screen_updates(g, updates[1:] + [loud])[1]  # 5x the median passes the default factor 10
    assert "loud" in screen_updates(g, updates[1:] + [loud], norm_factor=2.0)[1]


def test_screen_rejects_both_updates_from_one_node():
    g = model()
    updates = honest_round(g, n=3)
    again = Update(node="node0", weights=trained(g, 7), num_samples=5, metrics={})
    accepted, rejected = screen_updates(g, updates + [again])
    assert accepted == updates[1:] and rejected == {"node0": "2 updates from the same node"}


def test_screen_refuses_bad_arguments():
    g = model()
    with pytest.raises(ValueError, match="max_norm"):
        screen_updates(g, [], max_norm=0)
    with pytest.raises(ValueError, match="norm_factor"):
        screen_updates(g, [], norm_factor=1.0)
    with pytest.raises(ValueError, match="global_weights"):
        screen_updates({}, [])


def test_make_strategy_builds_each_name():
    built = {name: make_strategy(name) for name in STRATEGY_NAMES}
    assert [type(s) for s in built.values()] == [FedAvg, FedAvgM, FedProx, FedMedian, FedTrimmedMean]
    assert all(s.name == name for name, s in built.items())
    assert make_strategy("fedavgm", server_lr=0.5, momentum=0.0).options() == {"server_lr": 0.5, "momentum": 0.0}
    assert make_strategy("trimmed_mean", beta=0.3).beta == 0.3
    assert repr(make_strategy("fedprox", mu=0.1)) == "FedProx(mu=0.1)"


@pytest.mark.parametrize("name, options, message", [
    ("fedsgd", {}, "unknown strategy 'fedsgd'; choose one of fedavg, fedavgm, fedprox, median, trimmed_mean"),
    ("fedavg", {"mu": 0.1}, "strategy fedavg does not take mu; it takes no options"),
    ("fedavgm", {"lr": 0.1}, "does not take lr; it takes only server_lr, momentum"),
    ("fedavgm", {"momentum": 1.0}, "momentum must be in [0, 1)"),
    ("fedavgm", {"server_lr": 0}, "server_lr must be > 0"),
    ("fedavgm", {"server_lr": float("nan")}, "server_lr must be a finite number"),
    ("fedprox", {"mu": -1}, "mu must be >= 0"),
    ("fedprox", {"mu": "0.1"}, "mu must be a finite number"),
    ("trimmed_mean", {"beta": 0.5}, "beta must be in [0, 0.5)"),
    ("trimmed_mean", {"beta": True}, "beta must be a finite number"),
])
def test_make_strategy_errors(name, options, message):
    with pytest.raises(ValueError) as info:
        make_strategy(name, **options)
    assert message in str(info.value)
