"""Jobs over the bulk lane, against real daemons: weights above the client's threshold are pulled by the node from the
scientist's lane, results above the node's threshold are pulled by the scientist from the node's, a node that has the
weights already is not sent them again, a node without a lane falls back to the libp2p stream (and says so in
``hivecell peers``), and bad references are refused with clear codes while the daemon keeps serving."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import pytest

from hivecell.crypto.identity import Identity
from hivecell.crypto.record import seal
from hivecell.mesh.host import RemoteError
from hivecell.mesh.message import ErrorCode
from hivecell.node.client import Client
from hivecell.node.localnet import start_daemon
from hivecell.node.wire import JOB_DOMAIN, JOB_PROTOCOL, JobAccepted, JobResultMsg, SubmitJob

from conftest import add_dataset, hc, home_of

pytestmark = pytest.mark.slow

RECIPE = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 2, "seed": 0}


def _node(tmp_path_factory, digits, *args: str):
    from hivecell.node.home import Home

    home = Home(tmp_path_factory.mktemp("lane-node"))
    add_dataset(home, "digits", *digits)
    return start_daemon(home.path, "--warm-workers", "1", *args)


@pytest.fixture(scope="module")
def lane_node(tmp_path_factory, digits):
    """A node that sends every result by reference (threshold 0) and takes weights of at most 1 GiB (its Worker's
    memory limit)."""
    daemon = _node(tmp_path_factory, digits, "--lane-threshold", "0", "--worker-memory-mb", "1024")
    yield daemon
    daemon.stop()
    assert "Traceback" not in daemon.log_tail(200_000), daemon.log_tail()


def _lane_stats(daemon, want: dict[str, int], timeout: float = 20.0) -> dict:
    """The node's lane counters from peers.json once they reach ``want`` (the file is rewritten each second)."""
    path = home_of(daemon).peers_file
    deadline = time.monotonic() + timeout
    stats: dict = {}
    while time.monotonic() < deadline:
        try:
            stats = json.loads(Path(path).read_text())["lane"]["stats"]
        except (OSError, ValueError, KeyError):
            stats = {}
        if all(stats.get(k, 0) >= v for k, v in want.items()):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"lane counters {stats} never reached {want}")


async def test_weights_and_result_travel_on_the_lane_and_are_not_sent_twice(lane_node, plan_factory):
    plan = plan_factory(**RECIPE)
    async with Client.connect(lane_node.address) as client:
        client.lane_threshold = 0  # the digits CNN's 25 KB of weights go by reference too
        lane = client.offers.lane
        first = await client.train("digits", plan, timeout=300)
        assert lane.stats["lane_served"] == 1  # the node pulled the weights over TLS, not over the stream
        assert lane.stats["lane_fetched"] == 1 and lane.stats["stream_fetched"] == 0  # and we pulled the result
        assert lane.stats["bytes_sent_lane"] == len(plan.weights)
        assert first.metrics["accuracy"] > 0.5 and first.signoff.plan_hash == plan.hash
        assert client.offers.lane.offered() == []  # the offer ended with the acceptance

        # The same weights again (a new job): the node has them in its store and does not pull them.
        job_id, second = await client.submit_and_fetch("digits", plan, wait_s=30)
        if second is None:
            second = await client.result(job_id, wait_s=30)
        assert lane.stats["lane_served"] == 1
        assert second.result_hash == first.result_hash  # same seed, same data, same weights: same bytes
    # the node counts a lane transfer once its side of it ends, which can be just after the client has the bytes
    stats = _lane_stats(lane_node, {"weights_pulled": 1, "weights_deduplicated": 1, "results_by_reference": 2,
                                    "lane_served": 2})
    assert stats.get("fallbacks", 0) == 0
    # what makes the second job free: one copy of the weights in the daemon's bounded cache of pulled blobs (the first
    # job's plan left the store when it ended)
    assert json.loads(home_of(lane_node).peers_file.read_text())["lane"]["pulled_cache_bytes"] == len(plan.weights)


async def test_small_weights_stay_inline(lane_node, plan_factory):
    plan = plan_factory(**RECIPE)
    async with Client.connect(lane_node.address) as client:  # default threshold 1 MiB: the 25 KB of weights go inline
        result = await client.train("digits", plan, timeout=300)
        assert client.offers.lane.stats["lane_served"] == 0
        assert client.offers.lane.stats["lane_fetched"] == 1  # the node's threshold is 0: the result came by lane
    async with Client.connect(lane_node.address, lane=False) as client:  # a client without a lane: all inline
        again = await client.train("digits", plan, timeout=300)
    assert again.result_hash == result.result_hash


