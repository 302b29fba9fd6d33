"""Smoke test of bench/transfer.py: one 100 MB blob between two processes, over plain TCP (with and without the
sha256 check), a bare py-libp2p stream and the bulk lane, and the goal's verdict.

It keeps the benchmark from rotting when the lane or the host change under it. Speed is not asserted (the box is
shared and noisy), only that every number exists, is sane and agrees with the lane's own byte counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "transfer.py"
MODES = ("tcp", "tcp_sha256", "libp2p_stream", "lane")


def test_transfer_bench_prints_one_json_object_with_the_goal_and_its_bound() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--sizes", "100", "--repeats", "1", "--modes", ",".join(MODES)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    row = report["results"]["100"]
    for mode in MODES:
        assert row[mode]["runs"] == 1
        assert row[mode]["mb_per_s"] > 0 and row[mode]["cpu_s_per_gb_receiver"] > 0, row[mode]
    assert row["ratios"]["lane_over_tcp"] == pytest.approx(row["lane"]["mb_per_s"] / row["tcp"]["mb_per_s"], rel=0.01)
    # Warm-up and one measured fetch went over the lane, none fell back to the stream.
    assert report["receiver_lane_stats"]["lane_fetched"] == 2
    assert report["receiver_lane_stats"]["bytes_received_lane"] == 200_000_000
    assert report["holder_lane_stats"]["bytes_sent_lane"] == 200_000_000
    assert "bytes_received_stream" not in report["receiver_lane_stats"]

    goal = report["goal"]["100"]
    bound = row["tcp_sha256"]["mb_per_s"] / row["libp2p_stream"]["mb_per_s"]
    assert goal["tcp_sha256_over_libp2p_stream"] == pytest.approx(bound, rel=0.01)
    assert goal["ten_x_stream_reachable"] is (bound >= 10)
    assert goal["met"] is (goal["lane_over_libp2p_stream"] >= 10 and goal["lane_over_tcp"] >= 0.30)
    assert report["goal"]["met"] is goal["met"]
    assert "100 MB lane" in proc.stderr  # progress goes to stderr
