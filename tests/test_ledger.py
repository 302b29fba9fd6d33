"""The privacy ledger: hash chain, signatures, budget rules, concurrency across processes, and the CLI."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import lmdb
import msgpack
import pytest

from hivecell.crypto.identity import Identity
from hivecell.crypto.record import open_record
from hivecell.node.home import Home
from hivecell.node.ledger import ChainBroken, LedgerError, LedgerState, seal_entry, verify_chain
from hivecell.node.store import Store


def _chain(identity: Identity) -> list[bytes]:
    state = LedgerState()
    bodies = [
        {"kind": "budget", "dataset": "d", "epsilon": 10.0, "allow_non_dp": False},
        {"kind": "reserve", "dataset": "d", "job_id": "a", "epsilon": 3.0},
        {"kind": "reserve", "dataset": "d", "job_id": "b", "epsilon": 4.0},
        {"kind": "settle", "dataset": "d", "job_id": "a"},
        {"kind": "refund", "dataset": "d", "job_id": "b"},
    ]
    return [seal_entry(identity, state, b) for b in bodies]


def test_replay_and_rules():
    node = Identity.generate()
    state = verify_chain(_chain(node), signer=node.peer_id)
    b = state.budget("d")
    assert (b.total, b.spent, b.reserved, b.left) == (10.0, 3.0, 0.0, 7.0) and not state.open
    for bad in ({"kind": "reserve", "dataset": "d", "job_id": "c", "epsilon": 7.5},  # does not fit
                {"kind": "reserve", "dataset": "d", "job_id": "c", "epsilon": math.inf},  # non-DP not allowed
                {"kind": "settle", "dataset": "d", "job_id": "a"},  # settled already
                {"kind": "refund", "dataset": "d", "job_id": "zz"},  # never reserved
                {"kind": "budget", "dataset": "d", "epsilon": -1.0}):
        with pytest.raises(LedgerError):
            seal_entry(node, state, bad)
    assert state.seq == 5  # refused entries change nothing


@pytest.mark.parametrize("damage", ["edit", "resign_other_key", "reorder", "remove_middle", "foreign_signer"])
def test_tampered_chains_fail_at_the_first_bad_entry(damage):
    node, other = Identity.generate(), Identity.generate()
    entries = _chain(node)
    if damage == "edit":
        raw = bytearray(entries[2])
        raw[-70] ^= 1
        entries[2], first_bad = bytes(raw), 2
    elif damage == "resign_other_key":  # a valid record with a changed epsilon, but not the node's signature
        body = open_record(entries[1], domain="ledger", check_times=False).fields()
        state = LedgerState(seq=1, head=verify_chain(entries[:1], signer=node.peer_id).head)
        body.pop("seq"), body.pop("prev")
        entries[1], first_bad = seal_entry(other, state, dict(body, epsilon=0.1)), 1
    elif damage == "reorder":
        entries[1], entries[2], first_bad = entries[2], entries[1], 1
    elif damage == "remove_middle":
        del entries[3]
        first_bad = 3
    else:
        first_bad = 0
    with pytest.raises(ChainBroken) as err:
        verify_chain(entries, signer=other.peer_id if damage == "foreign_signer" else node.peer_id)
    assert err.value.index == first_bad


_RESERVER = r"""
import sys
from hivecell.crypto.identity import Identity
from hivecell.node.ledger import LedgerError
from hivecell.node.store import Store
path, key, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
node = Identity.load(key)
ok = 0
with Store.open(path) as store:
    for i in range(10):
        job = {"id": f"{worker:02d}{i:030d}", "dataset": "d"}
        try:
            store.create_job(job, ledger=(node, lambda j: [{"kind": "reserve", "dataset": "d", "job_id": j["id"],
                                                             "epsilon": 1.0}]))
            ok += 1
        except LedgerError:
            pass
