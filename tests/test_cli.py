"""The CLI as an operator uses it: real subprocesses, real stores, exit codes and --json."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import numpy as np
import pytest

from conftest import hc


def test_init_dataset_and_jobs_commands(tmp_path, digits):
    home = tmp_path / "home"
    first = json.loads(hc(home, "init", "--json").stdout)
    again = json.loads(hc(home, "init", "--json").stdout)
    assert first["created"] and not again["created"] and first["peer_id"] == again["peer_id"]
    assert stat.S_IMODE((home / "node.key").stat().st_mode) == 0o600
    np.savez(tmp_path / "d.npz", features=digits[0], labels=digits[1])
    added = json.loads(hc(home, "dataset", "add", "digits", str(tmp_path / "d.npz"), "--tag", "digits",
                          "--signoff", "manual", "--json").stdout)
    assert added["schema"]["num_samples"] == len(digits[0]) and added["signoff"] == "manual"
    assert hc(home, "dataset", "add", "digits", str(tmp_path / "d.npz"), check=False).returncode == 4
    listed = json.loads(hc(home, "dataset", "list", "--json").stdout)
    assert [d["name"] for d in listed] == ["digits"] and "mock" not in listed[0]
    assert json.loads(hc(home, "jobs", "list", "--json").stdout) == []
    assert hc(home, "jobs", "show", "0" * 32, check=False).returncode == 3
    assert hc(home, "jobs", "approve", "0" * 32, check=False).returncode == 3
    assert hc(home, "status", check=False).returncode == 5
    hc(home, "dataset", "remove", "digits")
    assert hc(home, "dataset", "remove", "digits", check=False).returncode == 3


@pytest.mark.parametrize("args, code, text", [
    (("dataset", "add", "x", "/no/such/file.npz"), 6, "no such file"),
    (("dataset", "add", "bad name", "/dev/null"), 6, ""),
    (("dataset", "list"), 3, "hivecell --home"),
    (("run", "--warm-workers", "99"), 2, "warm-workers"),
])
def test_errors_have_named_exit_codes(tmp_path, args, code, text):
    home = tmp_path / "h"
    if args[0] != "dataset" or args[1] != "list":
        hc(home, "init")
    proc = hc(home, *args, check=False)
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "hivecell.node.cli", "--help"], capture_output=True, text=True).stdout
    assert "demo" in out and "Exit codes" in out
    for cmd in (["run"], ["dataset", "add"], ["jobs", "approve"], ["demo"]):
        sub = subprocess.run([sys.executable, "-m", "hivecell.node.cli", *cmd, "--help"], capture_output=True,
                             text=True)
        assert sub.returncode == 0 and "Usage" in sub.stdout


def _stderr_with_cli_logging(verbose: int, then: str) -> str:
    """stderr of a fresh interpreter that sets logging up as the CLI does, imports py-libp2p, then runs ``then``."""
    code = (f"import logging; from hivecell.node.cli import _setup_logging; _setup_logging({verbose}); "
            f"import hivecell.mesh.host; {then}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("verbose", [0, 2])
def test_py_libp2p_import_keeps_the_cli_logging(verbose):
    """py-libp2p's import resets its logger (WARNING, no handler, no propagation: its routine dial failures went to
    stderr through logging.lastResort, tracebacks and all, in the middle of `hivecell demo`). The CLI's levels hold."""
    stderr = _stderr_with_cli_logging(verbose, "swarm = logging.getLogger('libp2p.network.swarm'); "
                                      "swarm.warning('py-libp2p dial failure'); swarm.debug('py-libp2p debug'); "
                                      "logging.getLogger('hivecell.node.daemon').warning('our warning')")
    assert "our warning" in stderr
    assert ("py-libp2p dial failure" in stderr) == (verbose == 2)
    assert ("py-libp2p debug" in stderr) == (verbose == 2)


def test_py_libp2p_modules_with_their_own_level_stay_below_the_cli_threshold():
    """Some py-libp2p modules set their own logger to INFO (the auto-connector logs every dial round); a parent's level
    does not filter what children propagate, so the libp2p logger's level must still be the threshold."""
    stderr = _stderr_with_cli_logging(0, "chatty = logging.getLogger('libp2p.network.auto_connector'); "
                                      "chatty.setLevel(logging.INFO); chatty.info('initiating 200 new dials'); "
                                      "logging.getLogger('libp2p').critical('py-libp2p critical')")
    assert "initiating 200 new dials" not in stderr and "py-libp2p critical" in stderr
