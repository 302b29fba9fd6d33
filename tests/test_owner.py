"""The data owner's key apart from the node key: delegations, offline approvals, and what a client accepts."""

from __future__ import annotations

import json
import math
import time

import pytest
import trio

from hivecell.crypto.delegation import Delegation, DelegationRefused, open_delegation, sign_delegation
from hivecell.crypto.identity import Identity
from hivecell.crypto.signoff import SignOff, SignoffRejected, sign_signoff, verify_signoff
from hivecell.node.client import Client, ResultRejected
from hivecell.node.home import Home
from hivecell.node.localnet import start_daemon

from conftest import DP, add_dataset, hc

NOW = 1_800_000_000.0


def _statement(node: str, **changes) -> SignOff:
    fields = dict(job_id="a" * 32, dataset="d", scientist="s", node=node, plan_hash="p" * 64,
                  result_hash="r" * 64, epsilon=1.0, delta=1e-5, budget_left=3.0, decision="auto")
    return SignOff(**dict(fields, **changes))


def _verify(raw: bytes, owner: str, delegation: bytes | None, *, now: float = NOW + 60, **expected):
    want = dict(job_id="a" * 32, result_hash="r" * 64, plan_hash="p" * 64, scientist="s", dataset="d")
    return verify_signoff(raw, owner=owner, delegation=delegation, now=now, **dict(want, **expected))


def test_what_a_delegated_signoff_may_and_may_not_be():
    owner, node, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    delegation = sign_delegation(owner, Delegation(node=node.peer_id, max_epsilon=2.0), ttl=3600, now=NOW)

    def by(signer: Identity, at: float = NOW + 30, **changes) -> bytes:
        return sign_signoff(signer, _statement(signer.peer_id if signer is not owner else node.peer_id, **changes),
                            now=at)

    assert _verify(by(owner, decision="owner", epsilon=50.0), owner.peer_id, None)[0].epsilon == 50.0
    assert _verify(by(node), owner.peer_id, delegation)[1].signer == node.peer_id  # within the delegation
    refused = {
        "no delegation": (by(node), None, {}),
        "beyond the limit": (by(node, epsilon=2.5), delegation, {}),
        "no DP, not delegated": (by(node, epsilon=math.inf), delegation, {}),
        "another result": (by(node), delegation, {"result_hash": "x" * 64}),
        "a key without delegation": (by(stranger), delegation, {}),
        "the node claims the owner's decision": (by(node, decision="owner"), delegation, {}),
        "expired delegation": (by(node), delegation, {"now": NOW + 7200}),
        "signed after the delegation expired": (by(node, at=NOW + 4000), delegation, {"now": NOW + 4000}),
        "a delegation by another key": (
            by(node), sign_delegation(stranger, Delegation(node=node.peer_id, max_epsilon=9.0), ttl=3600, now=NOW),
            {}),
        "a delegation for another node": (
            by(node), sign_delegation(owner, Delegation(node=stranger.peer_id, max_epsilon=9.0), ttl=3600, now=NOW),
            {}),
        "a delegation for another dataset": (
            by(node), sign_delegation(owner, Delegation(node=node.peer_id, max_epsilon=9.0, datasets=("e",)),
                                      ttl=3600, now=NOW), {}),
    }
    for case, (raw, dlg, extra) in refused.items():
        with pytest.raises(SignoffRejected):
            _verify(raw, owner.peer_id, dlg, **extra)
            pytest.fail(f"accepted: {case}")
    wide = sign_delegation(owner, Delegation(node=node.peer_id, max_epsilon=2.0, allow_non_dp=True), ttl=3600, now=NOW)
    assert _verify(by(node, epsilon=math.inf), owner.peer_id, wide)[0].epsilon == math.inf


def test_delegation_values_are_checked():
    owner = Identity.generate()
    for bad in ({"max_epsilon": -1.0}, {"max_epsilon": math.inf}, {"max_epsilon": True}, {"datasets": ("",)},
                {"allow_non_dp": "yes"}):
        with pytest.raises(ValueError):
            Delegation(**dict({"node": "n", "max_epsilon": 1.0}, **bad))
    with pytest.raises(ValueError):
        sign_delegation(owner, Delegation(node="n", max_epsilon=1.0), ttl=10 * 365 * 86400)
    raw = bytearray(sign_delegation(owner, Delegation(node="n", max_epsilon=1.0), ttl=60))
    raw[-5] ^= 1
    with pytest.raises(DelegationRefused):
        open_delegation(bytes(raw))


