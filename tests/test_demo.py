"""`hivecell demo --json`: the main job, as a newcomer runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_json():
    proc = subprocess.run([sys.executable, "-m", "hivecell.node.cli", "demo", "--json"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # py-libp2p's routine dial failures stay out of it
    report = json.loads(proc.stdout)
    job = report["job"]
    assert job["status"] == "released" and job["signoff_verified"] is True
    assert job["seconds"] > 0
    # DP-SGD on a 360-row shard: the sign-off states the epsilon spent and the budget left; the scientist measures the
    # released model on a test shard no node holds (~0.85; 0.7 leaves room for the noise, which is not seeded).
    assert 0 < job["epsilon"] < 20 and job["delta"] == 1e-5
    assert job["budget_left"] == pytest.approx(report["nodes"][0]["budget"] - job["epsilon"], abs=1e-6)
    assert job["accuracy"] > 0.7 and job["test_samples"] == 359
    assert "accuracy" not in job["metrics"] and "loss" not in job["metrics"]  # nothing unnoised from private rows
    evaluation = job["evaluation"]
    assert evaluation["status"] == "released" and 0 < evaluation["epsilon"] <= 2.0
    assert evaluation["budget_left"] == pytest.approx(job["budget_left"] - evaluation["epsilon"], abs=1e-6)
    assert 0 <= evaluation["accuracy"] <= 1
    federation = report["federation"]  # FedAvg over the 4 nodes, DP-SGD in every round
    assert federation["status"] == "done" and federation["rounds"] == 5
    assert [r["round"] for r in federation["history"]] == list(range(1, 6))
    assert all(r["applied"] and len(r["accepted"]) >= 3 for r in federation["history"])
    assert federation["final_accuracy"] == federation["history"][-1]["accuracy"] > 0.5
    assert 0 < federation["epsilon_per_node"] < 30
    assert job["node"] == report["nodes"][0]["peer_id"]
    assert job["search"]["found"] == 4  # every node's dataset, through the gossip index of the node it joined by
    assert len(report["nodes"]) == 4 and len({n["peer_id"] for n in report["nodes"]}) == 4
