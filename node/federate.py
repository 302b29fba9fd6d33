"""Model-centric federated learning: the coordinator, in the model owner's own process (no server).

Theory of operation
-------------------
A federation is a sequence of rounds over a set of nodes. Each round, the coordinator

1. picks the participants: every reachable node, or ``max_nodes`` of them drawn with a seeded generator (so a resumed
   federation draws the same ones);
2. sends each one a training job (the same audited program, the round's global weights, the recipe with
   ``seed + round``), exactly as a data scientist's job: each job runs under its node's own policy and budget, and
   comes back only with a sign-off that the coordinator verifies (:meth:`Client.verify`) before it touches the bytes;
3. waits until every participant answered or the round's deadline passed. A node that fails, is unreachable, or whose
   sign-off does not verify is *dropped* with its reason; one that has not answered by the deadline is a *straggler*,
   and whatever it sends later is ignored (its job may still finish on the node; the result is never fetched);
4. screens the updates (:func:`~hivecell.node.strategy.screen_updates`: names, shapes, finite values, absurd norms)
   and aggregates the rest with the strategy (FedAvg, FedAvgM, FedProx, median, trimmed mean);
5. if fewer than ``min_nodes`` updates survived, the round is recorded as failed and the global weights stay as they
   were (three failed rounds in a row end the federation with :class:`FederationFailed`);
6. evaluates the new global weights with the caller's ``evaluate`` function (on the model owner's own test data) and
   checkpoints: global weights, strategy state and history are written to ``checkpoint_dir`` atomically (temporary
   file, fsync, rename; the state file last), so a coordinator killed at any point resumes at the round after the last
   one it finished, with the same global weights.

Nothing here imports torch: weights travel as safetensors bytes and are aggregated as numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import trio

from hivecell.crypto.identity import Identity
from hivecell.mesh.message import ErrorCode
from hivecell.mesh.blob import SharedOffers
from hivecell.mesh.host import PeerUnreachable, RemoteError, open_host

from .client import LANE_THRESHOLD, Client, JobFailed, ResultRejected, _maybe_lane
from .dataset import DatasetInfo
from .job import JobState
from .plan import Plan, decode_update, validate_recipe
from .wire import MAX_WATCH_S
from .strategy import Strategy, Update, make_strategy, screen_updates

__all__ = ["FederationConfig", "RoundRecord", "FederationResult", "FederationFailed", "federate", "encode_weights",
           "decode_weights"]

logger = logging.getLogger(__name__)

_STATE = "federation.json"
_MAX_FAILED_ROUNDS = 3


class FederationFailed(Exception):
    """The federation cannot go on (no matching nodes, or too many rounds without enough updates)."""

    def __init__(self, message: str, history: list[RoundRecord] | None = None) -> None:
        super().__init__(message)
        self.history = history or []


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    rounds: int = 10
    min_nodes: int = 2  # updates a round needs to be applied
    max_nodes: int | None = None  # participants drawn per round (None: every node)
    deadline_s: float = 300.0  # per round, from the first submit
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    max_update_norm: float | None = None  # refuse updates that move the weights further than this (L2)
    tag: str | None = None  # train on each node's first dataset with this tag (None: the first that fits)
    seed: int = 0
    # weights and updates above lane_threshold bytes travel on the bulk lane (TLS 1.3 bound to the peer ids, see
    # hivecell.mesh.lane), pulled by whoever needs them; lane=False sends everything inline on libp2p streams
    lane: bool = True
    lane_threshold: int = LANE_THRESHOLD

    def __post_init__(self) -> None:
        if not 1 <= self.rounds <= 10_000:
            raise ValueError("rounds must be between 1 and 10000")
        if self.min_nodes < 1:
            raise ValueError("min_nodes must be at least 1")
        if self.max_nodes is not None and self.max_nodes < self.min_nodes:
            raise ValueError("max_nodes must be at least min_nodes")
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")


@dataclass
class RoundRecord:
    round: int
    participants: list[str]
    accepted: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # node -> why (failed, unreachable, unverified, screened)
    stragglers: list[str] = field(default_factory=list)
    applied: bool = False
    seconds: float = 0.0
    slowest_train_s: float = 0.0  # the slowest accepted node's local training time (its Worker's train_s)
    accuracy: float | None = None
    loss: float | None = None
    epsilon: float | None = None  # the largest epsilon a participant's sign-off states for this round
    bytes_sent: int = 0
    bytes_received: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped_count"] = len(self.dropped) + len(self.stragglers)
        return out


@dataclass
class FederationResult:
    weights: bytes  # the final global weights, safetensors
    history: list[RoundRecord]
    resumed_from: int  # rounds already done when this run started (0: a fresh federation)


def encode_weights(weights: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in weights.items()})


def decode_weights(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


@dataclass
class _Node:
    client: Client
    dataset: str

    @property
    def peer(self) -> str:
        return self.client.node


def _fits(info: DatasetInfo, recipe: dict[str, Any], tag: str | None) -> bool:
    return (tag is None or tag in info.tags) and info.schema.get("task") == recipe.get("task", "classification")


async def _join(host: Any, addresses: Sequence[str], recipe: dict[str, Any], tag: str | None,
                offers: SharedOffers | None = None, lane_threshold: int = LANE_THRESHOLD) -> list[_Node]:
    """Connect to every address and pick its dataset; nodes that cannot be reached or have none are left out."""
    nodes: list[_Node] = []

    async def one(address: str) -> None:
        try:
            with trio.fail_after(30):
                peer = await host.connect(address)
                client = Client(host, peer, address, offers=offers, lane_threshold=lane_threshold)
                infos = await client.datasets()
        except (PeerUnreachable, RemoteError, trio.TooSlowError, ValueError) as exc:
            logger.warning("federation: leaving out %s: %s", address, exc)
            return
        match = [i for i in infos if _fits(i, recipe, tag)]
        if not match:
            logger.warning("federation: %s has no dataset with tag %r for this task", address, tag)
            return
        nodes.append(_Node(client=client, dataset=match[0].name))

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(one, address)
    nodes.sort(key=lambda n: n.peer)  # a stable order, so seeded sampling draws the same nodes after a resume
    return nodes


# -- checkpoints ----------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(plan: Plan, config: FederationConfig) -> str:
    body = {"program": hashlib.sha256(plan.program).hexdigest(), "recipe": plan.recipe,
            "strategy": config.strategy, "options": config.strategy_options, "seed": config.seed}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _save(directory: Path, *, fingerprint: str, done: int, weights: dict[str, np.ndarray], strategy: Strategy,
          history: list[RoundRecord]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    blob = encode_weights(weights)
    digest = hashlib.sha256(blob).hexdigest()
    _write_atomic(directory / f"global-{digest[:16]}.safetensors", blob)
    state = strategy.state()
    state_blob = encode_weights(state) if state else b""
    if state_blob:
        _write_atomic(directory / f"strategy-{hashlib.sha256(state_blob).hexdigest()[:16]}.safetensors", state_blob)
    doc = {"fingerprint": fingerprint, "rounds_done": done, "weights": digest,
           "strategy_state": hashlib.sha256(state_blob).hexdigest() if state_blob else None,
           "history": [r.to_dict() for r in history]}
    _write_atomic(directory / _STATE, json.dumps(doc, indent=1).encode())
    keep = {f"global-{digest[:16]}.safetensors"} | (
        {f"strategy-{doc['strategy_state'][:16]}.safetensors"} if state_blob else set())
    for old in directory.glob("*.safetensors"):  # older rounds' files: the state file no longer names them
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _load(directory: Path, fingerprint: str, strategy: Strategy
          ) -> tuple[int, dict[str, np.ndarray], list[RoundRecord]] | None:
    try:
        doc = json.loads((directory / _STATE).read_text())
    except FileNotFoundError:
        return None
    if doc.get("fingerprint") != fingerprint:
        raise FederationFailed(f"{directory} holds the checkpoint of another federation (another model, recipe or "
                               f"strategy); use another directory")
    blob = (directory / f"global-{doc['weights'][:16]}.safetensors").read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc["weights"]:
        raise FederationFailed(f"{directory}: the checkpoint's weights do not match their hash")
    if doc.get("strategy_state"):
        strategy.load_state(decode_weights(
            (directory / f"strategy-{doc['strategy_state'][:16]}.safetensors").read_bytes()))
    history = [RoundRecord(**{k: v for k, v in r.items() if k != "dropped_count"}) for r in doc["history"]]
    return int(doc["rounds_done"]), decode_weights(blob), history


# -- one round --------------------------------------------------------------------------------------------------------


async def _train_on(node: _Node, plan: Plan, deadline: float, record: RoundRecord,
                    updates: list[tuple[Update, dict[str, Any]]], base: dict[str, np.ndarray]) -> None:
    """Run one participant's job; put its verified update in ``updates`` or its reason in ``record``. ``base``: the
    round's global weights, which an update encoded as ``fp16``/``bf16``/``int8`` (recipe ``update``) is the change
    from."""
    peer = node.peer
    try:
        with trio.fail_after(max(0.0, deadline - trio.current_time())):
            # One stream per job: the node accepts the job and answers again on the same stream when it has ended.
            job_id, result = await node.client.submit_and_fetch(node.dataset, plan, wait_s=MAX_WATCH_S)
            record.bytes_sent += len(plan.program) + len(plan.weights)
            while result is None:  # not ended within one long poll (or an older node): long-poll fetches
                asked = trio.current_time()
                try:
                    result = await node.client.result(job_id, wait_s=MAX_WATCH_S)
                except RemoteError as exc:
                    if exc.code == ErrorCode.NOT_READY:  # still queued, running or awaiting the owner's sign-off
                        # a node that answers at once instead of waiting must not make us spin
                        await trio.sleep(max(0.0, 1.0 - (trio.current_time() - asked)))
                        continue
                    if exc.code in (ErrorCode.JOB_FAILED, ErrorCode.WITHHELD):
                        raise JobFailed(job_id, JobState.FAILED.value if exc.code == ErrorCode.JOB_FAILED
                                        else JobState.WITHHELD.value, exc.message) from None
                    raise
        record.bytes_received += len(result.weights)
        train_s = result.timings.get("train_s", 0.0)
        encoding = plan.recipe.get("update", "full")
        if encoding == "full":
            weights = decode_weights(result.weights)
        else:
            weights = decode_update(result.weights, base, encoding)
        samples = result.metrics.get("train_samples")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ResultRejected("the result does not say how many samples it trained on")
        update = Update(node=peer, weights=weights, num_samples=samples, metrics=result.metrics)
        updates.append((update, {"epsilon": result.signoff.epsilon,
                                 "train_s": float(train_s) if isinstance(train_s, (int, float)) else 0.0}))
    except trio.TooSlowError:
        record.stragglers.append(peer)
    except JobFailed as exc:
        record.dropped[peer] = f"{exc.state}: {exc.reason}"[:300]
    except ResultRejected as exc:
        logger.warning("federation: update from %s refused: %s", peer[-8:], exc)
        record.dropped[peer] = f"unverified: {exc}"[:300]
    except RemoteError as exc:
        record.dropped[peer] = f"refused: {exc.code}"
    except PeerUnreachable as exc:
        record.dropped[peer] = f"unreachable: {exc}"[:300]
    except ValueError as exc:  # an encoded update that does not fit the model (decode_update says why)
        logger.warning("federation: update from %s unusable: %s", peer[-8:], exc)
        record.dropped[peer] = f"unusable update: {exc}"[:300]
    except Exception as exc:  # a malformed result (weights that do not decode): drop it, never the round
        logger.warning("federation: update from %s unusable: %r", peer[-8:], exc)
        record.dropped[peer] = "unusable update"


async def federate(
    addresses: Sequence[str],
    plan: Plan,
    *,
    config: FederationConfig,
    identity: Identity | None = None,
    evaluate: Callable[[bytes], dict[str, float]] | None = None,
    checkpoint_dir: Path | None = None,
    on_round: Callable[[RoundRecord], Any] | None = None,
) -> FederationResult:
    """Federate ``plan``'s model over the nodes at ``addresses`` for ``config.rounds`` rounds.

    Args:
        plan: from :func:`~hivecell.node.plan.build_plan`; its weights are the starting global weights.
        evaluate: called with each round's global weights (safetensors bytes); returns e.g. ``{"accuracy": ...,
            "loss": ...}`` measured on the model owner's own data. Runs in a thread.
        checkpoint_dir: where rounds are checkpointed; a directory holding this federation's checkpoint resumes it.
        on_round: called after every round with its record.

    Raises:
        FederationFailed: fewer than ``min_nodes`` usable nodes, or three rounds in a row without enough updates.
    """
    recipe = validate_recipe(plan.recipe)
    if recipe.kind != "train":
        raise ValueError("a federation trains: the plan's recipe must be a training recipe")
    strategy = make_strategy(config.strategy, **config.strategy_options)
    fingerprint = _fingerprint(plan, config)
    global_weights = decode_weights(plan.weights)
    history: list[RoundRecord] = []
    done = 0
    if checkpoint_dir is not None:
        loaded = _load(Path(checkpoint_dir), fingerprint, strategy)
        if loaded is not None:
            done, global_weights, history = loaded
            logger.info("federation: resuming after round %d", done)
    resumed_from = done
    base = dict(plan.recipe)
    mu = getattr(strategy, "mu", 0.0)
    if mu:  # FedProx: the proximal term lives in each node's local training
        base = validate_recipe(dict(base, prox_mu=mu)).to_dict()

    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with open_host(identity or Identity.generate(), listen) as host, \
            _maybe_lane(host, config.lane, listen) as lane:
        offers = SharedOffers(lane) if lane is not None else None
        nodes = await _join(host, addresses, base, config.tag, offers, config.lane_threshold)
        if len(nodes) < config.min_nodes:
            raise FederationFailed(f"{len(nodes)} usable nodes, the federation needs at least {config.min_nodes}",
                                   history)
        failed_in_a_row = 0
        for rnd in range(done + 1, config.rounds + 1):
            chosen = list(nodes)
            if config.max_nodes is not None and len(chosen) > config.max_nodes:
                chosen = random.Random(f"{config.seed}:{rnd}").sample(chosen, config.max_nodes)
            record = RoundRecord(round=rnd, participants=[n.peer for n in chosen])
            round_plan = replace(plan, weights=encode_weights(global_weights),
                                 recipe=dict(base, seed=(base.get("seed", 0) + rnd) % 2**31))
            t0 = trio.current_time()
            deadline = t0 + config.deadline_s
            updates: list[tuple[Update, dict[str, Any]]] = []
            async with trio.open_nursery() as nursery:
                for node in chosen:
                    nursery.start_soon(_train_on, node, round_plan, deadline, record, updates, global_weights)
            accepted, screened = screen_updates(global_weights, [u for u, _ in updates],
                                                max_norm=config.max_update_norm)
            for peer, why in screened.items():
                record.dropped[peer] = f"screened: {why}"
            record.accepted = sorted(u.node for u in accepted)
            extra = {u.node: info for u, info in updates}
            if record.accepted:
                record.slowest_train_s = max(extra[p]["train_s"] for p in record.accepted)
                eps = [extra[p]["epsilon"] for p in record.accepted]
                record.epsilon = max(eps) if all(math.isfinite(e) for e in eps) else math.inf
            if len(accepted) >= config.min_nodes:
                global_weights = strategy.aggregate(global_weights, accepted)
                record.applied = True
                failed_in_a_row = 0
            else:
                failed_in_a_row += 1
                logger.warning("federation: round %d had %d usable updates of %d needed; global weights kept", rnd,
                               len(accepted), config.min_nodes)
            if evaluate is not None:
                blob = encode_weights(global_weights)
                scores = await trio.to_thread.run_sync(evaluate, blob)
                record.accuracy, record.loss = scores.get("accuracy"), scores.get("loss")
            record.seconds = trio.current_time() - t0
            history.append(record)
            if checkpoint_dir is not None:
                await trio.to_thread.run_sync(lambda: _save(
                    Path(checkpoint_dir), fingerprint=fingerprint, done=rnd, weights=global_weights,
                    strategy=strategy, history=history))
            if on_round is not None:
                on_round(record)
            if failed_in_a_row >= _MAX_FAILED_ROUNDS:
                raise FederationFailed(f"{failed_in_a_row} rounds in a row without {config.min_nodes} usable "
                                       f"updates; last: {record.dropped or record.stragglers}", history)
    return FederationResult(weights=encode_weights(global_weights), history=history, resumed_from=resumed_from)


def plot_history(history: Sequence[RoundRecord], path: Path, *, title: str = "federated training") -> None:
    """Write a PNG of accuracy and loss per round (needs matplotlib: ``pip install 'hivecell[demo]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history]
    fig, ax_acc = plt.subplots(figsize=(7, 4), dpi=100)
    ax_acc.plot(rounds, [r.accuracy if r.accuracy is not None else float("nan") for r in history], "o-",
                color="tab:blue", label="accuracy")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("test accuracy", color="tab:blue")
    ax_acc.set_ylim(0, 1)
    ax_loss = ax_acc.twinx()
    ax_loss.plot(rounds, [r.loss if r.loss is not None else float("nan") for r in history], "s--",
                 color="tab:red", label="loss")
    ax_loss.set_ylabel("test loss", color="tab:red")
    for r in history:
        if not r.applied:
            ax_acc.axvline(r.round, color="grey", alpha=0.3)
    ax_acc.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def torch_evaluator(model_factory: Callable[[], Any], x: np.ndarray, y: np.ndarray) -> Callable[[bytes], dict]:
    """An ``evaluate`` for :func:`federate`: accuracy and mean cross-entropy of the global weights on (x, y)."""

    def evaluate(weights: bytes) -> dict[str, float]:
        import torch

        from .plan import apply_weights

        model = model_factory()
        apply_weights(model, weights)
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
            loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
            accuracy = float((logits.argmax(dim=1).numpy() == y).mean())
        return {"accuracy": accuracy, "loss": loss}

    return evaluate