@pytest.mark.slow
async def test_owner_key_delegation_and_offline_approval(tmp_path, digits, plan_factory):
    """The node signs off what the owner delegated; the rest waits for the owner key, given here or offline."""
    from hivecell.node.plan import validate_recipe
    from hivecell.node.privacy import price_job

    x, y = digits
    home = Home(tmp_path / "node")
    add_dataset(home, "d", x, y, budget=100.0)
    small = plan_factory(epochs=1, dp=DP)
    big = plan_factory(epochs=1, dp=dict(DP, noise_multiplier=0.7))
    eps_small, eps_big = (price_job(validate_recipe(p.recipe).to_dict(), len(x))[0] for p in (small, big))
    assert eps_small < eps_big
    limit = (eps_small + eps_big) / 2

    laptop = tmp_path / "laptop"  # the owner's machine: the key never touches the node
    laptop.mkdir()
    owner_id = json.loads(hc(home.path, "owner", "keygen", str(laptop / "owner.key"), "--json").stdout)["owner"]
    assert hc(home.path, "owner", "keygen", str(laptop / "owner.key"), check=False).returncode == 4
    hc(home.path, "owner", "delegate", "--key", str(laptop / "owner.key"), "--max-epsilon", str(limit),
        "--days", "30", "-o", str(laptop / "node.dlg"))
    stranger_key = tmp_path / "stranger.key"
    Identity.generate().save(stranger_key)

    daemon = start_daemon(home.path, "--warm-workers", "1")
    try:
        shown = json.loads(hc(home.path, "owner", "use", "--delegation", str(laptop / "node.dlg"), "--json").stdout)
        assert shown["owner"] == owner_id and shown["delegation_usable"] and shown["delegation"]["max_epsilon"] == limit
        async with Client.connect(daemon.address) as client:
            advert = {d.name: d for d in await client.datasets()}["d"]
            assert advert.owner == owner_id and advert.delegation == (laptop / "node.dlg").read_bytes()

            within = await client.train("d", small, timeout=300)  # the node signs off by itself
            assert within.signoff.decision == "auto" and within.signoff.epsilon == pytest.approx(eps_small)

            offline, here, forged = [await client.submit("d", big) for _ in range(3)]
            for job_id in (offline, here, forged):
                with trio.fail_after(300):
                    while (status := await client.status(job_id, wait_s=5)).state != "awaiting_signoff":
                        pass
                assert "beyond the delegation" in status.reason

            # The node key alone cannot release it, and the client would refuse a node-signed "auto" beyond the limit.
            refused = hc(home.path, "jobs", "approve", offline, check=False)
            assert refused.returncode == 8 and owner_id in refused.stderr
            node_key = home.identity()
            job = json.loads(hc(home.path, "jobs", "show", offline, "--json").stdout)
            overreach = sign_signoff(node_key, SignOff(
                job_id=offline, dataset="d", scientist=client.peer_id, node=node_key.peer_id, plan_hash=big.hash,
                result_hash=job["result_hash"], epsilon=job["epsilon"], delta=job["delta"], budget_left=None,
                decision="auto"))
            with pytest.raises(ResultRejected, match="beyond the delegation"):
                client.verify(offline, b"", overreach)

            # Offline: export on the node, sign on the laptop, deliver the signature.
            hc(home.path, "jobs", "export", offline, "-o", str(tmp_path / "req.json"))
            signed = hc(home.path, "owner", "sign", str(tmp_path / "req.json"), "--key", str(laptop / "owner.key"),
                         "-o", str(laptop / "approval"))
            assert offline in signed.stdout and "epsilon" in signed.stdout
            hc(home.path, "jobs", "approve", offline, "--signoff", str(laptop / "approval"))
            # On the node with the key at hand.
            hc(home.path, "jobs", "approve", here, "--owner-key", str(laptop / "owner.key"))
            # A signature by another key, and the owner's approval of another job, are refused.
            hc(home.path, "jobs", "export", forged, "-o", str(tmp_path / "req2.json"))
            hc(home.path, "owner", "sign", str(tmp_path / "req2.json"), "--key", str(stranger_key),
                "-o", str(tmp_path / "stranger.approval"))
            for bad in (tmp_path / "stranger.approval", laptop / "approval"):
                out = hc(home.path, "jobs", "approve", forged, "--signoff", str(bad), check=False)
                assert out.returncode == 8 and "does not verify" in out.stderr
            wrong_key = hc(home.path, "jobs", "approve", forged, "--owner-key", str(stranger_key), check=False)
            assert wrong_key.returncode == 8

            for job_id in (offline, here):
                result = await client.result(job_id)
                assert result.signoff.decision == "owner" and result.signoff.epsilon == pytest.approx(eps_big)
            assert (await client.status(forged)).state == "awaiting_signoff"

        # The ledger charged exactly the released jobs, and still verifies.
        budget = json.loads(hc(home.path, "budget", "show", "--json").stdout)["datasets"]["d"]
        assert budget["spent"] == pytest.approx(eps_small + 2 * eps_big)
        assert budget["reserved"] == pytest.approx(eps_big)  # the forged one still waits
        assert hc(home.path, "budget", "verify").returncode == 0

        # An expired delegation is refused by `owner use`, and back to the default the node key signs again.
        expired_dlg = sign_delegation(Identity.load(laptop / "owner.key"),
                                      Delegation(node=home.identity().peer_id, max_epsilon=1.0),
                                      ttl=60, now=time.time() - 3600)
        (laptop / "old.dlg").write_bytes(expired_dlg)
        old = hc(home.path, "owner", "use", "--delegation", str(laptop / "old.dlg"), check=False)
        assert old.returncode == 6 and "expired" in old.stderr
        assert "no separate owner key" in hc(home.path, "owner", "reset").stdout
        hc(home.path, "jobs", "approve", forged)
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log_tail(200_000)