print(ok)
"""


def test_fifty_concurrent_jobs_against_a_budget_of_ten(tmp_path):
    """5 processes x 10 jobs of epsilon 1 race for a budget of 10: exactly 10 are accepted, never more."""
    node = Identity.generate()
    node.save(tmp_path / "node.key")
    path = tmp_path / "store"
    with Store.open(path) as store:
        store.append_ledger(node, [{"kind": "budget", "dataset": "d", "epsilon": 10.0}])
    procs = [subprocess.Popen([sys.executable, "-c", _RESERVER, str(path), str(tmp_path / "node.key"), str(w)],
                              stdout=subprocess.PIPE, text=True) for w in range(5)]
    accepted = sum(int(p.communicate(timeout=120)[0]) for p in procs)
    assert accepted == 10
    with Store.open(path) as store:
        state = verify_chain(store.ledger_entries(), signer=node.peer_id)
        assert len(store.list_jobs()) == 10  # a refused reservation stored no job either
    b = state.budget("d")
    assert b.reserved == 10.0 and b.left == 0.0 and len(state.open) == 10


def _hc(home, *args):
    return subprocess.run([sys.executable, "-m", "hivecell.node.cli", "--home", str(home), *args],
                          capture_output=True, text=True)


def test_budget_cli_and_verify_detects_truncation(tmp_path, digits):
    import numpy as np

    home = Home(tmp_path / "h")
    np.savez(tmp_path / "d.npz", x=digits[0], y=digits[1])
    assert _hc(home.path, "init").returncode == 0
    assert _hc(home.path, "dataset", "add", "d", str(tmp_path / "d.npz"), "--budget", "5").returncode == 0
    assert _hc(home.path, "budget", "set", "nope", "1").returncode == 3
    assert _hc(home.path, "budget", "set", "d", "8", "--allow-non-dp").returncode == 0
    shown = json.loads(_hc(home.path, "budget", "show", "--json").stdout)
    assert shown["datasets"]["d"]["total"] == 8.0 and shown["datasets"]["d"]["allow_non_dp"] is True
    assert shown["entries"] == 2
    ok = _hc(home.path, "budget", "verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    env = lmdb.open(str(home.store_path), max_dbs=8)  # cut the last entry off, as a truncated copy would be
    with env.begin(write=True, db=env.open_db(b"ledger")) as txn:
        txn.delete(struct.pack(">Q", 1))
    env.close()
    broken = _hc(home.path, "budget", "verify", "--json")
    assert broken.returncode == 8 and json.loads(broken.stdout)["ok"] is False


def test_per_job_cap_and_per_scientist_limits():
    node = Identity.generate()
    alice, bob, carol = (Identity.generate().peer_id for _ in range(3))
    state = LedgerState()

    def reserve(job: str, who: str, eps: float) -> None:
        seal_entry(node, state, {"kind": "reserve", "dataset": "d", "job_id": job, "scientist": who, "epsilon": eps})

    seal_entry(node, state, {"kind": "budget", "dataset": "d", "epsilon": 10.0, "per_job": 2.0,
                             "per_scientist": 3.0, "scientists": {carol: 6.0}})
    with pytest.raises(LedgerError, match="per job"):
        reserve("big", alice, 2.5)
    reserve("a1", alice, 2.0)
    with pytest.raises(LedgerError, match="scientist's limit"):
        reserve("a2", alice, 1.5)  # 2 + 1.5 > 3
    reserve("a2", alice, 1.0)  # exactly at her limit
    reserve("b1", bob, 2.0)  # bob has his own 3
    reserve("c1", carol, 2.0), reserve("c2", carol, 2.0)  # carol's named limit of 6 overrides the default 3
    with pytest.raises(LedgerError, match="does not fit"):
        reserve("c3", carol, 2.0)  # 9 of the dataset's 10 are taken: only 1 left
    seal_entry(node, state, {"kind": "refund", "dataset": "d", "job_id": "a2"})  # a refund gives her share back
    seal_entry(node, state, {"kind": "settle", "dataset": "d", "job_id": "a1"})  # a settle keeps it used
    b = state.budget("d")
    assert b.used == {alice: 2.0, bob: 2.0, carol: 4.0}
    assert b.left_for(alice) == 1.0 and b.left_for(carol) == 2.0 and b.left_for(bob) == 1.0
    with pytest.raises(LedgerError):  # limits are finite epsilons >= 0
        seal_entry(node, state, {"kind": "budget", "dataset": "d", "epsilon": 10.0, "per_job": -1.0})
    with pytest.raises(LedgerError):
        seal_entry(node, state, {"kind": "budget", "dataset": "d", "epsilon": 10.0, "scientists": {alice: math.inf}})


def test_a_snapshot_from_an_older_version_is_rebuilt_from_the_chain(tmp_path):
    node, alice = Identity.generate(), Identity.generate().peer_id
    with Store.open(tmp_path / "s") as store:
        store.append_ledger(node, [{"kind": "budget", "dataset": "d", "epsilon": 5.0, "per_scientist": 2.0},
                                   {"kind": "reserve", "dataset": "d", "job_id": "j", "scientist": alice,
                                    "epsilon": 1.5}])
        with store._env.begin(write=True) as txn:  # the layout version 1 wrote: no limits, no users, no "v"
            txn.put(b"ledger_state", msgpack.packb({"seq": 2, "head": "0" * 64, "datasets": {
                "d": {"total": 5.0, "allow_non_dp": False, "reserved": 1.5, "spent": 0.0}},
                "open": {"j": ["d", 1.5]}}), db=store._db["meta"])
        b = store.ledger_state().budget("d")
        assert (b.per_scientist, b.used, b.left_for(alice)) == (2.0, {alice: 1.5}, 0.5)


def test_budget_set_keeps_what_it_is_not_told(tmp_path, digits):
    import numpy as np

    home = Home(tmp_path / "h")
    np.savez(tmp_path / "d.npz", x=digits[0], y=digits[1])
    assert _hc(home.path, "init").returncode == 0
    assert _hc(home.path, "dataset", "add", "d", str(tmp_path / "d.npz")).returncode == 0
    no_total = _hc(home.path, "budget", "set", "d", "--per-job", "1")
    assert no_total.returncode == 6 and "give its total epsilon" in no_total.stderr
    peer = Identity.generate().peer_id
    assert _hc(home.path, "budget", "set", "d", "10", "--per-job", "1", "--per-scientist", "4",
               "--scientist", f"{peer}=7").returncode == 0
    assert _hc(home.path, "budget", "set", "d", "12").returncode == 0  # raising the total keeps every limit
    policy = json.loads(_hc(home.path, "budget", "show", "--json").stdout)["datasets"]["d"]
    assert (policy["total"], policy["per_job"], policy["per_scientist"], policy["scientists"]) == (12.0, 1.0, 4.0,
                                                                                                   {peer: 7.0})
    assert _hc(home.path, "budget", "set", "d", "--per-job", "none", "--scientist", f"{peer}=none").returncode == 0
    policy = json.loads(_hc(home.path, "budget", "show", "--json").stdout)["datasets"]["d"]
    assert (policy["per_job"], policy["per_scientist"], policy["scientists"]) == (None, 4.0, {})
    for bad in (["--per-job", "-1"], ["--scientist", "nobody=1"], ["--scientist", f"{peer}"]):
        assert _hc(home.path, "budget", "set", "d", *bad).returncode == 2
    assert "per scientist 4" in _hc(home.path, "budget", "show").stdout
    assert _hc(home.path, "budget", "verify").returncode == 0
