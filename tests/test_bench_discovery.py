"""Smoke test of bench/discovery.py --quick: 6 index peers in 2 processes converge with nothing lost, a small search
bench and a short idle daemon run, and (where namespaces can be made) a LAN of one base daemon and one timed one.

It keeps the benchmark from rotting when the gossip index, the client or the daemon change under it (the workers
wrap GossipIndex and Pubsub methods to count messages). Speed is not asserted, only that the numbers exist and are
sane: convergence reached and no advert lost are correctness, not speed, at 6 peers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "discovery.py"


def test_discovery_bench_quick_prints_one_json_object() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert {"lan_searchable_s", "convergence", "search_latency_ms", "idle_daemon", "goals", "settings",
            "elapsed_s"} <= report.keys()

    (run,) = report["convergence"]["runs"]
    assert "error" not in run, run.get("error")
    assert run["peers"] == 6 and run["processes"] == 2
    assert run["converged"] is True, run
    assert run["adverts_lost"] == 0 and run["missing_pairs"] == 0 and run["digests_equal"] is True, run
    assert 0 < run["convergence_s"] < run["timeout_s"]
    assert run["filed_by"]["gossip"] + run["filed_by"]["anti_entropy"] >= run["filed_by"]["expected_deliveries"]
    assert run["messages_until_converged"]["published"] == 6
    assert run["gossipsub_rpcs_until_converged"]["rpcs"] > 0
    assert len(run["per_process"]) == 2
    assert all(p["cpu_s_total"] > 0 and p["rss_mb"] > 0 for p in run["per_process"])

    search = report["search_latency_ms"]
    assert search["adverts"] == 100
    for name in ("word", "tag", "miss", "all_limit100"):
        assert 0 < search["index_search_request"][name]["median"] <= search["index_search_request"][name]["p90"]
        assert search["baseline_in_process_search"][name]["median"] > 0
    assert search["client_search_e2e"]["tag"]["median"] > 0

    idle = report["idle_daemon"]["alone"]
    assert idle["rss_mb"] > 0 and idle["cpu_percent"] >= 0 and idle["torch_loaded"] is False

    lan = report["lan_searchable_s"]
    if "skipped" not in lan:  # namespaces could be made: one timed daemon, found, searchable, in the other's index
        assert "error" not in lan, lan.get("error")
        (trial,) = [r for r in lan["rows"] if r["kind"] == "trial"]
        assert trial["timed_out"] is False, lan
        assert trial["daemon_start_s"] > 0 and trial["searchable_from_start_s"] > 0
        assert trial["in_every_index_from_start_s"] is not None
        assert lan["daemon_logs_with_traceback"] == []
    assert "convergence N=6" in proc.stderr  # progress goes to stderr
