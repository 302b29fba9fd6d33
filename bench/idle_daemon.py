"""Idle daemon footprint: RSS and CPU of ``hivecell run`` with nothing to do; prints one JSON object.

Goal (issue 7): an idle daemon uses at most 150 MB RSS and under 1% of one core, and never loads torch (only the
Worker subprocesses do). Two real daemons on loopback, one after the other, each with a fresh home:

  cold   ``--warm-workers 0``: the daemon alone (it should have no child process at all). Its RSS, USS, CPU over
         --sample seconds after --settle seconds, and whether libtorch is mapped into it (/proc/PID/maps).
  warm   the default ``--warm-workers 1``: the daemon plus one spare Worker that has imported torch and waits, forked
         from the zygote (which is reported too). The spare's RSS is reported separately (``warm_spare_rss_mb``),
         and the PSS of spare and zygote together (``warm_workers_pss_mb``: they share most pages): the price of a
         job not waiting for torch to import, paid by child processes, not by the daemon.

Baselines, measured in the same run: a bare ``python -c "import time; time.sleep(30)"`` and a python that only does
``import libp2p`` (the floor the daemon's network stack sets). CPU percent is of one core (100 = one core busy).

Usage: ``python bench/idle_daemon.py [--settle 5] [--sample 10]``. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from hivecell.node.home import Home
from hivecell.node.localnet import DaemonProcess, start_daemon

GOAL = {"rss_mb_max": 150, "cpu_percent_max": 1}
MB = 1024 * 1024


def _mb(value: float) -> float:
    return round(value / MB, 1)


def torch_mapped(pid: int) -> bool:
    """Whether any libtorch shared object (torch's C++ core, loaded by ``import torch``) is mapped into ``pid``."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any("libtorch" in line for line in maps)
    except (FileNotFoundError, ProcessLookupError):
        return False


def cpu_percent(processes: list[psutil.Process], seconds: float) -> float:
    """CPU time used by ``processes`` over ``seconds`` of wall time, in percent of one core."""
    def total() -> float:
        used = 0.0
        for p in processes:
            try:
                t = p.cpu_times()
                used += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return used

    start_cpu, start = total(), time.monotonic()
    time.sleep(seconds)
    return round(100.0 * (total() - start_cpu) / (time.monotonic() - start), 3)


def sample_rss(processes: list[psutil.Process], seconds: float, interval: float = 0.5) -> float:
    """Peak of the summed RSS of ``processes`` over ``seconds``, in bytes."""
    peak, deadline = 0, time.monotonic() + seconds
    while True:
        rss = 0
        for p in processes:
            try:
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, rss)
        if time.monotonic() >= deadline:
            return peak
        time.sleep(interval)


def start(workdir: Path, name: str, warm: str) -> tuple[DaemonProcess, psutil.Process]:
    home = Home(workdir / name)
    home.init()
    daemon = start_daemon(home.path, "--warm-workers", warm)
    return daemon, psutil.Process(daemon.process.pid)


def _is_zygote(proc: psutil.Process) -> bool:
    try:
        return proc.name() == "hivecell-zygote"
    except psutil.NoSuchProcess:
        return False


def wait_for_spare(daemon: psutil.Process, timeout: float = 180.0) -> psutil.Process:
    """The warm spare, once it has imported torch and its RSS has stopped growing."""
    deadline = time.monotonic() + timeout
    spare, last, stable_since = None, -1, None
    while time.monotonic() < deadline:
        spares = [c for c in daemon.children(recursive=True) if not _is_zygote(c) and torch_mapped(c.pid)]
        if len(spares) == 1:
            spare = spares[0]
            rss = spare.memory_info().rss
            if abs(rss - last) < MB:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= 2.0:
                    return spare
            else:
                stable_since = None
            last = rss
        time.sleep(0.25)
    raise RuntimeError(f"no ready warm spare after {timeout:.0f} s (children: {daemon.children(recursive=True)})")


def baseline(code: str, settle: float) -> float:
    """RSS (MB) of a plain python running ``code`` and then sleeping."""
    proc = subprocess.Popen([sys.executable, "-c", f"{code}; import time; time.sleep(60)"])
    try:
        time.sleep(settle)
        assert proc.poll() is None, f"baseline {code!r} exited with {proc.returncode}"
        return _mb(psutil.Process(proc.pid).memory_info().rss)
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the daemon is ready")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds over which CPU and RSS are sampled")
    args = parser.parse_args()
    if not Path("/proc/self/maps").exists():
        sys.exit("this benchmark reads /proc: Linux only")

    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="hivecell-idle-") as tmp:
        workdir = Path(tmp)

        # cold: --warm-workers 0, the daemon alone
        daemon, proc = start(workdir, "cold", "0")
        try:
            time.sleep(args.settle)
            children = proc.children(recursive=True)
            cpu = cpu_percent([proc], args.sample)
            rss = sample_rss([proc], 1.0)
            rss_all = sample_rss([proc, *children], 1.0)
            result.update(
                daemon_rss_mb=_mb(rss),
                daemon_uss_mb=_mb(proc.memory_full_info().uss),
                daemon_rss_with_children_mb=_mb(rss_all),
                daemon_children=len(children),
                daemon_cpu_percent_idle=cpu,
                daemon_threads=proc.num_threads(),
                torch_in_daemon=torch_mapped(proc.pid),
            )
        finally:
            daemon.stop()

        # warm: the default --warm-workers 1, the daemon plus one spare that has imported torch
        daemon, proc = start(workdir, "warm", "1")
        try:
            spare = wait_for_spare(proc)
            time.sleep(args.settle)
            zygotes = [c for c in proc.children() if _is_zygote(c)]
            both = [proc, spare, *zygotes]
            cpu_both = cpu_percent(both, args.sample)
            workers = [spare, *zygotes]
            result.update(
                warm_spare_rss_mb=_mb(spare.memory_info().rss),
                warm_spare_uss_mb=_mb(spare.memory_full_info().uss),
                # The spare is forked from a zygote (worker_fork, the default) and shares most pages with it: RSS
                # counts those pages in both, PSS splits them, so the PSS sum is what the two really hold.
                warm_zygote_rss_mb=_mb(zygotes[0].memory_info().rss) if zygotes else None,
                warm_workers_pss_mb=_mb(sum(w.memory_full_info().pss for w in workers)),
                warm_daemon_rss_mb=_mb(proc.memory_info().rss),
                warm_total_rss_mb=_mb(sample_rss(both, 1.0)),
                warm_cpu_percent_idle=cpu_both,
                torch_in_warm_daemon=torch_mapped(proc.pid),
                torch_in_warm_spare=torch_mapped(spare.pid),  # proves the maps check sees torch where it is
            )
        finally:
            daemon.stop()

    result["baseline"] = {
        "python_sleep_rss_mb": baseline("pass", args.settle),
        "python_import_libp2p_rss_mb": baseline("import libp2p", args.settle),
    }
    result["goal"] = GOAL
    result["within_goal"] = (result["daemon_rss_mb"] <= GOAL["rss_mb_max"]
                             and result["daemon_cpu_percent_idle"] < GOAL["cpu_percent_max"]
                             and not result["torch_in_daemon"] and not result["torch_in_warm_daemon"])
    result["settings"] = {"settle_s": args.settle, "sample_s": args.sample, "python": sys.version.split()[0],
                          "cpus": psutil.cpu_count(),
                          # CPU time is counted in clock ticks: the smallest non-zero percent over --sample seconds
                          "cpu_percent_resolution": round(100.0 / os.sysconf("SC_CLK_TCK") / args.sample, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
