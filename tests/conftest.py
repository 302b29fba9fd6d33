"""Shared fixtures: real node daemons (subprocesses) on loopback with real LMDB stores and real Workers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hivecell.node.dataset import encode_tensors, make_record
from hivecell.node.demo import digits_shards
from hivecell.node.home import Home
from hivecell.node.localnet import DaemonProcess, start_daemon
from hivecell.node.store import Store

# No daemon a test starts may announce on this machine's real interfaces: mDNS is off unless a test turns it on for
# loopback or for network namespaces it made (tests/netlan.py).
os.environ["HIVECELL_MDNS"] = "0"

# One private row of 64 random float32 values in the digits' range: 256 bytes no model, advert or message would
# contain by chance (any 16 of them in a row are checked).
CANARY = np.random.default_rng(20261124).uniform(0.05, 0.95, size=(1, 1, 8, 8)).astype(np.float32)


def hc(home, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``hivecell --home HOME ARGS`` as a user would; with ``check``, a non-zero exit fails the test."""
    proc = subprocess.run([sys.executable, "-m", "hivecell.node.cli", "--home", str(home), *args],
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"hivecell {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def add_dataset(home: Home, name: str, x: np.ndarray, y: np.ndarray, *, signoff: str = "auto",
                tags: tuple[str, ...] = ("digits",), budget: float | None = None) -> None:
    identity, _ = home.init()
    record = make_record(name=name, features=x, labels=y, feature_names=[], tags=list(tags), signoff=signoff,
                         owner=identity.peer_id, description=f"test dataset {name}")
    with Store.open(home.store_path) as store:
        store.add_dataset(record, encode_tensors(x, y))
        if budget is not None:
            store.append_ledger(identity, [{"kind": "budget", "dataset": name, "epsilon": budget}])


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """One quarter of scikit-learn's digits, as the demo's first node holds it."""
    return digits_shards(4)[0]


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A bare store holding all of scikit-learn's digits, for Worker tests without a daemon: (path, data key)."""
    from safetensors.numpy import save
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    path = tmp_path_factory.mktemp("store")
    with Store.open(path) as store:
        store.add_dataset({"name": "digits", "tags": ["digits"]}, save({"features": features, "labels": labels}))
        key = store.get_dataset("digits")["data_key"]
    return path, key


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]) -> Iterator[DaemonProcess]:
    """A daemon with datasets ``digits`` (auto sign-off), ``digits-manual`` and ``canary`` (private rows planted).

    Every frame it sends is copied to ``<home>/wire.tap``.
    """
    home = Home(tmp_path_factory.mktemp("node"))
    x, y = digits
    add_dataset(home, "digits", x, y)
    add_dataset(home, "digits-manual", x, y, signoff="manual")
    xc = np.concatenate([x, np.repeat(CANARY, 3, axis=0)])
    yc = np.concatenate([y, np.array([3, 3, 3], dtype=np.int64)])
    add_dataset(home, "canary", xc, yc)
    add_dataset(home, "digits-budget", x, y, budget=BUDGET_JOBS * _dp_epsilon(len(x)))
    daemon = start_daemon(home.path, "--warm-workers", "1", env={"HIVECELL_WIRE_TAP": str(home.path / "wire.tap")})
    yield daemon
    daemon.stop()
    assert "Traceback" not in daemon.log_tail(200_000), daemon.log_tail()


@pytest.fixture(scope="session")
def plan_factory():
    from hivecell.node.plan import build_plan
    from hivecell.node.zoo import DigitsCNN, digits_example_input

    def make(**recipe):
        base = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 15, "seed": 0}
        return build_plan(DigitsCNN(), digits_example_input(), dict(base, **recipe))

    return make


DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
DP_RECIPE = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 1, "seed": 0, "dp": DP}
BUDGET_JOBS = 2.5  # the budget of "digits-budget" fits two DP_RECIPE jobs, not three


def _dp_epsilon(n: int) -> float:
    from hivecell.node.plan import validate_recipe
    from hivecell.node.privacy import dp_plan, train_samples

    recipe = validate_recipe(DP_RECIPE).to_dict()
    return dp_plan(recipe, train_samples(n, recipe["eval_fraction"])).epsilon


def home_of(daemon: DaemonProcess) -> Home:
    return Home(Path(daemon.home))
