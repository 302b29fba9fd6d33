"""Smoke test of bench/fedavg_rounds.py: two daemons, two rounds; the JSON it prints has the keys issue 4 asks for.

It keeps the benchmark from rotting when the client or the node changes under it (it wraps client calls to time them);
its numbers are not checked here: speed is measured by running the benchmark, never asserted in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fedavg_rounds.py"


def test_fedavg_rounds_prints_one_json_object() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--nodes", "2", "--rounds", "2", "--no-settle",
                           "--lane-effect", "1", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert {"model", "rounds", "results", "baseline_local_epoch_s", "goal", "meets_goal",
            "overhead_growth"} <= report.keys()
    (result,) = report["results"]
    assert {"nodes", "round1_s", "round_s_median", "slowest_train_s_median", "overhead_s_median",
            "overhead_s_per_round", "bytes_per_round", "peak_rss_mb_per_node", "final_accuracy"} <= result.keys()
    assert result["nodes"] == 2 and len(result["overhead_s_per_round"]) == 2
    assert result["round_s_median"] >= result["slowest_train_s_median"] > 0
    assert result["bytes_per_round"] > 0
    assert {"daemon_max", "daemon_plus_workers_max"} <= result["peak_rss_mb_per_node"].keys()
    assert result["peak_rss_mb_per_node"]["daemon_plus_workers_max"] >= result["peak_rss_mb_per_node"]["daemon_max"]
    assert result["peak_rss_mb_per_node"]["daemon_plus_workers_pss_at_end_median"] > 0  # taken while the nodes run
    critical = result["overhead_breakdown"]["critical_path_median_s"]  # round 2: the timeline of its last job
    assert {"to_received", "queue", "worker", "train", "release", "fetch", "after"} <= critical.keys()
    assert critical["train"] > 0 and critical["fetch"] >= 0
    assert "round 1/2" in proc.stderr and "round 2/2" in proc.stderr  # one progress line per round on stderr
    # The lane's effect with the 25 MB model: one node, one round each way after a warm-up; what moved on the lane
    # (the warm-up's and the lane round's weights and updates) is counted by the node, and nothing fell back.
    effect = report["lane_effect"]
    assert effect["weights_bytes"] > 20_000_000 and effect["nodes"] == 1
    for mode in ("lane", "stream"):
        assert effect[mode]["accepted_min"] == 1 and effect[mode]["round_s_median"] > 0
        assert effect[mode]["bytes_per_round"] > 2 * effect["weights_bytes"]
    counters = effect["node_lane_counters"]
    assert counters["weights_pulled"] == 2 and counters["results_by_reference"] == 2, counters
    assert counters["lane_fetched"] == 2 and counters.get("fallbacks", 0) == 0, counters