async def test_a_node_without_a_lane_falls_back_to_the_stream_and_says_so(tmp_path_factory, digits, plan_factory):
    daemon = _node(tmp_path_factory, digits, "--no-lane", "--lane-threshold", "0")
    try:
        plan = plan_factory(**RECIPE)
        async with Client.connect(daemon.address) as client:
            client.lane_threshold = 0
            result = await client.train("digits", plan, timeout=300)
            lane = client.offers.lane
            assert lane.stats["stream_served"] == 1 and lane.stats["lane_served"] == 0  # the node pulled on a stream
            assert lane.stats["stream_fetched"] == 1  # and its result came on a stream too (it has no listener)
            assert lane.stats["fallbacks"] == 1
        assert result.metrics["accuracy"] > 0.5
        stats = _lane_stats(daemon, {"weights_pulled": 1, "stream_fetched": 1})
        assert stats.get("lane_fetched", 0) == 0
        out = hc(daemon.home, "peers").stdout
        assert "bulk lane: off" in out, out
        assert "Traceback" not in daemon.log_tail(200_000)
    finally:
        daemon.stop()


async def test_bad_references_are_refused_and_the_node_keeps_serving(lane_node, plan_factory):
    plan = plan_factory(**RECIPE)
    identity = Identity.generate()
    async with Client.connect(lane_node.address, identity=identity) as client:
        node = client.node

        def request() -> bytes:
            return seal(identity, JOB_DOMAIN, {"job_id": uuid.uuid4().hex, "node": node, "dataset": "digits",
                                               "plan_hash": plan.hash, "recipe": plan.recipe}, ttl=300,
                        with_nonce=True)

        async def submit(**fields) -> RemoteError:
            message = SubmitJob(request=request(), program=plan.program, **fields)
            with pytest.raises(RemoteError) as err:
                await client.host.request(node, JOB_PROTOCOL, message, expect=JobAccepted, timeout=60)
            return err.value

        size = len(plan.weights)
        # Not offered to the node at all: refused, nothing queued.
        err = await submit(weights=b"", weights_ref=plan.weights_sha256, weights_size=size)
        assert err.code == ErrorCode.BAD_MESSAGE and "not offered" in err.message
        # Larger than the node takes (its Worker memory limit): refused before any transfer.
        err = await submit(weights=b"", weights_ref=plan.weights_sha256, weights_size=(1024 << 20) + 1)
        assert err.code == ErrorCode.TOO_LARGE
        lane = client.offers.lane
        # Offered, but the size announced is not the blob's: refused after the pull.
        async with client.offers.holding(plan.weights, node, sha256=plan.weights_sha256):
            err = await submit(weights=b"", weights_ref=plan.weights_sha256, weights_size=size - 1)
        assert err.code == ErrorCode.BAD_MESSAGE and "size" in err.message
        # A reference to other bytes than the plan's: the signed plan_hash does not match.
        other = bytes(plan.weights[:-1]) + bytes([plan.weights[-1] ^ 1])
        other_ref = hashlib.sha256(other).hexdigest()
        async with client.offers.holding(other, node, sha256=other_ref):
            err = await submit(weights=b"", weights_ref=other_ref, weights_size=len(other))
        assert err.code == ErrorCode.BAD_PLAN
        # A holder that offers bytes other than the reference names (a lying scientist): the node's pull fails the
        # hash check, retries, then refuses; it never queues the job.
        # (A name the node holds no blob for: it has the plan's weights from the jobs above, and would not pull.)
        claimed = hashlib.sha256(b"weights the node has never seen").hexdigest()
        lane.offer_hashed(other, claimed, to=[node])
        err = await submit(weights=b"", weights_ref=claimed, weights_size=len(other))
        assert err.code == ErrorCode.UNAVAILABLE and "sha256" in err.message
        assert lane.withdraw(claimed)

        # Malformed references never reach the handler: the message does not decode.
        for fields in ({"weights": b"x", "weights_ref": plan.weights_sha256, "weights_size": 1},
                       {"weights": b"", "weights_ref": "XYZ", "weights_size": 1},
                       {"weights": b"", "weights_ref": plan.weights_sha256, "weights_size": 0},
                       {"weights": b"", "weights_ref": "", "weights_size": 5}):
            with pytest.raises(ValueError):
                SubmitJob(request=b"r", program=b"p", **fields)
        with pytest.raises(ValueError):
            JobResultMsg(job_id="j", result=b"x", signoff=b"s", result_ref="0" * 64, result_size=1)

        # Still serving: a proper job goes through, by reference.
        client.lane_threshold = 0
        result = await client.train("digits", plan, timeout=300)
        assert result.signoff.plan_hash == plan.hash
