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
    report = json.loads(proc.stdout)
    job = report["job"]
    assert job["status"] == "released" and job["signoff_verified"] is True
    assert job["accuracy"] > 0.8 and job["seconds"] > 0
    assert job["node"] == report["nodes"][0]["peer_id"]
    assert len(report["nodes"]) == 4 and len({n["peer_id"] for n in report["nodes"]}) == 4
